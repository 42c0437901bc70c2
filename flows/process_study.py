"""The `process-study` flow: one run per study, each step a thin task over `netrt.pipeline`.

validate -> anonymize -> extract-masks -> write-<plane> (axial beside coronal, then sagittal) -> preview
-> deliver-<name> (concurrently, one per destination). Tasks exchange paths, UIDs and small reports only.

Caching: the deterministic tasks (anonymize, extract-masks, write-<plane>, preview) cache on an
explicit key built from the content of the study's files (:func:`netrt.pipeline.study_fingerprint`),
the config section that shapes their output, the anonymization secret's digest and NETRT's
version; their results (paths) persist under ``<data_dir>/cache/results`` and their files under
``<data_dir>/work/<study>/<key>/``, so a re-run of an unchanged study, e.g. a quarantine retry
after a failed delivery, only delivers. A cache hit is trusted only when every file it names is
still as the step wrote it (:func:`netrt.pipeline.result_files_intact`: present, same size, mtime
and inode); a hit whose files are gone, truncated or rewritten is recomputed.
Delivery is never cached; it is retried per destination with backoff.

Failure: any stage that fails for good puts the study in quarantine (`netrt.quarantine`) with its
stage, the error (scrubbed of patient data when anonymization is on) and the flow-run id, and the
run ends Failed with that scrubbed message.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from prefect import Task, flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.states import State

from netrt.anonymize import load_or_create_secret, map_uid, public_study_uid, scrub_text, study_identifier_sets
from netrt.commitment import ReportRoute
from netrt.config import (
    AnonymizationConfig,
    DicomDestination,
    FolderDestination,
    NetrtConfig,
    ProcessingConfig,
    load_config,
)
from netrt.deliver import DeliveryOutcome, deliver_to_folder
from netrt.episodes import begin_delivery, files_digest
from netrt.errors import DeliveryError, NetrtError, StudyFailedError
from netrt.fileio import move_folder, move_folder_whole
from netrt.layout import DataLayout
from netrt.logs import TransactionLog
from netrt.outputs.routing import output_calls, output_label, route_files, shaping_settings
from netrt.pipeline import (
    AnonymizeStepResult,
    MaskStepResult,
    PassThroughResult,
    WrittenSeries,
    anonymize_step,
    compute_mask,
    content_key,
    files_fingerprint,
    pass_through_step,
    preview_step,
    result_files_intact,
    settings_key,
    study_fingerprint,
    travelling_files,
    write_output,
)
from netrt.quarantine import begin_retry, entry_id_for, is_entry_id, quarantine_study, read_entry, release
from netrt.report import StageTiming, StudyReport, render_markdown
from netrt.stamps import FileStamp, stamp_file
from netrt.study import (
    ImagesOnlyStudy,
    LoadedStudy,
    NoStructureSetError,
    find_images_only,
    find_study,
    load_found_study,
)
from netrt.uids import is_valid_uid

R = TypeVar("R")


def short_study_id(study_key: str) -> str:
    """8 hex characters of a hash of a study's public UID (or folder): tells runs apart, reveals nothing."""
    return hashlib.sha256(study_key.encode("utf-8")).hexdigest()[:8]


def _run_name() -> str:
    parameters = flow_run.parameters or {}
    key = str(parameters.get("study_instance_uid") or parameters.get("study_dir") or "")
    return f"study-{short_study_id(key)}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The explicit ``cache_key`` parameter the flow computed; None (no caching) when it passes none."""
    key = parameters.get("cache_key")
    return None if key is None else str(key)


# --- scrubbing task errors --------------------------------------------------------------------

# Set by the flow for its run: scrubs a text of the study's patient data (identity when anonymization
# is off). Tasks run in copies of the flow's context, so each task of this run sees it.
_SCRUBBER: ContextVar[Callable[[str], str] | None] = ContextVar("netrt_scrubber", default=None)


