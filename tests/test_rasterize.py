"""Contours -> masks: the pixel-centre rule, the half-open edge rule, even-odd XOR, and geometry.

Every expected mask here is written down voxel by voxel or computed by an independent brute-force
crossing test, so a change in the rule (half-voxel growth, a transposed grid, a lost hole) fails.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from netrt import rasterize as rasterize_module
from netrt.errors import RoiError
from netrt.geometry import ImageGeometry, geometry_from_slices, index_to_patient, to_sitk_image
from netrt.masks import RoiContours, merge_rois, roi_mask
from netrt.rasterize import (
    fill_polygons,
    geometric_type_skip_reason,
    rasterize_contours,
)

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def axial_geometry(
    rows: int,
    columns: int,
    slices: int,
    *,
    pixel: tuple[float, float] = (1.0, 1.0),
    slice_spacing: float = 1.0,
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> ImageGeometry:
    """``pixel`` is DICOM PixelSpacing: (row spacing, column spacing)."""
    x, y, z = origin
    positions = [[x, y, z + k * slice_spacing] for k in range(slices)]
    return geometry_from_slices(positions, AXIAL, list(pixel), rows, columns, slice_thickness=slice_spacing)


def rectangle(x0: float, x1: float, y0: float, y1: float, z: float) -> np.ndarray:
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=float)


def circle(cx: float, cy: float, radius: float, z: float, n: int = 500) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.c_[cx + radius * np.cos(t), cy + radius * np.sin(t), np.full(n, z)]


def in_index_space(geom: ImageGeometry, polygon_col_row: list[tuple[float, float]], k: float) -> np.ndarray:
    """Patient points of a polygon given in (col, row) indices on slice index ``k``."""
    idx = np.array([[c, r, k] for c, r in polygon_col_row], dtype=float)
    return index_to_patient(geom, idx)


def reference_even_odd(polygons: list[np.ndarray], rows: int, columns: int) -> np.ndarray:
    """Independent PNPOLY crossing test at every pixel centre (exact for integer vertices)."""
    yy, xx = np.mgrid[0:rows, 0:columns].astype(float)
    inside = np.zeros((rows, columns), dtype=bool)
    for poly in polygons:
        for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
            if y0 == y1:
                continue
            spans = (y0 > yy) != (y1 > yy)
            x_cross = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
            inside ^= spans & (xx < x_cross)
    return inside


# ---- the pixel-centre rule ---------------------------------------------------------------------


def test_square_between_voxel_centres_gives_exactly_its_voxels():
    geom = axial_geometry(10, 12, 3)
    result = rasterize_contours([rectangle(1.5, 5.5, 2.5, 4.5, z=1.0)], geom, "square")

    expected = np.zeros(geom.shape, dtype=bool)
    expected[1, 3:5, 2:6] = True  # rows 3-4, columns 2-5 on slice 1
    np.testing.assert_array_equal(result.mask, expected)
    assert result.contours_used == 1
    assert result.skipped == []


def test_edges_through_voxel_centres_are_half_open_left_and_top():
    """Centres on the left/top edge are in, on the right/bottom edge out; shared edges split cleanly."""
    geom = axial_geometry(10, 12, 1)
    left = rasterize_contours([rectangle(2, 5, 2, 6, 0)], geom, "left").mask[0]
    right = rasterize_contours([rectangle(5, 8, 2, 6, 0)], geom, "right").mask[0]

    expected_left = np.zeros((10, 12), dtype=bool)
    expected_left[2:6, 2:5] = True
    np.testing.assert_array_equal(left, expected_left)
    assert not (left & right).any()  # column 5 goes to exactly one of them
    both = rasterize_contours([rectangle(2, 5, 2, 6, 0), rectangle(5, 8, 2, 6, 0)], geom, "both").mask[0]
    whole = rasterize_contours([rectangle(2, 8, 2, 6, 0)], geom, "whole").mask[0]
    np.testing.assert_array_equal(both, whole)
    np.testing.assert_array_equal(both, left | right)


def test_orientation_and_order_of_points_do_not_matter():
    geom = axial_geometry(30, 30, 1)
    poly = circle(14.3, 15.1, 9.7, 0, n=37)
    forward = rasterize_contours([poly], geom, "ccw").mask
    backward = rasterize_contours([poly[::-1]], geom, "cw").mask
    rolled = rasterize_contours([np.roll(poly, 11, axis=0)], geom, "rolled").mask
    closed = rasterize_contours([np.vstack([poly, poly[:1]])], geom, "repeated first point").mask
    np.testing.assert_array_equal(forward, backward)
    np.testing.assert_array_equal(forward, rolled)
    np.testing.assert_array_equal(forward, closed)


@pytest.mark.parametrize("seed", range(6))
def test_random_polygons_match_a_brute_force_crossing_test(seed):
    """Integer and half-integer vertices put many centres exactly on edges and vertices."""
    rng = np.random.default_rng(seed)
    rows, columns = 23, 31
    polygons = [
        rng.integers(-4, [columns + 4, rows + 4], size=(rng.integers(3, 12), 2)).astype(float) for _ in range(3)
    ]
    polygons += [rng.integers(-8, [2 * columns + 8, 2 * rows + 8], size=(9, 2)) / 2.0]
    polygons += [rng.uniform(-3, [columns + 3, rows + 3], size=(15, 2))]
    expected = reference_even_odd(polygons, rows, columns)
    np.testing.assert_array_equal(fill_polygons(polygons, rows, columns), expected)


def test_self_intersecting_star_is_filled_even_odd():
    t = np.pi / 2 + np.arange(5) * 4 * np.pi / 5  # pentagram: every second vertex
    star = np.c_[20 + 15 * np.cos(t), 20 + 15 * np.sin(t)]
    mask = fill_polygons([star], 41, 41)
    assert not mask[20, 20]  # the central pentagon is covered twice -> outside
    assert mask[20 + 11, 20]  # in the arm that points to +row (vertex at angle 90 deg)
    assert not mask[20 - 11, 20]  # between the two arms on the other side
    np.testing.assert_array_equal(mask, reference_even_odd([star], 41, 41))


def test_circle_area_within_half_a_percent_on_a_fine_grid():
    geom = axial_geometry(200, 200, 1, pixel=(0.25, 0.25))
    radius = 20.0
    mask = rasterize_contours([circle(25.13, 24.87, radius, 0, n=720)], geom, "circle").mask
    area = mask.sum() * 0.25 * 0.25
    assert area == pytest.approx(np.pi * radius**2, rel=0.005)


def test_no_half_voxel_growth_on_a_coarse_grid():
    """rt-utils' OpenCV fill grows every edge by ~half a voxel: +10 % here. The centre rule is unbiased."""
    geom = axial_geometry(40, 40, 1)
    rng = np.random.default_rng(7)
    errors = []
    for cx, cy in rng.uniform(18, 22, size=(40, 2)):
        mask = rasterize_contours([circle(cx, cy, 10.0, 0, n=360)], geom, "c").mask
        errors.append(mask.sum() / (np.pi * 100.0) - 1)
    assert abs(np.mean(errors)) < 0.005
    assert max(abs(e) for e in errors) < 0.04


