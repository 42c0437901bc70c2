"""The run's preview PNG (issue 19, item 3): each kept ROI outlined in its RTSTRUCT colour, a
legend naming each ROI, the disclaimer, panels of at least 256 px at true aspect ratio, and the
three planes read without decoding the volume.

Independent truths: ROI outlines come from the phantom's analytic masks (:func:`truth_masks`,
computed from the solids, not from the contours) sampled the way each panel says it samples the
grid; legend names are matched against the names drawn afresh with Pillow's font; the cut planes
are compared with the whole volume decoded by :func:`read_image_volume`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.uid import RLELossless

from netrt.burnin import outline
from netrt.config import ProcessingConfig
from netrt.outputs.color import DEFAULT_DISCLAIMER
from netrt.phantom import PhantomSpec, truth_masks, write_phantom
from netrt.pipeline import MaskStepResult, compute_mask, preview_step
from netrt.preview import FONT_PX, PANEL_SIZE, Preview, preview_study, read_preview
from netrt.study import LoadedStudy, load_study, read_cross_sections, read_image_volume

SPEC = PhantomSpec()  # the default phantom: what `netrt phantom` writes and the README shows
KEPT = ["sphere", "box", "hollow_sphere", "torus"]  # the default ignore_rois drop Skull and Patient_Outline


@dataclass
class Rendered:
    study: LoadedStudy
    masks: MaskStepResult
    preview: Preview
    pixels: np.ndarray
    bare: Preview  # the same study without ROIs (and the same disclaimer)
    bare_pixels: np.ndarray


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    root = tmp_path_factory.mktemp("preview")
    manifest = write_phantom(SPEC, root / "phantom")
    study = load_study([*manifest.image_files, manifest.rtstruct_file])
    masks = compute_mask(study, ProcessingConfig(), root / "work")
    preview = preview_step(study, masks, root / "preview.png", DEFAULT_DISCLAIMER)
    bare = preview_study(study.images, masks.roi_masks, [], root / "bare.png", DEFAULT_DISCLAIMER)
    return Rendered(study, masks, preview, read_preview(preview.path), bare, read_preview(bare.path))


def _near(mask: np.ndarray, pixels: int = 1) -> np.ndarray:
    """``mask`` grown by ``pixels`` in every direction (8-connected)."""
    out = mask.copy()
    for _ in range(pixels):
        padded = np.pad(out, 1)
        grown = np.zeros_like(out)
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                grown |= padded[1 + dr : padded.shape[0] - 1 + dr, 1 + dc : padded.shape[1] - 1 + dc]
        out = grown
    return out


def test_each_kept_roi_is_outlined_in_its_rtstruct_colour(rendered: Rendered) -> None:
    truth = truth_masks(SPEC)
    infos = {roi.name: roi for roi in rendered.masks.roi_infos}
    assert sorted(infos) == sorted(KEPT)
    header = dcmread(rendered.study.rtstruct_file, stop_before_pixels=True)
    rtstruct_colors = {
        roi.ROIName: tuple(int(v) for v in item.ROIDisplayColor)
        for roi, item in zip(header.StructureSetROISequence, header.ROIContourSequence, strict=True)
    }
    seen = set()
    for panel in rendered.preview.panels:
        shown = rendered.pixels[panel.y0 : panel.y0 + panel.height, panel.x0 : panel.x0 + panel.width]
        coloured = shown.max(axis=2) != shown.min(axis=2)
        accounted = np.zeros(coloured.shape, dtype=bool)
        for name in KEPT:
            color = rtstruct_colors[name]
            assert infos[name].color == color
            expected = outline(panel.sample(truth[name]))
            painted = np.all(shown == np.asarray(color, dtype=np.uint8), axis=2)
            accounted |= painted
            if expected.sum() < 20:
                assert painted.sum() <= 4, f"{panel.plane}: {name} drawn where its truth is not cut"
                continue
            seen.add(name)
            # the analytic boundary and the rasterised contour's may differ by a voxel (one panel pixel here)
            on_outline = (_near(painted) & expected).sum() / expected.sum()
            assert on_outline >= 0.9, f"{panel.plane}: {name}'s outline shows {color} on {on_outline:.0%} of it"
            stray = (painted & ~_near(expected, 2)).sum() / painted.sum()
            assert stray <= 0.02, f"{panel.plane}: {stray:.0%} of {name}'s colour lies off its outline"
        # everything else is the grey image: no tint, no other colour
        assert not (coloured & ~accounted).any(), f"{panel.plane}: pixels in no ROI colour are coloured"
    assert seen == set(KEPT), f"ROIs never cut by a panel: {set(KEPT) - seen}"
    # the render without ROIs has no colour anywhere in its panels
    for panel in rendered.bare.panels:
        shown = rendered.bare_pixels[panel.y0 : panel.y0 + panel.height, panel.x0 : panel.x0 + panel.width]
        assert np.all(shown.max(axis=2) == shown.min(axis=2))


def _glyphs(text: str) -> np.ndarray:
    """Where ``text``'s letters are, drawn afresh in the preview's font size (no stroke)."""
    font = ImageFont.load_default(size=FONT_PX)
    _, _, x1, y1 = font.getbbox(text)
    image = Image.new("L", (int(x1) + 2, int(y1) + 2), 0)
    ImageDraw.Draw(image).text((0, 0), text, font=font, fill=255)
    mask = np.asarray(image) >= 128
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _best_overlap(bright: np.ndarray, glyphs: np.ndarray) -> float:
    """Best intersection-over-union of ``glyphs`` placed anywhere in ``bright``."""
    best = 0.0
    h, w = glyphs.shape
    for y in range(bright.shape[0] - h + 1):
        for x in range(bright.shape[1] - w + 1):
            window = bright[y : y + h, x : x + w]
            union = (window | glyphs).sum()
            best = max(best, float((window & glyphs).sum() / union) if union else 0.0)
    return best


def test_legend_names_each_roi_beside_its_colour(rendered: Rendered) -> None:
    preview, pixels = rendered.preview, rendered.pixels
    assert preview.legend_box is not None
    x0, y0, x1, y1 = preview.legend_box
    assert y0 >= PANEL_SIZE, "the legend goes under the panels, hiding no anatomy"
    legend = pixels[y0:y1, x0:x1]
    # near-white letter pixels of the legend
    bright = np.all(legend >= 200, axis=2) & (legend.max(axis=2) == legend.min(axis=2))
    names = [roi.name for roi in rendered.masks.roi_infos]
    for roi in rendered.masks.roi_infos:
        swatch = np.all(legend == np.asarray(roi.color, dtype=np.uint8), axis=2)
        assert swatch.sum() >= 25, f"no swatch of {roi.name} {roi.color} in the legend"
        rows, cols = np.flatnonzero(swatch.any(axis=1)), np.flatnonzero(swatch.any(axis=0))
        # the text beside the swatch: the name, better matched than any other ROI's name
        band = bright[
            max(0, rows[0] - FONT_PX // 2) : rows[-1] + FONT_PX // 2 + 1,
            cols[-1] + 1 : cols[-1] + 2 + FONT_PX + _glyphs(roi.name).shape[1],
        ]
        scores = {name: _best_overlap(band, _glyphs(name)) for name in names}
        assert scores[roi.name] >= 0.6, f"{roi.name}: legend text matches its name by {scores[roi.name]:.2f}"
        assert scores[roi.name] == max(scores.values()), f"{roi.name}: another name fits better: {scores}"
    # without ROIs there is no legend: the panels, then the same disclaimer strip, nothing between
    assert rendered.bare.legend_box is None
    bare_notice = rendered.bare_pixels[PANEL_SIZE:]
    assert 0 < len(bare_notice) < rendered.preview.height - PANEL_SIZE - (y1 - y0)
    assert np.array_equal(pixels[-len(bare_notice) :], bare_notice)


def test_disclaimer_is_written_under_the_legend_when_configured(rendered: Rendered, tmp_path: Path) -> None:
    preview = rendered.preview
    assert preview.disclaimer_box is not None and preview.legend_box is not None
    assert preview.disclaimer_box[1] >= preview.legend_box[3]
    notice = rendered.pixels[preview.disclaimer_box[1] : preview.disclaimer_box[3]]
    # the disclaimer's own words, in white, across the strip
    bright = np.all(notice >= 200, axis=2) & (notice.max(axis=2) == notice.min(axis=2))
    assert _best_overlap(bright, _glyphs("RESEARCH")) >= 0.6
    plain = preview_step(rendered.study, rendered.masks, tmp_path / "plain.png", "")
    assert plain.disclaimer_box is None and plain.legend_box == preview.legend_box
    assert plain.height < preview.disclaimer_box[1]
    assert np.array_equal(read_preview(plain.path), rendered.pixels[: plain.height])


def test_panels_are_at_least_256_pixels_at_true_aspect_ratio(rendered: Rendered) -> None:
    preview = rendered.preview
    assert rendered.pixels.shape == (preview.height, preview.width, 3)
    slices, rows, cols = rendered.study.images.geometry.shape
    row_mm, col_mm = SPEC.pixel_spacing
    extent_mm = {"axial": (rows * row_mm, cols * col_mm), "coronal": (slices * SPEC.slice_spacing, cols * col_mm)}
    extent_mm["sagittal"] = (slices * SPEC.slice_spacing, rows * row_mm)
    scales = []
    for panel in preview.panels:
        cx0, cy0, cx1, cy1 = panel.cell
        assert cx1 - cx0 >= 256 and cy1 - cy0 >= 256, f"{panel.plane}: cell {panel.cell}"
        assert cx0 <= panel.x0 and panel.x0 + panel.width <= cx1 and cy0 <= panel.y0 and panel.y0 + panel.height <= cy1
        tall, wide = extent_mm[panel.plane]
        assert abs(panel.width / panel.height - wide / tall) <= 2.0 / min(panel.width, panel.height), panel.plane
        scales.append(wide / panel.width)
    assert max(scales) - min(scales) <= 0.01 * max(scales), "one scale for all panels"
    assert max(max(p.width, p.height) for p in preview.panels) >= 256


def _rle(path: Path) -> None:
    ds = dcmread(path)
    ds.compress(RLELossless, generate_instance_uid=False)
    ds.save_as(path)


def _twelve_bits_stored(path: Path) -> None:
    """BitsStored 12 of 16, high bits left as they are: readers must ignore them as pydicom does."""
    ds = dcmread(path)
    stored = ds.pixel_array.astype(np.int16)
    assert stored.min() >= -2048 and stored.max() <= 2047, "the phantom's values fit 12 bits"
    raw = stored.view(np.uint16).copy()
    raw[(stored >= 0) & (stored < 2048)] |= 0xF000  # garbage in the unused bits of positive values
    ds.PixelData = raw.tobytes()
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.save_as(path)


@pytest.mark.parametrize("variant", ["native", "missing slice", "compressed and 12-bit slices"])
def test_cross_sections_equal_the_decoded_volume(tmp_path: Path, variant: str) -> None:
    spec = PhantomSpec(rows=64, columns=80, pixel_spacing=(2.0, 2.5), slice_spacing=3.0, slices=24)
    manifest = write_phantom(spec, tmp_path / "phantom")
    files = sorted(manifest.image_files, key=lambda p: float(dcmread(p).ImagePositionPatient[2]))
    if variant == "compressed and 12-bit slices":
        for path in files[8:13]:
            _rle(path)
        for path in files[3:6]:
            _twelve_bits_stored(path)
    study = load_study([*files, manifest.rtstruct_file])
    series = study.images
    if variant == "missing slice":  # grid slice 10 lost in transfer (the series as the loader describes it then)
        keep = [i for i in range(len(series.files)) if i != 10]
        series = replace(
            series,
            files=tuple(series.files[i] for i in keep),
            sop_instance_uids=tuple(series.sop_instance_uids[i] for i in keep),
            positions=tuple(series.positions[i] for i in keep) if series.positions else (),
            slice_indices=tuple(keep),
        )
        assert series.missing_slices == (10,)
    volume = read_image_volume(series)
    for k, r, c in [(10, 31, 40), (0, 0, 0), (23, 63, 79), (4, 7, 9)]:
        cuts = read_cross_sections(series, k, r, c)
        assert np.array_equal(cuts.axial, volume[k]), (variant, k)
        assert np.array_equal(cuts.coronal, volume[:, r, :]), (variant, r)
        assert np.array_equal(cuts.sagittal, volume[:, :, c]), (variant, c)
    with pytest.raises(ValueError, match="row index 64"):
        read_cross_sections(series, 0, 64, 0)
