"""The steps of processing one study, as plain functions over paths and UIDs.

Each function is one Prefect task's body (see ``flows/process_study.py``), and together they are
also the direct, orchestration-free path the benchmarks compare the flow against. Big objects
(the volume, the mask) never cross a step boundary: the mask is stored under the study's work dir
and steps hand each other its path.

The mask always lives on the image series' uniform grid. When the series lacks slices (see
:attr:`netrt.study.ImageSeries.missing_slices`), the mask on those grid slices is interpolated by
shape (:func:`fill_missing_mask_slices`), the reformats use the whole grid, and the axial series
carries only the rows of the slices that were received, one output image per received image.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom import dcmread

from netrt import __version__
from netrt.anonymize import anonymize_study, map_uid
from netrt.config import AnonymizationConfig, ProcessingConfig
from netrt.errors import RoiError, StudyValidationError
from netrt.masks import (
    BoolArray,
    MergedMask,
    RoiContours,
    RoiReport,
    ignored_names,
    kept_names,
    load_mask,
    merge_rois,
    read_structure_set,
    save_mask,
    selection_reason,
)
from netrt.outputs.base import STUDY, OutputContext, WrittenSeries, output_kind
from netrt.outputs.rois import FALLBACK_PALETTE, RoiBox, RoiInfo, read_roi_infos, save_roi_boxes
from netrt.preview import Preview, preview_study
from netrt.settings import PLANE_NUMBER, kind_settings_key, settings_key
from netrt.stamps import FileStamp, files_unchanged, stamp_file, stamp_files
from netrt.study import ImageSeries, ImagesOnlyStudy, LoadedStudy, StructureSetInfo, load_study

# SimpleITK's SWIG functions carry no annotations; an Any handle keeps mypy --strict quiet without
# scattering ignores (the same device as in netrt.geometry and netrt.reformat).
_sitk: Any = sitk

__all__ = [
    "PLANE_NUMBER",
    "MaskStepResult",
    "WrittenSeries",
    "compute_mask",
    "kind_settings_key",
    "load_mask",
    "save_mask",
    "settings_key",
    "write_output",
    "write_plane",
]


@dataclass(frozen=True)
class MaskStepResult:
    """Where the merged and per-ROI masks are stored and what went into them; the stamps: the
    mask files as written.

    ``roi_masks`` holds each kept ROI's mask cut to its box (:mod:`netrt.outputs.rois`), with
    missing slices filled like the merged mask's; ``roi_infos`` the kept ROIs' names, colours and
    types in RTSTRUCT order.
    """

    mask_path: Path
    rois: tuple[RoiReport, ...]
    warnings: tuple[str, ...]
    voxel_count: int
    # The defaults only let a result persisted before these fields load (Prefect reads every field
    # of a cached result); such a result is never intact (:func:`result_files_intact`): recomputed.
    mask_stamp: FileStamp | None = None
    roi_masks: Path | None = None
    roi_masks_stamp: FileStamp | None = None
    roi_infos: tuple[RoiInfo, ...] = ()

    @property
    def kept(self) -> list[str]:
        return kept_names(self.rois)

    @property
    def ignored(self) -> list[str]:
        return ignored_names(self.rois)


def _slice_signed_distance(mask_slice: npt.NDArray[np.bool_], spacing: tuple[float, float]) -> npt.NDArray[np.float32]:
    """Twice the signed in-plane distance in mm to the boundary of a non-empty 2-D mask (negative inside).

    As in :mod:`netrt.reformat`, the Maurer map of the mask minus that of its complement is zero
    half-way between an inside and an outside pixel centre, where the rasteriser's pixel-centre
    rule puts the boundary, so a shape interpolated between two identical slices is that shape
    again, not one shrunk by half a pixel. One background pixel of padding gives a mask that fills
    the whole slice a boundary just outside the image, instead of an empty complement whose map is
    undefined.
    """
    padded = np.pad(mask_slice, 1).astype(np.uint8)
    image = _sitk.GetImageFromArray(padded)
    image.SetSpacing(spacing)
    inside = _sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)
    outside = _sitk.SignedMaurerDistanceMap(
        1 - image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    distance: npt.NDArray[np.float32] = _sitk.GetArrayFromImage(_sitk.Subtract(inside, outside))[1:-1, 1:-1]
    return distance.astype(np.float32, copy=False)


def fill_missing_mask_slices(mask: npt.NDArray[np.bool_], series: ImageSeries) -> npt.NDArray[np.bool_]:
    """The mask with every missing grid slice of ``series`` filled by shape-based interpolation.

    Contours exist only on received slices, so a missing slice would otherwise be a hole in every
    structure of the coronal and sagittal overlays. Each missing slice gets the signed distance maps
    of the nearest received slices below and above, blended linearly by distance along the normal,
    and is inside where the blend is <= 0: the outline moves smoothly from one contour to the other
    (what the solid between them does) instead of jumping half-way as a nearest-slice copy would.
    When either neighbour is empty the slice stays empty: where the anatomy starts or ends inside
    the gap is unknown, and a structure is not extended beyond its last contoured slice. Voxels the
    rasteriser already set on a missing slice (a contour drawn there without referencing an image)
    are kept: drawn data is never replaced by an estimate.

    Returns a new array; ``mask`` is not changed.

    Raises:
        ValueError: ``mask`` is not on the series' grid.
    """
    if mask.shape != series.geometry.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the series grid {series.geometry.shape}")
    filled = mask.copy()
    if not series.missing_slices:
        return filled
    spacing = (series.geometry.spacing[0], series.geometry.spacing[1])
    distances: dict[int, npt.NDArray[np.float32]] = {}
    for k in series.missing_slices:
        below, above = series.received_neighbours(k)
        if not (mask[below].any() and mask[above].any()):
            continue
        for neighbour in (below, above):
            if neighbour not in distances:
                distances[neighbour] = _slice_signed_distance(mask[neighbour], spacing)
        weight = (k - below) / (above - below)
        blended = (1.0 - weight) * distances[below] + weight * distances[above]
        filled[k] |= blended <= 0
    return filled


# --- several structure sets (processing.structure_sets) ------------------------------------------


def structure_set_studies(study: LoadedStudy) -> list[LoadedStudy]:
    """The studies outputs are made from: with ``each``, one per structure set (newest first), each
    with that RTSTRUCT alone; otherwise the study itself (``latest``: one RTSTRUCT; ``merge``:
    all of them, merged by :func:`compute_mask`)."""
    if study.structure_set_mode != "each" or len(study.structure_sets) < 2:
        return [study]
    return [
        replace(study, rtstruct_file=info.path, rtstruct_sop_instance_uid=info.sop_instance_uid, structure_sets=(info,))
        for info in study.structure_sets
    ]


@dataclass(frozen=True)
class StructureSetPart:
    """One run of the mask and output steps: the study with the structure set(s) it is made from,
    the content key of its steps (its work folder is named by the key's start), and with ``each``
    the structure set's name, which prefixes its ROIs and warnings and suffixes its step labels."""

    study: LoadedStudy
    key: str
    name: str = ""

    @property
    def prefix(self) -> str:
        return f"{self.name}: " if self.name else ""

    @property
    def suffix(self) -> str:
        return f" [{self.name}]" if self.name else ""


def plan_structure_sets(study: LoadedStudy, anonymize_key: str, processing: ProcessingConfig) -> list[StructureSetPart]:
    """The parts of a run (:func:`structure_set_studies`) with their content keys.

    Without ``each`` the one part's key is the mask key NETRT always used, so cached results of
    ``latest`` runs stay valid; with ``each`` the structure set's SOPInstanceUID enters each key.
    """
    base = content_key("mask", anonymize_key, settings_key(processing))
    studies = structure_set_studies(study)
    if study.structure_set_mode != "each":
        return [StructureSetPart(studies[0], base)]
    return [
        StructureSetPart(part, content_key(base, part.rtstruct_sop_instance_uid), part.structure_sets[0].name)
        for part in studies
    ]


def structure_set_sentences(study: LoadedStudy) -> list[str]:
    """One sentence per structure set the run processed, for the run summary (file names as
    received: scrub them like the loader's warnings)."""
    return [
        f"{info.age}, StructureSetLabel {info.label or '-'}, SOPInstanceUID {info.sop_instance_uid}"
        for info in study.structure_sets
    ]


def structure_set_files(study: LoadedStudy) -> list[Path]:
    """Every RTSTRUCT file the study's outputs are made from (``rtstruct_file`` first)."""
    return list(dict.fromkeys([study.rtstruct_file, *(info.path for info in study.structure_sets)]))


def _name_key(name: str) -> str:
    """ROI names are the same ROI when equal without case and surrounding spaces ('PTV ' is 'ptv')."""
    return name.strip().casefold()


def _describe(info: StructureSetInfo) -> str:
    return info.age + (f" labelled {info.label!r}" if info.label else "")


@dataclass(frozen=True)
class MergedStructureSets:
    """The ROIs of several structure sets as one set, renumbered 1..n (newest structure set's
    first, each in its RTSTRUCT's order); ``origins`` maps each new number to (structure set, the
    ROINumber there); ``superseded`` reports the ROIs dropped for a newer one of the same name."""

    rois: tuple[RoiContours, ...]
    origins: dict[int, tuple[StructureSetInfo, int]]
    superseded: tuple[RoiReport, ...]
    warnings: tuple[str, ...]


def merged_structure_sets(study: LoadedStudy, processing: ProcessingConfig) -> MergedStructureSets:
    """``processing.structure_sets: merge``: the ROIs of every structure set on the series as one set.

    Structure sets are taken newest first (:attr:`StructureSetInfo.rank`). An ROI whose name (without
    case and surrounding spaces) a newer structure set already holds is dropped: the newer
    delineation is the current one, as ``latest`` would have it for the whole set. When it would be
    kept (``include_rois`` / ``ignore_rois``) the run summary names the ROI and both files; when the
    two structure sets are equally new there is no current one, and the study is refused naming
    both. An ROI the patterns drop anyway is dropped silently: its clash changes no output.

    Raises:
        StudyValidationError: two equally new structure sets hold a kept ROI of the same name.
    """
    include, ignore = processing.include_rois, processing.ignore_rois
    rois: list[RoiContours] = []
    origins: dict[int, tuple[StructureSetInfo, int]] = {}
    taken: dict[str, tuple[StructureSetInfo, str]] = {}
    superseded: list[tuple[str, str]] = []
    warnings: list[str] = []
    for info in study.structure_sets:
        for roi in read_structure_set(info.path):
            key = _name_key(roi.name)
            kept = selection_reason(roi.name, include, ignore)[0]
            if key in taken:
                newer, newer_name = taken[key]
                if not kept:
                    continue
                if newer.rank == info.rank:
                    raise StudyValidationError(
                        f"ROI {roi.name!r} of RTSTRUCT {_describe(info)} and ROI {newer_name!r} of RTSTRUCT "
                        f"{_describe(newer)} have the same name and the structure sets are equally new; cannot tell "
                        "which delineation is current (processing.structure_sets: merge); keep one of them, rename "
                        "the ROI, or drop it with processing.ignore_rois",
                        path=info.path,
                        tag="(3006,0026) ROIName",
                    )
                warnings.append(
                    f"ROI {roi.name!r} is in RTSTRUCT {_describe(info)} and, as {newer_name!r}, in the newer "
                    f"{_describe(newer)}; the newer one's is used (processing.structure_sets: merge)"
                )
                superseded.append((roi.name, f"superseded by ROI {newer_name!r} of the newer {newer.file_name}"))
                continue
            taken[key] = (info, roi.name)
            number = len(rois) + 1
            origins[number] = (info, roi.number)
            rois.append(replace(roi, number=number))
    reports = tuple(
        RoiReport(len(rois) + index, name, False, reason) for index, (name, reason) in enumerate(superseded, 1)
    )
    return MergedStructureSets(tuple(rois), origins, reports, tuple(warnings))


def _merged_roi_infos(merged: MergedStructureSets, kept: list[RoiReport]) -> list[RoiInfo]:
    """Names, colours and types of the kept merged ROIs, each read from its own RTSTRUCT.

    An ROI without ROIDisplayColor takes the next :data:`FALLBACK_PALETTE` colour that no kept ROI
    of any of the structure sets uses, so two such ROIs from different files never share one.
    """
    wanted: dict[Path, list[tuple[int, int, str]]] = {}
    for report in kept:
        info, number = merged.origins[report.number]
        wanted.setdefault(info.path, []).append((report.number, number, report.name))
    by_number: dict[int, RoiInfo] = {}
    for path, rois in wanted.items():
        read = read_roi_infos(path, [(number, name) for _, number, name in rois])
        for (new_number, _, _), roi_info in zip(rois, read, strict=True):
            by_number[new_number] = replace(roi_info, number=new_number)
    infos = [by_number[report.number] for report in kept]
    used = {roi.color for roi in infos if roi.color_from_rtstruct}
    palette = iter(c for c in FALLBACK_PALETTE if c not in used)
    out = []
    for index, roi in enumerate(infos):
        if not roi.color_from_rtstruct:
            roi = replace(roi, color=next(palette, FALLBACK_PALETTE[index % len(FALLBACK_PALETTE)]))
        out.append(roi)
    return out


def compute_mask(study: LoadedStudy, processing: ProcessingConfig, work_dir: Path) -> MaskStepResult:
    """Rasterise the kept ROIs on the image grid; store the merged mask and each ROI's own under
    ``work_dir``.

    Each ROI is rasterised once: its mask is OR-ed into the merged one and kept cut to its bounding
    box for the per-ROI outputs (SEG, colour, per-ROI overlay groups). Missing slices of the series
    are filled by :func:`fill_missing_mask_slices`, in the merged mask and in each ROI's, so every
    output covers the whole uniform grid alike; the ROI reports count the rasterised voxels only.
    """
    boxes: dict[int, RoiBox] = {}

    def keep(report: RoiReport, mask: BoolArray) -> None:
        boxes[report.number] = RoiBox.of(fill_missing_mask_slices(mask, study.images))

    include, ignore = processing.include_rois, processing.ignore_rois
    if study.structure_set_mode == "merge" and len(study.structure_sets) > 1:
        several = merged_structure_sets(study, processing)
        merged: MergedMask = merge_rois(several.rois, study.images.geometry, include, ignore, keep)
        merged = MergedMask(merged.mask, (*merged.rois, *several.superseded))
        infos = _merged_roi_infos(several, [r for r in merged.rois if r.kept])
        warnings = [*several.warnings, *merged.warnings]
    else:
        try:
            merged = merge_rois(read_structure_set(study.rtstruct_file), study.images.geometry, include, ignore, keep)
        except RoiError as exc:
            if study.structure_set_mode != "each" or not study.structure_sets:
                raise
            # `each`: say which of the structure sets has nothing to show (the study fails as a whole,
            # as with one RTSTRUCT: an output of nothing is a problem the user must see)
            info = study.structure_sets[0]
            raise RoiError(exc.roi_name, f"RTSTRUCT {_describe(info)}: {exc.reason}") from exc
        infos = read_roi_infos(study.rtstruct_file, [(r.number, r.name) for r in merged.rois if r.kept])
        warnings = merged.warnings
    mask = fill_missing_mask_slices(merged.mask, study.images)
    key = settings_key(processing)
    mask_path = save_mask(mask, work_dir / f"mask-{key}.npz")
    roi_path = save_roi_boxes(boxes, work_dir / f"rois-{key}.npz")
    return MaskStepResult(
        mask_path,
        merged.rois,
        tuple(warnings),
        int(mask.sum()),
        stamp_file(mask_path),
        roi_path,
        stamp_file(roi_path),
        tuple(infos),
    )


def output_context(
    study: LoadedStudy, masks: MaskStepResult, processing: ProcessingConfig, work_dir: Path
) -> OutputContext:
    if masks.roi_masks is None:
        raise ValueError("the mask step result has no per-ROI masks (a result from before they existed)")
    return OutputContext(study, masks.mask_path, masks.roi_masks, masks.roi_infos, processing, work_dir)


def write_output(
    study: LoadedStudy, masks: MaskStepResult, kind: str, plane: str, processing: ProcessingConfig, work_dir: Path
) -> list[WrittenSeries]:
    """Write one output kind (``processing.outputs``) for ``plane`` (``"study"`` for per-study
    kinds) under ``work_dir``; see the kind's module in :mod:`netrt.outputs`."""
    output = output_kind(kind)
    if output.per_plane == (plane == STUDY):
        raise ValueError(f"output kind {kind!r} is written {'per plane' if output.per_plane else 'per study'}")
    return output.write(output_context(study, masks, processing, work_dir), plane)


def write_plane(
    study: LoadedStudy, masks: MaskStepResult, plane: str, processing: ProcessingConfig, work_dir: Path
) -> list[WrittenSeries]:
    """The overlay series of ``plane`` and, when ``processing.burn_in``, its burn-in twin (what the
    benchmarks and tests compare against; the flow writes each kind as its own task)."""
    kinds = ["overlay", *(["burn_in"] if "burn_in" in processing.output_kinds() else [])]
    return [series for kind in kinds for series in write_output(study, masks, kind, plane, processing, work_dir)]


# --- content keys, anonymization and preview --------------------------------------------------


def study_fingerprint(study: LoadedStudy) -> str:
    """SHA-256 over the SOP Instance UIDs and the bytes of every file the outputs are made from.

    Two runs of the same files give the same fingerprint wherever the files sit (a study moved to
    quarantine and back, or copied there from a user's folder, keeps it), and any changed byte
    changes it. The flow's cache keys start from it.
    """
    digest = hashlib.sha256(__version__.encode("ascii"))
    pairs = [*zip(study.images.sop_instance_uids, study.images.files, strict=True)]
    pairs.append((study.rtstruct_sop_instance_uid, study.rtstruct_file))
    # each / merge: the other structure sets too (latest: none, so its fingerprint is as it was)
    pairs += [(info.sop_instance_uid, info.path) for info in study.structure_sets if info.path != study.rtstruct_file]
    for sop_uid, path in pairs:
        with path.open("rb") as handle:
            file_digest = hashlib.file_digest(handle, "sha256").hexdigest()
        digest.update(f"{sop_uid}\0{file_digest}\n".encode("ascii"))
    return digest.hexdigest()


def files_fingerprint(files: list[Path]) -> str:
    """SHA-256 over the bytes of ``files`` in order (the files forwarded with a study)."""
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def content_key(*parts: object) -> str:
    """A hex key for a cache entry or work folder: SHA-256 of the parts as canonical JSON."""
    payload = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AnonymizeStepResult:
    """The study to process from here on, and what anonymization did (no patient data).

    ``stamps``: the study's image files and RTSTRUCT (in that order) as they were when the step ended.
    """

    study: LoadedStudy
    pseudonym: str | None
    actions: tuple[str, ...]
    # As for MaskStepResult.mask_stamp: the default is for results persisted before stamps, never intact.
    stamps: tuple[FileStamp, ...] = ()
    # Files forwarded with the study by ``source`` routing (other series in its frame, RT Plan/Dose).
    forwarded: tuple[Path, ...] = ()
    forwarded_stamps: tuple[FileStamp, ...] = ()


#: SOP classes that travel with a study when it is forwarded (``source`` routing) besides its
#: image series and RTSTRUCT: the plans and doses computed on those images.
FORWARDED_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
        "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
        "1.2.840.10008.5.1.4.1.1.481.8",  # RT Ion Plan
    }
)


