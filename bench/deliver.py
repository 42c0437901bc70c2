"""Figure "deliver": C-STORE delivery of one processed study to Orthanc, NETRT against dcmtk's storescu.

A 512x512x100 CT phantom (``--smoke``: 64x64x20) is processed once by the pipeline (axial, coronal
and sagittal overlay series); those written files are what both senders deliver. Then, ``runs``
times, alternating the order (NETRT first on even runs, storescu first on odd ones), each sender
delivers every file to a freshly started, empty Orthanc:

- NETRT: :func:`netrt.send.send_to_dicom` (one association, contexts for what is sent, a fresh
  progress file as the deliver task keeps one, TCP_NODELAY), timed around the call in an
  already-started Python;
- the baseline: ``storescu -aec ORTHANC 127.0.0.1 4242 FILE...`` (dcmtk, ``TCP_NODELAY=1``),
  timed from start to exit.

Each run checks that Orthanc then holds every instance. Orthanc listens on all interfaces, so the
measurement runs inside a private network namespace (``unshare -n``, root) through
:func:`tests.orthanc.run_scenario`; Orthanc is started with ``TCP_NODELAY=1`` too (its DICOM
layer is dcmtk), else both senders mostly measure Nagle's algorithm.

Run it with ``python -m bench.deliver [--smoke] [--runs N] [--out BENCHMARKS.md]`` (or as the
``deliver`` figure of ``python -m bench`` once registered there).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import (
    DEFAULT_OUT,
    Options,
    command_line,
    machine,
    markdown_table,
    median,
    spread,
    summary_row,
    verdict,
    write_section,
)

FIGURE = "deliver"
TARGET_RATIO = 1.5  # issue 20
SCENARIO_TIMEOUT_S = 1800
AET = "ORTHANC"
PORT = 4242


@dataclass(frozen=True)
class Size:
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    slices: int

    def describe(self) -> str:
        return (
            f"{self.rows}x{self.columns}x{self.slices} CT phantom ({self.pixel_spacing[0]:g} mm pixels, "
            f"{self.slice_spacing:g} mm slices)"
        )


FULL = Size(rows=512, columns=512, pixel_spacing=(0.98, 0.98), slice_spacing=2.5, slices=100)
SMOKE = Size(rows=64, columns=64, pixel_spacing=(3.0, 3.0), slice_spacing=3.0, slices=20)


def _write_study(size: Size, root: Path) -> tuple[list[Path], dict[str, int]]:
    """The pipeline's output for a phantom: every written file, and the count per plane."""
    from netrt.config import ProcessingConfig
    from netrt.phantom import PhantomSpec, write_phantom
    from netrt.pipeline import compute_mask, write_plane
    from netrt.study import find_study, load_study

    spec = PhantomSpec(
        rows=size.rows,
        columns=size.columns,
        pixel_spacing=size.pixel_spacing,
        slice_spacing=size.slice_spacing,
        slices=size.slices,
    )
    write_phantom(spec, root / "phantom")
    study = load_study(find_study(root / "phantom" / "dicom").files)
    processing = ProcessingConfig()
    masks = compute_mask(study, processing, root / "work")
    files: list[Path] = []
    per_plane: dict[str, int] = {}
    for plane in processing.planes:
        for series in write_plane(study, masks, plane, processing, root / "work"):
            files.extend(series.files)
            per_plane[plane] = per_plane.get(plane, 0) + len(series.files)
    return files, per_plane


# --- inside the namespace ------------------------------------------------------------------------


def _measure(params: dict[str, Any]) -> dict[str, Any]:
    """Runs in the private namespace: every run, both senders, each into a fresh empty Orthanc."""
    from netrt.config import DicomDestination
    from netrt.send import send_to_dicom
    from tests.orthanc import DCMTK_ENV, Orthanc, OrthancSettings

    files = [Path(f) for f in params["files"]]
    work = Path(params["work"])
    destination = DicomDestination(name="orthanc", type="dicom", ae_title=AET, host="127.0.0.1", port=PORT)

    attempt = iter(range(1_000_000))

    def netrt() -> None:
        # A fresh progress file per run, as the deliver task keeps one: hashing and the
        # durable bookkeeping of every acknowledged instance are part of what is measured.
        progress = work / f"progress-{next(attempt)}.jsonl"
        send_to_dicom(destination, files, calling_ae_title="NETRT", progress_file=progress)

    def storescu() -> None:
        subprocess.run(
            ["storescu", "-aet", "STORESCU", "-aec", AET, "127.0.0.1", str(PORT), *map(str, files)],
            env={**os.environ, **DCMTK_ENV},
            check=True,
            capture_output=True,
            timeout=600,
        )

    senders = {"netrt": netrt, "storescu": storescu}
    times: dict[str, list[float]] = {name: [] for name in senders}
    for run in range(int(params["runs"])):
        order = ["netrt", "storescu"] if run % 2 == 0 else ["storescu", "netrt"]
        for name in order:
            root = work / f"orthanc-{run}-{name}"
            with Orthanc(OrthancSettings(root=root, aet=AET, dicom_port=PORT), quick_stop=True) as orthanc:
                os.sync()
                started = time.perf_counter()
                senders[name]()
                times[name].append(time.perf_counter() - started)
                stored = orthanc.statistics()["CountInstances"]
            shutil.rmtree(root, ignore_errors=True)
            if stored != len(files):
                raise RuntimeError(f"{name}: Orthanc holds {stored} instances, {len(files)} were sent")
    return {"times": times}


