"""Reference matching: the chosen RTSTRUCT's image and frame references against the received images.

**Stale references.** A CT re-exported, re-imported or converted after contouring gets new
SOPInstanceUIDs (sometimes a new SeriesInstanceUID too), so the RTSTRUCT's ContourImageSequence
names images that were never received. When *nothing* it names was received (a partly received
series is an incomplete study and stays refused), :func:`match_by_position` ties it to the images
by geometry instead:

* candidates are the received image series in the RTSTRUCT's Referenced Frame of Reference; if its
  referenced series *was* received (only the instance UIDs changed), that series alone;
* a candidate fits when every fillable contour (CLOSED_PLANAR / CLOSEDPLANAR_XOR) lies, point by
  point, within :data:`POSITION_MATCH_FRACTION` of the series' slice spacing of one of its received
  slices, measured along that series' slice normal;
* exactly one candidate must fit; the study then loads with the warning ``references matched by
  position: ...`` in its run summary. No candidate in the frame, no fitting candidate, or several
  fitting candidates: refused, naming the cause.

The masks never depended on the instance references: :mod:`netrt.rasterize` places every contour
on its slice by position, with the same quarter-spacing rule, so a position-matched study gives the
same masks as its correctly referenced twin, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from netrt.errors import DicomInputError, NetrtError, StudyValidationError
from netrt.geometry import orientation_vectors, slice_positions
from netrt.rasterize import DEFAULT_PLANE_TOLERANCE, geometric_type_skip_reason
from netrt.study._common import (
    IMAGE_MODALITIES,
    IMAGE_SOP_CLASSES,
    MAX_LISTED,
    TAG_CONTOUR_IMAGES,
    TAG_REFERENCED_FRAME,
    _listed,
    _tag,
    _text,
    _unique,
)
from netrt.study.discovery import _Instance, _read_dataset
from netrt.study.stack import _image_members, _read_slices, _Slice
from netrt.study.structure_set import UnresolvedReferencesError, _items, _StructureSet

#: A contour matches a slice when every one of its points lies within this fraction of the slice
#: spacing of that slice's plane. It is the rasteriser's own plane tolerance
#: (:data:`netrt.rasterize.DEFAULT_PLANE_TOLERANCE`), so the match accepts exactly the contours the
#: mask step will place on a slice and no other: a quarter spacing leaves half a spacing between the
#: capture ranges of two neighbouring slices (a contour can never be near two), absorbs DS rounding
#: and float export (0.2 mm off-plane points on 1 mm slices), and a series whose slices sit half a
#: spacing from the contours (another acquisition, a shifted reconstruction) never fits.
POSITION_MATCH_FRACTION = DEFAULT_PLANE_TOLERANCE
#: The reference rule reported for a study matched by position (``LoadedStudy.reference_source``).
TAG_POSITION_MATCH = f"{TAG_REFERENCED_FRAME} and contour positions ({_tag('ContourData')})"


def _check_references(rs: _StructureSet, series_uid: str, image_sops: set[str], owner: dict[str, str]) -> None:
    """Every image the RTSTRUCT references for this series must be in it; else list what is absent."""
    referenced = _unique([*rs.series_images.get(series_uid, ()), *rs.contour_images])
    missing = [sop for sop in referenced if sop not in image_sops]
    if not missing:
        return
    elsewhere = [sop for sop in missing if sop in owner]
    other_series = _listed(_unique(owner[sop] for sop in elsewhere))
    note = f"; {len(elsewhere)} of them belong to other series of the study ({other_series})" if elsewhere else ""
    # Nothing it names was received at all: the references may be stale (see match_by_position).
    kind = UnresolvedReferencesError if len(missing) == len(referenced) and not elsewhere else StudyValidationError
    raise kind(
        f"references {len(missing)} image(s) absent from image series {series_uid} "
        f"({len(image_sops)} present): {_listed(missing)}{note}",
        path=rs.path,
        tag=TAG_CONTOUR_IMAGES,
    )


def _check_frames(rs: _StructureSet, series_uid: str, frame: str, first_image: Path) -> list[str]:
    """The RTSTRUCT must be in the images' frame of reference; odd ROI frames are warnings."""
    rs_frame = rs.series_frames.get(series_uid) or (rs.frames[0] if rs.frames else "")
    if rs_frame and rs_frame != frame:
        raise StudyValidationError(
            f"RTSTRUCT frame of reference {rs_frame} differs from {frame} of its image series {series_uid} "
            f"(e.g. {first_image.name}); its contours would not line up with the images",
            path=rs.path,
            tag=TAG_REFERENCED_FRAME,
        )
    odd = [name or "(unnamed)" for name, roi_frame in rs.roi_frames if roi_frame and roi_frame != frame]
    if odd:
        return [
            f"ROI(s) {_listed(odd)} of {rs.path.name} name a frame of reference other than the images' {frame}; "
            "their contours may not line up"
        ]
    return []


