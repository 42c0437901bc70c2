"""Orthanc for tests: a real PACS, started by hand inside a private network namespace.

Why a namespace: Orthanc listens on every interface and has no option to bind to one, while
network tests must only ever listen on 127.0.0.1. ``unshare -n`` gives a process its own network
namespace whose only interface is its own loopback, so an Orthanc started there is unreachable
from anywhere else, and fixed ports cannot clash with anything on the host or another test. What
talks to Orthanc (netrt.send, ``netrt process``, storescu) must run in the same namespace, so a
test puts that part in a *scenario*: a module-level function taking and returning JSON-able
dicts, which :func:`run_in_namespace` runs in a fresh namespace in a child Python process.

    from tests.orthanc import Orthanc, OrthancSettings, run_in_namespace

    def _scenario(params: dict[str, Any]) -> dict[str, Any]:   # runs inside the namespace
        settings = OrthancSettings(root=Path(params["root"]))
        with Orthanc(settings) as orthanc:
            ...  # send to 127.0.0.1:settings.dicom_port, called AE settings.aet
            return {"instances": orthanc.statistics()["CountInstances"]}

    def test_something(tmp_path: Path) -> None:
        result = run_in_namespace(_scenario, {"root": str(tmp_path / "orthanc")}, tmp_path)
        assert result["instances"] == 20

:class:`Orthanc` refuses to start outside a private namespace (it checks that ``lo`` is the only
network interface), so a scenario run by mistake in the test process fails loudly instead of
exposing a PACS. ``stop()`` and ``start()`` may be called again on the same instance: the storage
survives, which is what "the PACS goes down, then comes back" tests need. Every wait is bounded.
Orthanc's own log is ``<root>/orthanc.log``; :func:`run_in_namespace` shows the scenario's
stderr and the tail of that log when a scenario fails.

Benchmarks use :func:`run_scenario` (no pytest). :class:`Orthanc` with ``quick_stop=True`` kills
Orthanc instead of waiting ~3.5 s for its graceful shutdown.

Observing what Orthanc received: a Lua ``ReceivedInstanceFilter`` (``"LuaScripts"`` option) that
appends each incoming SOPInstanceUID to a file sees every C-STORE, duplicates included, where the
REST API shows only what is stored. Note that Orthanc 1.10 answers *Success* to a C-STORE its
filter refuses, so a filter cannot make Orthanc refuse an instance; refuse a SOP class
(``"UnknownSopClassAccepted": false``) or a transfer syntax (``"AcceptedTransferSyntaxes"``), or
stop or kill Orthanc instead.

Run ``python -m tests.orthanc`` only through :func:`run_scenario`.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent

# dcmtk reads this (storescu, echoscu, and Orthanc, whose DICOM layer is dcmtk): without it the
# last small segment of each message waits on Nagle's algorithm and the peer's delayed ACK (~40 ms
# per instance), and timings measure that instead of the software.
DCMTK_ENV = {"TCP_NODELAY": "1"}

Scenario = Callable[[dict[str, Any]], dict[str, Any]]


def require_orthanc() -> None:
    """Skip (locally) or fail (in CI) unless Orthanc, unshare, ip and setpriv are installed."""
    from tests.conftest import require_tool

    for tool in ("Orthanc", "unshare", "ip", "setpriv"):
        require_tool(tool)


def in_private_namespace() -> bool:
    """True when loopback is this process's only network interface (``unshare -n``)."""
    # /sys/class/net belongs to the mount namespace and still lists the host's interfaces;
    # if_nameindex() asks the kernel about this process's network namespace.
    return [name for _, name in socket.if_nameindex()] == ["lo"]


