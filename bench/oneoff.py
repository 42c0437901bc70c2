"""Figure "oneoff": what a one-off `netrt process` costs beyond its work, cold, in a fresh process.

The default phantom (`netrt phantom OUT`: 256x256, 60 slices, 6 ROIs; ``--smoke``: 64x64x20) is
processed ``runs`` times by ``python -m netrt process DIR --config FILE`` in a fresh process, and as
many times by a fresh process making the same netrt calls directly (:mod:`bench.oneoff_direct`),
alternating the order. Both wall times count interpreter start, imports and exit. Before every run
the data dir's outputs, work files and results cache are removed, so neither side hits a cache.
The netrt commands run against the data dir's background local Prefect server, which the first
command (timed on its own, before the alternating runs) starts and leaves running, as a user's
first command does; the figure stops it at the end with `netrt server stop`.

Figures: overhead = median of paired (netrt - direct) differences, target <= 5 s; and the
overhead beyond the stage times the run reports itself (its summary's "Time per stage").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

FIGURE = "oneoff"
TARGET_S = 5.0
RUN_TIMEOUT_S = 900


def _timed(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}"
        )
    return seconds, done


def _stage_seconds(data_dir: Path) -> float:
    """The sum of the "Time per stage" table of the run's summary.md (the only study's)."""
    (summary,) = list((data_dir / "work").glob("*/summary.md"))
    text = summary.read_text(encoding="utf-8")
    table = text[text.index("## Time per stage") :]
    rows = re.findall(r"^\| ([a-z][\w-]*(?: [\w-]+)*) \| (\d+\.\d+) \|", table, flags=re.MULTILINE)
    if not rows:
        raise RuntimeError(f"no stage times in {summary}")
    return sum(float(seconds) for _, seconds in rows)


def _clean(data_dir: Path) -> None:
    """No cache hits for the next run: outputs, work files, results cache and moved studies go."""
    for name in ("output", "work", "cache", "processed", "quarantine"):
        shutil.rmtree(data_dir / name, ignore_errors=True)


def run(options: Options) -> str:
    from netrt.phantom import PhantomSpec, write_phantom

    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="netrt-bench-oneoff-"))
    spec = PhantomSpec(rows=64, columns=64, slices=20) if options.smoke else PhantomSpec()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NETRT_"))}
    netrt = [sys.executable, "-m", "netrt"]
    try:
        manifest = write_phantom(spec, root / "phantom")
        dicom = root / "phantom" / "dicom"
        data = root / "data"
        config = root / "netrt.yaml"
        config.write_text(f"paths: {{data_dir: {data}}}\nprefect: {{server_port: {free_port()}}}\n", encoding="utf-8")
        process = [*netrt, "process", str(dicom), "--config", str(config)]
        direct = [sys.executable, "-m", "bench.oneoff_direct", "--input", str(dicom), "--config", str(config)]
        try:
            first, done = _timed(process, env)
            if "starting the local Prefect server in the background" not in done.stdout:
                raise RuntimeError(f"the first command did not start the background server:\n{done.stdout}")
            first_stages = _stage_seconds(data)
            times: dict[str, list[float]] = {"netrt": [], "direct": [], "stages": []}
            for index in range(options.runs):
                order = ("netrt", "direct") if index % 2 == 0 else ("direct", "netrt")
                for variant in order:
                    _clean(data)
                    seconds, done = _timed(process if variant == "netrt" else direct, env)
                    if variant == "netrt":
                        if "starting the local Prefect server" in done.stdout:
                            raise RuntimeError("a later command started a server instead of reusing the running one")
                        times["stages"].append(_stage_seconds(data))
                    times[variant].append(seconds)
        finally:
            subprocess.run(
                [*netrt, "server", "stop", "--config", str(config)], env=env, capture_output=True, timeout=60
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    paired = [n - d for n, d in zip(times["netrt"], times["direct"], strict=True)]
    beyond = [n - s for n, s in zip(times["netrt"], times["stages"], strict=True)]
    overhead, beyond_stages = median(paired), median(beyond)
    netrt_s, direct_s, stages_s = median(times["netrt"]), median(times["direct"]), median(times["stages"])
    met = overhead <= TARGET_S
    verdict = "met" if met else f"**missed by {overhead - TARGET_S:.2f} s**"
    beyond_verdict = "met" if beyond_stages <= TARGET_S else f"**missed by {beyond_stages - TARGET_S:.2f} s**"
    what = f"{spec.rows}x{spec.columns}x{len(manifest.image_files)} phantom, {len(manifest.rois)} ROIs" + (
        " (smoke)" if options.smoke else " (`netrt phantom OUT` defaults)"
    )
    table = markdown_table(
        ["variant (fresh process each, wall time incl. interpreter start, imports, exit)", "median s", "runs"],
        [
            ["`netrt process DIR` (background server already running)", f"{netrt_s:.2f}", spread(times["netrt"])],
            [
                "the same netrt calls, direct (`python -m bench.oneoff_direct`)",
                f"{direct_s:.2f}",
                spread(times["direct"]),
            ],
            ["**overhead: netrt - direct (paired median)**", f"**{overhead:.2f}**", spread(paired)],
            [
                "stage times the run reports (its summary's Time per stage, summed)",
                f"{stages_s:.2f}",
                spread(times["stages"]),
            ],
            ["overhead beyond the reported stage times (paired median)", f"{beyond_stages:.2f}", spread(beyond)],
            [
                "first command of a data dir (starts the background server; 1 run)",
                f"{first:.2f}",
                f"stages {first_stages:.2f}",
            ],
        ],
    )
    load = os.getloadavg()
    busy = max(load_before[0], load[0]) > 1.5
    shared = (
        " **The machine was busy with other work (1-min load above 1.5): these times are longer than on a quiet "
        "machine; both variants ran under the same load, alternating.**"
        if busy
        else ""
    )
    return (
        f"## One-off command overhead\n\n{what}; {options.runs} runs per variant, alternating, each in a fresh "
        "process; the data dir's outputs, work files and results cache removed before every run (no cache hits). "
        "The netrt runs use the data dir's background local Prefect server, started by the first command "
        "(timed alone, last row) and reused by the others, as a user's later commands reuse it.\n\n"
        f"{table}\n\n"
        f"Target: overhead <= {TARGET_S:g} s: {verdict} ({overhead:.2f} s). Beyond the stage times the run "
        f"reports: {beyond_stages:.2f} s ({beyond_verdict}); the stage times of concurrent stages (axial beside "
        "the reformats) add up to more than their wall time, so this difference is a lower bound.\n\n"
        f"{machine(('netrt', 'prefect', 'pydicom', 'SimpleITK')).markdown()}\n"
        f"- load average (1, 5, 15 min) at the start: {load_before[0]:.2f}, {load_before[1]:.2f}, "
        f"{load_before[2]:.2f}; at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}{shared}\n"
        f"- command: `{command_line()}`\n\n"
        + summary_row(
            figure="8. One-off `netrt process` overhead",
            netrt=f"{netrt_s:.2f} s; overhead {overhead:.2f} s",
            comparison=f"{direct_s:.2f} s: the same calls direct, fresh process",
            ratio=netrt_s / direct_s,
            target=f"overhead <= {TARGET_S:g} s",
            met=met,
            command=command_line(),
            note="" if met else f"by {overhead - TARGET_S:.2f} s",
        )
        + "\n"
    )