def _check_referenced_frames(rs: _StructureSet, slices: list[_Slice]) -> None:
    """Every ReferencedFrameNumber the RTSTRUCT gives for a multi-frame image must be a frame of it.

    A contour image of an enhanced image is named by ReferencedSOPInstanceUID plus
    ReferencedFrameNumber (or by the SOP instance alone, which is allowed: the contours are placed
    by position). A frame number the file does not hold means the RTSTRUCT was drawn on another
    version of the image (one with more frames), so the study is refused, naming the RTSTRUCT,
    the tag, the instance and the frame.

    Raises:
        DicomInputError: the RTSTRUCT cannot be read again.
        StudyValidationError: a referenced frame is not in the image.
    """
    frames: dict[str, set[int]] = {}
    for s in slices:
        if s.frame_number:
            frames.setdefault(s.sop_instance_uid, set()).add(s.frame_number)
    ds: Dataset = _read_dataset(rs.path, defer_large_values=False)
    items: list[Dataset] = []
    for frame_item in _items(ds, "ReferencedFrameOfReferenceSequence"):
        for study_item in _items(frame_item, "RTReferencedStudySequence"):
            for series_item in _items(study_item, "RTReferencedSeriesSequence"):
                items.extend(_items(series_item, "ContourImageSequence"))
    for roi_item in _items(ds, "ROIContourSequence"):
        for contour in _items(roi_item, "ContourSequence"):
            items.extend(_items(contour, "ContourImageSequence"))
    for item in items:
        sop = _text(item, "ReferencedSOPInstanceUID")
        if sop not in frames or item.get("ReferencedFrameNumber") in (None, ""):
            continue
        value = item.ReferencedFrameNumber
        numbers = list(value) if isinstance(value, list | tuple) or hasattr(value, "__iter__") else [value]
        try:
            wanted = [int(n) for n in numbers]
        except (TypeError, ValueError) as exc:
            raise StudyValidationError(
                f"ReferencedFrameNumber {value!r} of image {sop} is not a frame number",
                path=rs.path,
                tag=TAG_CONTOUR_FRAMES,
            ) from exc
        absent = [n for n in wanted if n not in frames[sop]]
        if absent:
            raise StudyValidationError(
                f"references frame(s) {_listed([str(n) for n in absent])} of multi-frame image {sop}, which holds "
                f"frames 1..{max(frames[sop])}; the structure set was drawn on another version of the image",
                path=rs.path,
                tag=TAG_CONTOUR_FRAMES,
            )


#: Where an RTSTRUCT names a frame of a multi-frame image.
TAG_CONTOUR_FRAMES = _tag("ROIContourSequence", "ContourSequence", "ContourImageSequence", "ReferencedFrameNumber")


@dataclass(frozen=True)
class _Contour:
    """One fillable contour of the RTSTRUCT: where it comes from and its points (LPS mm)."""

    roi: str
    index: int  # position in its ROI's ContourSequence
    points: npt.NDArray[np.float64]


_CONTOUR_DATA_TAG = 0x30060050


