"""Coronal/sagittal reformats: grid rules, image interpolation and mask accuracy vs analytic solids."""

from __future__ import annotations

import numpy as np
import pytest

from netrt.errors import NetrtError
from netrt.geometry import ImageGeometry, index_to_patient, patient_to_index
from netrt.phantom import PhantomSpec, phantom_geometry, roi_contains, truth_masks
from netrt.reformat import (
    PLANES,
    _resample_mask,
    mask_slabs,
    plane_geometry,
    prepare_mask,
    prepare_source,
    reformat,
    reformat_planes,
    reformat_slabs,
)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _geometry(
    rotation: np.ndarray | None = None,
    spacing: tuple[float, float, float] = (0.98, 0.98, 2.5),
    size: tuple[int, int, int] = (40, 30, 12),
    origin: tuple[float, float, float] = (-20.3, 11.7, 95.1),
) -> ImageGeometry:
    r = np.eye(3) if rotation is None else rotation
    return ImageGeometry(np.array(origin), r[:, 0], r[:, 1], r[:, 2], spacing, size)


def _from_phantom(spec: PhantomSpec) -> ImageGeometry:
    g = phantom_geometry(spec)
    return ImageGeometry(
        np.array(g.origin), np.array(g.row_direction), np.array(g.column_direction), np.array(g.slice_normal),
        g.spacing, g.size,
    )  # fmt: skip


def _centres(geom: ImageGeometry) -> np.ndarray:
    """Patient coordinates of every voxel centre, shape (slices, rows, cols, 3)."""
    k, i, j = np.indices(geom.shape)
    idx = np.stack([j.ravel(), i.ravel(), k.ravel()], axis=1)
    return index_to_patient(geom, idx).reshape((*geom.shape, 3))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


SOURCES = {
    "axial": _geometry(),
    "oblique": _geometry(_rotation(20, 10, 5)),
    "feet-first normal": _geometry(np.diag([1.0, -1.0, -1.0])),  # N = (0, 0, -1)
    "anisotropic in-plane": _geometry(_rotation(-15, 0, 30), spacing=(0.7, 1.1, 3.0)),
}


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_plane_geometry_is_right_handed_head_up_and_within_the_data(name: str, plane: str) -> None:
    source = SOURCES[name]
    target = plane_geometry(source, plane)
    matrix = target.direction_matrix
    assert np.allclose(matrix.T @ matrix, np.eye(3), atol=1e-9)
    assert np.allclose(np.cross(target.row_direction, target.column_direction), target.normal, atol=1e-9)
    assert np.linalg.det(matrix) > 0
    step = min(source.spacing)
    assert target.spacing == pytest.approx((step, step, step))
    # Planes live in the source frame: the row direction is a source axis, the column direction
    # is the source normal pointing to the feet, the slices step along the remaining source axis.
    row_axis = source.row_direction if plane == "coronal" else source.column_direction
    slice_axis = source.column_direction if plane == "coronal" else source.row_direction
    assert np.allclose(target.row_direction, row_axis)
    assert abs(float(target.column_direction @ source.normal)) == pytest.approx(1.0)
    assert target.column_direction[2] <= 0  # increasing row index never goes towards the head
    assert abs(float(target.normal @ slice_axis)) == pytest.approx(1.0)

    # Every output voxel centre lies inside the box of source voxel centres ...
    corners = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], float)
    corners *= np.asarray(target.size) - 1
    in_source = patient_to_index(source, index_to_patient(target, corners))
    assert np.all(in_source >= -1e-6)
    assert np.all(in_source <= np.asarray(source.size) - 1 + 1e-6)
    # ... and the grid covers that box up to less than one output step on each axis.
    covered = (np.asarray(target.size) - 1) * step
    extents = (np.asarray(source.size) - 1) * np.asarray(source.spacing)
    for axis, direction in enumerate((target.row_direction, target.column_direction, target.normal)):
        source_axis = int(np.argmax(np.abs(source.direction_matrix.T @ direction)))
        assert extents[source_axis] - step < covered[axis] <= extents[source_axis] + 1e-6


def test_axial_source_gives_the_textbook_orientations() -> None:
    source = SOURCES["axial"]
    coronal = plane_geometry(source, "coronal")
    sagittal = plane_geometry(source, "sagittal")
    assert np.allclose([*coronal.row_direction, *coronal.column_direction], [1, 0, 0, 0, 0, -1])
    assert np.allclose([*sagittal.row_direction, *sagittal.column_direction], [0, 1, 0, 0, 0, -1])
    # Coronal: 40 columns along x (0.98 mm, same samples), 30 coronal slices (the source rows) and
    # floor(11 * 2.5 / 0.98) + 1 = 29 rows along z, centred in the 27.5 mm of slice centres.
    assert coronal.size == (40, 29, 30)
    assert sagittal.size == (30, 29, 40)
    top = index_to_patient(coronal, [[0, 0, 0]])[0]
    margin = (27.5 - 28 * 0.98) / 2
    assert top == pytest.approx([-20.3, 11.7, 95.1 + 27.5 - margin])