class ScrubbedError(NetrtError):
    """An error that is not NETRT's own, its text scrubbed; ``retryable`` as for the original."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@contextmanager
def _scrubbed_errors() -> Iterator[None]:
    """An error leaves a task with its message already scrubbed.

    Prefect logs a failed task ("Task run failed with exception: ...", with traceback) to the
    terminal and its database with the exception's text, before the flow could scrub it; in full
    mode that text may hold received UIDs (the study folder and file names are the received UIDs).
    NETRT's own errors keep their type (retry decisions read it); others become
    :class:`ScrubbedError`. The original is not chained (its text would be logged with it).
    """
    try:
        yield
    except Exception as exc:
        scrub = _SCRUBBER.get()
        if scrub is None:
            raise
        try:
            text = scrub(str(exc) or type(exc).__name__)
        except Exception:
            text = f"{type(exc).__name__} (its message is withheld: it could not be scrubbed of patient data)"
        if isinstance(exc, NetrtError):
            exc.args = (text,)
            raise exc from None
        raise ScrubbedError(f"{type(exc).__name__}: {text}", retryable=isinstance(exc, OSError)) from None


# --- tasks: each a few lines over netrt -------------------------------------------------------


@task(name="validate", persist_result=False)  # holds the received (identifiable) headers: never stored
def validate(study_dir: str, study_instance_uid: str | None) -> tuple[LoadedStudy, str]:
    with _scrubbed_errors():
        study = load_found_study(Path(study_dir), study_instance_uid)
        return study, study_fingerprint(study)


@task(name="validate-images-only", persist_result=False)  # received headers: never stored
def validate_images_only(study_dir: str, study_instance_uid: str | None) -> ImagesOnlyStudy:
    with _scrubbed_errors():
        return find_images_only(Path(study_dir), study_instance_uid)


@task(name="pass-through", persist_result=False)
def pass_through(
    study: ImagesOnlyStudy, anonymization: AnonymizationConfig, data_dir: str, out_dir: str
) -> PassThroughResult:
    with _scrubbed_errors():
        secret = load_or_create_secret(anonymization, Path(data_dir)) if anonymization.enabled else b""
        return pass_through_step(study, anonymization, secret, Path(out_dir))


@task(name="anonymize", cache_key_fn=_cache_key, persist_result=True)
def anonymize(
    study: LoadedStudy,
    anonymization: AnonymizationConfig,
    data_dir: str,
    out_dir: str,
    cache_key: str | None,
    forward: bool = False,
) -> AnonymizeStepResult:
    with _scrubbed_errors():
        secret = load_or_create_secret(anonymization, Path(data_dir)) if anonymization.enabled else b""
        return anonymize_step(study, anonymization, secret, Path(out_dir), forward)


@task(name="extract-masks", cache_key_fn=_cache_key, persist_result=True)
def extract_masks(study: LoadedStudy, processing: ProcessingConfig, work_dir: str, cache_key: str) -> MaskStepResult:
    with _scrubbed_errors():
        return compute_mask(study, processing, Path(work_dir))


@task(name="write", task_run_name="write-{label}", cache_key_fn=_cache_key, persist_result=True)
def write_output_series(
    study: LoadedStudy,
    masks: MaskStepResult,
    kind: str,
    plane: str,
    label: str,
    processing: ProcessingConfig,
    work_dir: str,
    cache_key: str,
) -> list[WrittenSeries]:
    with _scrubbed_errors():
        return write_output(study, masks, kind, plane, processing, Path(work_dir))


@task(name="preview", cache_key_fn=_cache_key, persist_result=True)
def preview(study: LoadedStudy, masks: MaskStepResult, path: str, cache_key: str) -> FileStamp:
    with _scrubbed_errors():
        return stamp_file(preview_step(study, masks, Path(path)).path)


def _retry_if_waiting_may_heal(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a delivery unless its error says waiting cannot heal it (e.g. called AE title unknown)."""
    try:
        state.result()
    except DeliveryError as exc:
        return exc.retryable
    except Exception:  # an unexpected error (disk, network): give the configured retries a chance
        return True
    return False


@task(
    name="deliver",
    task_run_name="deliver-{destination.name}",
    retry_condition_fn=_retry_if_waiting_may_heal,
    persist_result=False,
)
def deliver(
    destination: FolderDestination | DicomDestination,
    files: list[Path],
    calling_ae_title: str,
    progress_file: str,
    run_tag: str,
    report_route: ReportRoute | None = None,
) -> DeliveryOutcome:
    with _scrubbed_errors():
        if isinstance(destination, FolderDestination):
            return deliver_to_folder(destination.name, destination.path, files)
        from netrt.send import send_to_dicom

        return send_to_dicom(
            destination,
            files,
            calling_ae_title=calling_ae_title,
            progress_file=Path(progress_file),
            run=run_tag,
            report_route=report_route,
        )


