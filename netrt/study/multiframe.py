"""Enhanced multi-frame images (Enhanced CT/MR, Legacy Converted Enhanced CT/MR) read as a slice stack.

An enhanced image is one file holding every slice as a frame; the geometry each classic slice
carries at the top level (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
SliceThickness, RescaleSlope/Intercept) lives in *functional groups*: a per-frame item
(PerFrameFunctionalGroupsSequence, one item per frame) or the shared item
(SharedFunctionalGroupsSequence, one item for all frames). The per-frame value wins when both
are present (PS3.3 C.7.6.16).

Every frame becomes one ``_Slice`` of the stack (with its ``frame_number``, 1-based, as DICOM
counts frames), so the stack checks of :mod:`netrt.study.stack` (one orientation, one pixel
spacing, even spacing along the normal, missing slices) apply to frames exactly as to classic
slices, and their messages name the file *and the frame*. A missing or malformed functional group
is refused here, naming the file, the tag path and the frame.

Pixels are decoded one frame at a time (pydicom's ``iter_pixels``), so a 500-frame file is never
held twice, and each frame's own rescale is applied (it may differ per frame).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.utils import iter_pixels

from netrt.errors import DicomInputError, StudyValidationError
from netrt.study._common import TAG_PIXEL_DATA, _numbers, _tag, _text

#: Enhanced (multi-frame) image SOP classes read frame by frame, and the classic single-frame
#: class each frame is written back as in derived outputs (see :mod:`netrt.study.classic`).
ENHANCED_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
}
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Enhanced class -> the classic single-frame class of its frames.
CLASSIC_SOP_CLASS: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2.1": CT_IMAGE_STORAGE,
    "1.2.840.10008.5.1.4.1.1.2.2": CT_IMAGE_STORAGE,
    "1.2.840.10008.5.1.4.1.1.4.1": MR_IMAGE_STORAGE,
    "1.2.840.10008.5.1.4.1.1.4.4": MR_IMAGE_STORAGE,
}

PER_FRAME = "PerFrameFunctionalGroupsSequence"
SHARED = "SharedFunctionalGroupsSequence"


@dataclass(frozen=True)
class FrameGeometry:
    """What one frame's functional groups say about it (1-based ``frame_number``)."""

    frame_number: int
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    rescale_slope: float
    rescale_intercept: float


def is_enhanced(sop_class_uid: str) -> bool:
    return sop_class_uid in ENHANCED_SOP_CLASSES


def frame_count(ds: Dataset, path: Path) -> int:
    """NumberOfFrames of a multi-frame image (at least 1), or an error naming file and tag."""
    count = int(_numbers(ds, "NumberOfFrames", 1, path)[0])
    if count < 1:
        raise StudyValidationError(f"{count} frames; at least one expected", path=path, tag=_tag("NumberOfFrames"))
    return count


def functional_group(ds: Dataset, index: int, keyword: str) -> tuple[Dataset | None, str]:
    """The first item of functional group ``keyword`` for frame ``index`` (0-based), per-frame
    first, then shared, and the tag path it came from ("" when neither has it)."""
    per_frame = ds.get(PER_FRAME)
    if per_frame is not None and index < len(per_frame):
        group = per_frame[index].get(keyword)
        if group:
            return group[0], _tag(PER_FRAME, keyword)
    shared = ds.get(SHARED)
    if shared:
        group = shared[0].get(keyword)
        if group:
            return group[0], _tag(SHARED, keyword)
    return None, ""


def _group_numbers(
    ds: Dataset, path: Path, index: int, group: str, keyword: str, count: int, *, required: bool = True
) -> tuple[float, ...] | None:
    """``count`` finite numbers of ``keyword`` in frame ``index``'s functional group ``group``."""
    item, where = functional_group(ds, index, group)
    frame = f"frame {index + 1}: "
    if item is None or item.get(keyword) in (None, ""):
        if not required:
            return None
        where = where or f"{_tag(PER_FRAME, group)} (nor {_tag(SHARED, group)})"
        raise StudyValidationError(
            f"{frame}functional group missing or empty: the frame's {keyword} is not given per frame or shared",
            path=path,
            tag=f"{where} > {_tag(keyword)}",
        )
    try:
        return _numbers(item, keyword, count, path)
    except StudyValidationError as exc:
        raise StudyValidationError(frame + exc.reason, path=path, tag=f"{where} > {_tag(keyword)}") from exc


