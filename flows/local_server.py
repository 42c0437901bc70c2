"""Start, probe and stop NETRT's own local Prefect server (SQLite under the data dir).

Used by `netrt serve` when `prefect.api_url` is null. The server is a child process so that its
event loop, database and UI never share a process with the DICOM listener. One-off commands
(`netrt process`, `netrt quarantine retry`) start it in the background and leave it running for the
next command (below). This module never imports Prefect: it runs ``python -m prefect``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from netrt.errors import NetrtError


def die_with_parent() -> None:
    """Run in a child before exec: ask Linux to SIGTERM it when the process that started it dies.

    The Prefect server and the flow server run in their own sessions (so Ctrl-C reaches only
    `netrt serve`, which stops them in order); without this, a SIGKILL of `netrt serve` alone would
    leave them running and a restart would find the port taken.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: children then outlive a SIGKILLed parent
        pass


def is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when ``<api_url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


def serving_home(api_url: str, timeout: float = 2.0) -> Path | None:
    """The PREFECT_HOME of the Prefect server answering at ``api_url`` (its admin settings), or None
    when it does not say. Tells a data dir's own server from another node's on the same port."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/admin/settings", timeout=timeout) as response:
            home = json.loads(response.read()).get("home")
    except (urllib.error.URLError, OSError, TimeoutError, ValueError, AttributeError):
        return None
    return Path(home) if isinstance(home, str) and home else None


def start_local_server(
    env: dict[str, str], api_url: str, log_file: Path, ready_timeout: float = 180.0
) -> subprocess.Popen[bytes]:
    """Start ``prefect server start`` on 127.0.0.1 and wait until it answers; raise if it does not."""
    if is_healthy(api_url):
        raise NetrtError(f"something already answers at {api_url}; set prefect.server_port to a free port")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **env}
    child_env.pop("PREFECT_API_URL", None)  # the server itself must not try to be its own client
    host = env["PREFECT_SERVER_API_HOST"]
    port = env["PREFECT_SERVER_API_PORT"]
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", port],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NetrtError(f"the local Prefect server exited with code {process.returncode}; see {log_file}")
        if is_healthy(api_url):
            return process
        time.sleep(0.5)
    stop_local_server(process)
    raise NetrtError(
        f"the local Prefect server did not answer at {api_url} within {ready_timeout:.0f} s; see {log_file}"
    )


def stop_local_server(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the server's process group, then SIGKILL after ``grace`` seconds."""
    stop_process_group(process, grace)


def stop_process_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM a child started in its own session, and its group; SIGKILL after ``grace`` seconds."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)
    except ProcessLookupError:
        pass


# --- the background server of one-off commands -------------------------------------------------
#
# `netrt process` and `netrt quarantine retry` start the data dir's local server once and leave it
# running, so later commands (and `netrt serve`) reuse it instead of paying its start-up. It runs
# under a small supervisor (``python -m flows.local_server supervise``, standard library only) in
# its own session: the supervisor records its pid and port in ``<PREFECT_HOME>/local-server.json``,
# stops the server when that record's mtime (the lease, touched by every command using the server)
# is older than the idle limit, when the record is removed, or on SIGTERM (`netrt server stop`), and
# removes the record when it ends.

RECORD_NAME = "local-server.json"
_SUPERVISOR_MODULE = "flows.local_server"


@dataclass(frozen=True)
class ServerRecord:
    """The background server of a data dir, as recorded in ``<PREFECT_HOME>/local-server.json``."""

    pid: int  # the supervisor's pid, also its process group (the server runs in that group)
    port: int
    api_url: str
    log_file: str
    started: str
    idle_minutes: int
    path: Path

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    def last_used(self) -> float:
        """Seconds since a command last used the server (the record's mtime)."""
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")


def record_path(prefect_home: Path) -> Path:
    return prefect_home / RECORD_NAME


def _is_supervisor(pid: int) -> bool:
    """True when ``pid`` is alive and is a local-server supervisor (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True  # no /proc (not Linux): alive is the best we can tell
    return _SUPERVISOR_MODULE.encode() in cmdline and b"supervise" in cmdline


def read_record(prefect_home: Path) -> ServerRecord | None:
    """The data dir's background server when its supervisor is alive; None otherwise."""
    path = record_path(prefect_home)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        record = ServerRecord(
            pid=int(data["pid"]),
            port=int(data["port"]),
            api_url=str(data["api_url"]),
            log_file=str(data["log_file"]),
            started=str(data["started"]),
            idle_minutes=int(data["idle_minutes"]),
            path=path,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if _is_supervisor(record.pid) else None


def touch_record(record: ServerRecord) -> None:
    """Mark the server as used now (its idle time starts again)."""
    with contextlib.suppress(OSError):
        os.utime(record.path)


class KeepAlive:
    """Touches a server's record every ``every`` seconds while a command uses it (a daemon thread)."""

    def __init__(self, record: ServerRecord, every: float = 30.0) -> None:
        self.record = record
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), name="netrt-server-lease", daemon=True)

    def _run(self, every: float) -> None:
        touch_record(self.record)
        while not self._stop.wait(every):
            touch_record(self.record)

    def __enter__(self) -> KeepAlive:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        touch_record(self.record)


