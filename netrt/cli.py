"""`netrt`: the command-line face of NETRT.

This is the one module of the ``netrt`` package that wires the domain to orchestration
(``flows/``) and to the listener (``listener/``); those imports are made inside the commands
that need them, after Prefect's environment has been set from NETRT's config.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from netrt import __version__
from netrt.config import NetrtConfig, dump_config, load_config
from netrt.errors import NetrtError
from netrt.layout import DataLayout
from netrt.logs import TransactionLog, setup_logging

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
    load_config(args.file)
    print(f"{args.file}: valid")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    sys.stdout.write(dump_config(load_config(args.file)))
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
    )
    manifest = write_phantom(spec, Path(args.out_dir))
    print(f"study {manifest.study_instance_uid}")
    print(f"  {len(manifest.image_files)} CT slices and RTSTRUCT in {Path(args.out_dir) / 'dicom'}")
    for roi in manifest.rois:
        print(f"  ROI {roi.name}: {roi.shape}, {roi.analytic_volume_mm3:.0f} mm3, {roi.truth_voxel_count} voxels")
    print(f"  ground truth: {Path(args.out_dir) / 'truth'}")
    return EXIT_OK


# --- process --------------------------------------------------------------------------------


def _use_running_local_server(config: NetrtConfig) -> bool:
    """True when flows should go to a server: a configured one, or NETRT's local one if it is up."""
    if config.prefect.api_url is not None:
        return True
    from flows.local_server import is_healthy
    from netrt.prefect_env import local_api_url

    return is_healthy(local_api_url(config), timeout=1.0)


def _prepare_flow_runs(config: NetrtConfig) -> None:
    """Point Prefect at the configured or running local server; else a temporary one for this command."""
    _apply_prefect_environment(config, with_api_url=_use_running_local_server(config))


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
        raise NetrtError(f"{root}: no DICOM study found")
    _prepare_flow_runs(config)
    from prefect import tags

    from flows.process_study import process_study

    failures = 0
    for study in studies:
        try:
            with tags("source:netrt-process"):
                summary = process_study(
                    study_dir=str(root),
                    config_file=args.config,
                    study_instance_uid=study.study_instance_uid,
                )
        except Exception as exc:  # one failed study must not stop the others; report it and go on
            failures += 1
            print(f"{study.study_instance_uid}: FAILED: {exc}", flush=True)
            continue
        written = ", ".join(
            f"{s['plane']}{' burn-in' if s['burn_in'] else ''} {s['instances']}" for s in summary["series"]
        )
        delivered = ", ".join(f"{d['name']} {d['instances']}" for d in summary["destinations"])
        print(
            f"{study.study_instance_uid}: ok: ROIs {', '.join(summary['rois_kept'])}; "
            f"series {written}; delivered to {delivered}",
            flush=True,
        )
        for warning in summary["warnings"]:
            print(f"  warning: {warning}", flush=True)
    return EXIT_OK if failures == 0 else EXIT_FAILURE


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
    _prepare_flow_runs(config)
    from flows.process_study import process_study

    failures = 0
    for entry_id in ids:
        study_dir = begin_retry(layout, entry_id)
        try:
            summary = process_study(study_dir=str(study_dir), config_file=args.config)
        except Exception as exc:  # the flow has put the study back in quarantine with the new reason
            failures += 1
            print(f"{entry_id}: FAILED again: {exc}", flush=True)
            continue
        delivered = ", ".join(f"{d['name']} {d['instances']}" for d in summary["destinations"])
        print(f"{entry_id}: ok: delivered to {delivered}; released from quarantine", flush=True)
    return EXIT_OK if failures == 0 else EXIT_FAILURE


def cmd_quarantine_purge(args: argparse.Namespace) -> int:
    """Delete one quarantined study for good (the only way NETRT deletes received data)."""
    from netrt.quarantine import purge

    config = _config(args)
    layout = DataLayout.from_data_dir(config.paths.data_dir)
    entry = purge(layout, args.id)
    TransactionLog(layout.transaction_log).record(
        "purged from quarantine", study_instance_uid=entry.study, attempts=entry.attempts
    )
    print(f"{entry.id}: purged ({entry.folder} deleted)")
    return EXIT_OK


# --- serve ----------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Bring up the node: the local Prefect server (when none is configured) and what runs beside it."""
    config = _config(args)
    layout = DataLayout.from_data_dir(config.paths.data_dir).create()
    logger = setup_logging(layout.app_log)
    _apply_prefect_environment(config)
    from flows.local_server import start_local_server, stop_local_server
    from netrt.prefect_env import api_url

    server = None
    if config.prefect.api_url is None:
        logger.info("starting the local Prefect server (database under %s)", layout.prefect_home)
        server = start_local_server(
            {k: v for k, v in os.environ.items() if k.startswith("PREFECT_")},
            api_url(config),
            layout.logs / "prefect-server.log",
        )
        ui = api_url(config).removesuffix("/api")
        print(f"Prefect UI: {ui}", flush=True)
    else:
        print(f"using the Prefect API at {config.prefect.api_url}", flush=True)
    print(f"data dir: {layout.root}", flush=True)
    print("NETRT is running; stop it with Ctrl-C or SIGTERM.", flush=True)

    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        while not stop.wait(1.0):
            if server is not None and server.poll() is not None:
                logger.error("the local Prefect server exited with code %s", server.returncode)
                return EXIT_FAILURE
    finally:
        if server is not None:
            stop_local_server(server)
        logger.info("NETRT stopped")
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

    serve = commands.add_parser("serve", help="run the node: local Prefect server with UI (and the listener)")
    serve.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    serve.set_defaults(handler=cmd_serve)

    process = commands.add_parser(
        "process",
        help="run the process-study flow for every study found under PATH",
        description="Finds every study under PATH (a folder of DICOM files, any depth), runs the process-study "
        "flow for each and prints one line per study. Exit 0 only when every study succeeded.",
    )
    process.add_argument("path", metavar="PATH")
    process.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    process.set_defaults(handler=cmd_process)

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
    q_retry.set_defaults(handler=cmd_quarantine_retry)
    q_purge = quarantine_commands.add_parser("purge", help="delete study ID and its quarantine entry for good")
    q_purge.add_argument("id", metavar="ID")
    q_purge.set_defaults(handler=cmd_quarantine_purge)
    for sub in (q_list, q_show, q_retry, q_purge):
        sub.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")

    config = commands.add_parser("config", help="check or show a configuration file")
    config_commands = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_commands.add_parser("check", help="validate FILE; exit 1 naming every bad key")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(handler=cmd_config_check)
    show = config_commands.add_parser("show", help="print the effective config (defaults + FILE + environment)")
    show.add_argument("file", metavar="FILE", nargs="?")
    show.set_defaults(handler=cmd_config_show)

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
    phantom.set_defaults(handler=cmd_phantom)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
        return result
    except NetrtError as exc:
        print(f"netrt: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
