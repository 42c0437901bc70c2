"""Synthetic CT + RTSTRUCT study whose ground truth is known analytically.

Every later NETRT test (mask accuracy, overlays, anonymization, networking) needs a study it can
trust more than the code under test. This module builds one: a head-like phantom made of simple
solids (sphere, box, hollow sphere, torus, skull shell, body cylinder) with

* ground-truth masks computed by evaluating each solid's implicit function at every voxel
  CENTRE (never derived from the contours, so a contour bug cannot hide in the truth),
* contours that are the exact planar cross-sections, written as equal-area polygons so a
  pixel-centre / even-odd rasteriser reproduces the truth almost exactly,
* CT pixels whose HU encode the ROIs, and DICOM files complete enough to pass ``dciodvfy``.

Shapes are placed in the IMAGE frame (u along the row direction, v along the column direction,
w along the slice normal, origin at the volume centre), so an oblique series keeps the box a
rectangle in every slice and the torus axis along the slice normal. Voxel (k, i, j) has
image-frame coordinates ``u = (j - (columns-1)/2)*dx``, ``v = (i - (rows-1)/2)*dy``,
``w = (k - (slices-1)/2)*dz`` and patient (LPS) coordinate ``centre + u*row + v*col + w*normal``,
which is exactly what ImagePositionPatient + ImageOrientationPatient say it is.
"""

from __future__ import annotations

import datetime
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from netrt.errors import NetrtError

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
Vec3 = tuple[float, float, float]
Loop = FloatArray  # (N, 2) polygon vertices (u, v) in the image frame, mm

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# What treatment planning systems put in RTReferencedStudySequence > ReferencedSOPClassUID.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"

MANIFEST_NAME = "phantom.json"
MANIFEST_FORMAT = "netrt-phantom/1"
DICOM_DIR = "dicom"
TRUTH_DIR = "truth"
RTSTRUCT_NAME = "RS.dcm"

COVERAGE_MM = 120.0  # slices=None: enough slices to cover this much along the normal
CONTOUR_TOLERANCE_MM = 0.025  # max polygon-vs-curve deviation (the contract: < 0.05 mm)
MAX_EXTRA_SPHERES = 8
NOISE_SIGMA_HU = 6.0
HU_AIR = -1000
RESCALE_INTERCEPT = -1024
# Fixed acquisition date/time: the same spec must give byte-identical, comparable output.
ACQUISITION_DATE = "20240315"
ACQUISITION_TIME = "101500"
# Shape centres are shifted by this odd amount so no box face or sphere pole lands exactly on a
# voxel centre for common spacings (a tie there would make "inside" depend on rounding).
PLACEMENT_JITTER_MM: Vec3 = (0.37, 0.29, 0.23)


# --------------------------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomSpec:
    """What to generate; every field is validated by :func:`validate_spec` with a named message."""

    rows: int = 256
    columns: int = 256
    pixel_spacing: tuple[float, float] = (1.0, 1.0)  # DICOM order: (row spacing, column spacing) mm
    slice_spacing: float = 2.0  # mm between slice centres
    slices: int | None = None  # None: enough slices to cover 120 mm
    orientation: str = "axial"  # "axial" | "oblique"
    # Rotations (degrees) about patient x, then y, then z (extrinsic) used when oblique.
    oblique_degrees: tuple[float, float, float] = (20.0, 10.0, 0.0)
    # InstanceNumber 1 at the highest slice position; SliceLocation omitted.
    reverse_order: bool = False
    extra_spheres: int = 0  # additional sphere ROIs "sphere_2".. (radius 10 mm), at most 8
    patient_name: str = "PHANTOM^NETRT"
    patient_id: str = "NETRT-PHANTOM-001"
    patient_birth_date: str = "19700101"
    accession_number: str = "ACC0001"
    study_description: str = "NETRT phantom"
    seed: int = 0
    modality: str = "CT"  # CT only for now
    # Patient (LPS) coordinate of the volume centre; off the origin so origin bugs show.
    volume_centre: tuple[float, float, float] = (0.0, -20.0, 100.0)
    # Real-world variants (issue 18). Left at their defaults they change nothing, UIDs included.
    # "instances": the CT files carry new SOPInstanceUIDs the RTSTRUCT does not know (a re-export
    # after contouring); "series": a new SeriesInstanceUID too.
    stale_references: str = ""
    # ContourGeometricType written for every contour: "CLOSED_PLANAR" or "CLOSEDPLANAR_XOR".
    contour_type: str = "CLOSED_PLANAR"
    # Each contour point moved along the slice normal by a seeded uniform amount in +-this (mm),
    # as float exports of some planning systems do (0.01-0.2 mm); 0 keeps every point in-plane.
    off_plane_jitter_mm: float = 0.0
    # A second image series in the same frame of reference (a registered scan; the RTSTRUCT does
    # not reference it): "shifted" on a grid half a slice spacing off the planning CT's slices,
    # "same_grid" on the planning CT's slice positions (like a second phase). Files CT2_*.dcm.
    registered_series: str = ""
    # "legacy": the CT is written as one Legacy Converted Enhanced CT multi-frame file (CT_MF.dcm,
    # frames converted by highdicom from the classic slices: same pixels, same positions) and the
    # RTSTRUCT references its frames (ReferencedSOPInstanceUID + ReferencedFrameNumber).
    multiframe: str = ""

    @property
    def slice_count(self) -> int:
        """Number of slices, resolving ``slices=None`` to the 120 mm coverage rule."""
        if self.slices is not None:
            return self.slices
        return max(1, math.ceil(COVERAGE_MM / self.slice_spacing - 1e-9))


@dataclass(frozen=True)
class PhantomGeometry:
    """The CT grid, in DICOM/ITK LPS terms.

    ``origin`` is the ImagePositionPatient of the first slice in spatial order;
    ``row_direction`` (IOP[0:3]) is the direction of increasing column index,
    ``column_direction`` (IOP[3:6]) that of increasing row index, ``slice_normal`` their cross
    product (increasing slice index). ``spacing`` and ``size`` are in ITK order (x = columns,
    y = rows, z = slices).
    """

    origin: Vec3
    row_direction: Vec3
    column_direction: Vec3
    slice_normal: Vec3
    spacing: Vec3
    size: tuple[int, int, int]
    centre: Vec3

    def direction_matrix(self) -> FloatArray:
        """3x3 matrix whose columns are row direction, column direction and slice normal."""
        return np.array([self.row_direction, self.column_direction, self.slice_normal]).T

    def slice_position(self, k: int) -> FloatArray:
        """ImagePositionPatient of spatial slice ``k``: origin + k*spacing*normal."""
        return np.asarray(self.origin) + k * self.spacing[2] * np.asarray(self.slice_normal)

    def voxel_to_patient(self, k: npt.ArrayLike, i: npt.ArrayLike, j: npt.ArrayLike) -> FloatArray:
        """Patient (LPS, mm) coordinates of voxel centres; indices broadcast, result (..., 3)."""
        kk, ii, jj = (np.asarray(a, dtype=np.float64)[..., None] for a in (k, i, j))
        points: FloatArray = (
            np.asarray(self.origin)
            + jj * self.spacing[0] * np.asarray(self.row_direction)
            + ii * self.spacing[1] * np.asarray(self.column_direction)
            + kk * self.spacing[2] * np.asarray(self.slice_normal)
        )
        return points

    def to_image_frame(self, points_lps: npt.ArrayLike) -> FloatArray:
        """Image-frame (u, v, w) mm relative to the volume centre, for LPS points (..., 3)."""
        rel = np.asarray(points_lps, dtype=np.float64) - np.asarray(self.centre)
        uvw: FloatArray = rel @ self.direction_matrix()
        return uvw


