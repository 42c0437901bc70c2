"""The `process-study` flow: one run per study, each step a thin task over `netrt.pipeline`.

validate -> anonymize -> extract-masks -> write-<plane> (axial beside coronal, then sagittal) -> preview
-> deliver-<name> (concurrently, one per destination). Tasks exchange paths, UIDs and small reports only.
With ``processing.structure_sets: each`` the study is split into one part per RTSTRUCT on its
series (:func:`netrt.pipeline.plan_structure_sets`): extract-masks and every write task run once per
part, keyed and labelled by it (``write-axial [PLAN_A]``); each part gets its own preview, the newest first.

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
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.runtime import flow_run
from prefect.states import State

from netrt.anonymize import load_or_create_secret
from netrt.commitment import ReportRoute
from netrt.config import (
    AnonymizationConfig,
    DicomDestination,
    FolderDestination,
    ProcessingConfig,
    load_config,
)
from netrt.deliver import DeliveryOutcome, deliver_to_folder
from netrt.errors import DeliveryError, NetrtError, ScrubbedError
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
    plan_structure_sets,
    preview_step,
    result_files_intact,
    structure_set_files,
    structure_set_sentences,
    study_fingerprint,
    travelling_files,
    write_output,
)
from netrt.quarantine import entry_id_for
from netrt.report import StageTiming, StudyReport, render_markdown, roi_rows
from netrt.runbook import DeliveryBook, StudyRun, locate_study, retried_run, study_files_of
from netrt.stamps import FileStamp, stamp_file
from netrt.study import (
    ImagesOnlyStudy,
    LoadedStudy,
    NoStructureSetError,
    find_images_only,
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
def validate(study_dir: str, study_instance_uid: str | None, structure_sets: str = "latest") -> tuple[LoadedStudy, str]:
    with _scrubbed_errors():
        study = load_found_study(Path(study_dir), study_instance_uid, structure_sets)
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
def preview(study: LoadedStudy, masks: MaskStepResult, path: str, disclaimer: str, cache_key: str) -> FileStamp:
    with _scrubbed_errors():
        return stamp_file(preview_step(study, masks, Path(path), disclaimer).path)


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
    link_from: str | None = None,
) -> DeliveryOutcome:
    with _scrubbed_errors():
        progress = _Progress(f"instances stored at {destination.name}")
        if isinstance(destination, FolderDestination):
            own = Path(link_from) if link_from is not None else None
            outcome = deliver_to_folder(destination.name, destination.path, files, progress.update, own)
        else:
            from netrt.send import send_to_dicom

            outcome = send_to_dicom(
                destination,
                files,
                calling_ae_title=calling_ae_title,
                progress_file=Path(progress_file),
                run=run_tag,
                report_route=report_route,
                on_stored=progress.update,
            )
        progress.finish(outcome.instances, outcome.instances)
        return outcome


class _Progress:
    """A progress artifact of a long stage in the Prefect UI, updated at most every half second
    (each update is an API call) and once at the end with what really happened."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.artifact = create_progress_artifact(0.0, description=f"{what}: starting")
        self.updated = 0.0

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.updated < 0.5 and done < total:
            return
        self.updated = now
        self.finish(done, total)

    def finish(self, done: int, total: int) -> None:
        percent = 100.0 * done / total if total else 100.0
        update_progress_artifact(self.artifact, percent, description=f"{self.what}: {done} of {total}")


# --- the flow ---------------------------------------------------------------------------------


def _backoff(first: float, retries: int) -> list[float]:
    return [first * 2**attempt for attempt in range(retries)]


class _Run(StudyRun):
    """:class:`netrt.runbook.StudyRun` plus what is Prefect's: cached task calls and their retries."""

    @property
    def results(self) -> Path:
        return self.layout.cache / "results"  # a Path: Prefect stores results there without a saved block

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
        progress: _Progress | None = None,
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
            if progress is not None:
                progress.update(len(results), len(calls))
        if progress is not None:
            progress.finish(len(results), len(calls))
        return results

    def _retries_for(self, task_name: str) -> int:
        retries = self.config.retries
        return {"anonymize": retries.anonymize, "extract-masks": retries.extract_masks}.get(task_name, retries.write)


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
    run = _Run(config, layout, secret, report, transactions)
    report.anonymization = f"{anonymization.mode} mode" if anonymization.enabled else "off"
    if label is not None:
        report.study = run.public(label)
    run.record("flow_run_started")
    located = locate_study(layout, Path(study_dir))
    if located is None:
        run.record("flow_run_skipped")
        get_run_logger().info("the study was re-opened by new instances; its next sealing gets a new run")
        return {"study_instance_uid": report.study, "skipped": "re-opened", "flow_run_id": run_id}
    source = located
    run.continuing_runs.add(retried_run(layout, entry_id_for(layout, source, label)))
    _SCRUBBER.set(lambda text: run.scrub(text, study_files_of(source, study_instance_uid)))
    try:
        summary = _process(run, source, study_instance_uid)
    except Exception as exc:
        failure = run.fail(exc, source, study_instance_uid, label)
        _publish(run, [])
        raise failure from None
    run.finish(source, label)
    _publish(run, [Path(path) for _, path in run.report.previews])
    return summary