def test_axial_plane_is_the_source_itself() -> None:
    source = SOURCES["oblique"]
    assert plane_geometry(source, "axial") is source
    volume = np.random.default_rng(1).normal(size=source.shape).astype(np.float32)
    mask = volume > 1
    result = reformat(volume, mask, source, "axial")
    assert result.geometry is source
    assert np.shares_memory(result.image, volume) and np.shares_memory(result.mask, mask)


def test_spacing_override_and_bad_arguments() -> None:
    source = SOURCES["axial"]
    target = plane_geometry(source, "sagittal", spacing_mm=2.0)
    assert target.spacing == (2.0, 2.0, 2.0)
    assert target.size == (15, 14, 20)  # floor(29*0.98/2)+1, floor(27.5/2)+1, floor(39*0.98/2)+1
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(NetrtError, match="spacing"):
            plane_geometry(source, "coronal", spacing_mm=bad)
    with pytest.raises(NetrtError, match="transverse"):
        plane_geometry(source, "transverse")
    with pytest.raises(ValueError, match="shape"):
        reformat(np.zeros((3, 3, 3)), np.zeros(source.shape, bool), source, "coronal")
    assert PLANES == ("axial", "coronal", "sagittal")


@pytest.mark.parametrize("name", ["oblique", "anisotropic in-plane"])
@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_linear_interpolation_reproduces_a_linear_field(name: str, plane: str) -> None:
    """Trilinear interpolation is exact on linear functions: any misplaced sample shows up."""
    source = SOURCES[name]
    gradient, offset = np.array([0.7, -1.3, 2.1]), 40.0
    volume = (_centres(source) @ gradient + offset).astype(np.float32)
    result = reformat(volume, np.zeros(source.shape, bool), source, plane)
    expected = _centres(result.geometry) @ gradient + offset
    assert result.image.dtype == np.float32
    assert result.image.shape == result.geometry.shape
    np.testing.assert_allclose(result.image, expected, atol=2e-3)


def _sphere_case(rotation: np.ndarray | None) -> tuple[ImageGeometry, np.ndarray, np.ndarray, float]:
    source = _geometry(rotation, size=(64, 56, 24))
    centre = index_to_patient(source, [[31.3, 27.6, 11.4]])[0]
    return source, centre, _centres(source), 14.0


@pytest.mark.parametrize("rotation", [None, _rotation(20, 10, 0)], ids=["axial", "oblique"])
@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_reformatted_sphere_matches_the_analytic_sphere(rotation: np.ndarray | None, plane: str) -> None:
    source, centre, points, radius = _sphere_case(rotation)
    mask = np.linalg.norm(points - centre, axis=-1) < radius
    result = reformat(np.zeros(source.shape, np.float32), mask, source, plane)
    truth = np.linalg.norm(_centres(result.geometry) - centre, axis=-1) < radius
    distance_dice = _dice(result.mask, truth)
    assert distance_dice >= 0.95
    # The reason for the distance map: it beats the 0/1 linear interpolation (a staircase between
    # the 2.5 mm slices) on the same data.
    linear_dice = _dice(_resample_mask(mask, source, result.geometry, "linear"), truth)
    assert distance_dice > linear_dice + 0.003


def test_samples_half_way_between_slices_are_decided_the_same_way_every_time() -> None:
    """1.5 mm samples over 2 mm slices land exactly on slice midpoints; round-off of the geometry
    (a DS-rounded IPP differs by ~1e-12 mm) must not move the mask's face by a whole voxel."""
    mask = np.zeros((12, 20, 20), bool)
    mask[:6, 5:15, 5:15] = True  # face half-way between slice 5 (z = 10) and slice 6 (z = 12)
    results = []
    for dz in (0.0, 1e-11, -1e-11):
        source = _geometry(spacing=(1.5, 1.5, 2.0), size=(20, 20, 12), origin=(0.0, 0.0, dz))
        result = reformat(np.zeros(source.shape, np.float32), mask, source, "coronal")
        results.append(result.mask)
        z = index_to_patient(result.geometry, [[0, r, 0] for r in range(result.geometry.size[1])])[:, 2]
        tie_row = int(np.argmin(np.abs(z - 11.0)))
        assert abs(z[tie_row] - 11.0) < 1e-9  # the grid really has a sample on the midpoint
        assert result.mask[10, tie_row, 10]  # ties count as inside
        assert not result.mask[10, tie_row - 1, 10]  # 12.5 mm: outside
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_empty_and_full_masks() -> None:
    source = SOURCES["oblique"]
    volume = np.zeros(source.shape, np.float32)
    empty = reformat(volume, np.zeros(source.shape, bool), source, "coronal")
    assert empty.mask.dtype == np.bool_ and not empty.mask.any()
    full = reformat(volume, np.ones(source.shape, bool), source, "sagittal")
    assert full.mask.all()