@dataclass(frozen=True)
class RoiTruth:
    """One ROI's analytic description and what its truth mask holds on this grid.

    ``centre`` is in the image frame (mm from the volume centre along row direction, column
    direction, slice normal); ``centre_patient`` is the same point in LPS. ``analytic_volume_mm3``
    is the solid's exact volume (for the infinite body cylinder: ellipse area x the slab the
    slices cover); ``inside_field`` says whether the grid holds all of it, i.e. whether
    ``truth_voxel_count * voxel volume`` should approximate the analytic volume.
    """

    name: str
    number: int
    shape: str  # kind of solid: "sphere", "box", "hollow_sphere", "torus", "ellipsoid_shell", ...
    parameters: dict[str, Any]
    centre: Vec3
    centre_patient: Vec3
    analytic_volume_mm3: float
    truth_voxel_count: int
    inside_field: bool
    hu: int
    color: tuple[int, int, int]
    interpreted_type: str


@dataclass(frozen=True)
class PhantomManifest:
    """Everything a test needs to know about a written phantom; saved as ``phantom.json``.

    ``image_files`` and ``image_sop_instance_uids`` are in SPATIAL order (index k matches the
    first axis of the truth masks), not InstanceNumber order; ``instance_numbers`` maps them.
    """

    spec: PhantomSpec
    study_instance_uid: str
    frame_of_reference_uid: str
    image_series_uid: str
    rtstruct_series_uid: str
    rtstruct_sop_instance_uid: str
    image_sop_instance_uids: list[str]
    instance_numbers: list[int]
    image_files: list[Path]
    rtstruct_file: Path
    truth_files: dict[str, Path]
    rois: list[RoiTruth]
    geometry: PhantomGeometry
    out_dir: Path = field(default=Path("."))
    registered_files: list[Path] = field(default_factory=list)  # spec.registered_series, spatial order

    def roi(self, name: str) -> RoiTruth:
        """The ROI called ``name``; NetrtError if there is none."""
        for roi in self.rois:
            if roi.name == name:
                return roi
        raise NetrtError(f"phantom manifest has no ROI {name!r}")


# --------------------------------------------------------------------------------------------
# Spec validation and geometry
# --------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_numbers(value: object, count: int) -> bool:
    if not isinstance(value, tuple | list) or len(value) != count:
        return False
    return all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value)


def _check_text(name: str, value: object, max_len: int, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, str):
        return [f"PhantomSpec.{name} must be a string, got {value!r}"]
    if not value and not allow_empty:
        return [f"PhantomSpec.{name} must not be empty"]
    if len(value) > max_len or "\\" in value or any(ord(c) < 32 for c in value):
        return [f"PhantomSpec.{name} must be at most {max_len} printable characters without '\\'"]
    return []


def _check_date(value: object) -> list[str]:
    if value == "":
        return []
    try:
        ok = isinstance(value, str) and len(value) == 8 and value.isdigit()
        ok = ok and bool(datetime.datetime.strptime(str(value), "%Y%m%d"))
    except ValueError:
        ok = False
    return [] if ok else [f"PhantomSpec.patient_birth_date must be YYYYMMDD or empty, got {value!r}"]


def _grid_problems(spec: PhantomSpec) -> list[str]:
    problems = []
    for name in ("rows", "columns"):
        value = getattr(spec, name)
        if not _is_int(value) or not 8 <= value <= 4096:
            problems.append(f"PhantomSpec.{name} must be an integer in 8..4096, got {value!r}")
    if not _finite_numbers(spec.pixel_spacing, 2) or min(spec.pixel_spacing) <= 0:
        problems.append(f"PhantomSpec.pixel_spacing must be two finite numbers > 0, got {spec.pixel_spacing!r}")
    ss = spec.slice_spacing
    if not _finite_numbers((ss,), 1) or ss <= 0:
        problems.append(f"PhantomSpec.slice_spacing must be a finite number > 0, got {ss!r}")
    elif spec.slices is None and COVERAGE_MM / ss > 9999:
        problems.append(f"PhantomSpec.slice_spacing {ss!r} needs more than 9999 slices to cover 120 mm")
    if spec.slices is not None and (not _is_int(spec.slices) or not 1 <= spec.slices <= 9999):
        problems.append(f"PhantomSpec.slices must be None or an integer in 1..9999, got {spec.slices!r}")
    if spec.orientation not in ("axial", "oblique"):
        problems.append(f"PhantomSpec.orientation must be 'axial' or 'oblique', got {spec.orientation!r}")
    if not _finite_numbers(spec.oblique_degrees, 3):
        problems.append(f"PhantomSpec.oblique_degrees must be three finite numbers, got {spec.oblique_degrees!r}")
    # Bounded so every contour coordinate fits a 16-character DS value.
    if not _finite_numbers(spec.volume_centre, 3) or max(abs(x) for x in spec.volume_centre) > 10000:
        problems.append(
            f"PhantomSpec.volume_centre must be three numbers within +-10000 mm, got {spec.volume_centre!r}"
        )
    return problems


def _content_problems(spec: PhantomSpec) -> list[str]:
    problems = []
    if not isinstance(spec.reverse_order, bool):
        problems.append(f"PhantomSpec.reverse_order must be a bool, got {spec.reverse_order!r}")
    if not _is_int(spec.extra_spheres) or not 0 <= spec.extra_spheres <= MAX_EXTRA_SPHERES:
        problems.append(
            f"PhantomSpec.extra_spheres must be an integer in 0..{MAX_EXTRA_SPHERES}, got {spec.extra_spheres!r}"
        )
    if spec.modality not in _MODALITIES:
        problems.append(f"PhantomSpec.modality must be one of {sorted(_MODALITIES)}, got {spec.modality!r}")
    if not _is_int(spec.seed) or spec.seed < 0:
        problems.append(f"PhantomSpec.seed must be an integer >= 0, got {spec.seed!r}")
    if spec.stale_references not in ("", "instances", "series"):
        problems.append(
            f"PhantomSpec.stale_references must be '', 'instances' or 'series', got {spec.stale_references!r}"
        )
    if spec.contour_type not in ("CLOSED_PLANAR", "CLOSEDPLANAR_XOR"):
        problems.append(
            f"PhantomSpec.contour_type must be 'CLOSED_PLANAR' or 'CLOSEDPLANAR_XOR', got {spec.contour_type!r}"
        )
    jitter = spec.off_plane_jitter_mm
    if not _finite_numbers((jitter,), 1) or not 0 <= jitter < spec.slice_spacing / 4:
        problems.append(f"PhantomSpec.off_plane_jitter_mm must be a number in [0, slice_spacing / 4), got {jitter!r}")
    if spec.multiframe not in ("", "legacy"):
        problems.append(f"PhantomSpec.multiframe must be '' or 'legacy', got {spec.multiframe!r}")
    if spec.multiframe and spec.registered_series:
        problems.append("PhantomSpec.multiframe and registered_series cannot be combined")
    if spec.registered_series not in ("", "shifted", "same_grid"):
        problems.append(
            f"PhantomSpec.registered_series must be '', 'shifted' or 'same_grid', got {spec.registered_series!r}"
        )
    problems += _check_text("patient_name", spec.patient_name, 64)
    problems += _check_text("patient_id", spec.patient_id, 64)
    problems += _check_text("accession_number", spec.accession_number, 16, allow_empty=True)
    problems += _check_text("study_description", spec.study_description, 64, allow_empty=True)
    problems += _check_date(spec.patient_birth_date)
    return problems


def validate_spec(spec: PhantomSpec) -> None:
    """Raise NetrtError listing every bad field, so a test author fixes them in one go."""
    problems = _grid_problems(spec) + _content_problems(spec)
    if problems:
        raise NetrtError("invalid phantom spec: " + "; ".join(problems))