def _contour_values(contour: Dataset) -> npt.NDArray[np.float64]:
    """ContourData as floats, parsed from the raw DS text when it has not been converted yet.

    pydicom turns every DS value into a ``DSfloat`` object; for a few hundred thousand points
    that takes most of a second, while numpy parses the same text in a few milliseconds.

    Raises:
        ValueError, TypeError: a value is not a number.
    """
    if _CONTOUR_DATA_TAG not in contour:
        return np.zeros(0)
    element = contour.get_item(_CONTOUR_DATA_TAG)
    if isinstance(element, RawDataElement) and isinstance(element.value, bytes):
        text = element.value.decode("ascii").replace("\\", " ").replace("\x00", " ")
        return np.asarray(text.split(), dtype=np.float64)
    data = contour.get("ContourData")
    return np.atleast_1d(np.asarray([] if data in (None, "") else data, dtype=np.float64))


def _contours(rs: _StructureSet) -> list[_Contour]:
    """Every fillable contour with at least three finite points (what the mask step can place).

    Raises:
        DicomInputError: the RTSTRUCT cannot be read again, a nested item cannot be parsed, or a
            ContourData is not numeric (naming the ROI and contour).
    """
    ds: Dataset = _read_dataset(rs.path, defer_large_values=False)
    found: list[_Contour] = []
    try:
        names = {}
        for item in _items(ds, "StructureSetROISequence"):
            names[_text(item, "ROINumber")] = _text(item, "ROIName") or f"ROI {_text(item, 'ROINumber')}"
        for roi_item in _items(ds, "ROIContourSequence"):
            number = _text(roi_item, "ReferencedROINumber")
            name = names.get(number, f"ROI {number}")
            for index, contour in enumerate(_items(roi_item, "ContourSequence")):
                kind = _text(contour, "ContourGeometricType") or "CLOSED_PLANAR"
                if geometric_type_skip_reason(kind) is not None:
                    continue
                try:
                    values = _contour_values(contour)
                except (TypeError, ValueError) as exc:
                    raise DicomInputError(
                        f"ROI {name!r} contour {index}: ContourData is not numeric ({exc})",
                        path=rs.path,
                        tag=_tag("ContourData"),
                    ) from exc
                if values.size < 9 or values.size % 3 or not np.all(np.isfinite(values)):
                    continue
                found.append(_Contour(name, index, values.reshape(-1, 3)))
    except NetrtError:
        raise
    except Exception as exc:  # a malformed nested item surfaces only when the sequence is parsed
        raise DicomInputError(f"RTSTRUCT cannot be parsed: {type(exc).__name__}: {exc}", path=rs.path) from exc
    return found


@dataclass(frozen=True)
class _Fit:
    """How one candidate series fits the contours by position."""

    series_uid: str
    spacing: float
    tolerance: float
    misses: list[str]  # one sentence per contour that lies on no received slice
    worst: float  # largest point distance (mm) from its matched slice, over the matched contours


def _fit(series_uid: str, members: list[_Instance], contours: list[_Contour]) -> _Fit:
    """Check every contour against the received slices of one series (headers only)."""
    slices = [s for inst in members for s in _read_slices(inst)]  # an enhanced image: one per frame
    orientation = slices[0].orientation
    try:
        _, _, normal = orientation_vectors(orientation)
    except StudyValidationError as exc:
        raise StudyValidationError(exc.reason, path=slices[0].path, tag=exc.tag) from exc
    along = np.unique(slice_positions([s.position for s in slices], orientation))
    single = float(slices[0].slice_thickness or 0.0)  # one slice: its thickness stands for the spacing
    spacing = float(np.median(np.diff(along))) if along.size > 1 else single
    tolerance = POSITION_MATCH_FRACTION * spacing
    misses: list[str] = []
    worst = 0.0
    for contour in contours:
        heights = contour.points @ normal
        low, high = float(heights.min()), float(heights.max())
        nearest = float(along[int(np.argmin(np.abs(along - (low + high) / 2)))])
        offset = max(high - nearest, nearest - low)
        if offset > tolerance:
            misses.append(
                f"ROI {contour.roi!r} contour {contour.index} at {(low + high) / 2:.3f} mm along the slice normal "
                f"(points {low:.3f}..{high:.3f} mm), nearest slice at {nearest:.3f} mm"
            )
        else:
            worst = max(worst, offset)
    return _Fit(series_uid, spacing, tolerance, misses, worst)


