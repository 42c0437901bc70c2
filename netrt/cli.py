"""`netrt`: the command-line face of NETRT.

This is the one module of the ``netrt`` package that wires the domain to orchestration
(``flows/``) and to the listener (``listener/``); those imports are made inside the commands
that need them, after Prefect's environment has been set from NETRT's config.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from netrt import __version__
from netrt.config import NetrtConfig, dump_config, load_config
from netrt.errors import NetrtError, StudyFailedError
from netrt.layout import DataLayout
from netrt.logs import TransactionLog, log_unexpected, route_library_logs, setup_logging
from netrt.report import delivery_line
from netrt.terminal import StudyProgress, progress_wanted

if TYPE_CHECKING:
    from flows.local_server import ServerRecord
    from listener.completion import SealedStudy
    from listener.service import ListenerService
    from netrt.config import DicomDestination

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _config(args: argparse.Namespace) -> NetrtConfig:
    return load_config(getattr(args, "config", None))


def _apply_prefect_environment(config: NetrtConfig, *, with_api_url: bool = True) -> None:
    """Set Prefect's settings from NETRT's config before anything imports Prefect."""
    from netrt.prefect_env import prefect_environment

    os.environ.update(prefect_environment(config, with_api_url=with_api_url))


# --- config ---------------------------------------------------------------------------------


def cmd_config_check(args: argparse.Namespace) -> int:
    config = load_config(args.file)
    print(f"{args.file}: valid")
    for note in config.notes():
        print(f"  note: {note}")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(dump_config(load_config(args.file)))
    return EXIT_OK


def cmd_config_get(args: argparse.Namespace) -> int:
    """Print one effective config value (strings bare, anything else as JSON): for scripts and prefect.yaml."""
    import json

    value: object = load_config(args.file).model_dump(mode="json", by_alias=True)
    for part in args.key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise NetrtError(f"{args.key}: no such config key (see `netrt config show`)")
        value = value[part]
    print(value if isinstance(value, str) else json.dumps(value))
    return EXIT_OK


def _own_listener(config: NetrtConfig) -> DicomDestination:
    """This node's own listener as a C-ECHO target (the container HEALTHCHECK); plain TCP only."""
    from netrt.config import DicomDestination

    listener = config.listener
    if listener.tls.enabled:
        raise NetrtError("netrt echo --self speaks plain TCP, but listener.tls.enabled is true; use echoscu +tls")
    host = "127.0.0.1" if listener.host in ("0.0.0.0", "::", "") else listener.host
    return DicomDestination(name="self", type="dicom", ae_title=listener.ae_title, host=host, port=listener.port)


def cmd_echo(args: argparse.Namespace) -> int:
    """C-ECHO a configured dicom destination, as set-up check; exit 1 with the reason when it fails."""
    from netrt.config import DicomDestination
    from netrt.send import echo_destination

    config = _config(args)
    if args.self_ == (args.destination is not None):
        raise NetrtError("give either a DESTINATION or --self")
    destinations = {d.name: d for d in config.effective_destinations()}
    if args.self_:
        own = _own_listener(config)
        allowed = config.listener.allowed_calling_ae_titles
        own.calling_ae_title = allowed[0] if allowed else "NETRT_HEALTH"
        destinations = {own.name: own}
    destination = destinations.get(args.destination or "self")
    if not isinstance(destination, DicomDestination):
        names = ", ".join(name for name, d in destinations.items() if isinstance(d, DicomDestination)) or "none"
        what = "is a folder destination" if destination is not None else "is not configured"
        raise NetrtError(f"destination {args.destination!r} {what}; dicom destinations: {names}")
    calling = destination.calling_ae_title or config.listener.ae_title
    seconds = echo_destination(destination, calling_ae_title=calling)
    print(
        f"{destination.name}: C-ECHO ok from {destination.ae_title}@{destination.host}:{destination.port} "
        f"(calling AE {calling}) in {seconds * 1000:.1f} ms"
    )
    return EXIT_OK


# --- doctor ---------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    """One line per check of this machine and config, each failure with its fix; exit 0 only when all pass."""
    from netrt.doctor import run_checks
    from netrt.send import echo_destination

    def echo(destination: DicomDestination, calling: str) -> float:
        return echo_destination(destination, calling_ae_title=calling)

    def local_server(config: NetrtConfig) -> str | None:
        from flows.local_server import read_record

        record = read_record(DataLayout.from_data_dir(config.paths.data_dir).prefect_home)
        return None if record is None else f"the data dir's background server, pid {record.pid}"

    checks = run_checks(args.config, echo, local_server)
    for check in checks:
        print(check.line(), flush=True)
    failed = [check.name for check in checks if check.failed]
    if failed:
        print(f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}")
        return EXIT_FAILURE
    print(f"all {len(checks)} checks passed")
    return EXIT_OK


# --- phantom --------------------------------------------------------------------------------


