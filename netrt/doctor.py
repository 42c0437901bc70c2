"""`netrt doctor`: is this machine ready to run NETRT with this config? One plain check per line.

Each check returns a :class:`Check`: ``ok``, ``FAIL`` (with the fix) or ``info`` (an optional tool
that is absent: said, with how to install it, but not a failure, since NETRT itself does not need
it). No check changes anything lasting: the data-dir check writes and removes one small file, the
port check binds and closes a socket, the rest only connect. Prefect is never imported here; the
Prefect API is asked over plain HTTP.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from netrt.config import DicomDestination, FolderDestination, NetrtConfig, load_config
from netrt.errors import NetrtError

Status = Literal["ok", "FAIL", "info"]
MIN_FREE_BYTES = 1 << 30  # below 1 GiB a 512x512x200 study (about 1 GB in and out) may not fit

# Optional programs: (command, what uses it, how to install). NETRT's own commands need none of them.
OPTIONAL_TOOLS: tuple[tuple[str, str, str], ...] = (
    ("storescu", "sending a study to NETRT by hand (README, Receiving studies); bench", "apt-get install dcmtk"),
    ("echoscu", "C-ECHO of the listener by hand (README); bench", "apt-get install dcmtk"),
    ("storescp", "the receive benchmark's comparison (python -m bench receive)", "apt-get install dcmtk"),
    (
        "Orthanc",
        "the delivery benchmark's PACS (python -m bench deliver) and delivery tests",
        "apt-get install orthanc",
    ),
    ("dciodvfy", "checking written files against the DICOM standard (tests)", "apt-get install dicom3tools"),
    ("unshare", "private network namespaces for storescp/Orthanc (bench, tests)", "apt-get install util-linux"),
)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        text = f"{self.status:<4} {self.name}: {self.detail}"
        if self.fix and self.status != "ok":
            text += f" -> {'fix' if self.failed else 'to install'}: {self.fix}"
        return text


def check_config(path: str | None) -> tuple[Check, NetrtConfig | None]:
    where = path or "built-in defaults (no --config)"
    try:
        config = load_config(path)
    except NetrtError as exc:
        text = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())  # one line
        return Check("config", "FAIL", text, "correct the keys named (netrt config check FILE)"), None
    return Check("config", "ok", f"{where} is valid (netrt config show prints it)"), config


def check_data_dir(config: NetrtConfig) -> Check:
    """The data dir exists or can be made, takes a file (written, fsync'd, removed), and has room."""
    root = Path(config.paths.data_dir)
    fix = f"make {root} writable for this user, or set paths.data_dir"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".netrt-doctor-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"netrt doctor\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        return Check("data dir", "FAIL", f"{root}: not writable ({exc.strerror or exc})", fix)
    free = shutil.disk_usage(root).free
    text = f"{root}: writable, {free / (1 << 30):.1f} GiB free"
    if free < MIN_FREE_BYTES:
        return Check("data dir", "FAIL", f"{text} (under 1 GiB)", "free space on that disk, or move paths.data_dir")
    return Check("data dir", "ok", text)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def check_listener_port(config: NetrtConfig, echo: Callable[[DicomDestination, str], float]) -> Check:
    """The listener's port is free to bind, or NETRT already listens there (it answers C-ECHO as our AE)."""
    listener = config.listener
    where = f"{listener.host}:{listener.port}"
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener binds
        try:
            probe.bind((listener.host, listener.port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return Check("listener port", "FAIL", f"{where}: cannot bind ({exc.strerror})", "set listener.host")
        else:
            return Check("listener port", "ok", f"{where} is free for the listener (AE {listener.ae_title})")
    if listener.tls.enabled:
        return Check(
            "listener port",
            "FAIL",
            f"{where} is in use; TLS is on, so this check cannot C-ECHO it",
            f"check it is NETRT: echoscu +tls ... -aec {listener.ae_title} {_client_host(listener.host)} "
            f"{listener.port}; else stop that program or set listener.port",
        )
    own = DicomDestination(
        name="listener",
        type="dicom",
        ae_title=listener.ae_title,
        host=_client_host(listener.host),
        port=listener.port,
        connect_timeout_seconds=3,
        acse_timeout_seconds=5,
        dimse_timeout_seconds=5,
    )
    calling = listener.allowed_calling_ae_titles[0] if listener.allowed_calling_ae_titles else "NETRT_DOCTOR"
    try:
        seconds = echo(own, calling)
    except NetrtError as exc:
        return Check(
            "listener port",
            "FAIL",
            f"{where} is in use by something that does not answer C-ECHO as AE {listener.ae_title} ({exc})",
            "stop the program holding the port (ss -ltnp), or set listener.port",
        )
    return Check(
        "listener port",
        "ok",
        f"{where} is ours: a running NETRT answers C-ECHO as AE {listener.ae_title} ({seconds * 1000:.0f} ms)",
    )


def _healthy(api_url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, TimeoutError, ValueError):
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def check_prefect_api(config: NetrtConfig, local_server: str | None = None) -> Check:
    """The configured Prefect API answers; or, with none configured, the local server answers or can start.

    ``local_server`` describes the data dir's background server when one is recorded (the caller knows).
    """
    configured = config.prefect.api_url
    if configured is not None:
        if _healthy(configured):
            return Check("Prefect API", "ok", f"{configured} answers (prefect.api_url)")
        return Check(
            "Prefect API",
            "FAIL",
            f"{configured} (prefect.api_url) does not answer {configured.rstrip('/')}/health",
            "start that Prefect server (prefect server start), or correct prefect.api_url",
        )
    port = config.prefect.server_port
    url = f"http://127.0.0.1:{port}/api"
    if _healthy(url):
        what = local_server or "a running netrt serve, or another data dir's server on this port"
        return Check("Prefect API", "ok", f"the local server answers at {url} ({what})")
    if _port_free("127.0.0.1", port):
        return Check(
            "Prefect API",
            "ok",
            f"no local server runs now; port {port} is free for it (netrt process starts one in the background, "
            "netrt serve its own)",
        )
    return Check(
        "Prefect API",
        "FAIL",
        f"127.0.0.1:{port} (prefect.server_port) is taken by something that is not a Prefect API",
        "stop that program, or set prefect.server_port to a free port",
    )


def check_destinations(config: NetrtConfig, echo: Callable[[DicomDestination, str], float]) -> list[Check]:
    """Each `dicom` destination answers C-ECHO; each folder destination takes files."""
    checks = []
    for destination in config.effective_destinations():
        name = f"destination {destination.name}"
        if isinstance(destination, DicomDestination):
            where = f"{destination.ae_title}@{destination.host}:{destination.port}"
            calling = destination.calling_ae_title or config.listener.ae_title
            try:
                seconds = echo(destination, calling)
            except NetrtError as exc:
                checks.append(
                    Check(
                        name,
                        "FAIL",
                        f"C-ECHO to {where} failed: {exc}",
                        f"start it or correct its host/port/ae_title; it must accept calling AE {calling}; "
                        f"retry with netrt echo {destination.name}",
                    )
                )
                continue
            checks.append(Check(name, "ok", f"{where} answers C-ECHO ({seconds * 1000:.0f} ms, calling AE {calling})"))
        elif isinstance(destination, FolderDestination):
            folder = Path(destination.path)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                probe = folder / f".netrt-doctor-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                checks.append(
                    Check(name, "FAIL", f"folder {folder} not writable ({exc.strerror or exc})", "fix its permissions")
                )
                continue
            checks.append(Check(name, "ok", f"folder {folder} is writable"))
    return checks


def check_tools(which: Callable[[str], str | None] = shutil.which) -> list[Check]:
    """Optional programs: present (ok) or absent (info, with what uses it and how to install it)."""
    checks = []
    for command, used_by, install in OPTIONAL_TOOLS:
        path = which(command)
        if path:
            checks.append(Check(f"tool {command}", "ok", f"{path} (for {used_by})"))
        else:
            checks.append(Check(f"tool {command}", "info", f"not installed; optional, for {used_by}", install))
    return checks


def run_checks(
    config_file: str | None,
    echo: Callable[[DicomDestination, str], float],
    local_server: Callable[[NetrtConfig], str | None] = lambda config: None,
) -> list[Check]:
    """Every check in order; with an invalid config only that line (the others need it)."""
    first, config = check_config(config_file)
    if config is None:
        return [first]
    checks = [first, check_data_dir(config), check_listener_port(config, echo)]
    checks.append(check_prefect_api(config, local_server(config)))
    checks += check_destinations(config, echo)
    checks += check_tools()
    return checks
