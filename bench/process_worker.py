"""The measured side of the processing figure: one variant, one fresh process, one JSON result.

``bench.process`` starts this module once per variant and run (``python -m bench.process_worker``),
so every run starts from a clean interpreter and its peak memory is its own:

- ``netrt``: the direct domain calls the ``process-study`` flow's tasks wrap (no Prefect):
  ``find_studies`` + ``load_study`` (validate), ``compute_mask`` (masks), ``write_plane`` for
  axial, coronal and sagittal (reformat + write), ``deliver_to_folder``; default ``ProcessingConfig``.
- ``floor``: pydicom alone, no computation: read every input file in full (pixel data included),
  write as many files per plane as NETRT wrote, with the same pixel dimensions and type, and copy
  those files to a folder (plus, for reference, the same copy with an fsync per file).
- ``rtutils``: the plain script users write without NETRT (:mod:`bench.rtutils_script`): rt-utils
  masks per ROI, merged, and pydicom axial overlay series (load, masks, axial).

``--memory-out`` traces the study's allocations with tracemalloc (started after the imports) and
writes, per stage, the traced peak, the live allocations after it and VmRSS/VmHWM.

Stage times are ``time.perf_counter`` around each stage, after the imports (a running node does
not pay its imports per study). Peak memory is ``VmHWM`` of ``/proc/self/status`` read at the end
of the process (see :func:`_peak_rss_kib` for why not ``ru_maxrss``); the RSS right after the
imports (``VmRSS``) is reported beside it. Only the standard library is imported at module
level, so the floor never loads NETRT, SimpleITK or rt-utils.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

PLANES = ("axial", "coronal", "sagittal")
NETRT_STAGES = ("validate", "masks", *PLANES, "deliver")
FLOOR_STAGES = ("read", *(f"write_{plane}" for plane in PLANES), "copy", "copy_fsync")
RTUTILS_STAGES = ("load", "masks", "axial")
TRACEMALLOC_TOP = 15

T = TypeVar("T")


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_kib() -> int:
    """Current resident set size in KiB (``VmRSS``), or -1 where /proc is missing."""
    value = _status_kib("VmRSS")
    return -1 if value is None else value


def _peak_rss_kib() -> tuple[int, str]:
    """Peak RSS in KiB of this process and where it was read.

    ``VmHWM`` (the high-water mark of this process's own address space) where /proc exists.
    ``getrusage(RUSAGE_SELF).ru_maxrss`` is only the fallback: on Linux it carries the peak of the
    process that spawned us across fork/vfork + exec, so a worker started by a big parent would
    report the parent's peak.
    """
    value = _status_kib("VmHWM")
    if value is not None:
        return value, "VmHWM"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), "ru_maxrss"


class _Stages:
    """Times named stages; profiles one of them with pyinstrument when asked; with ``memory_out``, traces
    Python allocations (tracemalloc) and records each stage's traced peak and its top allocations."""

    def __init__(
        self, profile_stage: str | None, profile_out: Path | None, title: str, memory_out: Path | None = None
    ) -> None:
        self.seconds: dict[str, float] = {}
        self.profile_stage = profile_stage
        self.profile_out = profile_out
        self.title = title
        self.memory_out = memory_out
        self.memory: dict[str, dict[str, Any]] = {}

    def run(self, name: str, func: Callable[[], T]) -> T:
        profiler = _stage_profiler() if name == self.profile_stage else None
        sampler: _PeakSampler | None = None
        if self.memory_out is not None:
            if not tracemalloc.is_tracing():
                tracemalloc.start(1)  # after the imports: only the study's own allocations
            tracemalloc.reset_peak()
            sampler = _PeakSampler()
        start = time.perf_counter()
        if profiler is not None:
            profiler.start()
        try:
            result = func()
        finally:
            if profiler is not None:
                profiler.stop()
        self.seconds[name] = time.perf_counter() - start
        if self.memory_out is not None and sampler is not None:
            at_peak = sampler.stop()
            current, peak = tracemalloc.get_traced_memory()
            top = tracemalloc.take_snapshot().statistics("lineno")[:TRACEMALLOC_TOP]
            self.memory[name] = {
                "near_peak_bytes": at_peak[0],
                "top_near_peak": [
                    f"{stat.size / 2**20:8.1f} MiB {stat.count:8d} blocks  {stat.traceback}" for stat in at_peak[1]
                ],
                "traced_peak_bytes": peak,
                "traced_after_bytes": current,
                "rss_after_kib": _rss_kib(),
                "hwm_after_kib": _peak_rss_kib()[0],
                "top_after": [f"{stat.size / 2**20:8.1f} MiB {stat.count:8d} blocks  {stat.traceback}" for stat in top],
            }
        if profiler is not None and self.profile_out is not None:
            _write_profile(profiler, self.profile_out, name, self.seconds[name], self.title)
        return result

    def write_memory_profile(self) -> None:
        if self.memory_out is None:
            return
        lines = [
            f"Memory profile of NETRT processing, {self.title}.",
            "tracemalloc (Python and numpy allocations; SimpleITK's C++ buffers are not traced, they show in RSS).",
            "Per stage: the traced peak during the stage, what stays allocated after it, VmRSS and VmHWM after it,",
            f"and the top {TRACEMALLOC_TOP} live allocations (by source line) near the stage's peak (a sampler thread",
            "snapshots whenever the traced size grows by 10 %) and right after the stage.",
            "",
        ]
        for name, data in self.memory.items():
            lines.append(
                f"== {name}: traced peak {data['traced_peak_bytes'] / 2**20:.0f} MiB, live after "
                f"{data['traced_after_bytes'] / 2**20:.0f} MiB, VmRSS after {data['rss_after_kib'] / 1024:.0f} MiB, "
                f"VmHWM after {data['hwm_after_kib'] / 1024:.0f} MiB =="
            )
            lines.append(
                f"-- live allocations near the stage's peak ({data['near_peak_bytes'] / 2**20:.0f} MiB traced):"
            )
            lines += data["top_near_peak"]
            lines.append("-- live allocations after the stage:")
            lines += data["top_after"]
            lines.append("")
        self.memory_out.parent.mkdir(parents=True, exist_ok=True)
        self.memory_out.write_text("\n".join(lines), encoding="utf-8")


class _PeakSampler:
    """Samples the traced memory every 20 ms in a thread; keeps the top allocations of the largest
    sample (a snapshot is taken whenever the traced size passes the last snapshot's by 10 %)."""

    def __init__(self) -> None:
        self.best: tuple[int, list[tracemalloc.Statistic]] = (0, [])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            current, _ = tracemalloc.get_traced_memory()
            if current > 1.1 * self.best[0] and current > 16 * 2**20:
                stats = tracemalloc.take_snapshot().statistics("lineno")[:TRACEMALLOC_TOP]
                self.best = (current, stats)

    def stop(self) -> tuple[int, list[tracemalloc.Statistic]]:
        self._stop.set()
        self._thread.join()
        return self.best


def _stage_profiler() -> Any:
    """A pyinstrument sampling profiler (every 1 ms, all threads' time as seen from this one).

    Imported here, not at module level: the floor and unprofiled runs never load it.
    """
    from pyinstrument import Profiler

    return Profiler(interval=0.001, async_mode="disabled")


def _write_profile(profiler: Any, out: Path, stage: str, seconds: float, title: str) -> None:
    """pyinstrument's call tree of the stage, as text."""
    header = (
        f"Profile of the '{stage}' stage of NETRT processing, {title}.\n"
        f"Wall time of the stage under the profiler: {seconds:.2f} s (sampling adds little; the table's "
        "times are from unprofiled runs).\n"
        "Made with pyinstrument (statistical, 1 ms interval); frames under 1 % of the time are hidden.\n\n"
    )
    tree = profiler.output_text(unicode=False, color=False, show_all=False, timeline=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + tree, encoding="utf-8")


def _count_files(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


def run_netrt(input_dir: Path, work: Path, stages: _Stages) -> dict[str, Any]:
    """NETRT's processing of the one study under ``input_dir``, stage by stage."""
    import pydicom

    from netrt.config import ProcessingConfig
    from netrt.deliver import deliver_to_folder
    from netrt.pipeline import WrittenSeries, compute_mask, write_plane
    from netrt.study import LoadedStudy, find_studies, load_study

    rss_after_imports = _rss_kib()
    processing = ProcessingConfig()
    if tuple(processing.planes) != PLANES or processing.burn_in:
        raise RuntimeError(f"the default ProcessingConfig changed (planes {processing.planes}, burn_in); update bench")
    work_dir = work / "work"
    delivered = work / "delivered"

    def validate() -> tuple[LoadedStudy, int]:
        studies = find_studies(input_dir)
        if len(studies) != 1:
            raise RuntimeError(f"expected one study under {input_dir}, found {len(studies)}")
        return load_study(studies[0].files), len(studies[0].files)

    study, input_files = stages.run("validate", validate)
    masks = stages.run("masks", lambda: compute_mask(study, processing, work_dir))
    written: dict[str, list[WrittenSeries]] = {}
    for plane in PLANES:
        written[plane] = stages.run(plane, functools.partial(write_plane, study, masks, plane, processing, work_dir))
    files = [path for series_list in written.values() for series in series_list for path in series.files]
    # as the flow does: derived files under the work dir are hard-linked into the folder destination
    outcome = stages.run("deliver", lambda: deliver_to_folder("bench", delivered, files, link_from=work_dir))
    if outcome.stored != len(files) or _count_files(delivered) != len(files):
        raise RuntimeError(f"delivery incomplete: {outcome.detail}; {_count_files(delivered)} files on disk")

    outputs: dict[str, dict[str, int]] = {}
    for plane, series_list in written.items():
        if len(series_list) != 1 or not series_list[0].files:
            raise RuntimeError(f"{plane}: expected one non-empty series, got {len(series_list)}")
        head = pydicom.dcmread(series_list[0].files[0], stop_before_pixels=True)
        outputs[plane] = {
            "files": len(series_list[0].files),
            "rows": int(head.Rows),
            "columns": int(head.Columns),
            "bits_allocated": int(head.BitsAllocated),
            "bits_stored": int(head.BitsStored),
            "pixel_representation": int(head.PixelRepresentation),
        }
    return {
        "input_files": input_files,
        "image_shape": list(study.images.geometry.shape),
        "rois_kept": masks.kept,
        "rois_ignored": masks.ignored,
        "outputs": outputs,
        "rss_after_imports_kib": rss_after_imports,
    }


def run_floor(input_dir: Path, work: Path, plan: dict[str, dict[str, int]], stages: _Stages) -> dict[str, Any]:
    """pydicom alone: read the inputs, write NETRT's output counts and sizes, copy them."""
    import copy

    import pydicom
    from pydicom.uid import generate_uid

    rss_after_imports = _rss_kib()
    inputs = sorted(path for path in input_dir.rglob("*") if path.is_file())

    def read() -> Path:
        template: Path | None = None
        for path in inputs:
            ds = pydicom.dcmread(path)  # the whole file, pixel data included
            if template is None and "PixelData" in ds:
                template = path
        if template is None:
            raise RuntimeError(f"no image among {len(inputs)} files under {input_dir}")
        return template

    template_path = stages.run("read", read)
    header = pydicom.dcmread(template_path, stop_before_pixels=True)
    written: list[Path] = []

    for plane in PLANES:
        spec = plan[plane]
        folder = work / "written" / plane

        def write(spec: dict[str, int] = spec, folder: Path = folder) -> list[Path]:
            folder.mkdir(parents=True)
            ds = copy.deepcopy(header)
            ds.SeriesInstanceUID = generate_uid()
            ds.Rows, ds.Columns = spec["rows"], spec["columns"]
            ds.BitsAllocated, ds.BitsStored = spec["bits_allocated"], spec["bits_stored"]
            ds.HighBit = spec["bits_stored"] - 1
            ds.PixelRepresentation = spec["pixel_representation"]
            ds.PixelData = bytes(spec["rows"] * spec["columns"] * spec["bits_allocated"] // 8)
            ds["PixelData"].VR = "OW" if spec["bits_allocated"] > 8 else "OB"
            paths = []
            for index in range(spec["files"]):
                uid = generate_uid()
                ds.SOPInstanceUID = uid
                ds.file_meta.MediaStorageSOPInstanceUID = uid
                ds.InstanceNumber = index + 1
                path = folder / f"{uid}.dcm"
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
                paths.append(path)
            return paths

        written += stages.run(f"write_{plane}", write)

    def copy_files(root: Path, durable: bool) -> None:
        for path in written:
            target = root / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if durable:
                with path.open("rb") as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
            else:
                shutil.copyfile(path, target)

    stages.run("copy", lambda: copy_files(work / "copied", durable=False))
    stages.run("copy_fsync", lambda: copy_files(work / "copied-fsync", durable=True))
    for root in ("copied", "copied-fsync"):
        if _count_files(work / root) != len(written):
            raise RuntimeError(f"{root}: {_count_files(work / root)} files, expected {len(written)}")
    return {"input_files": len(inputs), "output_files": len(written), "rss_after_imports_kib": rss_after_imports}


def run_rtutils(input_dir: Path, work: Path, stages: _Stages) -> dict[str, Any]:
    """The plain rt-utils + pydicom script (:mod:`bench.rtutils_script`), stage by stage."""
    from bench import rtutils_script

    rss_after_imports = _rss_kib()
    rtstruct = stages.run("load", lambda: rtutils_script.load(input_dir))
    mask, kept = stages.run("masks", lambda: rtutils_script.merged_mask(rtstruct))
    files = stages.run("axial", lambda: rtutils_script.write_axial_overlays(rtstruct, mask, work / "axial"))
    if len(files) != len(rtstruct.series_data):
        raise RuntimeError(f"the script wrote {len(files)} files for {len(rtstruct.series_data)} slices")
    return {"output_files": len(files), "rois_kept": kept, "rss_after_imports_kib": rss_after_imports}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.process_worker", description=__doc__)
    parser.add_argument("variant", choices=("netrt", "floor", "rtutils"))
    parser.add_argument("--input", type=Path, required=True, help="folder holding the phantom study")
    parser.add_argument("--work", type=Path, required=True, help="empty folder for this run's output")
    parser.add_argument("--result", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--plan", type=Path, help="floor only: JSON of NETRT's outputs per plane")
    parser.add_argument("--profile-stage", choices=NETRT_STAGES, help="netrt only: profile this stage")
    parser.add_argument("--profile-out", type=Path, help="where the profile of --profile-stage goes")
    parser.add_argument("--title", default="", help="what is being processed, for the profile header")
    parser.add_argument("--memory-out", type=Path, help="trace allocations (tracemalloc) and write a profile here")
    args = parser.parse_args(argv)

    stages = _Stages(args.profile_stage, args.profile_out, args.title, args.memory_out)
    if args.variant == "netrt":
        details = run_netrt(args.input, args.work, stages)
    elif args.variant == "rtutils":
        details = run_rtutils(args.input, args.work, stages)
    else:
        if args.plan is None:
            parser.error("floor needs --plan")
        plan = json.loads(args.plan.read_text(encoding="utf-8"))
        details = run_floor(args.input, args.work, plan, stages)
    peak, peak_source = _peak_rss_kib()
    stages.write_memory_profile()
    result = {
        "variant": args.variant,
        "stages": stages.seconds,
        "peak_rss_kib": peak,
        "peak_rss_source": peak_source,
        "ru_maxrss_kib": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
        **details,
    }
    args.result.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