def test_reformat_planes_shares_work_and_agrees_with_reformat() -> None:
    source, centre, points, radius = _sphere_case(_rotation(0, 15, 0))
    mask = np.linalg.norm(points - centre, axis=-1) < radius
    volume = (points[..., 2] * 3.0).astype(np.float32)
    results = list(reformat_planes(volume, mask, source, ["sagittal", "axial", "coronal"]))
    assert [r.plane for r in results] == ["sagittal", "axial", "coronal"]
    for result in results:
        single = reformat(volume, mask, source, result.plane)
        assert result.geometry.is_close(single.geometry)
        np.testing.assert_array_equal(result.image, single.image)
        np.testing.assert_array_equal(result.mask, single.mask)


@pytest.mark.slow
@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_phantom_rois_reformat_with_dice_above_095(orientation: str) -> None:
    """Every phantom ROI (0.98 x 0.98 x 2.5 mm source), judged against the solid itself.

    201 rows, not 200: with an even row count at 0.98 mm the box's anterior face (v = -38.71 mm
    = -39.5 x 0.98) lies exactly on a row of voxel centres, so its analytic truth flips with
    float round-off between grids and the box loses 0.015 Dice to a tie, not to the reformat.
    """
    spec = PhantomSpec(
        rows=201, columns=256, pixel_spacing=(0.98, 0.98), slice_spacing=2.5, slices=40,
        orientation=orientation, extra_spheres=1,
    )  # fmt: skip
    source = _from_phantom(spec)
    masks = truth_masks(spec)
    for plane in ("coronal", "sagittal"):
        target = plane_geometry(source, plane)
        points = _centres(target)
        for name in ("sphere", "box", "hollow_sphere", "torus", "sphere_2"):
            result = _resample_mask(masks[name], source, target)
            truth = roi_contains(spec, name, points)
            assert _dice(result, truth) >= 0.95, (orientation, plane, name, _dice(result, truth))


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_a_mask_given_inside_its_box_reformats_exactly_like_the_whole_grid_mask(plane: str) -> None:
    """Per-ROI masks are kept cut to their bounding boxes (netrt.outputs.rois.RoiBox); preparing one
    from its box, and resampling it beside the image as a layer, gives the very voxels of the
    whole-grid mask, also when the box touches the grid's edge (the margin is clipped there)."""
    source, centre, points, radius = _sphere_case(_rotation(0, 15, 0))
    whole = np.linalg.norm(points - centre, axis=-1) < radius
    edge = np.zeros(source.shape, bool)
    edge[:3, :5, -4:] = True  # touches three faces of the grid
    volume = np.zeros(source.shape, np.float32)
    target = plane_geometry(source, plane)
    for mask in (whole, edge):
        k, i, j = (np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
        box = (slice(k[0], k[-1] + 2), slice(i[0], i[-1] + 1), slice(j[0], j[-1] + 1))
        from_box = prepare_mask(mask[box], source, within=box)
        prepared = prepare_source(volume, mask, source, layers=[from_box, prepare_mask(mask, source)])
        slabs = list(reformat_slabs(prepared, target))
        merged = np.concatenate([s.mask for s in slabs])
        assert merged.any()
        for layer in range(2):
            np.testing.assert_array_equal(np.concatenate([s.layers[layer] for s in slabs]), merged)
        np.testing.assert_array_equal(np.concatenate(list(mask_slabs(from_box, target))), merged)
    with pytest.raises(ValueError, match="does not fill the box"):
        prepare_mask(whole[:2], source, within=(slice(0, 3), slice(None, source.shape[1]), slice(0, source.shape[2])))


def test_slices_holding_answers_blank_slabs_without_reading_them_and_reads_the_rest() -> None:
    from netrt.reformat import _blank, slices_holding

    empty, full = _blank((3, 4, 5), False), _blank((3, 4, 5), True)
    assert not empty.flags.writeable and _blank((3, 4, 5), False) is empty  # made once, shared, read-only
    assert slices_holding(empty).tolist() == [False, False, False]
    assert slices_holding(full).tolist() == [True, True, True]
    mask = np.zeros((3, 4, 5), dtype=bool)
    mask[1, 2, 3] = True
    assert slices_holding(mask).tolist() == [False, True, False]
    assert slices_holding(np.ones((3, 4, 5), dtype=bool)[:, ::2]).tolist() == [True, True, True]  # a strided one
