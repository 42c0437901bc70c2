"""Contour types on whole phantoms (issue 18 item 2): the XOR type, off-plane points, ROI types.

Each phantom variant is loaded by :func:`netrt.study.load_study` and rasterised by the mask step
(:func:`netrt.masks.roi_mask`); its masks must equal those of the plain phantom bit for bit and the
analytic truth within the phantom's targets (Dice >= 0.995 per ROI, and every voxel that differs
has its centre within the 0.05 mm contour tolerance of the analytic surface, as in
tests/test_phantom.py). The voxel-level rules (zero-area, self-touching holes, seven contours on a
slice, closing points) are tested in tests/test_rasterize.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from netrt.geometry import ImageGeometry, index_to_patient
from netrt.masks import build_merged_mask, read_structure_set, roi_mask
from netrt.phantom import PhantomManifest, PhantomSpec, roi_contains, truth_mask, write_phantom
from netrt.study import LoadedStudy, load_study

ROIS = ("sphere", "box", "hollow_sphere", "torus", "Skull", "Patient_Outline")
SPEC = PhantomSpec(rows=72, columns=80, pixel_spacing=(2.5, 2.5), slice_spacing=1.0, slices=60)


def load(manifest: PhantomManifest) -> LoadedStudy:
    return load_study(sorted((manifest.out_dir / "dicom").iterdir()))


def masks(study: LoadedStudy) -> dict[str, np.ndarray]:
    out = {}
    for roi in read_structure_set(study.rtstruct_file):
        mask, _, skipped = roi_mask(roi, study.images.geometry)
        assert skipped == [], (roi.name, skipped)
        out[roi.name] = mask
    return out


def assert_matches_truth(spec: PhantomSpec, name: str, mask: np.ndarray, geometry: ImageGeometry) -> None:
    truth = truth_mask(spec, name)
    score = 2.0 * np.count_nonzero(mask & truth) / (np.count_nonzero(mask) + np.count_nonzero(truth))
    assert score >= 0.995, f"{name}: Dice {score:.4f}"
    differing = np.argwhere(mask ^ truth)  # (slice, row, column)
    centres = index_to_patient(geometry, differing[:, ::-1].astype(float))
    angles = np.linspace(0.0, 2 * np.pi, 32, endpoint=False)[:, None]
    for (k, i, j), centre in zip(differing, centres, strict=True):
        ring = centre + 0.05 * (np.cos(angles) * geometry.row_direction + np.sin(angles) * geometry.column_direction)
        assert (roi_contains(spec, name, ring) != truth[k, i, j]).any(), (name, k, i, j)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomManifest, dict[str, np.ndarray]]:
    manifest = write_phantom(SPEC, tmp_path_factory.mktemp("plain"))
    return manifest, masks(load(manifest))


def test_xor_contour_type_gives_the_closed_planar_masks(
    plain: tuple[PhantomManifest, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    manifest = write_phantom(replace(SPEC, contour_type="CLOSEDPLANAR_XOR"), tmp_path)
    rs = pydicom.dcmread(manifest.rtstruct_file)
    kinds = {c.ContourGeometricType for roi in rs.ROIContourSequence for c in roi.ContourSequence}
    assert kinds == {"CLOSEDPLANAR_XOR"}
    study = load(manifest)
    found, (_, expected) = masks(study), plain
    for name in ROIS:
        np.testing.assert_array_equal(found[name], expected[name], err_msg=name)
        assert_matches_truth(manifest.spec, name, found[name], study.images.geometry)


def test_points_off_the_slice_plane_stay_on_their_slice(
    plain: tuple[PhantomManifest, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """0.2 mm float-export jitter on 1 mm slices (the thinnest common CT): masks unchanged."""
    manifest = write_phantom(replace(SPEC, off_plane_jitter_mm=0.2), tmp_path)
    study = load(manifest)
    normal = study.images.geometry.normal
    positions = np.asarray(study.images.positions)
    offsets = []
    for roi in read_structure_set(manifest.rtstruct_file):
        for points in roi.contours:
            along = points @ normal
            offsets.append(np.abs(along - positions[np.argmin(np.abs(positions - along.mean()))]).max())
    assert 0.15 < max(offsets) <= 0.2 + 1e-6  # the jitter is really there, and within its bound
    assert min(offsets) > 0.01
    found, (_, expected) = masks(study), plain
    for name in ROIS:
        np.testing.assert_array_equal(found[name], expected[name], err_msg=name)
        assert_matches_truth(manifest.spec, name, found[name], study.images.geometry)


@pytest.mark.parametrize("value", ["", "NOT_A_DICOM_TYPE", None])
def test_empty_unknown_or_absent_interpreted_type_changes_nothing(
    value: str | None, plain: tuple[PhantomManifest, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    """RTROIInterpretedType is a label: ROIs are selected by name and filled by geometry, never by type."""
    from netrt.outputs.rois import read_roi_infos

    manifest = write_phantom(SPEC, tmp_path)
    rs = pydicom.dcmread(manifest.rtstruct_file)
    for item in rs.RTROIObservationsSequence:
        if value is None:
            del item.RTROIInterpretedType
        else:
            item.RTROIInterpretedType = value
    rs.save_as(manifest.rtstruct_file)
    study = load(manifest)
    assert study.warnings == ()
    merged = build_merged_mask(study.rtstruct_file, study.images.geometry, [], ["*skull*", "*patient_outline*"])
    assert merged.kept == ["sphere", "box", "hollow_sphere", "torus"] and merged.warnings == []
    _, expected = plain
    np.testing.assert_array_equal(
        merged.mask, expected["sphere"] | expected["box"] | expected["hollow_sphere"] | expected["torus"]
    )
    infos = read_roi_infos(study.rtstruct_file, [(r.number, r.name) for r in merged.rois if r.kept])
    assert [info.interpreted_type for info in infos] == [(value or "").upper()] * 4
