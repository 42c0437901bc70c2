"""From an RTSTRUCT to one merged binary mask on the image grid, with a report per ROI.

The structure set is read with pydicom and rt-utils' contour-sequence lookup (what rt-utils does
well); the masks come from :mod:`netrt.rasterize` (pixel-centre rule, even-odd fill), because
rt-utils' own rasterisation grows every ROI by about half a voxel. ROIs are kept or dropped by
case-insensitive globs (``processing.include_rois`` / ``ignore_rois``), and the kept ones are
OR-ed into the single mask the overlay series carry.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from rt_utils import ds_helper

from netrt.errors import DicomInputError, RoiError
from netrt.fileio import atomic_output
from netrt.geometry import ImageGeometry
from netrt.rasterize import geometric_type_skip_reason, rasterize_contours

BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class RoiContours:
    """One ROI of a structure set: its number, name and the contours as ``(N, 3)`` point arrays."""

    number: int
    name: str
    contours: tuple[npt.NDArray[np.float64], ...]
    geometric_types: tuple[str, ...]


@dataclass(frozen=True)
class RoiReport:
    """What happened to one ROI: kept or why not, and what its mask holds."""

    number: int
    name: str
    kept: bool
    reason: str  # why kept/dropped ("matches ignore pattern '*skull*'")
    voxel_count: int = 0
    contours_used: int = 0
    skipped_contours: tuple[str, ...] = ()  # one sentence per contour that could not be used


def kept_names(rois: Sequence[RoiReport]) -> list[str]:
    return [r.name for r in rois if r.kept]


def ignored_names(rois: Sequence[RoiReport]) -> list[str]:
    return [r.name for r in rois if not r.kept]


@dataclass(frozen=True)
class MergedMask:
    """The OR of the kept ROIs' masks, ``[slice, row, column]`` on the image grid."""

    mask: BoolArray
    rois: tuple[RoiReport, ...] = field(default_factory=tuple)

    @property
    def kept(self) -> list[str]:
        return kept_names(self.rois)

    @property
    def ignored(self) -> list[str]:
        return ignored_names(self.rois)

    @property
    def warnings(self) -> list[str]:
        """Human sentences for the run summary: skipped contours and empty kept ROIs."""
        out: list[str] = []
        for roi in self.rois:
            if not roi.kept:
                continue
            out.extend(f"ROI {roi.name!r}: {why}" for why in roi.skipped_contours)
            if roi.voxel_count == 0:
                out.append(f"ROI {roi.name!r}: kept but its mask is empty (no contour covers a voxel centre)")
        return out


def read_structure_set(rtstruct_path: Path) -> list[RoiContours]:
    """Every ROI of the RTSTRUCT with its contours; ROIs without contours come back empty.

    Raises :class:`DicomInputError` naming the file and tag when the structure set itself is
    unreadable (no StructureSetROISequence, ContourData not numeric, ...).
    """
    try:
        ds = pydicom.dcmread(rtstruct_path)
    except Exception as exc:  # pydicom raises several unrelated types on damaged files
        raise DicomInputError(f"cannot read RTSTRUCT: {exc}", rtstruct_path) from exc
    if "StructureSetROISequence" not in ds:
        raise DicomInputError("RTSTRUCT has no ROIs", rtstruct_path, "StructureSetROISequence (3006,0020)")
    rois = []
    for item in ds.StructureSetROISequence:
        number = int(item.ROINumber)
        name = str(getattr(item, "ROIName", "") or f"ROI {number}")
        rois.append(_roi_contours(ds, number, name, rtstruct_path))
    return rois


