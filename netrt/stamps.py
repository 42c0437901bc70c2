"""What a file looked like when NETRT wrote it, and whether it still does.

A cached step result (``flows/process_study.py``) names files under the work dir. Before a cache
hit is trusted, every file it names must still be the file the step wrote: present, a regular
file, the same size, the same modification time (nanoseconds) and the same inode. That catches a
file deleted, truncated, rewritten in place or replaced (a rename onto it), at the cost of one
``stat`` per file (about 3 ms per 1000 files), where a content hash would have to read every byte
again on every re-run (about 0.4 s per 1000 slices of 512x512 from the page cache, more from disk).
What it cannot see is a same-size rewrite in place whose writer then restores the old mtime
(``touch -r``); nothing in NETRT does that to its own work dir.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class FileStamp:
    """A file as it was right after it was written."""

    path: Path
    size: int
    mtime_ns: int
    inode: int

    def holds(self) -> bool:
        """True when the file is still there, a regular file, and unchanged as far as ``stat`` tells."""
        try:
            now = os.stat(self.path)
        except OSError:
            return False
        return (
            stat.S_ISREG(now.st_mode)
            and now.st_size == self.size
            and now.st_mtime_ns == self.mtime_ns
            and now.st_ino == self.inode
        )


def stamp_file(path: Path) -> FileStamp:
    """Stamp a file that has just been written (after its final rename)."""
    now = os.stat(path)
    return FileStamp(Path(path), now.st_size, now.st_mtime_ns, now.st_ino)


def stamp_files(paths: Iterable[Path]) -> tuple[FileStamp, ...]:
    return tuple(stamp_file(path) for path in paths)


def files_unchanged(paths: Sequence[Path], stamps: object) -> bool:
    """True when ``stamps`` stamps exactly ``paths`` (same order) and every file is unchanged.

    ``stamps`` is taken as ``object`` because it comes from a persisted result that may predate
    stamping (then it is missing or of another type): that counts as changed, never as an error.
    """
    if not isinstance(stamps, tuple) or len(stamps) != len(paths):
        return False
    return all(
        isinstance(s, FileStamp) and Path(s.path) == Path(p) and s.holds() for s, p in zip(stamps, paths, strict=True)
    )