def cmd_phantom(args: argparse.Namespace) -> int:
    from netrt.phantom import PhantomSpec, write_phantom

    spec = PhantomSpec(
        rows=args.rows,
        columns=args.columns,
        pixel_spacing=(args.pixel_spacing[0], args.pixel_spacing[1]),
        slice_spacing=args.slice_spacing,
        slices=args.slices,
        orientation="oblique" if args.oblique else "axial",
        reverse_order=args.reverse_order,
        extra_spheres=args.extra_spheres,
        seed=args.seed,
        patient_name=args.patient_name,
        patient_id=args.patient_id,
        multiframe="legacy" if args.multiframe else "",
    )
    manifest = write_phantom(spec, Path(args.out_dir))
    print(f"study {manifest.study_instance_uid}")
    images = (
        f"one Legacy Converted Enhanced CT file of {spec.slice_count} frames"
        if args.multiframe
        else f"{len(manifest.image_files)} CT slices"
    )
    print(f"  {images} and RTSTRUCT in {Path(args.out_dir) / 'dicom'}")
    for roi in manifest.rois:
        print(f"  ROI {roi.name}: {roi.shape}, {roi.analytic_volume_mm3:.0f} mm3, {roi.truth_voxel_count} voxels")
    print(f"  ground truth: {Path(args.out_dir) / 'truth'}")
    return EXIT_OK


# --- process --------------------------------------------------------------------------------


def _prepare_flow_runs(config: NetrtConfig) -> ServerRecord | None:
    """Point Prefect at the API flows run against, before Prefect is imported.

    That is ``prefect.api_url`` when set; else the data dir's local server: its background server
    when one runs (started by an earlier command), else a server answering on ``prefect.server_port``
    (a running `netrt serve`), else a background server launched now and left running for later
    commands (`netrt server stop` ends it). Returns the background server's record (None for the
    others); it may still be starting: :func:`_one_off_runs` waits for it, after the imports.
    """
    _apply_prefect_environment(config)
    if config.prefect.api_url is not None:
        return None
    from flows.local_server import is_healthy, launch_background_server, read_record, serving_home
    from netrt.prefect_env import local_api_url, prefect_environment

    layout = DataLayout.from_data_dir(config.paths.data_dir)
    record = read_record(layout.prefect_home)
    if record is None and is_healthy(local_api_url(config), timeout=1.0):
        # A server of this data dir (`netrt serve`) is used; another data dir's server on the same
        # port is not: its database, UI and history belong to that node, not this one.
        home = serving_home(local_api_url(config))
        if home is not None and home.resolve() != layout.prefect_home.resolve():
            raise NetrtError(
                f"port {config.prefect.server_port} answers as the Prefect server of another data dir ({home}); "
                "set prefect.server_port to a free port, or stop that server (`netrt server stop` with its config)"
            )
        return None
    record, launched = launch_background_server(
        prefect_environment(config),
        local_api_url(config),
        config.prefect.server_port,
        layout.logs / "prefect-server.log",
        config.prefect.local_server_idle_minutes,
    )
    if launched:
        print(
            f"starting the local Prefect server in the background (UI {record.ui_url}); it stays up for the "
            "next commands, `netrt server stop` ends it",
            flush=True,
        )
    return record


class _StageLines(logging.Handler):
    """Advances the stage bar when Prefect logs that a task run finished."""

    def __init__(self, progress: StudyProgress) -> None:
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Finished in state"):
            self.progress.stage_done(str(getattr(record, "task_name", "stage")))