def _roi_contours(ds: Dataset, number: int, name: str, path: Path) -> RoiContours:
    try:
        sequence = ds_helper.get_contour_sequence_by_roi_number(ds, number)
    except Exception:  # rt-utils raises a bare Exception for an ROI listed without contours
        sequence = None
    contours = []
    types = []
    for index, contour in enumerate(sequence or []):
        data = getattr(contour, "ContourData", None)
        try:
            points = np.asarray([float(v) for v in (data or [])], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DicomInputError(
                f"ROI {name!r} contour {index}: ContourData is not numeric ({exc})", path, "ContourData (3006,0050)"
            ) from exc
        if points.size % 3:
            raise DicomInputError(
                f"ROI {name!r} contour {index}: {points.size} values is not a list of x\\y\\z triplets",
                path,
                "ContourData (3006,0050)",
            )
        contours.append(points.reshape(-1, 3))
        types.append(str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")).strip().upper())
    return RoiContours(number, name, tuple(contours), tuple(types))


def matches_any(name: str, patterns: Sequence[str]) -> str | None:
    """The first case-insensitive glob in ``patterns`` that ``name`` matches, else None."""
    folded = name.casefold()
    for pattern in patterns:
        if fnmatch.fnmatchcase(folded, pattern.casefold()):
            return pattern
    return None


def selection_reason(name: str, include: Sequence[str], ignore: Sequence[str]) -> tuple[bool, str]:
    """Whether an ROI is kept, and why: ``include`` (empty: all) first, then ``ignore``."""
    if include:
        hit = matches_any(name, include)
        if hit is None:
            return False, "matches no include_rois pattern"
    ignored_by = matches_any(name, ignore)
    if ignored_by is not None:
        return False, f"matches ignore_rois pattern {ignored_by!r}"
    return True, f"matches include_rois pattern {hit!r}" if include else "kept (no include_rois filter)"


def roi_mask(roi: RoiContours, geometry: ImageGeometry) -> tuple[BoolArray, int, list[str]]:
    """Rasterise one ROI: (mask, contours used, sentences for contours that were skipped)."""
    fillable = []
    skipped = []
    for index, kind in enumerate(roi.geometric_types):
        why = geometric_type_skip_reason(kind)
        if why is None:
            fillable.append(index)
        else:
            skipped.append(f"contour {index} skipped: {why}")
    result = rasterize_contours([roi.contours[i] for i in fillable], geometry, roi.name)
    skipped += [f"contour {fillable[s.index]} skipped: {s.reason}" for s in result.skipped]
    return result.mask, result.contours_used, skipped


def merge_rois(
    rois: Sequence[RoiContours],
    geometry: ImageGeometry,
    include: Sequence[str],
    ignore: Sequence[str],
    each: Callable[[RoiReport, BoolArray], None] | None = None,
) -> MergedMask:
    """Keep ROIs by the patterns, rasterise each kept one and OR them into one mask.

    ``each`` is called with every kept ROI's report and mask as it is rasterised (per-ROI outputs
    keep them without rasterising twice or holding every ROI's whole-grid mask at once).

    Raises :class:`RoiError` when no ROI is kept, since an overlay of nothing is a
    configuration or input problem the user must see, not an empty series.
    """
    merged = np.zeros(geometry.shape, dtype=bool)
    reports = []
    for roi in rois:
        kept, reason = selection_reason(roi.name, include, ignore)
        if not kept:
            reports.append(RoiReport(roi.number, roi.name, False, reason))
            continue
        mask, used, skipped = roi_mask(roi, geometry)
        merged |= mask
        report = RoiReport(roi.number, roi.name, True, reason, int(mask.sum()), used, tuple(skipped))
        reports.append(report)
        if each is not None:
            each(report, mask)
    if not any(r.kept for r in reports):
        names = ", ".join(repr(r.name) for r in reports) or "none"
        raise RoiError(
            "(all)",
            f"no ROI is left to merge (ROIs in the structure set: {names}; check processing.include_rois "
            "and processing.ignore_rois)",
        )
    return MergedMask(merged, tuple(reports))


def build_merged_mask(
    rtstruct_path: Path,
    geometry: ImageGeometry,
    include: Sequence[str],
    ignore: Sequence[str],
    each: Callable[[RoiReport, BoolArray], None] | None = None,
) -> MergedMask:
    """Read the RTSTRUCT and merge its kept ROIs on ``geometry`` (``each``: see :func:`merge_rois`)."""
    return merge_rois(read_structure_set(rtstruct_path), geometry, include, ignore, each)


def save_mask(mask: npt.NDArray[np.bool_], path: Path) -> Path:
    """Store a boolean volume bit-packed (1/8 of its bytes) with its shape."""
    with atomic_output(path, durable=False) as handle:
        np.savez(handle, bits=np.packbits(mask, axis=None), shape=np.asarray(mask.shape, dtype=np.int64))
    return path


def load_mask(path: Path) -> npt.NDArray[np.bool_]:
    with np.load(path) as data:
        shape = tuple(int(n) for n in data["shape"])
        count = int(np.prod(shape))
        # unpackbits gives 0/1 bytes: viewed as bool, not copied (a second mask-sized array at the peak)
        return np.unpackbits(data["bits"], count=count).view(np.bool_).reshape(shape)
