"""What every output kind needs to know about the kept ROIs: name, colour, type, and its own mask.

The merged mask answers "where is any kept structure"; SEG, the colour series and per-ROI overlay
groups need each ROI apart, in its own colour. Per-ROI masks are stored together in one
bit-packed ``.npz`` (an eighth of a byte per voxel and ROI) beside the merged mask, and kinds read
only the ROIs they draw, so steps keep exchanging paths rather than volumes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom

from netrt.errors import DicomInputError, RoiError
from netrt.fileio import atomic_output
from netrt.geometry import ImageGeometry
from netrt.masks import RoiContours, read_structure_set, roi_mask, selection_reason

BoolArray = npt.NDArray[np.bool_]

# Used, in this order, for ROIs whose ROIDisplayColor is absent or unreadable: twelve colours that
# stay apart from one another and from grey (a colour-blind-safe qualitative set; Paul Tol's
# "bright" and "muted" schemes), so neighbouring structures never share a colour by accident.
FALLBACK_PALETTE: tuple[tuple[int, int, int], ...] = (
    (238, 102, 119),
    (34, 136, 51),
    (68, 119, 170),
    (204, 187, 68),
    (102, 204, 238),
    (170, 51, 119),
    (51, 34, 136),
    (17, 119, 51),
    (68, 170, 153),
    (136, 34, 85),
    (221, 204, 119),
    (204, 102, 119),
)


@dataclass(frozen=True)
class RoiInfo:
    """One kept ROI as outputs present it."""

    number: int  # ROINumber in the RTSTRUCT
    name: str  # ROIName (as anonymization left it)
    color: tuple[int, int, int]  # RGB 0-255: ROIDisplayColor, else FALLBACK_PALETTE
    color_from_rtstruct: bool
    interpreted_type: str  # RTROIInterpretedType, "" when absent


def _rgb(value: object) -> tuple[int, int, int] | None:
    try:
        values = [round(float(v)) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    if len(values) != 3 or any(v < 0 or v > 255 for v in values):
        return None
    return (values[0], values[1], values[2])


def read_roi_infos(rtstruct_file: Path, kept: Sequence[tuple[int, str]]) -> list[RoiInfo]:
    """The display facts of the ``kept`` ROIs ((ROINumber, name) pairs, in output order).

    Colours come from ROIContourSequence's ROIDisplayColor; an ROI without one (or with a value
    that is not three numbers 0-255) takes the next unused colour of :data:`FALLBACK_PALETTE`.
    Types come from RTROIObservationsSequence's RTROIInterpretedType (upper-cased, "" if absent).
    """
    try:
        ds = pydicom.dcmread(rtstruct_file, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises several unrelated types on damaged files
        raise DicomInputError(f"cannot read RTSTRUCT: {exc}", rtstruct_file) from exc
    colors: dict[int, tuple[int, int, int]] = {}
    for item in ds.get("ROIContourSequence", []):
        number = item.get("ReferencedROINumber")
        color = _rgb(item.get("ROIDisplayColor"))
        if number is not None and color is not None:
            colors[int(number)] = color
    types: dict[int, str] = {}
    for item in ds.get("RTROIObservationsSequence", []):
        number = item.get("ReferencedROINumber")
        if number is not None:
            types[int(number)] = str(item.get("RTROIInterpretedType", "") or "").strip().upper()
    palette = iter(c for c in FALLBACK_PALETTE if c not in colors.values())
    infos: list[RoiInfo] = []
    for number, name in kept:
        color = colors.get(number)
        if color is None:
            color = next(palette, FALLBACK_PALETTE[len(infos) % len(FALLBACK_PALETTE)])
        infos.append(RoiInfo(number, name, color, number in colors, types.get(number, "")))
    return infos


@dataclass(frozen=True)
class RoiBox:
    """One ROI's mask cut to its bounding box: ``mask`` covers ``box`` of a grid of ``shape``.

    Per-ROI masks are mostly empty (a 3 cm node in a 50 cm field of view), so a whole-grid bool
    volume per ROI would hold 16 ROIs x 262 MB for a 1000-slice 512 x 512 study; the box is what
    is kept, and writers ask it for one slice at a time. An empty ROI has an empty box.
    """

    shape: tuple[int, int, int]
    box: tuple[slice, slice, slice]
    mask: BoolArray

    def slice_at(self, k: int) -> BoolArray:
        """The ROI on grid slice ``k`` (``[row, column]``, a new array)."""
        out = np.zeros(self.shape[1:], dtype=bool)
        ks = self.box[0]
        if ks.start <= k < ks.stop:
            out[self.box[1], self.box[2]] = self.mask[k - ks.start]
        return out

    @classmethod
    def of(cls, mask: BoolArray) -> RoiBox:
        """``mask`` (a whole-grid volume) cut to its bounding box; the box holds a copy."""
        box = _bounding_box(mask)
        return cls((int(mask.shape[0]), int(mask.shape[1]), int(mask.shape[2])), box, mask[box].copy())

    def full(self) -> BoolArray:
        """The ROI on the whole grid (a new array of ``shape``)."""
        out = np.zeros(self.shape, dtype=bool)
        out[self.box] = self.mask
        return out


def _bounding_box(mask: BoolArray) -> tuple[slice, slice, slice]:
    box: list[slice] = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 0))
    return box[0], box[1], box[2]


def save_roi_masks(masks: Mapping[int, BoolArray], path: Path) -> Path:
    """Store each ROI's mask (by ROI number) cut to its bounding box, bit-packed, in one ``.npz``
    (written atomically). All masks must share one grid."""
    return save_roi_boxes({number: RoiBox.of(mask) for number, mask in masks.items()}, path)


def save_roi_boxes(boxes: Mapping[int, RoiBox], path: Path) -> Path:
    """Store ROI masks already cut to their boxes (:meth:`RoiBox.of`), as :func:`save_roi_masks` does."""
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for number, roi in boxes.items():
        arrays[f"roi{number}"] = np.packbits(roi.mask, axis=None)
        arrays[f"box{number}"] = np.asarray([*roi.shape, *(b for s in roi.box for b in (s.start, s.stop))], np.int64)
    with atomic_output(path, durable=False) as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return path


def load_roi_box(path: Path, number: int) -> RoiBox:
    """One ROI's mask from :func:`save_roi_masks`' file as its box; KeyError when it holds no such ROI."""
    with np.load(path) as data:
        values = [int(v) for v in data[f"box{number}"]]
        bits = data[f"roi{number}"]
    shape = (values[0], values[1], values[2])
    box = (slice(values[3], values[4]), slice(values[5], values[6]), slice(values[7], values[8]))
    box_shape = tuple(s.stop - s.start for s in box)
    count = int(np.prod(box_shape))
    mask = np.unpackbits(bits, count=count).view(np.bool_).reshape(box_shape)
    return RoiBox(shape, box, mask)


def load_roi_mask(path: Path, number: int) -> BoolArray:
    """One ROI's mask from :func:`save_roi_masks`' file on the whole grid; KeyError when it holds no such ROI."""
    return load_roi_box(path, number).full()


class _RasterisedOnDemand(Mapping[int, BoolArray]):
    """ROI number -> mask, rasterised when asked: :func:`save_roi_masks` walks it once, so only one
    whole-grid mask exists at a time (ten ROIs of 512x512x200 would otherwise hold 0.5 GB)."""

    def __init__(self, rois: Sequence[RoiContours], geometry: ImageGeometry) -> None:
        self._rois = {roi.number: roi for roi in rois}
        self._geometry = geometry

    def __getitem__(self, number: int) -> BoolArray:
        return roi_mask(self._rois[number], self._geometry)[0]

    def __iter__(self) -> Iterator[int]:
        return iter(self._rois)

    def __len__(self) -> int:
        return len(self._rois)


def build_roi_masks(
    rtstruct_file: Path, geometry: ImageGeometry, include: Sequence[str], ignore: Sequence[str], path: Path
) -> tuple[list[RoiInfo], Path]:
    """Rasterise every ROI kept by ``include``/``ignore`` on ``geometry``; store the masks at ``path``.

    The selection and the rasteriser are the merged mask's (:func:`netrt.masks.merge_rois`), applied
    ROI by ROI. Masks are as rasterised: grid slices missing from the series stay empty (no contour
    lies there); a kind that draws on the whole grid fills them itself. Returns the kept ROIs in
    RTSTRUCT order (colour and type from :func:`read_roi_infos`) and ``path``; raises
    :class:`RoiError` when no ROI is kept, as the merged mask does.
    """
    structures = read_structure_set(rtstruct_file)
    kept = [roi for roi in structures if selection_reason(roi.name, include, ignore)[0]]
    if not kept:
        names = ", ".join(repr(roi.name) for roi in structures) or "none"
        raise RoiError(
            "(all)",
            f"no ROI is kept (ROIs in the structure set: {names}; check processing.include_rois "
            "and processing.ignore_rois)",
        )
    save_roi_masks(_RasterisedOnDemand(kept, geometry), path)
    return read_roi_infos(rtstruct_file, [(roi.number, roi.name) for roi in kept]), path