def travelling_files(study: LoadedStudy) -> list[Path]:
    """What is forwarded with the study besides its images and RTSTRUCT: the other image series in
    its frame of reference (a registered MR, a CBCT) and its RT Plans and Doses."""
    extra = list(study.registered_files)
    for path in study.other_files:
        if path in extra:
            continue
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        except Exception:  # an unreadable other file: it never travels
            continue
        if str(header.get("SOPClassUID", "")) in FORWARDED_SOP_CLASSES:
            extra.append(path)
    return extra


def anonymize_step(
    study: LoadedStudy, anonymization: AnonymizationConfig, secret: bytes, out_dir: Path, forward: bool = False
) -> AnonymizeStepResult:
    """Anonymize the files that feed the outputs into ``out_dir`` and validate the copies again.

    With anonymization off, the study is returned as it is. Otherwise the anonymized copies are
    loaded like any received study: their references must still resolve (same images, same
    frame of reference), which is the proof that the UID mapping kept the study whole. With
    ``forward`` (a destination takes ``source``), the files that travel with the study
    (:func:`travelling_files`) are anonymized with it, under the same UID mapping, and listed in
    ``forwarded``.
    """
    extra = travelling_files(study) if forward else []
    files = [*_study_files(study), *extra]
    anonymized = anonymize_study(files, out_dir, anonymization, secret)
    if not anonymization.enabled:
        return AnonymizeStepResult(
            study, None, anonymized.actions, stamp_files(_study_files(study)), tuple(extra), stamp_files(extra)
        )
    copies = _same_structure_sets(
        study, load_study(list(anonymized.files), study.structure_set_mode), anonymization, secret
    )
    own = set(_study_files(copies))
    forwarded = [path for path in anonymized.files if path not in own]
    return AnonymizeStepResult(
        copies,
        anonymized.pseudonym,
        anonymized.actions,
        stamp_files(_study_files(copies)),
        tuple(forwarded),
        stamp_files(forwarded),
    )


