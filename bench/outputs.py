"""Figure "outputs": what SEG and the colour series cost beside the overlay series (issue 17).

The 512x512x200 phantom with 10 ROIs (``--smoke``: 64x64x20) is processed by a fresh process per
run (:mod:`bench.outputs_worker`: validate, masks, every kind's series per plane, folder delivery)
with ``outputs: [overlay]`` and with ``outputs: [overlay, seg, color]``, alternating; the figure is
the ratio of the median wall times of the processing (imports excluded), target <= 1.6x. The peak
RSS of each variant is reported beside it. Then one run of each variant on a 1000-slice phantom
(``--smoke``: 60 slices) gives the peak RSS of all outputs against the decoded pixel bytes,
target < 3x.
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
from typing import Any

from bench.report import (
    REPO_ROOT,
    Options,
    command_line,
    machine,
    markdown_table,
    median,
    spread,
    summary_row,
)

FIGURE = "outputs"
TARGET_RATIO = 1.6
TARGET_RSS = 3.0
WORKER_TIMEOUT_S = 1800
VARIANTS = {"overlay": ["overlay"], "all": ["overlay", "seg", "color"]}


def _phantom(root: Path, rows: int, slices: int, spacing: float) -> Path:
    from netrt.phantom import PhantomSpec, write_phantom

    # The phantom's shapes, 5 extra spheres, skull and outline: the default ignore_rois drops the
    # last two; the kept ROIs are listed in the figure from the worker's report.
    spec = PhantomSpec(
        rows=rows, columns=rows, pixel_spacing=(0.98, 0.98), slice_spacing=spacing, slices=slices, extra_spheres=5
    )
    write_phantom(spec, root)
    return root / "dicom"


def _run(variant: str, dicom: Path, work: Path) -> dict[str, Any]:
    result = work.parent / f"{work.name}.json"
    command = [
        sys.executable,
        "-m",
        "bench.outputs_worker",
        "--input",
        str(dicom),
        "--work",
        str(work),
        "--result",
        str(result),
        "--outputs",
        ",".join(VARIANTS[variant]),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"outputs worker {variant} failed:\n{done.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    shutil.rmtree(work, ignore_errors=True)
    result.unlink()
    os.sync()
    return data


def io_floor(inputs: Path, sizes: list[int], work: Path) -> float:
    """Seconds to do only the I/O of one run: read every input file, write files of ``sizes``
    (temp name + rename, as NETRT's writers do), hard-link them into a folder and ``os.sync``
    (as the folder delivery does). No DICOM, no pixels computed: what no implementation writing
    these same files can beat on this disk. The bytes are random (no file system shortcut)."""
    payload = os.urandom(max(sizes, default=0))
    started = time.perf_counter()
    for path in sorted(inputs.iterdir()):
        path.read_bytes()
    written, delivered = work / "written", work / "delivered"
    written.mkdir(parents=True)
    delivered.mkdir()
    for index, size in enumerate(sizes):
        temporary, final = written / f".{index}.tmp", written / f"{index}.dcm"
        with open(temporary, "wb") as handle:
            handle.write(memoryview(payload)[:size])
        os.replace(temporary, final)
    for index in range(len(sizes)):
        os.link(written / f"{index}.dcm", delivered / f"{index}.dcm")
    os.sync()
    seconds = time.perf_counter() - started
    shutil.rmtree(work)
    os.sync()
    return seconds


def run(options: Options) -> str:
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="netrt-bench-outputs-"))
    rows, slices, big = (64, 20, 60) if options.smoke else (512, 200, 1000)
    try:
        dicom = _phantom(root / "phantom", rows, slices, 2.5)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
        floors: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for index in range(options.runs):
            order = list(VARIANTS) if index % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                data = _run(variant, dicom, root / f"run{index}-{variant}")
                runs[variant].append(data)
                print(f"outputs: run {index + 1} {variant}: {data['seconds']:.2f} s", file=sys.stderr)
                floors[variant].append(io_floor(dicom, data["sizes"], root / f"floor{index}-{variant}"))
        shutil.rmtree(root / "phantom")
        big_dicom = _phantom(root / "big", rows, big, 1.0)
        scale = {variant: _run(variant, big_dicom, root / f"big-{variant}") for variant in VARIANTS}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    seconds = {v: [float(r["seconds"]) for r in runs[v]] for v in VARIANTS}
    ratios = [a / o for a, o in zip(seconds["all"], seconds["overlay"], strict=True)]
    ratio = median(seconds["all"]) / median(seconds["overlay"])
    floor_ratio = median(floors["all"]) / median(floors["overlay"])

    def stage(variant: str, name: str) -> float:
        return median([float(r["stages"].get(name, 0.0)) for r in runs[variant]])

    extra = {
        "color": sum(stage("all", name) for name in runs["all"][0]["stages"] if name.startswith("write color")),
        "seg": stage("all", "write seg"),
        "deliver": stage("all", "deliver") - stage("overlay", "deliver"),
    }
    megabytes = {v: sum(runs[v][0]["sizes"]) / 1e6 for v in VARIANTS}
    met = ratio <= TARGET_RATIO
    first = runs["all"][0]
    stage_names = list(first["stages"])
    stage_rows = [
        [
            stage,
            f"{median([float(r['stages'].get(stage, 0.0)) for r in runs['overlay']]):.2f}",
            f"{median([float(r['stages'][stage]) for r in runs['all']]):.2f}",
        ]
        for stage in stage_names
    ]
    pixels = scale["all"]["decoded_pixel_bytes"]
    rss_ratio = scale["all"]["peak_rss_kib"] * 1024 / pixels
    rss_met = rss_ratio < TARGET_RSS
    table = markdown_table(
        ["variant", "median s (processing, imports excluded)", "runs", "peak RSS MiB"],
        [
            [
                f"`outputs: [{', '.join(VARIANTS[v])}]`",
                f"{median(seconds[v]):.2f}",
                spread(seconds[v]),
                f"{median([r['peak_rss_kib'] / 1024 for r in runs[v]]):.0f}",
            ]
            for v in VARIANTS
        ],
    )
    load = os.getloadavg()
    busy = max(load_before[0], load[0]) > 1.5
    verdict = "met" if met else f"**missed** ({ratio:.2f}x against {TARGET_RATIO}x)"
    rss_verdict = "met" if rss_met else f"**missed** ({rss_ratio:.2f}x against < {TARGET_RSS}x)"
    return (
        f"## Output kinds: SEG and colour beside the overlay series\n\n"
        f"{rows}x{rows}x{slices} phantom, {len(first['rois'])} ROIs kept ({', '.join(first['rois'])}); "
        f"{options.runs} runs per variant in fresh processes, alternating; each run: validate, masks, every "
        "kind's series in axial, coronal and sagittal (SEG once), delivery to a folder. Imports are excluded on "
        "both sides: the variant with SEG and colour imports highdicom (about 0.6 s, once per process; NETRT "
        "imports it only where those kinds are written) before its clock starts, as both import netrt's "
        "modules, pydicom and SimpleITK.\n\n"
        f"{table}\n\n"
        f"**Ratio all / overlay-only: {ratio:.2f}x** (paired: {spread(ratios)}); target <= {TARGET_RATIO}x: "
        f"{verdict}.\n\n"
        f"I/O floor of the same output (`io_floor`: read the inputs, write files of the same sizes with a temp "
        "name and rename, hard-link them into a folder, `os.sync`; nothing computed, alternating with the runs "
        f"above): overlay only {megabytes['overlay']:.0f} MB in {len(runs['overlay'][0]['sizes'])} files, "
        f"{median(floors['overlay']):.2f} s ({spread(floors['overlay'])}); all {megabytes['all']:.0f} MB in "
        f"{len(runs['all'][0]['sizes'])} files, {median(floors['all']):.2f} s ({spread(floors['all'])}): "
        f"**floor ratio {floor_ratio:.2f}x**. NETRT / floor: overlay only "
        f"{median(seconds['overlay']) / median(floors['overlay']):.2f}x, all "
        f"{median(seconds['all']) / median(floors['all']):.2f}x.\n\nMedian seconds per stage:\n\n"
        + markdown_table(["stage", "overlay only", "overlay, seg, color"], stage_rows)
        + f"\n\nWhere the extra time goes (stage rows above): the colour series {extra['color']:.2f} s (coronal and "
        "sagittal read their image from the overlay series of the plane instead of resampling the source again; "
        "then each slice is windowed, drawn and written as RGB, 1.5 times the bytes of the grey slice), the SEG "
        f"{extra['seg']:.2f} s, and delivery "
        f"{extra['deliver']:.2f} s more (hard links, then `os.sync` of "
        f"{megabytes['all'] - megabytes['overlay']:.0f} MB more). The floor ratio above is what the extra bytes "
        f"alone cost: the extra output is {(megabytes['all'] - megabytes['overlay']) / megabytes['overlay']:.2f} "
        "times the overlay series' bytes, so the ratio can only reach the target while NETRT's overlay-only run "
        "stays far above its own floor."
        + f"\n\n{big} slices ({rows}x{rows}, decoded pixels {pixels / 2**20:.0f} MiB), one run each: peak RSS "
        f"overlay only {scale['overlay']['peak_rss_kib'] / 1024:.0f} MiB, all outputs "
        f"{scale['all']['peak_rss_kib'] / 1024:.0f} MiB = **{rss_ratio:.2f}x** the decoded pixels; target < "
        f"{TARGET_RSS:g}x: {rss_verdict}.\n\n"
        f"{machine(('netrt', 'highdicom', 'pydicom', 'SimpleITK', 'pillow')).markdown()}\n"
        f"- load average at the start: {load_before[0]:.2f}; at the end: {load[0]:.2f}"
        + (" (**busy machine: times are longer than on a quiet one**)" if busy else "")
        + f"\n- command: `{command_line()}`\n\n"
        + summary_row(
            figure="9. Output kinds: overlay+SEG+colour vs overlay only",
            netrt=f"{median(seconds['all']):.2f} s; {big}-slice peak RSS {rss_ratio:.2f}x pixels",
            comparison=f"{median(seconds['overlay']):.2f} s overlay only",
            ratio=ratio,
            target=f"<= {TARGET_RATIO}x; RSS < {TARGET_RSS:g}x",
            met=met and rss_met,
            command=command_line(),
            note="" if met and rss_met else f"time {ratio:.2f}x, RSS {rss_ratio:.2f}x",
        )
        + "\n"
    )
