"""Overlay series writers and burn-in: identity, geometry, pixels, overlays in patient space, dciodvfy."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, RLELossless

from netrt import reformat as reformat_module
from netrt.burnin import burn, burn_value, outline, stored_range
from netrt.errors import DicomInputError, NetrtError
from netrt.geometry import ImageGeometry, geometry_from_slices
from netrt.overlay import (
    PixelFormat,
    SeriesOutput,
    SeriesSettings,
    _encode,
    _encoder,
    _reformat_template,
    _set_slice,
    _slice_tags,
    output_instance_uid,
    output_series_uid,
    series_description,
    write_axial_series,
    write_reformatted_series,
    write_reformatted_slabs,
)
from netrt.phantom import PhantomManifest, PhantomSpec, roi_contains, truth_masks, write_phantom
from netrt.reformat import (
    PlaneSlab,
    PlaneVolume,
    _resample_mask,
    plane_geometry,
    prepare_mask,
    prepare_source,
    reformat,
    reformat_slabs,
)
from netrt.study import load_study, read_image_volume, read_source_image
from tests.conftest import require_tool

OVERLAY = 0x6000
SETTINGS = SeriesSettings("NETRT overlay", 901, "NETRT: sphere, box", "settings-key-1")
ROIS = ("sphere", "box")
PLANES = ("axial", "coronal", "sagittal")


@dataclass
class Study:
    manifest: PhantomManifest
    geometry: ImageGeometry
    volume: np.ndarray  # HU, float32
    mask: np.ndarray
    planes: dict[str, PlaneVolume]
    series: dict[tuple[str, bool], list[Path]]  # (plane, burn_in) -> files in slice order


def _load(manifest: PhantomManifest) -> tuple[ImageGeometry, np.ndarray]:
    datasets = [dcmread(p) for p in manifest.image_files]  # spatial order
    first = datasets[0]
    geometry = geometry_from_slices(
        [ds.ImagePositionPatient for ds in datasets],
        first.ImageOrientationPatient,
        first.PixelSpacing,
        first.Rows,
        first.Columns,
    )
    volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]).astype(
        np.float32
    )
    return geometry, volume


def _make_study(root: Path, spec: PhantomSpec) -> Study:
    manifest = write_phantom(spec, root / "phantom")
    geometry, volume = _load(manifest)
    truth = truth_masks(spec)
    mask = truth["sphere"] | truth["box"]
    planes = {plane: reformat(volume, mask, geometry, plane) for plane in PLANES}
    series: dict[tuple[str, bool], list[Path]] = {}
    for burn_in in (False, True):
        out = root / ("burn" if burn_in else "plain")
        series["axial", burn_in] = write_axial_series(manifest.image_files, mask, out / "axial", SETTINGS, burn_in)
        for plane in ("coronal", "sagittal"):
            series[plane, burn_in] = write_reformatted_series(
                planes[plane], manifest.image_files[0], out / plane, SETTINGS, burn_in
            )
    return Study(manifest, geometry, volume, mask, planes, series)


# Non-square (48 rows x 64 columns), anisotropic pixels (3.2 mm rows, 2.9 mm columns), 2.5 mm
# slices: small enough to write every series in about a second, coarse enough that a transposed,
# flipped or shifted overlay cannot pass.
AXIAL_SPEC = PhantomSpec(rows=48, columns=64, pixel_spacing=(3.2, 2.9), slice_spacing=2.5, slices=36)
OBLIQUE_SPEC = PhantomSpec(
    rows=48, columns=64, pixel_spacing=(3.2, 2.9), slice_spacing=2.5, slices=36, orientation="oblique",
    reverse_order=True, patient_id="NETRT-PHANTOM-OBL",
)  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return _make_study(tmp_path_factory.mktemp("axial-study"), AXIAL_SPEC)


@pytest.fixture(scope="module")
def oblique_study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    return _make_study(tmp_path_factory.mktemp("oblique-study"), OBLIQUE_SPEC)


def _pixel_centres(ds: Dataset) -> np.ndarray:
    """Patient coordinates of every pixel centre, from the file's own IPP / IOP / PixelSpacing."""
    ipp = np.array(ds.ImagePositionPatient, float)
    iop = np.array(ds.ImageOrientationPatient, float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    r, c = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
    return ipp + c[..., None] * col_spacing * iop[:3] + r[..., None] * row_spacing * iop[3:]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _read_series(files: list[Path]) -> list[Dataset]:
    datasets = [dcmread(p) for p in files]
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, len(files) + 1))
    return datasets


