"""Constants, tag names and small text helpers shared by the modules of :mod:`netrt.study`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import UID

from netrt.errors import StudyValidationError

FloatArray32 = npt.NDArray[np.float32]
FloatArray64 = npt.NDArray[np.float64]

# SimpleITK's SWIG functions carry no annotations; an Any handle keeps mypy --strict quiet without
# scattering ignores (the same device as in netrt.geometry and netrt.reformat).
_sitk: Any = sitk

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"

#: Single-frame image SOP classes whose slices NETRT stacks into a volume. The enhanced
#: (multi-frame) CT/MR classes carry their geometry in functional groups and are read frame by frame
#: (:data:`netrt.study.multiframe.ENHANCED_SOP_CLASSES`); any other class is refused by name.
IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}
#: Modalities of series that may hold the referenced images (used to find candidates by frame of
#: reference, so that an RT Dose sharing the frame does not count as a second image series).
IMAGE_MODALITIES = frozenset({"CT", "MR", "PT"})

#: Largest difference allowed between the six ImageOrientationPatient values of two slices of one
#: series. Slices of one acquisition carry identical strings; 1e-4 absorbs re-encoding of the DS
#: values and is ~0.05 mm of drift across a 500 mm field, far below a voxel.
ORIENTATION_MATCH_TOLERANCE = 1e-4
#: PixelSpacing must agree between slices to this many mm (DS rounding only).
PIXEL_SPACING_MATCH_TOLERANCE_MM = 1e-4
#: How many UIDs or files an error message lists before it says "and N more".
MAX_LISTED = 5
#: The most slices one gap may lack and still be filled by interpolation. A single missing slice
#: between two received ones is bridged from data a slice spacing away on each side; two are still
#: bridged from the nearest slice within 1.5 spacings. Beyond that the interpolated slices would be
#: further from any measured data than a radiotherapy contour is from its neighbour, i.e. the
#: interpolation would invent anatomy (a lesion that starts or ends in the hole is lost or drawn
#: wrongly), so a bigger gap is refused and the study goes to quarantine with the positions.
MAX_MISSING_SLICES_PER_GAP = 2
#: Values longer than this are not read while validating headers (pixel data, large private
#: blobs); their offset and length are still known, which is all the truncation check needs.
HEADER_DEFER_SIZE = 4096

_SCAN_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "FrameOfReferenceUID",
    "ImageType",
)
_PIXEL_DATA_TAG = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF


def _tag(*keywords: str) -> str:
    """``(gggg,eeee) Keyword`` for error messages; nested paths are joined with `` > ``."""
    parts = []
    for keyword in keywords:
        number = tag_for_keyword(keyword)
        if number is None:  # pragma: no cover - only called with dictionary keywords
            raise ValueError(f"unknown DICOM keyword {keyword!r}")
        tag = Tag(number)
        parts.append(f"({tag.group:04X},{tag.element:04X}) {keyword}")
    return " > ".join(parts)


TAG_PIXEL_DATA = _tag("PixelData")
TAG_IPP = _tag("ImagePositionPatient")
TAG_IOP = _tag("ImageOrientationPatient")
TAG_FRAME = _tag("FrameOfReferenceUID")
TAG_REFERENCED_SERIES = _tag(
    "ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence", "RTReferencedSeriesSequence", "SeriesInstanceUID"
)
TAG_CONTOUR_IMAGES = _tag("ROIContourSequence", "ContourSequence", "ContourImageSequence", "ReferencedSOPInstanceUID")
TAG_REFERENCED_FRAME = _tag("ReferencedFrameOfReferenceSequence", "FrameOfReferenceUID")


def _text(ds: Dataset, keyword: str) -> str:
    """A string attribute without padding; "" when absent or empty."""
    value = ds.get(keyword)
    if value is None:
        return ""
    return str(value).strip().rstrip("\x00")


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def _listed(items: Sequence[str], limit: int = MAX_LISTED) -> str:
    """``a, b, c`` or ``a, b, c and 7 more``: error messages stay readable for 500-slice series."""
    shown = ", ".join(items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _numbers(ds: Dataset, keyword: str, count: int, path: Path) -> tuple[float, ...]:
    """``count`` finite numbers from a DS/IS attribute, or an error naming file and tag."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise StudyValidationError("required attribute is missing or empty", path=path, tag=_tag(keyword))
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]
    try:
        numbers = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise StudyValidationError(f"not numeric: {values!r}", path=path, tag=_tag(keyword)) from exc
    if len(numbers) != count or not all(np.isfinite(numbers)):
        raise StudyValidationError(f"needs {count} finite numbers, got {values!r}", path=path, tag=_tag(keyword))
    return numbers
