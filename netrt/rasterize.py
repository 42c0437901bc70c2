"""RTSTRUCT contours -> binary masks on the image grid, by the pixel-centre rule with even-odd fill.

Why NETRT rasterises itself: rt-utils 1.2.7 fills polygons through OpenCV, which paints every
pixel the outline *touches*, so each boundary grows by about half a voxel (masks 2-8 % too
large), and it mis-shapes non-square images. Here a voxel belongs to an ROI exactly when its
centre lies inside the contour, which has no systematic bias: the mask's area converges to the
contour's area. Every point goes through the full :class:`ImageGeometry` (origin, both direction
cosines, normal, anisotropic spacing), so oblique and reversed series land on the right voxels.

The rules, in one place:

* **Plane.** A contour belongs to slice ``k = round(index_z)`` if every point lies within
  ``plane_tolerance`` (default 0.25) slice spacings of that slice's plane. Points need not lie
  exactly in the plane: float exports scatter them 0.01-0.2 mm off it, and each is judged on its
  own distance, so such a contour stays on its slice as long as every point is within the
  tolerance (0.2 mm jitter fits down to 0.8 mm slices). A contour whose points span more than
  twice the tolerance along the normal cannot lie near any one plane and is reported as not
  parallel. Contours between slices, tilted against the slices, outside the volume, with fewer
  than 3 points or non-finite coordinates are *skipped and reported* (:class:`SkippedContour`),
  never raised: one bad contour in a 600-contour ROI should not cost the whole study, but the
  physicist must see it.
* **No area.** A contour whose points all lie within :data:`DEGENERATE_TOLERANCE` voxels of one
  straight line (a single repeated point, two points, a collinear run, an outline traced out and
  back along a line) encloses nothing; it is skipped and reported naming the contour, not raised
  and not silently "used". (Any other polygon is filled by the rules below, even one that happens to
  cover no voxel centre.)
* **Closing point.** A contour may repeat its first point at the end (some exporters close the
  ring explicitly); the repeat adds a zero-length edge, which crosses no row, so the mask is that of
  the open form. The repeat check below also ignores it.
* **Inside.** Voxel ``(row r, col c)`` of slice ``k`` is inside when its centre ``(c, r)`` is inside
  the polygon by the crossing-number test.
* **Edges (half-open, "top-left" rule).** A centre exactly on the boundary is inside when the
  polygon's interior lies towards increasing column (on a vertical edge) or increasing row (on a
  horizontal edge). An axis-aligned rectangle spanning columns ``[x0, x1]`` and rows ``[y0, y1]``
  therefore covers the centres with ``x0 <= c < x1`` and ``y0 <= r < y1``. Two contours that
  share an edge split the voxels on it between them, none twice and none lost. Coordinates within
  :data:`SNAP_EPS` voxels of an integer are snapped to it first, so a contour drawn through voxel
  centres gives the same mask whatever rounding the oblique transform introduced.
* **Combining (even-odd / XOR).** All contours of one ROI on the same slice combine by XOR: a
  contour inside another is a hole, a contour inside that hole is an island, and two separate
  contours that overlap cancel where they overlap. This is how plastimatch reads nested
  CLOSED_PLANAR contours (the usual way exporters store a hole without a keyhole cut) and what
  the standard's CLOSEDPLANAR_XOR type states explicitly (also accepted spelt CLOSED_PLANAR_XOR),
  so both types, even mixed in one ROI, go through the same fill. Consequences, each tested: a
  hole that touches its outer contour at one point (self-touching) is still a hole, the shared
  vertex being decided by the edge rule; any number of separate contours on one slice (the
  seven lobes of a lung) are each filled, none interacting with another. Overlapping
  separate contours are rare and ambiguous in practice; XOR is used for them too rather than
  guessing a union, so that the same data always gives the same mask. The one exception is a
  repeat (same slice, same vertices, whatever the start point or direction): it is skipped and
  reported, because a contour written twice is an export glitch and XOR would erase the slice.

Implementation: each polygon edge is expanded into its crossings with the pixel-centre rows it
spans (O(perimeter) work, not O(rows x edges)). A crossing at column position ``x`` becomes a
parity toggle at column ``ceil(x)``; toggles of all contours of the ROI are sorted once by
(slice, row, column), coinciding pairs cancel, and one ``bitwise_xor.accumulate`` along the
columns of a small ``(touched rows, bounding-box columns)`` array fills every row at once. The XOR
of contours comes for free, because their toggles on a row simply add up mod 2. Measured: 10 ROIs
of 500-point circles on every slice of a 512x512x200 grid rasterise in about 0.2-0.4 s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from netrt.errors import RoiError
from netrt.geometry import ImageGeometry, patient_to_index

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Coordinates (in voxels) closer than this to an integer are taken to be on it. Far below any
#: real contour precision (DS strings carry ~1e-4 mm at best), far above float round-off of the
#: index transform (~1e-12 voxels).
SNAP_EPS = 1e-6

#: Default plane tolerance in slice spacings: a contour must sit within a quarter slice of an
#: image plane. Looser would attach contours drawn on an interpolated plane to a neighbour.
DEFAULT_PLANE_TOLERANCE = 0.25

#: Upper bound on the cells of one toggle block, so that a body contour on a 512x512x300 study
#: does not allocate a volume-sized scratch array at once.
_MAX_BLOCK_CELLS = 1 << 23

#: Repeats of a contour (same slice, same points to 1e-3 voxel, any start point or direction) are
#: dropped, not XORed: an exporter that writes a contour twice means one outline, and XOR would
#: erase it.
DUPLICATE_DECIMALS = 3

#: Contour Geometric Types (3006,0042) that enclose an area. The standard's term is
#: CLOSEDPLANAR_XOR; CLOSED_PLANAR_XOR is the spelling some software writes for the same thing.
FILLABLE_GEOMETRIC_TYPES = frozenset({"CLOSED_PLANAR", "CLOSEDPLANAR_XOR", "CLOSED_PLANAR_XOR"})

#: A contour whose points all lie within this many voxels (RMS distance) of one straight line has
#: no area: it is skipped and reported. A thousandth of a voxel is far below any drawn outline
#: (the narrowest real sliver is a few tenths of a voxel wide) and far above the rounding of DS
#: coordinates through the index transform (~1e-6 voxels).
DEGENERATE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SkippedContour:
    """A contour that did not contribute to the mask; ``index`` is its position in the input."""

    index: int
    reason: str


@dataclass(frozen=True)
class RasterResult:
    """The mask of one ROI, ``(slices, rows, columns)`` bool, with what was left out and why."""

    mask: BoolArray
    skipped: list[SkippedContour] = field(default_factory=list)
    contours_used: int = 0


def geometric_type_skip_reason(geometric_type: str) -> str | None:
    """Why a contour of this Contour Geometric Type cannot be filled, or None if it can.

    POINT marks a location (a marker or isocentre) and OPEN_PLANAR / OPEN_NONPLANAR trace a line
    (a wire, a catheter): none of them has an inside, so they are reported rather than closed
    artificially, which would invent a volume. The caller reads the type; this keeps the rule
    in the module that owns the filling.
    """
    kind = geometric_type.strip().upper()
    if kind in FILLABLE_GEOMETRIC_TYPES:
        return None
    if kind == "POINT":
        return "POINT contour marks a location and has no area"
    if kind in ("OPEN_PLANAR", "OPEN_NONPLANAR"):
        return f"{kind} contour is a line, not a closed outline, and has no inside"
    return f"unknown Contour Geometric Type {geometric_type!r}"


def _snap(values: FloatArray) -> FloatArray:
    """Round values within :data:`SNAP_EPS` of an integer onto it (see the edge rule)."""
    nearest = np.rint(values)
    return np.where(np.abs(values - nearest) <= SNAP_EPS, nearest, values)


def _line_distance(points: FloatArray) -> float:
    """RMS distance (index units) of 2-D points from their best-fitting straight line (0 if collinear)."""
    centred = points - points.mean(axis=0)
    covariance = centred.T @ centred / len(points)
    smallest = float(np.linalg.eigvalsh(covariance)[0])
    return float(np.sqrt(max(smallest, 0.0)))


def _outline_fingerprint(points: FloatArray) -> bytes:
    """Bytes equal for the same closed outline whatever its start point and direction."""
    rounded = np.round(points, DUPLICATE_DECIMALS) + 0.0  # + 0.0 turns -0.0 into 0.0
    if len(rounded) > 3 and np.array_equal(rounded[0], rounded[-1]):
        rounded = rounded[:-1]  # an explicitly repeated closing point
    leftmost = np.flatnonzero(rounded[:, 0] == rounded[:, 0].min())
    start = int(leftmost[np.argmin(rounded[leftmost, 1])])
    forward = np.roll(rounded, -start, axis=0).tobytes()
    backward = np.roll(rounded[::-1], start + 1 - len(rounded), axis=0).tobytes()
    return min(forward, backward)


def _fill_rings(
    x: FloatArray,
    y: FloatArray,
    ring_lengths: IntArray,
    ring_planes: IntArray,
    out: BoolArray,
) -> None:
    """Even-odd fill of closed rings into ``out[plane, row, col]`` (which must start all False).

    ``x``/``y`` are the concatenated vertices (column, row in continuous index units) of all rings;
    ``ring_lengths[i]`` vertices belong to ring ``i`` on plane ``ring_planes[i]``. Each ring is
    closed implicitly (last vertex -> first).
    """
    _, n_rows, n_cols = out.shape
    if ring_lengths.size == 0:
        return
    x = _snap(x)
    y = _snap(y)
    ends = np.cumsum(ring_lengths)
    starts = ends - ring_lengths
    following = np.arange(1, x.size + 1)
    following[ends - 1] = starts
    edge_plane = np.repeat(ring_planes, ring_lengths)

    x0, y0, x1, y1 = x, y, x[following], y[following]
    # Half-open in y: the edge crosses pixel-centre row r when min(y0, y1) <= r < max(y0, y1).
    # Horizontal edges cross nothing; rows are clipped to the image (rows are independent).
    row_start = np.clip(np.ceil(np.minimum(y0, y1)), 0, n_rows).astype(np.int64)
    row_stop = np.clip(np.ceil(np.maximum(y0, y1)), 0, n_rows).astype(np.int64)
    counts = row_stop - row_start
    crossing_edges = np.flatnonzero(counts > 0)
    if crossing_edges.size == 0:
        return
    counts = counts[crossing_edges]
    x0, y0 = x0[crossing_edges], y0[crossing_edges]
    slope = (x1[crossing_edges] - x0) / (y1[crossing_edges] - y0)  # y1 != y0 where counts > 0

    # One entry per (edge, row) crossing.
    edge_of = np.repeat(np.arange(crossing_edges.size), counts)
    first_of_edge = np.cumsum(counts) - counts
    rows = row_start[crossing_edges][edge_of] + (np.arange(edge_of.size) - first_of_edge[edge_of])
    x_cross = _snap(x0[edge_of] + (rows - y0[edge_of]) * slope[edge_of])
    # Centre c is inside when an odd number of crossings satisfy x_cross <= c, i.e. c >= ceil(x):
    # a toggle at column ceil(x). Clipping to [0, n_cols] keeps every toggle (a crossing left of
    # the image still flips the whole row), so each row keeps an even count and the parity returns
    # to 0 after its last toggle.
    toggle_col = np.clip(np.ceil(x_cross), 0, n_cols).astype(np.int64)
    row_key = edge_plane[crossing_edges][edge_of].astype(np.int64) * n_rows + rows

    # Two toggles at the same (plane, row, column) cancel: keep only cells toggled an odd number of
    # times. One sort of the flat cell keys does this and orders the cells by row for the fill.
    cell = np.sort(row_key * (n_cols + 1) + toggle_col)
    run_start = np.flatnonzero(np.concatenate(([True], cell[1:] != cell[:-1])))
    run_length = np.diff(np.append(run_start, cell.size))
    cell = cell[run_start[run_length % 2 == 1]]
    if cell.size == 0:
        return
    row_key, toggle_col = np.divmod(cell, n_cols + 1)
    is_new = np.empty(row_key.size, dtype=bool)
    is_new[0] = True
    np.not_equal(row_key[1:], row_key[:-1], out=is_new[1:])
    row_id = np.cumsum(is_new) - 1
    touched = row_key[is_new]

    col_lo = int(toggle_col.min())
    col_hi = int(toggle_col.max())  # parity is 0 from here on
    if col_hi <= col_lo or col_lo >= n_cols:
        return
    width = col_hi - col_lo + 1
    visible = min(col_hi, n_cols) - col_lo
    block_rows = max(1, _MAX_BLOCK_CELLS // width)
    for first in range(0, touched.size, block_rows):
        last = min(first + block_rows, touched.size)
        lo, hi = np.searchsorted(row_id, [first, last])
        toggles = np.zeros((last - first, width), dtype=np.uint8)
        toggles[row_id[lo:hi] - first, toggle_col[lo:hi] - col_lo] = 1
        parity = np.bitwise_xor.accumulate(toggles, axis=1)[:, :visible].view(np.bool_)
        keys = touched[first:last]
        out[keys // n_rows, keys % n_rows, col_lo : col_lo + visible] = parity


def fill_polygons(polygons: Sequence[npt.ArrayLike], rows: int, columns: int) -> BoolArray:
    """Even-odd fill of 2-D polygons given as ``(N, 2)`` ``(col, row)`` continuous indices.

    The in-plane core of :func:`rasterize_contours`, with the same edge rule, for callers that
    already work in index space (reformatted planes, tests). Polygons with fewer than 3 vertices
    contribute nothing.

    Raises:
        ValueError: a polygon is not an ``(N, 2)`` array.
    """
    out = np.zeros((1, int(rows), int(columns)), dtype=bool)
    rings = []
    for i, polygon in enumerate(polygons):
        array = np.asarray(polygon, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"polygon {i} must be an (N, 2) array of (col, row), got {array.shape}")
        if array.shape[0] >= 3 and np.all(np.isfinite(array)):
            rings.append(array)
    if rings:
        points = np.concatenate(rings)
        lengths = np.array([len(r) for r in rings], dtype=np.int64)
        _fill_rings(points[:, 0], points[:, 1], lengths, np.zeros(len(rings), dtype=np.int64), out)
    plane: BoolArray = out[0]
    return plane


def rasterize_contours(
    contours: Sequence[npt.ArrayLike],
    geom: ImageGeometry,
    roi_name: str,
    *,
    plane_tolerance: float = DEFAULT_PLANE_TOLERANCE,
) -> RasterResult:
    """Mask of one ROI from its closed contours (``(N, 3)`` LPS mm each, as in ContourData).

    The contours are those of types CLOSED_PLANAR and CLOSEDPLANAR_XOR (both filled by the same
    even-odd rule). See the module docstring for the plane, no-area, inside, edge and XOR rules. Contours that cannot be
    placed are returned in ``skipped`` with the reason; ``contours_used`` counts the rest (a used
    contour may still cover no voxel centre, e.g. a sliver narrower than a voxel).

    Raises:
        RoiError: a contour is not an ``(N, 3)`` numeric array (a reading bug, not bad geometry),
            or ``plane_tolerance`` is not in ``(0, 0.5)``.
    """
    if not 0 < plane_tolerance < 0.5:
        raise RoiError(roi_name, f"plane_tolerance must be in (0, 0.5) slice spacings, got {plane_tolerance}")
    n_cols, n_rows, n_slices = geom.size
    mask = np.zeros(geom.shape, dtype=bool)
    skipped: list[SkippedContour] = []

    candidates: list[int] = []
    arrays: list[FloatArray] = []
    for i, contour in enumerate(contours):
        try:
            array = np.asarray(contour, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise RoiError(roi_name, f"contour {i} is not numeric: {exc}") from exc
        if array.ndim != 2 or array.shape[1] != 3:
            raise RoiError(roi_name, f"contour {i} must be an (N, 3) array of points, got {array.shape}")
        if array.shape[0] < 3:
            skipped.append(SkippedContour(i, f"has {array.shape[0]} point(s); a closed contour needs 3"))
        elif not np.all(np.isfinite(array)):
            skipped.append(SkippedContour(i, "has non-finite coordinates"))
        else:
            candidates.append(i)
            arrays.append(array)

    if not arrays:
        return RasterResult(mask, skipped, 0)

    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    index = patient_to_index(geom, np.concatenate(arrays))
    z = index[:, 2]
    z_min = np.minimum.reduceat(z, starts)
    z_max = np.maximum.reduceat(z, starts)
    plane = np.rint((z_min + z_max) / 2)
    x_min = np.minimum.reduceat(index[:, 0], starts)
    x_max = np.maximum.reduceat(index[:, 0], starts)
    y_min = np.minimum.reduceat(index[:, 1], starts)
    y_max = np.maximum.reduceat(index[:, 1], starts)
    slice_mm = geom.spacing[2]

    use = np.zeros(len(arrays), dtype=bool)
    for j, i in enumerate(candidates):
        k = int(plane[j])
        spread = float(z_max[j] - z_min[j])
        offset = max(float(z_max[j]) - k, k - float(z_min[j]))
        if spread > 2 * plane_tolerance:
            reason = (
                f"is not parallel to the image slices: its points span {spread * slice_mm:.3f} mm "
                f"along the slice normal (every point must lie within {plane_tolerance * slice_mm:.3f} mm "
                "of one slice plane)"
            )
        elif k < 0 or k >= n_slices:
            reason = (
                f"lies outside the volume: at slice index {float(z_min[j] + z_max[j]) / 2:.2f}, "
                f"the series has slices 0..{n_slices - 1}"
            )
        elif offset > plane_tolerance:
            centre = float(z_min[j] + z_max[j]) / 2
            lower = int(np.floor(centre))
            reason = (
                f"lies between slices {lower} and {lower + 1} (slice index {centre:.3f}; it must be "
                f"within {plane_tolerance} slice spacings of a slice)"
            )
        elif x_max[j] < -0.5 or x_min[j] > n_cols - 0.5 or y_max[j] < -0.5 or y_min[j] > n_rows - 0.5:
            reason = "lies entirely outside the image in-plane"
        elif _line_distance(index[starts[j] : starts[j] + lengths[j], :2]) <= DEGENERATE_TOLERANCE:
            reason = "has no area: its points lie on one straight line (or one point), so it encloses nothing"
        else:
            use[j] = True
            continue
        skipped.append(SkippedContour(i, reason))

    # Repeats can only hide on slices with more than one contour; most slices have one.
    planes, per_plane = np.unique(plane[use], return_counts=True)
    shared = set(planes[per_plane > 1].tolist())
    seen: dict[tuple[float, bytes], int] = {}
    for u in np.flatnonzero(use).tolist():
        if plane[u] in shared:
            fingerprint = (float(plane[u]), _outline_fingerprint(index[starts[u] : starts[u] + lengths[u], :2]))
            first = seen.setdefault(fingerprint, candidates[u])
            if first != candidates[u]:
                use[u] = False
                reason = f"repeats contour {first} on slice {int(plane[u])} (XOR would erase both)"
                skipped.append(SkippedContour(candidates[u], reason))

    if use.any():
        keep = np.repeat(use, lengths)
        _fill_rings(index[keep, 0], index[keep, 1], lengths[use], plane[use].astype(np.int64), mask)
    skipped.sort(key=lambda s: s.index)
    return RasterResult(mask, skipped, int(use.sum()))
