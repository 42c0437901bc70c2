"""Figure "receive": the NETRT listener against Orthanc and dcmtk's storescp, one study over loopback.

80 CT slices of 512x512 (``--smoke``: 20 of 64x64) are written once. Then, ``runs`` times,
rotating the order, dcmtk's ``storescu +sd`` sends the folder to

- dcmtk's ``storescp -od DIR`` (its defaults: stores each file, no fsync);
- Orthanc (a durable C++ receiver: a fresh, empty one per run, SQLite index and storage on the
  same disk, its defaults for what it does per instance, what it syncs: :data:`ORTHANC_OPTIONS`); and
- NETRT's whole listener (:class:`listener.service.ListenerService` in a fresh process: access
  checks, UID checks, study tracking, temp file + fsync + rename + directory fsync per instance);

and the wall time of ``storescu`` (start to exit, every instance acknowledged) is taken for both.
For reference the same is measured against ``storescp --ignore`` (receives, stores nothing): the
floor set by storescu and the loopback itself.

storescp listens on all interfaces and has no bind option, so the whole measurement runs inside a
private network namespace (``unshare -n``, loopback only; needs root). ``TCP_NODELAY=1`` is set
for the dcmtk tools. ``--profile`` adds one extra, untimed NETRT run under cProfile (the
association threads), written to ``bench/profiles/receive.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
    verdict,
)

FIGURE = "receive"
TARGET_RATIO = 3.0  # NETRT / storescp (issue 20)
TARGET_ORTHANC = 1.0  # NETRT / Orthanc (issue 20): not slower than a durable C++ receiver
PROFILE_OUT = REPO_ROOT / "bench" / "profiles" / "receive.txt"
WORKER_TIMEOUT_S = 1800
PORT = 11112
ORTHANC_HTTP_PORT = 8042
VARIANTS = ("storescp", "netrt", "orthanc")

#: Orthanc's settings beyond tests.orthanc's (no compression, no plugins, any calling AE may store).
#: Orthanc 1.10's own defaults otherwise, set here explicitly where they decide durability or cost.
#: ``SyncStorageArea`` (default since 1.7.4): each stored file is written under its final name and
#: fdatasync'd before the C-STORE is answered. What else it syncs was watched with ``strace -f -e
#: trace=fsync,fdatasync,rename`` while storescu sent it 5 instances (2026-12-06): one fdatasync per
#: stored file and nothing else; its SQLite index runs in WAL mode and was not synced per instance
#: (only at shutdown), and no directory is fsync'd. So Orthanc does one sync per instance where
#: NETRT does two (the file's data before its rename, the folder after it): the comparison leaves
#: Orthanc the cheaper durability. ``StoreMD5ForAttachments``: an MD5 of each file (default).
#: ``MaximumPduLength``: the 16 KiB it offers storescu (default; NETRT offers an unlimited one).
#: ``DicomThreadsCount``: 4 (default; one association is sent here).
ORTHANC_OPTIONS: dict[str, Any] = {
    "SyncStorageArea": True,
    "StoreMD5ForAttachments": True,
    "MaximumPduLength": 16384,
    "DicomThreadsCount": 4,
    "StorageCompression": False,
    "OverwriteInstances": False,
    "SaveJobs": False,
}


def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (Debian package dcmtk)")
    return path


# --- inside the namespace: one peer at a time ---------------------------------------------------


def _wait_for_echo(process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Until the peer answers C-ECHO (it is listening and negotiating), or fail."""
    echoscu = _tool("echoscu")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the receiving peer exited with code {process.returncode} before answering")
        done = subprocess.run(
            [echoscu, "-aec", "NETRT", "127.0.0.1", str(PORT)], env=_env(), capture_output=True, check=False
        )
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"no C-ECHO answer on port {PORT} within {timeout:.0f} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _peer(variant: str, work: Path, profile_out: Path | None) -> subprocess.Popen[bytes]:
    log = (work / f"{variant}.log").open("wb")
    if variant == "netrt":
        command = [sys.executable, "-m", "bench.receive", "listener", "--data", str(work / "data")]
        if profile_out is not None:
            command += ["--profile-out", str(profile_out)]
    else:
        out = work / "out"
        out.mkdir()
        options = ["--ignore"] if variant == "storescp-ignore" else ["-od", str(out)]
        command = [_tool("storescp"), *options, str(PORT)]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env())