# ---- even-odd combination ----------------------------------------------------------------------


def test_ring_has_its_hole():
    geom = axial_geometry(60, 60, 2, pixel=(0.5, 0.5), slice_spacing=3.0)
    outer, inner = circle(15, 15, 10, 3.0), circle(15, 15, 4, 3.0)
    result = rasterize_contours([outer, inner], geom, "ring")

    mask = result.mask
    assert result.contours_used == 2
    assert not mask[0].any()
    assert not mask[1, 30, 30]  # centre (15 mm, 15 mm) is in the hole
    assert mask[1, 30, 30 + 14]  # 7 mm from the centre: in the ring
    assert not mask[1, 30, 30 + 21]  # 10.5 mm: outside
    area = mask.sum() * 0.25
    assert area == pytest.approx(np.pi * (10**2 - 4**2), rel=0.01)
    # an island inside the hole is filled again
    island = rasterize_contours([outer, inner, circle(15, 15, 1.6, 3.0)], geom, "island").mask
    assert island[1, 30, 30]


def test_overlapping_contours_on_one_slice_xor():
    geom = axial_geometry(12, 12, 1)
    a, b = rectangle(1.5, 6.5, 1.5, 6.5, 0), rectangle(4.5, 9.5, 3.5, 8.5, 0)
    mask = rasterize_contours([a, b], geom, "overlap").mask[0]

    only_a = np.zeros((12, 12), dtype=bool)
    only_a[2:7, 2:7] = True
    only_b = np.zeros((12, 12), dtype=bool)
    only_b[4:9, 5:10] = True
    np.testing.assert_array_equal(mask, only_a ^ only_b)
    assert not mask[5, 5]  # in both -> out
    assert mask[2, 2] and mask[8, 9]


