"""Find the studies in a folder of DICOM files, then load and validate one of them.

Everything downstream (masks, overlays, reformats) trusts two things: the image series is one
regular grid, and the RTSTRUCT's contours belong to that series. A study that breaks either is
refused *here*, before any pixel is computed, with an error naming the file, the DICOM tag and the
reason, so that a quarantine reason tells the physicist what to fix without a traceback.

One irregularity is repaired instead of refused, because it is common (a slice lost in transfer or
deleted at the console) and safe to repair: slices *missing* from an otherwise regular stack. When
every received slice sits on the regular grid and no gap lacks more than
:data:`MAX_MISSING_SLICES_PER_GAP` slices, the series is described on the full grid, the missing
slices are listed (:attr:`ImageSeries.missing_slices`), interpolated by :func:`read_image_volume`,
and each gap is reported in :attr:`LoadedStudy.warnings`. Anything else (duplicated positions,
uneven spacing, bigger holes, sheared stacks) is still refused.

This module only reads. Whatever it finds (non-DICOM files, truncated files, a second RTSTRUCT),
nothing is moved, rewritten or deleted: "nothing lost" is the first promise NETRT makes.

Reading strategy, chosen for speed on 200-500 slice series:

* grouping (:func:`scan_files`, :func:`find_studies`) reads only a handful of top-level tags
  and stops before the pixel data;
* validation (:func:`load_study`) reads each slice header in full but *defers* large values, so
  pixel data is never loaded; only the first and last slices are decoded, to prove the transfer
  syntax can be decoded at all;
* :func:`read_image_volume` decodes every slice (pydicom with the pylibjpeg plugins: JPEG
  lossless, JPEG-LS, JPEG 2000, RLE) straight into one float32 array.

pydicom reads a truncated file without complaint (a short value is simply short), so every file
read here is also checked against its size: see :func:`_check_complete`.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut
from pydicom.tag import Tag
from pydicom.uid import UID

from netrt.errors import DicomInputError, NetrtError, StudyValidationError
from netrt.geometry import (
    ImageGeometry,
    SliceSpacingReport,
    check_slice_spacing,
    geometry_from_slices,
    orientation_vectors,
    place_sitk_image,
    slice_positions,
    spatial_order,
)

FloatArray32 = npt.NDArray[np.float32]
FloatArray64 = npt.NDArray[np.float64]

# SimpleITK's SWIG functions carry no annotations; an Any handle keeps mypy --strict quiet without
# scattering ignores (the same device as in netrt.geometry and netrt.reformat).
_sitk: Any = sitk

RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"

#: Single-frame image SOP classes whose slices NETRT stacks into a volume. The enhanced
#: (multi-frame) classes carry their geometry in functional groups and are refused by name.
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


# --------------------------------------------------------------------------------------------
# Public data classes
# --------------------------------------------------------------------------------------------


class NoStructureSetError(StudyValidationError):
    """The study holds images but no RTSTRUCT (raised by :func:`load_found_study`).

    A case of its own because it need not be a failure: ``processing.images_without_rtstruct``
    says whether such a study is quarantined (the default) or its images are passed on without
    an overlay (:func:`load_images_only`). :func:`load_study` raises a plain
    :class:`StudyValidationError` for it.
    """


@dataclass(frozen=True)
class ImagesOnlyStudy:
    """A study without an RTSTRUCT whose files are all readable, complete DICOM instances.

    ``files`` are every instance of the study (one per SOPInstanceUID, the first by path);
    ``warnings`` are run-summary sentences (files set aside), free of patient data.
    """

    study_instance_uid: str
    files: tuple[Path, ...]
    series: tuple[str, ...]  # "<SeriesInstanceUID> (<modality>, <n> files)"
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class StudyFiles:
    """The files of one study found under a folder.

    ``skipped`` lists the files under the scanned folder that are not usable DICOM instances
    (non-DICOM, unreadable, DICOMDIR, no StudyInstanceUID) with the reason. Such a file cannot
    say which study it belonged to, so every study of one scan carries the same list; callers
    report it once.
    """

    study_instance_uid: str
    files: tuple[Path, ...]
    skipped: tuple[tuple[Path, str], ...] = ()


@dataclass(frozen=True)
class ImageSeries:
    """The validated image series of a study: one regular grid, slices in spatial order.

    ``files``, ``sop_instance_uids`` and ``positions`` are sorted by increasing position along
    the slice normal (``geometry.normal``), which is the order of the volume's first axis.
    ``positions`` are those positions in mm (of the received files).

    ``geometry`` is the uniform grid from the first to the last received slice. When slices are
    missing from the stack it has more slices than there are files: ``slice_indices`` gives the
    grid slice of each file (same order as ``files``) and ``missing_slices`` the grid slices no
    file covers, which :func:`read_image_volume` and the mask step fill by interpolation. For a
    complete series ``slice_indices`` is ``0..n-1`` and ``missing_slices`` is empty; both are
    derived that way when not given. The first and last grid slices are always received ones, so
    every missing slice has a received neighbour on each side (:meth:`received_neighbours`).

    Raises:
        ValueError: ``slice_indices`` / ``missing_slices`` do not describe the grid (wrong count,
            not increasing, outside the grid, overlapping, or an end slice missing).
    """

    series_instance_uid: str
    sop_class_uid: str
    modality: str
    frame_of_reference_uid: str
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    geometry: ImageGeometry
    positions: tuple[float, ...] = ()
    slice_indices: tuple[int, ...] = ()
    missing_slices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        grid_slices = self.geometry.shape[0]
        indices = tuple(int(i) for i in self.slice_indices) or tuple(range(len(self.files)))
        if len(indices) != len(self.files) or len(self.sop_instance_uids) != len(self.files):
            raise ValueError(
                f"series lists {len(self.files)} files, {len(self.sop_instance_uids)} SOP instance UIDs and "
                f"{len(indices)} slice indices; one of each per file expected"
            )
        if any(b <= a for a, b in pairwise(indices)):
            raise ValueError(f"slice indices must increase along the normal, got {indices}")
        if not indices or indices[0] != 0 or indices[-1] != grid_slices - 1:
            raise ValueError(
                f"the first and last of the {grid_slices} grid slices must be received slices, got indices {indices}"
            )
        present = set(indices)
        derived = tuple(i for i in range(grid_slices) if i not in present)
        missing = tuple(int(i) for i in self.missing_slices)
        if missing and missing != derived:
            raise ValueError(f"missing slices {missing} are not the grid slices without a file {derived}")
        object.__setattr__(self, "slice_indices", indices)
        object.__setattr__(self, "missing_slices", derived)

    def received_neighbours(self, grid_slice: int) -> tuple[int, int]:
        """The nearest received grid slices below and above a missing one (what it is filled from)."""
        position = bisect_left(self.slice_indices, grid_slice)
        if not 0 < position < len(self.slice_indices) or self.slice_indices[position] == grid_slice:
            raise ValueError(f"grid slice {grid_slice} is not a missing slice of this series")
        return self.slice_indices[position - 1], self.slice_indices[position]


@dataclass(frozen=True)
class LoadedStudy:
    """A study that passed validation: what to process and what merely travels with it.

    ``other_files`` are kept with the study but not processed (RT Plan, RT Dose, other image
    series, superseded RTSTRUCTs, duplicate copies of an instance). ``warnings`` are human
    sentences for the run summary; they name files and UIDs, never patient data.
    ``reference_source`` says which rule tied the RTSTRUCT to the image series (the tag path of
    the referenced series, of the contour images, or of the frame of reference).
    """

    study_instance_uid: str
    images: ImageSeries
    rtstruct_file: Path
    rtstruct_sop_instance_uid: str
    other_files: tuple[Path, ...]
    warnings: tuple[str, ...]
    reference_source: str = ""


# --------------------------------------------------------------------------------------------
# Reading helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Instance:
    """The few top-level tags that group a file into study and series ("" when absent)."""

    path: Path
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    modality: str
    frame_of_reference_uid: str
    image_type: tuple[str, ...] = ()

    @property
    def is_rtstruct(self) -> bool:
        return self.sop_class_uid == RT_STRUCTURE_SET_STORAGE or self.modality == "RTSTRUCT"

    @property
    def is_localizer(self) -> bool:
        """A scout/topogram (ImageType value 3 LOCALIZER): some scanners put it in the axial series."""
        return len(self.image_type) > 2 and self.image_type[2] == "LOCALIZER"


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


def _read_instance(path: Path) -> _Instance:
    """Header-only read of the grouping tags.

    Raises:
        DicomInputError: the file is not DICOM Part 10 or cannot be parsed.
    """
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(_SCAN_KEYWORDS))
        # pydicom converts values when they are first read, so a corrupt value (e.g. an unknown VR
        # in ImageType) raises here, not in dcmread.
        return _instance_of(ds, path)
    except InvalidDicomError as exc:
        raise DicomInputError("not a DICOM file (no 'DICM' marker after the 128-byte preamble)", path=path) from exc
    except Exception as exc:  # pydicom raises many types on garbage; all mean "unreadable"
        raise DicomInputError(f"cannot be read as DICOM: {type(exc).__name__}: {exc}", path=path) from exc


def _instance_of(ds: Dataset, path: Path) -> _Instance:
    sop_class = _text(ds, "SOPClassUID") or _text(ds.file_meta, "MediaStorageSOPClassUID")
    image_type = ds.get("ImageType")
    if image_type is None:
        image_type = ()
    elif isinstance(image_type, str):
        image_type = image_type.split("\\")
    return _Instance(
        path=path,
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_class_uid=sop_class,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        image_type=tuple(str(v).strip().upper() for v in image_type),
    )


def _check_complete(ds: Dataset, path: Path) -> None:
    """Refuse a file whose data set ends before its last element does.

    pydicom does not complain when a file is cut: a short value is returned short, a cut
    undefined-length item makes it drop every element. So the file must have given a non-empty
    data set, and no top-level value may extend past the end of the file (deferred values are
    checked from their recorded offset and length without being read).
    """
    if len(ds) == 0:
        raise DicomInputError(
            "no data set could be read after the file meta header: the file is truncated or corrupt", path=path
        )
    size = path.stat().st_size
    meta = getattr(ds, "file_meta", None)
    syntax = UID(_text(meta, "TransferSyntaxUID")) if meta is not None else UID("")
    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        if not isinstance(elem, RawDataElement):
            continue
        if syntax.is_transfer_syntax and not syntax.is_deflated and elem.is_implicit_VR != syntax.is_implicit_VR:
            # pydicom silently switches to the encoding it finds; the values then carry no or wrong VRs
            found = "implicit" if elem.is_implicit_VR else "explicit"
            raise DicomInputError(
                f"wrong transfer syntax: the file meta says {_uid_name(syntax)}, but the data set is encoded with "
                f"{found} VR (the sender labelled it wrongly)",
                path=path,
                tag=_tag("TransferSyntaxUID"),
            )
        if elem.length == _UNDEFINED_LENGTH:
            continue
        end = int(elem.value_tell) + int(elem.length)
        if end > size:
            keyword = keyword_for_tag(tag)
            raise DicomInputError(
                f"file is truncated: the value of this element needs {end} bytes, the file has {size}",
                path=path,
                tag=f"({tag.group:04X},{tag.element:04X}){' ' + keyword if keyword else ''}",
            )


def _read_dataset(path: Path, *, defer_large_values: bool) -> Dataset:
    """Full read (large values deferred if asked) with the truncation check."""
    try:
        ds = dcmread(path, defer_size=HEADER_DEFER_SIZE if defer_large_values else None)
    except InvalidDicomError as exc:
        raise DicomInputError("not a DICOM file (no 'DICM' marker after the 128-byte preamble)", path=path) from exc
    except Exception as exc:
        raise DicomInputError(
            f"cannot be read as DICOM (truncated or corrupt?): {type(exc).__name__}: {exc}", path=path
        ) from exc
    _check_complete(ds, path)
    return ds


def _iter_files(root: Path, skipped: list[tuple[Path, str]]) -> list[Path]:
    """Every regular file under ``root`` in a stable order; what cannot be read goes to ``skipped``.

    Symbolic links to folders are not followed (a link loop or a link to a whole archive must not
    turn one study into thousands of files); FIFOs and devices are never opened (reading one would
    block the scan).
    """
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DicomInputError("no such file or folder", path=root)
    files: list[Path] = []

    def on_error(exc: OSError) -> None:
        skipped.append((Path(exc.filename or root), f"folder cannot be listed: {exc.strerror}"))

    for folder, subfolders, names in os.walk(root, onerror=on_error, followlinks=False):
        subfolders.sort()
        for name in subfolders:
            if (Path(folder) / name).is_symlink():
                skipped.append((Path(folder) / name, "symbolic link to a folder, not followed"))
        for name in sorted(names):
            path = Path(folder) / name
            if path.is_file():
                files.append(path)
            else:
                skipped.append((path, "not a regular file (device, FIFO, socket or dangling link)"))
    return files


def _scan(root: Path) -> tuple[dict[str, list[_Instance]], list[tuple[Path, str]]]:
    skipped: list[tuple[Path, str]] = []
    studies: dict[str, list[_Instance]] = defaultdict(list)
    for path in _iter_files(Path(root), skipped):
        try:
            instance = _read_instance(path)
        except DicomInputError as exc:
            skipped.append((path, exc.reason))
            continue
        if instance.sop_class_uid == MEDIA_STORAGE_DIRECTORY_STORAGE:
            skipped.append((path, "DICOMDIR (a media index, not an instance)"))
        elif not instance.study_instance_uid:
            skipped.append((path, f"DICOM file without {_tag('StudyInstanceUID')} (truncated, or not an instance)"))
        else:
            studies[instance.study_instance_uid].append(instance)
    return dict(studies), skipped


# --------------------------------------------------------------------------------------------
# Finding studies
# --------------------------------------------------------------------------------------------


def scan_files(root: Path) -> dict[str, list[Path]]:
    """StudyInstanceUID -> its files (sorted by path), from header-only reads under ``root``.

    Files that are not usable DICOM instances are left out; :func:`find_studies` lists them with
    the reason. Never writes, moves or deletes anything.
    """
    studies, _ = _scan(root)
    return {uid: [inst.path for inst in studies[uid]] for uid in sorted(studies)}


def find_studies(root: Path) -> list[StudyFiles]:
    """The studies under ``root`` (a folder of any depth, or one file), sorted by StudyInstanceUID.

    Reads only the grouping tags of each file and stops before the pixel data, so a 200-slice
    study is scanned in a fraction of a second. Non-DICOM and unreadable files are not fatal:
    they are returned in every study's ``skipped`` with the reason.

    Raises:
        DicomInputError: ``root`` does not exist.
    """
    studies, skipped = _scan(root)
    skipped_tuple = tuple(skipped)
    return [StudyFiles(uid, tuple(inst.path for inst in studies[uid]), skipped_tuple) for uid in sorted(studies)]


def find_study(root: Path, study_instance_uid: str | None = None) -> StudyFiles:
    """The one study under ``root`` (the one with ``study_instance_uid`` when given).

    Raises:
        StudyValidationError: no such study, or several studies and no UID to choose one.
    """
    studies = find_studies(root)
    if study_instance_uid is not None:
        studies = [s for s in studies if s.study_instance_uid == study_instance_uid]
    if len(studies) != 1:
        wanted = f"study {study_instance_uid}" if study_instance_uid else "exactly one study"
        raise StudyValidationError(f"expected {wanted}, found {len(studies)} matching", path=root)
    return studies[0]


# --------------------------------------------------------------------------------------------
# RTSTRUCT references
# --------------------------------------------------------------------------------------------


def _unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(v for v in values if v))


def _time_seconds(value: str) -> float:
    """TM ``HHMMSS.FFFFFF`` (any precision) -> seconds; -1 when absent or malformed."""
    text = value.strip()
    whole, _, fraction = text.partition(".")
    if not whole.isdigit() or len(whole) > 6 or (fraction and not fraction.isdigit()):
        return -1.0
    whole = whole.ljust(6, "0")
    seconds = int(whole[:2]) * 3600 + int(whole[2:4]) * 60 + int(whole[4:6])
    return seconds + (float(f"0.{fraction}") if fraction else 0.0)


@dataclass(frozen=True)
class _StructureSet:
    """What the loader needs from one RTSTRUCT: its references and its rank by age."""

    instance: _Instance
    date: str
    time: str
    instance_number: int | None
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
    def rank(self) -> tuple[str, float, int]:
        """Sort key, newest last: StructureSetDate, StructureSetTime, then InstanceNumber."""
        number = self.instance_number if self.instance_number is not None else -1
        return (self.date, _time_seconds(self.time), number)

    def describe_age(self) -> str:
        number = "none" if self.instance_number is None else str(self.instance_number)
        return (
            f"{self.path.name} (StructureSetDate/Time {self.date or '-'} {self.time or '-'}, InstanceNumber {number})"
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
    try:  # optional and only a tie-breaker: a malformed value must not reject the study
        instance_number: int | None = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        instance_number = None
    return _StructureSet(
        instance=instance,
        date=_text(ds, "StructureSetDate"),
        time=_text(ds, "StructureSetTime"),
        instance_number=instance_number,
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
            raise StudyValidationError(
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
            raise StudyValidationError(
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


def _choose_structure_set(
    structure_sets: list[_StructureSet], series: dict[str, list[_Instance]]
) -> tuple[_StructureSet, str, str, list[str]]:
    """Pick the RTSTRUCT to process: the newest; older ones on the same series are reported.

    Returns the chosen structure set, its image series UID, the reference rule and warnings. The
    RTSTRUCTs not processed stay in the study's ``other_files``.

    Raises:
        StudyValidationError: the newest RTSTRUCT does not resolve, or two different RTSTRUCTs of
            the same series are equally new (which one is current cannot be told).
    """
    # newest first; among equals the first by path, so that the choice never depends on listing order
    by_path = sorted(structure_sets, key=lambda rs: str(rs.path))
    ranked = sorted(by_path, key=lambda rs: rs.rank, reverse=True)
    chosen = ranked[0]
    series_uid, source = _resolve_image_series(chosen, series)
    superseded: list[_StructureSet] = []
    warnings: list[str] = []
    for other in ranked[1:]:
        if other.instance.sop_instance_uid == chosen.instance.sop_instance_uid:
            warnings.append(
                f"{other.path.name} is another copy of RTSTRUCT {chosen.instance.sop_instance_uid} "
                f"({chosen.path.name}); ignored"
            )
            continue
        try:
            other_series: str | None = _resolve_image_series(other, series)[0]
            why = f"it references image series {other_series}"
        except StudyValidationError as exc:
            other_series = None
            why = f"its references do not resolve ({exc.reason})"
        if other_series == series_uid:
            if other.rank == chosen.rank:
                raise StudyValidationError(
                    f"RTSTRUCTs {chosen.path.name} and {other.path.name} both reference image series {series_uid} "
                    "and are equally new (same StructureSetDate, StructureSetTime and InstanceNumber); cannot tell "
                    "which one is current; keep only the current one in the study",
                    path=chosen.path,
                    tag=_tag("StructureSetDate"),
                )
            superseded.append(other)
        else:
            warnings.append(
                f"RTSTRUCT {other.path.name} is kept with the study but not processed: {why}, and one structure "
                f"set per study is processed (the newest, {chosen.path.name})"
            )
    if superseded:
        warnings.insert(
            0,
            f"{len(superseded) + 1} RTSTRUCTs reference image series {series_uid}; using the newest, "
            f"{chosen.describe_age()}; not used: {'; '.join(rs.describe_age() for rs in superseded)}",
        )
    return chosen, series_uid, source, warnings


# --------------------------------------------------------------------------------------------
# Image slices
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    """The per-slice attributes that define the grid, read and checked from one file."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    frame_of_reference_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None


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


