"""The ``color`` output kind (issue 17, part 4) and its burned-in legend and disclaimer (part 6).

One phantom study, written as colour series in every plane with ROIs and the default disclaimer
("full"), with neither ("blank") and with ROIs but the disclaimer off, plus the overlay series of
the same study (``write_plane``) for the geometry comparison. Expected ROI boundaries come from the
per-ROI masks on each plane's own grid (axial: the rasterised mask; coronal/sagittal: the same mask
through :func:`netrt.reformat.reformat`, the whole-volume path the writer's streamed slabs must
match) and :func:`netrt.burnin.outline`; the window from the DICOM formula applied to the phantom's
HU. Independent readers: dcmtk's ``dcm2pnm`` (pixels), dicom3tools' ``dciodvfy`` (IOD).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from netrt.burnin import outline
from netrt.config import ProcessingConfig
from netrt.errors import NetrtError, RoiError
from netrt.outputs.color import (
    CT_DEFAULT_WINDOW,
    DEFAULT_DISCLAIMER,
    ColorSettings,
    Window,
    series_window,
    window_to_grey,
    write_color_series,
)
from netrt.outputs.rois import RoiInfo, build_roi_masks, load_roi_box
from netrt.outputs.text import MIN_FONT_PX, composite, font_size_for, render_annotation
from netrt.phantom import PhantomSpec, write_phantom
from netrt.pipeline import compute_mask, write_plane
from netrt.reformat import reformat
from netrt.study import LoadedStudy, load_study
from tests.conftest import require_tool

PLANES = ("axial", "coronal", "sagittal")
IGNORE = ["*skull*", "*patient_outline*"]
# 256 x 256 at 1 mm (the patient outline fits with air in the corners, where the legend goes),
# 64 slices at 2.5 mm: coronal/sagittal images of 256 x 158, six kept ROIs in six colours.
SPEC = PhantomSpec(rows=256, columns=256, pixel_spacing=(1.0, 1.0), slice_spacing=2.5, slices=64, extra_spheres=2)
KEY = "color-test-key"


@dataclass
class Made:
    study: LoadedStudy
    rois: list[RoiInfo]
    masks: Path
    hu: np.ndarray  # [slice, row, col] HU of the phantom, spatial order
    full: dict[str, list[Path]]
    blank: dict[str, list[Path]]
    no_disclaimer: dict[str, list[Path]]
    overlay: dict[str, list[Path]]
    root: Path


def _settings(**changes: object) -> ColorSettings:
    values: dict[str, object] = {"settings_key": KEY, "series_number": 9101, **changes}
    return ColorSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    root = tmp_path_factory.mktemp("color")
    manifest = write_phantom(SPEC, root / "phantom")
    study = load_study([*manifest.image_files, manifest.rtstruct_file])
    rois, masks = build_roi_masks(study.rtstruct_file, study.images.geometry, [], IGNORE, root / "rois.npz")
    hu = np.stack(
        [
            ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            for ds in (dcmread(p) for p in study.images.files)
        ]
    )
    runs: dict[str, dict[str, list[Path]]] = {"full": {}, "blank": {}, "no_disclaimer": {}}
    for plane in PLANES:
        runs["full"][plane] = write_color_series(study, rois, masks, plane, root / "full" / plane, _settings())
        runs["blank"][plane] = write_color_series(
            study, [], masks, plane, root / "blank" / plane, _settings(disclaimer="")
        )
        runs["no_disclaimer"][plane] = write_color_series(
            study, rois, masks, plane, root / "no-disclaimer" / plane, _settings(disclaimer="")
        )
    processing = ProcessingConfig(ignore_rois=IGNORE)
    mask_result = compute_mask(study, processing, root / "overlay")
    overlay = {}
    for plane in PLANES:
        (series,) = write_plane(study, mask_result, plane, processing, root / "overlay")
        overlay[plane] = list(series.files)
    return Made(study, rois, masks, hu, runs["full"], runs["blank"], runs["no_disclaimer"], overlay, root)


def _ordered(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda p: int(dcmread(p, stop_before_pixels=True).InstanceNumber))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(dcmread(path).pixel_array)


def _volume(files: list[Path]) -> np.ndarray:
    """The series as ``[slice, row, col, rgb]``, slices by InstanceNumber."""
    return np.stack([_pixels(p) for p in _ordered(files)])


def _roi_masks_on_plane(made: Made, plane: str) -> dict[int, np.ndarray]:
    """Each ROI's mask ``[slice, row, col]`` on the grid of ``plane`` (see the module docstring)."""
    geometry = made.study.images.geometry
    masks = {}
    for roi in made.rois:
        full = load_roi_box(made.masks, roi.number).full()
        if plane == "axial":
            masks[roi.number] = full[list(made.study.images.slice_indices)]
        else:
            masks[roi.number] = reformat(np.zeros(geometry.shape, np.int16), full, geometry, plane).mask
    return masks


