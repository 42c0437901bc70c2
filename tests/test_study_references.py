"""Stale references (issue 18 item 1): an RTSTRUCT whose images were re-exported under new UIDs.

When nothing the RTSTRUCT names was received but its frame of reference holds exactly one image
series with a slice at every contour's position, the study loads with a "references matched by
position" warning and gives the same masks, bit for bit, as its correctly referenced twin. Each
way that can fail (positions off, several series fit, another frame of reference) is refused with
the cause. Phantoms use ``PhantomSpec(stale_references=...)``; the real MIM export is copied to a
temp dir and its CT slices given new UIDs there (``../shared`` is never modified).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from netrt.errors import StudyValidationError
from netrt.geometry import ImageGeometry
from netrt.masks import read_structure_set, roi_mask
from netrt.phantom import PhantomManifest, PhantomSpec, truth_mask, write_phantom
from netrt.study import LoadedStudy, load_found_study, load_study
from netrt.study.references import POSITION_MATCH_FRACTION, TAG_POSITION_MATCH
from tests.conftest import require_shared

SPEC = PhantomSpec(rows=64, columns=72, pixel_spacing=(3.0, 3.0), slice_spacing=3.0, slices=30)
INNER = ("sphere", "box", "hollow_sphere", "torus")
MIM = "rtutils-mim-ge-phantom"


def masks(study: LoadedStudy) -> dict[str, np.ndarray]:
    """Every ROI's mask on the loaded series' grid (the mask step's own rasteriser)."""
    return {roi.name: roi_mask(roi, study.images.geometry)[0] for roi in read_structure_set(study.rtstruct_file)}


def assert_same_grid(a: ImageGeometry, b: ImageGeometry) -> None:
    for name in ("origin", "row_direction", "column_direction", "normal"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.spacing == b.spacing and a.size == b.size


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def phantom(tmp_path: Path, name: str, **options: object) -> PhantomManifest:
    return write_phantom(replace(SPEC, **options), tmp_path / name)  # type: ignore[arg-type]


def files(manifest: PhantomManifest) -> list[Path]:
    return sorted((manifest.out_dir / "dicom").iterdir())


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedStudy, dict[str, np.ndarray]]:
    manifest = write_phantom(SPEC, tmp_path_factory.mktemp("twin"))
    study = load_study(files(manifest))
    assert study.warnings == () and study.reference_source != TAG_POSITION_MATCH
    return study, masks(study)


@pytest.mark.parametrize("stale", ["instances", "series"])
def test_stale_references_are_matched_by_position_and_give_the_twins_masks(
    stale: str, twin: tuple[LoadedStudy, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    manifest = phantom(tmp_path, stale, stale_references=stale)
    rs = pydicom.dcmread(manifest.rtstruct_file)
    named = {
        item.ReferencedSOPInstanceUID
        for roi in rs.ROIContourSequence
        for contour in roi.ContourSequence
        for item in contour.ContourImageSequence
    }
    assert not named & set(manifest.image_sop_instance_uids)  # the phantom option really is stale
    study = load_study(files(manifest))
    assert study.images.series_instance_uid == manifest.image_series_uid
    assert study.images.files == tuple(manifest.image_files)
    assert study.reference_source == TAG_POSITION_MATCH
    (note,) = [w for w in study.warnings if w.startswith("references matched by position")]
    assert manifest.image_series_uid in note and "RS.dcm" in note
    assert f"{POSITION_MATCH_FRACTION * SPEC.slice_spacing:.3g} mm" in note
    twin_study, twin_masks = twin
    assert_same_grid(study.images.geometry, twin_study.images.geometry)
    mine = masks(study)
    assert mine.keys() == twin_masks.keys()
    for name, mask in mine.items():
        np.testing.assert_array_equal(mask, twin_masks[name], err_msg=name)  # bit for bit
    for name in INNER:  # and the twin's masks are the analytic truth within the phantom targets
        assert dice(mine[name], truth_mask(manifest.spec, name)) >= 0.99, name


def test_a_partly_received_series_is_still_refused_as_incomplete(tmp_path: Path) -> None:
    """Only when *nothing* named was received do positions stand in: a lost slice is not stale."""
    manifest = phantom(tmp_path, "partial")
    (manifest.out_dir / "dicom" / manifest.image_files[-1].name).unlink()  # the last slice: not a gap
    with pytest.raises(StudyValidationError, match=r"references 1 image\(s\) absent"):
        load_study(files(manifest))


def test_contours_on_no_received_slice_are_refused_naming_the_contour(tmp_path: Path) -> None:
    """The only series in the frame sits half a slice off the contours (another scan): refused."""
    manifest = phantom(tmp_path, "offgrid", stale_references="series", registered_series="shifted")
    for path in manifest.image_files:
        path.unlink()
    with pytest.raises(StudyValidationError) as info:
        load_study(files(manifest))
    message = str(info.value)
    assert "not in this study" in message  # the cause: what did not resolve
    assert "do not lie on the received slices" in message and "contour" in message and "ROI '" in message
    assert "RS.dcm" in message and "(3006,0050) ContourData" in message


def test_several_series_on_the_contours_positions_are_refused(tmp_path: Path) -> None:
    manifest = phantom(tmp_path, "two", stale_references="series", registered_series="same_grid")
    with pytest.raises(StudyValidationError) as info:
        load_study(files(manifest))
    message = str(info.value)
    assert "several image series" in message
    registered = pydicom.dcmread(manifest.registered_files[0]).SeriesInstanceUID
    assert manifest.image_series_uid in message and registered in message


def test_a_shifted_second_series_does_not_fit_so_the_planning_ct_is_matched(tmp_path: Path) -> None:
    manifest = phantom(tmp_path, "shifted", stale_references="series", registered_series="shifted")
    study = load_study(files(manifest))
    assert study.images.series_instance_uid == manifest.image_series_uid
    assert set(manifest.registered_files) <= set(study.other_files)
    assert any(w.startswith("references matched by position") for w in study.warnings)


def test_a_series_that_cannot_be_stacked_is_no_candidate(tmp_path: Path) -> None:
    """A registered scan NETRT cannot read as a stack (here: labelled Enhanced CT) does not block the match."""
    manifest = phantom(tmp_path, "enhanced", stale_references="series", registered_series="same_grid")
    for path in manifest.registered_files:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
        ds.save_as(path)
    study = load_study(files(manifest))
    assert study.images.series_instance_uid == manifest.image_series_uid
    assert study.reference_source == TAG_POSITION_MATCH


def test_stale_instances_of_a_received_series_match_only_that_series(tmp_path: Path) -> None:
    """The RTSTRUCT's SeriesInstanceUID was received (only instance UIDs changed): a second series on
    the same positions is no rival, because the RTSTRUCT names the series."""
    manifest = phantom(tmp_path, "named", stale_references="instances", registered_series="same_grid")
    study = load_study(files(manifest))
    assert study.images.series_instance_uid == manifest.image_series_uid
    assert study.reference_source == TAG_POSITION_MATCH


def test_another_frame_of_reference_is_refused(tmp_path: Path) -> None:
    manifest = phantom(tmp_path, "frame", stale_references="series")
    other = generate_uid()
    for path in manifest.image_files:
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = other
        ds.save_as(path)
    with pytest.raises(StudyValidationError) as info:
        load_study(files(manifest))
    message = str(info.value)
    assert "no received image series is in its frame of reference" in message
    assert manifest.frame_of_reference_uid in message and other in message


def _restamp(folder: Path, *, new_series: bool) -> dict[str, str]:
    """Give every CT slice of a copied export a new SOPInstanceUID (and SeriesInstanceUID)."""
    series = generate_uid()
    renamed = {}
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        if ds.Modality == "RTSTRUCT":
            continue
        new = generate_uid()
        renamed[ds.SOPInstanceUID] = new
        ds.SOPInstanceUID = new
        ds.file_meta.MediaStorageSOPInstanceUID = new
        if new_series:
            ds.SeriesInstanceUID = series
        ds.save_as(path)
    return renamed


@pytest.mark.parametrize("new_series", [False, True])
def test_real_mim_export_re_exported_under_new_uids(new_series: bool, tmp_path: Path) -> None:
    source = require_shared(MIM)
    original = load_found_study(source)
    copy = tmp_path / "mim"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("reference_masks", "*.txt"))
    renamed = _restamp(copy, new_series=new_series)
    assert len(renamed) == 5
    study = load_found_study(copy)
    assert study.reference_source == TAG_POSITION_MATCH
    assert any(w.startswith("references matched by position") for w in study.warnings)
    assert set(study.images.sop_instance_uids) == set(renamed.values())
    assert_same_grid(study.images.geometry, original.images.geometry)
    expected, found = masks(original), masks(study)
    for name, mask in found.items():
        np.testing.assert_array_equal(mask, expected[name], err_msg=name)  # bit for bit
        reference = sitk.GetArrayFromImage(sitk.ReadImage(str(source / "reference_masks" / f"{name}.nii.gz")))
        assert dice(mask, reference.astype(bool)) >= 0.99, name  # and plastimatch agrees


@pytest.mark.slow
@pytest.mark.network
def test_the_run_summary_shows_the_position_match(prefect_harness: None, tmp_path: Path) -> None:
    from flows.process_study import process_study
    from netrt.layout import DataLayout

    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {layout.root}}}\nprocessing: {{planes: [axial]}}\n"
        f"destinations:\n  - {{name: out, type: folder, path: {tmp_path / 'out'}}}\n"
    )
    manifest = phantom(tmp_path, "flow", stale_references="series")
    study_dir = layout.studies / manifest.study_instance_uid
    shutil.copytree(manifest.out_dir / "dicom", study_dir)
    summary = process_study(study_dir=str(study_dir), config_file=str(config))
    assert any(w.startswith("references matched by position") for w in summary["warnings"]), summary["warnings"]
