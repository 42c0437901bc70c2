"""Discovery by header scan: group the files under a folder into studies and series.

Only the grouping tags are read and reading stops before the pixel data; every file read here is
checked against its size (:func:`_check_complete`), because pydicom reads a truncated file without
complaint.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from netrt.errors import DicomInputError, StudyValidationError
from netrt.study._common import (
    _SCAN_KEYWORDS,
    _UNDEFINED_LENGTH,
    HEADER_DEFER_SIZE,
    MEDIA_STORAGE_DIRECTORY_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
    _tag,
    _text,
    _uid_name,
)
from netrt.study.model import StudyFiles


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


#: The first tags a bare data set can start with: any group 0008 element (Identifying), as
#: SpecificCharacterSet, ImageType or SOPClassUID, in either VR encoding.
_BARE_START_GROUP = b"\x08\x00"


def _not_part10_reason(path: Path) -> str:
    """Why a file pydicom refuses as Part 10 is skipped, telling a bare data set from other files.

    Some planning systems (older Elekta CMS Monaco and XiO exports among them) write data sets
    without the Part 10 header: no preamble, no ``DICM``, no File Meta Information. NETRT reads
    Part 10 files only (every reader here, and a folder destination, relies on the file meta); the
    listener adds the header to whatever arrives by C-STORE, so the reason names the two ways in.
    A file counts as a bare data set when it starts with a group 0008 tag and pydicom, told to read
    it anyway, finds a SOP Class and SOP Instance UID in it.
    """
    generic = "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
    try:
        with path.open("rb") as handle:
            start = handle.read(2)
        if start != _BARE_START_GROUP:
            return generic
        ds = dcmread(path, force=True, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        if not (ds.get("SOPClassUID") and ds.get("SOPInstanceUID")):
            return generic
    except Exception:  # anything unreadable is simply not a DICOM file
        return generic
    return (
        "a DICOM data set without the Part 10 file header (no preamble, 'DICM' or File Meta Information, as "
        "some planning systems export): NETRT reads Part 10 files only; send the folder to NETRT's listener "
        "(e.g. dcmtk storescu, which adds the header on the way) or add the header with dcmtk "
        "`dcmconv IN OUT` first"
    )


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
        raise DicomInputError(_not_part10_reason(path), path=path) from exc
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
        raise DicomInputError(_not_part10_reason(path), path=path) from exc
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


def scan_files(root: Path) -> dict[str, list[Path]]:
    """StudyInstanceUID -> its files (sorted by path), from header-only reads under ``root``.

    Files that are not usable DICOM instances are left out; :func:`find_studies` lists them with
    the reason. Never writes, moves or deletes anything.
    """
    studies, _ = _scan(root)
    return {uid: [inst.path for inst in studies[uid]] for uid in sorted(studies)}


def skipped_files(root: Path) -> list[tuple[Path, str]]:
    """Every file under ``root`` that is not a usable DICOM instance, with the reason (what
    :func:`find_studies` puts in each study's ``skipped``, also when no study is found at all)."""
    return _scan(root)[1]


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