# ---------------------------------------------------------------------------------------------
# Axial


def test_axial_series_keeps_source_pixels_and_identity(study: Study) -> None:
    files = study.series["axial", False]
    assert len(files) == len(study.manifest.image_files)
    series_uid = output_series_uid(study.manifest.image_series_uid, "axial", SETTINGS.settings_key, False)
    for k, (path, source_path) in enumerate(zip(files, study.manifest.image_files, strict=True)):
        out, src = dcmread(path), dcmread(source_path)
        assert out.PixelData == src.PixelData  # byte for byte
        assert out.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
        for keyword in (
            "SOPClassUID", "StudyInstanceUID", "FrameOfReferenceUID", "PatientName", "PatientID", "StudyDate",
            "AccessionNumber", "Manufacturer", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
            "SliceThickness", "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
        ):  # fmt: skip
            assert out[keyword].value == src[keyword].value, keyword
        assert out.SeriesInstanceUID == series_uid != src.SeriesInstanceUID
        assert out.SOPInstanceUID == output_instance_uid(series_uid, k) == out.file_meta.MediaStorageSOPInstanceUID
        assert path.name == f"{out.SOPInstanceUID}.dcm"
        assert out.InstanceNumber == k + 1
        assert list(out.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert out.SeriesDescription == "NETRT overlay" and out.SeriesNumber == 901
        assert "NETRT" in out.DerivationDescription
        (item,) = out.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert item.ReferencedSOPClassUID == src.SOPClassUID
        np.testing.assert_array_equal(out.overlay_array(OVERLAY), study.mask[k])
    assert not list(files[0].parent.glob(".*tmp"))


def test_overlay_module_attributes(study: Study) -> None:
    for plane in PLANES:
        ds = dcmread(study.series[plane, False][0])
        assert ds[0x60000010].value == ds.Rows and ds[0x60000011].value == ds.Columns
        assert ds[0x60000040].value == "G"
        assert list(ds[0x60000050].value) == [1, 1]
        assert ds[0x60000100].value == 1 and ds[0x60000102].value == 0
        assert ds[0x60001500].value == "NETRT: sphere, box" == ds[0x60000022].value
        assert ds[0x60003000].VR == "OW"


def test_non_square_overlay_is_not_transposed(tmp_path: Path, study: Study) -> None:
    files = study.manifest.image_files[:2]
    mask = np.zeros((2, 48, 64), bool)
    mask[0, 5, 40] = True  # row 5, column 40: only exists one way round on a 48 x 64 image
    mask[1, 47, 0:64:2] = True
    out = write_axial_series(files, mask, tmp_path, SETTINGS)
    first, second = (dcmread(p).overlay_array(OVERLAY) for p in out)
    assert first.shape == (48, 64)
    assert np.argwhere(first).tolist() == [[5, 40]]
    np.testing.assert_array_equal(second, mask[1])


# ---------------------------------------------------------------------------------------------
# Reformatted planes


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_reformatted_series_geometry_pixels_and_overlay(study: Study, plane: str) -> None:
    volume = study.planes[plane]
    geometry = volume.geometry
    source = dcmread(study.manifest.image_files[0])
    datasets = _read_series(study.series[plane, False])
    assert len(datasets) == geometry.shape[0]
    series_uid = output_series_uid(study.manifest.image_series_uid, plane, SETTINGS.settings_key, False)
    for k, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == source.SOPClassUID
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID == series_uid
        assert ds.SOPInstanceUID == output_instance_uid(series_uid, k)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "REFORMATTED"]
        assert (ds.Rows, ds.Columns) == geometry.shape[1:]
        np.testing.assert_allclose(
            ds.ImagePositionPatient, geometry.origin + k * geometry.spacing[2] * geometry.normal, atol=1e-6
        )
        np.testing.assert_allclose(
            ds.ImageOrientationPatient, [*geometry.row_direction, *geometry.column_direction], atol=1e-9
        )
        np.testing.assert_allclose(ds.PixelSpacing, [geometry.spacing[1], geometry.spacing[0]])
        assert float(ds.SliceThickness) == pytest.approx(geometry.spacing[2])
        assert "SliceLocation" not in ds
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth"):
            assert ds[keyword].value == source[keyword].value
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 1)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(hu, volume.image[k], atol=0.5 + 1e-3)  # rounding to stored integers only
        np.testing.assert_array_equal(ds.overlay_array(OVERLAY), volume.mask[k])