def _rotation(degrees: Sequence[float]) -> FloatArray:
    """Extrinsic rotation about patient x, then y, then z (R = Rz @ Ry @ Rx)."""
    ax, ay, az = (math.radians(d) for d in degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    rotation: FloatArray = rz @ ry @ rx
    rotation[np.abs(rotation) < 1e-15] = 0.0  # cos(90 deg) noise would print as 6e-17 in IOP
    return rotation


def _vec3(a: npt.ArrayLike) -> Vec3:
    x, y, z = (float(v) for v in np.asarray(a, dtype=np.float64))
    return (x, y, z)


def phantom_geometry(spec: PhantomSpec) -> PhantomGeometry:
    """The CT grid of ``spec``: volume centred on ``spec.volume_centre`` in the chosen orientation."""
    validate_spec(spec)
    degrees = spec.oblique_degrees if spec.orientation == "oblique" else (0.0, 0.0, 0.0)
    rotation = _rotation(degrees)
    dx, dy, dz = spec.pixel_spacing[1], spec.pixel_spacing[0], spec.slice_spacing
    n = spec.slice_count
    half = np.array([(spec.columns - 1) / 2 * dx, (spec.rows - 1) / 2 * dy, (n - 1) / 2 * dz])
    centre = np.asarray(spec.volume_centre, dtype=np.float64)
    return PhantomGeometry(
        origin=_vec3(centre - rotation @ half),
        row_direction=_vec3(rotation[:, 0]),
        column_direction=_vec3(rotation[:, 1]),
        slice_normal=_vec3(rotation[:, 2]),
        spacing=(float(dx), float(dy), float(dz)),
        size=(spec.columns, spec.rows, n),
        centre=_vec3(centre),
    )


def _axis_coords(count: int, spacing: float) -> FloatArray:
    """Image-frame coordinate of each index along one axis (0 at the volume centre)."""
    return (np.arange(count, dtype=np.float64) - (count - 1) / 2.0) * spacing


# --------------------------------------------------------------------------------------------
# Shapes: implicit function, bounds, exact cross-sections
# --------------------------------------------------------------------------------------------


def _equal_area_error(n: int) -> float:
    """Worst relative deviation of an n-gon scaled to the circle's area from the unit circle."""
    scale = math.sqrt(2 * math.pi / (n * math.sin(2 * math.pi / n)))
    return max(scale - 1.0, 1.0 - scale * math.cos(math.pi / n))


def _vertex_count(max_radius: float) -> int:
    """Fewest vertices (multiple of 4, >= 16) keeping the polygon within tolerance of the curve."""
    n = max(16, 4 * math.ceil(math.pi * math.sqrt(max_radius / (3 * CONTOUR_TOLERANCE_MM)) / 4))
    while max_radius * _equal_area_error(n) >= CONTOUR_TOLERANCE_MM:
        n += 4
    return n


def ellipse_loop(cu: float, cv: float, a: float, b: float) -> Loop:
    """Polygon with the same area as the ellipse (semi-axes a along u, b along v).

    Vertices sit on the ellipse scaled by sqrt(pi / polygon area), so the area error of the
    inscribed polygon is cancelled: a rasteriser then counts the same number of voxels as the
    analytic truth instead of systematically fewer.
    """
    n = _vertex_count(max(a, b))
    scale = math.sqrt(2 * math.pi / (n * math.sin(2 * math.pi / n)))
    t = np.arange(n) * (2 * math.pi / n)
    return np.stack([cu + a * scale * np.cos(t), cv + b * scale * np.sin(t)], axis=1)


def _rectangle_loop(cu: float, cv: float, hu: float, hv: float) -> Loop:
    return np.array([[cu - hu, cv - hv], [cu + hu, cv - hv], [cu + hu, cv + hv], [cu - hu, cv + hv]])


@dataclass(frozen=True)
class Shape(ABC):
    """A solid in the image frame; subclasses give its implicit function and cross-sections."""

    centre: Vec3

    kind = "shape"

    @abstractmethod
    def inside_local(self, u: FloatArray, v: FloatArray, w: FloatArray) -> BoolArray:
        """Membership for coordinates relative to the centre (arrays broadcast together)."""

    @abstractmethod
    def half_extent(self) -> Vec3:
        """Half size of the axis-aligned bounding box (math.inf when unbounded)."""

    @abstractmethod
    def section_local(self, w: float) -> list[Loop]:
        """Cross-section loops (even-odd filled) at height ``w`` above the centre."""

    @abstractmethod
    def volume(self, slab: tuple[float, float]) -> float:
        """Analytic volume in mm^3; ``slab`` (w range) only matters for unbounded solids."""

    @abstractmethod
    def parameters(self) -> dict[str, Any]:
        """The numbers that define the solid, for the manifest."""

    def inside(self, u: FloatArray, v: FloatArray, w: FloatArray) -> BoolArray:
        """Membership for image-frame coordinates (mm from the volume centre)."""
        cu, cv, cw = self.centre
        return self.inside_local(u - cu, v - cv, w - cw)

    def section(self, w: float) -> list[Loop]:
        """Cross-section loops at image-frame height ``w``, in image-frame (u, v)."""
        offset = np.array(self.centre[:2])
        return [loop + offset for loop in self.section_local(w - self.centre[2])]


@dataclass(frozen=True)
class Sphere(Shape):
    radius: float = 20.0
    kind = "sphere"

    def inside_local(self, u: FloatArray, v: FloatArray, w: FloatArray) -> BoolArray:
        return np.asarray(u * u + v * v + w * w < self.radius**2)

    def half_extent(self) -> Vec3:
        return (self.radius, self.radius, self.radius)

    def section_local(self, w: float) -> list[Loop]:
        rho2 = self.radius**2 - w * w
        return [ellipse_loop(0.0, 0.0, math.sqrt(rho2), math.sqrt(rho2))] if rho2 > 0 else []

    def volume(self, slab: tuple[float, float]) -> float:
        return 4.0 / 3.0 * math.pi * self.radius**3

    def parameters(self) -> dict[str, Any]:
        return {"radius_mm": self.radius}


@dataclass(frozen=True)
class HollowSphere(Shape):
    outer_radius: float = 22.0
    inner_radius: float = 12.0
    kind = "hollow_sphere"

    def inside_local(self, u: FloatArray, v: FloatArray, w: FloatArray) -> BoolArray:
        d2 = u * u + v * v + w * w
        return np.asarray((d2 < self.outer_radius**2) & (d2 >= self.inner_radius**2))

    def half_extent(self) -> Vec3:
        return (self.outer_radius, self.outer_radius, self.outer_radius)

    def section_local(self, w: float) -> list[Loop]:
        loops = []
        for radius in (self.outer_radius, self.inner_radius):
            rho2 = radius**2 - w * w
            if rho2 > 0:
                loops.append(ellipse_loop(0.0, 0.0, math.sqrt(rho2), math.sqrt(rho2)))
        return loops

    def volume(self, slab: tuple[float, float]) -> float:
        return 4.0 / 3.0 * math.pi * (self.outer_radius**3 - self.inner_radius**3)

    def parameters(self) -> dict[str, Any]:
        return {"outer_radius_mm": self.outer_radius, "inner_radius_mm": self.inner_radius}


@dataclass(frozen=True)
class Box(Shape):
    size: Vec3 = (40.0, 30.0, 24.0)  # along u (row direction), v (column direction), w (normal)
    kind = "box"

    def inside_local(self, u: FloatArray, v: FloatArray, w: FloatArray) -> BoolArray:
        hu, hv, hw = (s / 2 for s in self.size)
        return np.asarray((np.abs(u) < hu) & (np.abs(v) < hv) & (np.abs(w) < hw))

    def half_extent(self) -> Vec3:
        hu, hv, hw = (s / 2 for s in self.size)
        return (hu, hv, hw)

    def section_local(self, w: float) -> list[Loop]:
        hu, hv, hw = self.half_extent()
        return [_rectangle_loop(0.0, 0.0, hu, hv)] if abs(w) < hw else []

    def volume(self, slab: tuple[float, float]) -> float:
        return self.size[0] * self.size[1] * self.size[2]

    def parameters(self) -> dict[str, Any]:
        return {"size_mm": list(self.size)}


@dataclass(frozen=True)
class Torus(Shape):
    """Ring around the slice normal: every cutting slice shows an annulus."""

    major_radius: float = 25.0
    minor_radius: float = 8.0
    kind = "torus"

    def inside_local(self, u: FloatArray, v: FloatArray, w: FloatArray) -> BoolArray:
        ring = np.sqrt(u * u + v * v) - self.major_radius
        return np.asarray(ring * ring + w * w < self.minor_radius**2)

    def half_extent(self) -> Vec3:
        reach = self.major_radius + self.minor_radius
        return (reach, reach, self.minor_radius)

    def section_local(self, w: float) -> list[Loop]:
        s2 = self.minor_radius**2 - w * w
        if s2 <= 0:
            return []
        s = math.sqrt(s2)
        outer, inner = self.major_radius + s, self.major_radius - s
        return [ellipse_loop(0.0, 0.0, outer, outer), ellipse_loop(0.0, 0.0, inner, inner)]

    def volume(self, slab: tuple[float, float]) -> float:
        return 2.0 * math.pi**2 * self.major_radius * self.minor_radius**2

    def parameters(self) -> dict[str, Any]:
        return {"major_radius_mm": self.major_radius, "minor_radius_mm": self.minor_radius}


@dataclass(frozen=True)
class EllipsoidShell(Shape):
    """Skull: the region between an ellipsoid and one shrunk by ``thickness`` on each semi-axis."""

    semi_axes: Vec3 = (104.0, 86.0, 56.0)
    thickness: float = 6.0
    kind = "ellipsoid_shell"

    def _inner(self) -> Vec3:
        a, b, c = (s - self.thickness for s in self.semi_axes)
        return (a, b, c)

    @staticmethod
    def _level(axes: Vec3, u: FloatArray, v: FloatArray, w: FloatArray) -> FloatArray:
        a, b, c = axes
        return np.asarray((u / a) ** 2 + (v / b) ** 2 + (w / c) ** 2)

    def inside_local(self, u: FloatArray, v: FloatArray, w: FloatArray) -> BoolArray:
        outer = self._level(self.semi_axes, u, v, w) < 1.0
        inner = self._level(self._inner(), u, v, w) < 1.0
        return np.asarray(outer & ~inner)

    def half_extent(self) -> Vec3:
        return self.semi_axes

    def section_local(self, w: float) -> list[Loop]:
        loops = []
        for a, b, c in (self.semi_axes, self._inner()):
            f = 1.0 - (w / c) ** 2
            if f > 0:
                loops.append(ellipse_loop(0.0, 0.0, a * math.sqrt(f), b * math.sqrt(f)))
        return loops

    def volume(self, slab: tuple[float, float]) -> float:
        return 4.0 / 3.0 * math.pi * (math.prod(self.semi_axes) - math.prod(self._inner()))

    def parameters(self) -> dict[str, Any]:
        return {"outer_semi_axes_mm": list(self.semi_axes), "inner_semi_axes_mm": list(self._inner())}


@dataclass(frozen=True)
class EllipticCylinder(Shape):
    """Body outline: infinite along the slice normal, an ellipse on every slice."""

    semi_axes: tuple[float, float] = (116.0, 98.0)
    kind = "elliptic_cylinder"

    def inside_local(self, u: FloatArray, v: FloatArray, w: FloatArray) -> BoolArray:
        a, b = self.semi_axes
        return np.asarray((u / a) ** 2 + (v / b) ** 2 < 1.0)

    def half_extent(self) -> Vec3:
        return (self.semi_axes[0], self.semi_axes[1], math.inf)

    def section_local(self, w: float) -> list[Loop]:
        return [ellipse_loop(0.0, 0.0, *self.semi_axes)]

    def volume(self, slab: tuple[float, float]) -> float:
        return math.pi * self.semi_axes[0] * self.semi_axes[1] * (slab[1] - slab[0])

    def parameters(self) -> dict[str, Any]:
        return {"semi_axes_mm": list(self.semi_axes), "axis": "slice_normal"}


# --------------------------------------------------------------------------------------------
# The ROI layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoiDefinition:
    """An ROI of the phantom: its solid plus how it looks in CT and in the RTSTRUCT."""

    name: str
    number: int
    shape: Shape
    hu: int
    color: tuple[int, int, int]
    interpreted_type: str = "ORGAN"


# Extra sphere centres (image frame, mm): each clear of the others and inside the skull cavity.
_EXTRA_SPHERE_CENTRES: tuple[Vec3, ...] = (
    (0.0, 52.0, 0.0),
    (0.0, 0.0, 30.0),
    (0.0, 0.0, -30.0),
    (-45.0, 48.0, 0.0),
    (45.0, 48.0, 0.0),
    (-50.0, -46.0, 0.0),
    (50.0, -46.0, 0.0),
    (-40.0, 0.0, -32.0),
)
_EXTRA_COLORS = ((255, 128, 0), (128, 0, 255), (0, 128, 255), (255, 0, 128), (128, 255, 0))


def _placed(u: float, v: float, w: float) -> Vec3:
    ju, jv, jw = PLACEMENT_JITTER_MM
    return (u + ju, v + jv, w + jw)


def roi_definitions(spec: PhantomSpec) -> list[RoiDefinition]:
    """The phantom's ROIs in RTSTRUCT order (also the painting order is derived from it)."""
    validate_spec(spec)
    rois = [
        RoiDefinition("sphere", 0, Sphere(_placed(-58.0, 0.0, 6.0), 20.0), 120, (255, 0, 0), "GTV"),
        RoiDefinition("box", 0, Box(_placed(0.0, -54.0, 0.0), (40.0, 30.0, 24.0)), 200, (0, 200, 0), "PTV"),
        RoiDefinition("hollow_sphere", 0, HollowSphere(_placed(60.0, 2.0, -4.0), 22.0, 12.0), 300, (0, 0, 255)),
        RoiDefinition("torus", 0, Torus(_placed(0.0, 0.0, 0.0), 25.0, 8.0), -120, (255, 255, 0)),
    ]
    for index in range(spec.extra_spheres):
        rois.append(
            RoiDefinition(
                f"sphere_{index + 2}",
                0,
                Sphere(_placed(*_EXTRA_SPHERE_CENTRES[index]), 10.0),
                380 + 40 * index,
                _EXTRA_COLORS[index % len(_EXTRA_COLORS)],
            )
        )
    rois.append(RoiDefinition("Skull", 0, EllipsoidShell(_placed(0.0, 0.0, 0.0)), 700, (230, 230, 200)))
    outline = EllipticCylinder(_placed(0.0, 0.0, 0.0), (116.0, 98.0))
    rois.append(RoiDefinition("Patient_Outline", 0, outline, 40, (0, 255, 255), "EXTERNAL"))
    return [RoiDefinition(r.name, n, r.shape, r.hu, r.color, r.interpreted_type) for n, r in enumerate(rois, 1)]


def roi_names(spec: PhantomSpec) -> list[str]:
    """Names of the ROIs ``spec`` produces, in RTSTRUCT order."""
    return [roi.name for roi in roi_definitions(spec)]


def _roi_definition(spec: PhantomSpec, name: str) -> RoiDefinition:
    for roi in roi_definitions(spec):
        if roi.name == name:
            return roi
    raise NetrtError(f"phantom has no ROI {name!r}; it has {roi_names(spec)}")


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


def _index_range(centre: float, half: float, count: int, spacing: float) -> tuple[int, int]:
    """Index slice [lo, hi) of voxels that can lie within centre +- half along one axis."""
    if math.isinf(half):
        return 0, count
    offset = (count - 1) / 2.0
    lo = math.floor((centre - half) / spacing + offset) - 1
    hi = math.ceil((centre + half) / spacing + offset) + 2
    return max(0, lo), min(count, max(0, hi))


def _shape_mask(shape: Shape, geometry: PhantomGeometry) -> BoolArray:
    """Truth of one solid on the grid, evaluated only inside its bounding box (fast, small)."""
    (nx, ny, nz), (dx, dy, dz) = geometry.size, geometry.spacing
    mask = np.zeros((nz, ny, nx), dtype=bool)
    half = shape.half_extent()
    ranges = [
        _index_range(c, h, n, d) for c, h, n, d in zip(shape.centre, half, (nx, ny, nz), (dx, dy, dz), strict=True)
    ]
    (j0, j1), (i0, i1), (k0, k1) = ranges
    if j0 >= j1 or i0 >= i1 or k0 >= k1:
        return mask
    u = _axis_coords(nx, dx)[j0:j1][None, None, :]
    v = _axis_coords(ny, dy)[i0:i1][None, :, None]
    w = _axis_coords(nz, dz)[k0:k1][:, None, None]
    inside = shape.inside(u, v, w)
    mask[k0:k1, i0:i1, j0:j1] = np.broadcast_to(inside, (k1 - k0, i1 - i0, j1 - j0))
    return mask


def _inside_field(shape: Shape, geometry: PhantomGeometry) -> bool:
    """Whether the voxels (each a full cell around its centre) hold the whole solid."""
    half_field = [n * d / 2.0 for n, d in zip(geometry.size, geometry.spacing, strict=True)]
    reach = shape.half_extent()
    axes = 2 if isinstance(shape, EllipticCylinder) else 3
    return all(abs(shape.centre[a]) + reach[a] <= half_field[a] for a in range(axes))


def truth_mask(spec: PhantomSpec, name: str) -> BoolArray:
    """Truth of one ROI, indexed [slice, row, column] in spatial slice order."""
    return _shape_mask(_roi_definition(spec, name).shape, phantom_geometry(spec))


def truth_masks(spec: PhantomSpec) -> dict[str, BoolArray]:
    """Truth of every ROI, bool arrays indexed [slice, row, column] in spatial slice order.

    A voxel belongs to an ROI when its centre satisfies the solid's implicit function. For big
    grids prefer :func:`truth_mask` (one ROI at a time) to keep memory down.
    """
    geometry = phantom_geometry(spec)
    return {roi.name: _shape_mask(roi.shape, geometry) for roi in roi_definitions(spec)}


def roi_contains(spec: PhantomSpec, name: str, points_lps: npt.ArrayLike) -> BoolArray:
    """Analytic membership of arbitrary patient (LPS, mm) points, shape (..., 3) -> (...).

    Lets tests judge resampled or reformatted output (sagittal/coronal overlays) against the
    solid itself instead of against a voxelised truth on a different grid.
    """
    uvw = phantom_geometry(spec).to_image_frame(points_lps)
    shape = _roi_definition(spec, name).shape
    return np.asarray(shape.inside(uvw[..., 0], uvw[..., 1], uvw[..., 2]))


# --------------------------------------------------------------------------------------------
# DICOM writing
# --------------------------------------------------------------------------------------------


#: Options added after phantoms were first written: left out of the fingerprint at their default,
#: so that every phantom made before keeps its UIDs.
_LATER_OPTIONS = {
    "stale_references": "",
    "contour_type": "CLOSED_PLANAR",
    "off_plane_jitter_mm": 0.0,
    "registered_series": "",
    "multiframe": "",
}


def _spec_fingerprint(spec: PhantomSpec) -> str:
    values = {k: v for k, v in asdict(spec).items() if _LATER_OPTIONS.get(k, object()) != v}
    return json.dumps(values, sort_keys=True)


def _uid(spec: PhantomSpec, role: str) -> str:
    """Deterministic UID: the same spec (seed included) always gives the same UIDs."""
    return str(generate_uid(entropy_srcs=["netrt-phantom", _spec_fingerprint(spec), role]))


@dataclass(frozen=True)
class _Uids:
    study: str
    frame: str
    image_series: str
    rtstruct_series: str
    rtstruct_instance: str
    images: list[str]  # spatial order: what the CT files carry
    referenced_series: str = ""  # what the RTSTRUCT names (differs only for stale references)
    referenced_images: tuple[str, ...] = ()
    # spec.multiframe: the frame of the multi-frame file holding spatial slice k (0: classic files)
    referenced_frames: tuple[int, ...] = ()
    referenced_class: str = CT_IMAGE_STORAGE

    @classmethod
    def for_spec(cls, spec: PhantomSpec) -> _Uids:
        images = [_uid(spec, f"image-{k}") for k in range(spec.slice_count)]
        image_series = _uid(spec, "image-series")
        stale = spec.stale_references
        return cls(
            study=_uid(spec, "study"),
            frame=_uid(spec, "frame-of-reference"),
            image_series=image_series,
            rtstruct_series=_uid(spec, "rtstruct-series"),
            rtstruct_instance=_uid(spec, "rtstruct-instance"),
            images=images,
            referenced_series=_uid(spec, "stale-image-series") if stale == "series" else image_series,
            referenced_images=tuple(_uid(spec, f"stale-image-{k}") for k in range(len(images)))
            if stale
            else tuple(images),
        )


def _ds(values: Sequence[float] | FloatArray) -> list[str]:
    """DS strings at full 16-character precision (pydicom refuses longer float reprs)."""
    return [format_number_as_ds(0.0 if abs(float(x)) < 1e-12 else float(x)) for x in values]


def _instance_number(spec: PhantomSpec, k: int) -> int:
    return spec.slice_count - k if spec.reverse_order else k + 1


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "NETRT_PHANTOM"
    return meta


def _base_dataset(spec: PhantomSpec, uids: _Uids, sop_class: str, sop_instance: str) -> Dataset:
    """SOP Common, Patient, General Study and General Equipment: shared by CT and RTSTRUCT."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_instance)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.InstanceCreationDate = ACQUISITION_DATE
    ds.InstanceCreationTime = ACQUISITION_TIME
    ds.StudyDate = ACQUISITION_DATE
    ds.StudyTime = ACQUISITION_TIME
    ds.AccessionNumber = spec.accession_number
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = spec.study_description
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uids.study
    ds.StudyID = "1"
    ds.Manufacturer = "NETRT phantom"
    ds.InstitutionName = "NETRT"
    ds.StationName = "PHANTOM"
    ds.ManufacturerModelName = "Analytic phantom"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "netrt-phantom 1"
    return ds


def _add_ct_acquisition(ds: Dataset) -> None:
    """CT Image module attributes a scanner writes (values typical of a head protocol)."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = "256"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = "300"
    ds.Exposure = "300"
    ds.FilterType = "BODY"
    ds.GeneratorPower = "36"
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "STANDARD"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.WindowCenterWidthExplanation = "SOFT TISSUE"


def _add_image_plane(ds: Dataset, spec: PhantomSpec, geometry: PhantomGeometry, k: int) -> None:
    position = geometry.slice_position(k)
    ds.ImagePositionPatient = _ds(position)
    ds.ImageOrientationPatient = _ds(list(geometry.row_direction) + list(geometry.column_direction))
    ds.PixelSpacing = _ds(spec.pixel_spacing)
    ds.SliceThickness = _ds([spec.slice_spacing])[0]
    if not spec.reverse_order:
        ds.SliceLocation = _ds([float(np.dot(position, geometry.slice_normal))])[0]


def _add_image_pixel(ds: Dataset, pixels: npt.NDArray[np.int16]) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = pixels.astype("<i2", copy=False).tobytes()


def _ct_dataset(
    spec: PhantomSpec, geometry: PhantomGeometry, uids: _Uids, k: int, pixels: npt.NDArray[np.int16]
) -> Dataset:
    """One CT slice: CT Image IOD with the modules a scanner export carries."""
    ds = _base_dataset(spec, uids, CT_IMAGE_STORAGE, uids.images[k])
    ds.Modality = "CT"
    ds.SeriesInstanceUID = uids.image_series
    ds.SeriesNumber = 1
    ds.SeriesDate = ACQUISITION_DATE
    ds.SeriesTime = ACQUISITION_TIME
    ds.SeriesDescription = f"NETRT phantom {spec.orientation}"
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = uids.frame
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = ACQUISITION_DATE
    ds.AcquisitionTime = ACQUISITION_TIME
    ds.ContentDate = ACQUISITION_DATE
    ds.ContentTime = ACQUISITION_TIME
    ds.InstanceNumber = _instance_number(spec, k)
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    _add_image_plane(ds, spec, geometry, k)
    _add_image_pixel(ds, pixels)
    _add_ct_acquisition(ds)
    return ds


# Modality -> (SOP Class, dataset builder). MR would add its own builder and HU -> signal map.
_MODALITIES: dict[str, tuple[str, Callable[..., Dataset]]] = {"CT": (CT_IMAGE_STORAGE, _ct_dataset)}


def _slice_pixels(
    labels: npt.NDArray[np.uint8], lut: npt.NDArray[np.int16], noise: FloatArray
) -> npt.NDArray[np.int16]:
    """Stored values (HU - intercept) of one slice: label -> HU lookup plus rounded noise."""
    hu = lut[labels].astype(np.float64) + noise
    stored = np.clip(np.rint(hu), -1024, 3071) - RESCALE_INTERCEPT
    return stored.astype(np.int16)


def _write_ct_series(
    spec: PhantomSpec, geometry: PhantomGeometry, uids: _Uids, labels: npt.NDArray[np.uint8],
    lut: npt.NDArray[np.int16], dicom_dir: Path,
) -> list[Path]:  # fmt: skip
    """Write every slice; returns the files in spatial order."""
    rng = np.random.default_rng(spec.seed)
    builder = _MODALITIES[spec.modality][1]
    files = []
    for k in range(labels.shape[0]):
        noise = rng.normal(0.0, NOISE_SIGMA_HU, size=labels.shape[1:])
        ds = builder(spec, geometry, uids, k, _slice_pixels(labels[k], lut, noise))
        path = dicom_dir / f"{spec.modality}_{_instance_number(spec, k):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _write_registered_series(
    spec: PhantomSpec, geometry: PhantomGeometry, uids: _Uids, labels: npt.NDArray[np.uint8],
    lut: npt.NDArray[np.int16], dicom_dir: Path,
) -> list[Path]:  # fmt: skip
    """A second CT series in the same frame of reference (``spec.registered_series``), ``CT2_*.dcm``.

    Same in-plane grid and anatomy as the planning CT, its own series and instance UIDs and noise;
    "shifted" puts its slices half a slice spacing along the normal from the planning CT's (one
    slice fewer), "same_grid" on the same positions. The RTSTRUCT references none of it.
    """
    if not spec.registered_series:
        return []
    shift = 0.5 if spec.registered_series == "shifted" else 0.0
    rng = np.random.default_rng(spec.seed + 1)
    series_uid = _uid(spec, "registered-series")
    normal = np.asarray(geometry.slice_normal)
    files = []
    for k in range(labels.shape[0] - (1 if shift else 0)):
        noise = rng.normal(0.0, NOISE_SIGMA_HU, size=labels.shape[1:])
        ds = _ct_dataset(spec, geometry, uids, k, _slice_pixels(labels[k], lut, noise))
        sop_uid = _uid(spec, f"registered-image-{k}")
        ds.SOPInstanceUID = sop_uid
        ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 3
        ds.SeriesDescription = f"NETRT phantom registered ({spec.registered_series})"
        ds.InstanceNumber = k + 1
        position = geometry.slice_position(k) + shift * geometry.spacing[2] * normal
        ds.ImagePositionPatient = _ds(position)
        if "SliceLocation" in ds:
            ds.SliceLocation = _ds([float(np.dot(position, normal))])[0]
        path = dicom_dir / f"CT2_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _contour_image_item(sop_class: str, sop_instance: str, frame: int = 0) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if frame:
        item.ReferencedFrameNumber = frame
    return item


