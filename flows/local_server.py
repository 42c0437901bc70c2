"""Start, probe and stop NETRT's own local Prefect server (SQLite under the data dir).

Used by `netrt serve` when `prefect.api_url` is null. The server is a child process so that its
event loop, database and UI never share a process with the DICOM listener.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
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
