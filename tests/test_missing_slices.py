"""Series with missing slices (issue 3): filled by interpolation where that is safe, refused where not.

One phantom (64 x 64 pixels of 4 mm, 40 slices 3 mm apart) loses slices the way a transfer loses
them: the files are deleted and the RTSTRUCT copy no longer references them. Every check compares
against what the phantom really holds there: the deleted file's own pixels, and the analytic
truth masks of the four inner solids.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from netrt.config import ProcessingConfig
from netrt.errors import StudyValidationError
from netrt.phantom import NOISE_SIGMA_HU, PhantomManifest, PhantomSpec, truth_masks, write_phantom
from netrt.pipeline import compute_mask, load_mask, write_plane
from netrt.study import MAX_MISSING_SLICES_PER_GAP, LoadedStudy, load_study, read_image_volume
from tests.overlay_check import score_series
from tests.test_study import along_normal, dicom_files, edit, load_expecting, remove_slices

SPEC = PhantomSpec(rows=64, columns=64, pixel_spacing=(4.0, 4.0), slice_spacing=3.0)
INNER_ROIS = ["sphere", "box", "hollow_sphere", "torus"]
#: The slice removed for the one-slice gap: in the middle of the stack (40 slices), through the
#: lower halves of the solids, where neighbouring slices differ (box faces, torus and sphere rims),
#: so interpolation has something to get right.
GONE = 14


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> PhantomManifest:
    """The complete phantom, written once and never edited (copied by each test that breaks it)."""
    return write_phantom(SPEC, tmp_path_factory.mktemp("missing-slices") / "pristine")


def copy_of(pristine: PhantomManifest, root: Path) -> PhantomManifest:
    """A writable copy of the phantom under ``root``, with the manifest's paths pointing into it."""
    target = root / "phantom"
    shutil.copytree(pristine.out_dir, target)
    dicom = target / "dicom"
    return replace(
        pristine,
        image_files=[dicom / p.name for p in pristine.image_files],
        rtstruct_file=dicom / pristine.rtstruct_file.name,
        out_dir=target,
    )


def decoded(path: Path) -> npt.NDArray[np.float32]:
    """A slice in HU, decoded independently of netrt.study."""
    ds = pydicom.dcmread(path)
    hu: npt.NDArray[np.float32] = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    return hu


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    assert total > 0, "Dice of two empty masks says nothing"
    return 2.0 * int((a & b).sum()) / total


def inner_truth() -> npt.NDArray[np.bool_]:
    truth = truth_masks(SPEC)
    union = np.zeros_like(truth[INNER_ROIS[0]])
    for name in INNER_ROIS:
        union |= truth[name]
    return union


def gapped(pristine: PhantomManifest, root: Path, gone: Sequence[int]) -> tuple[PhantomManifest, LoadedStudy]:
    manifest = copy_of(pristine, root)
    remove_slices(manifest, gone)
    return manifest, load_study(dicom_files(manifest))


# ------------------------------------------------------------------------------------------
# Accepted: one and two missing slices
# ------------------------------------------------------------------------------------------


def test_one_missing_slice_loads_on_the_full_grid(pristine: PhantomManifest, tmp_path: Path) -> None:
    manifest, loaded = gapped(pristine, tmp_path, [GONE])
    complete = load_study(dicom_files(pristine))

    images = loaded.images
    assert images.geometry.is_close(complete.images.geometry, atol_mm=1e-6), "the grid is the complete series' grid"
    assert images.slice_indices == tuple(k for k in range(40) if k != GONE)
    assert images.missing_slices == (GONE,)
    assert images.files == tuple(p for k, p in enumerate(manifest.image_files) if k != GONE)
    assert images.positions == tuple(p for k, p in enumerate(complete.images.positions) if k != GONE)

    assert len(loaded.warnings) == 1
    warning = loaded.warnings[0]
    below, above = along_normal(manifest, GONE - 1), along_normal(manifest, GONE + 1)
    assert f"gap of {above - below:.3f} mm" in warning
    assert f"{below:.3f} mm" in warning and f"{above:.3f} mm" in warning
    assert f"at {along_normal(manifest, GONE):.3f} mm" in warning
    assert manifest.image_files[GONE - 1].name in warning and manifest.image_files[GONE + 1].name in warning
    assert "1 missing slice(s)" in warning and "filled by interpolation" in warning


