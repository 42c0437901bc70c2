"""The image grid of a slice series, and the maps between patient space and voxel indices.

Everything NETRT draws (ROI masks, overlays, reformats) must land on the voxel that the
scanner meant, so the grid is described once, from the DICOM attributes that define it, and
every other module maps points through it instead of re-deriving spacing or orientation.

Conventions, fixed here and nowhere else:

* Patient coordinates are DICOM LPS millimetres (what ImagePositionPatient and ContourData use).
* Continuous indices are ``(col, row, slice)`` -- the x, y, z of the index grid, in that order,
  as SimpleITK numbers them; integer values are voxel *centres*.
* Arrays are stored ``[slice, row, col]`` (numpy / ``sitk.GetArrayFromImage`` order).
* Slice ``0`` is the slice lowest along ``normal = row_direction x column_direction``. DICOM
  files arrive in any order (and "reversed" series simply have their IPPs decreasing along the
  normal); sorting along the normal gives a right-handed grid whose third spacing is positive,
  which is the only form SimpleITK, NIfTI writers and the rasteriser all agree on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from netrt.errors import StudyValidationError

FloatArray = npt.NDArray[np.float64]

TAG_IOP = "(0020,0037) ImageOrientationPatient"
TAG_IPP = "(0020,0032) ImagePositionPatient"
TAG_PIXEL_SPACING = "(0028,0030) PixelSpacing"

#: How far |row|, |col| may be from 1 and row.col from 0. IOP is a DS with at most 16 characters,
#: so vendors write 5-10 significant digits; 1e-3 accepts every rounding seen in practice and still
#: rejects a wrong attribute (e.g. a swapped or truncated value).
ORIENTATION_TOLERANCE = 1e-3

#: Relative tolerance on the distance between neighbouring slices (fraction of the nominal spacing)
#: and the absolute floor in mm. A 2 % misplacement of a slice is far below anything a mask or Dice
#: can see; a missing slice (100 %) or a mixed 2.5/3 mm series (20 %) is far above it.
SLICE_SPACING_RELATIVE_TOLERANCE = 0.02
SLICE_SPACING_ABSOLUTE_TOLERANCE_MM = 0.01

#: How far a slice may sit off the line ``origin + t * normal`` (fraction of the smallest pixel
#: spacing). Beyond it the stack is sheared (gantry tilt) and no regular grid describes it.
IN_PLANE_DRIFT_TOLERANCE = 0.05

#: A reversed or badly broken series would otherwise produce one clause per slice.
MAX_REPORTED_INTERVALS = 10


@dataclass(frozen=True, eq=False)
class ImageGeometry:
    """Where every voxel of a regular image grid sits in patient space.

    ``patient = origin + row_direction * spacing[0] * col + column_direction * spacing[1] * row
    + normal * spacing[2] * slice``. The arrays are copied and made read-only on construction so
    that a geometry shared between masks cannot be altered behind their back.

    Attributes:
        origin: patient coordinates (mm) of the centre of voxel ``[slice 0, row 0, col 0]``, i.e.
            the IPP of the first slice in spatial order.
        row_direction: unit vector of increasing column index (IOP[0:3], DICOM's "row direction
            cosine").
        column_direction: unit vector of increasing row index (IOP[3:6]).
        normal: ``row_direction x column_direction``; slices are sorted by increasing position
            along it.
        spacing: ``(column spacing = PixelSpacing[1], row spacing = PixelSpacing[0], slice
            spacing)`` in mm, i.e. x, y, z of the index grid. All positive.
        size: ``(columns, rows, slices)``.
    """

    origin: FloatArray
    row_direction: FloatArray
    column_direction: FloatArray
    normal: FloatArray
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]

    def __post_init__(self) -> None:
        for name in ("origin", "row_direction", "column_direction", "normal"):
            value = np.array(getattr(self, name), dtype=np.float64)
            if value.shape != (3,) or not np.all(np.isfinite(value)):
                raise ValueError(f"ImageGeometry.{name} must be 3 finite numbers, got {value!r}")
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        spacing = tuple(float(s) for s in self.spacing)
        size = tuple(int(n) for n in self.size)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"ImageGeometry.spacing must be 3 positive numbers, got {self.spacing!r}")
        if len(size) != 3 or not all(n > 0 for n in size):
            raise ValueError(f"ImageGeometry.size must be 3 positive integers, got {self.size!r}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "size", size)
        matrix = self.direction_matrix
        if not np.allclose(matrix.T @ matrix, np.eye(3), atol=ORIENTATION_TOLERANCE):
            raise ValueError(f"ImageGeometry directions are not orthonormal:\n{matrix}")
        if not np.allclose(
            np.cross(self.row_direction, self.column_direction), self.normal, atol=ORIENTATION_TOLERANCE
        ):
            raise ValueError("ImageGeometry.normal must equal row_direction x column_direction")

    @property
    def direction_matrix(self) -> FloatArray:
        """3x3 matrix whose columns are the index axes (row_direction, column_direction, normal).

        This is exactly SimpleITK's direction matrix, so ``GetDirection()`` is its row-major ravel.
        """
        return np.column_stack([self.row_direction, self.column_direction, self.normal])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(slices, rows, columns)`` of a volume on this grid."""
        columns, rows, slices = self.size
        return (slices, rows, columns)

    def is_close(self, other: ImageGeometry, atol_mm: float = 1e-3) -> bool:
        """Same size, and affines equal entry by entry within ``atol_mm`` (origin and voxel axes)."""
        if self.size != other.size:
            return False
        return bool(np.allclose(affine(self), affine(other), atol=atol_mm, rtol=0.0))


@dataclass(frozen=True)
class SliceInterval:
    """One distance between neighbouring slices that breaks the regular spacing."""

    index: int  # the interval lies between slice ``index`` and ``index + 1`` (spatial order)
    position_before: float  # mm along the normal
    position_after: float
    distance: float  # mm; 0 for duplicated positions, negative when the input was not sorted


@dataclass(frozen=True)
class SliceSpacingReport:
    """What the slice positions of a series say about its spacing, for the loader to report.

    ``nominal_spacing`` is the median neighbour distance: a handful of gaps or duplicates cannot
    move it, so it is the spacing the series was meant to have. ``irregular`` lists every interval
    that differs from it by more than ``tolerance``; ``drift`` is the largest distance of any slice
    from the fitted regular grid ``first + i * mean_spacing``, which is what actually decides
    whether one spacing can describe the stack.
    """

    positions: tuple[float, ...]
    nominal_spacing: float
    mean_spacing: float
    tolerance: float
    irregular: tuple[SliceInterval, ...]
    drift: float

    @property
    def is_uniform(self) -> bool:
        """True when one slice spacing places every slice within tolerance."""
        return not self.irregular and self.drift <= self.tolerance

    def missing_slices(self, interval: SliceInterval) -> int:
        """How many slices of nominal spacing would fill ``interval`` (0 if it is not a gap)."""
        if self.nominal_spacing <= 0:
            return 0
        return max(round(interval.distance / self.nominal_spacing) - 1, 0)

    def describe(self) -> str:
        """One human sentence per problem, positions in mm along the normal, slices 0-based."""
        if self.is_uniform:
            return f"{len(self.positions)} slices, uniform spacing {self.mean_spacing:.4g} mm"
        parts: list[str] = []
        for gap in self.irregular[:MAX_REPORTED_INTERVALS]:
            where = (
                f"between slice {gap.index} at {gap.position_before:.3f} mm and slice "
                f"{gap.index + 1} at {gap.position_after:.3f} mm"
            )
            if gap.distance < 0:
                parts.append(f"slices are not sorted along the normal {where}")
            elif gap.distance <= self.tolerance:
                parts.append(f"two slices share one position {where}")
            else:
                missing = self.missing_slices(gap)
                gap_kind = (
                    f"gap of {gap.distance:.3f} mm (about {missing} slice(s) missing)"
                    if missing
                    else f"spacing of {gap.distance:.3f} mm"
                )
                parts.append(f"{gap_kind} {where}")
        if len(self.irregular) > MAX_REPORTED_INTERVALS:
            parts.append(f"and {len(self.irregular) - MAX_REPORTED_INTERVALS} more irregular intervals")
        if not self.irregular:
            parts.append(f"slice positions drift up to {self.drift:.3f} mm from a regular grid")
        return (
            f"slice spacing is not uniform (nominal {self.nominal_spacing:.4g} mm, tolerance "
            f"{self.tolerance:.3g} mm): " + "; ".join(parts)
        )


def _as_points(points: npt.ArrayLike, what: str) -> FloatArray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"{what} must be an (N, 3) array, got shape {array.shape}")
    return array


