"""Production mode at small scale: PostgreSQL, a Prefect server on it, the deployments registered by
`prefect deploy` from prefect.yaml, `netrt listener` and `netrt worker` process workers; eight
phantom studies sent at once by storescu, with one worker and then with two; a worker SIGKILLed in
the middle of a run.

Run alone with `.venv/bin/pytest -m scale -s` (prints the throughput figures).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest

from flows.local_server import start_local_server, stop_local_server, stop_process_group
from netrt.layout import DataLayout
from netrt.phantom import PhantomSpec, write_phantom

from .conftest import IN_CI, REPO, free_port, require_tool
from .listener_helpers import dcmtk_env

pytestmark = [pytest.mark.scale, pytest.mark.slow, pytest.mark.network]

STUDIES = 8
PHANTOM = {"rows": 64, "columns": 64, "pixel_spacing": (3.0, 3.0), "slices": 20}
RUN_TIMEOUT_S = 600  # per round of 8; a bound for a heavily shared machine (~2 min when idle)
VENV_BIN = Path(sys.executable).parent


def _postgres_bin() -> Path:
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    message = "PostgreSQL is not installed (Debian package postgresql, see .ci/run)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1 (free port, unix socket in its temp dir); its URL."""
    bindir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="netrt-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root
        shutil.chown(root, user="nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    data, port = root / "data", free_port()

    def pg(*command: str, timeout: float = 120) -> None:
        result = subprocess.run([*as_user, *command], timeout=timeout, capture_output=True, text=True)
        assert result.returncode == 0, f"{command[0]}: {result.stdout}{result.stderr}"

    pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-h 127.0.0.1 -p {port} -k {root} -c max_connections=200"
    pg(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(root / "postgres.log"),
        "-w",
        "-t",
        "60",
        "-o",
        options,
        "start",
    )
    try:
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect")
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect"
    finally:
        with suppress(Exception):
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Site:
    api_url: str
    config: Path
    layout: DataLayout
    logs: Path
    env: dict[str, str]
    dicom_port: int


@pytest.fixture(scope="module")
def site(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A Prefect server on PostgreSQL and a NETRT config pointing at it (shared data dir)."""
    tmp = tmp_path_factory.mktemp("scale")
    port, dicom_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    data = tmp / "data"
    config = tmp / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {data}}}\n"
        f"prefect: {{api_url: '{api_url}', process_study_concurrency: 8, worker_limit: 4}}\n"
        "quarantine: {retry_cron: '11 */3 * * *'}\n"
        f"listener: {{host: 127.0.0.1, port: {dicom_port}, study_idle_seconds: 1.0}}\n"
    )
    logs = tmp / "logs"
    logs.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "NETRT_"))}
    base["PATH"] = f"{VENV_BIN}{os.pathsep}{base.get('PATH', '')}"
    server_env = {
        "PREFECT_HOME": str(tmp / "prefect-server"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    server = start_local_server(server_env, api_url, logs / "prefect-server.log", ready_timeout=180)
    try:
        env = {**base, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp / "client"), "DO_NOT_TRACK": "1"}
        yield Site(api_url, config, DataLayout.from_data_dir(data).create(), logs, env, dicom_port)
    finally:
        stop_local_server(server)


class Worker:
    """One `netrt worker` (or `netrt listener`) process, in its own session."""

    def __init__(self, site: Site, name: str, command: str = "worker") -> None:
        self.name = name
        self.log = site.logs / f"{name}.log"
        extra = ["--name", name] if command == "worker" else []
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "netrt"), command, "--config", str(site.config), *extra],
                env={k: v for k, v in site.env.items() if not k.startswith("PREFECT_")},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_online(self, client: object, timeout: float = 120) -> None:
        from prefect.client.orchestration import SyncPrefectClient

        assert isinstance(client, SyncPrefectClient)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            with suppress(Exception):
                if any(w.name == self.name for w in client.read_workers_for_work_pool("netrt")):
                    return
            time.sleep(1.0)
        raise AssertionError(f"worker {self.name} did not come online:\n{self.log.read_text()[-3000:]}")

    def wait_for_line(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            if text in self.log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise AssertionError(f"{self.name} did not print {text!r}:\n{self.log.read_text()[-3000:]}")

    def kill_all(self) -> None:
        """SIGKILL the worker and every flow run it started (a dead host or an OOM-killed container)."""
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        stop_process_group(self.process, 30)


def _prefect(site: Site, *args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        ["prefect", *args],
        cwd=REPO,
        env={**site.env, "NETRT_CONFIG": str(site.config)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _studies(site: Site, first_seed: int, count: int) -> list[tuple[str, Path]]:
    """``count`` phantom studies: (StudyInstanceUID, folder of its files to send)."""
    made = []
    for seed in range(first_seed, first_seed + count):
        work = site.layout.root.parent / f"phantom-{seed}"
        manifest = write_phantom(PhantomSpec(**PHANTOM, seed=seed), work)  # type: ignore[arg-type]
        made.append((manifest.study_instance_uid, work / "dicom"))
    return made


def _send(site: Site, studies: list[tuple[str, Path]]) -> list[str]:
    """Send every study at once with storescu (one association each); the ids of the flow runs the
    listener creates for them (from its transaction log)."""
    from netrt.logs import TransactionLog

    storescu = require_tool("storescu")
    transactions = TransactionLog(site.layout.transaction_log)
    before = len(transactions.entries())
    senders = [
        subprocess.Popen(
            [storescu, "-aet", "SCALETEST", "-aec", "NETRT", "127.0.0.1", str(site.dicom_port), "+sd", str(folder)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for _uid, folder in studies
    ]
    for sender in senders:
        _out, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err
    uids = {uid for uid, _folder in studies}
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        created = {
            e["study_instance_uid"]: str(e["flow_run_id"])
            for e in transactions.entries()[before:]
            if e.get("event") == "flow_run_created"
        }
        if uids <= set(created):
            return [created[uid] for uid, _folder in studies]
        time.sleep(0.2)
    raise AssertionError(f"the listener created flow runs for {len(created)} of {len(uids)} studies")


def _wait_final(client: object, run_ids: list[str], timeout: float = RUN_TIMEOUT_S) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    states: dict[str, object] = {}
    while time.monotonic() < deadline:
        runs = [client.read_flow_run(UUID(r)) for r in run_ids]  # type: ignore[attr-defined]
        states = {str(r.id): r.state for r in runs}
        if all(s is not None and s.is_final() for s in states.values()):  # type: ignore[attr-defined]
            return states
        time.sleep(0.5)
    names = [getattr(s, "name", None) for s in states.values()]
    raise AssertionError(f"flow runs not finished within {timeout:.0f} s: {names}")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _runs_flow_run(worker: Worker, run_id: str) -> bool:
    """True when one of the worker's child processes executes flow run ``run_id``."""
    for pid in _descendants(worker.process.pid):
        with suppress(OSError):
            if run_id.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                return True
    return False


def _problems(site: Site) -> str:
    """Error lines of the workers' and the listener's logs, for a failure message."""
    lines = []
    for log in sorted(site.logs.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if any(word in line for word in ("Error", "error", "Traceback", "exited", "Crash")):
                lines.append(f"{log.name}: {line}")
    return "\n".join(lines[-60:])


def _assert_processed(site: Site, studies: list[tuple[str, Path]], states: dict[str, object]) -> None:
    names = {run: getattr(state, "name", None) for run, state in states.items()}
    assert all(s.is_completed() for s in states.values()), f"{names}\n{_problems(site)}"  # type: ignore[attr-defined]
    for uid, _sent in studies:
        assert not (site.layout.studies / uid).exists() and (site.layout.processed / uid).is_dir(), uid


@pytest.mark.timeout(2400)  # 13 min measured on a 2-core machine shared at load 8-27
def test_two_workers_on_postgresql(site: Site) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    figures: dict[int, float] = {}
    test_started = time.monotonic()
    workers: list[Worker] = []
    with temporary_settings(updates={PREFECT_API_URL: site.api_url}), get_client(sync_client=True) as client:
        try:
            workers.append(Worker(site, "worker-1"))
            workers[0].wait_online(client)  # the worker creates the `netrt` process pool
            # The deployment commands of DEPLOYMENT.md, run from the checkout like a user would.
            _prefect(site, "--no-prompt", "deploy", "--all")
            limit = subprocess.run(
                ["netrt", "config", "get", "prefect.process_study_concurrency", str(site.config)],
                env=site.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            _prefect(site, "--no-prompt", "deploy", "--name", "process-study", "--concurrency-limit", limit)
            process = client.read_deployment_by_name("process-study/process-study")
            rerun = client.read_deployment_by_name("rerun-quarantine/rerun-quarantine")
            assert process.work_pool_name == "netrt" and process.parameters["config_file"] == str(site.config)
            assert process.global_concurrency_limit is not None and process.global_concurrency_limit.limit == 8
            assert [s.schedule.cron for s in rerun.schedules] == ["11 */3 * * *"]  # type: ignore[union-attr]
            listener = Worker(site, "listener", command="listener")
            workers.append(listener)
            listener.wait_for_line("NETRT is running")

            for count in (1, 2):
                if count == 2:
                    workers.append(Worker(site, "worker-2"))
                    workers[-1].wait_online(client)
                studies = _studies(site, 100 * count, STUDIES)
                started = time.monotonic()
                run_ids = _send(site, studies)
                states = _wait_final(client, run_ids)
                figures[count] = STUDIES / (time.monotonic() - started) * 60
                _assert_processed(site, studies, states)

            # A worker dies mid-run (SIGKILL of it and its flow-run process): the study stays on disk;
            # the run, marked crashed and retried, completes on the other worker.
            [(uid, sent)] = _studies(site, 900, 1)
            [run_id] = _send(site, [(uid, sent)])
            folder = site.layout.studies / uid
            deadline = time.monotonic() + RUN_TIMEOUT_S
            victim = None
            while victim is None and time.monotonic() < deadline:
                victim = next((w for w in workers if w is not listener and _runs_flow_run(w, run_id)), None)
                time.sleep(0.2)
            assert victim is not None, "no worker started the run"
            while client.read_flow_run(UUID(run_id)).state_name != "Running" and time.monotonic() < deadline:
                time.sleep(0.2)
            victim.kill_all()
            workers.remove(victim)
            assert folder.is_dir() and len(list(folder.iterdir())) == PHANTOM["slices"] + 1  # not one file lost
            assert client.read_flow_run(UUID(run_id)).state_name == "Running"  # nobody told the server
            # what Prefect's zombie-run automation does once the run's heartbeats stop (DEPLOYMENT.md)
            client.set_flow_run_state(UUID(run_id), Crashed(message="worker killed (test)"), force=True)
            _prefect(site, "flow-run", "retry", run_id)  # or Retry in the UI
            states = _wait_final(client, [run_id])
            _assert_processed(site, [(uid, sent)], states)
        finally:
            for worker in workers:
                worker.stop()
    logs = [p.read_text(errors="replace") for p in site.logs.iterdir()]
    assert not any("database is locked" in text for text in logs)
    assert not list(site.layout.quarantine.iterdir()) and not list(site.layout.studies.iterdir())
    print(
        f"\nscale: {STUDIES} phantom studies (64x64x20) sent at once to `netrt listener`; "
        f"1 worker: {figures[1]:.1f} studies/min; 2 workers: {figures[2]:.1f} studies/min "
        f"({figures[2] / figures[1]:.2f}x); whole test {time.monotonic() - test_started:.0f} s"
    )
