"""Figure "flowmemory": peak memory of one flow run, `netrt process` on a 1000-slice study.

Issue 20's row "1000-slice flow run peak RSS": the process-study flow as users run it (`python -m
netrt process DIR --config FILE`, the flow in that process, the write tasks scheduled as in
production: axial kinds beside the reformats, coronal and sagittal one after the other) on a
512x512x1000 phantom with 10 ROIs (``--smoke``: 64x64x100), default processing and one folder
destination. The Prefect server runs in its own background process and is not counted.

Peak RSS: the command runs under a tiny Python wrapper (:data:`_WRAPPER`) whose only child it is;
the wrapper reports ``getrusage(RUSAGE_CHILDREN).ru_maxrss``, the largest resident set of its waited
children, i.e. of the `netrt` process. (Linux carries a parent's peak into a forked child's
ru_maxrss until exec; the wrapper's own ~10 MiB is what could leak in, far below the figure.)
Divided by the decoded pixel bytes (rows x columns x slices x 2). One run per size by default
(``--runs`` more; the median is reported): each takes over a minute and the peak barely varies.
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

FIGURE = "flowmemory"
TARGET_RATIO = 2.0
RUN_TIMEOUT_S = 1800

_WRAPPER = (
    "import json, resource, subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "seconds = time.perf_counter() - start\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'code': done.returncode, 'peak_kib': peak, 'seconds': seconds,"
    " 'stdout': done.stdout[-4000:], 'stderr': done.stderr[-4000:]}))\n"
)


def _measure(command: list[str], env: dict[str, str]) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *command],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"measuring wrapper failed (exit {done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed (exit {result['code']}):\n{result['stdout']}\n{result['stderr']}"
        )
    return result


def run(options: Options) -> str:
    from netrt.phantom import PhantomSpec, write_phantom

    rows, slices = (64, 100) if options.smoke else (512, 1000)
    spec = PhantomSpec(
        rows=rows, columns=rows, pixel_spacing=(0.98, 0.98), slice_spacing=2.5, slices=slices, extra_spheres=4
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NETRT_"))}
    netrt = [sys.executable, "-m", "netrt"]
    root = Path(tempfile.mkdtemp(prefix="netrt-bench-flowmemory-"))
    peaks: list[float] = []
    seconds: list[float] = []
    try:
        manifest = write_phantom(spec, root / "phantom")
        data = root / "data"
        config = root / "netrt.yaml"
        config.write_text(
            f"paths: {{data_dir: {data}}}\nprefect: {{server_port: {free_port()}}}\n"
            f"destinations: [{{name: folder, type: folder, path: {root / 'delivered'}}}]\n",
            encoding="utf-8",
        )
        process = [*netrt, "process", str(root / "phantom" / "dicom"), "--config", str(config)]
        try:
            baseline = None
            if not options.smoke:  # what the command holds for a tiny study: imports, Prefect's client
                write_phantom(PhantomSpec(rows=64, columns=64, slices=20), root / "tiny")
                tiny = [*netrt, "process", str(root / "tiny" / "dicom"), "--config", str(config)]
                baseline = float(_measure(tiny, env)["peak_kib"]) * 1024  # type: ignore[arg-type]
            for _ in range(options.runs):
                for name in ("output", "work", "cache", "processed", "quarantine"):
                    shutil.rmtree(data / name, ignore_errors=True)
                shutil.rmtree(root / "delivered", ignore_errors=True)
                started = time.perf_counter()
                result = _measure(process, env)
                print(f"flowmemory: run took {time.perf_counter() - started:.0f} s", file=sys.stderr)
                peaks.append(float(result["peak_kib"]) * 1024)  # type: ignore[arg-type]
                seconds.append(float(result["seconds"]))  # type: ignore[arg-type]
        finally:
            subprocess.run(
                [*netrt, "server", "stop", "--config", str(config)], env=env, capture_output=True, timeout=60
            )
        files = len(manifest.image_files)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    pixels = rows * rows * slices * 2
    peak = median(peaks)
    ratio = peak / pixels
    met = ratio <= TARGET_RATIO
    verdict = (
        "met" if met else f"**missed by {ratio - TARGET_RATIO:.2f}x** (needs {ratio / TARGET_RATIO:.2f} times less)"
    )
    mib = 2**20
    table = markdown_table(
        ["what", "value"],
        [
            ["decoded pixel bytes (rows x columns x slices x 2)", f"{pixels / mib:.2f} MiB"],
            [
                "peak RSS of `netrt process`, median (min-max)",
                f"{peak / mib:.1f} MiB ({spread([p / mib for p in peaks])})",
            ],
            ["**peak RSS / pixel bytes**", f"**{ratio:.2f}x**"],
            *(
                [
                    [
                        "peak RSS of the same command on a 64x64x20 study (imports, Prefect client)",
                        f"{baseline / mib:.0f} MiB",
                    ],
                    ["(peak - that) / pixel bytes: what the study itself costs", f"{(peak - baseline) / pixels:.2f}x"],
                ]
                if baseline is not None
                else []
            ),
            ["wall time of the command, median (min-max)", f"{median(seconds):.1f} s ({spread(seconds)})"],
        ],
    )
    what = f"{rows}x{rows}x{files} phantom, {len(manifest.rois)} ROIs" + (" (smoke)" if options.smoke else "")
    return (
        f"## Flow-run memory\n\n{what}: `python -m netrt process DIR --config FILE` (the process-study flow in "
        "that process, default processing: overlay series in three planes, one folder destination; the background "
        f"Prefect server not counted), {options.runs} run(s), caches removed before each.\n\n{table}\n\n"
        f"Target (issue 20): peak RSS <= {TARGET_RATIO:g}x the decoded pixel bytes: {verdict}.\n\n"
        f"{machine(('netrt', 'prefect', 'pydicom', 'SimpleITK', 'numpy')).markdown()}\n"
        f"- command: `{command_line()}`\n\n"
        + summary_row(
            figure=f"10. Flow run: peak RSS, {files} slices",
            netrt=f"{peak / mib:.0f} MiB",
            comparison=f"{pixels / mib:.0f} MiB decoded pixels",
            ratio=ratio,
            target=f"<= {TARGET_RATIO:g}x",
            met=met,
            command=command_line(),
            note="" if met else f"by {ratio - TARGET_RATIO:.2f}x",
        )
        + "\n"
    )
