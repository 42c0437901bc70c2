"""`netrt serve` as a user runs it: a real local Prefect server with its UI, the served deployments and
the DICOM listener; dcmtk's storescu and echoscu as the sending peers; SIGTERM and SIGKILL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from pydicom import dcmread

from flows.local_server import is_healthy
from netrt.layout import DataLayout
from netrt.logs import TransactionLog
from netrt.phantom import PhantomSpec, write_phantom

from .conftest import free_port, require_tool
from .listener_helpers import LOCALHOST, dcmtk_env, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.network]

START_TIMEOUT_S = 180


def _write_config(tmp_path: Path, data: Path, *, idle: float = 2.0) -> tuple[Path, int, int]:
    prefect_port, dicom_port = free_port(), free_port()
    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {data}}}\n"
        f"prefect: {{server_port: {prefect_port}}}\n"
        f"listener: {{host: {LOCALHOST}, port: {dicom_port}, study_idle_seconds: {idle}}}\n"
        "processing: {planes: [axial, coronal]}\n"
    )
    return config, prefect_port, dicom_port


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children of children too), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Node:
    """One `netrt serve` process and the lines it printed."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "netrt", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        assert self.process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if line.startswith("NETRT is running"):
                return
        self.kill_everything()  # no orphaned Prefect server or flow server when start-up fails
        raise AssertionError("netrt serve did not come up:\n" + self.output)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 90) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        assert self.process.stdout is not None
        self.lines.extend(self.process.stdout.readlines())
        return code

    def kill_everything(self) -> None:
        """SIGKILL the node and every process it started, at once (what a power cut or an OOM kill
        of the service's cgroup does)."""
        victims = [self.process.pid, *_descendants(self.process.pid)]
        for pid in victims:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def cleanup(self) -> None:
        if self.process.poll() is None:
            self.kill_everything()


@contextmanager
def serving(config: Path) -> Iterator[Node]:
    node = Node(config)
    try:
        yield node
    finally:
        node.cleanup()


def _entries(data: Path, event: str) -> list[dict[str, object]]:
    return [e for e in TransactionLog(DataLayout.from_data_dir(data).transaction_log).entries() if e["event"] == event]