def match_by_position(
    rs: _StructureSet,
    series: dict[str, list[_Instance]],
    cause: UnresolvedReferencesError,
    only: str | None = None,
) -> tuple[str, str, str]:
    """The image series the RTSTRUCT's contours lie on, when its references name nothing received.

    ``only`` restricts the candidates to one series (its referenced series, received under its own
    SeriesInstanceUID); otherwise every received image series in the RTSTRUCT's frame of reference
    is a candidate. Returns the series UID, the reference rule (:data:`TAG_POSITION_MATCH`) and the
    run-summary warning. See the module docstring for the rule.

    Raises:
        StudyValidationError: no image series in its frame of reference, no contour to match, the
            contours do not lie on the slices of any candidate, or on those of several; each message
            starts with ``cause`` (what did not resolve) and names the RTSTRUCT and the tag.
    """
    frames = set(rs.frames)
    images = {
        uid: members
        for uid, members in series.items()
        if any(
            not inst.is_rtstruct and (inst.modality in IMAGE_MODALITIES or inst.sop_class_uid in IMAGE_SOP_CLASSES)
            for inst in members
        )
    }
    in_frame = sorted(
        uid for uid, members in images.items() if any(inst.frame_of_reference_uid in frames for inst in members)
    )
    if only is not None:
        in_frame = [uid for uid in in_frame if uid == only]
    prefix = f"{cause.reason}; matching its contours to the images by position was tried"
    if not in_frame:
        others = _listed(
            [
                f"{uid} in {_unique(inst.frame_of_reference_uid for inst in members)[0] if members else '?'}"
                for uid, members in sorted(images.items())
            ]
        )
        raise StudyValidationError(
            f"{prefix}, but no received image series is in its frame of reference "
            f"{_listed(list(rs.frames)) or '(none)'} (image series: {others or 'none'}); a different frame of "
            "reference means different patient coordinates, so positions cannot be compared",
            path=rs.path,
            tag=TAG_REFERENCED_FRAME,
        )
    contours = _contours(rs)
    if not contours:
        raise StudyValidationError(
            f"{prefix}, but it has no closed contour to match", path=rs.path, tag=_tag("ContourData")
        )
    fits = []
    for uid in in_frame:
        try:
            members, _ = _image_members(series[uid])
            if members:
                fits.append(_fit(uid, members, contours))
        except NetrtError as exc:  # a series that cannot be stacked (e.g. multi-frame) cannot fit
            fits.append(_Fit(uid, 0.0, 0.0, [f"its slices cannot be compared: {exc}"], 0.0))
    matching = [fit for fit in fits if not fit.misses]
    if not matching:
        reasons = "; ".join(
            f"image series {fit.series_uid} (slice spacing {fit.spacing:.4g} mm, tolerance {fit.tolerance:.3g} mm): "
            f"{len(fit.misses)} of {len(contours)} contours lie on none of its slices, e.g. "
            + "; ".join(fit.misses[:3])
            for fit in fits[:MAX_LISTED]
        )
        raise StudyValidationError(
            f"{prefix}, but its contours do not lie on the received slices: {reasons or 'no image slices received'}",
            path=rs.path,
            tag=_tag("ContourData"),
        )
    if len(matching) > 1:
        raise StudyValidationError(
            f"{prefix}, but its contours lie on the slices of several image series in its frame of reference "
            f"({_listed([fit.series_uid for fit in matching])}); cannot tell which one they were drawn on",
            path=rs.path,
            tag=TAG_REFERENCED_FRAME,
        )
    fit = matching[0]
    note = (
        f"references matched by position: RTSTRUCT {rs.path.name} names images not received ({cause.reason}); "
        f"all {len(contours)} of its closed contours lie on slices of image series {fit.series_uid} in its frame "
        f"of reference (largest distance {fit.worst:.3f} mm, tolerance {fit.tolerance:.3g} mm = "
        f"{POSITION_MATCH_FRACTION:g} of the {fit.spacing:.4g} mm slice spacing), so it is processed on that series"
    )
    return fit.series_uid, TAG_POSITION_MATCH, note