def _check_pixel_data(ds: Dataset, path: Path, rows: int, columns: int) -> None:
    """Pixel data present, long enough (native syntaxes) and with a decoder installed."""
    if _PIXEL_DATA_TAG not in ds:
        raise StudyValidationError("image has no pixel data", path=path, tag=TAG_PIXEL_DATA)
    if ds.get("NumberOfFrames") not in (None, ""):
        frames = int(_numbers(ds, "NumberOfFrames", 1, path)[0])
        if frames != 1:
            raise StudyValidationError(
                f"{frames} frames in one instance; only single-frame slices are supported",
                path=path,
                tag=_tag("NumberOfFrames"),
            )
    samples = int(_numbers(ds, "SamplesPerPixel", 1, path)[0])
    if samples != 1:
        raise StudyValidationError(
            f"{samples} samples per pixel; CT/MR/PET slices must be greyscale",
            path=path,
            tag=_tag("SamplesPerPixel"),
        )
    syntax = UID(_text(ds.file_meta, "TransferSyntaxUID"))
    if not syntax:
        raise DicomInputError("file meta has no transfer syntax", path=path, tag=_tag("TransferSyntaxUID"))
    if not syntax.is_transfer_syntax:
        raise DicomInputError(
            f"unknown transfer syntax {syntax}: not a DICOM transfer syntax NETRT (pydicom) can read",
            path=path,
            tag=_tag("TransferSyntaxUID"),
        )
    elem = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    if isinstance(elem, RawDataElement):
        encapsulated = elem.length == _UNDEFINED_LENGTH
    else:  # already converted: it remembers how it was read
        encapsulated = bool(getattr(elem, "is_undefined_length", False))
    if encapsulated != syntax.is_encapsulated:
        raise StudyValidationError(
            f"wrong transfer syntax: {_uid_name(syntax)} {'requires' if syntax.is_encapsulated else 'forbids'} "
            f"encapsulated pixel data, but the pixel data is {'encapsulated' if encapsulated else 'native'}",
            path=path,
            tag=_tag("TransferSyntaxUID"),
        )
    if syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise StudyValidationError(
                f"no pixel data decoder for transfer syntax {_uid_name(syntax)}",
                path=path,
                tag=_tag("TransferSyntaxUID"),
            ) from exc
        if not decoder.is_available:
            raise StudyValidationError(
                f"the decoder for {_uid_name(syntax)} is not installed ({'; '.join(decoder.missing_dependencies)})",
                path=path,
                tag=_tag("TransferSyntaxUID"),
            )
        return
    bits = int(_numbers(ds, "BitsAllocated", 1, path)[0])
    length = elem.length if isinstance(elem, RawDataElement) else len(ds.PixelData)
    needed = rows * columns * (bits // 8)
    if bits >= 8 and length < needed:
        raise StudyValidationError(
            f"pixel data has {length} bytes, {rows}x{columns} pixels of {bits} bits need {needed}",
            path=path,
            tag=TAG_PIXEL_DATA,
        )


def _read_slice(instance: _Instance) -> _Slice:
    """Read and check the header of one image slice (pixel data deferred, not decoded).

    Raises:
        DicomInputError: unreadable or truncated file.
        StudyValidationError: unsupported SOP class, missing or malformed geometry tags, no pixel
            data (each naming the file and tag).
    """
    path = instance.path
    ds = _read_dataset(path, defer_large_values=True)
    sop_class = _text(ds, "SOPClassUID")
    if sop_class not in IMAGE_SOP_CLASSES:
        raise StudyValidationError(
            f"SOP class {_uid_name(sop_class) if sop_class else '(none)'} is not a single-frame image class NETRT can "
            f"stack (supported: {', '.join(IMAGE_SOP_CLASSES.values())})",
            path=path,
            tag=_tag("SOPClassUID"),
        )
    rows = int(_numbers(ds, "Rows", 1, path)[0])
    columns = int(_numbers(ds, "Columns", 1, path)[0])
    position = _numbers(ds, "ImagePositionPatient", 3, path)
    orientation = _numbers(ds, "ImageOrientationPatient", 6, path)
    spacing = _numbers(ds, "PixelSpacing", 2, path)
    thickness = ds.get("SliceThickness")
    try:
        slice_thickness = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        slice_thickness = None
    frame = _text(ds, "FrameOfReferenceUID")
    if not frame:
        raise StudyValidationError("required attribute is missing or empty", path=path, tag=TAG_FRAME)
    _check_pixel_data(ds, path, rows, columns)
    return _Slice(
        path=path,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=sop_class,
        modality=_text(ds, "Modality").upper(),
        frame_of_reference_uid=frame,
        position=(position[0], position[1], position[2]),
        orientation=(orientation[0], orientation[1], orientation[2], orientation[3], orientation[4], orientation[5]),
        rows=rows,
        columns=columns,
        pixel_spacing=(spacing[0], spacing[1]),
        slice_thickness=slice_thickness,
    )


def _check_same_frame(slices: list[_Slice], series_uid: str) -> str:
    counts = Counter(s.frame_of_reference_uid for s in slices)
    if len(counts) == 1:
        return slices[0].frame_of_reference_uid
    majority = counts.most_common(1)[0][0]
    odd = [s for s in slices if s.frame_of_reference_uid != majority]
    raise StudyValidationError(
        f"image series {series_uid} mixes frames of reference: {counts[majority]} files in {majority}, "
        f"{len(odd)} elsewhere ({_listed([f'{s.path.name}: {s.frame_of_reference_uid}' for s in odd])})",
        path=odd[0].path,
        tag=TAG_FRAME,
    )


def _check_same_plane(slices: list[_Slice]) -> None:
    """One SOP class, orientation, matrix size and pixel spacing for every slice of the series."""
    first = slices[0]
    for s in slices[1:]:
        if s.sop_class_uid != first.sop_class_uid:
            raise StudyValidationError(
                f"SOP class {_uid_name(s.sop_class_uid)} differs from {first.path.name}'s "
                f"{_uid_name(first.sop_class_uid)} in the same series",
                path=s.path,
                tag=_tag("SOPClassUID"),
            )
        difference = float(np.max(np.abs(np.subtract(s.orientation, first.orientation))))
        if difference > ORIENTATION_MATCH_TOLERANCE:
            raise StudyValidationError(
                f"orientation {list(s.orientation)} differs from {first.path.name}'s {list(first.orientation)} by "
                f"up to {difference:.3g} (tolerance {ORIENTATION_MATCH_TOLERANCE}); a series must have one orientation",
                path=s.path,
                tag=TAG_IOP,
            )
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise StudyValidationError(
                f"{s.rows}x{s.columns} pixels, but {first.path.name} has {first.rows}x{first.columns}",
                path=s.path,
                tag=f"{_tag('Rows')}, {_tag('Columns')}",
            )
        if float(np.max(np.abs(np.subtract(s.pixel_spacing, first.pixel_spacing)))) > PIXEL_SPACING_MATCH_TOLERANCE_MM:
            raise StudyValidationError(
                f"pixel spacing {list(s.pixel_spacing)} mm differs from {first.path.name}'s "
                f"{list(first.pixel_spacing)} mm",
                path=s.path,
                tag=_tag("PixelSpacing"),
            )


@dataclass(frozen=True)
class _Grid:
    """The sorted slices of a series and the uniform grid they sit on (see :func:`_grid`)."""

    ordered: list[_Slice]
    geometry: ImageGeometry
    positions: tuple[float, ...]  # of the received slices, mm along the normal
    slice_indices: tuple[int, ...]  # grid slice of each received slice
    missing: tuple[int, ...]  # grid slices without a file
    warnings: list[str]


def _grid_indices(along: FloatArray64, report: SliceSpacingReport) -> tuple[npt.NDArray[np.intp], float] | None:
    """Grid slice of each sorted position and the grid step, if the only irregularity is missing slices.

    The grid runs from the first to the last position in the whole number of nominal spacings that
    fits between them (its step is that distance divided evenly, so both ends lie exactly on it, as
    for a complete series). The positions qualify when each lies within the spacing tolerance of a
    distinct grid slice and each interval is within tolerance of a whole number of steps: then the
    stack is a regular one with slices left out. Duplicates (two slices on one grid slice), spacing
    that is not a multiple of the nominal one and a stack without any gap do not qualify (None).
    """
    nominal, tolerance = report.nominal_spacing, report.tolerance
    if nominal <= tolerance:
        return None
    extent = float(along[-1] - along[0])
    count = round(extent / nominal) + 1
    if count < 2:
        return None
    step = extent / (count - 1)
    indices = np.rint((along - along[0]) / step).astype(np.intp)
    counts = np.diff(indices)
    if np.any(counts < 1) or not np.any(counts > 1):
        return None
    if float(np.max(np.abs(along - (along[0] + indices * step)))) > tolerance:
        return None
    if float(np.max(np.abs(np.diff(along) - counts * step))) > tolerance:
        return None
    return indices, step


def _grid(slices: list[_Slice], series_uid: str) -> _Grid:
    """Sort along the normal and build the uniform grid; missing slices are allowed, nothing else.

    A stack whose only irregularity is slices left out of a regular grid (:func:`_grid_indices`)
    is described on the full grid, with one warning per gap, as long as no gap lacks more than
    :data:`MAX_MISSING_SLICES_PER_GAP` slices; a bigger hole is refused as too large to fill
    safely. Any other non-uniform spacing (duplicates, uneven spacing, drift) is refused with the
    spacing report, because no uniform grid holds those slices without moving them, and a mask on
    a moved slice is a mask on the wrong anatomy.
    """
    first = slices[0]
    try:
        _, _, normal = orientation_vectors(first.orientation)
    except StudyValidationError as exc:
        raise StudyValidationError(exc.reason, path=first.path, tag=exc.tag) from exc
    positions = np.array([s.position for s in slices], dtype=np.float64)
    order = spatial_order(positions, first.orientation)
    ordered = [slices[int(i)] for i in order]
    along = slice_positions(positions, first.orientation)[order]
    ipp = positions[order]
    report = check_slice_spacing(along)
    indices: npt.NDArray[np.intp] = np.arange(len(ordered), dtype=np.intp)
    warnings: list[str] = []
    grid_positions = ipp
    if len(ordered) > 1 and not report.is_uniform:
        on_grid = _grid_indices(along, report)
        if on_grid is None:
            where = "; ".join(
                f"slice {gap.index} = {ordered[gap.index].path.name}, slice {gap.index + 1} = "
                f"{ordered[gap.index + 1].path.name}"
                for gap in report.irregular[:3]
            )
            path = ordered[report.irregular[0].index + 1].path if report.irregular else first.path
            raise StudyValidationError(
                f"image series {series_uid}: {report.describe()}" + (f" (files: {where})" if where else ""),
                path=path,
                tag=TAG_IPP,
            )
        indices, step = on_grid
        warnings = _check_gaps(ordered, along, indices, step, series_uid)
        grid_positions = _grid_positions(ipp, along, indices, step, normal)
    try:
        geometry = geometry_from_slices(
            grid_positions,
            first.orientation,
            first.pixel_spacing,
            first.rows,
            first.columns,
            slice_thickness=first.slice_thickness,
        )
    except StudyValidationError as exc:
        raise StudyValidationError(f"image series {series_uid}: {exc.reason}", path=first.path, tag=exc.tag) from exc
    present = set(indices.tolist())
    missing = tuple(k for k in range(int(indices[-1]) + 1) if k not in present)
    return _Grid(ordered, geometry, tuple(float(p) for p in along), tuple(int(k) for k in indices), missing, warnings)


def _check_gaps(
    ordered: list[_Slice], along: FloatArray64, indices: npt.NDArray[np.intp], step: float, series_uid: str
) -> list[str]:
    """One warning per gap in the stack, or a refusal naming every gap too large to fill safely."""
    warnings: list[str] = []
    too_large: list[str] = []
    for k in np.flatnonzero(np.diff(indices) > 1).tolist():
        lacking = int(indices[k + 1] - indices[k]) - 1
        before, after = ordered[k], ordered[k + 1]
        gap = (
            f"gap of {float(along[k + 1] - along[k]):.3f} mm between {before.path.name} at {float(along[k]):.3f} mm "
            f"and {after.path.name} at {float(along[k + 1]):.3f} mm along the slice normal"
        )
        if lacking > MAX_MISSING_SLICES_PER_GAP:
            too_large.append(f"{gap}: {lacking} slices missing")
            continue
        filled = ", ".join(f"{float(along[k]) + step * (j + 1):.3f}" for j in range(lacking))
        warnings.append(
            f"image series {series_uid}: {gap}; {lacking} missing slice(s) at {filled} mm filled by interpolation "
            f"(images linearly, the mask by shape) onto the uniform {step:.4g} mm grid; the axial output holds only "
            "the received slices"
        )
    if too_large:
        first_gap = int(np.flatnonzero(np.diff(indices) > MAX_MISSING_SLICES_PER_GAP + 1)[0])
        raise StudyValidationError(
            f"image series {series_uid}: slices are missing and the gap is too large to fill safely by "
            f"interpolation (at most {MAX_MISSING_SLICES_PER_GAP} missing slices per gap at the nominal spacing "
            f"{step:.4g} mm; more would invent anatomy): "
            + "; ".join(too_large[:MAX_LISTED])
            + (f"; and {len(too_large) - MAX_LISTED} more" if len(too_large) > MAX_LISTED else ""),
            path=ordered[first_gap + 1].path,
            tag=TAG_IPP,
        )
    return warnings


def _grid_positions(
    ipp: FloatArray64, along: FloatArray64, indices: npt.NDArray[np.intp], step: float, normal: FloatArray64
) -> FloatArray64:
    """An IPP for every grid slice, for :func:`geometry_from_slices` to build and check the grid from.

    Received slices keep their in-plane position and are moved along the normal onto the grid (by
    at most the spacing tolerance), so the shear check still sees exactly where each received slice
    is; a missing slice takes the in-plane position interpolated between its neighbours, which
    adds no drift of its own.
    """
    moved = ipp + np.outer(along[0] + indices * step - along, normal)
    grid = np.arange(int(indices[-1]) + 1, dtype=np.float64)
    out: FloatArray64 = np.column_stack([np.interp(grid, indices, moved[:, axis]) for axis in range(3)])
    return out


def _decode_slice(path: Path, rows: int, columns: int, sop_instance_uid: str) -> npt.NDArray[Any]:
    """One slice in modality units (Modality LUT or RescaleSlope/Intercept applied by pydicom).

    The file must still hold the instance that was validated: a slice replaced between validation
    and decoding would otherwise be stacked silently into the volume.
    """
    try:
        ds = dcmread(path)
        found = _text(ds, "SOPInstanceUID")
        values: npt.NDArray[Any] = apply_modality_lut(ds.pixel_array, ds)
    except Exception as exc:  # decoder errors come in many types; all mean "this slice is unusable"
        raise DicomInputError(
            f"pixel data cannot be read or decoded: {type(exc).__name__}: {exc}", path=path, tag=TAG_PIXEL_DATA
        ) from exc
    if found != sop_instance_uid:
        raise DicomInputError(
            f"file now holds SOPInstanceUID {found or '(none)'}, not the validated {sop_instance_uid}",
            path=path,
            tag=_tag("SOPInstanceUID"),
        )
    if values.shape != (rows, columns):
        raise DicomInputError(
            f"decoded pixel data has shape {values.shape}, expected {rows}x{columns}", path=path, tag=TAG_PIXEL_DATA
        )
    return values


# --------------------------------------------------------------------------------------------
# Loading a study
# --------------------------------------------------------------------------------------------


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


#: Attributes two copies of one image instance must agree on (besides the decoded pixel values).
_SAME_IMAGE_KEYWORDS = (
    "SOPClassUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "RescaleSlope",
    "RescaleIntercept",
)


def _image_difference(first: Path, second: Path) -> str:
    """ "" when two files holding one SOPInstanceUID hold the same image, else the attributes that differ.

    Byte-identical files are the same image. Otherwise (the same image may come back in another
    transfer syntax or with other header details) the geometry attributes and the decoded pixel
    values in modality units must be equal.

    Raises:
        DicomInputError: either file cannot be read or its pixel data cannot be decoded (named).
    """
    if first.stat().st_size == second.stat().st_size and first.read_bytes() == second.read_bytes():
        return ""
    datasets = []
    for path in (first, second):
        ds = _read_dataset(path, defer_large_values=False)
        datasets.append(ds)
    a, b = datasets
    differing = [keyword for keyword in _SAME_IMAGE_KEYWORDS if a.get(keyword) != b.get(keyword)]
    if not differing:
        pixels = []
        for path, ds in ((first, a), (second, b)):
            try:
                pixels.append(apply_modality_lut(ds.pixel_array, ds))
            except Exception as exc:  # decoder errors come in many types
                raise DicomInputError(
                    f"pixel data cannot be read or decoded: {type(exc).__name__}: {exc}", path=path, tag=TAG_PIXEL_DATA
                ) from exc
        if pixels[0].shape != pixels[1].shape or not np.array_equal(pixels[0], pixels[1]):
            differing.append("PixelData")
    return ", ".join(differing)


def _image_members(instances: list[_Instance]) -> tuple[list[_Instance], list[str]]:
    """The instances of the image series that are slices of the volume, and warnings for the rest.

    Set aside (kept in ``other_files``, reported): a second file with the SOPInstanceUID of one
    already taken when it holds the same image (the same image received twice; the first by path
    is used), localizer images (a scout in the axial series is not a slice of the stack), and
    RTSTRUCTs mistakenly given the image series' SeriesInstanceUID.

    Raises:
        StudyValidationError: two files carry one SOPInstanceUID but hold different images (see
            :func:`_image_difference`): which one the contours were drawn on cannot be known.
    """
    seen: dict[str, _Instance] = {}
    copies: list[str] = []
    localizers: list[str] = []
    for inst in sorted(instances, key=lambda i: str(i.path)):
        if inst.is_rtstruct:
            continue
        if inst.is_localizer:
            localizers.append(inst.path.name)
        elif inst.sop_instance_uid in seen:
            first = seen[inst.sop_instance_uid].path
            differences = _image_difference(first, inst.path)
            if differences:
                raise StudyValidationError(
                    f"{first.name} and {inst.path.name} both carry SOPInstanceUID {inst.sop_instance_uid} but hold "
                    f"different images ({differences} differ); cannot tell which one is the real instance, so "
                    "neither is used in its place: remove the wrong one and retry",
                    path=inst.path,
                    tag=_tag("SOPInstanceUID"),
                )
            copies.append(inst.path.name)
        else:
            seen[inst.sop_instance_uid] = inst
    warnings = []
    if copies:
        warnings.append(
            f"{len(copies)} file(s) repeat an image already in the series and were not used: {_listed(copies)}"
        )
    if localizers:
        warnings.append(f"{len(localizers)} localizer image(s) in the series were not used: {_listed(localizers)}")
    return list(seen.values()), warnings


def _check_references(rs: _StructureSet, series_uid: str, image_sops: set[str], owner: dict[str, str]) -> None:
    """Every image the RTSTRUCT references for this series must be in it; else list what is absent."""
    referenced = _unique([*rs.series_images.get(series_uid, ()), *rs.contour_images])
    missing = [sop for sop in referenced if sop not in image_sops]
    if not missing:
        return
    elsewhere = [sop for sop in missing if sop in owner]
    other_series = _listed(_unique(owner[sop] for sop in elsewhere))
    note = f"; {len(elsewhere)} of them belong to other series of the study ({other_series})" if elsewhere else ""
    raise StudyValidationError(
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


def _no_rtstruct(
    kind: type[StudyValidationError], study_uid: str, paths: Sequence[Path], series: dict[str, list[_Instance]]
) -> StudyValidationError:
    return kind(
        f"no RTSTRUCT in study {study_uid}: {len(paths)} file{'s' if len(paths) != 1 else ''}, series "
        f"{_describe_series(series)}",
        path=_common_folder(paths),
        tag=_tag("Modality"),
    )


def load_study(files: Sequence[Path]) -> LoadedStudy:
    """Validate one study's files and describe what to process.

    Groups the files by series, picks the RTSTRUCT (the newest, if several reference the same
    series), resolves the image series it references, and checks that series: supported single-
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
    structure_sets = [_read_structure_set(inst) for inst in structure_set_files]
    chosen, series_uid, source, warnings = _choose_structure_set(structure_sets, series)

    members, set_aside = _image_members(series[series_uid])
    warnings.extend(set_aside)
    if not members:
        raise StudyValidationError(
            f"image series {series_uid} holds no image slices (only localizers or structure sets)",
            path=chosen.path,
            tag=source,
        )
    slices = [_read_slice(inst) for inst in members]
    frame = _check_same_frame(slices, series_uid)
    warnings.extend(_check_frames(chosen, series_uid, frame, slices[0].path))
    owner = {inst.sop_instance_uid: uid for uid, group in series.items() for inst in group}
    _check_references(chosen, series_uid, {s.sop_instance_uid for s in slices}, owner)
    _check_same_plane(slices)
    grid = _grid(slices, series_uid)
    ordered = grid.ordered
    warnings.extend(grid.warnings)
    for s in {id(ordered[0]): ordered[0], id(ordered[-1]): ordered[-1]}.values():
        _decode_slice(s.path, s.rows, s.columns, s.sop_instance_uid)

    used = {s.path for s in ordered} | {chosen.path}
    other_files = tuple(p for p in paths if p not in used)
    first = ordered[0]
    images = ImageSeries(
        series_instance_uid=series_uid,
        sop_class_uid=first.sop_class_uid,
        modality=first.modality or Counter(s.modality for s in ordered).most_common(1)[0][0],
        frame_of_reference_uid=frame,
        files=tuple(s.path for s in ordered),
        sop_instance_uids=tuple(s.sop_instance_uid for s in ordered),
        geometry=grid.geometry,
        positions=grid.positions,
        slice_indices=grid.slice_indices,
        missing_slices=grid.missing,
    )
    return LoadedStudy(
        study_instance_uid=study_uid,
        images=images,
        rtstruct_file=chosen.path,
        rtstruct_sop_instance_uid=chosen.instance.sop_instance_uid,
        other_files=other_files,
        warnings=tuple(warnings),
        reference_source=source,
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


def load_found_study(root: Path, study_instance_uid: str | None = None) -> LoadedStudy:
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
        study = load_study(paths)
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


def read_image_volume(series: ImageSeries) -> FloatArray32:
    """The whole grid as float32 ``[slice, row, col]`` in modality units, in spatial order.

    CT comes out in HU: pydicom's modality LUT applies each slice's own RescaleSlope and
    RescaleIntercept (they may differ between slices, PET's always do). Compressed transfer
    syntaxes are decoded by pydicom's pixel handlers (pylibjpeg plugins). Each file is checked
    to still be the instance that was validated.

    Received slices are placed on their grid slice untouched. A missing slice (see
    :attr:`ImageSeries.missing_slices`) is the linear interpolation along the normal of the nearest
    received slices below and above it, weighted by distance: the reformats need a value on every
    grid slice, and a straight blend of the two measured neighbours is the estimate that adds
    nothing the scanner did not see. It is never written back as an axial image.

    Raises:
        DicomInputError: a slice is missing, replaced, or its pixel data cannot be decoded (named).
    """
    slices, rows, columns = series.geometry.shape
    volume = np.empty((slices, rows, columns), dtype=np.float32)
    for k, path, sop_uid in zip(series.slice_indices, series.files, series.sop_instance_uids, strict=True):
        volume[k] = _decode_slice(path, rows, columns, sop_uid)
    for k in series.missing_slices:
        below, above = series.received_neighbours(k)
        weight = (k - below) / (above - below)
        volume[k] = (1.0 - weight) * volume[below] + weight * volume[above]
    return volume


#: Received slices decoded into a buffer before it is pasted into the SimpleITK image of
#: :func:`read_source_image`: SimpleITK's in-place paste costs ~1.3 ms a call whatever its size, so
#: slice-by-slice pasting of 400 slices took 1.2 s against 0.17 s in chunks of 8 (measured).
_PASTE_SLICES = 8

_INT16 = np.iinfo(np.int16)


def _exact_int16(values: npt.NDArray[Any]) -> npt.NDArray[np.int16] | None:
    """``values`` as int16 when that changes none of them (integers within the int16 range), else None."""
    if values.size == 0:
        return values.astype(np.int16)
    low, high = values.min(), values.max()
    if not (_INT16.min <= low and high <= _INT16.max):  # also False for NaN
        return None
    candidate = values.astype(np.int16)
    return candidate if np.array_equal(candidate, values) else None


def read_source_image(series: ImageSeries) -> sitk.Image:
    """The values of :func:`read_image_volume` as a SimpleITK image on ``series.geometry``, held once.

    This is what the reformats resample. The image is filled in place a few slices at a time, so
    the volume is never held twice (a numpy volume plus SimpleITK's copy of it), and its pixel type
    is the smallest that holds every value exactly: int16 when every modality value is an integer in
    the int16 range (CT in HU with the usual integer rescale: half the memory of float32), float32
    otherwise (fractional rescale, wider values, or missing slices, which are interpolated exactly as
    :func:`read_image_volume` does). Either way SimpleITK's linear interpolation reads the same
    numbers as from the float32 volume, so the resampled values are identical.

    Raises:
        DicomInputError: a slice is missing, replaced, or its pixel data cannot be decoded (named).
    """
    slices, rows, columns = series.geometry.shape
    compact = not series.missing_slices
    image: Any = _sitk.Image([columns, rows, slices], sitk.sitkInt16 if compact else sitk.sitkFloat32)
    buffer: npt.NDArray[Any] = np.empty((_PASTE_SLICES, rows, columns), dtype=np.int16 if compact else np.float32)
    start, count = 0, 0

    def flush() -> None:
        if count:
            image[:, :, start : start + count] = _sitk.GetImageFromArray(buffer[:count])

    for k, path, sop_uid in zip(series.slice_indices, series.files, series.sop_instance_uids, strict=True):
        values = _decode_slice(path, rows, columns, sop_uid)
        exact = _exact_int16(values) if compact else None
        if compact and exact is None:  # first value int16 cannot hold: float32 from here on
            compact = False
            image = _sitk.Cast(image, sitk.sitkFloat32)
            buffer = buffer.astype(np.float32)
        if count == _PASTE_SLICES or (count and k != start + count):
            flush()
            count = 0
        if count == 0:
            start = k
        buffer[count] = exact if exact is not None else values
        count += 1
    flush()
    for k in series.missing_slices:
        below, above = series.received_neighbours(k)
        weight = (k - below) / (above - below)
        stored = _sitk.GetArrayViewFromImage(image)
        blended = (1.0 - weight) * stored[below] + weight * stored[above]
        del stored
        image[:, :, k : k + 1] = _sitk.GetImageFromArray(blended[None])
    result: sitk.Image = place_sitk_image(image, series.geometry)
    return result