# --- the flow ---------------------------------------------------------------------------------


def _backoff(first: float, retries: int) -> list[float]:
    return [first * 2**attempt for attempt in range(retries)]


class _Run:
    """Bookkeeping of one flow run: the current stage, timings, cache hits, and message scrubbing."""

    def __init__(self, config: NetrtConfig, layout: DataLayout, secret: bytes, report: StudyReport) -> None:
        self.config = config
        self.layout = layout
        self.secret = secret
        self.report = report
        self.stage = "validate"
        # Flow-run ids whose failed delivery this run continues (netrt.episodes): its own (a UI
        # retry of it) and, on a quarantine retry, the quarantined run's.
        self.continuing_runs: set[str | None] = {report.flow_run_id}
        self.results = layout.cache / "results"  # a Path: Prefect stores results there without a saved block

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

    def cached_call(self, task_: Task[..., R], timing: StageTiming, present: Callable[[R], bool], **kwargs: Any) -> R:
        """Run a cacheable task; note a cache hit; recompute a hit whose files are not as written (``present``)."""
        (result,) = self.cached_map(task_, timing, present, [kwargs])
        return result

    def cached_map(
        self,
        task_: Task[..., R],
        timing: StageTiming,
        present: Callable[[R], bool],
        calls: list[dict[str, Any]],
        one_at_a_time: Callable[[dict[str, Any]], bool] = lambda _: False,
    ) -> list[R]:
        """Submit one task run per ``calls`` item at once, then collect them in order.

        They run concurrently, except the calls ``one_at_a_time`` picks: each of those waits for the
        one before it (``wait_for``, so the Prefect UI shows the order).
        """
        runnable = task_.with_options(result_storage=self.results, retries=self._retries_for(task_.name))
        futures = []
        previous = None
        for kwargs in calls:
            serial = one_at_a_time(kwargs)
            future = runnable.submit(**kwargs, wait_for=[previous] if serial and previous is not None else None)
            previous = future if serial else previous
            futures.append(future)
        results: list[R] = []
        for kwargs, future in zip(calls, futures, strict=True):
            result: R = future.result()
            cached = future.state.name == "Cached"
            if cached and not present(result):
                result = runnable.with_options(refresh_cache=True)(**kwargs)
                cached = False
            timing.cached = cached if len(results) == 0 else (timing.cached and cached)
            results.append(result)
        return results

    def _retries_for(self, task_name: str) -> int:
        retries = self.config.retries
        return {"anonymize": retries.anonymize, "extract-masks": retries.extract_masks}.get(task_name, retries.write)

    def public(self, study_instance_uid: str) -> str:
        return public_study_uid(study_instance_uid, self.config.anonymization, self.secret)

    def scrub(self, text: str, files: list[Path]) -> str:
        """``text`` without patient identifiers (and, in full mode, with original UIDs mapped)."""
        anonymization = self.config.anonymization
        if not anonymization.enabled:
            return text
        identifiers, uids = study_identifier_sets(files, anonymization)
        if anonymization.mode == "full":
            for uid in sorted(uids, key=len, reverse=True):  # longest first: a UID may prefix another
                text = text.replace(uid, map_uid(uid, self.secret))
        return scrub_text(text, identifiers)


def _quarantine_pointer(anonymization: AnonymizationConfig, entry_id: str) -> str:
    """Where the failed study is; in full mode without its id, which is the received StudyInstanceUID."""
    if anonymization.enabled and anonymization.mode == "full":
        return "quarantined; `netrt quarantine list` shows it by this study UID"
    return f"quarantined: {entry_id}"


def _locate(layout: DataLayout, source: Path) -> Path | None:
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


def _retried_run(layout: DataLayout, entry_id: str) -> str | None:
    """The flow run whose failure put this study in quarantine, when this run is its retry."""
    try:
        entry = read_entry(layout, entry_id)
    except Exception:  # no entry (the usual case), or an unreadable one: not a quarantine retry
        return None
    return entry.flow_run_id if entry.status == "retrying" else None