@pytest.mark.parametrize("which", ["axial-study", "oblique-reversed-study"])
@pytest.mark.parametrize("plane", PLANES)
def test_overlays_sit_on_the_analytic_rois_in_patient_space(
    request: pytest.FixtureRequest, which: str, plane: str
) -> None:
    """Only the written files are used: overlay pixel -> IPP/IOP/PixelSpacing -> patient point ->
    the analytic solids. A flipped, transposed or one-voxel-shifted overlay fails this."""
    current: Study = request.getfixturevalue("study" if which == "axial-study" else "oblique_study")
    spec = current.manifest.spec
    overlay, truth, shifted = [], [], []
    for ds in _read_series(current.series[plane, False]):
        points = _pixel_centres(ds)
        inside = np.zeros(points.shape[:2], bool)
        for name in ROIS:
            inside |= roi_contains(spec, name, points)
        drawn = ds.overlay_array(OVERLAY).astype(bool)
        overlay.append(drawn)
        truth.append(inside)
        shifted.append(np.roll(drawn, 1, axis=0))
    overlay_all, truth_all = np.array(overlay), np.array(truth)
    dice = _dice(overlay_all, truth_all)
    # Axial overlays are the pixel-centre truth itself (measured 1.0); reformats interpolate
    # between 2.5 mm slices (measured 0.967 here, 0.88 with the overlay shifted by one row).
    threshold = 0.99 if plane == "axial" else 0.95
    assert dice >= threshold
    assert _dice(np.array(shifted), truth_all) < threshold  # the check sees a one-row shift


# ---------------------------------------------------------------------------------------------
# UIDs


def test_uids_are_deterministic_and_separate_burn_in_and_settings(tmp_path: Path, study: Study) -> None:
    files = study.manifest.image_files
    again = write_axial_series(files, study.mask, tmp_path / "again", SETTINGS)
    assert [p.name for p in again] == [p.name for p in study.series["axial", False]]
    assert again[3].read_bytes() == study.series["axial", False][3].read_bytes()
    coronal_again = write_reformatted_series(study.planes["coronal"], files[0], tmp_path / "coronal", SETTINGS)
    assert [p.name for p in coronal_again] == [p.name for p in study.series["coronal", False]]
    assert coronal_again[5].read_bytes() == study.series["coronal", False][5].read_bytes()

    other_key = SeriesSettings(SETTINGS.description, SETTINGS.series_number, SETTINGS.roi_label, "settings-key-2")
    changed = write_axial_series(files[:1], study.mask[:1], tmp_path / "other", other_key)
    assert changed[0].name != study.series["axial", False][0].name

    series_uids = {
        (plane, burn_in): dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
        for (plane, burn_in), paths in study.series.items()
    }
    assert len(set(series_uids.values())) == 6  # 3 planes x plain/burn-in, all distinct
    all_names = [p.name for paths in study.series.values() for p in paths]
    assert len(all_names) == len(set(all_names))


# ---------------------------------------------------------------------------------------------
# Validation with dciodvfy