def _text_region(shape: tuple[int, int], rois: list[RoiInfo], disclaimer: str) -> np.ndarray:
    """Pixels the legend and disclaimer actually cover (any glyph or swatch coverage), excluded from
    outline sampling: what a reader sees there is the text, by design."""
    annotation = render_annotation(shape[0], shape[1], [(r.name, r.color) for r in rois], disclaimer)
    region = np.zeros(shape, dtype=bool)
    if annotation.box is not None:
        x0, y0, x1, y1 = annotation.box
        region[y0:y1, x0:x1] = annotation.alpha > 0
    return region


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """In-plane dilation by ``pixels`` (square) of a ``[slice, row, col]`` mask."""
    out = mask.copy()
    for _ in range(pixels):
        grown = out.copy()
        grown[:, 1:, :] |= out[:, :-1, :]
        grown[:, :-1, :] |= out[:, 1:, :]
        grown[:, :, 1:] |= out[:, :, :-1]
        grown[:, :, :-1] |= out[:, :, 1:]
        grown[:, 1:, 1:] |= out[:, :-1, :-1]
        grown[:, :-1, :-1] |= out[:, 1:, 1:]
        grown[:, 1:, :-1] |= out[:, :-1, 1:]
        grown[:, :-1, 1:] |= out[:, 1:, :-1]
        out = grown
    return out


# ---------------------------------------------------------------------------------------------
# Colours on the ROI boundaries, grey elsewhere


@pytest.mark.parametrize("plane", PLANES)
def test_roi_boundaries_carry_their_roi_colour_and_the_rest_is_grey(made: Made, plane: str) -> None:
    pixels = _volume(made.full[plane])
    masks = _roi_masks_on_plane(made, plane)
    assert pixels.shape[:3] == next(iter(masks.values())).shape
    text = _text_region(pixels.shape[1:3], made.rois, DEFAULT_DISCLAIMER)
    outlines = {number: outline(mask) for number, mask in masks.items()}
    for roi in made.rois:
        others = np.zeros_like(outlines[roi.number])
        for number, edge in outlines.items():
            if number != roi.number:
                others |= edge
        sampled = outlines[roi.number] & ~others & ~text[None]
        assert outlines[roi.number].sum() > 0, roi.name
        # the text covers little: most of every ROI's boundary is sampled
        assert sampled.sum() >= max(100, 0.5 * outlines[roi.number].sum()), roi.name
        colours = pixels[sampled]
        wrong = np.any(colours != np.asarray(roi.color, dtype=np.uint8), axis=1)
        assert not wrong.any(), f"{plane} {roi.name}: {wrong.sum()} of {len(colours)} boundary pixels not {roi.color}"
    # pixels more than two pixels from every ROI (and outside the text) are grey
    near = _dilate(np.logical_or.reduce(list(masks.values())), 2)
    far = ~near & ~text[None]
    assert far.sum() > 0.5 * far.size
    grey = pixels[far]
    assert np.array_equal(grey[:, 0], grey[:, 1]) and np.array_equal(grey[:, 1], grey[:, 2]), plane


def test_axial_grey_levels_are_the_source_window(made: Made) -> None:
    """Away from ROIs and text, each pixel is the phantom's HU through its own 40/400 window (DICOM linear VOI)."""
    header = dcmread(made.study.images.files[0], stop_before_pixels=True)
    center, width = float(header.WindowCenter), float(header.WindowWidth)
    expected = np.clip(((made.hu - (center - 0.5)) / (width - 1) + 0.5) * 255.0, 0, 255)
    pixels = _volume(made.full["axial"])
    masks = _roi_masks_on_plane(made, "axial")
    far = ~_dilate(np.logical_or.reduce(list(masks.values())), 2)
    far &= ~_text_region(pixels.shape[1:3], made.rois, DEFAULT_DISCLAIMER)[None]
    assert np.abs(pixels[..., 0][far].astype(float) - expected[far]).max() <= 0.5 + 1e-6
    # the window spans the phantom's values: dark air, bright skull, mid-grey tissue all occur
    assert {0, 255} <= set(np.unique(pixels[..., 0][far]).tolist())


