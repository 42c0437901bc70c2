"""The separable numpy reslice (:mod:`netrt.reslice`) against SimpleITK, the path it replaced (issue 20).

Old and new paths must give the same bytes where the algorithm is unchanged: linear interpolation
onto grids along the source's axes. Checked twice:

* on arrays: :func:`netrt.reformat._resampled_slabs` with ``RESAMPLER = "sitk"`` (SimpleITK's
  ResampleImageFilter, as before) and ``"numpy"``, on axial, oblique, anisotropic and reversed
  grids, at the source spacing and at a spacing that interpolates every axis, and on a target box
  that reaches outside the source (default values). The float32 values agree to rounding, not
  always bit for bit: ITK computes each point's continuous index through its transform, so an
  in-plane weight that is exactly 0 here is ~1e-13 there (a value that cancels to 0 here is ~1e-12
  there), and it combines the axes in another order (1 float32 ulp, seen on float input). The
  stored values written from them (rounded to the integer pixel type) are compared exactly;
* on written files: the coronal and sagittal overlay series of small phantoms (axial, oblique,
  reversed slice order) written both ways, compared byte for byte, and the colour series' pixel
  data compared byte for byte (their other bytes hold creation times).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread

import netrt.reformat as reformat_module
from netrt.config import ProcessingConfig
from netrt.geometry import ImageGeometry, to_sitk_image
from netrt.phantom import PhantomSpec, write_phantom
from netrt.pipeline import compute_mask, write_output
from netrt.reslice import aligned_axes
from netrt.study import load_study


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    out = np.eye(3)
    for axis, degrees in ((0, ax), (1, ay), (2, az)):
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        m = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        out = m @ out
    return out


def _geometry(rotation: np.ndarray, spacing: tuple[float, float, float], size: tuple[int, int, int]) -> ImageGeometry:
    return ImageGeometry(
        origin=np.array([-40.3, 12.7, 101.1]),
        row_direction=rotation[:, 0],
        column_direction=rotation[:, 1],
        normal=rotation[:, 2],
        spacing=spacing,
        size=size,
    )


SOURCES = {
    "axial": _geometry(np.eye(3), (0.98, 0.98, 2.5), (48, 40, 20)),
    "oblique": _geometry(_rotation(20, 10, 5), (0.98, 0.98, 2.5), (48, 40, 20)),
    "anisotropic": _geometry(_rotation(-15, 0, 30), (0.7, 1.1, 3.0), (40, 36, 18)),
    # normal pointing to the feet: the planes start from the other end
    "reversed": _geometry(np.diag([1.0, -1.0, -1.0]), (1.0, 1.0, 2.0), (40, 44, 16)),
}


def _both_paths(
    monkeypatch: pytest.MonkeyPatch, image: sitk.Image, source: ImageGeometry, target: ImageGeometry, default: float
) -> tuple[np.ndarray, np.ndarray]:
    results = []
    for resampler in ("sitk", "numpy"):
        monkeypatch.setattr(reformat_module, "RESAMPLER", resampler)
        slabs = reformat_module._resampled_slabs(image, source, target, sitk.sitkLinear, default, sitk.sitkFloat32)
        results.append(np.concatenate([np.array(values) for _, _, values in slabs]))
    return results[0], results[1]


@pytest.mark.parametrize("spacing", [None, 1.3], ids=["source spacing", "1.3 mm"])
@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_numpy_reslice_equals_simpleitk_exactly(
    monkeypatch: pytest.MonkeyPatch, name: str, plane: str, spacing: float | None
) -> None:
    source = SOURCES[name]
    rng = np.random.default_rng(7)
    volume = rng.integers(-1024, 3000, size=source.shape).astype(np.int16)
    monkeypatch.setattr(reformat_module, "_SLAB_VOXELS", 5000)  # several slabs, as on a real CT
    target = reformat_module.plane_geometry(source, plane, spacing)
    axes = aligned_axes(source, target)
    assert axes is not None
    if spacing is not None:
        assert not any(axis.is_gather for axis in axes)  # every axis interpolates
    old, new = _both_paths(monkeypatch, to_sitk_image(volume, source), source, target, -1024.0)
    assert old.shape == new.shape == target.shape
    np.testing.assert_allclose(new, old, rtol=1e-6, atol=1e-9)
    # bit for bit wherever the value is not a cancellation to ~0
    assert np.count_nonzero((new != old) & (np.abs(old) > 1e-6)) == 0
    np.testing.assert_array_equal(np.rint(new).astype(np.int16), np.rint(old).astype(np.int16))
    assert len(np.unique(new)) > 1000  # real interpolated values, not a constant


def test_target_reaching_outside_the_source_gets_the_default_like_simpleitk(monkeypatch: pytest.MonkeyPatch) -> None:
    source = SOURCES["oblique"]
    volume = np.random.default_rng(3).normal(size=source.shape).astype(np.float32)
    plane = reformat_module.plane_geometry(source, "coronal", 0.9)
    # the same grid shifted by 3.3 voxels along each axis and grown: part of it lies outside
    shift = plane.direction_matrix @ (np.array([-3.3, 2.7, -4.1]) * np.asarray(plane.spacing))
    size = (plane.size[0] + 9, plane.size[1] + 5, plane.size[2] + 7)
    target = ImageGeometry(
        plane.origin + shift, plane.row_direction, plane.column_direction, plane.normal, plane.spacing, size
    )
    old, new = _both_paths(monkeypatch, to_sitk_image(volume, source), source, target, 1e6)
    np.testing.assert_array_equal(new == 1e6, old == 1e6)  # the same samples are outside
    np.testing.assert_allclose(new, old, rtol=2e-7, atol=1e-6)  # float input: 1 ulp where the axis order rounds
    outside = int(np.count_nonzero(new == 1e6))
    assert 0 < outside < new.size


def test_a_grid_off_the_source_axes_is_left_to_simpleitk() -> None:
    source = SOURCES["axial"]
    plane = reformat_module.plane_geometry(source, "coronal")
    turn = _rotation(0, 0, 30)
    turned = ImageGeometry(
        plane.origin,
        turn @ plane.row_direction,
        turn @ plane.column_direction,
        turn @ plane.normal,
        plane.spacing,
        plane.size,
    )
    assert aligned_axes(source, plane) is not None
    assert aligned_axes(source, turned) is None


PHANTOMS = {
    "axial": PhantomSpec(rows=64, columns=64, pixel_spacing=(2.0, 2.0), slice_spacing=3.0, slices=30),
    "oblique": PhantomSpec(
        rows=64, columns=64, pixel_spacing=(2.0, 2.0), slice_spacing=3.0, slices=30, orientation="oblique"
    ),
    "reversed": PhantomSpec(
        rows=64, columns=64, pixel_spacing=(2.0, 2.0), slice_spacing=3.0, slices=30, reverse_order=True
    ),
}


def _write_all(study: object, work: Path, processing: ProcessingConfig) -> dict[str, bytes]:
    masks = compute_mask(study, processing, work)  # type: ignore[arg-type]
    files: dict[str, bytes] = {}
    for kind, plane in (("overlay", "coronal"), ("overlay", "sagittal"), ("color", "coronal"), ("color", "sagittal")):
        for series in write_output(study, masks, kind, plane, processing, work):  # type: ignore[arg-type]
            for path in series.files:
                # colour files carry creation times: their pixels are compared
                data = path.read_bytes() if kind == "overlay" else dcmread(path).PixelData
                files[f"{kind}/{plane}/{path.name}"] = data
    return files


@pytest.mark.parametrize("name", sorted(PHANTOMS))
def test_written_series_are_byte_identical_on_both_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    manifest = write_phantom(PHANTOMS[name], tmp_path / "phantom")
    study = load_study([*manifest.image_files, manifest.rtstruct_file])
    processing = ProcessingConfig(outputs=["overlay", "color"], overlay_groups="per_roi")
    written = {}
    for resampler in ("sitk", "numpy"):
        monkeypatch.setattr(reformat_module, "RESAMPLER", resampler)
        written[resampler] = _write_all(study, tmp_path / resampler, processing)
    assert len(written["numpy"]) > 100  # every slice of four series
    assert written["numpy"].keys() == written["sitk"].keys()
    different = [name for name in written["numpy"] if written["numpy"][name] != written["sitk"][name]]
    assert different == []