def _process(run: _Run, source: Path, study_instance_uid: str | None) -> dict[str, Any]:
    config, layout, report = run.config, run.layout, run.report
    with run.timed("validate"):
        try:
            original, fingerprint = validate.with_options(retries=config.retries.validate_)(
                str(source), study_instance_uid, config.processing.structure_sets
            )
        except NoStructureSetError:
            if config.processing.images_without_rtstruct != "pass_through":
                raise
            original = None
    if original is None:
        return _pass_through(run, source, study_instance_uid)
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
    received_files = [*original.images.files, *structure_set_files(original)]
    # one scrub for all (each reads every header): the loader's warnings and the structure sets' names
    sentences = structure_set_sentences(study)
    scrubbed = run.scrubbed([*original.warnings, *sentences], received_files)
    report.warnings += scrubbed[: len(original.warnings)]
    report.structure_sets = scrubbed[len(original.warnings) :]

    # One part per structure set with `each` (its own masks and series), else the study itself.
    parts = plan_structure_sets(study, anon_key, config.processing)
    with run.timed("extract-masks") as timing:
        part_masks = run.cached_map(
            extract_masks,
            timing,
            result_files_intact,
            [
                {
                    "study": part.study,
                    "processing": config.processing,
                    "work_dir": str(work / part.key[:12]),
                    "cache_key": part.key,
                }
                for part in parts
            ],
            one_at_a_time=lambda _: True,  # each holds a mask of the whole grid
        )
    spacing = study.images.geometry.spacing
    for part, masks in zip(parts, part_masks, strict=True):
        colors = {info.number: info.color for info in masks.roi_infos}
        rows = roi_rows(masks.rois, colors, float(spacing[0] * spacing[1] * spacing[2]))
        report.rois += [{**row, "name": part.prefix + row["name"]} for row in rows]
        # merge's warnings name the received files (the copies keep their names): scrubbed like the loader's
        notes = run.scrubbed(masks.warnings, received_files) if len(study.structure_sets) > 1 else masks.warnings
        report.warnings += [part.prefix + w for w in notes]

    with run.timed("write") as timing:
        calls = [
            {
                "study": part.study,
                "masks": masks,
                "kind": kind,
                "plane": plane,
                "label": output_label(kind, plane) + part.suffix,
                "processing": config.processing,
                "work_dir": str(work / part.key[:12]),
                "cache_key": content_key("write", part.key, kind, plane, shaping_settings(config.processing)),
            }
            for part, masks in zip(parts, part_masks, strict=True)
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
            progress=_Progress("series written"),
        )
        labelled = [
            (call["label"], series) for call, call_series in zip(calls, per_call, strict=True) for series in call_series
        ]
        written = [series for _, series in labelled]
    report.series = [
        {
            "kind": s.kind,
            "label": label,
            "plane": s.plane,
            "burn_in": s.burn_in,
            "series_instance_uid": s.series_instance_uid,
            "instances": len(s.files),
        }
        for label, s in labelled
    ]
    report.warnings += list(dict.fromkeys(note for s in written for note in s.notes))  # once, not per plane
    with run.timed("preview") as timing:  # one per structure set with `each`, the newest first
        previews = run.cached_map(
            preview,
            timing,
            result_files_intact,
            [
                {
                    "study": part.study,
                    "masks": masks,
                    "path": str(work / part.key[:12] / "preview.png"),
                    "disclaimer": config.processing.disclaimer,
                    "cache_key": content_key("preview", part.key, config.processing.disclaimer),
                }
                for part, masks in zip(parts, part_masks, strict=True)
            ],
        )
    report.previews = [(part.name, str(stamp.path)) for part, stamp in zip(parts, previews, strict=True)]
    report.preview_path = report.previews[0][1]
    run.record(
        "processed",
        counts={label: len(s.files) for label, s in labelled},
        structure_sets=[info.sop_instance_uid for info in study.structure_sets],
    )

    made: dict[str, list[Path]] = {}
    for series in written:
        made.setdefault(series.kind, []).extend(series.files)
    made["source"] = [*study.images.files, *structure_set_files(study), *anonymized.forwarded]
    with run.timed("deliver"):
        _deliver_all(run, route_files(config.effective_destinations(), made))
    return {
        "study_instance_uid": report.study,
        "rois_kept": [part.prefix + name for part, masks in zip(parts, part_masks, strict=True) for name in masks.kept],
        "rois_ignored": [
            part.prefix + name for part, masks in zip(parts, part_masks, strict=True) for name in masks.ignored
        ],
        "mask_voxels": sum(masks.voxel_count for masks in part_masks),
        "structure_sets": report.structure_sets,
        "warnings": report.warnings,
        "series": report.series,
        "destinations": report.destinations,
        "stages": report.as_dict()["stages"],
        "preview": report.preview_path,
        "previews": [{"structure_set": name, "path": path} for name, path in report.previews],
        "flow_run_id": report.flow_run_id,
    }


