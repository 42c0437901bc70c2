"""Structure-set resolution: read each RTSTRUCT's references, choose the one to process and the
image series it is drawn on.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset

from netrt.errors import DicomInputError, NetrtError, StudyValidationError
from netrt.study._common import (
    IMAGE_MODALITIES,
    IMAGE_SOP_CLASSES,
    TAG_CONTOUR_IMAGES,
    TAG_REFERENCED_FRAME,
    TAG_REFERENCED_SERIES,
    _listed,
    _tag,
    _text,
    _unique,
)
from netrt.study.discovery import _Instance, _read_dataset
from netrt.study.model import StructureSetInfo


def _time_seconds(value: str) -> float:
    """TM ``HHMMSS.FFFFFF`` (any precision) -> seconds; -1 when absent or malformed."""
    text = value.strip()
    whole, _, fraction = text.partition(".")
    if not whole.isdigit() or len(whole) > 6 or (fraction and not fraction.isdigit()):
        return -1.0
    whole = whole.ljust(6, "0")
    seconds = int(whole[:2]) * 3600 + int(whole[2:4]) * 60 + int(whole[4:6])
    return seconds + (float(f"0.{fraction}") if fraction else 0.0)


class UnresolvedReferencesError(StudyValidationError):
    """The RTSTRUCT names images or a series of which nothing was received.

    Raised where the references may simply be stale (the images re-exported under new UIDs after
    contouring); :func:`netrt.study.references.match_by_position` then tries the contours'
    positions, and re-raises this reason when that fails too.
    """


#: ``(structure set, why its references did not resolve) -> (series UID, reference rule, warning)``
PositionFallback = Callable[["_StructureSet", UnresolvedReferencesError], tuple[str, str, str]]


@dataclass(frozen=True)
class _StructureSet:
    """What the loader needs from one RTSTRUCT: its references and its rank by age."""

    instance: _Instance
    date: str
    time: str
    creation_date: str  # InstanceCreationDate
    creation_time: str  # InstanceCreationTime
    label: str  # StructureSetLabel
    referenced_series: tuple[str, ...]  # RTReferencedSeriesSequence > SeriesInstanceUID, in order
    series_images: dict[str, tuple[str, ...]]  # series UID -> its ContourImageSequence SOP UIDs
    contour_images: tuple[str, ...]  # ROIContourSequence > ... > ReferencedSOPInstanceUID
    frames: tuple[str, ...]  # ReferencedFrameOfReferenceSequence > FrameOfReferenceUID, in order
    series_frames: dict[str, str]  # series UID -> FrameOfReferenceUID of the item listing it
    roi_frames: tuple[tuple[str, str], ...]  # (ROIName, ReferencedFrameOfReferenceUID)

    @property
    def path(self) -> Path:
        return self.instance.path

    @property
    def rank(self) -> tuple[str, float, str, float]:
        """Sort key, newest last: StructureSetDate, StructureSetTime, then InstanceCreationDate,
        InstanceCreationTime.

        The structure set's own date and time say when its contours were approved or saved; the
        instance's creation date and time only when this file was written, so they come second
        (an export of an old structure set is not a newer one). InstanceNumber is no age at all
        (a counter each system starts anew) and plays no part. A value absent counts as oldest.
        """
        return (self.date, _time_seconds(self.time), self.creation_date, _time_seconds(self.creation_time))

    def describe_age(self) -> str:
        return (
            f"{self.path.name} (StructureSetDate/Time {self.date or '-'} {self.time or '-'}, "
            f"InstanceCreationDate/Time {self.creation_date or '-'} {self.creation_time or '-'})"
        )

    def info(self) -> StructureSetInfo:
        """The public description of this structure set (:class:`netrt.study.StructureSetInfo`)."""
        return StructureSetInfo(
            self.path, self.instance.sop_instance_uid, self.label, self.describe_age(), self.rank, self.path.name
        )


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    value = ds.get(keyword)
    return list(value) if value else []


def _read_structure_set(instance: _Instance) -> _StructureSet:
    """Read the RTSTRUCT in full and collect every image and frame it references.

    Raises:
        DicomInputError: the file is truncated or a nested sequence cannot be parsed.
    """
    ds = _read_dataset(instance.path, defer_large_values=False)
    try:
        referenced_series: list[str] = []
        series_images: dict[str, list[str]] = defaultdict(list)
        frames: list[str] = []
        series_frames: dict[str, str] = {}
        for frame_item in _items(ds, "ReferencedFrameOfReferenceSequence"):
            frame = _text(frame_item, "FrameOfReferenceUID")
            frames.append(frame)
            for study_item in _items(frame_item, "RTReferencedStudySequence"):
                for series_item in _items(study_item, "RTReferencedSeriesSequence"):
                    series_uid = _text(series_item, "SeriesInstanceUID")
                    if not series_uid:
                        continue
                    referenced_series.append(series_uid)
                    if frame:
                        series_frames.setdefault(series_uid, frame)
                    series_images[series_uid].extend(
                        _text(image, "ReferencedSOPInstanceUID")
                        for image in _items(series_item, "ContourImageSequence")
                    )
        contour_images: list[str] = []
        for roi_item in _items(ds, "ROIContourSequence"):
            for contour in _items(roi_item, "ContourSequence"):
                contour_images.extend(
                    _text(image, "ReferencedSOPInstanceUID") for image in _items(contour, "ContourImageSequence")
                )
        roi_frames = tuple(
            (_text(item, "ROIName"), _text(item, "ReferencedFrameOfReferenceUID"))
            for item in _items(ds, "StructureSetROISequence")
        )
    except NetrtError:
        raise
    except Exception as exc:  # a malformed nested item surfaces only when the sequence is parsed
        raise DicomInputError(f"RTSTRUCT cannot be parsed: {type(exc).__name__}: {exc}", path=instance.path) from exc
    if not frames and instance.frame_of_reference_uid:
        frames.append(instance.frame_of_reference_uid)
    return _StructureSet(
        instance=instance,
        date=_text(ds, "StructureSetDate"),
        time=_text(ds, "StructureSetTime"),
        creation_date=_text(ds, "InstanceCreationDate"),
        creation_time=_text(ds, "InstanceCreationTime"),
        label=_text(ds, "StructureSetLabel"),
        referenced_series=tuple(_unique(referenced_series)),
        series_images={uid: tuple(_unique(sops)) for uid, sops in series_images.items()},
        contour_images=tuple(_unique(contour_images)),
        frames=tuple(_unique(frames)),
        series_frames=series_frames,
        roi_frames=roi_frames,
    )


def _describe_series(series: dict[str, list[_Instance]]) -> str:
    parts = []
    for uid, instances in sorted(series.items()):
        modality = Counter(inst.modality or "?" for inst in instances).most_common(1)[0][0]
        parts.append(f"{uid} ({modality}, {len(instances)} file{'s' if len(instances) != 1 else ''})")
    return "; ".join(parts)


def _resolve_image_series(rs: _StructureSet, series: dict[str, list[_Instance]]) -> tuple[str, str]:
    """The series the RTSTRUCT's contours are drawn on, and the tag path that said so.

    Rules, in order: (1) RTReferencedSeriesSequence > SeriesInstanceUID; (2) the series holding
    the SOP instances named by the contours' ContourImageSequence; (3) the single image series in
    the RTSTRUCT's frame of reference. A rule that applies but finds nothing, or finds several
    series, is an error; it never falls through to a weaker rule, because a named reference that
    does not resolve means the study is incomplete, not that another series will do.

    Raises:
        StudyValidationError: naming the RTSTRUCT file and the tag of the rule that failed.
    """
    owner = {inst.sop_instance_uid: uid for uid, members in series.items() for inst in members}
    candidates = [uid for uid in series if not all(inst.is_rtstruct for inst in series[uid])]
    present = f"image series in the study: {_describe_series({u: series[u] for u in candidates}) or 'none'}"
    contour_sops = set(rs.contour_images)

    if rs.referenced_series:
        found = [uid for uid in rs.referenced_series if uid in candidates]
        if len(found) > 1 and contour_sops:
            drawn_on = [uid for uid in found if any(owner.get(sop) == uid for sop in contour_sops)]
            found = drawn_on if len(drawn_on) == 1 else found
        if len(found) == 1:
            return found[0], TAG_REFERENCED_SERIES
        if not found:
            named = contour_sops.union(*rs.series_images.values())
            # stale only when no image it names was received either; else the RTSTRUCT contradicts itself
            kind = StudyValidationError if any(sop in owner for sop in named) else UnresolvedReferencesError
            raise kind(
                f"references image series {_listed(list(rs.referenced_series))}, not in this study ({present})",
                path=rs.path,
                tag=TAG_REFERENCED_SERIES,
            )
        raise StudyValidationError(
            f"references several image series ({_listed(found)}) and its contours do not single one out",
            path=rs.path,
            tag=TAG_REFERENCED_SERIES,
        )

    if contour_sops:
        owners = _unique(owner.get(sop, "") for sop in rs.contour_images)
        owners = [uid for uid in owners if uid in candidates]
        if len(owners) == 1:
            return owners[0], TAG_CONTOUR_IMAGES
        if not owners:
            raise UnresolvedReferencesError(
                f"none of the {len(contour_sops)} images its contours reference is in the study "
                f"(e.g. {_listed(list(rs.contour_images))}; {present})",
                path=rs.path,
                tag=TAG_CONTOUR_IMAGES,
            )
        raise StudyValidationError(
            f"its contours reference images of several series ({_listed(owners)}); one series expected",
            path=rs.path,
            tag=TAG_CONTOUR_IMAGES,
        )

    if not rs.frames:
        raise StudyValidationError(
            "names no image series, no contour images and no frame of reference; cannot tell which images it "
            "belongs to",
            path=rs.path,
            tag=TAG_REFERENCED_FRAME,
        )
    frame = rs.frames[0]
    in_frame = [
        uid
        for uid in candidates
        if any(
            not inst.is_rtstruct
            and inst.frame_of_reference_uid == frame
            and (inst.modality in IMAGE_MODALITIES or inst.sop_class_uid in IMAGE_SOP_CLASSES)
            for inst in series[uid]
        )
    ]
    if len(in_frame) == 1:
        return in_frame[0], TAG_REFERENCED_FRAME
    if not in_frame:
        raise StudyValidationError(
            f"no image series of the study is in its frame of reference {frame} ({present})",
            path=rs.path,
            tag=TAG_REFERENCED_FRAME,
        )
    raise StudyValidationError(
        f"several image series share its frame of reference {frame} ({_listed(in_frame)}) and it names none of "
        "them; cannot tell which one its contours belong to",
        path=rs.path,
        tag=TAG_REFERENCED_FRAME,
    )


#: ``processing.structure_sets``: which RTSTRUCTs on the image series are processed.
STRUCTURE_SET_MODES = ("latest", "each", "merge")


def _choose_structure_set(
    structure_sets: list[_StructureSet],
    series: dict[str, list[_Instance]],
    fallback: PositionFallback | None = None,
    mode: str = "latest",
) -> tuple[list[_StructureSet], str, str, list[str]]:
    """Pick the RTSTRUCTs to process: the newest decides the image series; ``mode`` which of the
    RTSTRUCTs on that series are processed.

    ``latest``: the newest alone; older ones on the same series are reported as not used, and two
    different RTSTRUCTs of the series that are equally new are refused (which one is current
    cannot be told). ``each`` and ``merge``: every RTSTRUCT whose references resolve to that series
    (by reference, or by contour position through ``fallback``), newest first; equally new ones
    are all processed, so they are not refused here (``merge`` refuses them only where their ROI
    names clash, see :func:`netrt.pipeline.merged_structure_sets`). In every mode a second copy of
    an instance (same SOPInstanceUID) is ignored, and an RTSTRUCT on another image series is kept
    in the study's ``other_files``, not processed, with a warning.

    Returns the structure sets to process (newest first), the image series UID, the reference rule
    of the newest and warnings. When the newest RTSTRUCT's references name nothing received
    (:class:`UnresolvedReferencesError`), ``fallback`` (matching by contour position) is asked for
    the series instead; its warning comes first.

    Raises:
        StudyValidationError: the newest RTSTRUCT does not resolve, or (``latest``) two different
            RTSTRUCTs of the same series are equally new.
    """
    if mode not in STRUCTURE_SET_MODES:
        raise ValueError(f"unknown structure set mode {mode!r}; known: {', '.join(STRUCTURE_SET_MODES)}")
    # newest first; among equals the first by path, so that the choice never depends on listing order
    by_path = sorted(structure_sets, key=lambda rs: str(rs.path))
    ranked = sorted(by_path, key=lambda rs: rs.rank, reverse=True)
    chosen = ranked[0]
    warnings: list[str] = []
    try:
        series_uid, source = _resolve_image_series(chosen, series)
    except UnresolvedReferencesError as exc:
        if fallback is None:
            raise
        series_uid, source, note = fallback(chosen, exc)
        warnings.append(note)
    same_series: list[_StructureSet] = []
    seen = {chosen.instance.sop_instance_uid: chosen}
    for other in ranked[1:]:
        first = seen.get(other.instance.sop_instance_uid)
        if first is not None:
            warnings.append(
                f"{other.path.name} is another copy of RTSTRUCT {first.instance.sop_instance_uid} "
                f"({first.path.name}); ignored"
            )
            continue
        seen[other.instance.sop_instance_uid] = other
        try:
            other_series: str | None = _resolve_image_series(other, series)[0]
            why = f"it references image series {other_series}"
        except UnresolvedReferencesError as exc:
            other_series, why = None, f"its references do not resolve ({exc.reason})"
            if fallback is not None and mode != "latest":
                try:
                    other_series, _, note = fallback(other, exc)
                except StudyValidationError as again:
                    why = f"its references do not resolve ({again.reason})"
                else:
                    why = f"its contours lie on image series {other_series}"
                    if other_series == series_uid:
                        warnings.append(note)
        except StudyValidationError as exc:
            other_series, why = None, f"its references do not resolve ({exc.reason})"
        if other_series == series_uid:
            if mode == "latest" and other.rank == chosen.rank:
                raise StudyValidationError(
                    f"RTSTRUCTs {chosen.path.name} and {other.path.name} both reference image series {series_uid} "
                    "and are equally new (same StructureSetDate, StructureSetTime, InstanceCreationDate and "
                    "InstanceCreationTime); cannot tell which one is current; keep only the current one in the study "
                    "(or set processing.structure_sets to each or merge)",
                    path=chosen.path,
                    tag=_tag("StructureSetDate"),
                )
            same_series.append(other)
        elif mode == "latest":
            warnings.append(
                f"RTSTRUCT {other.path.name} is kept with the study but not processed: {why}, and one structure "
                f"set per study is processed (the newest, {chosen.path.name})"
            )
        else:
            warnings.append(
                f"RTSTRUCT {other.path.name} is kept with the study but not processed: {why}, and only the "
                f"structure sets on image series {series_uid} are processed (that of the newest, {chosen.path.name})"
            )
    if same_series and mode == "latest":
        warnings.insert(
            0,
            f"{len(same_series) + 1} RTSTRUCTs reference image series {series_uid}; using the newest, "
            f"{chosen.describe_age()}; not used: {'; '.join(rs.describe_age() for rs in same_series)}",
        )
        return [chosen], series_uid, source, warnings
    if same_series:
        how = "each processed on its own" if mode == "each" else "their ROIs merged into one set"
        warnings.insert(
            0,
            f"{len(same_series) + 1} RTSTRUCTs reference image series {series_uid}; {how} "
            f"(processing.structure_sets: {mode}), newest first: "
            f"{'; '.join(rs.describe_age() for rs in [chosen, *same_series])}",
        )
    return [chosen, *same_series], series_uid, source, warnings