def _dciodvfy_errors(path: Path) -> list[str]:
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


@pytest.mark.parametrize("burn_in", [False, True], ids=["plain", "burn-in"])
@pytest.mark.parametrize("plane", PLANES)
def test_dciodvfy_accepts_every_plane(study: Study, oblique_study: Study, plane: str, burn_in: bool) -> None:
    for current in (study, oblique_study):
        files = current.series[plane, burn_in]
        for path in (files[0], files[len(files) // 2]):
            assert _dciodvfy_errors(path) == [], path


# ---------------------------------------------------------------------------------------------
# Burn-in


@pytest.mark.parametrize("plane", PLANES)
def test_burn_in_changes_only_the_outline_and_keeps_the_overlay(study: Study, plane: str) -> None:
    plain = _read_series(study.series[plane, False])
    burned = _read_series(study.series[plane, True])
    changed_total = 0
    for a, b in zip(plain, burned, strict=True):
        assert b.SeriesDescription == "NETRT overlay burn-in"
        assert b.SeriesInstanceUID != a.SeriesInstanceUID
        overlay = b.overlay_array(OVERLAY).astype(bool)
        np.testing.assert_array_equal(overlay, a.overlay_array(OVERLAY))
        edge = outline(overlay)
        before, after = a.pixel_array, b.pixel_array
        assert not np.any((before != after) & ~edge)  # nothing but outline pixels changes
        if edge.any():
            values = np.unique(after[edge])
            assert values.size == 1
            # window 40/400 HU -> top 240 HU -> stored 1264, unless the slice is brighter already
            expected = 240 + 1024 if before.max() <= 240 + 1024 else 32767
            assert values[0] == expected
            changed_total += int(np.count_nonzero(before != after))
    assert changed_total > 0


def test_burn_in_description_suffix() -> None:
    def described(text: str, burn_in: bool) -> str:
        return series_description(SeriesSettings(text, 1, "x", "k"), burn_in)

    assert described("CT overlay", True) == "CT overlay burn-in"
    assert described("CT overlay burn-in", True) == "CT overlay burn-in"  # caller already added it
    assert described("CT overlay", False) == "CT overlay"
    long = described("x" * 80, True)
    assert len(long) == 64 and long.endswith(" burn-in")
    assert described("a\\b\ncontrol", False) == "a/b control"


def test_outline_is_the_in_plane_border() -> None:
    mask = np.zeros((2, 6, 7), bool)
    mask[0, 1:5, 2:6] = True  # a 4 x 4 square
    mask[1, :, :3] = True  # touches the image edge on three sides
    edge = outline(mask)
    square = np.zeros((6, 7), bool)
    square[1:5, 2:6] = True
    square[2:4, 3:5] = False
    np.testing.assert_array_equal(edge[0], square)
    expected = mask[1].copy()
    expected[1:5, 1] = False  # the band's interior; image-edge pixels count as border
    np.testing.assert_array_equal(edge[1], expected)
    assert not outline(np.zeros((3, 3), bool)).any()


def test_burn_value_rules() -> None:
    assert stored_range(16, 1) == (-32768, 32767)
    assert stored_range(12, 0) == (0, 4095)
    # CT: window 40/400 -> 240 HU -> stored 1264 with intercept -1024
    assert burn_value(16, 1, 1000, slope=1, intercept=-1024, window_center=40, window_width=400) == 1264
    # anatomy brighter than the window top -> the largest stored value
    assert burn_value(16, 1, 3000, slope=1, intercept=-1024, window_center=40, window_width=400) == 32767
    # window top beyond the stored range (12-bit unsigned) -> the range maximum
    assert burn_value(12, 0, 100, slope=1, intercept=-1024, window_center=4000, window_width=1000) == 4095
    assert burn_value(12, 0, 100) == 4095  # no window at all
    pixels = np.arange(12, dtype=np.int16).reshape(3, 4)
    where = np.zeros((3, 4), bool)
    where[1, 2] = True
    result = burn(pixels, where, 999)
    assert result[1, 2] == 999 and np.count_nonzero(result != pixels) == 1
    assert pixels[1, 2] == 6  # input untouched
    with pytest.raises(ValueError, match="does not fit"):
        burn(pixels.astype(np.uint8), where, 999)


def test_stored_conversion_inverts_the_rescale_and_clips() -> None:
    ds = Dataset()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, 12, 0
    ds.RescaleSlope, ds.RescaleIntercept = "2", "-1000"
    fmt = PixelFormat.of(ds, Path("x.dcm"))
    values = np.array([-1000.0, -999.2, 0.0, 7190.0, 9000.0, -5000.0], np.float32)
    np.testing.assert_array_equal(fmt.to_stored(values), [0, 0, 500, 4095, 4095, 0])
    assert fmt.to_stored(values).dtype == np.dtype("<u2")


# ---------------------------------------------------------------------------------------------
# Other sources and bad input


def test_compressed_source_stays_compressed_unless_burned(tmp_path: Path, study: Study) -> None:
    sources = []
    for k, path in enumerate(study.manifest.image_files[10:14]):
        ds = dcmread(path)
        ds.compress(RLELossless, generate_instance_uid=False)
        target = tmp_path / f"rle{k}.dcm"
        ds.save_as(target, enforce_file_format=True)
        sources.append(target)
    mask = study.mask[10:14]
    plain = write_axial_series(sources, mask, tmp_path / "plain", SETTINGS)
    burned = write_axial_series(sources, mask, tmp_path / "burn", SETTINGS, burn_in=True)
    for source, a, b, m in zip(sources, plain, burned, mask, strict=True):
        src, out_a, out_b = dcmread(source), dcmread(a), dcmread(b)
        assert out_a.file_meta.TransferSyntaxUID == RLELossless
        assert out_a.PixelData == src.PixelData
        assert out_b.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        changed = out_b.pixel_array != src.pixel_array
        assert not np.any(changed & ~outline(m))
        np.testing.assert_array_equal(out_b.overlay_array(OVERLAY), m)
    assert _dciodvfy_errors(plain[1]) == []


def test_mr_source_stays_mr(tmp_path: Path, study: Study) -> None:
    ds = dcmread(study.manifest.image_files[0])
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.Modality = "MR"
    for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType", "KVP"):
        delattr(ds, keyword)
    template = tmp_path / "mr.dcm"
    ds.save_as(template, enforce_file_format=True)
    plane = study.planes["sagittal"]
    shifted = PlaneVolume(plane.plane, plane.geometry, plane.image + 1024, plane.mask)  # MR: no rescale
    files = write_reformatted_series(shifted, template, tmp_path / "out", SETTINGS)
    out = dcmread(files[len(files) // 2])
    assert out.SOPClassUID == MRImageStorage == out.file_meta.MediaStorageSOPClassUID
    assert out.Modality == "MR"
    np.testing.assert_allclose(out.pixel_array, shifted.image[len(files) // 2], atol=0.5 + 1e-3)


def test_bad_input_is_named(tmp_path: Path, study: Study) -> None:
    files = study.manifest.image_files[:3]
    with pytest.raises(DicomInputError, match=r"48 rows x 64 columns.*\(0028,0010\)|\(0028,0010\).*48 rows"):
        write_axial_series(files, np.zeros((3, 64, 48), bool), tmp_path / "a", SETTINGS)
    with pytest.raises(ValueError, match="does not match 3 source files"):
        write_axial_series(files, np.zeros((2, 48, 64), bool), tmp_path / "b", SETTINGS)
    stranger = dcmread(files[1])
    stranger.SeriesInstanceUID = "1.2.3.4"
    stranger_path = tmp_path / "stranger.dcm"
    stranger.save_as(stranger_path, enforce_file_format=True)
    with pytest.raises(DicomInputError, match=r"stranger\.dcm.*belongs to series 1\.2\.3\.4"):
        write_axial_series([files[0], stranger_path], np.zeros((2, 48, 64), bool), tmp_path / "c", SETTINGS)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom at all")
    with pytest.raises(DicomInputError, match=r"broken\.dcm"):
        write_axial_series([broken], np.zeros((1, 48, 64), bool), tmp_path / "d", SETTINGS)
    with pytest.raises(NetrtError, match="write_axial_series"):
        write_reformatted_series(study.planes["axial"], files[0], tmp_path / "e", SETTINGS)


@pytest.mark.parametrize("plane", ["axial", "coronal"])
def test_roi_names_the_images_charset_cannot_spell_switch_the_copy_to_utf8(
    tmp_path: Path, study: Study, plane: str
) -> None:
    """A Greek/Japanese ROI name on a Latin-1 series: the copy is re-declared ISO_IR 192 and every
    text in it keeps its value (the Latin-1 patient name too), instead of '?' in the label."""
    source = tmp_path / "latin1"
    source.mkdir()
    files = []
    for path in study.manifest.image_files[:3]:
        ds = dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jörg"
        ds.save_as(source / path.name)
        files.append(source / path.name)
    assert b"M\xfcller^J\xf6rg" in files[0].read_bytes()  # written in Latin-1
    label = "NETRT: 腫瘍_Ωmega, Tumör"
    settings = SeriesSettings(SETTINGS.description, SETTINGS.series_number, label, SETTINGS.settings_key)
    mask = study.mask[:3]
    if plane == "axial":
        written = write_axial_series(files, mask, tmp_path / "out", settings)
    else:
        written = write_reformatted_series(study.planes[plane], files[0], tmp_path / "out", settings)
    for path in written[:2]:
        ds = dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert ds[0x6000, 0x1500].value == label
        assert str(ds.PatientName) == "Müller^Jörg"
        assert "Müller".encode() in path.read_bytes()
    # A name Latin-1 can spell leaves the character set as it was.
    plain = write_axial_series(files[:1], mask[:1], tmp_path / "plain", SETTINGS)
    assert dcmread(plain[0]).SpecificCharacterSet == "ISO_IR 100"


# ---------------------------------------------------------------------------------------------
# Streaming: the pipeline's slab-by-slab path writes the files of the whole-volume path


@pytest.mark.parametrize("which", ["axial-study", "oblique-reversed-study"])
@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_streamed_series_are_byte_identical_to_the_whole_volume_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, study: Study, oblique_study: Study, which: str, plane: str
) -> None:
    """What ``write_plane`` does (source read into SimpleITK as int16, mask reduced to its distance
    map, slabs resampled and written one at a time, plain and burn-in in one pass) against
    ``reformat`` of the float32 volume + ``write_reformatted_series``: the same bytes, file for file.
    Slabs are made a few slices thin so that the image slabs, the mask's own slabs and the series
    all cut at different slices."""
    current = study if which == "axial-study" else oblique_study
    monkeypatch.setattr(reformat_module, "_SLAB_VOXELS", 6000)
    images = load_study([*current.manifest.image_files, current.manifest.rtstruct_file]).images
    geometry = images.geometry
    target = plane_geometry(geometry, plane)
    assert len(reformat_module.slab_bounds(target)) > 3
    source_image = read_source_image(images)
    assert source_image.GetPixelID() == sitk.sitkInt16  # integer HU: the compact type
    prepared = prepare_source(source_image, prepare_mask(current.mask, geometry), geometry)
    outputs = [SeriesOutput(tmp_path / "plain", SETTINGS), SeriesOutput(tmp_path / "burn", SETTINGS, burn_in=True)]
    streamed = write_reformatted_slabs(plane, target, reformat_slabs(prepared, target), images.files[0], outputs)

    image = reformat(read_image_volume(images), current.mask, geometry, plane).image
    # The mask in one piece (not cut where the image slabs are): its slab assembly is checked too.
    whole = PlaneVolume(plane, target, image, _resample_mask(current.mask, geometry, target))
    for output, files in zip(outputs, streamed, strict=True):
        reference = write_reformatted_series(
            whole, images.files[0], tmp_path / f"ref-{output.out_dir.name}", SETTINGS, output.burn_in
        )
        assert len(files) == len(reference) == target.shape[0]
        for a, b in zip(files, reference, strict=True):
            assert a.name == b.name
            assert a.read_bytes() == b.read_bytes(), a.name


def test_streamed_writer_refuses_slabs_that_do_not_tile_the_grid(tmp_path: Path, study: Study) -> None:
    plane = study.planes["coronal"]
    n = plane.geometry.shape[0]
    output = [SeriesOutput(tmp_path / "out", SETTINGS)]
    template = study.manifest.image_files[0]

    def slab(first: int, stop: int) -> PlaneSlab:
        return PlaneSlab(first, plane.image[first:stop], plane.mask[first:stop])

    with pytest.raises(ValueError, match="does not continue slice 2"):
        write_reformatted_slabs("coronal", plane.geometry, [slab(0, 2), slab(3, n)], template, output)
    with pytest.raises(ValueError, match=f"cover {n - 1} of the {n} slices"):
        write_reformatted_slabs("coronal", plane.geometry, [slab(0, n - 1)], template, output)
    with pytest.raises(NetrtError, match="coronal/sagittal"):
        write_reformatted_slabs("axial", plane.geometry, [slab(0, n)], template, output)


@pytest.mark.parametrize("source_kind", ["as-written", "implicit-latin1-utf8-label", "per-roi-groups"])
def test_pre_encoded_slices_are_what_dcmwrite_writes(tmp_path: Path, study: Study, source_kind: str) -> None:
    """The constant element runs are encoded once; every slice file must still be, byte for byte,
    what ``dcmwrite(enforce_file_format=True)`` writes for the data set of that slice -- also for an
    Implicit VR Latin-1 source whose copy switches to UTF-8 for the label."""
    template = study.manifest.image_files[0]
    settings = SETTINGS
    if source_kind == "per-roi-groups":
        settings = replace(SETTINGS, layer_labels=("sphere", "box", "Ωmega"))
    if source_kind == "implicit-latin1-utf8-label":
        ds = dcmread(template)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jörg"
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        template = tmp_path / "implicit.dcm"
        ds.save_as(template, implicit_vr=True, little_endian=True, enforce_file_format=True)
        settings = SeriesSettings(SETTINGS.description, SETTINGS.series_number, "NETRT: Ωmega", SETTINGS.settings_key)
    plane = study.planes["sagittal"]
    geometry = plane.geometry
    step = geometry.spacing[2] * geometry.normal
    for burn_in in (False, True):
        ds, fmt, series_uid = _reformat_template(template, "sagittal", geometry, settings, burn_in)
        blank = np.zeros(geometry.shape[1:], bool)
        groups = len(settings.groups)
        _set_slice(ds, series_uid, 0, geometry.origin, blank.astype(fmt.dtype), [blank] * groups)
        encoder = _encoder(ds, _slice_tags(settings))
        for index in (0, 1, geometry.shape[0] // 2, geometry.shape[0] - 1):
            stored = fmt.to_stored(plane.image[index])
            # Per-ROI groups get different masks (the mask, its complement, ...), so a mix-up shows.
            masks = [plane.mask[index] if g % 2 == 0 else ~plane.mask[index] for g in range(groups)]
            _set_slice(ds, series_uid, index, geometry.origin + index * step, stored, masks)
            expected = BytesIO()
            dcmwrite(expected, ds, enforce_file_format=True)
            assert b"".join(_encode(encoder)) == expected.getvalue(), (burn_in, index)
        if source_kind != "as-written":
            assert ds.SpecificCharacterSet == "ISO_IR 192"
        if source_kind == "per-roi-groups":
            written = dcmread(BytesIO(expected.getvalue()))
            assert [written[g, 0x1500].value for g in (0x6000, 0x6002, 0x6004)] == ["sphere", "box", "Ωmega"]
            assert np.array_equal(written.overlay_array(0x6002), ~plane.mask[geometry.shape[0] - 1])