def test_a_repeated_contour_is_skipped_not_xored_away():
    geom = axial_geometry(12, 12, 2)
    square = rectangle(1.5, 6.5, 1.5, 6.5, 1)
    repeats = [square.copy(), np.roll(square, 1, axis=0), square[::-1], np.vstack([square, square[:1]])]
    result = rasterize_contours([square, *repeats, square + np.array([0, 0, -1.0])], geom, "twice")
    assert [s.index for s in result.skipped] == [1, 2, 3, 4]
    assert all("repeats contour 0 on slice 1" in s.reason for s in result.skipped)
    assert result.contours_used == 2
    assert result.mask[1].sum() == 25 and result.mask[0].sum() == 25
    # a different outline that merely overlaps still XORs
    inner = rasterize_contours([square, rectangle(1.5, 6.5, 1.5, 5.5, 1)], geom, "inner").mask
    assert inner[1].sum() == 5


def test_contours_on_different_slices_do_not_interact():
    geom = axial_geometry(12, 12, 3)
    a, b = rectangle(1.5, 6.5, 1.5, 6.5, 0), rectangle(1.5, 6.5, 1.5, 6.5, 2)
    mask = rasterize_contours([a, b], geom, "two slices").mask
    assert mask[0].sum() == 25 and mask[2].sum() == 25 and not mask[1].any()


# ---- geometry ----------------------------------------------------------------------------------


def test_non_square_grid_is_not_transposed():
    """40 rows x 25 columns, anisotropic pixels: the rectangle lands on rows 30-35, columns 3-6."""
    # PixelSpacing (row spacing 0.5, column spacing 0.8); origin = centre of voxel (0, 0)
    geom = axial_geometry(40, 25, 2, pixel=(0.5, 0.8), origin=(-10.0, -20.0, 0.0))
    x0, x1 = -10 + 0.8 * 2.5, -10 + 0.8 * 6.5
    y0, y1 = -20 + 0.5 * 29.5, -20 + 0.5 * 35.5
    result = rasterize_contours([rectangle(x0, x1, y0, y1, z=1.0)], geom, "off-centre")

    assert result.mask.shape == (2, 40, 25)
    expected = np.zeros((2, 40, 25), dtype=bool)
    expected[1, 30:36, 3:7] = True
    np.testing.assert_array_equal(result.mask, expected)
    # SimpleITK agrees on where those voxels are
    image = to_sitk_image(result.mask, geom)
    assert image[3, 30, 1] == 1 and image[6, 35, 1] == 1
    centre = ((x0 + x1) / 2, (y0 + y1) / 2, 1.0)
    c, r, k = image.TransformPhysicalPointToIndex(centre)
    assert result.mask[k, r, c]


def oblique_geometry(rows: int = 30, columns: int = 24, slices: int = 6) -> ImageGeometry:
    ax, ay = np.radians(20), np.radians(10)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    r = ry @ rx
    normal = np.cross(r[:, 0], r[:, 1])
    first = np.array([-83.1, 41.7, -12.9])
    positions = [first + k * 2.2 * normal for k in range(slices)]
    return geometry_from_slices(positions, [*r[:, 0], *r[:, 1]], [0.7, 0.9], rows, columns)


L_VOXELS = [(r, c) for r in range(5, 8) for c in range(4, 10)] + [(r, c) for r in range(8, 15) for c in range(4, 7)]


