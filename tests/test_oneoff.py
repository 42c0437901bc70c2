"""One-off commands (issue 19, parts 1 and 2): the data dir's background Prefect server, and what the
terminal shows.

One module-scoped data dir (its own Prefect port): the first `netrt process` starts the background
server, the next ones reuse it, `netrt server stop` ends it. Every command runs as a user runs it,
in a subprocess with captured output (so never with progress bars).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.local_server import is_healthy
from netrt.phantom import PhantomManifest, PhantomSpec, write_phantom

from .conftest import free_port, require_tool

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@dataclass(frozen=True)
class Site:
    config: Path
    data: Path
    phantom: PhantomManifest
    dicom: Path

    @property
    def record(self) -> Path:
        return self.data / "prefect" / "local-server.json"

    @property
    def log(self) -> Path:
        return self.data / "logs" / "netrt.log"


def netrt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netrt", *args], capture_output=True, text=True, timeout=600)


def _server_processes(port: int) -> list[int]:
    """Pids of `prefect server start ... --port PORT` processes (the background server itself)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"prefect" in args and b"server" in args and b"start" in args and str(port).encode() in args:
            found.append(int(proc.name))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("oneoff")
    phantom = write_phantom(PhantomSpec(rows=48, columns=40, pixel_spacing=(5.0, 5.0), slice_spacing=5.0), root / "ph")
    config = root / "netrt.yaml"
    config.write_text(f"paths: {{data_dir: {root / 'data'}}}\nprefect: {{server_port: {free_port()}}}\n")
    site = Site(config, root / "data", phantom, root / "ph" / "dicom")
    try:
        yield site
    finally:  # whatever a failed test left: the supervisor's process group goes
        if site.record.exists():
            pid = json.loads(site.record.read_text())["pid"]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_second_process_reuses_the_background_server_and_server_stop_ends_it(site: Site) -> None:
    assert not site.record.exists()
    first = netrt("process", str(site.dicom), "--config", str(site.config))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "starting the local Prefect server in the background" in first.stdout
    record = json.loads(site.record.read_text())
    port, pid = record["port"], record["pid"]
    assert is_healthy(record["api_url"]), "the server did not stay up after the command"
    servers = _server_processes(port)
    assert len(servers) == 1, servers

    second = netrt("process", str(site.dicom), "--config", str(site.config))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "starting the local Prefect server" not in second.stdout
    assert json.loads(site.record.read_text()) == record, "the second command recorded another server"
    assert _server_processes(port) == servers, "the second command started a server of its own"
    # Its run is in the reused server's database: the UI link of the second run answers there.
    (run_id,) = re.findall(r"Prefect UI run: \S+/runs/flow-run/([0-9a-f-]{36})", second.stdout)
    from urllib.request import urlopen

    with urlopen(f"{record['api_url']}/flow_runs/{run_id}", timeout=10) as response:
        assert json.loads(response.read())["state_type"] == "COMPLETED"

    status = netrt("server", "status", "--config", str(site.config))
    assert status.returncode == 0 and f"pid {pid}" in status.stdout, status.stdout + status.stderr

    stop = netrt("server", "stop", "--config", str(site.config))
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    deadline = time.monotonic() + 30
    while (_alive(pid) or _server_processes(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(pid) and not _server_processes(port), "the server outlived `netrt server stop`"
    assert not is_healthy(record["api_url"], timeout=1.0)
    assert not site.record.exists()
    after = netrt("server", "status", "--config", str(site.config))
    assert after.returncode == 1 and "no background local Prefect server" in after.stdout


def test_terminal_shows_one_line_per_study_and_prefect_lines_only_with_verbose(site: Site) -> None:
    quiet = netrt("process", str(site.dicom), "--config", str(site.config))
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    uid = site.phantom.study_instance_uid
    assert [line for line in quiet.stdout.splitlines() if line.startswith(f"{uid}: ")] == [
        line for line in quiet.stdout.splitlines() if f"{uid}: ok: " in line
    ]
    assert len([line for line in quiet.stdout.splitlines() if f"{uid}: ok: " in line]) == 1
    assert "Finished in state" not in quiet.stdout + quiet.stderr  # Prefect's per-task lines
    assert quiet.stderr == "", quiet.stderr
    assert "\x1b[" not in quiet.stdout and "\u2501" not in quiet.stdout  # no progress bar when captured
    assert "ok: 1 of 1 studies" in quiet.stdout
    preview = re.search(r"^preview: (\S+)$", quiet.stdout, re.MULTILINE)
    assert preview and Path(preview.group(1)).is_file()
    assert re.search(r"^Prefect UI run: http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36}$", quiet.stdout, re.M)
    assert "Finished in state Completed()" in site.log.read_text(), "Prefect's lines did not reach the log file"

    verbose = netrt("process", str(site.dicom), "--config", str(site.config), "--verbose")
    assert verbose.returncode == 0, verbose.stdout + verbose.stderr
    assert "Finished in state Completed()" in verbose.stdout + verbose.stderr


def test_a_terminal_gets_progress_bars_over_studies_and_stages(site: Site, tmp_path: Path) -> None:
    """Under a pseudo-terminal (`script`), rich draws the studies bar and the stage bar with stage names."""
    script = require_tool("script")
    typescript = tmp_path / "typescript"
    command = " ".join([sys.executable, "-m", "netrt", "process", str(site.dicom), "--config", str(site.config)])
    done = subprocess.run(
        [script, "-qec", command, str(typescript)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", typescript.read_text(errors="replace")).replace("\r", "\n")
    assert re.search(r"studies\s.*1/1", screen), screen[-2000:]
    # The stage bar names the stage running when rich redraws (validate may finish before the first redraw).
    stages = r"(validate|anonymize|extract-masks|write|preview|deliver)"
    assert re.search(rf"^\s+{stages}\S*\s.*\d+/\d+", screen, re.MULTILINE), screen[-2000:]
    assert f"{site.phantom.study_instance_uid}: ok: " in screen


def test_failing_study_is_one_failed_line_naming_the_file_and_its_traceback_is_in_the_log(
    site: Site, tmp_path: Path
) -> None:
    """An RTSTRUCT without its images: one FAILED line naming RS.dcm and the log; no traceback on the terminal."""
    study = tmp_path / "rtstruct-only"
    study.mkdir()
    (study / "RS.dcm").write_bytes((site.dicom / "RS.dcm").read_bytes())
    before = site.log.read_text().count("Traceback") if site.log.exists() else 0
    done = netrt("process", str(study), "--config", str(site.config))
    assert done.returncode == 1, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if "FAILED" in line]
    assert len(failed) == 1, done.stdout
    assert str(study / "RS.dcm") in failed[0], failed[0]
    assert f"log: {site.log}" in failed[0], failed[0]
    assert "Traceback" not in done.stdout + done.stderr
    log = site.log.read_text()
    assert log.count("Traceback") > before, "the failure's traceback is not in the log file"
    assert "RS.dcm" in log[log.index("Traceback", len(log) - len(log.split("Traceback")[-1]) - 9) :]


def test_unexpected_exception_prints_one_line_and_where_its_traceback_is(tmp_path: Path) -> None:
    """A failure that is not NETRT's own (here: the phantom's folder is inside a file) gives one line only."""
    taken = tmp_path / "a-file"
    taken.write_text("not a folder\n")
    done = netrt("phantom", str(taken / "sub"), "--rows", "16", "--columns", "16", "--slices", "4")
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    match = re.fullmatch(r"netrt: unexpected error: \w+: .+ \(traceback in (\S+)\)", lines[0])
    assert match, lines[0]
    where = Path(match.group(1))
    try:
        text = where.read_text()
        assert "Traceback (most recent call last)" in text and "write_phantom" in text
    finally:
        where.unlink(missing_ok=True)