# --- the figure ------------------------------------------------------------------------------------


def run(options: Options) -> str:
    from tests.orthanc import run_scenario

    for tool in ("Orthanc", "storescu", "unshare", "ip", "setpriv"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed (Debian packages orthanc, dcmtk, util-linux, iproute2)")
    size = SMOKE if options.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="netrt-bench-deliver-") as temp:
        root = Path(temp)
        files, per_plane = _write_study(size, root)
        total_bytes = sum(f.stat().st_size for f in files)
        params = {"files": [str(f) for f in files], "work": str(root / "runs"), "runs": options.runs}
        result = run_scenario(_measure, params, root / "scenario", timeout=SCENARIO_TIMEOUT_S)
    times: dict[str, list[float]] = result["times"]
    return _section(options, size, len(files), per_plane, total_bytes, times)


def _section(
    options: Options, size: Size, count: int, per_plane: dict[str, int], total_bytes: int, times: dict[str, list[float]]
) -> str:
    megabytes = total_bytes / 1e6
    paired = [n / s for n, s in zip(times["netrt"], times["storescu"], strict=True)]
    ratio = median(times["netrt"]) / median(times["storescu"])
    rows = []
    for name, what in (
        ("netrt", "`netrt.send.send_to_dicom`, one association, progress file"),
        ("storescu", "dcmtk `storescu FILE...`, process start to exit"),
    ):
        seconds = median(times[name])
        rows.append(
            [
                name,
                what,
                f"{seconds:.2f} ({spread(times[name])})",
                f"{count / seconds:.0f}",
                f"{megabytes / seconds:.0f}",
            ]
        )
    planes = ", ".join(f"{n} {plane}" for plane, n in per_plane.items())
    table = markdown_table(["sender", "what", "median s (min-max)", "instances/s", "MB/s"], rows)
    intro = (
        f"{size.describe()} processed once by the pipeline: {count} files ({planes}; {megabytes:.0f} MB, "
        f"Explicit VR Little Endian), delivered to Orthanc {_orthanc_version()} over loopback in a private "
        "network namespace, each run into a fresh empty Orthanc (SQLite index, storage on the same disk)."
    )
    paired_text = ", ".join(f"{r:.2f}x" for r in paired)
    return "\n".join(
        [
            "## Delivery (C-STORE to Orthanc)",
            "",
            intro,
            "",
            f"- command: `{_command()}`",
            machine(("netrt", "pynetdicom", "pydicom")).markdown(),
            f"- runs: {options.runs} per sender, alternating the order; `os.sync()` before each; every run "
            f"checked that Orthanc holds all {count} instances",
            "- `TCP_NODELAY=1` for storescu and Orthanc (dcmtk); NETRT sets TCP_NODELAY on its socket",
            "",
            table,
            "",
            f"**Target: NETRT / storescu <= {TARGET_RATIO:g}x: {verdict(ratio, TARGET_RATIO)}.** "
            f"Per-run paired ratios: {paired_text}.",
            "",
            "Where NETRT's extra time goes (cProfile of both pynetdicom threads, outside the timed runs): each "
            "instance is one request/response round trip for both senders, but pynetdicom builds and encodes "
            "each C-STORE-RQ command set with pydicom and moves every 16 KB P-DATA PDU (Orthanc's maximum) "
            "through a queue, its state machine and events in Python on a second thread. Its threads no longer "
            "poll (`netrt.reactor`: they wait on events, and the network thread is woken once per message). "
            "NETRT's own work: the file meta of every file before the association (parsed from its first 4 KiB), "
            "the SHA-256 of each file for the progress file on a background thread while the destination "
            "answers, one progress line per acknowledged instance, flushed, fsync'd once a second.",
            "",
            summary_row(
                figure="2. Deliver",
                netrt=f"{median(times['netrt']):.2f} s ({count} instances)",
                comparison=f"{median(times['storescu']):.2f} s: dcmtk storescu -> Orthanc",
                ratio=ratio,
                target=f"<= {TARGET_RATIO:g}x",
                met=ratio <= TARGET_RATIO,
                command=_command(),
            ),
            "",
        ]
    )


def _command() -> str:
    if sys.argv and sys.argv[0].endswith("deliver.py"):  # run as `python -m bench.deliver`
        return " ".join([".venv/bin/python -m bench.deliver", *sys.argv[1:]])
    return command_line()


def _orthanc_version() -> str:
    try:
        first = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "(unknown version)"
    return first.split("\n", 1)[0].replace("Orthanc ", "") or "(unknown version)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deliver", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny study and 1 run: checks the benchmark works")
    parser.add_argument("--runs", type=int, help="runs per sender; the median is reported (default 3, smoke 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to update (default BENCHMARKS.md)")
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (1 if args.smoke else 3)
    if runs < 1:
        parser.error("--runs must be at least 1")
    options = Options(smoke=args.smoke, runs=runs, out=args.out, profile=False)
    section = run(options)
    print(section)
    write_section(options.out, FIGURE, section)
    print(f"{FIGURE}: section written to {options.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
