"""The quarantine: where a study that failed for good waits, untouched, with the reason why.

Nothing here deletes a study's files except :func:`purge`, which only an operator calls
(`netrt quarantine purge`). An entry is ``<data_dir>/quarantine/<id>/`` holding ``input/`` (the
study's files exactly as received) and ``reason.json`` (stage, error, whether waiting may heal it,
attempts, first and last failure times, flow-run ids, the full history). A study that lived in
``studies/`` is moved (same file system, so nothing is copied and nothing can be half-lost); one
that came from elsewhere (``netrt process PATH``) is copied, because NETRT never moves a user's
own files.

A retry moves ``input/`` back to ``studies/<id>/`` and runs the flow again: success moves the study
on to ``processed/`` and releases the entry; another failure brings it back here with one more
attempt counted.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netrt.errors import NetrtError
from netrt.fileio import atomic_copy, atomic_write_bytes, fsync_dir, move_folder
from netrt.layout import DataLayout
from netrt.logs import utc_now_iso
from netrt.uids import is_valid_uid

REASON_FILE = "reason.json"
INPUT_FOLDER = "input"

# Entry ids are UIDs or "study-<hex>": a conservative grammar, so an id typed on the command line
# can never name a path outside the quarantine.
_ENTRY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,127}$")


class QuarantineError(NetrtError):
    """A quarantine entry is missing, malformed or cannot be moved."""


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined study, as read from its ``reason.json``."""

    id: str
    folder: Path
    stage: str
    error: str
    retryable: bool
    attempts: int
    first_failed_at: str
    last_failed_at: str
    flow_run_id: str | None
    study: str | None
    status: str
    history: tuple[dict[str, Any], ...]

    @property
    def input_dir(self) -> Path:
        return self.folder / INPUT_FOLDER

    def summary_line(self) -> str:
        """One line for `netrt quarantine list`: id, stage, attempts, status, reason."""
        error = " ".join(self.error.split())
        if len(error) > 160:
            error = error[:157] + "..."
        heal = "retryable" if self.retryable else "needs a fix"
        shown = f"  study={self.study}" if self.study and self.study != self.id else ""
        return f"{self.id}{shown}  stage={self.stage}  attempts={self.attempts}  {self.status}, {heal}  {error}"


def entry_id_for(layout: DataLayout, study_dir: Path, study_instance_uid: str | None) -> str:
    """The quarantine id of a study: its folder name under ``studies/``, else its UID, else a path hash."""
    study_dir = study_dir.resolve()
    if study_dir.parent == layout.studies and _ENTRY_ID.match(study_dir.name):
        return study_dir.name
    if study_instance_uid is not None and is_valid_uid(study_instance_uid):
        return study_instance_uid
    return "study-" + hashlib.sha256(str(study_dir).encode("utf-8")).hexdigest()[:12]


def is_entry_id(text: str) -> bool:
    return bool(_ENTRY_ID.match(text))


def checked_entry_id(entry_id: str) -> str:
    if not _ENTRY_ID.match(entry_id):
        raise QuarantineError(f"{entry_id!r} is not a quarantine id (see `netrt quarantine list`)")
    return entry_id


def entry_folder(layout: DataLayout, entry_id: str) -> Path:
    return layout.quarantine / checked_entry_id(entry_id)


def _read_reason(folder: Path) -> dict[str, Any]:
    path = folder / REASON_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise QuarantineError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise QuarantineError(f"{path}: not a JSON object")
    return data


