"""Figure "process": NETRT's processing of one phantom study against the I/O floor, in one run.

A 512x512x200 CT phantom with 10 ROIs (``--smoke``: 64x64x20) is written once to a temp folder.
Then, ``runs`` times, alternating the order (NETRT first on even runs, the floor first on odd ones),
each variant runs in a fresh subprocess (:mod:`bench.process_worker`):

- NETRT: validate, masks, axial, coronal, sagittal (reformat + write), deliver to a folder, through
  the direct ``netrt`` calls the Prefect tasks wrap;
- the floor: pydicom reading every input file in full, writing as many files per plane as NETRT
  wrote with the same pixel dimensions and type (no computation), and copying them to a folder.

The section reports per-stage medians, the floor, the ratio NETRT total / floor total against the
1.5x target, and peak RSS. ``--profile`` adds a pyinstrument run of the slowest stage, written to
``bench/profiles/<stage>.txt``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.process_worker import NETRT_STAGES, PLANES, RTUTILS_STAGES
from bench.report import (
    REPO_ROOT,
    Options,
    command_line,
    machine,
    markdown_table,
    median,
    spread,
    summary_row,
    verdict,
)

FIGURE = "process"
TARGET_RATIO = 1.5
PROFILE_DIR = REPO_ROOT / "bench" / "profiles"
WORKER_TIMEOUT_S = 900

# Stage -> the floor's counterpart (None: pure computation, no I/O counterpart).
COUNTERPART: dict[str, str | None] = {
    "validate": "read",
    "masks": None,
    "axial": "write_axial",
    "coronal": "write_coronal",
    "sagittal": "write_sagittal",
    "deliver": "copy",
}
FLOOR_TOTAL_STAGES = ("read", "write_axial", "write_coronal", "write_sagittal", "copy")


@dataclass(frozen=True)
class PhantomSize:
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    slices: int
    extra_spheres: int = 4  # 6 standard ROIs + 4 extra spheres = 10 ROIs

    def describe(self) -> str:
        row_mm, column_mm = self.pixel_spacing
        return (
            f"{self.rows}x{self.columns}x{self.slices} CT phantom ({row_mm:g}x{column_mm:g} mm pixels, "
            f"{self.slice_spacing:g} mm slices)"
        )


FULL = PhantomSize(rows=512, columns=512, pixel_spacing=(0.98, 0.98), slice_spacing=2.5, slices=200)
SMOKE = PhantomSize(rows=64, columns=64, pixel_spacing=(4.0, 4.0), slice_spacing=6.0, slices=20)


@dataclass(frozen=True)
class Measurements:
    size: PhantomSize
    input_bytes: int
    netrt: list[dict[str, Any]]
    floor: list[dict[str, Any]]
    rtutils: list[dict[str, Any]]
    orders: list[str]

    def netrt_stage(self, stage: str) -> list[float]:
        return [float(run["stages"][stage]) for run in self.netrt]

    def floor_stage(self, stage: str) -> list[float]:
        return [float(run["stages"][stage]) for run in self.floor]

    def netrt_totals(self, stages: tuple[str, ...] = NETRT_STAGES) -> list[float]:
        return [sum(float(run["stages"][s]) for s in stages) for run in self.netrt]

    def floor_totals(self, stages: tuple[str, ...] = FLOOR_TOTAL_STAGES) -> list[float]:
        return [sum(float(run["stages"][s]) for s in stages) for run in self.floor]

    def rtutils_stage(self, stage: str) -> list[float]:
        return [float(run["stages"][stage]) for run in self.rtutils]

    def rtutils_totals(self) -> list[float]:
        return [sum(float(run["stages"][s]) for s in RTUTILS_STAGES) for run in self.rtutils]


def _write_phantom(size: PhantomSize, out_dir: Path) -> Path:
    from netrt.phantom import PhantomSpec, write_phantom

    spec = PhantomSpec(
        rows=size.rows,
        columns=size.columns,
        pixel_spacing=size.pixel_spacing,
        slice_spacing=size.slice_spacing,
        slices=size.slices,
        extra_spheres=size.extra_spheres,
    )
    write_phantom(spec, out_dir)
    return out_dir / "dicom"


def _run_worker(variant: str, input_dir: Path, work: Path, extra: list[str]) -> dict[str, Any]:
    work.mkdir(parents=True)
    result = work.parent / f"{work.name}.json"
    command = [
        sys.executable,
        "-m",
        "bench.process_worker",
        variant,
        "--input",
        str(input_dir),
        "--work",
        str(work),
        "--result",
        str(result),
        *extra,
    ]
    completed = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False
    )
    if completed.returncode != 0:
        tail = "\n".join(completed.stderr.strip().splitlines()[-30:])
        raise RuntimeError(f"benchmark worker {variant} failed (exit {completed.returncode}):\n{tail}")
    data: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    shutil.rmtree(work)
    result.unlink()
    os.sync()  # the next run starts without this run's dirty pages still being written back
    return data


def measure(size: PhantomSize, runs: int, root: Path) -> Measurements:
    input_dir = _write_phantom(size, root / "phantom")
    input_bytes = sum(path.stat().st_size for path in input_dir.iterdir())
    os.sync()
    netrt_runs: list[dict[str, Any]] = []
    floor_runs: list[dict[str, Any]] = []
    rtutils_runs: list[dict[str, Any]] = []
    orders: list[str] = []
    plan_file = root / "plan.json"
    variants = ("netrt", "floor", "rtutils")
    for index in range(runs):
        # Rotate the order; run 0 starts with NETRT, whose output plan the floor needs.
        order = variants[index % 3 :] + variants[: index % 3]
        orders.append(" -> ".join(order))
        for variant in order:
            work = root / f"run{index}-{variant}"
            if variant == "netrt":
                data = _run_worker("netrt", input_dir, work, [])
                if netrt_runs and data["outputs"] != netrt_runs[0]["outputs"]:
                    raise RuntimeError(f"run {index}: NETRT wrote {data['outputs']}, before {netrt_runs[0]['outputs']}")
                netrt_runs.append(data)
                plan_file.write_text(json.dumps(data["outputs"]), encoding="utf-8")
                total = sum(float(data["stages"][s]) for s in NETRT_STAGES)
            elif variant == "rtutils":
                data = _run_worker("rtutils", input_dir, work, [])
                rtutils_runs.append(data)
                total = sum(float(data["stages"][s]) for s in RTUTILS_STAGES)
            else:
                data = _run_worker("floor", input_dir, work, ["--plan", str(plan_file)])
                floor_runs.append(data)
                total = sum(float(data["stages"][s]) for s in FLOOR_TOTAL_STAGES)
            print(f"process: run {index + 1}/{runs} {variant}: {total:.2f} s", file=sys.stderr)
    return Measurements(size, input_bytes, netrt_runs, floor_runs, rtutils_runs, orders)


def profile_slowest(measurements: Measurements, root: Path, input_dir: Path) -> tuple[str, Path]:
    """Run NETRT once more under pyinstrument for its slowest stage (by median); return the stage and file."""
    stage = max(NETRT_STAGES, key=lambda s: median(measurements.netrt_stage(s)))
    out = PROFILE_DIR / f"{stage}.txt"
    title = f"{measurements.size.describe()}, 10 ROIs, default ProcessingConfig"
    _run_worker(
        "netrt",
        input_dir,
        root / "profile-netrt",
        ["--profile-stage", stage, "--profile-out", str(out), "--title", title],
    )
    return stage, out


def _seconds(values: list[float]) -> str:
    return f"{median(values):.2f} ({spread(values)})"


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


SCRIPT_TARGET = 1.0
NETRT_PROCESSING = ("validate", "masks", *PLANES)


def _script_comparison(m: Measurements) -> tuple[float, float, float]:
    """(NETRT processing median s, script median s, NETRT / script): both without delivery."""
    netrt = median(m.netrt_totals(NETRT_PROCESSING))
    script = median(m.rtutils_totals())
    return netrt, script, netrt / script


def _rtutils_lines(m: Measurements, decoded_bytes: int) -> list[str]:
    _, script, ratio = _script_comparison(m)
    axial_only = median(m.netrt_totals(("validate", "masks", "axial")))
    with_deliver = median(m.netrt_totals())
    paired = [n / r for n, r in zip(m.netrt_totals(NETRT_PROCESSING), m.rtutils_totals(), strict=True)]
    reformat = [a + b for a, b in zip(m.netrt_stage("coronal"), m.netrt_stage("sagittal"), strict=True)]
    n, r = m.netrt_stage, m.rtutils_stage
    rows = [
        ["read + check the study", _seconds(n("validate")), "create_from (reads every file)", _seconds(r("load"))],
        [
            "masks of the 8 kept ROIs, merged",
            _seconds(n("masks")),
            "get_roi_mask_by_name x 8, OR",
            _seconds(r("masks")),
        ],
        ["axial overlay series", _seconds(n("axial")), "add 60xx + dcmwrite per slice", _seconds(r("axial"))],
        ["coronal + sagittal (reformat + write)", _seconds(reformat), "not done", "-"],
        ["**total**", _seconds(m.netrt_totals(NETRT_PROCESSING)), "", _seconds(m.rtutils_totals())],
    ]
    script_peak = [float(run["peak_rss_kib"]) for run in m.rtutils]
    return [
        "### Against the plain rt-utils script",
        "",
        "What users write without NETRT (`bench/rtutils_script.py`): rt-utils `RTStructBuilder.create_from` + "
        "`get_roi_mask_by_name` per kept ROI (the same 8), OR-ed, then pydicom adds an Overlay Plane (6000) to "
        "each CT slice already in memory and writes it with new UIDs: one axial series, no reformat, no checks, "
        "no fsync. Same runs, alternating with the other variants, fresh subprocess each; neither side delivers.",
        "",
        markdown_table(["step", "NETRT median s (min-max)", "rt-utils script", "script median s (min-max)"], rows),
        "",
        f"**Target: NETRT (three planes) / script (axial only) <= {SCRIPT_TARGET:g}x (not slower): "
        f"{verdict(ratio, SCRIPT_TARGET)}.** Per-run paired ratios: {', '.join(f'{r:.2f}x' for r in paired)}.",
        "",
        f"- NETRT's validate + masks + axial alone (the script's work): {axial_only:.2f} s = "
        f"{axial_only / script:.2f}x the script; with delivery to a folder NETRT takes {with_deliver:.2f} s = "
        f"{with_deliver / script:.2f}x.",
        f"- Peak RSS of the script: {_mib(median(script_peak))} MiB ({median(script_peak) * 1024 / decoded_bytes:.1f}x "
        "the input pixel bytes).",
        "- Mask accuracy of both against the analytic truth: see the accuracy figure.",
    ]


def render(measurements: Measurements, options: Options, profile: tuple[str, Path] | None) -> str:
    m = measurements
    first = m.netrt[0]
    outputs: dict[str, dict[str, int]] = first["outputs"]
    output_files = sum(o["files"] for o in outputs.values())
    floor_total = median(m.floor_totals())
    netrt_total = median(m.netrt_totals())
    ratio = netrt_total / floor_total
    processing_stages = tuple(s for s in NETRT_STAGES if s != "deliver")
    floor_processing = tuple(s for s in FLOOR_TOTAL_STAGES if s != "copy")
    processing_ratio = median(m.netrt_totals(processing_stages)) / median(m.floor_totals(floor_processing))
    paired = [n / f for n, f in zip(m.netrt_totals(), m.floor_totals(), strict=True)]

    def plane_what(plane: str) -> str:
        o = outputs[plane]
        action = "copy source pixels + overlay, write" if plane == "axial" else "reformat (numpy, source axes) + write"
        return f"{action}: {o['files']} files of {o['rows']}x{o['columns']}"

    def floor_write_what(plane: str) -> str:
        o = outputs[plane]
        return f"write {o['files']} files of {o['rows']}x{o['columns']}, {o['bits_allocated']}-bit"

    what = {
        "validate": f"find_studies + load_study over {first['input_files']} files",
        "masks": f"compute_mask: {len(first['rois_kept'])} ROIs kept, {len(first['rois_ignored'])} ignored",
        **{plane: plane_what(plane) for plane in PLANES},
        "deliver": f"deliver_to_folder: {output_files} files (copy + fsync each)",
    }
    floor_what = {
        "read": f"dcmread {m.floor[0]['input_files']} input files in full",
        **{f"write_{plane}": floor_write_what(plane) for plane in PLANES},
        "copy": f"shutil.copyfile {output_files} files",
    }
    rows: list[list[str]] = []
    for stage in NETRT_STAGES:
        netrt_values = m.netrt_stage(stage)
        counterpart = COUNTERPART[stage]
        if counterpart is None:
            floor_cells = ["none: pure computation", "-", "n/a"]
        else:
            floor_values = m.floor_stage(counterpart)
            floor_cells = [
                floor_what[counterpart],
                _seconds(floor_values),
                f"{median(netrt_values) / median(floor_values):.2f}x",
            ]
        share = median(netrt_values) / floor_total
        rows.append([stage, what[stage], _seconds(netrt_values), *floor_cells, f"{share:.2f}x"])
    rows.append(
        [
            "**total**",
            "all six stages",
            _seconds(m.netrt_totals()),
            "read + write 3 planes + copy",
            _seconds(m.floor_totals()),
            f"**{ratio:.2f}x**",
            f"{ratio:.2f}x",
        ]
    )
    table = markdown_table(
        [
            "stage",
            "what NETRT does",
            "NETRT median s (min-max)",
            "I/O floor counterpart (pydicom alone)",
            "floor median s (min-max)",
            "NETRT / counterpart",
            "stage / floor total",
        ],
        rows,
    )

    fsync_values = m.floor_stage("copy_fsync")
    decoded_bytes = 1
    for n in first["image_shape"]:
        decoded_bytes *= int(n)
    decoded_bytes *= outputs["axial"]["bits_allocated"] // 8
    netrt_peak = [float(run["peak_rss_kib"]) for run in m.netrt]
    floor_peak = [float(run["peak_rss_kib"]) for run in m.floor]
    memory = markdown_table(
        ["process", "peak RSS MiB, median (min-max)", "RSS after imports MiB", "peak / input pixel bytes"],
        [
            [
                "NETRT",
                f"{_mib(median(netrt_peak))} ({_mib(min(netrt_peak))}-{_mib(max(netrt_peak))})",
                _mib(median([float(run["rss_after_imports_kib"]) for run in m.netrt])),
                f"{median(netrt_peak) * 1024 / decoded_bytes:.1f}x",
            ],
            [
                "floor",
                f"{_mib(median(floor_peak))} ({_mib(min(floor_peak))}-{_mib(max(floor_peak))})",
                _mib(median([float(run["rss_after_imports_kib"]) for run in m.floor])),
                f"{median(floor_peak) * 1024 / decoded_bytes:.1f}x",
            ],
        ],
    )
    deliver_vs_fsync = median(m.netrt_stage("deliver")) / median(fsync_values)
    smoke = options.smoke
    peak_source = str(first.get("peak_rss_source", "?"))
    floor_ru_maxrss = median([float(run["ru_maxrss_kib"]) for run in m.floor])
    slowest = max(NETRT_STAGES, key=lambda s: median(m.netrt_stage(s)))
    lines = [
        "## Processing",
        "",
        f"{m.size.describe()} with 10 ROIs (`netrt.phantom`, written once per benchmark run), "
        f"{first['input_files']} input files ({m.input_bytes / 1e6:.0f} MB); NETRT writes "
        + ", ".join(f"{o['files']} {plane}" for plane, o in outputs.items())
        + f" files ({output_files}) and delivers them to a folder. Default `ProcessingConfig`, direct "
        "`netrt` calls (no Prefect).",
        "",
        f"- command: `{command_line()}`" + (" (smoke sizes: checks the benchmark runs; not a figure)" if smoke else ""),
        machine().markdown(),
        f"- runs: {len(m.netrt)} per variant, each in a fresh subprocess, alternating ({'; '.join(m.orders)}); "
        "`os.sync()` after each run; times are `perf_counter` around each stage after the imports "
        "(interpreter start-up and imports are not counted on either side)",
        "",
        table,
        "",
        f"**Target: NETRT total / floor total <= {TARGET_RATIO:g}x: {verdict(ratio, TARGET_RATIO)}.** "
        f"Per-run paired ratios: {', '.join(f'{r:.2f}x' for r in paired)}.",
        "",
        f"- Without delivery on either side (issue 3's definition: read the inputs, write the outputs), "
        f"NETRT / floor = {processing_ratio:.2f}x: {verdict(processing_ratio, TARGET_RATIO)}.",
        f"- Floor of a durable delivery (copy + fsync per file, as NETRT's `atomic_copy` does): "
        f"{_seconds(fsync_values)} s; NETRT's deliver is {deliver_vs_fsync:.2f}x that.",
        "- The floor's read is `pydicom.dcmread` of every file without decoding (uncompressed input); its writes "
        "copy one input header, set new UIDs, Rows/Columns and a zero pixel buffer of the right size, and "
        "`dcmwrite` (no overlay, no temp file + rename).",
        f"- Slowest stage: {slowest}.",
        "",
        f"Peak memory: `{peak_source}` of `/proc/self/status` read at the end of each worker process (the high-water "
        "mark of its own address space). Not `getrusage(RUSAGE_SELF).ru_maxrss`: on Linux it carries the spawning "
        f"process's peak across fork + exec (here the floor workers' ru_maxrss read {_mib(floor_ru_maxrss)} MiB "
        f"against their own VmHWM of {_mib(median(floor_peak))} MiB). "
        f"Input pixel bytes = {decoded_bytes / 2**20:.1f} MiB (the input series' stored pixel data).",
        "",
        memory,
    ]
    lines += ["", *_rtutils_lines(m, decoded_bytes)]
    lines += [
        "",
        summary_row(
            figure="3. Process (vs I/O floor)",
            netrt=f"{netrt_total:.2f} s",
            comparison=f"{floor_total:.2f} s: pydicom read + write the same files + copy",
            ratio=ratio,
            target=f"<= {TARGET_RATIO:g}x",
            met=ratio <= TARGET_RATIO,
            command=command_line(),
        ),
        summary_row(
            figure="3. Process (vs rt-utils script)",
            netrt=f"{_script_comparison(m)[0]:.2f} s (3 planes)",
            comparison=f"{_script_comparison(m)[1]:.2f} s: rt-utils masks + pydicom axial overlays",
            ratio=_script_comparison(m)[2],
            target=f"<= {SCRIPT_TARGET:g}x",
            met=_script_comparison(m)[2] <= SCRIPT_TARGET,
            command=command_line(),
        ),
    ]
    if profile is not None:
        stage, path = profile
        lines += [
            "",
            f"Profile of the slowest stage ({stage}): `{path.relative_to(REPO_ROOT)}` (pyinstrument call tree, "
            "1 ms sampling). It comes from one extra run, not from the timed runs.",
        ]
    return "\n".join(lines) + "\n"


def run(options: Options) -> str:
    """Measure the figure and return its Markdown section."""
    size = SMOKE if options.smoke else FULL
    root = Path(tempfile.mkdtemp(prefix="netrt-bench-process-"))
    try:
        started = time.perf_counter()
        print(f"process: writing the {size.describe()} under {root}", file=sys.stderr)
        measurements = measure(size, options.runs, root)
        profile = profile_slowest(measurements, root, root / "phantom" / "dicom") if options.profile else None
        print(f"process: measured in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return render(measurements, options, profile)
    finally:
        shutil.rmtree(root, ignore_errors=True)
