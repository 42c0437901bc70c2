"""Loading a study: the entry points that tie discovery, structure sets, references and the stack together."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from netrt.errors import DicomInputError, StudyValidationError
from netrt.study._common import IMAGE_MODALITIES, IMAGE_SOP_CLASSES, _listed, _tag
from netrt.study.discovery import _Instance, _read_dataset, _read_instance, _scan, find_study
from netrt.study.model import ImageSeries, ImagesOnlyStudy, LoadedStudy, NoStructureSetError
from netrt.study.pixels import _check_decodes
from netrt.study.references import (
    TAG_POSITION_MATCH,
    _check_frames,
    _check_referenced_frames,
    _check_references,
    match_by_position,
)
from netrt.study.stack import _check_same_frame, _check_same_plane, _grid, _image_members, _instances, _read_slices
from netrt.study.structure_set import (
    UnresolvedReferencesError,
    _choose_structure_set,
    _describe_series,
    _read_structure_set,
)


def _common_folder(paths: Sequence[Path]) -> Path:
    try:
        return Path(os.path.commonpath([str(p.parent) for p in paths]))
    except ValueError:
        return paths[0].parent


def _group(instances: list[_Instance]) -> tuple[str, dict[str, list[_Instance]]]:
    """The one StudyInstanceUID of the files and their series, or an error naming the file."""
    for inst in instances:
        for keyword, value in (
            ("StudyInstanceUID", inst.study_instance_uid),
            ("SeriesInstanceUID", inst.series_instance_uid),
            ("SOPInstanceUID", inst.sop_instance_uid),
        ):
            if not value:
                raise StudyValidationError("required attribute is missing or empty", path=inst.path, tag=_tag(keyword))
    studies = Counter(inst.study_instance_uid for inst in instances)
    if len(studies) > 1:
        listing = [f"{uid} ({n} files)" for uid, n in studies.most_common()]
        odd = next(inst for inst in instances if inst.study_instance_uid != studies.most_common(1)[0][0])
        raise StudyValidationError(
            f"files of {len(studies)} studies given to load one study: {_listed(listing)}",
            path=odd.path,
            tag=_tag("StudyInstanceUID"),
        )
    series: dict[str, list[_Instance]] = defaultdict(list)
    for inst in instances:
        series[inst.series_instance_uid].append(inst)
    return instances[0].study_instance_uid, dict(series)


def _no_rtstruct(
    kind: type[StudyValidationError], study_uid: str, paths: Sequence[Path], series: dict[str, list[_Instance]]
) -> StudyValidationError:
    return kind(
        f"no RTSTRUCT in study {study_uid}: {len(paths)} file{'s' if len(paths) != 1 else ''}, series "
        f"{_describe_series(series)}",
        path=_common_folder(paths),
        tag=_tag("Modality"),
    )


def load_study(files: Sequence[Path], structure_sets: str = "latest") -> LoadedStudy:
    """Validate one study's files and describe what to process.

    Groups the files by series, picks the RTSTRUCT (the newest, if several reference the same
    series; with ``structure_sets`` ``each`` or ``merge`` every one on that series, see
    :func:`netrt.study.structure_set._choose_structure_set`), resolves the image series it
    references, and checks that series (the frames of enhanced multi-frame images count as slices,
    see :mod:`netrt.study.multiframe`): supported single-
    frame SOP class, one frame of reference (the RTSTRUCT's too), every referenced image present,
    one orientation, matrix size and pixel spacing, geometry tags present, slices evenly spaced
    along the normal, pixel data present with a decoder installed, and the first and last slices
    decodable. Slices are ordered by position along the normal, never by InstanceNumber or
    SliceLocation.

    Slices missing from an otherwise regular stack are accepted when no gap lacks more than
    :data:`MAX_MISSING_SLICES_PER_GAP` slices: the series is described on the full uniform grid
    (``images.slice_indices`` / ``images.missing_slices``) and each gap gets one sentence in
    ``warnings`` with its positions in mm, the files on either side and how many slices are filled
    by interpolation. Larger gaps, duplicated positions, uneven spacing and sheared stacks are
    refused with the positions and files involved.

    When nothing the RTSTRUCT names (contour images, and its referenced series unless received) is
    in the study, its contours are matched to a series by position instead
    (:func:`netrt.study.references.match_by_position`): loaded with a "references matched by
    position" warning when exactly one series of its frame of reference fits, refused otherwise.

    Nothing is written, moved or deleted, whether the study passes or not.

    Raises:
        DicomInputError: a file is unreadable or truncated (named).
        StudyValidationError: the study is incomplete or inconsistent; the message names the file,
            the tag and the reason.
    """
    paths = sorted({Path(p) for p in files})
    if not paths:
        raise StudyValidationError("no files given to load")
    instances = [_read_instance(p) for p in paths]
    study_uid, series = _group(instances)

    structure_set_files = [inst for inst in instances if inst.is_rtstruct]
    if not structure_set_files:
        raise _no_rtstruct(StudyValidationError, study_uid, paths, series)
    found_sets = [_read_structure_set(inst) for inst in structure_set_files]
    chosen_sets, series_uid, source, warnings = _choose_structure_set(
        found_sets, series, lambda rs, cause: match_by_position(rs, series, cause), structure_sets
    )
    chosen = chosen_sets[0]

    members, set_aside = _image_members(series[series_uid])
    warnings.extend(set_aside)
    if not members:
        raise StudyValidationError(
            f"image series {series_uid} holds no image slices (only localizers or structure sets)",
            path=chosen.path,
            tag=source,
        )
    slices = [s for inst in members for s in _read_slices(inst)]  # an enhanced image: one per frame
    frame = _check_same_frame(slices, series_uid)
    warnings.extend(_check_frames(chosen, series_uid, frame, slices[0].path))
    owner = {inst.sop_instance_uid: uid for uid, group in series.items() for inst in group}
    if source != TAG_POSITION_MATCH:
        try:
            _check_references(chosen, series_uid, {s.sop_instance_uid for s in slices}, owner)
        except UnresolvedReferencesError as cause:  # its series was received, none of its images
            _, source, note = match_by_position(chosen, series, cause, only=series_uid)
            warnings.insert(0, note)
    for extra in chosen_sets[1:]:  # processing.structure_sets each / merge: the same checks for each
        warnings.extend(_check_frames(extra, series_uid, frame, slices[0].path))
        try:
            _check_references(extra, series_uid, {s.sop_instance_uid for s in slices}, owner)
        except UnresolvedReferencesError as cause:
            warnings.append(match_by_position(extra, series, cause, only=series_uid)[2])
    _check_same_plane(slices)
    grid = _grid(slices, series_uid)
    ordered = grid.ordered
    warnings.extend(grid.warnings)
    for s in {id(ordered[0]): ordered[0], id(ordered[-1]): ordered[-1]}.values():
        _check_decodes(s.path, s.rows, s.columns, s.sop_instance_uid, s.frame_number)

    used = {s.path for s in ordered} | {rs.path for rs in chosen_sets}
    other_files = tuple(p for p in paths if p not in used)
    registered_files = tuple(
        sorted(
            inst.path
            for uid, group in series.items()
            if uid != series_uid
            for inst in group
            if not inst.is_rtstruct
            and inst.frame_of_reference_uid == frame
            and (inst.modality in IMAGE_MODALITIES or inst.sop_class_uid in IMAGE_SOP_CLASSES)
        )
    )
    first = ordered[0]
    files, sop_uids, slice_files, frame_numbers = _instances(ordered)
    if frame_numbers:
        _check_referenced_frames(chosen, ordered)
    images = ImageSeries(
        series_instance_uid=series_uid,
        sop_class_uid=first.sop_class_uid,
        modality=first.modality or Counter(s.modality for s in ordered).most_common(1)[0][0],
        frame_of_reference_uid=frame,
        files=files,
        sop_instance_uids=sop_uids,
        geometry=grid.geometry,
        positions=grid.positions,
        slice_indices=grid.slice_indices,
        missing_slices=grid.missing,
        slice_files=slice_files,
        frame_numbers=frame_numbers,
    )
    return LoadedStudy(
        study_instance_uid=study_uid,
        images=images,
        rtstruct_file=chosen.path,
        rtstruct_sop_instance_uid=chosen.instance.sop_instance_uid,
        other_files=other_files,
        warnings=tuple(warnings),
        reference_source=source,
        registered_files=registered_files,
        structure_sets=tuple(rs.info() for rs in chosen_sets),
        structure_set_mode=structure_sets,
    )


def load_images_only(files: Sequence[Path]) -> ImagesOnlyStudy:
    """Check a study without an RTSTRUCT for passing its images on unchanged.

    Every file must be a complete, readable DICOM instance of one study (truncation is checked as
    in :func:`load_study`); a repeated SOPInstanceUID is passed on once, and refused when its
    copies hold different images. Nothing is decoded, since nothing is computed from the pixels.

    Raises:
        DicomInputError: a file is unreadable or truncated (named).
        StudyValidationError: the files hold an RTSTRUCT (use :func:`load_study`), several studies,
            or two different images under one SOPInstanceUID.
    """
    paths = sorted({Path(p) for p in files})
    if not paths:
        raise StudyValidationError("no files given to load")
    instances = [_read_instance(p) for p in paths]
    study_uid, series = _group(instances)
    structure_sets = [inst.path.name for inst in instances if inst.is_rtstruct]
    if structure_sets:
        raise StudyValidationError(
            f"holds RTSTRUCT(s) {_listed(structure_sets)}: not an images-only study",
            path=_common_folder(paths),
            tag=_tag("Modality"),
        )
    kept: list[Path] = []
    warnings: list[str] = []
    for uid in sorted(series):
        members, set_aside = _image_members(series[uid])
        warnings.extend(f"image series {uid}: {sentence}" for sentence in set_aside)
        localizers = [inst for inst in series[uid] if inst.is_localizer]
        for inst in sorted([*members, *localizers], key=lambda i: str(i.path)):
            _read_dataset(inst.path, defer_large_values=True)
            kept.append(inst.path)
    return ImagesOnlyStudy(
        study_instance_uid=study_uid,
        files=tuple(kept),
        series=tuple(_describe_series(series).split("; ")),
        warnings=tuple(warnings),
    )


def _skipped_note(skipped: Sequence[tuple[Path, str]]) -> str:
    """One sentence naming the files of a folder that are not usable DICOM instances ("" if none)."""
    if not skipped:
        return ""
    listed = _listed([f"{path.name} ({reason})" for path, reason in skipped], limit=3)
    return f"{len(skipped)} file(s) of the folder are not usable DICOM instances and were not used: {listed}"


def load_found_study(root: Path, study_instance_uid: str | None = None, structure_sets: str = "latest") -> LoadedStudy:
    """:func:`find_study` then :func:`load_study`, with the folder's unusable files never dropped silently.

    Files under ``root`` that are not usable DICOM instances (no preamble or file meta, a
    transfer syntax that cannot be parsed, garbage, no StudyInstanceUID) cannot say which study
    they belonged to. They are named in a warning when the study loads, and appended to the
    error when it does not (often the cause: a slice that could not be read is then an image the
    RTSTRUCT references but that is absent).

    Raises:
        NoStructureSetError: the study holds no RTSTRUCT.
        DicomInputError, StudyValidationError: as :func:`load_study`, or no such study under ``root``.
    """
    studies, skipped = _scan(root)
    note = _skipped_note(skipped)
    matching = sorted(uid for uid in studies if study_instance_uid in (None, uid))
    if len(matching) != 1:
        wanted = f"study {study_instance_uid}" if study_instance_uid else "exactly one study"
        found = f" ({_listed(matching)})" if matching else ""
        raise StudyValidationError(
            f"expected {wanted}, found {len(matching)} matching{found}" + (f"; {note}" if note else ""), path=root
        )
    instances = studies[matching[0]]
    paths = sorted(inst.path for inst in instances)
    if not any(inst.is_rtstruct for inst in instances):
        series: dict[str, list[_Instance]] = defaultdict(list)
        for inst in instances:
            series[inst.series_instance_uid].append(inst)
        error = _no_rtstruct(NoStructureSetError, matching[0], paths, dict(series))
        raise NoStructureSetError(f"{error.reason}; {note}" if note else error.reason, path=error.path, tag=error.tag)
    try:
        study = load_study(paths, structure_sets)
    except DicomInputError as exc:
        if not note:
            raise
        raise type(exc)(f"{exc.reason}; {note}", path=exc.path, tag=exc.tag) from exc
    return replace(study, warnings=(*study.warnings, note)) if note else study


def find_images_only(root: Path, study_instance_uid: str | None = None) -> ImagesOnlyStudy:
    """:func:`find_study` then :func:`load_images_only`; the folder's unusable files are named as in
    :func:`load_found_study`."""
    found = find_study(root, study_instance_uid)
    note = _skipped_note(found.skipped)
    study = load_images_only(found.files)
    return replace(study, warnings=(*study.warnings, note)) if note else study
