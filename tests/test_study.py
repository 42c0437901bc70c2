"""Study finding, loading and validation (netrt.study) on phantoms and on a real MIM export.

Broken studies are made by editing *copies* of a phantom in tmp_path; every failure test also
proves that the loader left the input byte-identical (nothing deleted, moved or rewritten).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, generate_uid

from netrt.errors import DicomInputError, StudyValidationError
from netrt.phantom import PhantomManifest, PhantomSpec, write_phantom
from netrt.study import (
    LoadedStudy,
    find_studies,
    load_study,
    read_image_volume,
    scan_files,
)
from tests.conftest import require_shared, require_tool

SMALL = {"rows": 64, "columns": 48, "pixel_spacing": (4.0, 4.0), "slice_spacing": 4.0, "slices": 12}


def make_phantom(root: Path, name: str = "phantom", **overrides: object) -> PhantomManifest:
    """A small phantom (64x48 pixels, 4 mm, 12 slices) unless overridden."""
    return write_phantom(PhantomSpec(**{**SMALL, **overrides}), root / name)  # type: ignore[arg-type]


def dicom_files(manifest: PhantomManifest) -> list[Path]:
    return sorted((manifest.out_dir / "dicom").iterdir())


def edit(path: Path, change: Callable[[Dataset], None]) -> None:
    """Test setup only: rewrite one DICOM file of a tmp copy with ``change`` applied."""
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def load_expecting(error: type[Exception], folder: Path) -> DicomInputError:
    """load_study on every file of ``folder`` must raise exactly ``error`` and leave the folder as it was."""
    before = snapshot(folder)
    with pytest.raises(error) as caught:
        load_study(sorted(p for p in folder.rglob("*") if p.is_file()))
    assert type(caught.value) is error, f"expected {error.__name__}, got {type(caught.value).__name__}: {caught.value}"
    assert snapshot(folder) == before, "the loader changed, added or removed input files"
    assert isinstance(caught.value, DicomInputError)
    return caught.value


@pytest.fixture
def phantom(tmp_path: Path) -> PhantomManifest:
    return make_phantom(tmp_path)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# ------------------------------------------------------------------------------------------
# Finding studies
# ------------------------------------------------------------------------------------------


def test_find_studies_among_mixed_files(tmp_path: Path) -> None:
    first = make_phantom(tmp_path, "a")
    second = make_phantom(tmp_path, "b", seed=7, patient_id="OTHER-002")
    assert first.study_instance_uid != second.study_instance_uid
    mixed = tmp_path / "incoming"
    (mixed / "sub" / "deeper").mkdir(parents=True)
    for path in dicom_files(first):
        shutil.copy(path, mixed / path.name)
    for path in dicom_files(second):
        shutil.copy(path, mixed / "sub" / "deeper" / path.name)
    (mixed / "notes.txt").write_text("not DICOM\n")
    (mixed / "sub" / "empty.dcm").write_bytes(b"")
    before = snapshot(mixed)

    studies = find_studies(mixed)

    assert [s.study_instance_uid for s in studies] == sorted([first.study_instance_uid, second.study_instance_uid])
    by_uid = {s.study_instance_uid: s for s in studies}
    assert {p.name for p in by_uid[first.study_instance_uid].files} == {p.name for p in dicom_files(first)}
    assert all(p.parent == mixed for p in by_uid[first.study_instance_uid].files)
    assert {p.name for p in by_uid[second.study_instance_uid].files} == {p.name for p in dicom_files(second)}
    skipped = dict(studies[0].skipped)
    assert set(skipped) == {mixed / "notes.txt", mixed / "sub" / "empty.dcm"}
    assert "not a DICOM file" in skipped[mixed / "notes.txt"]
    assert scan_files(mixed) == {s.study_instance_uid: list(s.files) for s in studies}
    assert snapshot(mixed) == before

    loaded = load_study(by_uid[first.study_instance_uid].files)
    assert loaded.study_instance_uid == first.study_instance_uid
    assert loaded.images.sop_instance_uids == tuple(first.image_sop_instance_uids)
    assert loaded.rtstruct_sop_instance_uid == first.rtstruct_sop_instance_uid
    assert loaded.other_files == ()
    assert loaded.warnings == ()


def test_find_studies_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DicomInputError, match="no such file or folder"):
        find_studies(tmp_path / "absent")


def test_other_series_and_objects_are_kept_but_not_processed(phantom: PhantomManifest, tmp_path: Path) -> None:
    """An RT Dose of the same study (same frame of reference) is kept with it, never mistaken for images."""
    dose = pydicom.dcmread(get_testdata_file("rtdose_1frame.dcm"))
    dose.StudyInstanceUID = phantom.study_instance_uid
    dose.FrameOfReferenceUID = phantom.frame_of_reference_uid
    dose_path = phantom.out_dir / "dicom" / "RD.dcm"
    dose.save_as(dose_path)

    loaded = load_study(dicom_files(phantom))
    assert loaded.other_files == (dose_path,)
    assert loaded.images.files == tuple(phantom.image_files)


# ------------------------------------------------------------------------------------------
# Geometry and order
# ------------------------------------------------------------------------------------------


def assert_geometry_matches(loaded: LoadedStudy, manifest: PhantomManifest) -> None:
    geometry, truth = loaded.images.geometry, manifest.geometry
    np.testing.assert_allclose(geometry.origin, truth.origin, atol=1e-4)
    np.testing.assert_allclose(geometry.row_direction, truth.row_direction, atol=1e-6)
    np.testing.assert_allclose(geometry.column_direction, truth.column_direction, atol=1e-6)
    np.testing.assert_allclose(geometry.normal, truth.slice_normal, atol=1e-6)
    np.testing.assert_allclose(geometry.spacing, truth.spacing, rtol=1e-9, atol=1e-6)
    assert geometry.size == truth.size


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"reverse_order": True},
        {"orientation": "oblique"},
        {"orientation": "oblique", "reverse_order": True, "rows": 40, "columns": 56, "pixel_spacing": (3.0, 4.5)},
    ],
    ids=["axial", "reversed", "oblique", "oblique-reversed-nonsquare"],
)
def test_slices_sorted_along_the_normal(tmp_path: Path, overrides: dict[str, object]) -> None:
    manifest = make_phantom(tmp_path, **overrides)
    loaded = load_study(dicom_files(manifest))

    assert loaded.images.files == tuple(manifest.image_files)
    assert loaded.images.sop_instance_uids == tuple(manifest.image_sop_instance_uids)
    assert loaded.rtstruct_file == manifest.rtstruct_file
    assert loaded.images.series_instance_uid == manifest.image_series_uid
    assert loaded.images.frame_of_reference_uid == manifest.frame_of_reference_uid
    assert loaded.images.modality == "CT"
    normal = np.asarray(manifest.geometry.slice_normal)
    along = [float(np.dot(pydicom.dcmread(p).ImagePositionPatient, normal)) for p in loaded.images.files]
    assert np.all(np.diff(along) > 0), "positions must increase along the slice normal"
    np.testing.assert_allclose(loaded.images.positions, along, atol=1e-6)
    numbers = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in loaded.images.files]
    if overrides.get("reverse_order"):
        assert numbers == sorted(numbers, reverse=True), "reversed phantom: InstanceNumber falls along the normal"
    else:
        assert numbers == sorted(numbers)
    assert_geometry_matches(loaded, manifest)


# ------------------------------------------------------------------------------------------
# Pixel values
# ------------------------------------------------------------------------------------------


def truth(manifest: PhantomManifest, name: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(manifest.truth_files[name]))).astype(bool)


def test_read_image_volume_in_hu(tmp_path: Path) -> None:
    manifest = make_phantom(tmp_path, reverse_order=True)
    loaded = load_study(dicom_files(manifest))
    volume = read_image_volume(loaded.images)

    assert volume.dtype == np.float32
    assert volume.shape == loaded.images.geometry.shape == (12, 64, 48)
    air = volume[~truth(manifest, "Patient_Outline")]
    assert abs(float(air.mean()) + 1000) < 3, "air must read about -1000 HU (RescaleIntercept applied)"
    for roi in manifest.rois:
        if roi.name in {"sphere", "box", "torus"}:
            inside = volume[truth(manifest, roi.name)]
            assert abs(float(inside.mean()) - roi.hu) < 3, roi.name
            assert np.all(np.abs(inside - roi.hu) < 45), roi.name
    # Independent decode of one slice: stored value + intercept, in spatial order.
    ds = pydicom.dcmread(manifest.image_files[5])
    np.testing.assert_array_equal(volume[5], ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept))


def test_rescale_is_applied_per_slice(phantom: PhantomManifest) -> None:
    reference = read_image_volume(load_study(dicom_files(phantom)).images)

    def recode(ds: Dataset) -> None:
        ds.PixelData = (ds.pixel_array.astype(np.int32) + 1024).astype("<i2").tobytes()
        ds.RescaleIntercept = "-2048"

    edit(phantom.image_files[4], recode)
    volume = read_image_volume(load_study(dicom_files(phantom)).images)
    np.testing.assert_array_equal(volume, reference)


def compress_with_pydicom(syntax: str) -> Callable[[Path], None]:
    def run(path: Path) -> None:
        edit(path, lambda ds: ds.compress(syntax, generate_instance_uid=False))

    return run


def compress_with_dcmtk(tool: str, *options: str) -> Callable[[Path], None]:
    def run(path: Path) -> None:
        out = path.with_suffix(".tmp")
        subprocess.run([require_tool(tool), *options, str(path), str(out)], check=True, capture_output=True)
        out.replace(path)

    return run


@pytest.mark.parametrize(
    ("syntax", "compress"),
    [
        (JPEG2000Lossless, compress_with_pydicom(JPEG2000Lossless)),
        (RLELossless, compress_with_pydicom(RLELossless)),
        (JPEGLSLossless, compress_with_dcmtk("dcmcjpls", "+el")),
        (JPEGLosslessSV1, compress_with_dcmtk("dcmcjpeg", "+e1")),
    ],
    ids=["jpeg2000-lossless", "rle", "jpeg-ls-lossless", "jpeg-lossless-sv1"],
)
def test_compressed_slices_decode_to_the_same_hu(
    phantom: PhantomManifest, syntax: str, compress: Callable[[Path], None]
) -> None:
    reference = read_image_volume(load_study(dicom_files(phantom)).images)
    # first and last (decoded during validation) and one in the middle (decoded by read_image_volume)
    for index in (0, 6, len(phantom.image_files) - 1):
        compress(phantom.image_files[index])
        assert pydicom.dcmread(phantom.image_files[index]).file_meta.TransferSyntaxUID == syntax

    volume = read_image_volume(load_study(dicom_files(phantom)).images)
    np.testing.assert_array_equal(volume, reference)


def test_undecodable_middle_slice_named_by_read_image_volume(phantom: PhantomManifest) -> None:
    """Validation decodes only the first and last slices; a bad middle slice fails at decode time, named."""
    bad = phantom.image_files[6]
    edit(bad, lambda ds: ds.compress(RLELossless, generate_instance_uid=False))

    def corrupt(ds: Dataset) -> None:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        ds.PixelData = encapsulate([frame[: len(frame) // 2]])  # a well-formed item holding half a frame

    edit(bad, corrupt)
    loaded = load_study(dicom_files(phantom))
    with pytest.raises(DicomInputError) as caught:
        read_image_volume(loaded.images)
    assert caught.value.path == bad
    assert "(7FE0,0010)" in str(caught.value)


# ------------------------------------------------------------------------------------------
# Broken studies: each names the cause and leaves the input untouched
# ------------------------------------------------------------------------------------------


def test_rtstruct_referencing_absent_images(phantom: PhantomManifest) -> None:
    removed = [phantom.image_files[-1], phantom.image_files[-2]]
    removed_uids = [sop_uid(p) for p in removed]
    for path in removed:
        path.unlink()

    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert error.path == phantom.rtstruct_file
    assert error.tag is not None and "ContourImageSequence" in error.tag
    message = str(error)
    assert "references 2 image(s) absent" in message
    assert all(uid in message for uid in removed_uids)


def test_absent_images_listed_up_to_five(phantom: PhantomManifest) -> None:
    for path in phantom.image_files[5:]:
        path.unlink()
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert "references 7 image(s) absent" in str(error)
    assert "and 2 more" in str(error)


def test_no_rtstruct(phantom: PhantomManifest) -> None:
    phantom.rtstruct_file.unlink()
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert f"no RTSTRUCT in study {phantom.study_instance_uid}: 12 files" in str(error)
    assert phantom.image_series_uid in str(error)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("which", ["middle-slice", "first-slice", "rtstruct", "compressed-slice"])
def test_truncated_file(phantom: PhantomManifest, which: str) -> None:
    target = {
        "middle-slice": phantom.image_files[6],
        "first-slice": phantom.image_files[0],
        "rtstruct": phantom.rtstruct_file,
        "compressed-slice": phantom.image_files[3],
    }[which]
    if which == "compressed-slice":
        edit(target, lambda ds: ds.compress(JPEG2000Lossless, generate_instance_uid=False))
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])

    error = load_expecting(DicomInputError, phantom.out_dir / "dicom")
    assert error.path == target
    assert "truncated" in str(error)


def test_unreadable_file_given_to_load_study(phantom: PhantomManifest) -> None:
    junk = phantom.out_dir / "dicom" / "junk.dcm"
    junk.write_bytes(b"\x00" * 64)
    error = load_expecting(DicomInputError, phantom.out_dir / "dicom")
    assert error.path == junk
    assert "not a DICOM file" in str(error)


def test_unknown_vr_in_a_scanned_tag_names_the_file(phantom: PhantomManifest) -> None:
    """Found by tests/test_fuzz.py: ImageType with the unknown VR 'BS' raised NotImplementedError from
    pydicom's lazy value conversion, outside the loader's read guard."""
    victim = sorted((phantom.out_dir / "dicom").glob("CT_*.dcm"))[3]
    data = victim.read_bytes()
    image_type = b"\x08\x00\x08\x00CS"
    assert data.count(image_type) == 1
    victim.write_bytes(data.replace(image_type, b"\x08\x00\x08\x00BS"))
    error = load_expecting(DicomInputError, phantom.out_dir / "dicom")
    assert error.path == victim
    assert "Unknown Value Representation 'BS'" in str(error)


def test_mixed_frames_of_reference_in_series(phantom: PhantomManifest) -> None:
    odd = phantom.image_files[4]
    edit(odd, lambda ds: setattr(ds, "FrameOfReferenceUID", generate_uid()))
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert error.path == odd
    assert error.tag is not None and "FrameOfReferenceUID" in error.tag
    assert "mixes frames of reference" in str(error)
    assert odd.name in str(error)


def test_rtstruct_in_another_frame_of_reference(phantom: PhantomManifest) -> None:
    other = generate_uid()
    for path in phantom.image_files:
        edit(path, lambda ds: setattr(ds, "FrameOfReferenceUID", other))
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert error.path == phantom.rtstruct_file
    assert phantom.frame_of_reference_uid in str(error) and other in str(error)


def test_inconsistent_orientation(phantom: PhantomManifest) -> None:
    odd = phantom.image_files[7]
    angle = 0.01  # radians: a 0.5 degree tilt, far beyond DS rounding

    def tilt(ds: Dataset) -> None:
        ds.ImageOrientationPatient = [np.cos(angle), np.sin(angle), 0.0, -np.sin(angle), np.cos(angle), 0.0]

    edit(odd, tilt)
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert error.path == odd
    assert error.tag is not None and "ImageOrientationPatient" in error.tag
    assert "orientation" in str(error)


def remove_slices(manifest: PhantomManifest, indices: Sequence[int]) -> list[str]:
    """Delete image slices (spatial indices) as if they had never been sent, and return their SOP UIDs.

    The RTSTRUCT copy in the phantom folder is edited too: its ContourImageSequence items and the
    contours on those slices go, because a structure set that still referenced them would
    (rightly) be refused for absent images, which is another failure than the one under test.
    """
    gone = [manifest.image_files[k] for k in indices]
    gone_uids = [sop_uid(path) for path in gone]
    for path in gone:
        path.unlink()

    def drop_references(ds: Dataset) -> None:
        series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        series.ContourImageSequence = [
            item for item in series.ContourImageSequence if item.ReferencedSOPInstanceUID not in gone_uids
        ]
        for roi in ds.ROIContourSequence:
            roi.ContourSequence = [
                c for c in roi.ContourSequence if c.ContourImageSequence[0].ReferencedSOPInstanceUID not in gone_uids
            ]

    edit(manifest.rtstruct_file, drop_references)
    return gone_uids


def along_normal(manifest: PhantomManifest, k: int) -> float:
    """Position (mm) of the phantom's spatial slice ``k`` along its slice normal."""
    return float(np.dot(manifest.geometry.slice_position(k), np.asarray(manifest.geometry.slice_normal)))


