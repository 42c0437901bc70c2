"""What every output kind needs to know about the kept ROIs: name, colour, type, and its own mask.

The merged mask answers "where is any kept structure"; SEG, the colour series and per-ROI overlay
groups need each ROI apart, in its own colour. Per-ROI masks are stored together in one
bit-packed ``.npz`` (an eighth of a byte per voxel and ROI) beside the merged mask, and kinds read
only the ROIs they draw, so steps keep exchanging paths rather than volumes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom

from netrt.errors import DicomInputError
from netrt.fileio import atomic_output

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


def save_roi_masks(masks: Mapping[int, BoolArray], path: Path) -> Path:
    """Store one boolean volume per ROI number, bit-packed, in one ``.npz`` (written atomically)."""
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    for number, mask in masks.items():
        arrays[f"roi{number}"] = np.packbits(mask, axis=None)
        arrays[f"shape{number}"] = np.asarray(mask.shape, dtype=np.int64)
    with atomic_output(path, durable=False) as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return path


def load_roi_mask(path: Path, number: int) -> BoolArray:
    """One ROI's mask from :func:`save_roi_masks`' file; KeyError when it holds no such ROI."""
    with np.load(path) as data:
        shape = tuple(int(n) for n in data[f"shape{number}"])
        bits = data[f"roi{number}"]
    count = int(np.prod(shape))
    return np.unpackbits(bits, count=count).view(np.bool_).reshape(shape)