def _frame_of(uids: _Uids, k: int) -> int:
    return uids.referenced_frames[k] if uids.referenced_frames else 0


def _write_multiframe_ct(
    spec: PhantomSpec, geometry: PhantomGeometry, uids: _Uids, labels: npt.NDArray[np.uint8],
    lut: npt.NDArray[np.int16], dicom_dir: Path,
) -> tuple[Path, _Uids]:  # fmt: skip
    """The CT as one Legacy Converted Enhanced CT file, ``CT_MF.dcm`` (``spec.multiframe``).

    The classic slices are built exactly as :func:`_write_ct_series` builds them (same pixels and
    noise, so the twin without ``multiframe`` has the same image) and converted by highdicom's
    legacy converter; the returned UIDs make the RTSTRUCT reference the frames (the frame of each
    slice is read back from the converter's ConversionSourceAttributesSequence).
    """
    from highdicom.legacy import LegacyConvertedEnhancedCTImage  # about two seconds to import

    rng = np.random.default_rng(spec.seed)
    builder = _MODALITIES[spec.modality][1]
    datasets = []
    for k in range(labels.shape[0]):
        noise = rng.normal(0.0, NOISE_SIGMA_HU, size=labels.shape[1:])
        datasets.append(builder(spec, geometry, uids, k, _slice_pixels(labels[k], lut, noise)))
    instance = _uid(spec, "multiframe-image")
    converted = LegacyConvertedEnhancedCTImage(
        datasets, series_instance_uid=uids.image_series, series_number=1, sop_instance_uid=instance, instance_number=1
    )
    frame_of_uid = {
        str(item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID): number
        for number, item in enumerate(converted.PerFrameFunctionalGroupsSequence, 1)
    }
    frames = tuple(frame_of_uid[uid] for uid in uids.images)
    path = dicom_dir / "CT_MF.dcm"
    converted.save_as(path, enforce_file_format=True)
    referenced = _uid(spec, "stale-multiframe-image") if spec.stale_references else instance
    multiframe_uids = replace(
        uids,
        images=[instance] * len(uids.images),
        referenced_images=(referenced,) * len(uids.images),
        referenced_frames=frames,
        referenced_class=str(converted.SOPClassUID),
    )
    return path, multiframe_uids