def test_one_missing_slice_is_accepted_with_a_warning(phantom: PhantomManifest) -> None:
    """A slice missing in the middle (the RTSTRUCT not referencing it): loaded on the full grid, gap reported."""
    before = snapshot(phantom.out_dir / "dicom")
    remove_slices(phantom, [6])
    after_removal = snapshot(phantom.out_dir / "dicom")
    assert len(after_removal) == len(before) - 1

    loaded = load_study(dicom_files(phantom))
    assert snapshot(phantom.out_dir / "dicom") == after_removal, "the loader changed input files"

    images = loaded.images
    assert images.slice_indices == (0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11)
    assert images.missing_slices == (6,)
    assert images.files == tuple(p for k, p in enumerate(phantom.image_files) if k != 6)
    assert_geometry_matches(loaded, phantom)  # the full 12-slice grid at 4 mm
    assert len(loaded.warnings) == 1
    warning = loaded.warnings[0]
    assert "gap of 8.000 mm" in warning
    assert f"{along_normal(phantom, 5):.3f} mm" in warning and f"{along_normal(phantom, 7):.3f} mm" in warning
    assert f"at {along_normal(phantom, 6):.3f} mm" in warning, "the filled position is named"
    assert phantom.image_files[5].name in warning and phantom.image_files[7].name in warning
    assert "1 missing slice(s)" in warning and "interpolation" in warning