def orientation_vectors(orientation: Sequence[float]) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Row direction, column direction and normal from the six IOP values, re-orthonormalised.

    IOP is stored as rounded decimal strings, so the two vectors are only nearly unit and nearly
    orthogonal. They are checked against :data:`ORIENTATION_TOLERANCE` (beyond it the attribute is
    wrong, not rounded) and then Gram-Schmidt-cleaned so that the direction matrix is exactly
    orthonormal and its transpose is its inverse.

    Raises:
        StudyValidationError: the values are not six finite numbers, or not orthonormal.
    """
    values = np.asarray(orientation, dtype=np.float64).ravel()
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        raise StudyValidationError(f"needs six finite numbers, got {list(orientation)!r}", tag=TAG_IOP)
    row, col = values[:3], values[3:]
    row_norm, col_norm = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    dot = float(row @ col)
    if (
        abs(row_norm - 1) > ORIENTATION_TOLERANCE
        or abs(col_norm - 1) > ORIENTATION_TOLERANCE
        or abs(dot) > ORIENTATION_TOLERANCE
    ):
        raise StudyValidationError(
            f"direction cosines are not orthonormal (|row|={row_norm:.6f}, |column|={col_norm:.6f}, "
            f"row.column={dot:.6f}, tolerance {ORIENTATION_TOLERANCE})",
            tag=TAG_IOP,
        )
    row = row / row_norm
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    return row, col, np.cross(row, col)


def slice_positions(positions: Sequence[Sequence[float]] | npt.ArrayLike, orientation: Sequence[float]) -> FloatArray:
    """Signed distance (mm) of each IPP along the slice normal, in input order.

    This is the only correct sort key for a series: SliceLocation is optional and vendor-defined,
    and IPP z alone is meaningless for sagittal or oblique stacks.
    """
    _, _, normal = orientation_vectors(orientation)
    return _as_points(positions, "ImagePositionPatient values") @ normal


def spatial_order(
    positions: Sequence[Sequence[float]] | npt.ArrayLike, orientation: Sequence[float]
) -> npt.NDArray[np.intp]:
    """Indices that sort the slices by increasing position along the normal (stable)."""
    return np.argsort(slice_positions(positions, orientation), kind="stable")


def check_slice_spacing(
    positions_along_normal: Sequence[float] | npt.ArrayLike, tolerance_mm: float | None = None
) -> SliceSpacingReport:
    """Describe gaps, duplicates and uneven spacing of sorted slice positions (mm along the normal).

    Never raises on the data: the loader decides whether a gap quarantines the study, and wants
    the positions either way. ``tolerance_mm`` defaults to 2 % of the nominal spacing (at least
    0.01 mm).
    """
    pos = np.asarray(positions_along_normal, dtype=np.float64).ravel()
    if pos.size < 2:
        return SliceSpacingReport(tuple(pos.tolist()), 0.0, 0.0, 0.0, (), 0.0)
    diffs = np.diff(pos)
    nominal = float(np.median(diffs))
    mean = float((pos[-1] - pos[0]) / (pos.size - 1))
    if tolerance_mm is None:
        tolerance_mm = max(SLICE_SPACING_RELATIVE_TOLERANCE * abs(nominal), SLICE_SPACING_ABSOLUTE_TOLERANCE_MM)
    bad = np.flatnonzero((np.abs(diffs - nominal) > tolerance_mm) | (diffs <= tolerance_mm))
    irregular = tuple(SliceInterval(int(i), float(pos[i]), float(pos[i + 1]), float(diffs[i])) for i in bad)
    drift = float(np.max(np.abs(pos - (pos[0] + mean * np.arange(pos.size)))))
    return SliceSpacingReport(tuple(pos.tolist()), nominal, mean, float(tolerance_mm), irregular, drift)


def geometry_from_slices(
    positions: Sequence[Sequence[float]] | npt.ArrayLike,
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    rows: int,
    columns: int,
    *,
    slice_thickness: float | None = None,
    spacing_tolerance_mm: float | None = None,
) -> ImageGeometry:
    """Build the grid of a series from its per-slice IPPs (already sorted along the normal).

    The slice spacing is ``(last - first) / (n - 1)`` along the normal: the mean spacing, which
    puts the first and the last slice exactly where their IPPs say. SliceThickness and
    SpacingBetweenSlices are not trusted because they are optional and often describe the
    reconstruction, not the stack. ``slice_thickness`` is used only for a single-slice series,
    where there is no second position to measure from.

    Raises:
        StudyValidationError: orientation not orthonormal; pixel spacing not two positive numbers;
            positions not sorted, duplicated, unevenly spaced or gapped (the message lists the
            offending intervals with their positions, see :func:`check_slice_spacing`); slices not
            stacked along the normal (sheared or tilted stack); a single slice without
            ``slice_thickness``.
    """
    row_dir, col_dir, normal = orientation_vectors(orientation)
    ps = np.asarray(pixel_spacing, dtype=np.float64).ravel()
    if ps.shape != (2,) or not np.all(np.isfinite(ps)) or np.any(ps <= 0):
        raise StudyValidationError(f"needs two positive numbers, got {list(pixel_spacing)!r}", tag=TAG_PIXEL_SPACING)
    if int(rows) <= 0 or int(columns) <= 0:
        raise StudyValidationError(f"image has {rows} rows and {columns} columns", tag="(0028,0010)")
    ipp = _as_points(positions, "ImagePositionPatient values")
    if ipp.shape[0] == 0:
        raise StudyValidationError("series has no slices", tag=TAG_IPP)
    if not np.all(np.isfinite(ipp)):
        raise StudyValidationError("a slice position is not finite", tag=TAG_IPP)

    along = ipp @ normal
    if ipp.shape[0] == 1:
        if slice_thickness is None or not np.isfinite(slice_thickness) or slice_thickness <= 0:
            raise StudyValidationError(
                "a single-slice series needs a positive SliceThickness to define its slice spacing",
                tag="(0018,0050) SliceThickness",
            )
        slice_spacing = float(slice_thickness)
    else:
        report = check_slice_spacing(along, spacing_tolerance_mm)
        if not report.is_uniform:
            raise StudyValidationError(report.describe(), tag=TAG_IPP)
        slice_spacing = report.mean_spacing

    offsets = ipp - ipp[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    drift_limit = IN_PLANE_DRIFT_TOLERANCE * float(ps.min())
    if drift.size and float(drift.max()) > drift_limit:
        worst = int(np.argmax(drift))
        raise StudyValidationError(
            f"slices are not stacked along the slice normal: slice {worst} is displaced "
            f"{float(drift[worst]):.3f} mm in-plane from slice 0 (tolerance {drift_limit:.3f} mm); "
            "gantry-tilted or sheared series need resampling first",
            tag=TAG_IPP,
        )

    return ImageGeometry(
        origin=ipp[0].copy(),
        row_direction=row_dir,
        column_direction=col_dir,
        normal=normal,
        spacing=(float(ps[1]), float(ps[0]), slice_spacing),
        size=(int(columns), int(rows), int(ipp.shape[0])),
    )


def affine(geom: ImageGeometry) -> FloatArray:
    """4x4 matrix taking homogeneous ``(col, row, slice, 1)`` to LPS patient mm.

    LPS, not the RAS that nibabel expects: flip the first two rows (``diag(-1, -1, 1, 1) @ A``)
    before writing NIfTI with nibabel.
    """
    out = np.eye(4)
    out[:3, :3] = geom.direction_matrix * np.asarray(geom.spacing)
    out[:3, 3] = geom.origin
    return out


def patient_to_index(geom: ImageGeometry, points: npt.ArrayLike) -> FloatArray:
    """Continuous ``(col, row, slice)`` indices of ``(N, 3)`` LPS points; integers are voxel centres."""
    pts = _as_points(points, "points")
    result: FloatArray = ((pts - geom.origin) @ geom.direction_matrix) / np.asarray(geom.spacing)
    return result


def index_to_patient(geom: ImageGeometry, indices: npt.ArrayLike) -> FloatArray:
    """LPS points of ``(N, 3)`` continuous ``(col, row, slice)`` indices."""
    idx = _as_points(indices, "indices")
    result: FloatArray = geom.origin + (idx * np.asarray(geom.spacing)) @ geom.direction_matrix.T
    return result


def to_sitk_image(array: npt.ArrayLike, geom: ImageGeometry) -> sitk.Image:
    """A SimpleITK image of ``array[slice, row, col]`` placed on ``geom``.

    Boolean masks become ``uint8`` (SimpleITK has no bool pixel type).

    Raises:
        ValueError: the array shape is not ``geom.shape``.
    """
    data = np.asarray(array)
    if data.shape != geom.shape:
        raise ValueError(f"array shape {data.shape} does not match the grid (slices, rows, columns) {geom.shape}")
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    return place_sitk_image(sitk.GetImageFromArray(np.ascontiguousarray(data)), geom)


def place_sitk_image(sitk_image: sitk.Image, geom: ImageGeometry) -> sitk.Image:
    """``sitk_image`` (of size ``geom.size``) with the origin, spacing and direction of ``geom``; returns it.

    Raises:
        ValueError: the image size is not ``geom.size``.
    """
    # SimpleITK's SWIG methods carry no annotations; an Any handle keeps mypy --strict quiet here
    # without scattering ignores.
    image: Any = sitk_image
    if tuple(image.GetSize()) != tuple(geom.size):
        raise ValueError(f"image size {image.GetSize()} does not match the grid (columns, rows, slices) {geom.size}")
    image.SetOrigin(tuple(float(v) for v in geom.origin))
    image.SetSpacing(geom.spacing)
    image.SetDirection(tuple(float(v) for v in geom.direction_matrix.ravel()))
    return sitk_image


def geometry_from_sitk(sitk_image: sitk.Image) -> ImageGeometry:
    """The grid of a 3-D SimpleITK image (inverse of :func:`to_sitk_image`).

    Raises:
        ValueError: the image is not 3-D.
        StudyValidationError: its direction matrix is left-handed (third axis = -(x cross y)), which
            no DICOM slice stack sorted along its normal can produce; flip the third axis first.
    """
    image: Any = sitk_image  # untyped SWIG methods, see to_sitk_image
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    matrix = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    row_dir, col_dir, third = matrix[:, 0], matrix[:, 1], matrix[:, 2]
    if float(np.cross(row_dir, col_dir) @ third) < 0:
        raise StudyValidationError(
            "image direction matrix is left-handed (determinant -1); flip its slice axis before use"
        )
    size = image.GetSize()
    spacing = image.GetSpacing()
    return ImageGeometry(
        origin=np.asarray(image.GetOrigin(), dtype=np.float64),
        row_direction=row_dir,
        column_direction=col_dir,
        normal=third,
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        size=(int(size[0]), int(size[1]), int(size[2])),
    )