def _write_reason(folder: Path, reason: dict[str, Any]) -> None:
    atomic_write_bytes(folder / REASON_FILE, (json.dumps(reason, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _entry(folder: Path, reason: dict[str, Any]) -> QuarantineEntry:
    history = tuple(h for h in reason.get("history", []) if isinstance(h, dict))
    return QuarantineEntry(
        id=folder.name,
        folder=folder,
        stage=str(reason.get("stage", "unknown")),
        error=str(reason.get("error", "")),
        retryable=bool(reason.get("retryable", False)),
        attempts=int(reason.get("attempts", 0)),
        first_failed_at=str(reason.get("first_failed_at", "")),
        last_failed_at=str(reason.get("last_failed_at", "")),
        flow_run_id=reason.get("flow_run_id"),
        study=reason.get("study"),
        status=str(reason.get("status", "quarantined")),
        history=history,
    )


def _copy_files(files: Sequence[Path], study_dir: Path, target: Path) -> None:
    for index, path in enumerate(files):
        try:
            relative = path.resolve().relative_to(study_dir.resolve())
        except ValueError:
            relative = Path(f"{index:05d}-{path.name}")
        atomic_copy(path, target / relative)


def quarantine_study(
    layout: DataLayout,
    study_dir: Path,
    files: Sequence[Path],
    *,
    entry_id: str,
    stage: str,
    error: str,
    retryable: bool,
    flow_run_id: str | None = None,
    study: str | None = None,
    details: dict[str, Any] | None = None,
) -> QuarantineEntry:
    """Put a failed study in quarantine and return its entry.

    ``study_dir`` directly under ``studies/`` is moved as a whole; any other study is copied (only
    ``files``, or every file under ``study_dir`` when ``files`` is empty), leaving the original in
    place. ``error`` must already be free of patient data when anonymization is on. ``study`` is
    the StudyInstanceUID that may be shown (the public one). Attempts count up across re-failures.
    """
    folder = entry_folder(layout, entry_id)
    folder.mkdir(parents=True, exist_ok=True)
    previous = _read_reason(folder)
    now = utc_now_iso()
    resolved = study_dir.resolve()
    if resolved.parent == layout.studies and resolved.is_dir():
        move_folder(resolved, folder / INPUT_FOLDER)
    elif resolved.exists():
        sources = list(files) or [p for p in sorted(resolved.rglob("*")) if p.is_file()]
        _copy_files(sources, resolved, folder / INPUT_FOLDER)
    attempt = {"stage": stage, "error": error, "retryable": retryable, "at": now, "flow_run_id": flow_run_id}
    if details:
        attempt["details"] = details
    reason = {
        "study": study if study is not None else previous.get("study"),
        "stage": stage,
        "error": error,
        "retryable": retryable,
        "attempts": int(previous.get("attempts", 0)) + 1,
        "first_failed_at": previous.get("first_failed_at", now),
        "last_failed_at": now,
        "flow_run_id": flow_run_id,
        "status": "quarantined",
        "history": [*previous.get("history", []), attempt],
    }
    _write_reason(folder, reason)
    fsync_dir(folder)
    return _entry(folder, reason)


def list_entries(layout: DataLayout) -> list[QuarantineEntry]:
    """Every entry, oldest failure first; folders without a reason.json are listed as such, not skipped."""
    if not layout.quarantine.is_dir():
        return []
    entries = []
    for folder in sorted(p for p in layout.quarantine.iterdir() if p.is_dir()):
        try:
            reason = _read_reason(folder)
        except QuarantineError as exc:
            reason = {"stage": "unknown", "error": str(exc)}
        if not reason:
            reason = {"stage": "unknown", "error": f"{folder / REASON_FILE} is missing"}
        entries.append(_entry(folder, reason))
    return sorted(entries, key=lambda e: (e.first_failed_at, e.id))


def read_entry(layout: DataLayout, entry_id: str) -> QuarantineEntry:
    folder = entry_folder(layout, entry_id)
    if not folder.is_dir():
        raise QuarantineError(f"no quarantined study {entry_id!r} in {layout.quarantine}")
    reason = _read_reason(folder)
    if not reason:
        raise QuarantineError(f"{folder / REASON_FILE} is missing")
    return _entry(folder, reason)


def reason_json(entry: QuarantineEntry) -> str:
    """The entry's reason.json as stored (for `netrt quarantine show`)."""
    return json.dumps(_read_reason(entry.folder), indent=2, sort_keys=True)


def begin_retry(layout: DataLayout, entry_id: str) -> Path:
    """Move an entry's input back to ``studies/<id>/`` for another flow run; return that folder.

    The reason.json stays, marked ``retrying``, so a crash between here and the flow's end leaves a
    trace, and a new failure counts on from the same attempts.
    """
    entry = read_entry(layout, entry_id)
    target = layout.studies / entry.id
    if entry.input_dir.is_dir():
        move_folder(entry.input_dir, target)
    elif not target.is_dir():
        raise QuarantineError(f"quarantined study {entry.id!r} has no input/ folder and is not in {layout.studies}")
    reason = _read_reason(entry.folder)
    reason["status"] = "retrying"
    _write_reason(entry.folder, reason)
    return target


def release(layout: DataLayout, entry_id: str, *, processed: Path) -> bool:
    """Drop the entry of a study that was processed after all; False when it is kept (or there is none).

    ``processed`` is the folder the calling flow run has just moved the study to, from
    ``studies/<id>``; a run that moved nothing (it processed a copy from elsewhere, e.g.
    ``netrt process PATH``) has nothing to pass and must not call this. The entry is released only
    when the study really went from the quarantine through this run: its input is gone from the
    entry, ``processed`` is ``processed/<id>`` and holds it, and no copy of it waits in
    ``studies/<id>`` or ``incoming/<id>`` (moved back by a retry or a re-sending that another run
    will process). Then reason.json is all that remains, and the transaction log keeps the
    history. Otherwise the entry and everything in it stays.
    """
    folder = entry_folder(layout, entry_id)
    if not folder.is_dir():
        return False
    if (folder / INPUT_FOLDER).exists():
        return False
    if Path(processed) != layout.processed / folder.name or not Path(processed).is_dir():
        return False
    if (layout.studies / folder.name).exists() or (layout.incoming / folder.name).exists():
        return False
    (folder / REASON_FILE).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        return False
    fsync_dir(layout.quarantine)
    return True


def purge(layout: DataLayout, entry_id: str) -> QuarantineEntry:
    """Delete a quarantined study and everything in its entry, for good. Operators only."""
    entry = read_entry(layout, entry_id)
    shutil.rmtree(entry.folder)
    fsync_dir(layout.quarantine)
    return entry