def _files_of(source: Path, study_instance_uid: str | None) -> list[Path]:
    """The failed study's own files (not its neighbours' in a shared folder); every file when unsure."""
    try:
        return list(find_study(source, study_instance_uid).files)
    except Exception:  # the study may be unreadable: that may be why it failed
        if source.is_dir():
            return [p for p in sorted(source.rglob("*")) if p.is_file()]
        return [source] if source.exists() else []


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, DeliveryError):
        return exc.retryable
    if isinstance(exc, StudyFailedError | ScrubbedError):
        return exc.retryable
    return isinstance(exc, OSError)


@flow(name="process-study", flow_run_name=_run_name)
def process_study(
    study_dir: str, config_file: str | None = None, study_instance_uid: str | None = None
) -> dict[str, Any]:
    """Validate, anonymize, mask, write each configured plane, deliver; return the run summary.

    Parameters: ``study_dir``, the folder holding the study's files (``<data_dir>/studies/<uid>``
    for received studies; a study there moves to ``processed/`` on success and to ``quarantine/``
    on failure); ``config_file``, NETRT's YAML (null: defaults); ``study_instance_uid``, which study
    in ``study_dir`` (null: the only one).
    """
    config = load_config(config_file)
    layout = DataLayout.from_data_dir(config.paths.data_dir).create()
    anonymization = config.anonymization
    secret = load_or_create_secret(anonymization, layout.root) if anonymization.enabled else b""
    transactions = TransactionLog(layout.transaction_log)
    run_id = str(flow_run.id) if flow_run.id else None
    label = study_instance_uid if study_instance_uid and is_valid_uid(study_instance_uid) else None
    if label is None and Path(study_dir).resolve().parent == layout.studies and is_valid_uid(Path(study_dir).name):
        label = Path(study_dir).name  # a received study's folder is named by its StudyInstanceUID
    report = StudyReport(study="unknown", flow_run_id=run_id)
    run = _Run(config, layout, secret, report)
    report.anonymization = f"{anonymization.mode} mode" if anonymization.enabled else "off"
    if label is not None:
        report.study = run.public(label)
    transactions.record("flow_run_started", study_instance_uid=report.study, flow_run_id=run_id)
    located = _locate(layout, Path(study_dir))
    if located is None:
        transactions.record("flow_run_skipped", study_instance_uid=report.study, flow_run_id=run_id)
        get_run_logger().info("the study was re-opened by new instances; its next sealing gets a new run")
        return {"study_instance_uid": report.study, "skipped": "re-opened", "flow_run_id": run_id}
    source = located
    run.continuing_runs.add(_retried_run(layout, entry_id_for(layout, source, label)))
    _SCRUBBER.set(lambda text: run.scrub(text, _files_of(source, study_instance_uid)))
    try:
        summary = _process(run, source, study_instance_uid, transactions)
    except Exception as exc:
        files = _files_of(source, study_instance_uid)
        message = run.scrub(str(exc) or type(exc).__name__, files)
        retryable = _is_retryable(exc)
        entry = quarantine_study(
            layout,
            source,
            files,
            entry_id=entry_id_for(layout, source, label),
            stage=run.stage,
            error=message,
            retryable=retryable,
            flow_run_id=run_id,
            study=report.study,
            details={"destinations": report.destinations} if report.destinations else None,
        )
        report.failed_stage, report.error, report.quarantine_id = run.stage, message, entry.id
        transactions.record(
            "quarantined",
            study_instance_uid=report.study,
            flow_run_id=run_id,
            stage=run.stage,
            reason=message,
            attempts=entry.attempts,
            quarantine_id=entry.id if not anonymization.enabled or anonymization.mode != "full" else None,
        )
        _publish(run, None)
        raise StudyFailedError(
            f"study {report.study} failed at {run.stage}: {message} ({_quarantine_pointer(anonymization, entry.id)})",
            run.stage,
            entry.id,
            retryable,
        ) from None
    _finish(run, source, label, transactions)
    return summary


