"""Figure "orchestration": what Prefect adds per study, flow vs the same `netrt` calls, in one run.

A phantom (256x256x60, 10 ROIs; ``--smoke``: 64x64x20) goes ``runs`` times through the
process-study flow and through direct calls of the functions its tasks wrap, alternating the
order, in one worker process (:mod:`bench.orchestration_worker`) talking to a real local Prefect
server (SQLite) started for the figure. Target (issue 20): overhead per study at most 0.5 s.
"""

from __future__ import annotations

import json
import os
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

FIGURE = "orchestration"
WORKER_TIMEOUT_S = 1200
#: Issue 20's target for what Prefect adds per study (it was max(1 s, 10 % of direct) before).
TARGET_OVERHEAD_S = 0.5


def run(options: Options) -> str:
    from flows.local_server import start_local_server, stop_local_server
    from netrt.config import load_config
    from netrt.phantom import PhantomSpec, write_phantom
    from netrt.prefect_env import api_url, prefect_environment

    root = Path(tempfile.mkdtemp(prefix="netrt-bench-orchestration-"))
    size = (64, 64, 20, 0) if options.smoke else (256, 256, 60, 6)
    try:
        write_phantom(
            PhantomSpec(rows=size[0], columns=size[1], slices=size[2], slice_spacing=2.0, extra_spheres=size[3]),
            root / "phantom",
        )
        server_config = root / "server.yaml"
        server_config.write_text(
            f"paths: {{data_dir: {root / 'server'}}}\nprefect: {{server_port: {free_port()}}}\n", encoding="utf-8"
        )
        config = load_config(server_config)
        env = prefect_environment(config)
        # A loaded machine can take longer than netrt's default wait for the server to answer.
        server = start_local_server(env, api_url(config), root / "server" / "prefect-server.log", ready_timeout=300)
        try:
            result = root / "result.json"
            started = time.perf_counter()
            completed = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.orchestration_worker",
                    "--input",
                    str(root / "phantom" / "dicom"),
                    "--root",
                    str(root / "runs"),
                    "--runs",
                    str(options.runs),
                    "--result",
                    str(result),
                ],
                cwd=REPO_ROOT,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=WORKER_TIMEOUT_S,
                check=False,
            )
            if completed.returncode != 0:
                tail = "\n".join(completed.stderr.strip().splitlines()[-30:])
                raise RuntimeError(f"orchestration worker failed (exit {completed.returncode}):\n{tail}")
            times: dict[str, list[float]] = json.loads(result.read_text(encoding="utf-8"))
            print(f"orchestration: measured in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        finally:
            stop_local_server(server)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    flow, direct = median(times["flow"]), median(times["direct"])
    overheads = [f - d for f, d in zip(times["flow"], times["direct"], strict=True)]
    overhead = median(overheads)
    allowed = TARGET_OVERHEAD_S
    met = overhead <= allowed
    verdict = "met" if met else f"**missed by {overhead - allowed:.2f} s**"
    table = markdown_table(
        ["variant", "median s", "runs"],
        [
            ["process-study flow (running server, SQLite)", f"{flow:.2f}", spread(times["flow"])],
            ["the same netrt calls, direct", f"{direct:.2f}", spread(times["direct"])],
            ["overhead per study (paired median)", f"{overhead:.2f}", spread(overheads)],
        ],
    )
    what = "64x64x20 phantom, 4 ROIs (smoke)" if options.smoke else "256x256x60 phantom, 10 ROIs"
    return (
        f"## Orchestration overhead\n\n{what}; {options.runs} runs per variant, alternating, one process, "
        f"fresh data dir per run (no cache hits). Flow runs as `netrt process` makes them: in the worker's "
        "process, without flow-run heartbeats (served deployment runs keep Prefect's heartbeats, whose thread "
        f"Prefect joins in 1 s steps at the end of a run: the end-to-end figure includes that).\n\n{table}\n\n"
        f"Target (issue 20): overhead per study <= {allowed:.2f} s: {verdict} "
        f"({overhead:.2f} s, {100 * overhead / direct:.1f} % of direct).\n\n"
        f"{machine(('netrt', 'prefect', 'pydicom', 'SimpleITK')).markdown()}\n- command: `{command_line()}`\n\n"
        + summary_row(
            figure="5. Orchestration overhead",
            netrt=f"{flow:.2f} s flow; overhead {overhead:.2f} s/study",
            comparison=f"{direct:.2f} s: the same calls direct",
            ratio=flow / direct,
            target=f"overhead <= {allowed:.2f} s",
            met=met,
            command=command_line(),
            note="" if met else f"by {overhead - allowed:.2f} s",
        )
        + "\n"
    )
