"""Figure "scaling": NETRT's time and peak memory per slice over study sizes, and the peak RSS of a
1000-slice 512x512 CT against its decoded pixel bytes.

Phantoms of 50, 100, 200 and 400 slices (512x512, 0.98 mm pixels, 2.5 mm slices, 10 ROIs;
``--smoke``: 64x64 with 10 and 20 slices) go through NETRT's processing (validate, masks,
three planes, deliver to a folder: :mod:`bench.process_worker`, a fresh process per run, sizes
alternating up and down between rounds). Reported: least-squares slope and intercept of time and
of peak RSS (``VmHWM``) against slices, and per-slice values per size. Then one 1000-slice
phantom (``--smoke``: 64x64x40) once: peak RSS / decoded pixel bytes, target < 3x. ``--profile``
adds a tracemalloc run of the 1000-slice study, written to ``bench/profiles/memory-1000.txt``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.process import FULL, PROFILE_DIR, SMOKE, PhantomSize, _run_worker, _write_phantom
from bench.process_worker import NETRT_STAGES
from bench.report import REPO_ROOT, Options, command_line, machine, markdown_table, median, summary_row

FIGURE = "scaling"
SLICES = (50, 100, 200, 400)
SMOKE_SLICES = (10, 20)
BIG = 1000
SMOKE_BIG = 40
MEMORY_TARGET = 3.0
MAX_ROUNDS = 2  # rounds over all sizes (each a fresh process per size); keeps the figure in budget


def _size(base: PhantomSize, slices: int) -> PhantomSize:
    return PhantomSize(base.rows, base.columns, base.pixel_spacing, base.slice_spacing, slices, base.extra_spheres)


def _fit(x: list[float], y: list[float]) -> tuple[float, float, float]:
    """Least squares y = slope x + intercept; (slope, intercept, R^2)."""
    slope, intercept = np.polyfit(np.asarray(x), np.asarray(y), 1)
    predicted = slope * np.asarray(x) + intercept
    residual = float(np.sum((np.asarray(y) - predicted) ** 2))
    total = float(np.sum((np.asarray(y) - np.mean(y)) ** 2))
    return float(slope), float(intercept), 1.0 - residual / total if total else 1.0


def _total(run: dict[str, Any]) -> float:
    return sum(float(run["stages"][s]) for s in NETRT_STAGES)


def _pixel_bytes(run: dict[str, Any]) -> int:
    count = 1
    for n in run["image_shape"]:
        count *= int(n)
    return count * int(run["outputs"]["axial"]["bits_allocated"]) // 8


SMOKE_NOTE = " (smoke sizes: checks the benchmark runs; not a figure)"


def run(options: Options) -> str:
    base = SMOKE if options.smoke else FULL
    slices = SMOKE_SLICES if options.smoke else SLICES
    big = SMOKE_BIG if options.smoke else BIG
    rounds = min(options.runs, MAX_ROUNDS)
    root = Path(tempfile.mkdtemp(prefix="netrt-bench-scaling-"))
    try:
        started = time.perf_counter()
        inputs = {n: _write_phantom(_size(base, n), root / f"phantom{n}") for n in slices}
        results: dict[int, list[dict[str, Any]]] = {n: [] for n in slices}
        orders = []
        for index in range(rounds):
            order = slices if index % 2 == 0 else tuple(reversed(slices))
            orders.append(" -> ".join(str(n) for n in order))
            for n in order:
                data = _run_worker("netrt", inputs[n], root / f"run{index}-{n}", [])
                results[n].append(data)
                print(f"scaling: round {index + 1}/{rounds}, {n} slices: {_total(data):.2f} s", file=sys.stderr)
        for n in slices:
            shutil.rmtree(inputs[n].parent)
        big_input = _write_phantom(_size(base, big), root / f"phantom{big}")
        big_run = _run_worker("netrt", big_input, root / f"run-{big}", [])
        print(f"scaling: {big} slices: {_total(big_run):.2f} s", file=sys.stderr)
        profile: Path | None = None
        if options.profile:
            profile = PROFILE_DIR / f"memory-{big}.txt"
            title = f"{_size(base, big).describe()}, 10 ROIs, default ProcessingConfig"
            _run_worker("netrt", big_input, root / "run-profile", ["--memory-out", str(profile), "--title", title])
        print(f"scaling: measured in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        return render(options, base, slices, results, big, big_run, orders, profile)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def render(
    options: Options,
    base: PhantomSize,
    slices: tuple[int, ...],
    results: dict[int, list[dict[str, Any]]],
    big: int,
    big_run: dict[str, Any],
    orders: list[str],
    profile: Path | None,
) -> str:
    times = {n: median([_total(r) for r in results[n]]) for n in slices}
    peaks = {n: median([float(r["peak_rss_kib"]) / 1024 for r in results[n]]) for n in slices}
    t_slope, t_intercept, t_r2 = _fit([float(n) for n in slices], [times[n] for n in slices])
    m_slope, m_intercept, m_r2 = _fit([float(n) for n in slices], [peaks[n] for n in slices])
    pixel_mib_per_slice = _pixel_bytes(results[slices[0]][0]) / 2**20 / slices[0]
    rows = []
    for n in slices:
        stage = {s: median([float(r["stages"][s]) for r in results[n]]) for s in NETRT_STAGES}
        rows.append(
            [
                str(n),
                f"{times[n]:.2f}",
                f"{times[n] / n * 1000:.1f}",
                " / ".join(f"{stage[s] / n * 1000:.1f}" for s in NETRT_STAGES),
                f"{peaks[n]:.0f}",
                f"{peaks[n] / n:.2f}",
                f"{peaks[n] * 2**20 / _pixel_bytes(results[n][0]):.1f}x",
            ]
        )
    big_peak_mib = float(big_run["peak_rss_kib"]) / 1024
    big_pixels = _pixel_bytes(big_run)
    big_ratio = big_peak_mib * 2**20 / big_pixels
    big_after_imports = float(big_run["rss_after_imports_kib"]) / 1024
    flat_time = (times[slices[-1]] / slices[-1]) / (times[slices[0]] / slices[0])
    flat_time_mid = (times[slices[-1]] / slices[-1]) / (times[slices[-2]] / slices[-2])
    marginal = m_slope / pixel_mib_per_slice
    size_note = f"{base.rows}x{base.columns}, {base.pixel_spacing[0]:g} mm pixels, {base.slice_spacing:g} mm slices"
    lines = [
        "## Scaling (study size)",
        "",
        f"Phantoms of {', '.join(str(n) for n in slices)} slices ({size_note}, 10 ROIs) through NETRT's processing "
        "(validate, masks, axial + coronal + sagittal, deliver to a folder; direct calls, default `ProcessingConfig`), "
        f"a fresh process per run; then one {big}-slice phantom once. Peak RSS is the worker's `VmHWM`.",
        "",
        f"- command: `{command_line()}`" + (SMOKE_NOTE if options.smoke else ""),
        machine().markdown(),
        f"- runs: {len(results[slices[0]])} per size, rounds alternating the size order ({'; '.join(orders)})",
        "",
        markdown_table(
            [
                "slices",
                "time s (median)",
                "ms per slice",
                "ms per slice by stage (" + " / ".join(NETRT_STAGES) + ")",
                "peak RSS MiB",
                "peak RSS MiB per slice",
                "peak / pixel bytes",
            ],
            rows,
        ),
        "",
        f"- Time: least squares **{t_slope * 1000:.1f} ms per slice** + {t_intercept:.2f} s fixed (R^2 {t_r2:.3f}). "
        f"Time per slice at {slices[-1]} / at {slices[0]} slices = {flat_time:.2f}x, at {slices[-1]} / at "
        f"{slices[-2]} = {flat_time_mid:.2f}x (flat or falling = no worse than linear).",
        f"- Peak RSS: least squares **{m_slope:.2f} MiB per slice** + {m_intercept:.0f} MiB fixed (R^2 {m_r2:.3f}); "
        f"a slice's decoded pixels are {pixel_mib_per_slice:.2f} MiB, so each extra slice costs "
        f"{marginal:.1f}x its pixel bytes at the peak.",
        "",
        f"**{big} slices ({base.rows}x{base.columns}): peak RSS {big_peak_mib:.0f} MiB for "
        f"{big_pixels / 2**20:.0f} MiB of decoded pixels = {big_ratio:.2f}x; target < {MEMORY_TARGET:g}x: "
        + (
            "met."
            if big_ratio < MEMORY_TARGET
            else f"missed by {big_ratio - MEMORY_TARGET:.2f}x (needs {big_ratio / MEMORY_TARGET:.2f} times less "
            "memory)."
        )
        + f"** Its time: {_total(big_run):.1f} s ({_total(big_run) / big * 1000:.1f} ms per slice); RSS after the "
        f"imports, before any study: {big_after_imports:.0f} MiB.",
    ]
    if profile is not None:
        lines += [
            "",
            f"Memory profile of the {big}-slice run: `{profile.relative_to(REPO_ROOT)}` (tracemalloc per stage: "
            "traced peak, live allocations after the stage, VmRSS/VmHWM; one extra run, not the timed one).",
        ]
    lines += [
        "",
        summary_row(
            figure="6. Scaling: time per slice",
            netrt=f"slope {t_slope * 1000:.1f} ms/slice; {times[slices[-1]] / slices[-1] * 1000:.1f} ms/slice at "
            f"{slices[-1]}",
            comparison=f"{times[slices[0]] / slices[0] * 1000:.1f} ms/slice at {slices[0]} slices",
            ratio=flat_time,
            target="<= 1x (flat)",
            met=flat_time <= 1.0,
            command=command_line(),
        ),
        summary_row(
            figure=f"6. Scaling: peak RSS, {big} slices",
            netrt=f"{big_peak_mib:.0f} MiB (slope {m_slope:.2f} MiB/slice)",
            comparison=f"{big_pixels / 2**20:.0f} MiB decoded pixels",
            ratio=big_ratio,
            target=f"< {MEMORY_TARGET:g}x",
            met=big_ratio < MEMORY_TARGET,
            command=command_line(),
        ),
    ]
    return "\n".join(lines) + "\n"