@contextmanager
def _one_off_runs(
    config: NetrtConfig, layout: DataLayout, record: ServerRecord | None, *, verbose: bool, studies: int
) -> Iterator[StudyProgress]:
    """Around a one-off command's flow runs, after Prefect is imported.

    Prefect's log lines go to ``logs/netrt.log`` (and the UI), not the terminal, unless ``verbose``;
    the background server is waited for and kept in use while the runs last; a TTY gets progress bars.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.local_server import KeepAlive, wait_until_ready

    route_library_logs(layout.app_log, verbose=verbose)
    if record is not None:
        wait_until_ready(record)
    # validate, anonymize, extract-masks, preview, one write per plane (and kind), one deliver per destination
    outputs = config.processing.outputs
    per_plane = max(1, len([kind for kind in outputs if kind != "seg"]))
    stages = 4 + len(config.processing.planes) * per_plane + ("seg" in outputs) + len(config.effective_destinations())
    progress = StudyProgress(studies, stages, enabled=progress_wanted(verbose=verbose))
    handler = _StageLines(progress)
    task_runs = logging.getLogger("prefect.task_runs")
    task_runs.addHandler(handler)
    try:
        # No flow-run heartbeats: they serve crash detection of deployment runs on workers; here the
        # command itself shows a crash, and stopping the heartbeat thread costs up to 1 s per study.
        with (
            temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}),
            KeepAlive(record) if record is not None else nullcontext(),
            progress,
        ):
            yield progress
    finally:
        task_runs.removeHandler(handler)


def _ui_url(config: NetrtConfig) -> str:
    from netrt.prefect_env import api_url

    return api_url(config).removesuffix("/api")


def _config_option(args: argparse.Namespace) -> str:
    return f" --config {args.config}" if getattr(args, "config", None) else ""


def _full_anonymization(config: NetrtConfig) -> bool:
    return config.anonymization.enabled and config.anonymization.mode == "full"


def cmd_process(args: argparse.Namespace) -> int:
    """Run the process-study flow for every study under PATH; one line per study."""
    config = _config(args)
    layout = DataLayout.from_data_dir(config.paths.data_dir).create()
    setup_logging(layout.app_log, console=False)
    from netrt.study import find_studies

    root = Path(args.path)
    if not root.exists():
        raise NetrtError(f"{root}: no such file or folder")
    studies = find_studies(root)
    if not studies:
        raise NetrtError(f"{root}: no DICOM study found{_skipped_reasons(root)}")
    record = _prepare_flow_runs(config)
    from prefect import tags

    from flows.process_study import process_study

    failures = 0
    outcomes: list[dict[str, Any]] = []
    with _one_off_runs(config, layout, record, verbose=args.verbose, studies=len(studies)) as progress:
        for study in studies:
            progress.start_study(study.study_instance_uid if not _full_anonymization(config) else "study")
            try:
                with tags("source:netrt-process"):
                    summary = process_study(
                        study_dir=str(root),
                        config_file=args.config,
                        study_instance_uid=study.study_instance_uid,
                    )
            except StudyFailedError as exc:  # one failed study must not stop the others; report it and go on
                failures += 1
                # names the study by its public UID (anonymization on); the tracebacks are in the log
                print(f"FAILED: {exc} (log: {layout.app_log})", flush=True)
                continue
            except Exception as exc:
                failures += 1
                shown = "a study" if _full_anonymization(config) else study.study_instance_uid
                logging.getLogger("netrt").error("%s: unexpected error", shown, exc_info=True)
                print(f"{shown}: FAILED: {exc} (traceback in {layout.app_log})", flush=True)
                continue
            finally:
                progress.study_done()
            outcomes.append(summary)
            written = ", ".join(f"{s['label']} {s['instances']}" for s in summary["series"])
            delivered = delivery_line(summary["destinations"])
            print(
                f"{summary['study_instance_uid']}: ok: ROIs {', '.join(summary['rois_kept'])}; "
                f"series {written}; delivered to {delivered}",
                flush=True,
            )
            for warning in summary["warnings"]:
                print(f"  warning: {warning}", flush=True)
    _print_outcomes(config, args, outcomes, failures)
    return EXIT_OK if failures == 0 else EXIT_FAILURE


def _skipped_reasons(root: Path, shown: int = 3) -> str:
    """Why the files under ``root`` were not read, one line per distinct reason with a count and
    an example file (empty when there are no files): "no study found" alone leaves a user guessing."""
    from netrt.study.discovery import skipped_files

    by_reason: dict[str, list[Path]] = {}
    for path, reason in skipped_files(root):
        by_reason.setdefault(reason, []).append(path)
    lines = [
        f"\n  {len(paths)} file(s), e.g. {paths[0]}: {reason}"
        for reason, paths in sorted(by_reason.items(), key=lambda item: -len(item[1]))[:shown]
    ]
    if len(by_reason) > shown:
        lines.append(f"\n  ... and {len(by_reason) - shown} other reason(s)")
    return "".join(lines)


def _print_outcomes(
    config: NetrtConfig, args: argparse.Namespace, outcomes: list[dict[str, Any]], failures: int
) -> None:
    """The closing lines of `netrt process`: one per outcome, then where the previews and UI runs are."""
    total = len(outcomes) + failures
    if outcomes:
        print(f"ok: {len(outcomes)} of {total} studies", flush=True)
    if failures:
        print(
            f"failed: {failures} of {total} studies, now in quarantine: netrt quarantine list{_config_option(args)}",
            flush=True,
        )
    ui = _ui_url(config)
    for summary in outcomes:
        previews = summary.get("previews") or []
        if len(previews) > 1:  # structure_sets: each
            for shown in previews:
                print(f"preview [{shown['structure_set']}]: {shown['path']}", flush=True)
        elif summary.get("preview"):
            print(f"preview: {summary['preview']}", flush=True)
    for summary in outcomes:
        if summary.get("flow_run_id"):
            print(f"Prefect UI run: {ui}/runs/flow-run/{summary['flow_run_id']}", flush=True)
    if failures:
        print(f"Prefect UI runs: {ui}/runs", flush=True)


# --- quarantine -----------------------------------------------------------------------------


def cmd_quarantine_list(args: argparse.Namespace) -> int:
    """One line per quarantined study: id, stage, attempts, status and reason."""
    from netrt.quarantine import list_entries

    entries = list_entries(DataLayout.from_data_dir(_config(args).paths.data_dir))
    if not entries:
        print("the quarantine is empty")
    for entry in entries:
        print(entry.summary_line())
    return EXIT_OK


def cmd_quarantine_show(args: argparse.Namespace) -> int:
    from netrt.quarantine import read_entry, reason_json

    entry = read_entry(DataLayout.from_data_dir(_config(args).paths.data_dir), args.id)
    files = [p for p in entry.input_dir.rglob("*") if p.is_file()] if entry.input_dir.is_dir() else []
    print(f"{entry.id}: {len(files)} input files in {entry.input_dir}")
    print(reason_json(entry))
    return EXIT_OK


def cmd_quarantine_retry(args: argparse.Namespace) -> int:
    """Run the flow again for one or every quarantined study; exit 0 only when every one succeeded."""
    from netrt.quarantine import begin_retry, checked_entry_id, list_entries

    config = _config(args)
    layout = DataLayout.from_data_dir(config.paths.data_dir).create()
    setup_logging(layout.app_log, console=False)
    if args.all == (args.id is not None):
        raise NetrtError("give either a quarantine ID or --all")
    ids = [e.id for e in list_entries(layout)] if args.all else [checked_entry_id(args.id)]
    if not ids:
        print("the quarantine is empty")
        return EXIT_OK
    record = _prepare_flow_runs(config)
    from flows.process_study import process_study

    failures = 0
    with _one_off_runs(config, layout, record, verbose=args.verbose, studies=len(ids)) as progress:
        for entry_id in ids:
            progress.start_study(entry_id)
            study_dir = begin_retry(layout, entry_id)
            try:
                summary = process_study(study_dir=str(study_dir), config_file=args.config)
            except StudyFailedError as exc:  # the flow has put the study back in quarantine with the new reason
                failures += 1
                print(f"{entry_id}: FAILED again: {exc} (log: {layout.app_log})", flush=True)
                continue
            except Exception as exc:
                failures += 1
                logging.getLogger("netrt").error("%s: unexpected error", entry_id, exc_info=True)
                print(f"{entry_id}: FAILED again: {exc} (traceback in {layout.app_log})", flush=True)
                continue
            finally:
                progress.study_done()
            delivered = delivery_line(summary["destinations"])
            print(f"{entry_id}: ok: delivered to {delivered}; released from quarantine", flush=True)
    return EXIT_OK if failures == 0 else EXIT_FAILURE


def cmd_quarantine_purge(args: argparse.Namespace) -> int:
    """Delete one quarantined study for good (the only way NETRT deletes received data)."""
    from netrt.quarantine import purge

    config = _config(args)
    layout = DataLayout.from_data_dir(config.paths.data_dir)
    entry = purge(layout, args.id)
    TransactionLog(layout.transaction_log).record(
        "purged_from_quarantine", study_instance_uid=entry.study, attempts=entry.attempts
    )
    print(f"{entry.id}: purged ({entry.folder} deleted)")
    return EXIT_OK


# --- server ---------------------------------------------------------------------------------


def cmd_server_status(args: argparse.Namespace) -> int:
    """Whether the data dir's background local Prefect server runs; exit 0 only when it answers."""
    from flows.local_server import is_healthy, read_record
    from netrt.prefect_env import local_api_url

    config = _config(args)
    layout = DataLayout.from_data_dir(config.paths.data_dir)
    record = read_record(layout.prefect_home)
    if record is None:
        where = local_api_url(config)
        other = f"; something else answers at {where} (a `netrt serve`?)" if is_healthy(where, timeout=1.0) else ""
        print(f"no background local Prefect server runs for {layout.root}{other}")
        return EXIT_FAILURE
    healthy = is_healthy(record.api_url, timeout=2.0)
    unused = f"unused for {record.last_used() / 60:.0f} min"
    idle = (
        f"stops itself after {record.idle_minutes} min unused ({unused})"
        if record.idle_minutes
        else f"runs until `netrt server stop` ({unused})"
    )
    print(
        f"local Prefect server of {layout.root}: {'answering' if healthy else 'NOT answering'} at {record.ui_url} "
        f"(pid {record.pid}, started {record.started}); {idle}; log {record.log_file}"
    )
    return EXIT_OK if healthy else EXIT_FAILURE