def _referenced_frame(spec: PhantomSpec, uids: _Uids) -> Dataset:
    """ReferencedFrameOfReferenceSequence item listing every image of the series."""
    sop_class = uids.referenced_class
    order = sorted(range(spec.slice_count), key=lambda k: _frame_of(uids, k) or _instance_number(spec, k))
    series = Dataset()
    series.SeriesInstanceUID = uids.referenced_series
    series.ContourImageSequence = DicomSequence(
        [_contour_image_item(sop_class, uids.referenced_images[k], _frame_of(uids, k)) for k in order]
    )
    study = Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = uids.study
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = uids.frame
    frame.RTReferencedStudySequence = DicomSequence([study])
    return frame


def _loop_to_patient(loop: Loop, w: float, geometry: PhantomGeometry) -> FloatArray:
    """Image-frame (u, v) loop at height w -> (N, 3) LPS points lying in that slice plane."""
    points: FloatArray = (
        np.asarray(geometry.centre)
        + loop[:, :1] * np.asarray(geometry.row_direction)
        + loop[:, 1:2] * np.asarray(geometry.column_direction)
        + w * np.asarray(geometry.slice_normal)
    )
    return points


def slice_contours(spec: PhantomSpec, name: str) -> dict[int, list[FloatArray]]:
    """Exact cross-section polygons of one ROI per spatial slice k, as (N, 3) LPS arrays."""
    geometry = phantom_geometry(spec)
    shape = _roi_definition(spec, name).shape
    return _shape_contours(shape, geometry)