def _process(run: _Run, source: Path, study_instance_uid: str | None, transactions: TransactionLog) -> dict[str, Any]:
    config, layout, report = run.config, run.layout, run.report
    with run.timed("validate"):
        try:
            original, fingerprint = validate.with_options(retries=config.retries.validate_)(
                str(source), study_instance_uid
            )
        except NoStructureSetError:
            if config.processing.images_without_rtstruct != "pass_through":
                raise
            original = None
    if original is None:
        return _pass_through(run, source, study_instance_uid, transactions)
    report.study = run.public(original.study_instance_uid)
    _add_run_tags(report.flow_run_id, f"modality:{original.images.modality}")
    work = layout.study_dir(layout.work, report.study)

    anonymization = config.anonymization
    anon_key = content_key(
        "anonymize",
        fingerprint,
        anonymization.model_dump(mode="json"),
        hashlib.sha256(run.secret).hexdigest(),
    )
    # With `source` routing, the files that travel with the study are anonymized with it, and
    # their content enters that step's key (they are not part of the study's fingerprint).
    forward = any(d.outputs is not None and "source" in d.outputs for d in config.effective_destinations())
    step_key = content_key(anon_key, files_fingerprint(travelling_files(original))) if forward else anon_key
    with run.timed("anonymize") as timing:
        anonymized = run.cached_call(
            anonymize,
            timing,
            result_files_intact,
            study=original,
            anonymization=anonymization,
            data_dir=str(layout.root),
            out_dir=str(work / f"anonymized-{anon_key[:12]}"),
            cache_key=step_key if anonymization.enabled else None,
            forward=forward,
        )
    study = anonymized.study if anonymization.enabled else original
    # What was received (files set aside or unreadable), not what the anonymized copies show.
    report.warnings += _scrubbed(run, original.warnings, [*original.images.files, original.rtstruct_file])

    mask_key = content_key("mask", anon_key, settings_key(config.processing))
    keyed_work = work / mask_key[:12]
    with run.timed("extract-masks") as timing:
        masks = run.cached_call(
            extract_masks,
            timing,
            result_files_intact,
            study=study,
            processing=config.processing,
            work_dir=str(keyed_work),
            cache_key=mask_key,
        )
    report.rois = [{"name": r.name, "kept": r.kept, "voxels": r.voxel_count, "reason": r.reason} for r in masks.rois]
    report.warnings += list(masks.warnings)

    with run.timed("write") as timing:
        calls = [
            {
                "study": study,
                "masks": masks,
                "kind": kind,
                "plane": plane,
                "label": output_label(kind, plane),
                "processing": config.processing,
                "work_dir": str(keyed_work),
                "cache_key": content_key("write", mask_key, kind, plane, shaping_settings(config.processing)),
            }
            for kind, plane in output_calls(config.processing)
        ]
        # Axial series run beside the rest; everything else one after the other, because each
        # reformat holds the whole source image while it streams (1000 slices of 512x512: 500 MiB
        # each) and the SEG its stacked segments.
        per_call = run.cached_map(
            write_output_series,
            timing,
            result_files_intact,
            calls,
            one_at_a_time=lambda call: call["plane"] != "axial",
        )
        written = [series for call_series in per_call for series in call_series]
    report.series = [
        {
            "kind": s.kind,
            "label": output_label(s.kind, s.plane),
            "plane": s.plane,
            "burn_in": s.burn_in,
            "series_instance_uid": s.series_instance_uid,
            "instances": len(s.files),
        }
        for s in written
    ]
    report.warnings += list(dict.fromkeys(note for s in written for note in s.notes))  # once, not per plane
    with run.timed("preview") as timing:
        report.preview_path = str(
            run.cached_call(
                preview,
                timing,
                result_files_intact,
                study=study,
                masks=masks,
                path=str(keyed_work / "preview.png"),
                cache_key=content_key("preview", mask_key),
            ).path
        )
    transactions.record(
        "processed",
        study_instance_uid=report.study,
        flow_run_id=report.flow_run_id,
        counts={output_label(s.kind, s.plane): len(s.files) for s in written},
    )

    made: dict[str, list[Path]] = {}
    for series in written:
        made.setdefault(series.kind, []).extend(series.files)
    made["source"] = [*study.images.files, study.rtstruct_file, *anonymized.forwarded]
    with run.timed("deliver"):
        _deliver_all(run, route_files(config.effective_destinations(), made), transactions)
    return {
        "study_instance_uid": report.study,
        "rois_kept": masks.kept,
        "rois_ignored": masks.ignored,
        "mask_voxels": masks.voxel_count,
        "warnings": report.warnings,
        "series": report.series,
        "destinations": report.destinations,
        "stages": report.as_dict()["stages"],
        "preview": report.preview_path,
        "flow_run_id": report.flow_run_id,
    }