def launch_background_server(
    env: dict[str, str], api_url: str, port: int, log_file: Path, idle_minutes: int
) -> tuple[ServerRecord, bool]:
    """The data dir's background server: the running one, else a new one launched now (not yet ready).

    Returns the record and whether this call launched it. Two commands starting at once launch one
    server: the check and the launch hold an exclusive lock on ``<PREFECT_HOME>/local-server.lock``.
    Returns at once; :func:`wait_until_ready` waits for the server to answer.
    """
    prefect_home = Path(env["PREFECT_HOME"])
    prefect_home.mkdir(parents=True, exist_ok=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with (prefect_home / "local-server.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        running = read_record(prefect_home)
        if running is not None and running.port != port:
            stop_background_server(running)  # prefect.server_port changed since it started
            running = None
        if running is not None:
            touch_record(running)
            return running, False
        child_env = {**os.environ, **env}
        child_env.pop("PREFECT_API_URL", None)  # the server itself must not try to be its own client
        path = record_path(prefect_home)
        with log_file.open("ab") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    _SUPERVISOR_MODULE,
                    "supervise",
                    "--record",
                    str(path),
                    "--host",
                    env["PREFECT_SERVER_API_HOST"],
                    "--port",
                    str(port),
                    "--idle-minutes",
                    str(idle_minutes),
                ],
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives this command; Ctrl-C here does not reach it
                cwd=str(prefect_home),
            )
        record = ServerRecord(
            pid=process.pid,
            port=port,
            api_url=api_url,
            log_file=str(log_file),
            started=datetime.now(UTC).isoformat(timespec="seconds"),
            idle_minutes=idle_minutes,
            path=path,
        )
        _write_record(record)
        return record, True


def _write_record(record: ServerRecord) -> None:
    data = {
        "pid": record.pid,
        "port": record.port,
        "api_url": record.api_url,
        "log_file": record.log_file,
        "started": record.started,
        "idle_minutes": record.idle_minutes,
    }
    temp = record.path.with_name(record.path.name + ".tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    temp.replace(record.path)


def wait_until_ready(record: ServerRecord, timeout: float = 180.0) -> None:
    """Wait until the background server answers; raise naming its log when it ends or does not answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(record.api_url, timeout=1.0):
            return
        if not _is_supervisor(record.pid):
            raise NetrtError(f"the local Prefect server did not start (port {record.port}); see {record.log_file}")
        time.sleep(0.2)
    raise NetrtError(
        f"the local Prefect server did not answer at {record.api_url} within {timeout:.0f} s; see {record.log_file}"
    )


def stop_background_server(record: ServerRecord, grace: float = 20.0) -> bool:
    """SIGTERM the supervisor (it stops the server and removes the record); SIGKILL the group after ``grace``.

    Returns True when it ended within the grace time, False when it had to be killed.
    """
    try:
        os.kill(record.pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _is_supervisor(record.pid):
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pid, signal.SIGKILL)
    record.path.unlink(missing_ok=True)
    return False


def _supervise(record_file: Path, host: str, port: int, idle_minutes: int) -> int:
    """Run ``prefect server start`` until SIGTERM, the idle limit, the record's removal or the server's end."""
    stop = threading.Event()
    reason = ["SIGTERM"]

    def _on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
        stdin=subprocess.DEVNULL,
    )
    me = os.getpid()
    now = f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ}"
    print(f"{now} supervisor {me}: server pid {server.pid} on {host}:{port}", flush=True)
    code = 0
    while not stop.wait(2.0):
        if server.poll() is not None:
            reason[0] = f"the server exited with code {server.returncode}"
            code = 1
            break
        try:
            data = json.loads(record_file.read_text(encoding="utf-8"))
            idle = time.time() - record_file.stat().st_mtime
        except (OSError, ValueError):
            reason[0] = f"its record {record_file} is gone"
            break
        if int(data.get("pid", -1)) != me:
            reason[0] = f"its record {record_file} names another server"
            break
        if idle_minutes and idle > idle_minutes * 60:
            reason[0] = f"no NETRT command used it for {idle_minutes} min"
            break
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
    try:
        if int(json.loads(record_file.read_text(encoding="utf-8")).get("pid", -1)) == me:
            record_file.unlink()
    except (OSError, ValueError):
        pass
    print(f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} supervisor {me}: stopped ({reason[0]})", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flows.local_server")
    commands = parser.add_subparsers(dest="command", required=True)
    supervise = commands.add_parser("supervise", help="run the data dir's background Prefect server")
    supervise.add_argument("--record", type=Path, required=True)
    supervise.add_argument("--host", required=True)
    supervise.add_argument("--port", type=int, required=True)
    supervise.add_argument("--idle-minutes", type=int, required=True)
    args = parser.parse_args(argv)
    return _supervise(args.record, args.host, args.port, args.idle_minutes)


if __name__ == "__main__":
    raise SystemExit(main())