def _received(variant: str, work: Path) -> int:
    if variant == "netrt":
        return sum(1 for p in (work / "data").glob("incoming/*/*.dcm"))
    if variant == "storescp-ignore":
        return -1
    return sum(1 for p in (work / "out").iterdir() if p.is_file())


def _send(input_dir: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """storescu +sd to the peer on PORT: wall time from start to exit, every instance acknowledged."""
    started = time.perf_counter()
    sent = subprocess.run(
        [_tool("storescu"), "-aec", "NETRT", "+sd", "127.0.0.1", str(PORT), str(input_dir)],
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    return time.perf_counter() - started, sent


def _orthanc_run(input_dir: Path, work: Path) -> tuple[float, subprocess.CompletedProcess[str], int]:
    """One run into a fresh, empty Orthanc (AE NETRT on PORT); returns the instances it then holds."""
    from tests.orthanc import Orthanc, OrthancSettings

    settings = OrthancSettings(
        root=work / "orthanc", aet="NETRT", dicom_port=PORT, http_port=ORTHANC_HTTP_PORT, options=ORTHANC_OPTIONS
    )
    # quick_stop: killed at the end; every instance was committed before it was answered.
    with Orthanc(settings, quick_stop=True) as orthanc:
        elapsed, sent = _send(input_dir)
        stored = int(orthanc.statistics()["CountInstances"])
    return elapsed, sent, stored


def _one_run(
    variant: str, input_dir: Path, work: Path, profile_out: Path | None = None
) -> tuple[float, dict[str, list[float]]]:
    work.mkdir(parents=True)
    if variant == "orthanc":
        elapsed, sent, received = _orthanc_run(input_dir, work)
    else:
        peer = _peer(variant, work, profile_out)
        try:
            _wait_for_echo(peer)
            elapsed, sent = _send(input_dir)
        finally:
            _stop(peer)
        received = _received(variant, work)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu to {variant} failed (exit {sent.returncode}):\n{sent.stderr[-2000:]}")
    expected = sum(1 for _ in input_dir.iterdir())
    if received not in (-1, expected):
        raise RuntimeError(f"{variant} stored {received} of {expected} instances")
    timings_file = work / "timings.json"
    timings = json.loads(timings_file.read_text(encoding="utf-8")) if timings_file.exists() else {}
    shutil.rmtree(work)
    os.sync()  # the next run starts without this run's dirty pages still being written back
    return elapsed, timings


def worker(input_dir: Path, root: Path, runs: int, result: Path, profile_out: Path | None) -> None:
    """Runs inside ``unshare -n``: bring up loopback, measure every variant, write the result JSON."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    times: dict[str, list[float]] = {"storescp": [], "netrt": [], "orthanc": [], "storescp-ignore": []}
    # Per run, the medians over its instances of NETRT's handler stages (seconds).
    stages: dict[str, list[float]] = {"handler": [], "durable_write": [], "fsync": []}
    orders: list[str] = []
    for index in range(runs):
        shift = index % len(VARIANTS)  # each receiver first, second and last in turn
        order = VARIANTS[shift:] + VARIANTS[:shift]
        orders.append(" -> ".join(order))
        for variant in (*order, "storescp-ignore"):
            elapsed, timings = _one_run(variant, input_dir, root / f"run{index}-{variant}")
            times[variant].append(elapsed)
            for stage, values in timings.items():
                if values:
                    stages[stage].append(sum(values) / len(values))
            print(f"receive: run {index + 1}/{runs} {variant}: {elapsed:.3f} s", file=sys.stderr)
    if profile_out is not None:
        _one_run("netrt", input_dir, root / "profile-netrt", profile_out)
    result.write_text(json.dumps({"times": times, "stages": stages, "orders": orders}), encoding="utf-8")


# --- the NETRT listener process -----------------------------------------------------------------


def _instrument() -> dict[str, list[float]]:
    """Time, per C-STORE, NETRT's handler, its durable write and the fsyncs inside that write.

    Benchmark-only wrappers (a few perf_counter calls per instance): they split the listener's
    time per instance into what NETRT's own code spends and what is left to pynetdicom.
    """
    import threading

    import listener.scp as scp

    timings: dict[str, list[float]] = {"handler": [], "durable_write": [], "fsync": []}
    local = threading.local()
    real_fsync = os.fsync
    real_write = scp.write_instance  # type: ignore[attr-defined]
    real_on_store = scp.ListenerHandlers.on_store

    def fsync(fd: int) -> None:
        started = time.perf_counter()
        real_fsync(fd)
        if getattr(local, "in_write", False):
            local.fsync += time.perf_counter() - started

    def write_instance(folder: Path, sop_instance_uid: str, data: bytes | memoryview, *more: Any) -> Path:
        local.in_write, local.fsync = True, 0.0
        started = time.perf_counter()
        try:
            return real_write(folder, sop_instance_uid, data, *more)
        finally:
            timings["durable_write"].append(time.perf_counter() - started)
            timings["fsync"].append(local.fsync)
            local.in_write = False

    def on_store(self: Any, event: Any) -> Any:
        started = time.perf_counter()
        try:
            return real_on_store(self, event)
        finally:
            timings["handler"].append(time.perf_counter() - started)

    setattr(os, "fsync", fsync)  # noqa: B010  (instrumentation: replace for this process only)
    setattr(scp, "write_instance", write_instance)  # noqa: B010
    setattr(scp.ListenerHandlers, "on_store", on_store)  # noqa: B010
    return timings


def listener(data: Path, profile_out: Path | None) -> None:
    """The whole NETRT listener on 127.0.0.1:PORT until SIGTERM; completion never fires during a run."""
    import threading

    from listener.completion import SealedStudy
    from listener.service import ListenerService
    from netrt.config import load_config

    config = load_config(None)
    config.paths.data_dir = data
    config.listener.host = "127.0.0.1"
    config.listener.port = PORT
    config.listener.study_idle_seconds = 3600.0  # sealing is not part of receiving

    def trigger(study: SealedStudy) -> str:
        raise RuntimeError("no flow runs in the receive benchmark")

    profiles: dict[str, list[Any]] = {"association": [], "dul": []}
    if profile_out is not None:
        _profile_threads(profiles)
    timings = _instrument()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    service = ListenerService(config, trigger=trigger)
    service.start()
    stop.wait()
    service.stop(grace=1.0)
    (data.parent / "timings.json").write_text(json.dumps(timings), encoding="utf-8")
    if profile_out is not None:
        _write_profiles(profiles, profile_out)


def _profile_threads(profiles: dict[str, list[Any]]) -> None:
    """cProfile every association thread and every DUL (network reading) thread, separately."""
    import cProfile

    from pynetdicom.association import Association

    from netrt.reactor import EventDrivenDUL

    def wrap(cls: type, name: str, kind: str) -> None:
        original = getattr(cls, name)

        def profiled(self: Any) -> None:
            profiler = cProfile.Profile()
            profiler.enable()
            try:
                original(self)
            finally:
                profiler.disable()
                profiles[kind].append(profiler)

        setattr(cls, name, profiled)

    wrap(Association, "run", "association")
    wrap(EventDrivenDUL, "run_reactor", "dul")


def _write_profiles(profiles: dict[str, list[Any]], out: Path) -> None:
    import io
    import pstats

    text = io.StringIO()
    titles = {
        "association": "association threads: DIMSE dispatch, NETRT's C-STORE handler, response encoding",
        "dul": "DUL threads: socket reads, PDU decoding, P-DATA reassembly, sending PDUs",
    }
    for kind, found in profiles.items():
        if not found:
            continue
        stats = pstats.Stats(found[0], stream=text)
        for extra in found[1:]:
            stats.add(extra)
        text.write(f"=== NETRT listener, {titles[kind]} (C-ECHO probes and the storescu association) ===\n")
        stats.sort_stats("cumulative").print_stats(25)
        stats.sort_stats("tottime").print_stats(25)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.getvalue(), encoding="utf-8")


# --- the figure ---------------------------------------------------------------------------------


def _namespace_command() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError("unshare (util-linux) is needed to run storescp in a private network namespace")
    return [unshare, "-n"]


def measure(smoke: bool, runs: int, root: Path, profile: bool) -> dict[str, Any]:
    from netrt.phantom import PhantomSpec, write_phantom

    for tool in ("storescu", "storescp", "echoscu", "Orthanc", "setpriv", "ip"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is needed (Debian packages dcmtk, orthanc, util-linux, iproute2)")
    rows, slices = (64, 20) if smoke else (512, 80)
    write_phantom(PhantomSpec(rows=rows, columns=rows, slices=slices, pixel_spacing=(0.98, 0.98)), root / "phantom")
    input_dir = root / "phantom" / "dicom"
    result = root / "result.json"
    command = [
        *_namespace_command(),
        sys.executable,
        "-m",
        "bench.receive",
        "worker",
        "--input",
        str(input_dir),
        "--root",
        str(root / "runs"),
        "--runs",
        str(runs),
        "--result",
        str(result),
    ]
    if profile:
        command += ["--profile-out", str(PROFILE_OUT)]
    os.sync()
    completed = subprocess.run(command, cwd=REPO_ROOT, timeout=WORKER_TIMEOUT_S, check=False, stderr=None)
    if completed.returncode != 0:
        raise RuntimeError(
            f"the receive benchmark worker failed (exit {completed.returncode}); "
            "it needs root for `unshare -n`, dcmtk's storescu/storescp/echoscu and Orthanc"
        )
    data: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    files = sorted(input_dir.iterdir())
    data.update(
        rows=rows,
        slices=slices,
        files=len(files),
        input_bytes=sum(p.stat().st_size for p in files),
        smoke=smoke,
        profile=profile,
    )
    return data


def render(data: dict[str, Any]) -> str:
    times: dict[str, list[float]] = data["times"]
    storescp, netrt, orthanc, floor = times["storescp"], times["netrt"], times["orthanc"], times["storescp-ignore"]
    ratio = median(netrt) / median(storescp)
    ratio_orthanc = median(netrt) / median(orthanc)
    paired = [n / s for n, s in zip(netrt, storescp, strict=True)]
    paired_orthanc = [n / o for n, o in zip(netrt, orthanc, strict=True)]
    per_instance = {name: median(values) / data["files"] * 1000 for name, values in times.items()}
    rows = [
        [
            "dcmtk `storescp -od DIR` (writes each file, no fsync)",
            f"{median(storescp):.3f} ({spread(storescp)})",
            f"{per_instance['storescp']:.2f}",
            "1.00x",
            f"{median(storescp) / median(orthanc):.2f}x",
        ],
        [
            "Orthanc (fdatasync of each file, SQLite index in WAL mode, MD5; 16 KiB PDUs)",
            f"{median(orthanc):.3f} ({spread(orthanc)})",
            f"{per_instance['orthanc']:.2f}",
            f"{median(orthanc) / median(storescp):.2f}x",
            "1.00x",
        ],
        [
            "NETRT listener (whole: checks, tracking, temp file + fsync + rename + dir fsync)",
            f"{median(netrt):.3f} ({spread(netrt)})",
            f"{per_instance['netrt']:.2f}",
            f"**{ratio:.2f}x**",
            f"**{ratio_orthanc:.2f}x**",
        ],
        [
            "dcmtk `storescp --ignore` (receives, stores nothing: the storescu + loopback floor)",
            f"{median(floor):.3f} ({spread(floor)})",
            f"{per_instance['storescp-ignore']:.2f}",
            f"{median(floor) / median(storescp):.2f}x",
            f"{median(floor) / median(orthanc):.2f}x",
        ],
    ]
    headers = ["receiver", "storescu wall time s, median (min-max)", "ms per instance", "/ storescp", "/ Orthanc"]
    table = markdown_table(headers, rows)
    stages: dict[str, list[float]] = data["stages"]
    handler_ms = median(stages["handler"]) * 1000
    write_ms = median(stages["durable_write"]) * 1000
    fsync_ms = median(stages["fsync"]) * 1000
    netrt_ms, storescp_ms, floor_ms = per_instance["netrt"], per_instance["storescp"], per_instance["storescp-ignore"]
    breakdown = markdown_table(
        ["per instance", "ms", "what"],
        [
            ["NETRT, all", f"{netrt_ms:.2f}", "storescu wall time / instances"],
            ["- in NETRT's C-STORE handler", f"{handler_ms:.2f}", "UID checks, study tracking, durable write"],
            ["-- durable write", f"{write_ms:.2f}", "temp file, write, fsync, rename, directory fsync"],
            ["--- of which the two fsyncs", f"{fsync_ms:.2f}", "file and directory (storescp does none)"],
            [
                "- outside the handler",
                f"{netrt_ms - handler_ms:.2f}",
                "storescu itself, loopback, pynetdicom: PDU reads and decoding, P-DATA reassembly, two thread "
                "hand-offs (event-driven, netrt.reactor), C-STORE-RSP encoding",
            ],
            ["storescp, all", f"{storescp_ms:.2f}", f"for comparison; storescu + loopback alone: {floor_ms:.2f}"],
            ["Orthanc, all", f"{per_instance['orthanc']:.2f}", "for comparison"],
        ],
    )
    smoke = " (smoke sizes: checks the benchmark runs; not a figure)" if data["smoke"] else ""
    options = ", ".join(f"`{key}: {json.dumps(value)}`" for key, value in ORTHANC_OPTIONS.items())
    lines = [
        "## Receive",
        "",
        f"{data['slices']} CT slices of {data['rows']}x{data['rows']} plus an RTSTRUCT (`netrt.phantom`, "
        f"{data['files']} files, {data['input_bytes'] / 1e6:.0f} MB, explicit VR little endian) sent by dcmtk "
        "`storescu +sd` over loopback inside a private network namespace (`unshare -n`), `TCP_NODELAY=1`. "
        "Time: `storescu` start to exit, every instance acknowledged.",
        "",
        f"- command: `{command_line()}`{smoke}",
        machine(("netrt", "pynetdicom", "pydicom")).markdown(),
        f"- runs: {len(netrt)} per receiver, a fresh receiver process per run (a fresh, empty Orthanc), the order "
        f"rotating ({'; '.join(data['orders'])}), `storescp --ignore` last; `os.sync()` after each run",
        f"- Orthanc {_orthanc_version()}: index (SQLite) and storage on the same disk as NETRT's data dir; {options}. "
        "Watched with strace (5 instances): Orthanc fdatasyncs each stored file before it answers and syncs "
        "nothing else per instance (its SQLite index is in WAL mode, synced at shutdown; no directory fsync); "
        "NETRT fsyncs each file's data and then its folder entry (two syncs); storescp syncs nothing.",
        "",
        table,
        "",
        f"**Target: NETRT / Orthanc <= {TARGET_ORTHANC:g}x: {verdict(ratio_orthanc, TARGET_ORTHANC)}.** "
        f"Per-run paired ratios: {', '.join(f'{r:.2f}x' for r in paired_orthanc)}.",
        "",
        f"**Target: NETRT / storescp <= {TARGET_RATIO:g}x: {verdict(ratio, TARGET_RATIO)}.** "
        f"Per-run paired ratios: {', '.join(f'{r:.2f}x' for r in paired)}.",
        "",
        "Where NETRT's time per instance goes (handler stages timed inside the listener process, mean per "
        "instance, median over the runs):",
        "",
        breakdown,
    ]
    if ratio > TARGET_RATIO:
        lines += [
            "",
            f"Why the storescp target is missed: {TARGET_RATIO:g}x storescp is {TARGET_RATIO * storescp_ms:.2f} ms "
            f"per instance. storescu and the loopback take {floor_ms:.2f} ms of it and NETRT's handler "
            f"{handler_ms:.2f} ms (the fsyncs that make an acknowledged instance survive a power cut alone "
            f"{fsync_ms:.2f} ms), which leaves {TARGET_RATIO * storescp_ms - floor_ms - handler_ms:.2f} ms for "
            f"pynetdicom's own work; it takes {netrt_ms - handler_ms - floor_ms:.2f} ms (PDU decoding and "
            "reassembly in Python, C-STORE-RSP encoding with pydicom; see the profile).",
        ]
    lines += [
        "",
        summary_row(
            figure="1. Receive (vs Orthanc)",
            netrt=f"{median(netrt):.3f} s ({netrt_ms:.2f} ms/instance)",
            comparison=f"{median(orthanc):.3f} s: storescu -> Orthanc (fdatasync per instance)",
            ratio=ratio_orthanc,
            target=f"<= {TARGET_ORTHANC:g}x",
            met=ratio_orthanc <= TARGET_ORTHANC,
            command=command_line(),
        ),
        summary_row(
            figure="1. Receive (vs storescp)",
            netrt=f"{median(netrt):.3f} s ({netrt_ms:.2f} ms/instance)",
            comparison=f"{median(storescp):.3f} s: storescu -> dcmtk storescp (no fsync)",
            ratio=ratio,
            target=f"<= {TARGET_RATIO:g}x",
            met=ratio <= TARGET_RATIO,
            command=command_line(),
        ),
    ]
    if data["profile"]:
        lines += [
            "",
            f"Profile: `{PROFILE_OUT.relative_to(REPO_ROOT)}` (cProfile of the listener's association and DUL "
            "threads in one extra, untimed run; `select` and lock waits there are the threads waiting for work).",
        ]
    return "\n".join(lines) + "\n"


def _orthanc_version() -> str:
    try:
        first = subprocess.run(["Orthanc", "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "(unknown version)"
    return first.split("\n", 1)[0].replace("Orthanc ", "") or "(unknown version)"


def run(options: Options) -> str:
    """Measure the figure and return its Markdown section."""
    root = Path(tempfile.mkdtemp(prefix="netrt-bench-receive-"))
    try:
        return render(measure(options.smoke, options.runs, root, options.profile))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.receive", description="internal entry points")
    commands = parser.add_subparsers(dest="command", required=True)
    work = commands.add_parser("worker")
    work.add_argument("--input", type=Path, required=True)
    work.add_argument("--root", type=Path, required=True)
    work.add_argument("--runs", type=int, required=True)
    work.add_argument("--result", type=Path, required=True)
    work.add_argument("--profile-out", type=Path)
    serve = commands.add_parser("listener")
    serve.add_argument("--data", type=Path, required=True)
    serve.add_argument("--profile-out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "worker":
        worker(args.input, args.root, args.runs, args.result, args.profile_out)
    else:
        listener(args.data, args.profile_out)


if __name__ == "__main__":
    main()