def test_missing_slice_pixels_are_interpolated_close_to_the_truth(pristine: PhantomManifest, tmp_path: Path) -> None:
    _, loaded = gapped(pristine, tmp_path, [GONE])
    volume = read_image_volume(loaded.images)
    assert volume.shape == (40, 64, 64)

    source = [decoded(p) for p in pristine.image_files]
    received = [k for k in range(40) if k != GONE]
    np.testing.assert_array_equal(volume[received], np.stack([source[k] for k in received]))
    np.testing.assert_allclose(volume[GONE], 0.5 * (source[GONE - 1] + source[GONE + 1]), atol=1e-3)

    true = source[GONE]  # the deleted file's own pixels
    error = float(np.abs(volume[GONE] - true).mean())
    neighbours = float(np.abs(source[GONE - 1] - source[GONE + 1]).mean())
    assert neighbours > 30, "the test slice must differ from its neighbours, else it proves nothing"
    assert error < 0.65 * neighbours, f"mean |error| {error:.1f} HU vs neighbour difference {neighbours:.1f} HU"
    # Where the three slices hold the same tissue, only the noise is left: sigma * sqrt(1.5) for
    # the blend of two noisy slices against a third, i.e. a mean |error| of about 5.9 HU.
    truth = truth_masks(SPEC)
    same = np.ones(true.shape, dtype=bool)
    for mask in truth.values():
        same &= (mask[GONE - 1] == mask[GONE]) & (mask[GONE + 1] == mask[GONE])
    assert same.mean() > 0.8
    assert float(np.abs(volume[GONE] - true)[same].mean()) < 1.5 * NOISE_SIGMA_HU


def test_mask_on_the_missing_slice_is_interpolated_by_shape(pristine: PhantomManifest, tmp_path: Path) -> None:
    _, loaded = gapped(pristine, tmp_path, [GONE])
    work = tmp_path / "work"
    work.mkdir()
    result = compute_mask(loaded, ProcessingConfig(), work)
    assert result.kept == INNER_ROIS
    mask = load_mask(result.mask_path)
    assert mask.shape == loaded.images.geometry.shape == (40, 64, 64)
    assert result.voxel_count == int(mask.sum())

    truth = inner_truth()
    assert truth[GONE].sum() > 40 and mask[GONE].any(), "the missing slice crosses the solids"
    assert dice(mask[GONE], truth[GONE]) >= 0.9
    assert dice(mask, truth) >= 0.98
    # The filled slice is not a copy of a neighbour (the solids change between them).
    assert not np.array_equal(mask[GONE], mask[GONE - 1]) or not np.array_equal(mask[GONE], mask[GONE + 1])


def test_axial_series_has_one_image_per_received_slice(pristine: PhantomManifest, tmp_path: Path) -> None:
    _, loaded = gapped(pristine, tmp_path, [GONE])
    work = tmp_path / "work"
    work.mkdir()
    processing = ProcessingConfig()
    masks = compute_mask(loaded, processing, work)
    mask = load_mask(masks.mask_path)

    (series,) = write_plane(loaded, masks, "axial", processing, work)
    assert len(series.files) == 39
    overlays_set = 0
    for out, k, source in zip(series.files, loaded.images.slice_indices, loaded.images.files, strict=True):
        ds = pydicom.dcmread(out)
        original = pydicom.dcmread(source)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
        assert ds.ImagePositionPatient == original.ImagePositionPatient
        assert ds.PixelData == original.PixelData, "axial pixels are the received ones, untouched"
        overlay = ds.overlay_array(0x6000).astype(bool)
        np.testing.assert_array_equal(overlay, mask[k], err_msg=f"{out.name} (grid slice {k})")
        overlays_set += int(overlay.any())
    assert overlays_set > 10


def test_coronal_overlay_across_the_gap_matches_the_solids(pristine: PhantomManifest, tmp_path: Path) -> None:
    """The reformat uses the whole grid; across a filled slice it stays as good as the complete series'."""
    processing = ProcessingConfig()

    def coronal_dice(study: LoadedStudy, work: Path) -> dict[str, float]:
        work.mkdir()
        (series,) = write_plane(study, compute_mask(study, processing, work), "coronal", processing, work)
        return {score.roi: score.dice for score in score_series(pristine, list(series.files), INNER_ROIS)}

    complete = coronal_dice(load_study(dicom_files(pristine)), tmp_path / "complete")
    _, loaded = gapped(pristine, tmp_path, [GONE])
    with_gap = coronal_dice(loaded, tmp_path / "gapped")
    for name in INNER_ROIS:
        assert with_gap[name] >= complete[name] - 0.02, (name, with_gap[name], complete[name])
        assert with_gap[name] >= 0.8, (name, with_gap[name])