@pytest.mark.parametrize(
    "outline",
    [
        # around the voxels, through voxel corners: no centre is near an edge
        [(3.5, 4.5), (9.5, 4.5), (9.5, 7.5), (6.5, 7.5), (6.5, 14.5), (3.5, 14.5)],
        # through voxel centres: the half-open rule keeps the top/left centres and drops bottom/right
        [(4, 5), (10, 5), (10, 8), (7, 8), (7, 15), (4, 15)],
    ],
    ids=["corners", "centres"],
)
def test_oblique_contour_maps_back_to_its_voxels(outline):
    geom = oblique_geometry()
    expected = np.zeros(geom.shape, dtype=bool)
    for r, c in L_VOXELS:
        expected[3, r, c] = True
    points = in_index_space(geom, outline, k=3)
    assert not np.allclose(points[:, 2], points[0, 2])  # genuinely oblique in patient z

    result = rasterize_contours([points], geom, "L")
    np.testing.assert_array_equal(result.mask, expected)
    # a contour drawn 0.2 slice spacings off its plane still belongs to slice 3
    shifted = points + 0.2 * geom.spacing[2] * geom.normal
    np.testing.assert_array_equal(rasterize_contours([shifted], geom, "L").mask, expected)


def test_oblique_circle_matches_simpleitk_placement():
    """Each mask voxel's physical centre, according to SimpleITK, is inside the circle (in its plane)."""
    geom = oblique_geometry(rows=60, columns=50)
    centre_idx = np.array([24.3, 28.9, 2.0])
    centre = index_to_patient(geom, centre_idx[None])[0]
    t = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    radius = 12.0
    ring = centre + radius * (np.outer(np.cos(t), geom.row_direction) + np.outer(np.sin(t), geom.column_direction))
    mask = rasterize_contours([ring], geom, "oblique circle").mask
    image = to_sitk_image(mask, geom)

    k, rows, cols = np.nonzero(mask)
    assert set(k.tolist()) == {2}
    distances = [
        np.linalg.norm(np.array(image.TransformIndexToPhysicalPoint((int(c), int(r), 2))) - centre)
        for r, c in zip(rows, cols, strict=True)
    ]
    assert max(distances) < radius
    assert mask.sum() * geom.spacing[0] * geom.spacing[1] == pytest.approx(np.pi * radius**2, rel=0.02)
    assert sitk.GetArrayViewFromImage(image).sum() == mask.sum()


@pytest.mark.parametrize("listed_descending", [False, True])
def test_reversed_axes_and_descending_slices(listed_descending):
    """Columns along -x and slices towards -z (normal = -z): the index grid runs backwards in patient space."""
    iop = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]  # (-1,0,0) x (0,1,0) = (0,0,-1)
    z = [20.0 - 2.5 * k for k in range(6)]  # ascending along the normal = descending z
    positions = [[100.0, 0.0, v] for v in z]
    if listed_descending:  # as some files arrive; sorting along the normal restores the order
        positions = positions[::-1]
        order = np.argsort([np.dot(p, [0, 0, -1]) for p in positions])
        positions = [positions[i] for i in order]
    geom = geometry_from_slices(positions, iop, [1.0, 1.0], 20, 16)
    assert geom.spacing[2] == pytest.approx(2.5)

    # x from 94.5 to 97.5 mm -> columns 3-5 (column c sits at x = 100 - c); z = 15 -> slice 2
    result = rasterize_contours([rectangle(94.5, 97.5, 10.5, 12.5, z=15.0)], geom, "reversed")
    expected = np.zeros(geom.shape, dtype=bool)
    expected[2, 11:13, 3:6] = True
    np.testing.assert_array_equal(result.mask, expected)


def test_block_splitting_does_not_change_the_mask(monkeypatch):
    """Large ROIs are filled in blocks of rows; the block boundary must not show in the mask."""
    geom = axial_geometry(64, 64, 6)
    contours = [circle(31.2, 30.7, 25.0, k) for k in range(6)] + [circle(31.2, 30.7, 9.0, 3)]
    whole = rasterize_contours(contours, geom, "whole").mask
    monkeypatch.setattr(rasterize_module, "_MAX_BLOCK_CELLS", 300)  # ~4 rows per block
    blocked = rasterize_contours(contours, geom, "blocked").mask
    np.testing.assert_array_equal(blocked, whole)
    assert whole.sum() > 6 * 1900