def test_translucent_fill_blends_the_roi_colour_over_its_inside(made: Made) -> None:
    opacity = 0.4
    filled = _volume(
        write_color_series(
            made.study, made.rois, made.masks, "axial", made.root / "fill", _settings(fill_opacity=opacity)
        )
    )
    plain = _volume(made.full["axial"])
    masks = _roi_masks_on_plane(made, "axial")
    text = _text_region(plain.shape[1:3], made.rois, DEFAULT_DISCLAIMER)
    for roi in made.rois:
        inside = masks[roi.number] & ~outline(masks[roi.number]) & ~text[None]
        assert inside.sum() > 0, roi.name
        grey = plain[inside].astype(float)  # outline-only render: the grey under the fill
        expected = np.rint((1 - opacity) * grey + opacity * np.asarray(roi.color, dtype=float))
        assert np.array_equal(filled[inside], expected.astype(np.uint8)), roi.name
        # outlines stay the pure colour, untinted by the fill
        edge = outline(masks[roi.number]) & ~text[None]
        assert np.all(filled[edge] == np.asarray(roi.color, dtype=np.uint8)), roi.name


# ---------------------------------------------------------------------------------------------
# Legend and disclaimer


def _swatch_pixels(image: np.ndarray, color: tuple[int, int, int]) -> int:
    """Pixels of ``color`` whose whole 3x3 neighbourhood is that colour: a filled swatch, never a
    one-pixel outline."""
    same = np.all(image == np.asarray(color, dtype=np.uint8), axis=2)
    core = same[1:-1, 1:-1].copy()
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            core &= same[1 + dr : same.shape[0] - 1 + dr, 1 + dc : same.shape[1] - 1 + dc]
    return int(core.sum())


