"""The progress file of a delivery: one line per instance the destination acknowledged.

Each acknowledged instance is appended (and flushed to the operating system) the moment its
success status arrives, so the next attempt of the same delivery episode (:mod:`netrt.episodes`)
sends only what is still missing. The file is fsync'd at most once a second and when the attempt
ends, not per line: a killed process loses no line (they are in the kernel already), and a power
cut costs at most the last second's acknowledgements, which the next attempt sends again
(harmless: a PACS keeps one copy per SOP Instance UID), while an fsync per instance cost ~0.9 ms
each, ~1 s per 1124 instances here (BENCHMARKS.md, delivery). Storage Commitment adds
``committed`` and ``commit_failed`` lines.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from netrt.fileio import fsync_dir

logger = logging.getLogger("netrt.send")

# The progress file is fsync'd at most this often (and when an attempt ends); see the module docstring.
PROGRESS_SYNC_SECONDS = 1.0


class _Acknowledged(Protocol):
    """What a progress line keys an instance on."""

    @property
    def sop_instance_uid(self) -> str: ...

    @property
    def sha256(self) -> str: ...


def _acknowledged(progress_file: Path | None) -> dict[tuple[str, str], str]:
    """(SOPInstanceUID, sha256) pairs the destination has acknowledged in earlier attempts, each
    with the run tag of the attempt that recorded it ("" for lines written before runs were tagged).

    The content hash is part of the key so that a re-written instance with the same UID but other
    content (re-processing with changed input) is sent again rather than skipped. A torn last line
    (a crash mid-append) is ignored: that instance is simply sent again. An instance whose latest
    line says its storage commitment failed (``"state": "commit_failed"``) is not acknowledged:
    the next attempt sends it again.
    """
    return _progress(progress_file)[0]


def _progress(progress_file: Path | None) -> tuple[dict[tuple[str, str], str], set[tuple[str, str]]]:
    """What the progress file says: the acknowledged instances (as :func:`_acknowledged`) and,
    among them, those the destination committed to keep (``"state": "committed"``)."""
    done: dict[tuple[str, str], str] = {}
    committed: set[tuple[str, str]] = set()
    if progress_file is None or not progress_file.exists():
        return done, committed
    text = progress_file.read_text(encoding="utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(line)
            key = (str(entry["sop_instance_uid"]), str(entry["sha256"]))
            state = entry.get("state", "stored")
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("%s:%d: unreadable progress line ignored", progress_file, number)
            continue
        if state == "committed":
            if key in done:
                committed.add(key)
        elif state == "commit_failed":
            done.pop(key, None)
            committed.discard(key)
        else:
            done.setdefault(key, str(entry.get("run", "")))
    return done, committed


class _ProgressLog:
    """Appends one JSON line per acknowledged instance: flushed at once, fsync'd every
    ``sync_seconds`` and on close (see the module docstring for why not per line)."""

    def __init__(
        self, path: Path | None, destination: str, run: str = "", sync_seconds: float = PROGRESS_SYNC_SECONDS
    ) -> None:
        self._handle = None
        self._destination = destination
        self._run = run
        self._sync_seconds = sync_seconds
        self._synced_at = time.monotonic()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            created = not path.exists()
            torn = False
            if not created and path.stat().st_size > 0:
                with path.open("rb") as existing:
                    existing.seek(-1, os.SEEK_END)
                    torn = existing.read(1) != b"\n"
            self._handle = path.open("a", encoding="utf-8")
            if torn:  # a crash cut the last line short: end it, so the next line stays readable
                self._handle.write("\n")
            if created:
                fsync_dir(path.parent)

    def record(self, instance: _Acknowledged, status: int) -> None:
        if self._handle is None:
            return
        entry = {
            "sop_instance_uid": instance.sop_instance_uid,
            "sha256": instance.sha256,
            "destination": self._destination,
            "status": f"0x{status:04X}",
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "run": self._run,
        }
        self._write(entry)

    def record_commitment(
        self, instance: _Acknowledged, state: str, transaction_uid: str, failure_reason: int | None = None
    ) -> None:
        """A ``committed`` or ``commit_failed`` line for an acknowledged instance (Storage Commitment)."""
        if self._handle is None:
            return
        entry: dict[str, Any] = {
            "sop_instance_uid": instance.sop_instance_uid,
            "sha256": instance.sha256,
            "destination": self._destination,
            "state": state,
            "transaction_uid": transaction_uid,
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "run": self._run,
        }
        if failure_reason is not None:
            entry["failure_reason"] = f"0x{failure_reason:04X}"
        self._write(entry)

    def _write(self, entry: dict[str, Any]) -> None:
        assert self._handle is not None
        self._handle.write(json.dumps(entry) + "\n")
        self._handle.flush()
        if time.monotonic() - self._synced_at >= self._sync_seconds:
            self._sync()

    def sync(self) -> None:
        """fsync now (before a report the lines stand for is discarded)."""
        if self._handle is not None:
            self._handle.flush()
            self._sync()

    def _sync(self) -> None:
        if self._handle is not None:
            os.fsync(self._handle.fileno())
            self._synced_at = time.monotonic()

    def close(self) -> None:
        if self._handle is not None:
            try:
                self._handle.flush()
                self._sync()
            finally:
                self._handle.close()
                self._handle = None