def read_frame_geometry(ds: Dataset, path: Path) -> list[FrameGeometry]:
    """Every frame's position, orientation, pixel measures and rescale from the functional groups.

    Raises:
        StudyValidationError: NumberOfFrames is absent or malformed, the per-frame sequence does not
            have one item per frame, or a frame lacks Plane Position, Plane Orientation or Pixel
            Measures (naming the file, the tag path and the frame).
    """
    frames = frame_count(ds, path)
    per_frame = ds.get(PER_FRAME)
    if per_frame is None or len(per_frame) != frames:
        found = "none" if per_frame is None else str(len(per_frame))
        raise StudyValidationError(
            f"{frames} frames (NumberOfFrames) but {found} per-frame functional group items; one per frame expected",
            path=path,
            tag=_tag(PER_FRAME),
        )
    out: list[FrameGeometry] = []
    top_slope = _text(ds, "RescaleSlope")
    top_intercept = _text(ds, "RescaleIntercept")
    for index in range(frames):
        position = _group_numbers(ds, path, index, "PlanePositionSequence", "ImagePositionPatient", 3)
        orientation = _group_numbers(ds, path, index, "PlaneOrientationSequence", "ImageOrientationPatient", 6)
        spacing = _group_numbers(ds, path, index, "PixelMeasuresSequence", "PixelSpacing", 2)
        assert position is not None and orientation is not None and spacing is not None  # required=True
        thickness = _group_numbers(ds, path, index, "PixelMeasuresSequence", "SliceThickness", 1, required=False)
        slope = _group_numbers(ds, path, index, "PixelValueTransformationSequence", "RescaleSlope", 1, required=False)
        intercept = _group_numbers(
            ds, path, index, "PixelValueTransformationSequence", "RescaleIntercept", 1, required=False
        )
        if slope is None and top_slope:
            slope = _numbers(ds, "RescaleSlope", 1, path)
        if intercept is None and top_intercept:
            intercept = _numbers(ds, "RescaleIntercept", 1, path)
        out.append(
            FrameGeometry(
                frame_number=index + 1,
                position=(position[0], position[1], position[2]),
                orientation=(
                    orientation[0],
                    orientation[1],
                    orientation[2],
                    orientation[3],
                    orientation[4],
                    orientation[5],
                ),
                pixel_spacing=(spacing[0], spacing[1]),
                slice_thickness=thickness[0] if thickness else None,
                rescale_slope=slope[0] if slope else 1.0,
                rescale_intercept=intercept[0] if intercept else 0.0,
            )
        )
    return out


def iter_frames(path: Path, sop_instance_uid: str, frame_numbers: Sequence[int]) -> Iterator[tuple[int, Any]]:
    """(frame number, stored values ``[row, col]``) of the wanted frames in increasing frame order,
    decoded one at a time (callers place each frame where it belongs, so no more than one frame is
    held beside what they build).

    The file must still hold the validated instance (as for classic slices).

    Raises:
        DicomInputError: the file was replaced, or its pixel data cannot be decoded (named, with the frame).
    """
    wanted = sorted(set(frame_numbers))
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception as exc:  # pydicom raises several unrelated types on damaged files
        raise DicomInputError(f"cannot read DICOM file: {type(exc).__name__}: {exc}", path=path) from exc
    found = _text(header, "SOPInstanceUID")
    if found != sop_instance_uid:
        raise DicomInputError(
            f"file now holds SOPInstanceUID {found or '(none)'}, not the validated {sop_instance_uid}",
            path=path,
            tag=_tag("SOPInstanceUID"),
        )
    frames = iter(wanted)
    frame = wanted[0] if wanted else 0
    try:
        for values in iter_pixels(path, indices=[n - 1 for n in wanted]):
            frame = next(frames)
            yield frame, values
    except DicomInputError:
        raise
    except Exception as exc:  # decoder errors come in many types; all mean "this frame is unusable"
        raise DicomInputError(
            f"frame {frame}: pixel data cannot be read or decoded: {type(exc).__name__}: {exc}",
            path=path,
            tag=TAG_PIXEL_DATA,
        ) from exc


def decode_frames(
    path: Path, sop_instance_uid: str, frame_numbers: Sequence[int], rows: int, columns: int
) -> Iterator[tuple[int, npt.NDArray[np.float64]]]:
    """(frame number, values in modality units) of the wanted frames in increasing frame order, each
    frame's own rescale applied (it may differ per frame).

    Raises:
        DicomInputError: the file was replaced, a frame cannot be decoded or has the wrong shape.
        StudyValidationError: the functional groups are no longer readable (named).
    """
    try:
        header = dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise DicomInputError(f"cannot read DICOM file: {type(exc).__name__}: {exc}", path=path) from exc
    geometry = {frame.frame_number: frame for frame in read_frame_geometry(header, path)}
    for number, stored in iter_frames(path, sop_instance_uid, frame_numbers):
        if number not in geometry:
            raise DicomInputError(f"has no frame {number}", path=path, tag=_tag("NumberOfFrames"))
        if stored.shape != (rows, columns):
            raise DicomInputError(
                f"frame {number}: decoded pixel data has shape {stored.shape}, expected {rows}x{columns}",
                path=path,
                tag=TAG_PIXEL_DATA,
            )
        frame = geometry[number]
        values = stored.astype(np.float64) * frame.rescale_slope + frame.rescale_intercept
        yield number, values