def test_serve_receives_a_study_from_storescu_processes_it_and_stops_on_sigterm(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    echoscu = require_tool("echoscu")
    phantom = tmp_path / "phantom"
    manifest = write_phantom(PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(4.0, 4.0)), phantom)
    study_uid = manifest.study_instance_uid
    data = tmp_path / "data"
    config, prefect_port, dicom_port = _write_config(tmp_path, data)
    with serving(config) as node:
        assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in node.output, node.output
        assert f"DICOM listener: AE NETRT on 127.0.0.1:{dicom_port}" in node.output, node.output
        api = f"http://127.0.0.1:{prefect_port}/api"
        assert is_healthy(api)
        with urllib.request.urlopen(f"http://127.0.0.1:{prefect_port}/", timeout=10) as page:
            assert "<html" in page.read(4096).decode("utf-8", "replace").lower()
        assert (data / "prefect" / "prefect.db").exists(), "SQLite database is not under the data dir"
        echo = subprocess.run(
            [echoscu, "-aec", "NETRT", LOCALHOST, str(dicom_port)], env=dcmtk_env(), capture_output=True, timeout=60
        )
        assert echo.returncode == 0, echo.stderr
        sent = subprocess.run(
            [storescu, "-aec", "NETRT", "+sd", LOCALHOST, str(dicom_port), str(phantom / "dicom")],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        output = data / "output" / study_uid
        wait_until(lambda: bool(_entries(data, "delivered")), timeout=240, what="the study to be delivered")
        # The flow moves the study to processed/ right after its deliveries.
        wait_until(lambda: (data / "processed" / study_uid).is_dir(), timeout=60, what="the study in processed/")
        assert len(list((data / "processed" / study_uid).iterdir())) == 21
        planes = {dcmread(next(series.iterdir())).SeriesDescription for series in output.iterdir()}
        assert planes == {"NETRT axial overlay", "NETRT coronal overlay"}
        demo_study = _check_demo(config, data, prefect_port)
        assert node.terminate() == 0, node.output
    assert not is_healthy(api, timeout=1.0), "the Prefect server outlived netrt serve"
    assert (data / "logs" / "netrt.log").exists()
    # The transaction log names the source address and the study, from association to flow run.
    opened = _entries(data, "association_opened")
    assert {(e["source_ip"], e["source_ae"]) for e in opened} == {
        (LOCALHOST, "ECHOSCU"),
        (LOCALHOST, "STORESCU"),
        (LOCALHOST, "NETRT_DEMO"),  # netrt demo: its C-ECHO and its C-STORE association
    }
    received = _entries(data, "instances_received")
    assert [(e["study_instance_uid"], e["source_ip"], e["counts"]) for e in received] == [
        (study_uid, LOCALHOST, {"instances": 21}),
        (demo_study, LOCALHOST, {"instances": DEMO_SLICES + 1}),
    ]
    created = _entries(data, "flow_run_created")
    assert [e["study_instance_uid"] for e in created] == [study_uid, demo_study]
    delivered = _entries(data, "delivered")
    assert [e["flow_run_id"] for e in delivered] == [e["flow_run_id"] for e in created]
    assert _entries(data, "listener_stopped")


DEMO_SLICES = 12


def _check_demo(config: Path, data: Path, prefect_port: int) -> str:
    """`netrt demo` against the running node: it sends a phantom, waits for the run and prints where
    the output and the preview are; both exist. Returns the demo study's UID."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    demo = subprocess.run(
        [sys.executable, "-m", "netrt", "demo", "--config", str(config), "--size", "32", "--slices", str(DEMO_SLICES)],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "flow run " in demo.stdout and f"http://127.0.0.1:{prefect_port}/runs/flow-run/" in demo.stdout
    output_line = re.search(r"output \(output\): (\S+)", demo.stdout)
    preview_line = re.search(r"preview: (\S+)", demo.stdout)
    assert output_line and preview_line, demo.stdout
    output = Path(output_line.group(1))
    assert output.parent == data / "output"
    assert sum(1 for _ in output.rglob("*.dcm")) > DEMO_SLICES, f"too few files in {output}"
    preview = Path(preview_line.group(1))
    assert preview.is_file() and preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", preview
    return output.name


def _acknowledged(storescu_output: str) -> list[Path]:
    """Files storescu -v reported a successful C-STORE response for."""
    done: list[Path] = []
    current: Path | None = None
    for line in storescu_output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = Path(sending.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            done.append(current)
            current = None
    return done


def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    phantom = tmp_path / "phantom"
    slices = 120
    manifest = write_phantom(PhantomSpec(rows=512, columns=512, slices=slices, pixel_spacing=(0.8, 0.8)), phantom)
    study_uid = manifest.study_instance_uid
    source = phantom / "dicom"
    total = len(list(source.iterdir()))
    data = tmp_path / "data"
    config, _, dicom_port = _write_config(tmp_path, data, idle=3.0)
    incoming = data / "incoming" / study_uid
    with serving(config) as node:
        sender = subprocess.Popen(
            [storescu, "-v", "-aec", "NETRT", "+sd", LOCALHOST, str(dicom_port), str(source)],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sender.poll() is None:
            if incoming.is_dir() and len(os.listdir(incoming)) >= total // 3:
                break
            time.sleep(0.002)
        node.kill_everything()
        log, _ = sender.communicate(timeout=60)
    acknowledged = _acknowledged(log)
    assert 0 < len(acknowledged) < total, f"the kill did not land mid-transfer ({len(acknowledged)} of {total})"
    acked_uids = {dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for path in acknowledged}
    # On disk right after the kill: every acknowledged instance, complete and identical.
    on_disk = {p.name for p in incoming.iterdir()}
    assert {f"{uid}.dcm" for uid in acked_uids} <= on_disk
    for uid, original in acked_uids.items():
        assert dcmread(incoming / f"{uid}.dcm") == dcmread(original)
    # Restart; the sender retries what it did not get acknowledged; the study is processed whole.
    rest = tmp_path / "rest"
    rest.mkdir()
    for path in source.iterdir():
        if path not in acknowledged:
            shutil.copy(path, rest / path.name)
    with serving(config) as node:
        recovered = _entries(data, "study_recovered")
        assert [(e["study_instance_uid"], e["area"]) for e in recovered] == [(study_uid, "incoming")]
        resent = subprocess.run(
            [storescu, "-aec", "NETRT", "+sd", LOCALHOST, str(dicom_port), str(rest)],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert resent.returncode == 0, resent.stderr
        processed = data / "processed" / study_uid
        wait_until(lambda: bool(_entries(data, "delivered")), timeout=300, what="the study to be delivered")
        wait_until(processed.is_dir, timeout=60, what="the study in processed/")
        assert sorted(p.name for p in processed.iterdir()) == sorted(
            f"{dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm" for p in source.iterdir()
        )
        for uid, original in acked_uids.items():
            assert dcmread(processed / f"{uid}.dcm") == dcmread(original)
        assert node.terminate() == 0
    created = _entries(data, "flow_run_created")
    assert [e["study_instance_uid"] for e in created] == [study_uid], "the study was triggered more than once"
    series = {dcmread(next(s.iterdir())).SeriesDescription: s for s in (data / "output" / study_uid).iterdir()}
    assert len(list(series["NETRT axial overlay"].iterdir())) == slices


def test_node_killed_during_a_flow_run_processes_the_study_after_restart(tmp_path: Path) -> None:
    """SIGKILL of the whole node while the study's flow run is running: on restart the orphaned run
    is marked crashed, one new run is created, and the study is processed and delivered once."""
    storescu = require_tool("storescu")
    phantom = tmp_path / "phantom"
    manifest = write_phantom(PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(4.0, 4.0)), phantom)
    study_uid = manifest.study_instance_uid
    data = tmp_path / "data"
    config, prefect_port, dicom_port = _write_config(tmp_path, data, idle=1.0)
    with serving(config) as node:
        sent = subprocess.run(
            [storescu, "-aec", "NETRT", "+sd", LOCALHOST, str(dicom_port), str(phantom / "dicom")],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: bool(_entries(data, "flow_run_started")), timeout=180, what="the flow run to start")
        node.kill_everything()
    assert not _entries(data, "delivered"), "the run finished before the kill; nothing was tested"
    assert (data / "studies" / study_uid).is_dir()
    with serving(config) as node:
        wait_until(lambda: bool(_entries(data, "delivered")), timeout=300, what="the study to be delivered")
        wait_until((data / "processed" / study_uid).is_dir, timeout=60, what="the study in processed/")
        first, second = (e["flow_run_id"] for e in _entries(data, "flow_run_created"))
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(f"http://127.0.0.1:{prefect_port}/api") as client:
            from uuid import UUID

            assert client.read_flow_run(UUID(str(first))).state_name == "Crashed"
        assert node.terminate() == 0
    delivered = _entries(data, "delivered")
    assert [e["flow_run_id"] for e in delivered] == [second]
    assert (data / "processed" / study_uid).is_dir() and not (data / "studies" / study_uid).exists()
    assert len(_entries(data, "flow_run_created")) == 2
