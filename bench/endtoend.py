"""Figure "endtoend": a real node (`netrt serve`) from the last C-STORE acknowledged to the last
instance delivered, minus the idle timeout, against the same processing done by direct calls.

`netrt serve` starts as a user runs it (local Prefect server, the served flow deployments, the
DICOM listener on 127.0.0.1; one folder destination) and stays up for the whole figure. Per run a
phantom study (512x512x200, 10 ROIs, as in the process figure; ``--smoke``: 64x64x20) with its own
UIDs (seed = run index) is sent by dcmtk ``storescu +sd``; the clock starts when storescu exits
(every instance acknowledged) and stops at the time of the transaction log's ``delivered`` entry
for that study (written once the destination holds every instance). Reported: that time minus
``listener.study_idle_seconds`` (the wait that defines a study as complete), split by the
transaction log's ``flow_run_created`` and ``flow_run_started`` entries.

Comparison, alternating with the node's runs while the node idles: the same phantom through the
direct ``netrt`` calls (validate, masks, three planes, deliver to a folder) in a fresh process
(:mod:`bench.process_worker`), i.e. what the node does per study without the node. No target is
set by issue 9 for this figure; the ratio shows what the node costs on top of the processing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.process import FULL, SMOKE, PhantomSize
from bench.process_worker import NETRT_STAGES
from bench.report import (
    REPO_ROOT,
    Options,
    command_line,
    free_port,
    machine,
    markdown_table,
    median,
    spread,
    summary_row,
)

FIGURE = "endtoend"
IDLE_SECONDS = 2.0
#: Issue 20's target for node / direct.
TARGET_RATIO = 1.3
START_TIMEOUT_S = 240
RUN_TIMEOUT_S = 900
LOCALHOST = "127.0.0.1"


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Node:
    """One `netrt serve` process; stopped with SIGTERM, everything it started killed if that fails."""

    def __init__(self, config: Path, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.log = log
        self._out = log.open("w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "netrt", "serve", "--config", str(config)],
            cwd=REPO_ROOT,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if "NETRT is running" in log.read_text(encoding="utf-8", errors="replace"):
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("netrt serve did not come up:\n" + self.output()[-3000:])

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        victims = [self.process.pid, *_descendants(self.process.pid)]
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=90)
        for pid in victims:  # whatever outlived the SIGTERM (the node's own children)
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=30)
        self._out.close()


def _entries(log: Path, study: str) -> dict[str, dict[str, Any]]:
    """The last transaction-log entry of each event for ``study``."""
    found: dict[str, dict[str, Any]] = {}
    if not log.exists():
        return found
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        if entry.get("study_instance_uid") == study:
            found[str(entry["event"])] = entry
    return found


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _send(folder: Path, port: int) -> float:
    """storescu the folder; the wall-clock time (epoch s) at which it exited, all acknowledged."""
    storescu = shutil.which("storescu")
    if storescu is None:
        raise RuntimeError("storescu is not installed (Debian package dcmtk)")
    done = subprocess.run(
        [storescu, "-aec", "NETRT", "+sd", LOCALHOST, str(port), str(folder)],
        env={**os.environ, "TCP_NODELAY": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    ended = time.time()
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return ended


def _node_run(node: Node, data: Path, folder: Path, study: str, port: int, expected_files: int) -> dict[str, float]:
    acknowledged = _send(folder, port)
    from netrt.layout import DataLayout

    log = DataLayout.from_data_dir(data).transaction_log
    deadline = time.monotonic() + RUN_TIMEOUT_S
    entries: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        entries = _entries(log, study)
        if "delivered" in entries or "delivery_failed" in entries or "flow_run_failed" in entries:
            break
        if node.process.poll() is not None:
            raise RuntimeError("netrt serve exited during the run:\n" + node.output()[-3000:])
        time.sleep(0.05)
    if "delivered" not in entries:
        raise RuntimeError(f"study {study} was not delivered: {sorted(entries)}\n{node.output()[-3000:]}")
    delivered_files = sum(len(files) for _, _, files in os.walk(data / "bench-output" / study))
    if delivered_files != expected_files:
        raise RuntimeError(f"study {study}: {delivered_files} files delivered, expected {expected_files}")
    times = {event: _epoch(entries[event]["time"]) for event in ("flow_run_created", "flow_run_started", "delivered")}
    return {
        "total": times["delivered"] - acknowledged - IDLE_SECONDS,
        "completion": times["flow_run_created"] - acknowledged - IDLE_SECONDS,
        "scheduling": times["flow_run_started"] - times["flow_run_created"],
        "flow": times["delivered"] - times["flow_run_started"],
    }


def _direct_run(folder: Path, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    result = work.parent / f"{work.name}.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.process_worker",
            "netrt",
            "--input",
            str(folder),
            "--work",
            str(work),
            "--result",
            str(result),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"direct run failed: {done.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    shutil.rmtree(work)
    return data


SMOKE_NOTE = " (smoke sizes: checks the benchmark runs; not a figure)"


def run(options: Options) -> str:
    from netrt.phantom import PhantomSpec, write_phantom

    size: PhantomSize = SMOKE if options.smoke else FULL
    root = Path(tempfile.mkdtemp(prefix="netrt-bench-endtoend-"))
    try:
        started = time.perf_counter()
        phantoms: list[tuple[Path, str]] = []
        for index in range(options.runs):
            spec = PhantomSpec(
                rows=size.rows,
                columns=size.columns,
                pixel_spacing=size.pixel_spacing,
                slice_spacing=size.slice_spacing,
                slices=size.slices,
                extra_spheres=size.extra_spheres,
                seed=index,
            )
            manifest = write_phantom(spec, root / f"phantom{index}")
            phantoms.append((root / f"phantom{index}" / "dicom", manifest.study_instance_uid))
        input_files = len(list(phantoms[0][0].iterdir()))
        data = root / "data"
        port = free_port()
        config = root / "netrt.yaml"
        config.write_text(
            f"paths: {{data_dir: {data}}}\n"
            f"prefect: {{server_port: {free_port()}}}\n"
            f"listener: {{host: {LOCALHOST}, port: {port}, study_idle_seconds: {IDLE_SECONDS}}}\n"
            f"destinations: [{{name: bench, type: folder, path: {data / 'bench-output'}}}]\n",
            encoding="utf-8",
        )
        os.sync()
        print(f"endtoend: starting netrt serve under {root}", file=sys.stderr)
        node_started = time.perf_counter()
        try:
            node = Node(config, root / "serve.log")
        except RuntimeError as exc:  # on a loaded machine the local Prefect server can miss netrt's 90 s
            print(f"endtoend: {exc}\nendtoend: starting netrt serve once more", file=sys.stderr)
            node = Node(config, root / "serve-2.log")
        startup = time.perf_counter() - node_started
        node_runs: list[dict[str, float]] = []
        direct_runs: list[dict[str, Any]] = []
        orders = []
        try:
            expected: int | None = None
            for index, (folder, study) in enumerate(phantoms):
                order = ("node", "direct") if index % 2 == 0 else ("direct", "node")
                orders.append(" -> ".join(order))
                for variant in order:
                    if variant == "direct":
                        direct = _direct_run(phantoms[0][0], root / f"direct{index}")
                        expected = sum(int(o["files"]) for o in direct["outputs"].values())
                        direct_runs.append(direct)
                        took = sum(float(direct["stages"][s]) for s in NETRT_STAGES)
                    else:
                        if expected is None:  # the node's first run: the direct run has not told the count yet
                            expected = size.slices + 2 * max(size.rows, size.columns)
                        node_runs.append(_node_run(node, data, folder, study, port, expected))
                        took = node_runs[-1]["total"]
                    os.sync()
                    print(f"endtoend: run {index + 1}/{options.runs} {variant}: {took:.2f} s", file=sys.stderr)
        finally:
            node.stop()
        print(f"endtoend: measured in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return render(options, size, input_files, startup, node_runs, direct_runs, orders)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def render(
    options: Options,
    size: PhantomSize,
    input_files: int,
    startup: float,
    node_runs: list[dict[str, float]],
    direct_runs: list[dict[str, Any]],
    orders: list[str],
) -> str:
    def seconds(values: list[float]) -> str:
        return f"{median(values):.2f} ({spread(values)})"

    def part(name: str) -> str:
        return seconds([r[name] for r in node_runs])

    node_total = [r["total"] for r in node_runs]
    direct_total = [sum(float(d["stages"][s]) for s in NETRT_STAGES) for d in direct_runs]
    ratio = median(node_total) / median(direct_total)
    outputs = direct_runs[0]["outputs"]
    files = sum(int(o["files"]) for o in outputs.values())
    paired = [n / d for n, d in zip(node_total, direct_total, strict=True)]
    idle = f"{IDLE_SECONDS:g}"
    rows = [
        ["**node: last C-STORE acknowledged -> last instance delivered, minus idle**", seconds(node_total)],
        [f"- completion: ack -> `flow_run_created`, minus the {idle} s idle", part("completion")],
        ["- scheduling: `flow_run_created` -> `flow_run_started`", part("scheduling")],
        ["- flow: `flow_run_started` -> `delivered` (validate ... deliver, in Prefect)", part("flow")],
        ["**direct `netrt` calls, same study (validate, masks, 3 planes, deliver)**", seconds(direct_total)],
    ]
    lines = [
        "## End to end (`netrt serve`)",
        "",
        f"{size.describe()} with 10 ROIs ({input_files} files) sent by dcmtk `storescu +sd` to a running "
        f"`netrt serve` (local Prefect server, served deployments, listener on 127.0.0.1, "
        f"`listener.study_idle_seconds: {IDLE_SECONDS:g}`, default processing, one folder destination); NETRT "
        f"writes and delivers {files} files. A new study (own UIDs) per run; the node runs for the whole figure "
        f"(its start-up took {startup:.0f} s and is not counted).",
        "",
        f"- command: `{command_line()}`" + (SMOKE_NOTE if options.smoke else ""),
        machine(("netrt", "prefect", "pynetdicom", "pydicom", "SimpleITK")).markdown(),
        f"- runs: {len(node_runs)} per variant, alternating ({'; '.join(orders)}); `os.sync()` after each. "
        "Clock: storescu's exit (every instance acknowledged) to the `time` of the transaction log's "
        "`delivered` entry (ms resolution, same clock)",
        "",
        markdown_table(["what", "median s (min-max)"], rows),
        "",
        f"Node / direct = **{ratio:.2f}x** (what the node adds per study on top of the processing itself). "
        f"Target (issue 20): <= {TARGET_RATIO:g}x: "
        + ("met" if ratio <= TARGET_RATIO else f"**missed by {ratio - TARGET_RATIO:.2f}x**")
        + f". Per-run paired ratios: {', '.join(f'{r:.2f}x' for r in paired)}.",
        "",
        summary_row(
            figure="4. End to end (serve)",
            netrt=f"{median(node_total):.2f} s (ack -> delivered - idle)",
            comparison=f"{median(direct_total):.2f} s: the same calls direct",
            ratio=ratio,
            target=f"<= {TARGET_RATIO:g}x",
            met=ratio <= TARGET_RATIO,
            command=command_line(),
            note="" if ratio <= TARGET_RATIO else f"by {ratio - TARGET_RATIO:.2f}x",
        ),
    ]
    return "\n".join(lines) + "\n"
