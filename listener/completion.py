"""Study completion: when a study has arrived, sealing it, creating its one flow run, and recovery.

DICOM has no "end of study" message, so completion is inferred: a study is complete when nothing
of it has arrived for ``listener.study_idle_seconds`` and no association is still sending it (an
open association whose latest instance belongs to the study; once it moves on to another study,
or closes, it no longer holds the study open). A store in progress always holds its study open.

Then the study is *sealed*: ``incoming/<uid>/`` is renamed to ``studies/<uid>/`` (one atomic
rename, nothing copied) and one flow run is created for it through the ``trigger`` callback (the
listener never imports Prefect; ``netrt serve`` passes a function that calls ``run_deployment``).
A new instance for a study that is already sealed, processed or quarantined *re-opens* it: its
files move back into ``incoming/<uid>/`` before the new one is written, and when it is idle again
the whole study is sealed and processed once more.

What must survive a crash is kept on disk, never only in memory: the study folders themselves,
and one small JSON file per sealed study under ``<data_dir>/state/sealed/`` (outside the study
folders, which the study loader reads entirely) recording whether its flow run was created. On
start :meth:`StudyTracker.recover` picks up studies left in ``incoming/`` (sealed after the idle
time, as if their sender had just paused) and sealed studies whose flow run was never created or
will not run any more.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from listener.store import (
    OUT_OF_RESOURCES,
    StoreError,
    ensure_folder,
    instance_files,
    merge_folder,
    remove_temp_files,
)
from netrt.fileio import atomic_write_bytes, fsync_dir
from netrt.layout import DataLayout
from netrt.logs import TransactionLog, utc_now_iso
from netrt.quarantine import INPUT_FOLDER, QuarantineError, begin_retry
from netrt.uids import is_valid_uid

LOGGER = logging.getLogger("netrt.listener")

# Waits between attempts to create a flow run when the Prefect API fails: 5 s, doubling to 2 min.
FIRST_RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 120.0
# How often state files of studies the flow has moved on (processed/quarantined) are cleaned up.
STATE_SWEEP_SECONDS = 30.0


@dataclass(frozen=True)
class SealedStudy:
    """A complete study in ``studies/<uid>/``, as handed to the trigger callback."""

    study_instance_uid: str
    folder: Path
    instances: int
    calling_ae_titles: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    # A fresh id per sealing: the trigger passes :attr:`idempotency_key` to Prefect, so a crash
    # between "run created" and "run id written down" cannot give the same sealing two runs.
    seal_id: str = ""
    # Set when the sealing's earlier run is known not to process it any more (ended, crashed,
    # deleted): the new run needs a key of its own, or Prefect would hand back that earlier run.
    replaces_run_id: str | None = None

    @property
    def idempotency_key(self) -> str:
        """One key per flow run this sealing needs: its first, or the one replacing a dead run."""
        base = f"netrt-seal-{self.seal_id}"
        return base if self.replaces_run_id is None else f"{base}-after-{self.replaces_run_id}"


TriggerFn = Callable[[SealedStudy], str]
"""Create the flow run for a sealed study; return its id. May raise (the API is down): retried."""

RunPendingFn = Callable[[str], bool]
"""True when the flow run with this id will still process its study (scheduled, or running on a
live worker); False when it ended or was orphaned, so the study needs a new run. May raise."""


@dataclass
class _OpenStudy:
    uid: str
    last_activity: float
    in_flight: int = 0
    received: int = 0
    calling_ae_titles: set[str] = field(default_factory=set)
    modalities: set[str] = field(default_factory=set)


@dataclass
class _Pending:
    """A sealed study waiting for its flow run to be created (or to be checked after a restart)."""

    study: SealedStudy
    next_attempt: float
    attempts: int = 0
    previous_run_id: str | None = None
    # Found by recovery with no run recorded: the run the trigger returns may be one created before
    # the crash (same idempotency key) that has ended since; checked once, then replaced if so.
    check_returned_run: bool = False


@dataclass
class _Sender:
    study: str
    is_alive: Callable[[], bool]


def _identity(uid: str) -> str:
    return uid


class StudyTracker:
    """Tracks open studies, seals idle ones and triggers one flow run per sealing (thread-safe)."""

    def __init__(
        self,
        layout: DataLayout,
        *,
        idle_seconds: float,
        trigger: TriggerFn,
        transactions: TransactionLog,
        is_run_pending: RunPendingFn | None = None,
        label: Callable[[str], str] = _identity,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = layout
        self.idle_seconds = idle_seconds
        self._trigger = trigger
        self._is_run_pending = is_run_pending
        self._transactions = transactions
        self._label = label
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, _OpenStudy] = {}
        self._senders: dict[Hashable, _Sender] = {}
        self._pending: dict[str, _Pending] = {}
        self._sealing_enabled = True
        self._last_state_sweep = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- folders and state files ---------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.layout.state / "sealed"

    def _state_file(self, uid: str) -> Path:
        return self.state_dir / f"{uid}.json"

    def _read_state(self, uid: str) -> dict[str, Any]:
        try:
            data = json.loads(self._state_file(uid).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_state(self, study: SealedStudy, flow_run_id: str | None) -> None:
        state = {
            "study_instance_uid": study.study_instance_uid,
            "sealed_at": utc_now_iso(),
            "seal_id": study.seal_id,
            "instances": study.instances,
            "calling_ae_titles": list(study.calling_ae_titles),
            "modalities": list(study.modalities),
            "flow_run_id": flow_run_id,
        }
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self._state_file(study.study_instance_uid), json.dumps(state, indent=1).encode("utf-8"))

    def _owns_state(self, study: SealedStudy) -> bool:
        """True when the study's state file is this sealing's (no newer sealing has replaced it) or absent."""
        current = self._read_state(study.study_instance_uid).get("seal_id")
        return current is None or current == study.seal_id

    def _record(self, event: str, uid: str, **fields: Any) -> None:
        self._transactions.record(event, study_instance_uid=self._label(uid), **fields)

    # --- receiving ------------------------------------------------------------------------------

    def begin_store(self, uid: str, sender: Hashable, is_alive: Callable[[], bool]) -> Path:
        """Announce a store for study ``uid`` by ``sender``; return the folder to write into.

        Opens the study (re-opening it from studies/, processed/ or quarantine/ when it is there)
        and holds it open until :meth:`end_store`. ``uid`` must be a checked UID. Raises
        :class:`StoreError` when the study folder cannot be made (then no store is in flight).
        """
        folder = self.layout.study_dir(self.layout.incoming, uid)
        with self._lock:
            study = self._open.get(uid)
            if study is None:
                try:
                    self.layout.incoming.mkdir(parents=True, exist_ok=True)
                    reopened = self._reopen(uid, folder)
                    ensure_folder(folder)
                except OSError as exc:
                    if folder.is_dir():  # partly re-opened: keep it tracked so it is sealed again
                        self._open[uid] = _OpenStudy(uid, self._clock())
                    raise StoreError(
                        f"cannot open the study folder: {exc.strerror or exc}",
                        out_of_resources=exc.errno in OUT_OF_RESOURCES,
                    ) from exc
                study = self._open[uid] = _OpenStudy(uid, self._clock())
                self._pending.pop(uid, None)
                if reopened is not None:
                    area, moved = reopened
                    LOGGER.info("study %s re-opened from %s/ (%d files moved back)", self._label(uid), area, moved)
                    self._record("study_reopened", uid, area=area, counts={"instances": moved})
            study.in_flight += 1
            study.last_activity = self._clock()
            self._senders[sender] = _Sender(uid, is_alive)
        return folder

    def end_store(
        self, uid: str, *, stored: bool, calling_ae_title: str | None = None, modality: str | None = None
    ) -> None:
        """The store announced by :meth:`begin_store` is over (``stored``: it is on disk)."""
        with self._lock:
            study = self._open.get(uid)
            if study is None:  # cannot happen while in_flight > 0; keep the tracker consistent anyway
                return
            study.in_flight = max(0, study.in_flight - 1)
            study.last_activity = self._clock()
            if stored:
                study.received += 1
                if calling_ae_title:
                    study.calling_ae_titles.add(calling_ae_title)
                if modality:
                    study.modalities.add(modality)

    def sender_gone(self, sender: Hashable) -> None:
        """The association ``sender`` ended: it no longer holds its latest study open."""
        with self._lock:
            self._senders.pop(sender, None)

    def _reopen(self, uid: str, incoming: Path) -> tuple[str, int] | None:
        """Move a sealed, processed or quarantined copy of study ``uid`` into ``incoming``.

        Called with the lock held. The flow may be moving the same folder at the same moment
        (studies/ -> processed/ or quarantine/): a rename that loses that race finds the folder
        at its new place on the next round.
        """
        for _ in range(5):
            found = self._sealed_copy(uid)
            if found is None:
                return None
            area, source = found
            try:
                if incoming.exists():
                    moved = merge_folder(source, incoming)
                else:
                    moved = len(instance_files(source))
                    os.rename(source, incoming)
                    fsync_dir(incoming.parent)
                    fsync_dir(source.parent)
            except FileNotFoundError:
                continue  # moved away by the flow meanwhile: look again
            return area, moved
        raise OSError(f"study folder of {self._label(uid)} kept moving while being re-opened")

    def _sealed_copy(self, uid: str) -> tuple[str, Path] | None:
        """Where a sealed copy of the study is: studies/, processed/ or a quarantine entry's input."""
        if (self.layout.studies / uid).is_dir():
            return "studies", self.layout.studies / uid
        if (self.layout.processed / uid).is_dir():
            return "processed", self.layout.processed / uid
        if (self.layout.quarantine / uid / INPUT_FOLDER).is_dir():
            # The quarantine's own retry step: input/ back to studies/<uid>, entry marked retrying
            # (its history stays; the flow releases it when the study is processed).
            try:
                return "quarantine", begin_retry(self.layout, uid)
            except QuarantineError as exc:
                LOGGER.warning("study %s: quarantine entry cannot be re-opened: %s", self._label(uid), exc)
        return None

    # --- completion -----------------------------------------------------------------------------

    def open_studies(self) -> dict[str, int]:
        """Study UID -> instances received since it was (re)opened, for reports and tests."""
        with self._lock:
            return {uid: s.received for uid, s in self._open.items()}

    def in_flight(self) -> int:
        with self._lock:
            return sum(s.in_flight for s in self._open.values())

    def pending_triggers(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def _held_open(self) -> set[str]:
        for sender, entry in list(self._senders.items()):
            try:
                alive = entry.is_alive()
            except Exception:
                alive = False
            if not alive:
                del self._senders[sender]
        return {entry.study for entry in self._senders.values()}

    def poll(self) -> list[SealedStudy]:
        """Seal every idle study, create due flow runs; return the studies sealed by this call."""
        now = self._clock()
        sealed: list[SealedStudy] = []
        with self._lock:
            if self._sealing_enabled:
                held = self._held_open()
                idle = [
                    uid
                    for uid, s in self._open.items()
                    if s.in_flight == 0 and uid not in held and now - s.last_activity >= self.idle_seconds
                ]
                for uid in idle:
                    try:
                        study = self._seal(uid)
                    except OSError as exc:
                        # Keep the study open; it is tried again after another idle period.
                        self._open[uid].last_activity = now
                        LOGGER.error("study %s: sealing failed: %s", self._label(uid), exc)
                        continue
                    if study is not None:
                        sealed.append(study)
                        self._pending[uid] = _Pending(study, next_attempt=now)
            due = [p for p in self._pending.values() if p.next_attempt <= now]
        for pending in due:
            if self._stop.is_set() and self._thread is not None:
                break
            self._run_trigger(pending)
        if now - self._last_state_sweep >= STATE_SWEEP_SECONDS:
            self._last_state_sweep = now
            self._sweep_state()
        return sealed

    def _seal(self, uid: str) -> SealedStudy | None:
        """Rename incoming/<uid> to studies/<uid> and write the state file; lock held."""
        study = self._open[uid]
        folder = self.layout.incoming / uid
        if folder.is_dir():
            remove_temp_files(folder)
        files = instance_files(folder)
        if not files:
            # Only refused stores ever reached this study: nothing to process.
            del self._open[uid]
            try:
                folder.rmdir()
                fsync_dir(self.layout.incoming)
            except OSError:
                pass
            return None
        target = self.layout.studies / uid
        self.layout.studies.mkdir(parents=True, exist_ok=True)
        if target.exists():
            # An older sealed copy came back (a quarantine retry, or a crash mid re-open): fold it
            # in under the newer received files, then seal the whole.
            merge_folder(target, folder)
            files = instance_files(folder)
        sealed = SealedStudy(
            study_instance_uid=uid,
            folder=target,
            instances=len(files),
            calling_ae_titles=tuple(sorted(study.calling_ae_titles)),
            modalities=tuple(sorted(study.modalities)),
            seal_id=uuid.uuid4().hex,
        )
        # State first: after a crash between the two steps recovery finds either the study still
        # in incoming/ (sealed again later) or in studies/ with a state saying "no run yet".
        self._write_state(sealed, None)
        os.rename(folder, target)
        del self._open[uid]
        fsync_dir(self.layout.incoming)
        fsync_dir(self.layout.studies)
        LOGGER.info("study %s sealed: %d instances", self._label(uid), len(files))
        self._record(
            "study_sealed",
            uid,
            counts={"instances": len(files), "received": study.received},
            calling_ae_titles=list(sealed.calling_ae_titles),
            modalities=list(sealed.modalities),
        )
        return sealed

    def _run_trigger(self, pending: _Pending) -> None:
        uid = pending.study.study_instance_uid
        with self._lock:
            if self._pending.get(uid) is not pending:
                return
            if uid in self._open or not pending.study.folder.is_dir():
                # Re-opened meanwhile (it will be sealed and triggered again), or already moved on.
                del self._pending[uid]
                return
        try:
            if pending.previous_run_id is not None and self._is_run_pending is not None:
                if self._is_run_pending(pending.previous_run_id):
                    with self._lock:
                        self._pending.pop(uid, None)
                    LOGGER.info(
                        "study %s: flow run %s will still process it", self._label(uid), pending.previous_run_id
                    )
                    return
                # The recorded run will not process the study: a new run, under a new key.
                pending.study = replace(pending.study, replaces_run_id=pending.previous_run_id)
                pending.previous_run_id = None
                pending.check_returned_run = False  # a key never used before: the run it gets is new
            run_id = self._trigger(pending.study)
            if pending.check_returned_run and self._is_run_pending is not None:
                pending.check_returned_run = False  # once: a new run is never final, a wrong answer must not loop
                if not self._is_run_pending(run_id):
                    # The key gave back a run created before a crash that has ended since.
                    LOGGER.info("study %s: flow run %s ended without processing it", self._label(uid), run_id)
                    with self._lock:
                        if self._pending.get(uid) is pending and self._owns_state(pending.study):
                            self._write_state(pending.study, run_id)
                    pending.previous_run_id = run_id
                    pending.next_attempt = self._clock()
                    return
        except Exception as exc:  # the API may be down or restarting: keep the study, retry later
            pending.attempts += 1
            delay = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (pending.attempts - 1))
            pending.next_attempt = self._clock() + delay
            LOGGER.warning(
                "study %s: creating its flow run failed (attempt %d, next in %.0f s): %s",
                self._label(uid),
                pending.attempts,
                delay,
                exc,
            )
            self._record("flow_run_failed", uid, error=f"{type(exc).__name__}: {exc}", attempts=pending.attempts)
            return
        with self._lock:
            if self._pending.get(uid) is pending:
                del self._pending[uid]
            # Not when the study was re-opened or sealed again meanwhile: the state file belongs
            # to the newer sealing, whose own run is still to be created.
            if uid not in self._open and self._owns_state(pending.study):
                self._write_state(pending.study, run_id)
        LOGGER.info("study %s: flow run %s created", self._label(uid), run_id)
        self._record("flow_run_created", uid, flow_run_id=run_id, counts={"instances": pending.study.instances})

    def _sweep_state(self) -> None:
        """Drop state files of studies the flow has moved on (to processed/ or quarantine/)."""
        if not self.state_dir.is_dir():
            return
        for path in self.state_dir.glob("*.json"):
            uid = path.stem
            with self._lock:
                if uid in self._open or uid in self._pending or (self.layout.studies / uid).exists():
                    continue
                path.unlink(missing_ok=True)

    # --- recovery -------------------------------------------------------------------------------

    def recover(self) -> None:
        """Pick up what a previous run left: open studies in incoming/, untriggered sealed studies."""
        now = self._clock()
        for folder in sorted(self.layout.incoming.iterdir()) if self.layout.incoming.is_dir() else []:
            if not folder.is_dir():
                continue
            uid = folder.name
            if not is_valid_uid(uid):
                LOGGER.warning("incoming/%s is not a study folder NETRT wrote (name is not a UID); left alone", uid)
                continue
            removed = remove_temp_files(folder)
            files = instance_files(folder)
            with self._lock:
                if uid in self._open:
                    continue
                if not files:
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                    continue
                self._open[uid] = _OpenStudy(uid, now)
            LOGGER.info(
                "study %s recovered from incoming/: %d instances%s",
                self._label(uid),
                len(files),
                f" ({removed} unacknowledged partial files removed)" if removed else "",
            )
            self._record("study_recovered", uid, area="incoming", counts={"instances": len(files)})
        for folder in sorted(self.layout.studies.iterdir()) if self.layout.studies.is_dir() else []:
            uid = folder.name
            if not folder.is_dir() or not is_valid_uid(uid):
                continue
            state = self._read_state(uid)
            run_id = state.get("flow_run_id") if isinstance(state.get("flow_run_id"), str) else None
            study = SealedStudy(
                study_instance_uid=uid,
                folder=folder,
                instances=len(instance_files(folder)),
                calling_ae_titles=tuple(str(v) for v in state.get("calling_ae_titles", [])),
                modalities=tuple(str(v) for v in state.get("modalities", [])),
                seal_id=str(state.get("seal_id") or uuid.uuid4().hex),
            )
            with self._lock:
                if uid in self._open or uid in self._pending:
                    continue
                if run_id is not None and self._is_run_pending is None:
                    continue  # nobody to ask: trust that the recorded run will process it
                if not state.get("seal_id"):
                    # No record of this sealing: give it one now, so that a crash after its run is
                    # created finds the same idempotency key again instead of making a second run.
                    self._write_state(study, run_id)
                self._pending[uid] = _Pending(study, next_attempt=now, previous_run_id=run_id, check_returned_run=True)
            LOGGER.info(
                "study %s recovered from studies/: %s",
                self._label(uid),
                f"checking flow run {run_id}" if run_id else "no flow run was created yet",
            )
            self._record(
                "study_recovered", uid, area="studies", flow_run_id=run_id, counts={"instances": study.instances}
            )
        self._sweep_state()

    # --- background thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`poll` in a background thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        tick = max(0.05, min(1.0, self.idle_seconds / 5))

        def loop() -> None:
            while not self._stop.wait(tick):
                try:
                    self.poll()
                except Exception:  # a bug here must not end completion for good: log and go on
                    LOGGER.exception("study completion check failed")

        self._thread = threading.Thread(target=loop, name="netrt-study-completion", daemon=True)
        self._thread.start()

    def pause_sealing(self) -> None:
        """Seal nothing more (shutdown: a study cut off by the stop must not look complete)."""
        with self._lock:
            self._sealing_enabled = False

    def stop(self, timeout: float = 30.0) -> None:
        self.pause_sealing()
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
