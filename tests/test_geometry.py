"""The image grid: DICOM attributes -> ImageGeometry -> index/patient maps, checked against SimpleITK.

SimpleITK is the independent reference: if our maps and its TransformIndexToPhysicalPoint agree
for oblique, non-square, anisotropic grids, every consumer (rasteriser, NIfTI writer, overlays)
that goes through this module is placed correctly.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from netrt.errors import NetrtError, StudyValidationError
from netrt.geometry import (
    ImageGeometry,
    affine,
    check_slice_spacing,
    geometry_from_sitk,
    geometry_from_slices,
    index_to_patient,
    orientation_vectors,
    patient_to_index,
    slice_positions,
    spatial_order,
    to_sitk_image,
)

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def rotation(deg_x: float, deg_y: float) -> np.ndarray:
    """Rotation by ``deg_x`` about x, then ``deg_y`` about y."""
    ax, ay = np.radians(deg_x), np.radians(deg_y)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return ry @ rx


def oblique_series(n_slices: int = 7, spacing: float = 2.5) -> tuple[list[float], list[list[float]]]:
    """IOP rotated 20 deg about x and 10 deg about y, IPPs stacked along its normal."""
    r = rotation(20, 10)
    iop = [*r[:, 0], *r[:, 1]]
    normal = np.cross(r[:, 0], r[:, 1])
    first = np.array([-120.3, 80.7, -45.2])
    return iop, [list(first + k * spacing * normal) for k in range(n_slices)]


def test_axial_geometry_orders_spacing_and_size_as_x_y_z():
    positions = [[-100.0, -80.0, z] for z in (-10.0, -7.5, -5.0, -2.5)]
    # PixelSpacing is (row spacing, column spacing): 0.8 mm between rows, 0.6 mm between columns.
    geom = geometry_from_slices(positions, AXIAL, [0.8, 0.6], rows=400, columns=512)

    assert geom.spacing == pytest.approx((0.6, 0.8, 2.5))
    assert geom.size == (512, 400, 4)
    assert geom.shape == (4, 400, 512)
    np.testing.assert_allclose(geom.origin, [-100, -80, -10])
    np.testing.assert_allclose(geom.normal, [0, 0, 1])
    # column index moves along x by the column spacing, row index along y by the row spacing
    np.testing.assert_allclose(
        index_to_patient(geom, [[10, 0, 0], [0, 10, 0], [0, 0, 3]]),
        [[-94.0, -80, -10], [-100, -72.0, -10], [-100, -80, -2.5]],
    )


def test_geometry_is_immutable():
    geom = geometry_from_slices([[0, 0, 0], [0, 0, 1]], AXIAL, [1, 1], 4, 4)
    with pytest.raises(ValueError):
        geom.origin[0] = 5.0
    with pytest.raises(AttributeError):
        geom.size = (1, 1, 1)  # type: ignore[misc]


@pytest.mark.parametrize("rows, columns", [(512, 400), (400, 512), (40, 25)])
@pytest.mark.parametrize("oblique", [False, True])
def test_index_maps_agree_with_simpleitk(rows, columns, oblique):
    if oblique:
        iop, positions = oblique_series(n_slices=6, spacing=2.0)
    else:
        iop, positions = AXIAL, [[-200.0, -150.0, 30.0 + 2.5 * k] for k in range(6)]
    geom = geometry_from_slices(positions, iop, [0.98, 0.75], rows=rows, columns=columns)
    image = to_sitk_image(np.zeros(geom.shape, dtype=np.int16), geom)

    assert image.GetSize() == (columns, rows, 6)
    rng = np.random.default_rng(1)
    indices = rng.uniform(-5, [columns + 5, rows + 5, 8], size=(50, 3))
    ours = index_to_patient(geom, indices)
    theirs = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in indices])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    # integer indices too, through SimpleITK's integer API
    for c, r, k in [(0, 0, 0), (columns - 1, 0, 0), (0, rows - 1, 5), (7, 3, 2)]:
        np.testing.assert_allclose(
            index_to_patient(geom, [[c, r, k]])[0], image.TransformIndexToPhysicalPoint((c, r, k)), atol=1e-9
        )
    # and every IPP is the centre of voxel (0, 0, k)
    np.testing.assert_allclose(index_to_patient(geom, [[0, 0, k] for k in range(6)]), positions, atol=1e-9)
    # round trip
    np.testing.assert_allclose(patient_to_index(geom, ours), indices, atol=1e-9)
    # affine = the same map in homogeneous form
    homogeneous = np.c_[indices, np.ones(len(indices))] @ affine(geom).T
    np.testing.assert_allclose(homogeneous[:, :3], ours, atol=1e-9)


def test_array_element_lands_on_its_voxel_in_simpleitk():
    """array[slice, row, col] must be the voxel SimpleITK calls index (col, row, slice): no transpose."""
    iop, positions = oblique_series(n_slices=5)
    geom = geometry_from_slices(positions, iop, [0.5, 0.8], rows=40, columns=25)
    array = np.zeros(geom.shape, dtype=bool)
    array[3, 31, 7] = True
    image = to_sitk_image(array, geom)

    assert image.GetPixelID() == sitk.sitkUInt8
    assert image[7, 31, 3] == 1  # SimpleITK indexes images (x=col, y=row, z=slice)
    point = index_to_patient(geom, [[7, 31, 3]])[0]
    assert image.TransformPhysicalPointToIndex(tuple(point)) == (7, 31, 3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).astype(bool), array)


def test_sitk_round_trip_preserves_geometry():
    iop, positions = oblique_series()
    geom = geometry_from_slices(positions, iop, [0.98, 0.98], rows=64, columns=48)
    back = geometry_from_sitk(to_sitk_image(np.zeros(geom.shape, np.float32), geom))
    assert back.is_close(geom, atol_mm=1e-9)
    assert back.size == geom.size
    np.testing.assert_allclose(back.direction_matrix, geom.direction_matrix, atol=1e-12)


def test_to_sitk_image_rejects_a_transposed_array():
    geom = geometry_from_slices([[0, 0, 0], [0, 0, 2]], AXIAL, [1, 1], rows=40, columns=25)
    with pytest.raises(ValueError, match="does not match"):
        to_sitk_image(np.zeros((2, 25, 40)), geom)


def test_geometry_from_sitk_refuses_left_handed_images():
    image = sitk.Image(4, 4, 3, sitk.sitkUInt8)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    with pytest.raises(StudyValidationError, match="left-handed"):
        geometry_from_sitk(image)


def test_reversed_series_sorts_along_the_normal():
    """Files listed head-to-feet, and an IOP whose normal points to -z, both end up ascending."""
    z = [10.0, 7.5, 5.0, 2.5, 0.0]
    positions = [[0.0, 0.0, v] for v in z]
    order = spatial_order(positions, AXIAL)
    assert list(order) == [4, 3, 2, 1, 0]
    with pytest.raises(StudyValidationError, match="not sorted"):
        geometry_from_slices(positions, AXIAL, [1, 1], 8, 8)
    geom = geometry_from_slices([positions[i] for i in order], AXIAL, [1, 1], 8, 8)
    assert geom.spacing[2] == pytest.approx(2.5)
    np.testing.assert_allclose(geom.origin, [0, 0, 0])

    # columns along +x, rows along -y: normal = x cross -y = -z, so slices ascend towards -z
    flipped = [1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
    np.testing.assert_allclose(slice_positions(positions, flipped), [-10, -7.5, -5, -2.5, 0])
    geom = geometry_from_slices(positions, flipped, [1, 1], 8, 8)
    assert geom.spacing[2] == pytest.approx(2.5)
    np.testing.assert_allclose(geom.normal, [0, 0, -1])
    np.testing.assert_allclose(index_to_patient(geom, [[0, 0, 4], [0, 3, 0]]), [[0, 0, 0], [0, -3, 10]])


def test_orientation_must_be_orthonormal_but_rounding_is_accepted():
    with pytest.raises(StudyValidationError, match="not orthonormal") as info:
        orientation_vectors([1, 0, 0, 0.1, 1, 0])
    assert info.value.tag is not None and "0020,0037" in info.value.tag
    with pytest.raises(StudyValidationError, match="not orthonormal"):
        geometry_from_slices([[0, 0, 0]], [2, 0, 0, 0, 1, 0], [1, 1], 4, 4, slice_thickness=1)
    with pytest.raises(StudyValidationError, match="six finite numbers"):
        orientation_vectors([1, 0, 0, 0, 1])
    # a vendor's 6-digit rounding of an oblique IOP is fine, and is cleaned to exactly orthonormal
    r = rotation(20, 10)
    rounded = [round(float(v), 6) for v in (*r[:, 0], *r[:, 1])]
    row, col, normal = orientation_vectors(rounded)
    matrix = np.column_stack([row, col, normal])
    np.testing.assert_allclose(matrix.T @ matrix, np.eye(3), atol=1e-14)
    np.testing.assert_allclose(matrix, r, atol=1e-5)


def test_a_missing_slice_is_reported_with_its_positions():
    z = [0.0, 2.5, 5.0, 7.5, 12.5, 15.0]  # 10.0 is missing
    report = check_slice_spacing(z)
    assert not report.is_uniform
    assert report.nominal_spacing == pytest.approx(2.5)
    [gap] = report.irregular
    assert (gap.index, gap.position_before, gap.position_after) == (3, 7.5, 12.5)
    assert report.missing_slices(gap) == 1
    with pytest.raises(StudyValidationError) as info:
        geometry_from_slices([[0, 0, v] for v in z], AXIAL, [1, 1], 8, 8)
    message = str(info.value)
    assert "gap of 5.000 mm" in message
    assert "slice 3 at 7.500 mm and slice 4 at 12.500 mm" in message
    assert "1 slice(s) missing" in message
    assert isinstance(info.value, NetrtError)


def test_uneven_and_duplicated_spacing_are_reported():
    uneven = check_slice_spacing([0.0, 2.5, 5.0, 8.0, 10.5, 13.0])
    assert [i.index for i in uneven.irregular] == [2]
    assert "spacing of 3.000 mm" in uneven.describe()

    duplicated = check_slice_spacing([0.0, 2.5, 2.5, 5.0, 7.5])
    assert [i.index for i in duplicated.irregular] == [1]
    assert "share one position" in duplicated.describe()

    # slowly growing spacing: every interval within 2 %, but the stack drifts off a regular grid
    drifting = check_slice_spacing(np.cumsum([0.0] + [2.5 + 0.04 * k / 40 for k in range(40)]))
    assert not drifting.irregular
    assert not drifting.is_uniform
    assert "drift" in drifting.describe()


def test_sub_micron_jitter_is_uniform_and_averaged():
    rng = np.random.default_rng(0)
    z = 2.0 * np.arange(50) + rng.uniform(-0.004, 0.004, 50)
    report = check_slice_spacing(z)
    assert report.is_uniform
    geom = geometry_from_slices([[0, 0, v] for v in z], AXIAL, [1, 1], 8, 8)
    assert geom.spacing[2] == pytest.approx((z[-1] - z[0]) / 49)


def test_sheared_stack_is_refused():
    positions = [[0.3 * k, 0.0, 2.5 * k] for k in range(5)]  # gantry tilt: x shifts per slice
    with pytest.raises(StudyValidationError, match="not stacked along the slice normal"):
        geometry_from_slices(positions, AXIAL, [1, 1], 8, 8)


def test_single_slice_needs_a_thickness():
    with pytest.raises(StudyValidationError, match="SliceThickness"):
        geometry_from_slices([[0, 0, 0]], AXIAL, [1, 1], 8, 8)
    geom = geometry_from_slices([[0, 0, 0]], AXIAL, [1, 1], 8, 8, slice_thickness=3.0)
    assert geom.spacing == (1.0, 1.0, 3.0)
    assert geom.size == (8, 8, 1)


@pytest.mark.parametrize("spacing", [[1.0], [0.0, 1.0], [1.0, -1.0], [float("nan"), 1.0]])
def test_bad_pixel_spacing_is_refused(spacing):
    with pytest.raises(StudyValidationError, match=r"PixelSpacing|positive"):
        geometry_from_slices([[0, 0, 0], [0, 0, 1]], AXIAL, spacing, 8, 8)


def test_image_geometry_validates_direct_construction():
    with pytest.raises(ValueError, match="normal"):
        ImageGeometry(
            np.zeros(3),
            np.array([1.0, 0, 0]),
            np.array([0, 1.0, 0]),
            np.array([0, 0, -1.0]),
            (1.0, 1.0, 1.0),
            (2, 2, 2),
        )
    with pytest.raises(ValueError, match="spacing"):
        ImageGeometry(
            np.zeros(3),
            np.array([1.0, 0, 0]),
            np.array([0, 1.0, 0]),
            np.array([0, 0, 1.0]),
            (1.0, -1.0, 1.0),
            (2, 2, 2),
        )