def test_contour_partly_outside_the_image_is_clipped():
    geom = axial_geometry(8, 10, 1)
    result = rasterize_contours([rectangle(-30.5, 2.5, 5.5, 40.5, 0)], geom, "clipped")
    expected = np.zeros((1, 8, 10), dtype=bool)
    expected[0, 6:8, 0:3] = True
    np.testing.assert_array_equal(result.mask, expected)
    assert result.contours_used == 1


# ---- what is skipped ---------------------------------------------------------------------------


def test_unplaceable_contours_are_skipped_and_reported():
    geom = axial_geometry(12, 12, 5, slice_spacing=2.5)  # slices at z = 0, 2.5, ..., 10
    square = rectangle(1.5, 4.5, 1.5, 4.5, 0)
    tilted = square.copy()
    tilted[:, 2] = [4.0, 4.0, 6.0, 6.0]
    contours = [
        square + np.array([0, 0, 5.0]),  # 0: slice 2, used
        square + np.array([0, 0, 6.25]),  # 1: half-way between slices 2 and 3
        square + np.array([0, 0, -5.0]),  # 2: slice index -2
        square + np.array([0, 0, 12.5]),  # 3: slice index 5 of 5
        square[:2] + np.array([0, 0, 5.0]),  # 4: two points
        tilted,  # 5: spans 2 mm along the normal
        np.array([[1.0, 1.0, 5.0], [np.nan, 2.0, 5.0], [3.0, 1.0, 5.0]]),  # 6: NaN
        square + np.array([1000.0, 0, 7.5]),  # 7: far off the image in-plane
        np.zeros((0, 3)),  # 8: empty
        square + np.array([5.0, 5.0, 10.5]),  # 9: 0.2 slice spacings above slice 4: used
    ]
    result = rasterize_contours(contours, geom, "messy")

    reasons = {s.index: s.reason for s in result.skipped}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "between slices 2 and 3" in reasons[1]
    assert "outside the volume" in reasons[2] and "outside the volume" in reasons[3]
    assert "2 point(s)" in reasons[4]
    assert "not parallel" in reasons[5] and "2.000 mm" in reasons[5]
    assert "non-finite" in reasons[6]
    assert "outside the image in-plane" in reasons[7]
    assert "0 point(s)" in reasons[8]
    assert result.contours_used == 2

    expected = np.zeros(geom.shape, dtype=bool)
    expected[2, 2:5, 2:5] = True
    expected[4, 7:10, 7:10] = True
    np.testing.assert_array_equal(result.mask, expected)


def test_nothing_usable_gives_an_empty_mask():
    geom = axial_geometry(6, 7, 2)
    result = rasterize_contours([np.zeros((2, 3))], geom, "empty")
    assert result.mask.shape == (2, 6, 7) and not result.mask.any()
    assert result.contours_used == 0 and len(result.skipped) == 1
    assert rasterize_contours([], geom, "none").mask.shape == (2, 6, 7)


def test_malformed_contour_array_raises_roi_error_naming_the_roi():
    geom = axial_geometry(6, 6, 1)
    with pytest.raises(RoiError, match=r"'PTV 70'.*contour 1") as info:
        rasterize_contours([rectangle(1, 2, 1, 2, 0), np.zeros((4, 2))], geom, "PTV 70")
    assert info.value.roi_name == "PTV 70"


def test_geometric_type_rule():
    assert geometric_type_skip_reason("CLOSED_PLANAR") is None
    assert geometric_type_skip_reason("CLOSEDPLANAR_XOR") is None
    assert "no area" in (geometric_type_skip_reason("POINT") or "")
    assert "no inside" in (geometric_type_skip_reason("OPEN_PLANAR") or "")
    assert "no inside" in (geometric_type_skip_reason("OPEN_NONPLANAR") or "")
    assert "unknown" in (geometric_type_skip_reason("BLOB") or "")


# ---- real-world contours (issue 18 item 2) -----------------------------------------------------


