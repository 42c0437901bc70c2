"""The decoded source volume, decoded once per run and shared by the output writers through a file.

Every coronal and sagittal series (overlay, burn-in, colour) and the axial colour series resample
or window the whole source volume. Each is its own task (one per kind and plane, possibly in other
processes or on a retry), and decoding 200 CT files with pydicom took 0.8 s of each (measured on a
512 x 512 x 200 phantom, ``bench/profiles``): six times per run with every kind. The first writer
now stores the decoded values as one ``.npy`` in the work dir; the others read that (tens of ms
from the page cache).

Remembered state, so it must never lie:

* The file name is a hash of the series as loaded (UIDs, grid, slice order, missing slices), of
  every source file's stamp (path, size, mtime_ns, inode: a file rewritten, replaced or touched
  gives another name) and of the decoder version below. A stale file is never read, only left
  behind; writing a new one removes the older ones of the same folder.
* It is written to a temp file, fsync'd and renamed, so a crash never leaves a short file under the
  final name; a file whose header does not give the grid's shape and one of the two pixel types is
  ignored and decoded again.
* Concurrent writers in one process (the flow's thread pool) wait for the first instead of
  decoding in parallel, and share the one read-only array while any of them holds it (the volume
  is not held twice in memory); across processes each decodes and the last rename wins (same
  content).
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from netrt.fileio import atomic_output, fsync_dir
from netrt.study.model import ImageSeries
from netrt.study.pixels import read_source_image

#: Bump when :func:`read_source_image` would decode the same files to other values.
DECODER_VERSION = 1

#: What :func:`read_source_image` produces: exact int16, or float32 when int16 cannot hold the values.
_PIXEL_TYPES = (np.dtype(np.int16), np.dtype(np.float32))

_locks_guard = threading.Lock()
_locks: dict[Path, threading.Lock] = {}
#: Volumes handed out and still in use somewhere in this process, by cache file: writers running at
#: the same time (the flow runs axial kinds beside the reformats) share one array instead of each
#: holding its own copy; the entry goes when the last user drops the array.
_in_use: weakref.WeakValueDictionary[Path, npt.NDArray[Any]] = weakref.WeakValueDictionary()


def volume_key(series: ImageSeries) -> str:
    """The cache name of ``series``'s decoded values (see the module docstring)."""
    digest = hashlib.sha256(f"netrt-volume-{DECODER_VERSION}\n{series!r}\n".encode())
    for path in dict.fromkeys(series.files):
        now = os.stat(path)
        digest.update(f"{Path(path).resolve()}\0{now.st_size}\0{now.st_mtime_ns}\0{now.st_ino}\n".encode())
    return digest.hexdigest()[:32]


def _lock_for(path: Path) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(path, threading.Lock())


def _load(path: Path, series: ImageSeries) -> npt.NDArray[Any] | None:
    try:
        values: npt.NDArray[Any] = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if values.shape != series.geometry.shape or values.dtype not in _PIXEL_TYPES:
        return None
    return values


def _store(values: npt.NDArray[Any], path: Path) -> None:
    with atomic_output(path) as handle:
        np.save(handle, values, allow_pickle=False)
    fsync_dir(path.parent)
    for older in path.parent.glob("volume-*.npy"):
        if older != path:
            older.unlink(missing_ok=True)


class _ImageBuffer:
    """Exposes a SimpleITK image's buffer to numpy and keeps the image alive as the array's base:
    a bare ``GetArrayViewFromImage`` view points at freed memory once the image is collected."""

    def __init__(self, image: sitk.Image) -> None:
        self.image = image
        self.__array_interface__ = sitk.GetArrayViewFromImage(image).__array_interface__


def source_volume(series: ImageSeries, cache_dir: Path | None) -> npt.NDArray[Any]:
    """The values of :func:`netrt.study.read_source_image` for ``series`` (read-only ``[slice,
    row, col]``, int16 or float32), through the cache in ``cache_dir``.

    On a hit the array is read from the cache file; on a miss it is the decoded SimpleITK image's
    own buffer (stored first), so the volume is never held twice. ``cache_dir`` None decodes
    without a cache.

    Raises:
        DicomInputError: as :func:`read_source_image` (a slice missing, replaced or undecodable).
        OSError: the cache file cannot be written (a full disk is not hidden).
    """
    if cache_dir is None:
        return np.asarray(_ImageBuffer(read_source_image(series)))
    path = Path(cache_dir) / f"volume-{volume_key(series)}.npy"
    with _lock_for(path):
        shared = _in_use.get(path)
        if shared is not None and path.exists():
            return shared
        cached = _load(path, series) if path.exists() else None
        if cached is not None:
            cached.flags.writeable = False
            _in_use[path] = cached
            return cached
        values = np.asarray(_ImageBuffer(read_source_image(series)))
        path.parent.mkdir(parents=True, exist_ok=True)
        _store(values, path)
        _in_use[path] = values
        return values