def test_gap_of_three_slices_is_refused(phantom: PhantomManifest) -> None:
    """More than MAX_MISSING_SLICES_PER_GAP missing in one gap: refused, naming positions and files."""
    remove_slices(phantom, [5, 6, 7])
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    message = str(error)
    assert "too large to fill safely" in message
    assert "gap of 16.000 mm" in message and "3 slices missing" in message
    assert f"{along_normal(phantom, 4):.3f} mm" in message and f"{along_normal(phantom, 8):.3f} mm" in message
    assert phantom.image_files[4].name in message and phantom.image_files[8].name in message
    assert error.path == phantom.image_files[8]
    assert error.tag is not None and "ImagePositionPatient" in error.tag


def test_missing_geometry_tag_named(phantom: PhantomManifest) -> None:
    odd = phantom.image_files[2]
    edit(odd, lambda ds: delattr(ds, "ImagePositionPatient"))
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert error.path == odd
    assert error.tag == "(0020,0032) ImagePositionPatient"


def test_unsupported_multiframe_sop_class_refused_by_name(phantom: PhantomManifest) -> None:
    odd = phantom.image_files[3]
    edit(odd, lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.130"))  # Enhanced PET
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert error.path == odd
    assert "Enhanced PET Image Storage is not an image class NETRT can stack" in str(error)
    assert "Legacy Converted Enhanced CT Image Storage" in str(error)  # the supported classes are listed


def test_enhanced_sop_class_without_functional_groups_is_refused_naming_the_tag(phantom: PhantomManifest) -> None:
    """Issue 18 item 3: an Enhanced CT is read from its functional groups; a classic slice merely
    relabelled as one has none, and the refusal names the file and the tag (more cases:
    tests/test_enhanced_multiframe.py)."""
    odd = phantom.image_files[3]
    edit(odd, lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2.1"))  # Enhanced CT
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert error.path == odd
    assert error.tag == "(0028,0008) NumberOfFrames"


# ------------------------------------------------------------------------------------------
# Which RTSTRUCT, which series
# ------------------------------------------------------------------------------------------


def second_rtstruct(manifest: PhantomManifest, name: str, time: str, instance_number: int = 1) -> Path:
    path = manifest.out_dir / "dicom" / name
    shutil.copy(manifest.rtstruct_file, path)

    def renew(ds: Dataset) -> None:
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StructureSetTime = time
        ds.InstanceNumber = instance_number

    edit(path, renew)
    return path


def test_newest_rtstruct_is_used_and_others_named(phantom: PhantomManifest) -> None:
    newer = second_rtstruct(phantom, "RS_newer.dcm", "235959")
    older = second_rtstruct(phantom, "RS_older.dcm", "000001")

    loaded = load_study(dicom_files(phantom))
    assert loaded.rtstruct_file == newer
    assert loaded.rtstruct_sop_instance_uid == sop_uid(newer)
    assert set(loaded.other_files) == {phantom.rtstruct_file, older}
    assert len(loaded.warnings) == 1
    assert "3 RTSTRUCTs" in loaded.warnings[0]
    assert "RS_newer.dcm" in loaded.warnings[0]
    assert "RS.dcm" in loaded.warnings[0] and "RS_older.dcm" in loaded.warnings[0]


def test_instance_creation_time_breaks_a_time_tie_and_instance_number_does_not(phantom: PhantomManifest) -> None:
    """Issue 18 item 5: StructureSetDate/Time, then InstanceCreationDate/Time; InstanceNumber is no age."""
    time = str(pydicom.dcmread(phantom.rtstruct_file).StructureSetTime)
    numbered = second_rtstruct(phantom, "RS_2.dcm", time, instance_number=2)
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert "equally new" in str(error)

    def created_later(ds: Dataset) -> None:
        ds.InstanceCreationTime = "235959"

    edit(numbered, created_later)
    assert load_study(dicom_files(phantom)).rtstruct_file == numbered


def test_equally_new_rtstructs_are_refused(phantom: PhantomManifest) -> None:
    time = str(pydicom.dcmread(phantom.rtstruct_file).StructureSetTime)
    second_rtstruct(phantom, "RS_copy.dcm", time, instance_number=1)
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert "equally new" in str(error)
    assert "RS.dcm" in str(error) and "RS_copy.dcm" in str(error)


def strip_series_reference(ds: Dataset) -> None:
    del ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence


def strip_contour_images(ds: Dataset) -> None:
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            del contour.ContourImageSequence


def test_series_found_through_contour_images(phantom: PhantomManifest) -> None:
    edit(phantom.rtstruct_file, strip_series_reference)
    loaded = load_study(dicom_files(phantom))
    assert loaded.images.series_instance_uid == phantom.image_series_uid
    assert "ContourImageSequence" in loaded.reference_source


def add_copy_of_series(manifest: PhantomManifest, folder: str) -> str:
    """A second image series in the same frame of reference (new series and instance UIDs)."""
    series_uid = generate_uid()
    target = manifest.out_dir / "dicom" / folder
    target.mkdir()
    for path in manifest.image_files:
        copy = target / path.name
        shutil.copy(path, copy)

        def renew(ds: Dataset) -> None:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

        edit(copy, renew)
    return series_uid


def test_series_found_through_frame_of_reference(phantom: PhantomManifest) -> None:
    def strip(ds: Dataset) -> None:
        strip_series_reference(ds)
        strip_contour_images(ds)

    edit(phantom.rtstruct_file, strip)
    loaded = load_study(dicom_files(phantom))
    assert loaded.images.series_instance_uid == phantom.image_series_uid
    assert "FrameOfReferenceUID" in loaded.reference_source

    add_copy_of_series(phantom, "second")
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert error.path == phantom.rtstruct_file
    assert "several image series share its frame of reference" in str(error)


def test_referenced_series_chosen_among_several(phantom: PhantomManifest) -> None:
    other = add_copy_of_series(phantom, "second")
    loaded = load_study(sorted(p for p in (phantom.out_dir / "dicom").rglob("*.dcm")))
    assert loaded.images.series_instance_uid == phantom.image_series_uid
    assert len(loaded.other_files) == len(phantom.image_files)
    assert all(p.parent.name == "second" for p in loaded.other_files)
    assert other not in loaded.images.series_instance_uid


def test_referenced_series_absent(phantom: PhantomManifest) -> None:
    def point_elsewhere(ds: Dataset) -> None:
        study = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
        study.RTReferencedSeriesSequence[0].SeriesInstanceUID = "1.2.3.4.5"

    edit(phantom.rtstruct_file, point_elsewhere)
    error = load_expecting(StudyValidationError, phantom.out_dir / "dicom")
    assert error.path == phantom.rtstruct_file
    assert error.tag is not None and "RTReferencedSeriesSequence" in error.tag
    assert "1.2.3.4.5" in str(error)


# ------------------------------------------------------------------------------------------
# Real vendor files
# ------------------------------------------------------------------------------------------


@pytest.fixture
def mim_export() -> Iterator[Path]:
    yield require_shared("rtutils-mim-ge-phantom")


def test_real_mim_export(mim_export: Path) -> None:
    files = sorted(mim_export.glob("*.dcm"))
    before = snapshot(mim_export)
    studies = find_studies(mim_export)
    assert len(studies) == 1
    assert set(studies[0].files) == set(files)
    loaded = load_study(studies[0].files)
    assert snapshot(mim_export) == before

    rs = pydicom.dcmread(mim_export / "rt.dcm")
    referenced = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert loaded.rtstruct_file == mim_export / "rt.dcm"
    assert loaded.images.series_instance_uid == referenced.SeriesInstanceUID
    assert loaded.images.frame_of_reference_uid == rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID
    assert len(loaded.images.files) == 5 and loaded.other_files == () and loaded.warnings == ()
    assert loaded.images.positions == (60.0, 65.0, 70.0, 75.0, 80.0)

    # Every ROI's contours resolve to a loaded slice, on that slice's plane.
    slice_of = {uid: k for k, uid in enumerate(loaded.images.sop_instance_uids)}
    roi_numbers = {int(item.ROINumber) for item in rs.StructureSetROISequence}
    assert {int(item.ReferencedROINumber) for item in rs.ROIContourSequence} == roi_numbers
    assert {item.ReferencedSOPInstanceUID for item in referenced.ContourImageSequence} == set(slice_of)
    for roi in rs.ROIContourSequence:
        for contour in roi.ContourSequence:
            k = slice_of[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            z = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)[:, 2]
            np.testing.assert_allclose(z, loaded.images.positions[k], atol=1e-3)

    # The grid agrees with the independent plastimatch masks made on the same CT.
    reference = sitk.ReadImage(str(mim_export / "reference_masks" / "ROI-1.nii.gz"))
    geometry = loaded.images.geometry
    assert geometry.size == tuple(reference.GetSize()) == (512, 512, 5)
    np.testing.assert_allclose(geometry.origin, reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(geometry.spacing, reference.GetSpacing(), atol=1e-4)

    volume = read_image_volume(loaded.images)
    assert volume.shape == (5, 512, 512)
    corner = volume[:, :20, 256]  # inside the field of view, above the phantom: air
    assert abs(float(np.median(corner)) + 1000) < 50


def test_repeated_instances_and_localizers_are_set_aside(phantom: PhantomManifest) -> None:
    folder = phantom.out_dir / "dicom"
    repeat = folder / "CT_0003_again.dcm"
    shutil.copy(phantom.image_files[2], repeat)
    rs_copy = folder / "RS_again.dcm"
    shutil.copy(phantom.rtstruct_file, rs_copy)
    scout = folder / "scout.dcm"
    shutil.copy(phantom.image_files[0], scout)

    def make_scout(ds: Dataset) -> None:
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal: would break the stack if used

    edit(scout, make_scout)

    loaded = load_study(dicom_files(phantom))
    assert loaded.images.files == tuple(phantom.image_files)
    assert set(loaded.other_files) == {repeat, rs_copy, scout}
    warnings = " | ".join(loaded.warnings)
    assert "CT_0003_again.dcm" in warnings and "RS_again.dcm" in warnings and "scout.dcm" in warnings