def _shape_contours(shape: Shape, geometry: PhantomGeometry) -> dict[int, list[FloatArray]]:
    nz, dz = geometry.size[2], geometry.spacing[2]
    contours: dict[int, list[FloatArray]] = {}
    for k, w in enumerate(_axis_coords(nz, dz)):
        loops = shape.section(float(w))
        if loops:
            contours[k] = [_loop_to_patient(loop, float(w), geometry) for loop in loops]
    return contours


def _contour_item(points: FloatArray, number: int, image_item: Dataset, kind: str = "CLOSED_PLANAR") -> Dataset:
    item = Dataset()
    item.ContourImageSequence = DicomSequence([image_item])
    item.ContourGeometricType = kind
    item.NumberOfContourPoints = len(points)
    item.ContourNumber = number
    item.ContourData = [f"{x:.6f}" for x in points.ravel()]
    return item


def _roi_contour_item(roi: RoiDefinition, geometry: PhantomGeometry, spec: PhantomSpec, uids: _Uids) -> Dataset:
    sop_class = uids.referenced_class
    items: list[Dataset] = []
    # one generator per ROI, so the jitter of one ROI does not depend on the others
    rng = np.random.default_rng([spec.seed, roi.number])
    normal = np.asarray(geometry.slice_normal)
    for k, loops in sorted(_shape_contours(roi.shape, geometry).items()):
        for points in loops:
            if spec.off_plane_jitter_mm:
                jitter = rng.uniform(-spec.off_plane_jitter_mm, spec.off_plane_jitter_mm, size=(len(points), 1))
                points = points + jitter * normal
            image_item = _contour_image_item(sop_class, uids.referenced_images[k], _frame_of(uids, k))
            items.append(_contour_item(points, len(items) + 1, image_item, spec.contour_type))
    item = Dataset()
    item.ROIDisplayColor = list(roi.color)
    item.ReferencedROINumber = roi.number
    item.ContourSequence = DicomSequence(items)
    return item