def cmd_server_stop(args: argparse.Namespace) -> int:
    """Stop the data dir's background local Prefect server (started by `netrt process` or `quarantine retry`)."""
    from flows.local_server import read_record, stop_background_server

    config = _config(args)
    layout = DataLayout.from_data_dir(config.paths.data_dir)
    record = read_record(layout.prefect_home)
    if record is None:
        print(f"no background local Prefect server runs for {layout.root}; nothing to stop")
        return EXIT_OK
    clean = stop_background_server(record)
    how = "stopped" if clean else "killed (it did not stop within 20 s)"
    print(f"local Prefect server of {layout.root} {how} (pid {record.pid}, port {record.port})")
    return EXIT_OK


# --- serve ----------------------------------------------------------------------------------


def _stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C): the node then stops cleanly."""
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return stop


def _config_file(args: argparse.Namespace) -> str | None:
    """The config file as an absolute path: flow runs read it from other processes."""
    path = getattr(args, "config", None)
    return str(Path(path).resolve()) if path else None


def _flow_run_callbacks(
    config_file: str | None,
) -> tuple[Callable[[SealedStudy], str], Callable[[str], bool]]:
    """The listener's two links to Prefect: create a study's flow run; is a recorded run still to run?"""
    from uuid import UUID

    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    from flows.deployments import trigger_process_study

    def trigger(study: SealedStudy) -> str:
        tags = [f"source-ae:{title}" for title in study.calling_ae_titles]
        tags += [f"modality:{modality}" for modality in study.modalities]
        return trigger_process_study(
            study.folder,
            study_instance_uid=study.study_instance_uid,
            config_file=config_file,
            tags=tags,
            idempotency_key=study.idempotency_key,
        )

    def is_run_pending(flow_run_id: str) -> bool:
        try:
            with get_client(sync_client=True) as client:
                run = client.read_flow_run(UUID(flow_run_id))
        except (ObjectNotFound, ValueError):
            return False
        return run.state is not None and not run.state.is_final()

    return trigger, is_run_pending


def _crash_orphaned_runs(logger: logging.Logger) -> None:
    """Mark flow runs left running by a previous `netrt serve` as crashed.

    Only used with NETRT's own local server, which was down until a moment ago: a deployment run
    still "running" or "pending" there belongs to a process that died with the previous node, and
    would otherwise hold its study forever. Recovery then creates a new run for the study.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    states = FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING])
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=states)))
        for run in runs:
            if run.deployment_id is None:
                continue  # a `netrt process` run: not ours to judge
            client.set_flow_run_state(run.id, Crashed(message="its process ended when netrt serve stopped"), force=True)
            logger.warning(
                "flow run %s (%s) was left running by a previous netrt serve: marked crashed", run.id, run.name
            )


