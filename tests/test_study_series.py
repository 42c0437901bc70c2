"""Several image series in one frame of reference (issue 18 item 4).

A planning CT plus a registered scan in the same frame of reference (``PhantomSpec(
registered_series=...)``: a second CT half a slice off, or on the very same slice positions like
a second phase). The RTSTRUCT's series is processed; the other never mixes into its stack (the
stack, its grid and the masks are those of the phantom without it, bit for bit) and its files are
listed in ``LoadedStudy.registered_files`` for forwarding.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from netrt.errors import StudyValidationError
from netrt.masks import read_structure_set, roi_mask
from netrt.phantom import PhantomManifest, PhantomSpec, truth_mask, write_phantom
from netrt.study import LoadedStudy, load_study

SPEC = PhantomSpec(rows=64, columns=72, pixel_spacing=(3.0, 3.0), slice_spacing=3.0, slices=30)
INNER = ("sphere", "box", "hollow_sphere", "torus")


def load(manifest: PhantomManifest) -> LoadedStudy:
    return load_study(sorted((manifest.out_dir / "dicom").iterdir()))


def masks(study: LoadedStudy) -> dict[str, np.ndarray]:
    return {roi.name: roi_mask(roi, study.images.geometry)[0] for roi in read_structure_set(study.rtstruct_file)}


@pytest.fixture(scope="module")
def alone(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoadedStudy, dict[str, np.ndarray]]:
    study = load(write_phantom(SPEC, tmp_path_factory.mktemp("alone")))
    assert study.registered_files == ()
    return study, masks(study)


@pytest.mark.parametrize("registered", ["shifted", "same_grid"])
def test_the_rtstruct_series_is_processed_and_the_registered_one_kept_apart(
    registered: str, alone: tuple[LoadedStudy, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    manifest = write_phantom(replace(SPEC, registered_series=registered), tmp_path)
    assert manifest.registered_files
    study = load(manifest)
    assert study.images.series_instance_uid == manifest.image_series_uid
    assert study.images.files == tuple(manifest.image_files)  # nothing of the other series in the stack
    assert study.registered_files == tuple(sorted(manifest.registered_files))
    assert set(study.registered_files) <= set(study.other_files)
    assert study.rtstruct_file not in study.registered_files
    assert study.warnings == ()
    only, only_masks = alone
    assert study.images.geometry.size == only.images.geometry.size
    np.testing.assert_array_equal(study.images.geometry.origin, only.images.geometry.origin)
    assert study.images.positions == only.images.positions
    found = masks(study)
    for name, mask in found.items():
        np.testing.assert_array_equal(mask, only_masks[name], err_msg=name)
    for name in INNER:
        truth = truth_mask(manifest.spec, name)
        assert 2.0 * np.count_nonzero(found[name] & truth) / (found[name].sum() + truth.sum()) >= 0.99, name


def test_other_frames_and_non_image_objects_are_not_registered_files(tmp_path: Path) -> None:
    """Only image series of the processed series' frame count; a scan in another frame does not."""
    manifest = write_phantom(replace(SPEC, registered_series="shifted"), tmp_path)
    moved = manifest.registered_files[:3]
    for path in moved:  # three slices of the registered scan now claim another frame of reference
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = "1.2.3.4.5.6"
        ds.save_as(path)
    study = load(manifest)
    assert study.registered_files == tuple(sorted(set(manifest.registered_files) - set(moved)))
    assert set(moved) <= set(study.other_files)


def test_a_structure_set_naming_no_series_is_refused_when_two_share_its_frame(tmp_path: Path) -> None:
    """Without any reference but the frame, which series the contours belong to cannot be told."""
    manifest = write_phantom(replace(SPEC, registered_series="shifted"), tmp_path)
    rs = pydicom.dcmread(manifest.rtstruct_file)
    del rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence
    for roi in rs.ROIContourSequence:
        for contour in roi.ContourSequence:
            del contour.ContourImageSequence
    rs.save_as(manifest.rtstruct_file)
    with pytest.raises(StudyValidationError, match="several image series share its frame of reference"):
        load(manifest)