@pytest.mark.parametrize("plane", PLANES)
def test_legend_and_disclaimer_are_burned_in(made: Made, plane: str) -> None:
    full_files, blank_files, off_files = (_ordered(run[plane]) for run in (made.full, made.blank, made.no_disclaimer))
    middle = len(full_files) // 2
    full, blank, off = (_pixels(files[middle]) for files in (full_files, blank_files, off_files))
    rows, columns = full.shape[:2]
    # Legend, top-left: a filled swatch of every ROI's colour, and text beside it that the render
    # without ROIs does not have.
    corner = (slice(0, rows * 2 // 3), slice(0, columns // 2))
    for roi in made.rois:
        assert _swatch_pixels(full[corner], roi.color) >= 9, f"{plane}: no swatch of {roi.name} {roi.color}"
        assert _swatch_pixels(blank[corner], roi.color) == 0
    legend_diff = np.any(full[corner] != blank[corner], axis=2)
    # near-white glyph pixels (anti-aliased at the 10 px minimum) where the render without ROIs has none
    light = np.all(full[corner] >= 200, axis=2) & (full[corner].min(axis=2) == full[corner].max(axis=2))
    assert np.sum(light & legend_diff) >= 30
    # Disclaimer, along the bottom (no ROI reaches it in this phantom): present with the default
    # text, legible in size, and gone when the disclaimer is off.
    band = slice(rows - 3 * font_size_for(rows, columns), rows)
    differs = np.any(full[band] != blank[band], axis=2)
    assert differs.sum() >= 300, f"{plane}: disclaimer missing ({differs.sum()} pixels differ)"
    text_rows = np.flatnonzero(differs.any(axis=1))
    assert text_rows[-1] - text_rows[0] + 1 >= 0.7 * MIN_FONT_PX  # capitals of the smallest font, with stroke
    assert np.array_equal(off[band], blank[band]), f"{plane}: something is drawn there with the disclaimer off"
    assert not np.array_equal(off[corner], blank[corner])  # the legend stays when only the disclaimer is off


def test_text_is_legible_at_512_pixels_and_fits() -> None:
    legend = [(f"roi_{i}", (255, 0, 0)) for i in range(10)]
    annotation = render_annotation(512, 512, legend, DEFAULT_DISCLAIMER)
    assert annotation.font_size >= 14
    assert annotation.legend_box is not None and annotation.disclaimer_box is not None
    x0, y0, x1, y1 = annotation.disclaimer_box
    assert x0 >= 0 and x1 <= 512 and y1 <= 512 and y1 - y0 >= 12  # one line, whole, cap height + stroke
    drawn = composite(np.full((512, 512, 3), 100, dtype=np.uint8), annotation)
    region = drawn[y0:y1, x0:x1]
    assert np.sum(np.all(region == 255, axis=2)) >= 200  # solid white strokes, not a faint smear
    assert np.sum(np.all(region == 0, axis=2)) >= 200  # the black outline that keeps it legible on white
    assert render_annotation(64, 64, [], DEFAULT_DISCLAIMER).font_size == MIN_FONT_PX
    assert render_annotation(64, 64, [], "").box is None


def test_composite_is_the_alpha_blend_of_every_pixel() -> None:
    """``composite`` against the blend written out per pixel (round(x * (1 - a) + c * a) with a = alpha / 255,
    in integers), for a fresh copy and in place on a contiguous and on a strided image."""
    annotation = render_annotation(300, 400, [("bladder", (255, 255, 0)), ("rectum", (0, 90, 255))], DEFAULT_DISCLAIMER)
    assert annotation.box is not None
    image = np.random.default_rng(7).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    x0, y0, x1, y1 = annotation.box
    expected = image.astype(np.int64)
    alpha = annotation.alpha.astype(np.int64)[:, :, None]
    under = expected[y0:y1, x0:x1]
    expected[y0:y1, x0:x1] = (under * (255 - alpha) + annotation.rgb.astype(np.int64) * alpha + 127) // 255
    assert np.array_equal(composite(image, annotation), expected)
    assert not np.array_equal(image, expected)  # not in place: the input is unchanged
    inplace = image.copy()
    assert composite(inplace, annotation, in_place=True) is inplace
    assert np.array_equal(inplace, expected)
    wide = np.zeros((300, 800, 3), dtype=np.uint8)
    strided = wide[:, ::2]
    strided[...] = image
    assert composite(strided, annotation, in_place=True) is strided
    assert np.array_equal(strided, expected) and not wide[:, 1::2].any()


# ---------------------------------------------------------------------------------------------
# Independent readers and geometry


def _dciodvfy_errors(path: Path) -> list[str]:
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


@pytest.mark.parametrize("plane", PLANES)
def test_dciodvfy_reports_no_error(made: Made, plane: str) -> None:
    files = _ordered(made.full[plane])
    assert _dciodvfy_errors(files[len(files) // 2]) == []


@pytest.mark.parametrize("plane", PLANES)
def test_dcmtk_renders_the_pixels_pydicom_reads(made: Made, plane: str, tmp_path: Path) -> None:
    tool = require_tool("dcm2pnm")
    files = _ordered(made.full[plane])
    path = files[len(files) // 2]
    out = tmp_path / "render.ppm"
    subprocess.run([tool, "+op", str(path), str(out)], check=True, capture_output=True, timeout=60)
    rendered = np.asarray(Image.open(out).convert("RGB"))
    expected = _pixels(path)
    assert rendered.shape == expected.shape
    assert np.array_equal(rendered, expected)
    assert len({tuple(c) for c in expected.reshape(-1, 3)[::7]}) > 10  # a colour picture, not a blank


GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "FrameOfReferenceUID")


@pytest.mark.parametrize("plane", PLANES)
def test_geometry_equals_the_overlay_series(made: Made, plane: str) -> None:
    color = [dcmread(p, stop_before_pixels=True) for p in _ordered(made.full[plane])]
    overlay = [dcmread(p, stop_before_pixels=True) for p in _ordered(made.overlay[plane])]
    assert len(color) == len(overlay)
    for ours, theirs in zip(color, overlay, strict=True):
        for keyword in GEOMETRY:
            assert str(ours[keyword].value) == str(theirs[keyword].value), (plane, keyword, ours.InstanceNumber)
        assert (ours.Rows, ours.Columns) == (theirs.Rows, theirs.Columns)
    first, source = color[0], dcmread(made.study.images.files[0], stop_before_pixels=True)
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
    assert (first.SamplesPerPixel, first.PhotometricInterpretation, first.BitsAllocated) == (3, "RGB", 8)
    assert first.BurnedInAnnotation == "YES"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate", "AccessionNumber"):
        assert first[keyword].value == source[keyword].value, keyword


def test_uids_are_deterministic_and_distinct(made: Made) -> None:
    again = write_color_series(made.study, made.rois, made.masks, "coronal", made.root / "again", _settings())
    first = _ordered(made.full["coronal"])
    second = _ordered(again)
    assert [p.name for p in first] == [p.name for p in second]
    a = [dcmread(p, stop_before_pixels=True) for p in first]
    b = [dcmread(p, stop_before_pixels=True) for p in second]
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert len({d.SeriesInstanceUID for d in a}) == 1
    assert {d.SeriesInstanceUID for d in a} == {d.SeriesInstanceUID for d in b}
    assert _pixels(first[5]).tobytes() == _pixels(second[5]).tobytes()
    series = {plane: dcmread(made.full[plane][0], stop_before_pixels=True).SeriesInstanceUID for plane in PLANES}
    overlays = {dcmread(made.overlay[plane][0], stop_before_pixels=True).SeriesInstanceUID for plane in PLANES}
    assert len(set(series.values())) == 3 and not set(series.values()) & overlays
    other = write_color_series(
        made.study, made.rois, made.masks, "axial", made.root / "other-key", _settings(settings_key="another")
    )
    assert dcmread(other[0], stop_before_pixels=True).SeriesInstanceUID != series["axial"]


# ---------------------------------------------------------------------------------------------
# Windows, settings and errors


def _header(modality: str, **values: object) -> Dataset:
    ds = Dataset()
    ds.Modality = modality
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_window_defaults_per_modality() -> None:
    volume = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    own = series_window(_header("MR", WindowCenter=["300", "40"], WindowWidth=["600", "80"]), "MR", volume)
    assert (own.center, own.width) == (300.0, 600.0)  # the first of several windows
    assert (series_window(_header("CT"), "CT", volume).center, series_window(_header("CT"), "CT", volume).width) == (
        CT_DEFAULT_WINDOW
    )
    mr = series_window(_header("MR"), "MR", volume)
    low, high = np.percentile(volume, [1, 99])
    assert mr.center == pytest.approx((low + high) / 2) and mr.width == pytest.approx(high - low)
    # DICOM linear VOI at c=40, w=400: the window's ends map to black and white, MONOCHROME1 inverted
    grey = window_to_grey(np.array([-1000.0, -160.0, 40.0, 240.0, 3000.0]), Window(40, 400, "test"))
    assert grey.tolist() == [0, 0, 128, 255, 255]
    assert window_to_grey(np.array([-1000.0, 3000.0]), Window(40, 400, "test"), invert=True).tolist() == [255, 0]


def test_bad_settings_and_missing_masks_are_named(made: Made) -> None:
    with pytest.raises(NetrtError, match="opacity"):
        _settings(fill_opacity=1.5)
    with pytest.raises(NetrtError, match="unknown plane"):
        write_color_series(made.study, made.rois, made.masks, "oblique", made.root / "bad", _settings())
    ghost = RoiInfo(999, "ghost", (1, 2, 3), False, "")
    with pytest.raises(RoiError, match="ghost"):
        write_color_series(made.study, [ghost], made.masks, "axial", made.root / "ghost", _settings())


def test_pre_encoded_colour_files_are_what_dcmwrite_writes(made: Made) -> None:
    """The colour series encodes the elements its slices share once (netrt.overlay.SliceWriter);
    each file must still be, byte for byte, what pydicom's dcmwrite writes for its data set."""
    from io import BytesIO

    from pydicom.filewriter import dcmwrite

    for plane, files in made.full.items():
        for path in (files[0], files[len(files) // 2], files[-1]):
            buffer = BytesIO()
            dcmwrite(buffer, dcmread(path), enforce_file_format=True)
            assert buffer.getvalue() == path.read_bytes(), f"{plane}: {path.name}"


def _pixel_bytes(files: list[Path]) -> dict[str, bytes]:
    return {path.name: dcmread(path).PixelData for path in files}


def test_reformatted_colour_reads_the_overlay_series_and_gives_the_same_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the plane's overlay series written first (the flow's order), the colour series reads
    its image from those files instead of resampling the source; without it, it resamples. Both
    give the same files, pixel for pixel (stored precision either way); a damaged overlay series is
    not read."""
    from netrt.outputs import color as color_module
    from netrt.outputs.overlay import written_plane_image
    from netrt.pipeline import output_context, write_output

    spec = PhantomSpec(rows=64, columns=64, pixel_spacing=(2.0, 2.0), slice_spacing=2.5, slices=24)
    manifest = write_phantom(spec, tmp_path / "phantom")
    study = load_study([*manifest.image_files, manifest.rtstruct_file])
    processing = ProcessingConfig(ignore_rois=IGNORE, outputs=["overlay", "color"])
    colour: dict[str, dict[str, list[Path]]] = {}
    for variant in ("from-overlay", "resampled"):
        work = tmp_path / variant
        masks = compute_mask(study, processing, work)
        colour[variant] = {}
        for plane in ("coronal", "sagittal"):
            if variant == "from-overlay":
                write_output(study, masks, "overlay", plane, processing, work)
                assert written_plane_image(output_context(study, masks, processing, work), plane) is not None
                with monkeypatch.context() as patched:  # reading the overlay series: no resampling at all
                    patched.setattr(color_module, "reformat_slabs", None)
                    (series,) = write_output(study, masks, "color", plane, processing, work)
            else:
                assert written_plane_image(output_context(study, masks, processing, work), plane) is None
                (series,) = write_output(study, masks, "color", plane, processing, work)
            colour[variant][plane] = list(series.files)
    for plane in ("coronal", "sagittal"):
        assert _pixel_bytes(colour["from-overlay"][plane]) == _pixel_bytes(colour["resampled"][plane])

    # a truncated overlay file: the series is not read (resampled instead), and the colour files stay the same
    work = tmp_path / "from-overlay"
    masks = compute_mask(study, processing, work)
    context = output_context(study, masks, processing, work)
    overlay_files = sorted((work / "series" / "coronal").glob("*.dcm"))
    damaged = overlay_files[len(overlay_files) // 2]
    damaged.write_bytes(damaged.read_bytes()[:-10])
    assert written_plane_image(context, "coronal") is None
    (series,) = write_output(study, masks, "color", "coronal", processing, work)
    assert _pixel_bytes(list(series.files)) == _pixel_bytes(colour["resampled"]["coronal"])


@pytest.mark.parametrize(("slope", "intercept"), [(1.0, -1024.0), (0.5, 10.0), (2.5, -3000.0), (-1.0, 0.0)])
def test_stored_values_are_windowed_as_their_modality_values(slope: float, intercept: float) -> None:
    """The rescale folded into the window gives the grey levels of the modality values: the same but
    for float rounding on a level's edge (at most one level, in a few pixels)."""
    from netrt.outputs.color import Window, _stored_to_grey, window_to_grey
    from netrt.overlay import PixelFormat

    fmt = PixelFormat(16, 16, 1, slope, intercept, np.dtype("<i2"))
    stored = np.arange(-32768, 32768, dtype=np.int16).reshape(256, 256)
    for window in (Window(40.0, 400.0, "soft tissue"), Window(-600.0, 1500.0, "lung"), Window(3.0, 1.0, "one")):
        expected = window_to_grey(fmt.to_modality(stored), window)
        got = _stored_to_grey(fmt, window, False)(stored)
        differ = got.astype(int) - expected.astype(int)
        assert np.abs(differ).max() <= 1, window
        assert np.count_nonzero(differ) <= stored.size // 1000, window
        assert (expected == 255).sum() > 0 and (expected == 0).sum() > 0  # the window's both ends are crossed


def test_the_writing_thread_keeps_the_order_and_its_error_reaches_the_caller(tmp_path: Path) -> None:
    from pydicom.dataset import FileMetaDataset

    from netrt.outputs.color import _OrderedWriter

    class Recorder:
        """Stands in for the slice encoder: records the data set's state at each write."""

        def __init__(self, sc: Dataset, fail_at: int | None) -> None:
            self.sc, self.fail_at, self.seen = sc, fail_at, []

        def write(self) -> Path:
            number = int(self.sc.InstanceNumber)
            if number == self.fail_at:
                raise OSError(28, "No space left on device")
            self.seen.append((number, self.sc.ImagePositionPatient[2], bytes(self.sc.PixelData[:1])))
            return tmp_path / f"{number}.dcm"

    def run(fail_at: int | None) -> tuple[Recorder, list[Path]]:
        sc = Dataset()
        sc.file_meta = FileMetaDataset()
        recorder = Recorder(sc, fail_at)
        with _OrderedWriter(sc, "1.2.3", recorder, depth=2) as output:  # type: ignore[arg-type]
            for index in range(20):
                rgb = np.full((2, 2, 3), index, dtype=np.uint8)
                output.put(index, rgb, {"ImagePositionPatient": [0, 0, index]})
            return recorder, output.finish()

    recorder, files = run(None)
    assert files == [tmp_path / f"{n}.dcm" for n in range(1, 21)]
    assert recorder.seen == [(n + 1, n, bytes([n])) for n in range(20)]  # elements and pixels of the same slice
    with pytest.raises(OSError, match="No space left"):
        run(7)