def _study_files(study: LoadedStudy) -> list[Path]:
    return [*study.images.files, *structure_set_files(study)]


def _same_structure_sets(
    study: LoadedStudy, copies: LoadedStudy, anonymization: AnonymizationConfig, secret: bytes
) -> LoadedStudy:
    """The anonymized copies with the structure sets in the received study's order and ranks.

    Full mode removes or shifts the dates that rank structure sets, so the copies alone could no
    longer tell which is newest (``merge`` needs it for ROIs of the same name). Each copy keeps
    its own path and label (anonymized) and takes the received one's rank, age and file name (the
    name is scrubbed with every warning, like the loader's).
    """
    if len(study.structure_sets) < 2:
        return copies
    full = anonymization.mode == "full"
    by_uid = {info.sop_instance_uid: info for info in copies.structure_sets}
    ordered = []
    for info in study.structure_sets:
        copy = by_uid.get(map_uid(info.sop_instance_uid, secret) if full else info.sop_instance_uid)
        if copy is None:
            raise StudyValidationError(
                f"the anonymized copy of RTSTRUCT {info.file_name} is not among the copies' structure sets",
                path=info.path,
            )
        ordered.append(replace(copy, rank=info.rank, age=info.age, file_name=info.file_name))
    return replace(
        copies,
        rtstruct_file=ordered[0].path,
        rtstruct_sop_instance_uid=ordered[0].sop_instance_uid,
        structure_sets=tuple(ordered),
    )