def _start_listener(config: NetrtConfig, config_file: str | None) -> ListenerService:
    from listener.service import ListenerService

    trigger, is_run_pending = _flow_run_callbacks(config_file)
    service = ListenerService(config, trigger=trigger, is_run_pending=is_run_pending)
    service.start()
    host, port = service.address
    tls = " over TLS" if config.listener.tls.enabled else ""
    print(f"DICOM listener: AE {config.listener.ae_title} on {host}:{port}{tls}", flush=True)
    return service


def _run_node(args: argparse.Namespace, *, local_server: bool, flow_server: bool) -> int:
    """Start what is asked (local Prefect server, flow server, listener), run until a signal, stop in reverse."""
    config = _config(args)
    layout = DataLayout.from_data_dir(config.paths.data_dir).create()
    logger = setup_logging(layout.app_log)
    _apply_prefect_environment(config)
    from flows.local_server import KeepAlive, is_healthy, read_record, start_local_server, stop_local_server
    from netrt.prefect_env import api_url

    stop = _stop_on_signals()
    config_file = _config_file(args)
    prefect_env = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_")}
    server: subprocess.Popen[bytes] | None = None
    flows: subprocess.Popen[bytes] | None = None
    listener: ListenerService | None = None
    background = read_record(layout.prefect_home) if config.prefect.api_url is None else None
    if background is not None and background.port != config.prefect.server_port:
        from flows.local_server import stop_background_server

        stop_background_server(background)  # prefect.server_port changed since it started
        background = None
    lease = KeepAlive(background) if background is not None else None
    try:
        if background is not None and lease is not None:
            # the data dir's server, started by `netrt process` or `quarantine retry`: used, kept up, left running
            from flows.local_server import wait_until_ready

            wait_until_ready(background)
            lease.__enter__()
            print(f"Prefect UI: {background.ui_url} (the data dir's background server)", flush=True)
        elif local_server:
            logger.info("starting the local Prefect server (database under %s)", layout.prefect_home)
            server = start_local_server(prefect_env, api_url(config), layout.logs / "prefect-server.log")
            print(f"Prefect UI: {api_url(config).removesuffix('/api')}", flush=True)
        elif not is_healthy(api_url(config), timeout=5.0):
            where = config.prefect.api_url or f"{api_url(config)} (no prefect.api_url set, and no local server up)"
            raise NetrtError(f"no Prefect API answers at {where}; flow runs could not be created")
        else:
            print(f"using the Prefect API at {api_url(config)}", flush=True)
        if flow_server and not stop.is_set():
            from flows.deployments import start_flow_server, stop_flow_server

            if local_server:
                try:
                    _crash_orphaned_runs(logger)
                except Exception as exc:  # recovery then trusts those runs; the node still comes up
                    logger.warning("could not check for flow runs left by a previous netrt serve: %s", exc)
            flows = start_flow_server(config_file, prefect_env, layout.logs / "flow-server.log")
            print("flows: serving the process-study and rerun-quarantine deployments", flush=True)
        if not stop.is_set():
            listener = _start_listener(config, config_file)
            print(f"data dir: {layout.root}", flush=True)
            print("NETRT is running; stop it with Ctrl-C or SIGTERM.", flush=True)
        while not stop.wait(1.0):
            for name, child in (("local Prefect server", server), ("flow server", flows)):
                if child is not None and child.poll() is not None:
                    logger.error("the %s exited with code %s; stopping NETRT", name, child.returncode)
                    return EXIT_FAILURE
    finally:
        if listener is not None:
            listener.stop()
        if flows is not None:
            stop_flow_server(flows)
        if server is not None:
            stop_local_server(server)
        if lease is not None:
            lease.__exit__()
        logger.info("NETRT stopped")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    """The whole node: local Prefect server (when none is configured), the deployments, the listener."""
    config = _config(args)
    return _run_node(args, local_server=config.prefect.api_url is None, flow_server=not args.no_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    """`prefect worker start --pool netrt --type process` with NETRT's Prefect settings; replaces this process."""
    config = _config(args)
    DataLayout.from_data_dir(config.paths.data_dir).create()
    _apply_prefect_environment(config)
    import flows
    from flows.local_server import is_healthy
    from netrt.prefect_env import api_url

    if not is_healthy(api_url(config), timeout=5.0):
        raise NetrtError(f"no Prefect API answers at {api_url(config)}; set prefect.api_url to the server's API")
    # prefect.yaml's pull step runs flow runs from $NETRT_HOME (the folder holding flows/).
    os.environ.setdefault("NETRT_HOME", str(Path(flows.__file__).resolve().parent.parent))
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")  # pick up a sealed study promptly
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", args.pool, "--type", "process"]
    limit = args.limit or config.prefect.worker_limit
    if limit:
        command += ["--limit", str(limit)]
    if args.name:
        command += ["--name", args.name]
    sys.stdout.flush()
    os.execv(sys.executable, command)


def cmd_listener(args: argparse.Namespace) -> int:
    """Only the DICOM listener; flow runs go to prefect.api_url (or a running local server) and its workers."""
    return _run_node(args, local_server=False, flow_server=False)


# --- demo -----------------------------------------------------------------------------------


def _wait_for_run(transactions: TransactionLog, study: str, after: int, timeout: float) -> str:
    """The id of the flow run the listener creates for ``study`` (a transaction-log line after ``after``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in transactions.entries()[after:]:
            if entry.get("event") == "flow_run_created" and entry.get("study_instance_uid") == study:
                return str(entry["flow_run_id"])
        time.sleep(0.5)
    raise NetrtError(
        f"no flow run was created for study {study} within {timeout:.0f} s; is `netrt serve` running with "
        "this config (same data dir)? See its log, logs/netrt.log"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """Send a phantom study to the running node, wait for its flow run, show where the results are."""
    import tempfile
    from uuid import UUID

    from listener.service import study_label
    from netrt.config import DicomDestination
    from netrt.phantom import PhantomSpec, write_phantom
    from netrt.prefect_env import api_url
    from netrt.send import echo_destination, send_to_dicom

    config = _config(args)
    layout = DataLayout.from_data_dir(config.paths.data_dir)
    listener = config.listener
    if listener.tls.enabled:
        raise NetrtError("netrt demo sends without TLS, but listener.tls.enabled is true; use storescu +tls instead")
    host = "127.0.0.1" if listener.host in ("0.0.0.0", "::", "") else listener.host
    calling = args.calling_ae
    if listener.allowed_calling_ae_titles and calling not in listener.allowed_calling_ae_titles:
        calling = listener.allowed_calling_ae_titles[0]
    node = DicomDestination(name="netrt", type="dicom", ae_title=listener.ae_title, host=host, port=listener.port)
    try:
        echo_destination(node, calling_ae_title=calling)
    except NetrtError as exc:
        raise NetrtError(f"the NETRT listener does not answer ({exc}); start it first: netrt serve") from exc
    print(f"1. the listener answers C-ECHO at {listener.ae_title}@{host}:{listener.port}", flush=True)
    _apply_prefect_environment(config)
    transactions = TransactionLog(layout.transaction_log)
    before = len(transactions.entries())
    with tempfile.TemporaryDirectory(prefix="netrt-demo-") as temp:
        spec = PhantomSpec(rows=args.size, columns=args.size, slices=args.slices, seed=int(time.time()) % 100000)
        manifest = write_phantom(spec, Path(temp))
        files = sorted((Path(temp) / "dicom").iterdir())
        print(
            f"2. phantom: {len(files)} files ({args.slices} CT slices of {args.size}x{args.size} + RTSTRUCT)",
            flush=True,
        )
        outcome = send_to_dicom(node, files, calling_ae_title=calling)
    print(f"3. sent by C-STORE: {outcome.detail}", flush=True)
    label = study_label(config, layout)(manifest.study_instance_uid)
    wait = listener.study_idle_seconds + args.timeout
    print(
        f"   waiting for the study to be complete ({listener.study_idle_seconds:g} s idle) and processed...", flush=True
    )
    run_id = _wait_for_run(transactions, label, before, wait)
    ui = api_url(config).removesuffix("/api")
    print(f"4. flow run {run_id}: {ui}/runs/flow-run/{run_id}", flush=True)
    from prefect import get_client

    deadline = time.monotonic() + args.timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(UUID(run_id))
            if run.state is not None and run.state.is_final():
                break
            if time.monotonic() > deadline:
                raise NetrtError(
                    f"flow run {run_id} did not finish within {args.timeout:.0f} s (state {run.state_name})"
                )
            time.sleep(1.0)
    state = run.state
    if state is None or not state.is_completed():
        print(f"5. the flow run ended {run.state_name}: {state.message if state else ''}", flush=True)
        print(f"   the study is in quarantine: netrt quarantine list --config {args.config or '...'}", flush=True)
        return EXIT_FAILURE
    summary = state.result(raise_on_failure=False)
    print("5. processed:", flush=True)
    for destination in config.effective_destinations():
        where = destination.path / label if hasattr(destination, "path") else f"{destination.host}:{destination.port}"
        print(f"   output ({destination.name}): {where}", flush=True)
    preview = summary.get("preview") if isinstance(summary, dict) else None
    if preview:
        print(f"   preview: {preview}", flush=True)
    print(f"   run report and preview image: {ui}/runs/flow-run/{run_id} (Artifacts)", flush=True)
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netrt",
        description="NETRT: a DICOM node that turns CT/MR + RTSTRUCT studies into overlay series "
        "in three planes, orchestrated by Prefect.",
    )
    parser.add_argument("--version", action="version", version=f"netrt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the node: DICOM listener, flow runs per received study, local Prefect server with UI",
        description="Starts the local Prefect server with its UI (when prefect.api_url is null), serves the "
        "process-study and rerun-quarantine deployments, and runs the DICOM listener, which creates one "
        "flow run per completed study. SIGTERM or Ctrl-C stops it cleanly.",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    serve.add_argument(
        "--no-worker",
        action="store_true",
        help="do not serve the deployments here: flow runs are left to workers of the Prefect API",
    )
    serve.set_defaults(handler=cmd_serve)

    listener = commands.add_parser(
        "listener",
        help="run only the DICOM listener; flow runs go to prefect.api_url and its workers",
        description="The DICOM listener alone: completed studies get flow runs on prefect.api_url (or on the "
        "local server of a running `netrt serve`), executed by that API's workers.",
    )
    listener.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    listener.set_defaults(handler=cmd_listener)

    worker = commands.add_parser(
        "worker",
        help="run a Prefect process worker on the netrt work pool (production mode, with `netrt listener`)",
        description="Runs `prefect worker start --pool netrt --type process` against prefect.api_url with NETRT's "
        "Prefect settings (results cache under paths.data_dir, which every worker must share with the "
        "listener). The worker runs the flow runs of the deployments `prefect deploy --all` registered.",
    )
    worker.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    worker.add_argument("--pool", default="netrt", help="work pool (default netrt; created if missing)")
    worker.add_argument("--limit", type=int, help="most flow runs at once (default: prefect.worker_limit)")
    worker.add_argument("--name", help="worker name shown in the UI (default: Prefect's)")
    worker.set_defaults(handler=cmd_worker)

    demo = commands.add_parser(
        "demo",
        help="send a phantom study to the running node, wait for its flow run, print where the output is",
        description="With `netrt serve` running (same config): generates a phantom CT + RTSTRUCT, sends it to "
        "the listener by C-STORE, waits for the study's flow run and prints where the output series and "
        "the preview are.",
    )
    demo.add_argument("--config", metavar="FILE", help="YAML config of the running node (default: built-in defaults)")
    demo.add_argument("--size", type=int, default=128, help="rows and columns of the phantom slices (default 128)")
    demo.add_argument("--slices", type=int, default=40, help="CT slices of the phantom (default 40)")
    demo.add_argument("--calling-ae", default="NETRT_DEMO", help="calling AE title to send with (default NETRT_DEMO)")
    demo.add_argument(
        "--timeout", type=_positive_float, default=600.0, help="seconds to wait for the flow run (default 600)"
    )
    demo.set_defaults(handler=cmd_demo)

    process = commands.add_parser(
        "process",
        help="run the process-study flow for every study found under PATH",
        description="Finds every study under PATH (a folder of DICOM files, any depth), runs the process-study "
        "flow for each and prints one line per study. Exit 0 only when every study succeeded.",
    )
    process.add_argument("path", metavar="PATH")
    process.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    process.add_argument(
        "--verbose", action="store_true", help="also show Prefect's log lines here (always in logs/netrt.log)"
    )
    process.set_defaults(handler=cmd_process, fast_exit=True)

    quarantine = commands.add_parser(
        "quarantine",
        help="list, show, retry or purge studies that failed for good",
        description="Failed studies wait in <data_dir>/quarantine/<id>/ (input/ untouched, reason.json). "
        "Nothing there is deleted except by `purge`.",
    )
    quarantine_commands = quarantine.add_subparsers(dest="quarantine_command", metavar="ACTION", required=True)
    q_list = quarantine_commands.add_parser("list", help="one line per study: id, stage, attempts, status, reason")
    q_list.set_defaults(handler=cmd_quarantine_list)
    q_show = quarantine_commands.add_parser("show", help="the reason.json of one study and where its files are")
    q_show.add_argument("id", metavar="ID")
    q_show.set_defaults(handler=cmd_quarantine_show)
    q_retry = quarantine_commands.add_parser(
        "retry", help="run the flow again for ID (or --all); exit 0 only when every retried study succeeded"
    )
    q_retry.add_argument("id", metavar="ID", nargs="?")
    q_retry.add_argument("--all", action="store_true", help="retry every quarantined study")
    q_retry.add_argument(
        "--verbose", action="store_true", help="also show Prefect's log lines here (always in logs/netrt.log)"
    )
    q_retry.set_defaults(handler=cmd_quarantine_retry, fast_exit=True)
    q_purge = quarantine_commands.add_parser("purge", help="delete study ID and its quarantine entry for good")
    q_purge.add_argument("id", metavar="ID")
    q_purge.set_defaults(handler=cmd_quarantine_purge)
    for sub in (q_list, q_show, q_retry, q_purge):
        sub.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")

    server = commands.add_parser(
        "server",
        help="status or stop of the data dir's background local Prefect server",
        description="`netrt process` and `netrt quarantine retry` start the data dir's local Prefect server in "
        "the background (when prefect.api_url is null and none runs) and leave it running for the next "
        "commands; it stops itself after prefect.local_server_idle_minutes unused.",
    )
    server_commands = server.add_subparsers(dest="server_command", metavar="ACTION", required=True)
    s_status = server_commands.add_parser("status", help="is it running, where, since when; exit 0 when it answers")
    s_status.set_defaults(handler=cmd_server_status)
    s_stop = server_commands.add_parser("stop", help="stop it (its database and history stay)")
    s_stop.set_defaults(handler=cmd_server_stop)
    for sub in (s_status, s_stop):
        sub.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")

    config = commands.add_parser("config", help="check or show a configuration file")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser("check", help="validate FILE; exit 1 naming every bad key")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=cmd_config_check)
    show = config_commands.add_parser("show", help="print the effective config (defaults + FILE + environment)")
    show.add_argument("file", metavar="FILE", nargs="?")
    show.set_defaults(handler=cmd_config_show)
    get = config_commands.add_parser("get", help="print one value, e.g. prefect.process_study_concurrency")
    get.add_argument("key", metavar="KEY", help="dotted key path, e.g. quarantine.retry_cron")
    get.add_argument("file", metavar="FILE", nargs="?")
    get.set_defaults(handler=cmd_config_get)

    echo = commands.add_parser(
        "echo",
        help="C-ECHO a configured dicom destination (set-up check); exit 1 with the reason when it fails",
    )
    echo.add_argument("destination", metavar="DESTINATION", nargs="?", help="name of a destination of type dicom")
    echo.add_argument(
        "--self",
        dest="self_",
        action="store_true",
        help="C-ECHO this node's own listener (listener.host/port/ae_title; the container health check)",
    )
    echo.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    echo.set_defaults(handler=cmd_echo)

    doctor = commands.add_parser(
        "doctor",
        help="check this machine and config: config, data dir, ports, Prefect API, destinations, tools",
        description="One line per check, each failure with its fix: the config is valid; the data dir is "
        "writable (and its free space); the listener port is free or a running NETRT answers C-ECHO there; "
        "the Prefect API answers (prefect.api_url, or the local server can run); every dicom destination "
        "answers C-ECHO; optional tools (dcmtk, Orthanc, dicom3tools) are present. Exit 0 only when every "
        "check passes (a missing optional tool is reported, not failed).",
    )
    doctor.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    doctor.set_defaults(handler=cmd_doctor)

    phantom = commands.add_parser(
        "phantom",
        help="write a synthetic CT + RTSTRUCT study with analytic ground truth",
        description="Writes OUT_DIR/dicom/ (CT slices and RS.dcm only, ready for storescu +sd), "
        "OUT_DIR/truth/<ROI>.nii.gz (masks computed from the shapes) and OUT_DIR/phantom.json.",
    )
    phantom.add_argument("out_dir", metavar="OUT_DIR")
    phantom.add_argument("--rows", type=int, default=256, help="image rows (default 256)")
    phantom.add_argument("--columns", type=int, default=256, help="image columns (default 256)")
    phantom.add_argument(
        "--pixel-spacing",
        type=_positive_float,
        nargs=2,
        metavar=("ROW_MM", "COL_MM"),
        default=(1.0, 1.0),
        help="PixelSpacing in DICOM order (default 1 1)",
    )
    phantom.add_argument("--slice-spacing", type=_positive_float, default=2.0, help="mm between slices (default 2)")
    phantom.add_argument("--slices", type=int, default=None, help="slice count (default: enough for 120 mm)")
    phantom.add_argument("--oblique", action="store_true", help="tilt the image plane (oblique series)")
    phantom.add_argument(
        "--reverse-order", action="store_true", help="number instances against the slice normal, no SliceLocation"
    )
    phantom.add_argument("--extra-spheres", type=int, default=0, help="additional sphere ROIs (e.g. 4 for 10 ROIs)")
    phantom.add_argument("--seed", type=int, default=0, help="seed for UIDs and noise (default 0)")
    phantom.add_argument("--patient-name", default="PHANTOM^NETRT")
    phantom.add_argument("--patient-id", default="NETRT-PHANTOM-001")
    phantom.add_argument(
        "--multiframe",
        action="store_true",
        help="write the CT as one Legacy Converted Enhanced CT multi-frame file; the RTSTRUCT references its frames",
    )
    phantom.set_defaults(handler=cmd_phantom)
    return parser


def _run(args: argparse.Namespace) -> int:
    try:
        result: int = args.handler(args)
        return result
    except NetrtError as exc:
        print(f"netrt: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # not NETRT's own: one line here, the traceback in the log
        where = log_unexpected(exc)
        print(f"netrt: unexpected error: {type(exc).__name__}: {exc} (traceback in {where})", file=sys.stderr)
        return EXIT_FAILURE


def _exit_now(code: int) -> None:
    """End the process as the interpreter would, minus the teardown of every imported module.

    Runs what a normal exit runs first (threading's exit hooks and the joins of non-daemon threads,
    then the atexit handlers: Prefect drains its log and event workers there, logging flushes and
    closes its files) and then leaves with ``os._exit``. The skipped teardown of Prefect, pydicom,
    SimpleITK and numpy costs about 1 s on these machines (measured with and without, same run).
    """
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """The `netrt` command; ``argv`` None: the real command line (the one-off commands then exit fast)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    result = _run(args)
    if argv is None and getattr(args, "fast_exit", False):
        _exit_now(result)
    return result


if __name__ == "__main__":
    sys.exit(main())
