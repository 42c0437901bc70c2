"""Durable receive: the bytes of a C-STORE request become ``incoming/<study>/<sop>.dcm`` on disk.

Why this order (temp file in the study folder, write, fsync, rename, fsync the folder): success is
answered to the sender only after :func:`write_instance` returns, and a sender that got success
deletes or forgets its copy. After a power cut the instance must therefore be complete under its
final name, or absent (then it was never acknowledged). A second copy of the same SOP instance
replaces the first by the same rename, so a reader sees either the old or the new file, never a
mix.

File and folder names are UIDs that came from the network; they are checked against the UID
grammar (:func:`netrt.uids.checked_uid`) before they touch a path.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

from netrt.errors import NetrtError
from netrt.fileio import atomic_output, fsync_dir
from netrt.filemeta import file_meta_bytes
from netrt.uids import checked_uid

INSTANCE_SUFFIX = ".dcm"
# netrt.fileio.atomic_output names its temp files ".tmp-<random>.part" beside the target.
TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".part"

# errno values that mean "no room or no handles left": the DICOM answer is A700 (out of resources).
OUT_OF_RESOURCES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EFBIG})


class StoreError(NetrtError):
    """An instance could not be written; ``out_of_resources`` when the disk or the process is full."""

    def __init__(self, message: str, *, out_of_resources: bool) -> None:
        super().__init__(message)
        self.out_of_resources = out_of_resources


def instance_name(sop_instance_uid: str) -> str:
    """``<SOPInstanceUID>.dcm`` after checking the UID grammar."""
    return checked_uid(sop_instance_uid, "SOPInstanceUID") + INSTANCE_SUFFIX


def ensure_folder(folder: Path) -> bool:
    """Create ``folder`` (one level) durably; True when it was created.

    A new study folder is itself a directory entry of ``incoming/``: without syncing ``incoming/``
    a crash could lose the folder and with it every fsync'd file inside.
    """
    try:
        folder.mkdir()
    except FileExistsError:
        return False
    fsync_dir(folder.parent)
    return True


def file_meta_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes | None:
    """Preamble, ``DICM`` and the File Meta Information of a received instance, encoded here.

    The same bytes as pynetdicom's ``Event.encoded_dataset()`` puts before the data set (its
    ``create_file_meta`` encoded by pydicom: group length, version 00 01, media storage SOP class
    and instance, transfer syntax, pynetdicom's implementation class UID and version name), without
    building and writing a pydicom data set per instance (about 0.3 ms each; issue 20), through
    :func:`netrt.filemeta.file_meta_bytes`. ``tests/test_listener.py`` compares the two. None when
    a value is not a UID (the caller then lets pydicom encode it as it is).
    """
    return file_meta_bytes(
        sop_class_uid,
        sop_instance_uid,
        transfer_syntax_uid,
        PYNETDICOM_IMPLEMENTATION_UID,
        PYNETDICOM_IMPLEMENTATION_VERSION,
    )


def write_instance(folder: Path, sop_instance_uid: str, data: bytes | memoryview, *more: bytes | memoryview) -> Path:
    """Write one received instance (``data`` followed by ``more``) durably as ``folder/<sop>.dcm``;
    return its path once the file and the folder entry are fsync'd.

    Raises:
        UnsafeIdentifierError: the SOP Instance UID is not a UID.
        StoreError: the write failed (``out_of_resources`` for a full disk); nothing is left
            under the final name and no temp file stays behind.
    """
    target = folder / instance_name(sop_instance_uid)
    try:
        with atomic_output(target) as handle:
            handle.write(data)
            for chunk in more:
                handle.write(chunk)
        fsync_dir(folder)
    except OSError as exc:
        full = exc.errno in OUT_OF_RESOURCES
        raise StoreError(
            f"cannot write {target.name}: {exc.strerror or exc}{' (out of space)' if full else ''}",
            out_of_resources=full,
        ) from exc
    return target


def is_instance_file(path: Path) -> bool:
    """True for a stored instance (not a temp file left by a crash)."""
    return path.is_file() and not path.name.startswith(TEMP_PREFIX)


def instance_files(folder: Path) -> list[Path]:
    """The stored instances of a study folder, sorted (temp files excluded)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_instance_file(p))


def remove_temp_files(folder: Path) -> int:
    """Delete temp files a crash left in ``folder``; they were never acknowledged. Returns the count."""
    removed = 0
    for path in folder.iterdir():
        if path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX) and path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        fsync_dir(folder)
    return removed


def merge_folder(source: Path, target: Path) -> int:
    """Move every file of ``source`` into ``target`` (both study folders); return how many moved.

    Used when a sealed study is re-opened while ``target`` (its incoming folder) already holds
    instances: those are newer, so a file of ``source`` with the same name (the same SOP instance)
    is the older copy and is dropped instead of overwriting the newer one. Renames on one file
    system: each file is at its old or its new place at every moment.
    """
    moved = 0
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        destination = target / path.relative_to(source)
        if destination.exists():
            path.unlink()
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, destination)
            moved += 1
    fsync_dir(target)
    for folder in sorted((p for p in source.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        folder.rmdir()
    source.rmdir()
    fsync_dir(source.parent)
    return moved