@dataclass(frozen=True)
class OrthancSettings:
    """One Orthanc instance's configuration; everything it writes stays under ``root``.

    ``options`` are merged last into Orthanc's JSON config (e.g. ``AcceptedTransferSyntaxes``,
    ``LuaScripts``, ``DicomTlsEnabled``, ``DicomModalities``); see /etc/orthanc/orthanc.json for
    what exists. The defaults: called AE title checked, any calling AE may store and echo, no
    HTTP authentication, nothing stored compressed, no plugins.
    """

    root: Path
    aet: str = "ORTHANC"
    dicom_port: int = 4242
    http_port: int = 8042
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def config_file(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_file(self) -> Path:
        return self.root / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def write_config(self) -> Path:
        """Write ``<root>/orthanc.json`` (and the storage folders) and return its path."""
        (self.root / "storage").mkdir(parents=True, exist_ok=True)
        (self.root / "index").mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "netrt-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "Plugins": [],
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckModalityHost": False,
            "DicomThreadsCount": 2,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "HttpThreadsCount": 4,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "OverwriteInstances": False,
        }
        config.update(self.options)
        self.config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
        return self.config_file


class Orthanc:
    """A running Orthanc (context manager): started on enter, stopped on exit.

    REST helpers return decoded JSON; :meth:`instance_file` returns the stored DICOM file's bytes.
    """

    def __init__(self, settings: OrthancSettings, *, ready_timeout: float = 20.0, quick_stop: bool = False) -> None:
        """``quick_stop``: :meth:`stop` kills at once instead of Orthanc's ~3.5 s graceful shutdown.
        Safe when nothing is read from the storage by anything but a restarted Orthanc: Orthanc
        commits each instance (SQLite index) before it answers the C-STORE."""
        self.settings = settings
        self.ready_timeout = ready_timeout
        self.quick_stop = quick_stop
        self._process: subprocess.Popen[bytes] | None = None
        self.ready_seconds: float | None = None

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> float:
        """Start Orthanc and wait (bounded) until its REST API answers; return how long that took.

        Call it from a thread that outlives Orthanc (normally the main thread): the parent-death
        signal fires when the starting *thread* ends."""
        if not in_private_namespace():
            raise RuntimeError("Orthanc listens on all interfaces: start it only inside run_in_namespace()")
        if self.running:
            raise RuntimeError("Orthanc is already running")
        config = self.settings.write_config()
        log = self.settings.log_file.open("ab")
        started = time.monotonic()
        # setpriv --pdeathsig: Orthanc is SIGKILLed when the scenario process dies, however it dies
        # (the setting survives the exec), so no Orthanc outlives its test.
        self._process = subprocess.Popen(
            ["setpriv", "--pdeathsig", "KILL", "Orthanc", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.settings.root,
            env={**os.environ, **DCMTK_ENV},  # Orthanc's DICOM layer is dcmtk: answer without Nagle delays
        )
        log.close()
        deadline = started + self.ready_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self._process.returncode}; see {self.settings.log_file}")
            try:
                self.get("/system", timeout=0.5)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.02)
                continue
            self.ready_seconds = time.monotonic() - started
            return self.ready_seconds
        self.stop()
        raise RuntimeError(f"Orthanc's REST API did not answer within {self.ready_timeout:g} s")

    def _note_unexpected_exit(self) -> None:
        """Say in Orthanc's log when it was found dead (a crash, not our stop), for failure reports."""
        if self._process is not None and self._process.poll() is not None:
            with self.settings.log_file.open("a", encoding="utf-8") as log:
                log.write(f"[tests.orthanc] Orthanc had exited by itself with code {self._process.returncode}\n")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL (SIGKILL at once with ``quick_stop``). Idempotent."""
        self._note_unexpected_exit()
        if self.quick_stop:
            self.kill()
            return
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL at once: a PACS that crashes (no clean association release)."""
        self._note_unexpected_exit()
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    # --- REST ---

    def request(self, method: str, path: str, data: bytes | None = None, timeout: float = 30.0) -> bytes:
        req = urllib.request.Request(self.settings.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            body: bytes = response.read()
            return body

    def get(self, path: str, timeout: float = 30.0) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def statistics(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/statistics")
        return result

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        result: list[str] = self.get("/instances")
        return result

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        """``/instances/{id}/simplified-tags``: keyword -> value."""
        result: dict[str, Any] = self.get(f"/instances/{instance_id}/simplified-tags")
        return result

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file Orthanc stored, as received."""
        return self.request("GET", f"/instances/{instance_id}/file")

    def files_by_sop_instance_uid(self) -> dict[str, bytes]:
        """Every stored file, keyed by its SOPInstanceUID."""
        files = {}
        for instance_id in self.instances():
            tags = self.get(f"/instances/{instance_id}")
            files[str(tags["MainDicomTags"]["SOPInstanceUID"])] = self.instance_file(instance_id)
        return files


class ScenarioError(RuntimeError):
    """A scenario raised, exited non-zero or ran out of time; the message carries its stderr and
    the tail of every Orthanc log under the work dir."""


def run_scenario(scenario: Scenario, params: dict[str, Any], workdir: Path, *, timeout: float = 300) -> Any:
    """Run ``scenario(params)`` in a child Python inside a fresh private network namespace.

    ``scenario`` must be a module-level function of an importable module (a test module, a bench
    module); ``params`` and its return value must be JSON-able. Returns the decoded return value.
    Raises :class:`ScenarioError` when the child raises, exits non-zero or outlives ``timeout``
    seconds (then its whole process group is killed, Orthanc included). Needs root for
    ``unshare -n``. Tests call :func:`run_in_namespace` instead.
    """
    module = scenario.__module__
    if module == "__main__":  # a module run with `python -m package.module`: import it by its real name
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        if spec is None:
            raise ScenarioError(f"{scenario.__qualname__}: run its module with `python -m`, not as a script")
        module = spec.name
    name = f"{module}:{scenario.__qualname__}"
    workdir.mkdir(parents=True, exist_ok=True)
    stem = scenario.__name__.strip("_")
    params_file = workdir / f"{stem}.params.json"
    result_file = workdir / f"{stem}.result.json"
    params_file.write_text(json.dumps(params), encoding="utf-8")
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = ["unshare", "-n", sys.executable, "-m", "tests.orthanc", name, str(params_file), str(result_file)]
    child = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # one process group: a timeout kills the scenario and all it started
    )
    try:
        _, stderr = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        _, stderr = child.communicate()
        raise ScenarioError(f"scenario {name} ran longer than {timeout:g} s\n{_logs(workdir, stderr)}") from None
    if child.returncode != 0 or not result_file.exists():
        raise ScenarioError(f"scenario {name} failed (exit {child.returncode})\n{_logs(workdir, stderr)}")
    return json.loads(result_file.read_text(encoding="utf-8"))


def run_in_namespace(scenario: Scenario, params: dict[str, Any], workdir: Path, *, timeout: float = 300) -> Any:
    """:func:`run_scenario` for tests: skipped (locally) or failed (CI) when Orthanc, unshare or ip
    is missing; a failed scenario fails the test with its stderr and Orthanc's log."""
    import pytest

    require_orthanc()
    try:
        return run_scenario(scenario, params, workdir, timeout=timeout)
    except ScenarioError as exc:
        pytest.fail(str(exc))


def _logs(workdir: Path, stderr: str) -> str:
    parts = [f"--- stderr ---\n{stderr[-6000:]}"]
    for log in sorted(workdir.rglob("orthanc.log")):
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        parts.append(f"--- {log} (last lines) ---\n" + "\n".join(lines))
    return "\n".join(parts)


def _main(argv: list[str]) -> int:
    """Child side of :func:`run_in_namespace`: loopback up, run the scenario, write its result."""
    if len(argv) != 3:
        print("usage: python -m tests.orthanc MODULE:FUNCTION PARAMS.json RESULT.json", file=sys.stderr)
        return 2
    if not in_private_namespace():
        print("tests.orthanc: not in a private network namespace (use run_in_namespace)", file=sys.stderr)
        return 2
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    module_name, _, function_name = argv[0].partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    params = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    try:
        result = function(params)
    except Exception:
        traceback.print_exc()
        return 1
    Path(argv[2]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