def _structure_set_roi_item(roi: RoiDefinition, uids: _Uids) -> Dataset:
    item = Dataset()
    item.ROINumber = roi.number
    item.ReferencedFrameOfReferenceUID = uids.frame
    item.ROIName = roi.name
    item.ROIGenerationAlgorithm = "AUTOMATIC"
    return item


def _observation_item(roi: RoiDefinition) -> Dataset:
    item = Dataset()
    item.ObservationNumber = roi.number
    item.ReferencedROINumber = roi.number
    item.ROIObservationLabel = roi.name
    item.RTROIInterpretedType = roi.interpreted_type
    item.ROIInterpreter = ""
    return item


def _rtstruct_dataset(spec: PhantomSpec, geometry: PhantomGeometry, uids: _Uids, rois: list[RoiDefinition]) -> Dataset:
    """RT Structure Set IOD: RT Series, Structure Set, ROI Contour, RT ROI Observations."""
    ds = _base_dataset(spec, uids, RT_STRUCTURE_SET_STORAGE, uids.rtstruct_instance)
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = uids.rtstruct_series
    ds.SeriesNumber = 2
    ds.SeriesDate = ACQUISITION_DATE
    ds.SeriesTime = ACQUISITION_TIME
    ds.SeriesDescription = "NETRT phantom structures"
    ds.OperatorsName = ""
    ds.InstanceNumber = 1
    # Frame of Reference module: part of the RT Structure Set IOD in current editions of PS3.3.
    ds.FrameOfReferenceUID = uids.frame
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = "NETRT_PHANTOM"
    ds.StructureSetName = "NETRT phantom"
    ds.StructureSetDate = ACQUISITION_DATE
    ds.StructureSetTime = ACQUISITION_TIME
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(spec, uids)])
    ds.StructureSetROISequence = DicomSequence([_structure_set_roi_item(r, uids) for r in rois])
    ds.ROIContourSequence = DicomSequence([_roi_contour_item(r, geometry, spec, uids) for r in rois])
    ds.RTROIObservationsSequence = DicomSequence([_observation_item(r) for r in rois])
    ds.ApprovalStatus = "UNAPPROVED"
    return ds


# --------------------------------------------------------------------------------------------
# Truth files and manifest
# --------------------------------------------------------------------------------------------


def _write_truth_nifti(mask: BoolArray, geometry: PhantomGeometry, path: Path) -> None:
    """uint8 mask on the CT grid; ITK direction columns = row dir, column dir, slice normal."""
    image: Any = sitk.GetImageFromArray(mask.view(np.uint8))
    image.SetOrigin(geometry.origin)
    image.SetSpacing(geometry.spacing)
    image.SetDirection(tuple(float(x) for x in geometry.direction_matrix().ravel()))
    sitk.WriteImage(image, str(path), True)


def _slab(geometry: PhantomGeometry) -> tuple[float, float]:
    """w range the slices represent (each slice stands for one slice spacing)."""
    half = geometry.size[2] * geometry.spacing[2] / 2.0
    return (-half, half)


def _roi_truth(roi: RoiDefinition, geometry: PhantomGeometry, count: int) -> RoiTruth:
    centre_patient = geometry.centre + np.asarray(roi.shape.centre) @ geometry.direction_matrix().T
    return RoiTruth(
        name=roi.name,
        number=roi.number,
        shape=roi.shape.kind,
        parameters=roi.shape.parameters(),
        centre=roi.shape.centre,
        centre_patient=_vec3(centre_patient),
        analytic_volume_mm3=roi.shape.volume(_slab(geometry)),
        truth_voxel_count=count,
        inside_field=_inside_field(roi.shape, geometry),
        hu=roi.hu,
        color=roi.color,
        interpreted_type=roi.interpreted_type,
    )


def _paint_truth(
    rois: list[RoiDefinition], geometry: PhantomGeometry, truth_dir: Path
) -> tuple[npt.NDArray[np.uint8], dict[str, Path], list[RoiTruth]]:
    """Write each ROI's NIfTI and build the label volume the CT pixels are drawn from.

    Body first, skull next, inner ROIs last, so every voxel shows the innermost structure.
    One mask lives in memory at a time: a 512x512x200 grid stays around 0.3 GB.
    """
    nx, ny, nz = geometry.size
    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    files: dict[str, Path] = {}
    truths: dict[str, RoiTruth] = {}
    paint_order = sorted(rois, key=lambda r: {"Patient_Outline": 0, "Skull": 1}.get(r.name, 2))
    for roi in paint_order:
        mask = _shape_mask(roi.shape, geometry)
        labels[mask] = roi.number
        path = truth_dir / f"{roi.name}.nii.gz"
        _write_truth_nifti(mask, geometry, path)
        files[roi.name] = path
        truths[roi.name] = _roi_truth(roi, geometry, int(np.count_nonzero(mask)))
    return labels, {r.name: files[r.name] for r in rois}, [truths[r.name] for r in rois]