def _pass_through(run: _Run, source: Path, study_instance_uid: str | None) -> dict[str, Any]:
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
    report.warnings += run.scrubbed(passed.warnings, list(images.files))
    run.record("processed", counts={"pass-through": len(passed.files)})
    with run.timed("deliver"):
        files = list(passed.files)
        _deliver_all(run, {d.name: files for d in config.effective_destinations()})
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


def _deliver_all(run: _Run, routes: dict[str, list[Path]]) -> None:
    """Deliver to every destination at once its files (``routes``: destination name -> files);
    one failing does not stop or repeat the others.

    Within one delivery episode (:mod:`netrt.episodes`) a destination that already holds these
    files is not sent them again, and a failed one resumes from its acknowledgements; a new run
    opens a new episode and sends everything (the bookkeeping: :class:`netrt.runbook.DeliveryBook`).
    """
    config = run.config
    destinations = config.effective_destinations()
    book = DeliveryBook(run, routes)
    run_tag = f"{run.report.flow_run_id}#{flow_run.run_count}"
    # Where a storage commitment report on a new association reaches this node (netrt.commitment).
    route = ReportRoute.from_listener(run.layout.root, config.listener)
    futures = []
    for destination in destinations:
        if book.delivered_earlier(destination):
            continue
        calling = getattr(destination, "calling_ae_title", None) or config.listener.ae_title
        retries = destination.retries
        task_ = deliver.with_options(
            retries=retries, retry_delay_seconds=_backoff(destination.retry_delay_seconds, retries) or 0
        )
        progress = str(book.progress_file(destination))
        futures.append(
            (
                destination,
                # Derived files under the work dir may be hard-linked into folder destinations.
                task_.submit(
                    destination, book.files(destination), calling, progress, run_tag, route, str(run.layout.work)
                ),
            )
        )
    for destination, future in futures:
        try:
            outcome: DeliveryOutcome = future.result()
        except Exception as exc:
            book.failed(destination, exc)
        else:
            book.succeeded(destination, outcome)
    book.close(destinations)


def _publish(run: _Run, previews: list[Path]) -> None:
    """Markdown summary and PNG preview as keyed artifacts (history per study), and files under the data dir."""
    report = run.report
    markdown = render_markdown(report)
    key = f"study-{short_study_id(report.study)}"
    folder = run.layout.study_dir(run.layout.work, report.study) if is_valid_uid(report.study) else run.layout.work
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.md").write_text(markdown, encoding="utf-8")
    create_markdown_artifact(markdown, key=f"{key}-summary", description=f"NETRT run summary of study {report.study}")
    if report.rois:
        create_table_artifact(
            report.rois, key=f"{key}-rois", description=f"ROIs of study {report.study}: kept, voxels, volume, colour"
        )
    names = [name for name, _ in report.previews]
    for number, preview_png in enumerate(previews, start=1):
        if not preview_png.exists():
            continue
        encoded = base64.b64encode(preview_png.read_bytes()).decode("ascii")
        of = f" of structure set {names[number - 1]}" if number <= len(names) and names[number - 1] else ""
        create_image_artifact(
            image_url=f"data:image/png;base64,{encoded}",
            key=f"{key}-preview" if number == 1 else f"{key}-preview-{number}",
            description=(
                f"Axial, coronal and sagittal mid-slices{of}, each ROI outlined in its colour, with a legend; "
                f"file: {preview_png}"
            ),
        )