def test_two_missing_slices_are_filled_by_distance(pristine: PhantomManifest, tmp_path: Path) -> None:
    assert MAX_MISSING_SLICES_PER_GAP == 2
    manifest, loaded = gapped(pristine, tmp_path, [GONE, GONE + 1])
    assert loaded.images.missing_slices == (GONE, GONE + 1)
    assert len(loaded.warnings) == 1 and "2 missing slice(s)" in loaded.warnings[0]
    filled = [f"{along_normal(manifest, k):.3f}" for k in (GONE, GONE + 1)]
    assert f"at {filled[0]}, {filled[1]} mm" in loaded.warnings[0]

    volume = read_image_volume(loaded.images)
    below, above = decoded(pristine.image_files[GONE - 1]), decoded(pristine.image_files[GONE + 2])
    np.testing.assert_allclose(volume[GONE], (2 * below + above) / 3, atol=1e-3)
    np.testing.assert_allclose(volume[GONE + 1], (below + 2 * above) / 3, atol=1e-3)

    work = tmp_path / "work"
    work.mkdir()
    mask = load_mask(compute_mask(loaded, ProcessingConfig(), work).mask_path)
    truth = inner_truth()
    # Bridging 9 mm is coarser than 6 mm: measured 0.87 and 0.92 here.
    for k in (GONE, GONE + 1):
        assert dice(mask[k], truth[k]) >= 0.85, k
    assert dice(mask, truth) >= 0.98


# ------------------------------------------------------------------------------------------
# Refused: too large a gap, and everything that is not a missing slice
# ------------------------------------------------------------------------------------------


def test_gap_of_three_missing_slices_is_refused(pristine: PhantomManifest, tmp_path: Path) -> None:
    manifest = copy_of(pristine, tmp_path)
    remove_slices(manifest, [GONE, GONE + 1, GONE + 2])
    error = load_expecting(StudyValidationError, manifest.out_dir / "dicom")
    message = str(error)
    assert "too large to fill safely" in message and "3 slices missing" in message
    below, above = along_normal(manifest, GONE - 1), along_normal(manifest, GONE + 3)
    assert f"gap of {above - below:.3f} mm" in message
    assert f"{below:.3f} mm" in message and f"{above:.3f} mm" in message
    assert manifest.image_files[GONE - 1].name in message and manifest.image_files[GONE + 3].name in message
    assert error.path == manifest.image_files[GONE + 3]


def shift_slice(path: Path, along: float = 0.0, in_plane: float = 0.0) -> None:
    """Move one axial slice (normal +z) by ``along`` mm along the normal and ``in_plane`` mm along x."""

    def move(ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + in_plane, y, z + along]

    edit(path, move)


def test_uneven_spacing_is_still_refused(pristine: PhantomManifest, tmp_path: Path) -> None:
    """A gap of 1.5 spacings (a slice gone and the next one 1.5 mm off) is not a missing slice."""
    manifest = copy_of(pristine, tmp_path)
    assert np.allclose(manifest.geometry.slice_normal, (0, 0, 1))
    remove_slices(manifest, [GONE])
    shift_slice(manifest.image_files[GONE + 1], along=-1.5)
    error = load_expecting(StudyValidationError, manifest.out_dir / "dicom")
    message = str(error)
    assert "slice spacing is not uniform" in message
    assert "gap of 4.500 mm" in message
    assert f"{along_normal(manifest, GONE - 1):.3f} mm" in message
    assert "too large" not in message


def test_duplicated_position_is_still_refused(pristine: PhantomManifest, tmp_path: Path) -> None:
    manifest = copy_of(pristine, tmp_path)
    shift_slice(manifest.image_files[GONE], along=-3.0)  # onto slice GONE - 1, leaving a 6 mm gap above
    error = load_expecting(StudyValidationError, manifest.out_dir / "dicom")
    assert "two slices share one position" in str(error)


def test_sheared_stack_with_a_gap_is_still_refused(pristine: PhantomManifest, tmp_path: Path) -> None:
    manifest = copy_of(pristine, tmp_path)
    remove_slices(manifest, [GONE])
    shift_slice(manifest.image_files[30], in_plane=2.0)
    error = load_expecting(StudyValidationError, manifest.out_dir / "dicom")
    assert "not stacked along the slice normal" in str(error)
    assert "2.000 mm in-plane" in str(error)