def test_xor_type_in_both_spellings_is_filled_by_the_same_even_odd_rule():
    assert geometric_type_skip_reason("CLOSED_PLANAR_XOR") is None
    geom = axial_geometry(30, 30, 1)
    outer, hole = rectangle(2.5, 20.5, 2.5, 20.5, 0), rectangle(6.5, 12.5, 6.5, 12.5, 0)
    planar = roi_mask(RoiContours(1, "ring", (outer, hole), ("CLOSED_PLANAR", "CLOSED_PLANAR")), geom)
    for kinds in [("CLOSEDPLANAR_XOR",) * 2, ("CLOSED_PLANAR_XOR",) * 2, ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR")]:
        mask, used, skipped = roi_mask(RoiContours(1, "ring", (outer, hole), kinds), geom)
        assert used == 2 and skipped == [], kinds
        np.testing.assert_array_equal(mask, planar[0])
    expected = np.zeros((30, 30), dtype=bool)
    expected[3:21, 3:21] = True
    expected[7:13, 7:13] = False
    np.testing.assert_array_equal(planar[0][0], expected)


def test_points_up_to_a_quarter_slice_off_the_plane_stay_on_their_slice():
    """Float exports scatter points 0.01-0.2 mm off the plane: on 1 mm slices every one stays put."""
    geom = axial_geometry(40, 40, 4, slice_spacing=1.0)
    rng = np.random.default_rng(3)
    flat = circle(20.2, 19.7, 9.0, 2.0, n=300)
    expected = rasterize_contours([flat], geom, "flat").mask
    assert expected[2].sum() > 200
    for jitter in (0.01, 0.1, 0.2, 0.24):
        noisy = flat.copy()
        noisy[:, 2] += rng.uniform(-jitter, jitter, len(noisy))
        noisy[0, 2], noisy[1, 2] = 2.0 - jitter, 2.0 + jitter  # the extremes are reached
        result = rasterize_contours([noisy], geom, "jitter")
        assert result.skipped == [] and result.contours_used == 1, jitter
        np.testing.assert_array_equal(result.mask, expected, err_msg=str(jitter))
    beyond = flat.copy()
    beyond[5, 2] += 0.3  # one point 0.3 mm off on 1 mm slices: beyond the quarter spacing
    (skipped,) = rasterize_contours([beyond], geom, "beyond").skipped
    assert "between slices 2 and 3" in skipped.reason


def test_duplicated_closing_and_repeated_points_change_nothing():
    geom = axial_geometry(20, 20, 1)
    square = rectangle(2.5, 11.5, 3.5, 15.5, 0)
    closed = np.vstack([square, square[:1]])
    stuttered = np.vstack([square[:1], square[:1], square[1:2], square[1:], square[:1], square[:1]])
    expected = rasterize_contours([square], geom, "open").mask
    assert expected.sum() == 9 * 12
    for variant in (closed, stuttered):
        result = rasterize_contours([variant], geom, "closed")
        assert result.skipped == [] and result.contours_used == 1
        np.testing.assert_array_equal(result.mask, expected)


def test_zero_area_and_collinear_contours_are_skipped_with_a_warning_naming_roi_and_contour():
    geom = axial_geometry(20, 20, 1)
    good = rectangle(2.5, 8.5, 2.5, 8.5, 0)
    point = np.array([[5.0, 5.0, 0.0]] * 4)
    line = np.array([[1.0, 1.0, 0.0], [5.0, 9.0, 0.0], [3.0, 5.0, 0.0]])  # on y = 2x - 1
    back_and_forth = np.array([[10.0, 2.0, 0.0], [16.0, 2.0, 0.0], [13.0, 2.0, 0.0], [16.0, 2.0, 0.0]])
    sliver = np.array([[10.0, 10.0, 0.0], [18.0, 10.0, 0.0], [18.0, 10.3, 0.0]])  # thin, but a real area
    roi = RoiContours(7, "Lung_L", (good, point, line, back_and_forth, sliver), ("CLOSED_PLANAR",) * 5)
    merged = merge_rois([roi], geom, [], [])
    (report,) = merged.rois
    assert report.contours_used == 2  # good and the sliver
    assert [w.split(":")[1].strip() for w in merged.warnings] == ["contour 1 skipped", "contour 2 skipped",
                                                                  "contour 3 skipped"]  # fmt: skip
    assert all(w.startswith("ROI 'Lung_L': contour") and "has no area" in w for w in merged.warnings)
    expected = np.zeros(geom.shape, dtype=bool)
    expected[0, 3:9, 3:9] = True
    expected[0] |= reference_even_odd([sliver[:, :2]], 20, 20)
    np.testing.assert_array_equal(merged.mask, expected)


def test_a_hole_touching_its_outline_at_one_point_is_still_a_hole():
    """Self-touching holes, as two contours and as one keyhole-free outline that touches itself."""
    geom = axial_geometry(24, 24, 1)
    outer = [(1.5, 1.5), (19.5, 1.5), (19.5, 19.5), (1.5, 19.5)]
    diamond = [(1.5, 10.5), (8.5, 5.5), (15.5, 10.5), (8.5, 15.5)]  # touches the left edge at (1.5, 10.5)
    self_touching = [*outer, (1.5, 10.5), (8.5, 15.5), (15.5, 10.5), (8.5, 5.5), (1.5, 10.5)]
    expected = reference_even_odd([np.array(outer), np.array(diamond)], 24, 24)
    assert expected[5, 5] and not expected[10, 8] and not expected[10, 14] and expected[10, 17]
    for polygons in ([outer, diamond], [self_touching]):
        contours = [in_index_space(geom, polygon, 0) for polygon in polygons]
        result = rasterize_contours(contours, geom, "touching")
        assert result.skipped == []
        np.testing.assert_array_equal(result.mask[0], expected)
    yy, xx = np.mgrid[0:24, 0:24]
    distance = np.abs(xx - 8.5) / 7 + np.abs(yy - 10.5) / 5  # 1 on the diamond's outline
    in_square = (xx >= 2) & (xx <= 19) & (yy >= 2) & (yy <= 19)
    off_edge = ~np.isclose(distance, 1.0)  # centres on the outline follow the half-open edge rule
    assert off_edge.sum() > 570
    np.testing.assert_array_equal(expected[off_edge], (in_square & (distance > 1))[off_edge])  # analytic truth


def test_seven_separate_contours_on_one_slice_are_each_filled():
    """A lung cut by one slice can give many separate outlines: none may cancel or merge another."""
    geom = axial_geometry(80, 90, 3, pixel=(0.5, 0.5), slice_spacing=2.0)
    centres = [(6.0, 6.0), (20.0, 7.0), (35.0, 8.0), (8.0, 25.0), (22.0, 24.0), (36.0, 27.0), (21.0, 36.0)]
    radii = [3.0, 4.5, 2.5, 5.0, 3.5, 4.0, 2.0]
    contours = [circle(cx + 0.13, cy - 0.07, r, 2.0, n=400) for (cx, cy), r in zip(centres, radii, strict=True)]
    result = rasterize_contours(contours, geom, "Lung_R")
    assert result.contours_used == 7 and result.skipped == []
    assert not result.mask[0].any() and not result.mask[2].any()
    each = [rasterize_contours([c], geom, "one").mask[1] for c in contours]
    np.testing.assert_array_equal(result.mask[1], np.logical_or.reduce(each))
    assert sum(int(m.sum()) for m in each) == int(result.mask[1].sum())  # disjoint: nothing cancelled
    for mask, r in zip(each, radii, strict=True):
        assert mask.sum() * 0.25 == pytest.approx(np.pi * r * r, rel=0.03)


# ---- speed -------------------------------------------------------------------------------------


def test_a_full_slice_stack_rasterises_quickly():
    """100 slices of a 500-point circle on 512x512 takes ~20 ms; 2 s leaves room for a loaded CI box."""
    geom = axial_geometry(512, 512, 100, pixel=(0.9765625, 0.9765625), slice_spacing=2.5)
    contours = [circle(250.0, 240.0, 150.0, 2.5 * k) for k in range(100)]
    start = time.perf_counter()
    result = rasterize_contours(contours, geom, "body")
    elapsed = time.perf_counter() - start
    assert result.contours_used == 100
    assert elapsed < 2.0