def result_files_intact(result: object) -> bool:
    """True when every file a step result names is still the file the step wrote.

    The flow trusts a cache hit only then; otherwise it runs the step again. ``result`` is what
    Prefect loaded from ``<data_dir>/cache/results``: an :class:`AnonymizeStepResult`, a
    :class:`MaskStepResult`, a list of :class:`WrittenSeries` or the preview's :class:`FileStamp`.
    A result persisted before results carried stamps (the attribute is missing, or the preview is
    a bare path string) or of any other shape counts as not intact: recomputed, never trusted.
    """
    try:
        if isinstance(result, AnonymizeStepResult):
            return files_unchanged(_study_files(result.study), result.stamps) and files_unchanged(
                list(result.forwarded), result.forwarded_stamps
            )
        if isinstance(result, MaskStepResult):
            return result.roi_masks is not None and files_unchanged(
                [result.mask_path, result.roi_masks], (result.mask_stamp, result.roi_masks_stamp)
            )
        if isinstance(result, FileStamp):
            return result.holds()
        if isinstance(result, list) and result and all(isinstance(s, WrittenSeries) for s in result):
            return all(files_unchanged(s.files, s.stamps) for s in result)
    except AttributeError:  # an instance of a shape this code does not know
        return False
    return False


def preview_step(study: LoadedStudy, masks: MaskStepResult, path: Path, disclaimer: str = "") -> Preview:
    """Render the three-plane PNG preview of the study's kept ROIs on its image grid.

    Each kept ROI is outlined in its colour with a legend, and ``disclaimer`` (the configured
    ``processing.disclaimer``; empty: none) is written under it. Only the three planes through the
    ROIs' middle are read (:func:`netrt.preview.preview_study`), not the volume: the preview task
    runs beside the plane writers and should cost them neither time nor memory.
    """
    return preview_study(study.images, masks.roi_masks, masks.roi_infos, path, disclaimer)


# --- studies without an RTSTRUCT (processing.images_without_rtstruct: pass_through) ----------


@dataclass(frozen=True)
class PassThroughResult:
    """The files to deliver unchanged (anonymized when configured) and the run-summary warning."""

    files: tuple[Path, ...]
    study_instance_uid: str  # as delivered: mapped in full mode
    warnings: tuple[str, ...]


def pass_through_step(
    study: ImagesOnlyStudy, anonymization: AnonymizationConfig, secret: bytes, out_dir: Path
) -> PassThroughResult:
    """Anonymize an images-only study's files as configured into ``out_dir``; no overlay is made.

    With anonymization off, the received files themselves are delivered. The warning names the
    series (by UID, mapped in full mode by the flow's scrubbing) and says why there is no overlay.
    """
    anonymized = anonymize_study(list(study.files), out_dir, anonymization, secret)
    files = anonymized.files if anonymization.enabled else study.files
    warning = (
        f"no RTSTRUCT in the study: {len(files)} image(s) of {len(study.series)} series "
        f"({'; '.join(study.series)}) passed through without an overlay "
        "(processing.images_without_rtstruct: pass_through)"
    )
    return PassThroughResult(tuple(files), anonymized.study_instance_uid, (*study.warnings, warning))
