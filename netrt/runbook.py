"""The bookkeeping of one run of one study, free of the orchestrator.

A flow run (``flows/process_study.py``) drives the steps; what it has to remember and record on the
way is not Prefect's business and lives here: which stage it is in and how long each took, the
study's public UID and scrubbing of patient data from any text that leaves the run, where a
received study is (a retry may find it in quarantine/ or processed/), putting a failed study in
quarantine with its reason, moving a processed one on, and the delivery episode with its
per-destination report lines and transaction-log events (:class:`DeliveryBook`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netrt.anonymize import map_uid, public_study_uid, scrub_text, study_identifier_sets
from netrt.config import AnonymizationConfig, DicomDestination, FolderDestination, NetrtConfig
from netrt.deliver import DeliveryOutcome
from netrt.episodes import DeliveryEpisode, begin_delivery, files_digest
from netrt.errors import DeliveryError, ScrubbedError, StudyFailedError
from netrt.fileio import move_folder, move_folder_whole
from netrt.layout import DataLayout
from netrt.logs import TransactionLog
from netrt.quarantine import begin_retry, entry_id_for, is_entry_id, quarantine_study, read_entry, release
from netrt.report import StageTiming, StudyReport
from netrt.study import find_study

Destination = FolderDestination | DicomDestination


def quarantine_pointer(anonymization: AnonymizationConfig, entry_id: str) -> str:
    """Where the failed study is; in full mode without its id, which is the received StudyInstanceUID."""
    if anonymization.enabled and anonymization.mode == "full":
        return "quarantined; `netrt quarantine list` shows it by this study UID"
    return f"quarantined: {entry_id}"


def locate_study(layout: DataLayout, source: Path) -> Path | None:
    """Where a received study is now, or None when this run has nothing to do.

    A retry from the Prefect UI re-runs a flow run whose ``studies/<id>`` has since moved to
    quarantine/ (failed) or processed/ (succeeded): bring it back. A study the listener re-opened
    (back in incoming/ because more instances arrived) gets a new run when it is sealed again, so
    this one leaves it alone.
    """
    resolved = source.resolve()
    if resolved.exists() or resolved.parent != layout.studies or not is_entry_id(resolved.name):
        return source
    if (layout.incoming / resolved.name).is_dir():
        return None
    if (layout.quarantine / resolved.name / "input").is_dir():
        return begin_retry(layout, resolved.name)
    if (layout.processed / resolved.name).is_dir():
        move_folder(layout.processed / resolved.name, resolved)
        return source
    raise StudyFailedError(
        f"study folder {resolved.name} is in none of studies/, processed/ or quarantine/; nothing to process",
        "validate",
        quarantine_id=None,
        retryable=False,
    )


def retried_run(layout: DataLayout, entry_id: str) -> str | None:
    """The flow run whose failure put this study in quarantine, when this run is its retry."""
    try:
        entry = read_entry(layout, entry_id)
    except Exception:  # no entry (the usual case), or an unreadable one: not a quarantine retry
        return None
    return entry.flow_run_id if entry.status == "retrying" else None


def study_files_of(source: Path, study_instance_uid: str | None) -> list[Path]:
    """The study's own files (not its neighbours' in a shared folder); every file when unsure."""
    try:
        return list(find_study(source, study_instance_uid).files)
    except Exception:  # the study may be unreadable: that may be why it failed
        if source.is_dir():
            return [p for p in sorted(source.rglob("*")) if p.is_file()]
        return [source] if source.exists() else []


def is_retryable(exc: BaseException) -> bool:
    """Whether waiting may heal the failure (a destination down, a full disk), not a bad study."""
    if isinstance(exc, DeliveryError | StudyFailedError | ScrubbedError):
        return exc.retryable
    return isinstance(exc, OSError)


class StudyRun:
    """One run of one study: its stage and timings, public UID, scrubbing, quarantine and finish.

    ``report`` collects what the run summary shows; ``continuing_runs`` are the flow-run ids whose
    failed delivery this run continues (:mod:`netrt.episodes`): its own (a UI retry of it) and, on
    a quarantine retry, the quarantined run's.
    """

    def __init__(
        self,
        config: NetrtConfig,
        layout: DataLayout,
        secret: bytes,
        report: StudyReport,
        transactions: TransactionLog,
    ) -> None:
        self.config = config
        self.layout = layout
        self.secret = secret
        self.report = report
        self.transactions = transactions
        self.stage = "validate"
        self.continuing_runs: set[str | None] = {report.flow_run_id}

    @contextmanager
    def timed(self, stage: str) -> Iterator[StageTiming]:
        self.stage = stage
        timing = StageTiming(stage, 0.0)
        start = time.perf_counter()
        try:
            yield timing
        finally:
            timing.seconds = time.perf_counter() - start
            self.report.stages.append(timing)

    def public(self, study_instance_uid: str) -> str:
        return public_study_uid(study_instance_uid, self.config.anonymization, self.secret)

    def scrub(self, text: str, files: Sequence[Path]) -> str:
        """``text`` without patient identifiers (and, in full mode, with original UIDs mapped)."""
        return self.scrubbed([text], files)[0]

    def scrubbed(self, warnings: Sequence[str], files: Sequence[Path]) -> list[str]:
        """Warnings about the received files, scrubbed of patient data when anonymization is on.

        The files' headers are read once for the whole list (a 1000-slice study: 1000 headers).
        """
        anonymization = self.config.anonymization
        if not warnings or not anonymization.enabled:
            return list(warnings)
        identifiers, uids = study_identifier_sets(list(files), anonymization)
        out = []
        for text in warnings:
            if anonymization.mode == "full":
                for uid in sorted(uids, key=len, reverse=True):  # longest first: a UID may prefix another
                    text = text.replace(uid, map_uid(uid, self.secret))
            out.append(scrub_text(text, identifiers))
        return out

    def record(self, event: str, **fields: Any) -> None:
        """A transaction-log event of this run (the study's public UID and the flow-run id added)."""
        self.transactions.record(
            event, study_instance_uid=self.report.study, flow_run_id=self.report.flow_run_id, **fields
        )

    def fail(self, exc: Exception, source: Path, study_instance_uid: str | None, label: str | None) -> StudyFailedError:
        """Quarantine the study after ``exc`` (reason scrubbed), record it; the error to raise."""
        files = study_files_of(source, study_instance_uid)
        message = self.scrub(str(exc) or type(exc).__name__, files)
        retryable = is_retryable(exc)
        report = self.report
        entry = quarantine_study(
            self.layout,
            source,
            files,
            entry_id=entry_id_for(self.layout, source, label),
            stage=self.stage,
            error=message,
            retryable=retryable,
            flow_run_id=report.flow_run_id,
            study=report.study,
            details={"destinations": report.destinations} if report.destinations else None,
        )
        report.failed_stage, report.error, report.quarantine_id = self.stage, message, entry.id
        anonymization = self.config.anonymization
        self.record(
            "quarantined",
            stage=self.stage,
            reason=message,
            attempts=entry.attempts,
            quarantine_id=entry.id if not anonymization.enabled or anonymization.mode != "full" else None,
        )
        return StudyFailedError(
            f"study {report.study} failed at {self.stage}: {message} ({quarantine_pointer(anonymization, entry.id)})",
            self.stage,
            entry.id,
            retryable,
        )

    def finish(self, source: Path, label: str | None) -> None:
        """After success: move a received study on to processed/, release its quarantine entry.

        An earlier processed/<id> (the same study processed before) is set aside whole, never merged
        into this run's copy; only a study this run moved from studies/ to processed/ releases its
        entry.
        """
        layout = self.layout
        resolved = source.resolve()
        entry_id = entry_id_for(layout, source, label)
        processed = None
        if resolved.parent == layout.studies and resolved.is_dir():
            processed = layout.processed / resolved.name
            earlier = move_folder_whole(resolved, processed)
            if earlier is not None:
                # the folder name itself is the received UID: only the suffix is recorded
                self.record("earlier_processed_copy_kept", suffix=earlier.name.removeprefix(resolved.name))
        try:
            entry = read_entry(layout, entry_id)
        except Exception:
            entry = None
        if entry is not None and processed is not None and release(layout, entry_id, processed=processed):
            self.record("released_from_quarantine", attempts=entry.attempts)


@dataclass
class DeliveryBook:
    """A run's deliveries in their episode: what each destination gets, what was already done in
    the episode, and the report lines and transaction events of each outcome."""

    run: StudyRun
    routes: dict[str, list[Path]]
    episode: DeliveryEpisode = field(init=False)
    failures: list[str] = field(default_factory=list)
    all_retryable: bool = True
    _digests: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        layout, report = self.run.layout, self.run.report
        self.episode = begin_delivery(
            layout.study_dir(layout.work, report.study) / "delivery", report.flow_run_id, self.run.continuing_runs
        )

    def files(self, destination: Destination) -> list[Path]:
        return self.routes[destination.name]

    def digest(self, destination: Destination) -> str:
        """What the destination is given (:func:`netrt.episodes.files_digest`), computed once."""
        if destination.name not in self._digests:
            self._digests[destination.name] = files_digest(self.files(destination))
        return self._digests[destination.name]

    def progress_file(self, destination: Destination) -> Path:
        return self.episode.progress_file(destination.name)

    def delivered_earlier(self, destination: Destination) -> bool:
        """True (and reported) when the destination got these very files earlier in this episode."""
        files = self.files(destination)
        earlier = self.episode.delivered_earlier(destination.name, self.digest(destination))
        if earlier is None:
            return False
        detail = f"delivered earlier in this delivery (flow run {earlier.get('run')}); not sent again"
        self.run.report.destinations.append(
            {
                "name": destination.name,
                "ok": True,
                "instances": len(files),
                "stored": 0,
                "earlier": len(files),
                "detail": detail,
            }
        )
        self.run.record("delivery_skipped", destination=destination.name, reason=detail)
        return True

    def succeeded(self, destination: Destination, outcome: DeliveryOutcome) -> None:
        self.episode.mark_delivered(
            outcome.destination, self.digest(destination), self.run.report.flow_run_id, outcome.instances
        )
        self.run.report.destinations.append(
            {
                "name": outcome.destination,
                "ok": True,
                "instances": outcome.instances,
                "stored": outcome.stored,
                "earlier": outcome.earlier,
                "detail": outcome.detail,
                "committed": outcome.committed,
            }
        )
        self.run.record(
            "delivered",
            destination=outcome.destination,
            counts={
                "instances": outcome.instances,
                "stored_this_run": outcome.stored,
                "stored_earlier": outcome.earlier,
                **({"committed": outcome.committed} if outcome.committed is not None else {}),
            },
        )

    def failed(self, destination: Destination, exc: Exception) -> None:
        files = self.files(destination)
        self.all_retryable = self.all_retryable and is_retryable(exc)
        detail = str(exc) if isinstance(exc, DeliveryError) else f"destination {destination.name!r}: {exc}"
        self.failures.append(detail)
        stored = getattr(exc, "stored", None) or 0
        earlier = getattr(exc, "earlier", None) or 0
        reason = self.run.scrub(detail, files)
        self.episode.mark_failed(destination.name, self.run.report.flow_run_id, reason)
        self.run.report.destinations.append(
            {
                "name": destination.name,
                "ok": False,
                "instances": len(files),
                "stored": stored,
                "earlier": earlier,
                "detail": detail,
            }
        )
        self.run.record(
            "delivery_failed",
            destination=destination.name,
            reason=reason,
            counts={"instances": len(files), "stored_this_run": stored, "stored_earlier": earlier},
        )

    def close(self, destinations: Sequence[Destination]) -> None:
        """Close the episode when every destination has delivered; raise the failures, if any."""
        self.episode.close_if_complete(d.name for d in destinations)
        if self.failures:
            raise StudyFailedError(
                "delivery failed: " + "; ".join(self.failures),
                "deliver",
                quarantine_id=None,
                retryable=self.all_retryable,
            )
