"""Durable file writes: temp file, fsync, rename. A reader never sees half a file, and a crash
never leaves a half-written DICOM instance under its final name."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX needs the directory entry synced too)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(target: Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary handle on a temp file beside ``target``, renamed onto it when the block succeeds.

    On any exception the temp file is removed and ``target`` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(target: Path, data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``target`` atomically; with ``durable`` the rename is fsync'd too."""
    with atomic_output(target, durable=durable) as handle:
        handle.write(data)
    if durable:
        fsync_dir(target.parent)
    return target


def atomic_copy(source: Path, target: Path, *, durable: bool = True) -> Path:
    """Copy ``source`` to ``target`` atomically (the caller fsyncs the folder once for many files)."""
    with atomic_output(target, durable=durable) as handle, source.open("rb") as src:
        shutil.copyfileobj(src, handle, 1 << 20)
    return target


#: Why a hard link can fail where a copy still works: another file system, no link support, too many links.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def atomic_link(source: Path, target: Path) -> bool:
    """Hard-link ``source`` as ``target`` atomically (a temp link renamed onto it); False, with
    nothing changed, when the file system cannot link them (then copy instead). No data moves, so
    the caller makes the data durable (``os.sync``) and fsyncs the folders."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".tmp-{uuid.uuid4().hex}.link"
    try:
        os.link(source, temp)
    except OSError as exc:
        if exc.errno in _NO_LINK:
            return False
        raise
    try:
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return True


def move_folder(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target``; merge file by file when ``target`` exists already.

    Same-file-system renames: each file is either at its old or at its new place, never lost.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.replace(source, target)
        fsync_dir(target.parent)
        fsync_dir(source.parent)
        return
    for path in sorted(source.rglob("*")):
        if path.is_file():
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
    for folder in sorted((p for p in source.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        folder.rmdir()
    source.rmdir()
    fsync_dir(target)


def move_folder_whole(source: Path, target: Path) -> Path | None:
    """Move the folder ``source`` to ``target`` without merging; return where an earlier ``target`` went.

    An existing ``target`` (e.g. ``processed/<uid>`` from an earlier success of the same study) is
    first renamed, whole, to ``<target>.earlier-<UTC time>`` beside it, and that path is returned;
    then ``source`` becomes ``target``. Two renames on one file system: a crash between them
    leaves both copies in place, and neither copy is ever mixed into the other (which
    :func:`move_folder` does, by design, for the quarantine's own moves).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    earlier = None
    if target.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        earlier = target.with_name(f"{target.name}.earlier-{stamp}")
        suffix = 1
        while earlier.exists():
            earlier = target.with_name(f"{target.name}.earlier-{stamp}-{suffix}")
            suffix += 1
        os.rename(target, earlier)
    os.rename(source, target)
    fsync_dir(target.parent)
    fsync_dir(source.parent)
    return earlier