def _scrubbed(run: _Run, warnings: tuple[str, ...], files: list[Path]) -> list[str]:
    """Warnings about the received files, scrubbed of patient data when anonymization is on."""
    if not warnings or not run.config.anonymization.enabled:
        return list(warnings)
    return [run.scrub(warning, files) for warning in warnings]


def _pass_through(
    run: _Run, source: Path, study_instance_uid: str | None, transactions: TransactionLog
) -> dict[str, Any]:
    """A study without an RTSTRUCT, with ``images_without_rtstruct: pass_through``: deliver its images as
    they are (anonymized as configured), no overlay; the summary says so."""
    config, layout, report = run.config, run.layout, run.report
    with run.timed("validate"):
        images = validate_images_only.with_options(retries=config.retries.validate_)(str(source), study_instance_uid)
    report.study = run.public(images.study_instance_uid)
    work = layout.study_dir(layout.work, report.study) / "pass-through"
    anonymization = config.anonymization
    with run.timed("anonymize"):
        passed = pass_through.with_options(retries=config.retries.anonymize)(
            images,
            anonymization,
            str(layout.root),
            str(work / content_key(images.files, anonymization.model_dump(mode="json"))[:12]),
        )
    report.warnings += _scrubbed(run, passed.warnings, list(images.files))
    transactions.record(
        "processed",
        study_instance_uid=report.study,
        flow_run_id=report.flow_run_id,
        counts={"pass-through": len(passed.files)},
    )
    with run.timed("deliver"):
        files = list(passed.files)
        _deliver_all(run, {d.name: files for d in config.effective_destinations()}, transactions)
    return {
        "study_instance_uid": report.study,
        "rois_kept": [],
        "rois_ignored": [],
        "mask_voxels": 0,
        "passed_through": len(passed.files),
        "warnings": report.warnings,
        "series": report.series,
        "destinations": report.destinations,
        "stages": report.as_dict()["stages"],
        "preview": None,
        "flow_run_id": report.flow_run_id,
    }


def _add_run_tags(flow_run_id: str | None, *tags: str) -> None:
    """Tag the running flow run (modality is known only once the study is read); never PHI."""
    if flow_run_id is None:
        return
    from prefect import get_client

    with get_client(sync_client=True) as client:
        current = client.read_flow_run(UUID(flow_run_id))
        client.update_flow_run(UUID(flow_run_id), tags=sorted({*current.tags, *tags}))