def _hu_lookup(rois: list[RoiDefinition]) -> npt.NDArray[np.int16]:
    lut = np.full(max(r.number for r in rois) + 1, HU_AIR, dtype=np.int16)
    for roi in rois:
        lut[roi.number] = roi.hu
    return lut


def _prepare_out_dir(out_dir: Path) -> tuple[Path, Path]:
    """Refuse to mix two phantoms in one dicom/ (storescu +sd would send both)."""
    dicom_dir, truth_dir = out_dir / DICOM_DIR, out_dir / TRUTH_DIR
    if out_dir.exists() and not out_dir.is_dir():
        raise NetrtError(f"phantom output {out_dir} exists and is not a directory")
    if dicom_dir.is_dir() and any(dicom_dir.iterdir()):
        raise NetrtError(f"phantom output {dicom_dir} already holds files; choose an empty directory")
    dicom_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    return dicom_dir, truth_dir


def write_phantom(spec: PhantomSpec, out_dir: Path) -> PhantomManifest:
    """Write the CT series, RTSTRUCT, truth NIfTIs and manifest of ``spec`` under ``out_dir``.

    Layout: ``dicom/`` (only DICOM: ``CT_0001.dcm``.. by InstanceNumber, or the one multi-frame
    ``CT_MF.dcm`` for ``spec.multiframe``, ``RS.dcm``, and ``CT2_0001.dcm``.. for
    ``spec.registered_series``),
    ``truth/<roi>.nii.gz``, ``phantom.json``.
    """
    validate_spec(spec)
    out_dir = Path(out_dir)
    dicom_dir, truth_dir = _prepare_out_dir(out_dir)
    geometry = phantom_geometry(spec)
    rois = roi_definitions(spec)
    uids = _Uids.for_spec(spec)
    labels, truth_files, truths = _paint_truth(rois, geometry, truth_dir)
    if spec.multiframe:
        multiframe_file, uids = _write_multiframe_ct(spec, geometry, uids, labels, _hu_lookup(rois), dicom_dir)
        image_files = [multiframe_file]
    else:
        image_files = _write_ct_series(spec, geometry, uids, labels, _hu_lookup(rois), dicom_dir)
    registered_files = _write_registered_series(spec, geometry, uids, labels, _hu_lookup(rois), dicom_dir)
    del labels
    rtstruct_file = dicom_dir / RTSTRUCT_NAME
    _rtstruct_dataset(spec, geometry, uids, rois).save_as(rtstruct_file, enforce_file_format=True)
    manifest = PhantomManifest(
        spec=spec,
        study_instance_uid=uids.study,
        frame_of_reference_uid=uids.frame,
        image_series_uid=uids.image_series,
        rtstruct_series_uid=uids.rtstruct_series,
        rtstruct_sop_instance_uid=uids.rtstruct_instance,
        image_sop_instance_uids=list(uids.images),
        instance_numbers=[_instance_number(spec, k) for k in range(spec.slice_count)],
        image_files=image_files,
        rtstruct_file=rtstruct_file,
        truth_files=truth_files,
        rois=truths,
        geometry=geometry,
        out_dir=out_dir,
        registered_files=registered_files,
    )
    (out_dir / MANIFEST_NAME).write_text(json.dumps(_manifest_to_json(manifest), indent=2) + "\n")
    return manifest


def _relative(path: Path, out_dir: Path) -> str:
    return path.relative_to(out_dir).as_posix()


def _manifest_to_json(manifest: PhantomManifest) -> dict[str, Any]:
    """JSON form; paths relative to the output directory so the folder can be moved."""
    out = manifest.out_dir
    return {
        "format": MANIFEST_FORMAT,
        "spec": asdict(manifest.spec),
        "study_instance_uid": manifest.study_instance_uid,
        "frame_of_reference_uid": manifest.frame_of_reference_uid,
        "image_series_uid": manifest.image_series_uid,
        "rtstruct_series_uid": manifest.rtstruct_series_uid,
        "rtstruct_sop_instance_uid": manifest.rtstruct_sop_instance_uid,
        "image_sop_instance_uids": manifest.image_sop_instance_uids,
        "instance_numbers": manifest.instance_numbers,
        "image_files": [_relative(p, out) for p in manifest.image_files],
        "rtstruct_file": _relative(manifest.rtstruct_file, out),
        "truth_files": {name: _relative(p, out) for name, p in manifest.truth_files.items()},
        "rois": [asdict(roi) for roi in manifest.rois],
        "geometry": asdict(manifest.geometry),
        "registered_files": [_relative(p, out) for p in manifest.registered_files],
    }


def _tuple3(values: Sequence[float]) -> Vec3:
    a, b, c = (float(x) for x in values)
    return (a, b, c)


def _spec_from_json(data: dict[str, Any]) -> PhantomSpec:
    values = dict(data)
    for key in ("pixel_spacing", "oblique_degrees", "volume_centre"):
        values[key] = tuple(values[key])
    return PhantomSpec(**values)


def _geometry_from_json(data: dict[str, Any]) -> PhantomGeometry:
    nx, ny, nz = (int(x) for x in data["size"])
    return PhantomGeometry(
        origin=_tuple3(data["origin"]),
        row_direction=_tuple3(data["row_direction"]),
        column_direction=_tuple3(data["column_direction"]),
        slice_normal=_tuple3(data["slice_normal"]),
        spacing=_tuple3(data["spacing"]),
        size=(nx, ny, nz),
        centre=_tuple3(data["centre"]),
    )


def _roi_from_json(data: dict[str, Any]) -> RoiTruth:
    red, green, blue = (int(x) for x in data["color"])
    return RoiTruth(
        name=data["name"],
        number=int(data["number"]),
        shape=data["shape"],
        parameters=dict(data["parameters"]),
        centre=_tuple3(data["centre"]),
        centre_patient=_tuple3(data["centre_patient"]),
        analytic_volume_mm3=float(data["analytic_volume_mm3"]),
        truth_voxel_count=int(data["truth_voxel_count"]),
        inside_field=bool(data["inside_field"]),
        hu=int(data["hu"]),
        color=(red, green, blue),
        interpreted_type=data["interpreted_type"],
    )


def _manifest_from_json(data: dict[str, Any], out_dir: Path) -> PhantomManifest:
    return PhantomManifest(
        spec=_spec_from_json(data["spec"]),
        study_instance_uid=data["study_instance_uid"],
        frame_of_reference_uid=data["frame_of_reference_uid"],
        image_series_uid=data["image_series_uid"],
        rtstruct_series_uid=data["rtstruct_series_uid"],
        rtstruct_sop_instance_uid=data["rtstruct_sop_instance_uid"],
        image_sop_instance_uids=list(data["image_sop_instance_uids"]),
        instance_numbers=[int(n) for n in data["instance_numbers"]],
        image_files=[out_dir / p for p in data["image_files"]],
        rtstruct_file=out_dir / data["rtstruct_file"],
        truth_files={name: out_dir / p for name, p in data["truth_files"].items()},
        rois=[_roi_from_json(r) for r in data["rois"]],
        geometry=_geometry_from_json(data["geometry"]),
        out_dir=out_dir,
        registered_files=[out_dir / p for p in data.get("registered_files", [])],
    )


def load_manifest(out_dir: Path) -> PhantomManifest:
    """Read ``out_dir/phantom.json`` back; paths come back absolute under ``out_dir``."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise NetrtError(f"{path}: no phantom manifest (was write_phantom run here?)") from exc
    except (OSError, ValueError) as exc:
        raise NetrtError(f"{path}: unreadable phantom manifest: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise NetrtError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    try:
        return _manifest_from_json(data, Path(out_dir))
    except (KeyError, TypeError, ValueError) as exc:
        raise NetrtError(f"{path}: malformed phantom manifest ({exc!r})") from exc
