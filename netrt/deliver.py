"""Delivery of written series to folder destinations (C-STORE destinations come with the delivery issue).

A folder destination mirrors what a PACS would hold: ``<path>/<StudyInstanceUID>/<SeriesInstanceUID>/
<SOPInstanceUID>.dcm``. Every path component is a UID checked against the UID grammar, and every
file lands atomically, so a re-delivery of the same study overwrites instead of duplicating.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom

from netrt.errors import DeliveryError, DicomInputError
from netrt.fileio import atomic_copy, atomic_link, fsync_dir
from netrt.identity import read_identity
from netrt.uids import checked_uid


@dataclass(frozen=True)
class DeliveryOutcome:
    """A completed delivery: every one of ``instances`` is held by the destination.

    ``stored`` counts the instances this run stored (its task retries included), ``earlier`` those
    that earlier runs of the same delivery episode had stored (see :mod:`netrt.episodes`); the two
    add up to ``instances``. Reports say both, so a resumed delivery never looks like a full one.
    ``committed`` counts the instances the destination committed to keep (Storage Commitment,
    :mod:`netrt.commitment`); None when commitment was not requested.
    """

    destination: str
    instances: int
    stored: int
    earlier: int
    detail: str
    committed: int | None = None


def _folder_identity(path: Path) -> tuple[object, object, object]:
    """Study, Series and SOP Instance UID of ``path`` (:mod:`netrt.identity`, else pydicom)."""
    try:
        identity = read_identity(path)
        if identity is not None:
            return identity.study_instance_uid, identity.series_instance_uid, identity.sop_instance_uid
        header = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
        )
    except Exception as exc:
        raise DicomInputError(f"cannot read written instance for delivery: {exc}", path) from exc
    return header.get("StudyInstanceUID"), header.get("SeriesInstanceUID"), header.get("SOPInstanceUID")


def deliver_to_folder(
    name: str,
    root: Path,
    files: Sequence[Path],
    on_stored: Callable[[int, int], None] | None = None,
    link_from: Path | None = None,
) -> DeliveryOutcome:
    """Place every instance in the folder destination's layout; raise DeliveryError if any fails.

    Files under ``link_from`` (NETRT's own work dir: derived files, each written once under a temp
    name and renamed, never changed in place) are hard-linked when the destination is on the same
    file system, so no bytes move; any other file (a user's own, or across file systems) is copied.
    Durability is one ``os.sync`` for the batch and one fsync per folder, instead of an fsync per
    file. ``on_stored(placed, total)`` is called after each file (a progress display).
    """
    folders: set[Path] = set()
    linked = 0
    own = link_from.resolve() if link_from is not None else None
    for count, path in enumerate(files, start=1):
        study_uid, series_uid, sop_uid = _folder_identity(path)
        study = checked_uid(study_uid, f"{path}: StudyInstanceUID")
        series = checked_uid(series_uid, f"{path}: SeriesInstanceUID")
        sop = checked_uid(sop_uid, f"{path}: SOPInstanceUID")
        target = root / study / series / f"{sop}.dcm"
        try:
            if own is not None and Path(path).resolve().is_relative_to(own) and atomic_link(Path(path), target):
                linked += 1
            else:
                atomic_copy(path, target, durable=False)
        except OSError as exc:
            raise DeliveryError(name, f"cannot write {target}: {exc.strerror or exc}", retryable=True) from exc
        folders.add(target.parent)
        if on_stored is not None:
            on_stored(count, len(files))
    os.sync()  # the linked and copied data reach the disk, once for the batch
    for folder in folders:
        fsync_dir(folder)
    how = f" ({linked} hard-linked, {len(files) - linked} copied)" if link_from is not None else ""
    return DeliveryOutcome(name, len(files), len(files), 0, f"{len(files)} instances written under {root}{how}")