def _deliver_all(run: _Run, routes: dict[str, list[Path]], transactions: TransactionLog) -> None:
    """Deliver to every destination at once its files (``routes``: destination name -> files);
    one failing does not stop or repeat the others.

    Within one delivery episode (:mod:`netrt.episodes`) a destination that already holds these
    files is not sent them again, and a failed one resumes from its acknowledgements; a new run
    opens a new episode and sends everything.
    """
    config, report = run.config, run.report
    episode = begin_delivery(
        run.layout.study_dir(run.layout.work, report.study) / "delivery", report.flow_run_id, run.continuing_runs
    )
    run_tag = f"{report.flow_run_id}#{flow_run.run_count}"
    futures = []
    for destination in config.effective_destinations():
        files = routes[destination.name]
        digest = files_digest(files)
        earlier_delivery = episode.delivered_earlier(destination.name, digest)
        if earlier_delivery is not None:
            detail = f"delivered earlier in this delivery (flow run {earlier_delivery.get('run')}); not sent again"
            report.destinations.append(
                {
                    "name": destination.name,
                    "ok": True,
                    "instances": len(files),
                    "stored": 0,
                    "earlier": len(files),
                    "detail": detail,
                }
            )
            transactions.record(
                "delivery_skipped",
                study_instance_uid=report.study,
                destination=destination.name,
                flow_run_id=report.flow_run_id,
                reason=detail,
            )
            continue
        calling = getattr(destination, "calling_ae_title", None) or config.listener.ae_title
        retries = destination.retries
        task_ = deliver.with_options(
            retries=retries, retry_delay_seconds=_backoff(destination.retry_delay_seconds, retries) or 0
        )
        progress = episode.progress_file(destination.name)
        # Where a storage commitment report on a new association reaches this node (netrt.commitment).
        route = ReportRoute.from_listener(run.layout.root, config.listener)
        future = task_.submit(destination, files, calling, str(progress), run_tag, route)
        futures.append((destination, files, digest, future))
    failures: list[str] = []
    all_retryable = True
    for destination, files, digest, future in futures:
        try:
            outcome: DeliveryOutcome = future.result()
        except Exception as exc:
            retryable = _is_retryable(exc)
            all_retryable = all_retryable and retryable
            detail = str(exc) if isinstance(exc, DeliveryError) else f"destination {destination.name!r}: {exc}"
            failures.append(detail)
            stored = getattr(exc, "stored", None) or 0
            earlier = getattr(exc, "earlier", None) or 0
            episode.mark_failed(destination.name, report.flow_run_id, run.scrub(detail, files))
            report.destinations.append(
                {
                    "name": destination.name,
                    "ok": False,
                    "instances": len(files),
                    "stored": stored,
                    "earlier": earlier,
                    "detail": detail,
                }
            )
            transactions.record(
                "delivery_failed",
                study_instance_uid=report.study,
                destination=destination.name,
                flow_run_id=report.flow_run_id,
                reason=run.scrub(detail, files),
                counts={"instances": len(files), "stored_this_run": stored, "stored_earlier": earlier},
            )
            continue
        episode.mark_delivered(outcome.destination, digest, report.flow_run_id, outcome.instances)
        report.destinations.append(
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
        transactions.record(
            "delivered",
            study_instance_uid=report.study,
            destination=outcome.destination,
            flow_run_id=report.flow_run_id,
            counts={
                "instances": outcome.instances,
                "stored_this_run": outcome.stored,
                "stored_earlier": outcome.earlier,
                **({"committed": outcome.committed} if outcome.committed is not None else {}),
            },
        )
    episode.close_if_complete(d.name for d in config.effective_destinations())
    if failures:
        raise StudyFailedError(
            "delivery failed: " + "; ".join(failures), "deliver", quarantine_id=None, retryable=all_retryable
        )


def _finish(run: _Run, source: Path, label: str | None, transactions: TransactionLog) -> None:
    """After success: move a received study on to processed/, release a quarantine entry, publish.

    An earlier processed/<id> (the same study processed before) is set aside whole, never merged
    into this run's copy; only a study this run moved from studies/ to processed/ releases its entry.
    """
    layout = run.layout
    resolved = source.resolve()
    entry_id = entry_id_for(layout, source, label)
    processed = None
    if resolved.parent == layout.studies and resolved.is_dir():
        processed = layout.processed / resolved.name
        earlier = move_folder_whole(resolved, processed)
        if earlier is not None:
            transactions.record(
                "earlier_processed_copy_kept",
                study_instance_uid=run.report.study,
                flow_run_id=run.report.flow_run_id,
                suffix=earlier.name.removeprefix(resolved.name),  # the folder name itself is the received UID
            )
    try:
        entry = read_entry(layout, entry_id)
    except Exception:
        entry = None
    if entry is not None and processed is not None and release(layout, entry_id, processed=processed):
        transactions.record(
            "released_from_quarantine",
            study_instance_uid=run.report.study,
            flow_run_id=run.report.flow_run_id,
            attempts=entry.attempts,
        )
    _publish(run, Path(run.report.preview_path) if run.report.preview_path else None)


def _publish(run: _Run, preview_png: Path | None) -> None:
    """Markdown summary and PNG preview as keyed artifacts (history per study), and files under the data dir."""
    report = run.report
    markdown = render_markdown(report)
    key = f"study-{short_study_id(report.study)}"
    folder = run.layout.study_dir(run.layout.work, report.study) if is_valid_uid(report.study) else run.layout.work
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.md").write_text(markdown, encoding="utf-8")
    create_markdown_artifact(markdown, key=f"{key}-summary", description=f"NETRT run summary of study {report.study}")
    if preview_png is not None and preview_png.exists():
        encoded = base64.b64encode(preview_png.read_bytes()).decode("ascii")
        create_image_artifact(
            image_url=f"data:image/png;base64,{encoded}",
            key=f"{key}-preview",
            description=f"Axial, coronal and sagittal mid-slices with the mask in red; file: {preview_png}",
        )
