"""Faults and abuse at the listener (issue 10, parts 2 and 3): real senders (dcmtk's storescu,
pynetdicom's SCU, raw sockets) against the real listener on 127.0.0.1; a real tmpfs for a full disk.

The flow-run trigger is the recording callback of tests/listener_helpers.py; the whole node
(`netrt serve` with its own Prefect server) is exercised in the slow tests at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage, Verification  # type: ignore[attr-defined]

from listener.scp import STATUS_OUT_OF_RESOURCES
from listener.store import TEMP_PREFIX
from netrt.layout import DataLayout
from netrt.logs import TransactionLog
from netrt.phantom import PhantomSpec, write_phantom

from .conftest import REPO, free_port, mounted_tmpfs, require_tool
from .listener_helpers import LOCALHOST, RecordingTrigger, dcmtk_env, listener_config, running_listener, wait_until

pytestmark = [pytest.mark.network]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small CT + RTSTRUCT phantom (20 slices of 64x64, 8 kB each): its dicom/ folder and study UID."""
    out = tmp_path_factory.mktemp("phantom")
    manifest = write_phantom(PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(4.0, 4.0)), out)
    return out / "dicom", manifest.study_instance_uid


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _scu(port: int, *, calling: str = "TESTSCU", max_pdu: int = 16382) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(RTStructureSetStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 10
    ae.maximum_pdu_size = max_pdu
    return ae.associate(LOCALHOST, port, ae_title="NETRT")


@pytest.fixture
def opened() -> Iterator[list[Association]]:
    """Associations a test opens; released at the end whatever happens."""
    associations: list[Association] = []
    yield associations
    for assoc in associations:
        if assoc.is_established:
            assoc.release()


def _events(data: Path, name: str) -> list[dict[str, object]]:
    return [e for e in TransactionLog(DataLayout.from_data_dir(data).transaction_log).entries() if e["event"] == name]


def _sop(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# --- faults -------------------------------------------------------------------------------------


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


def test_sender_killed_mid_transfer_partial_study_waits_and_nothing_acknowledged_is_lost(tmp_path: Path) -> None:
    """storescu SIGKILLed mid-data-set (the TCP connection just drops): every acknowledged instance is
    on disk byte-equal, nothing half-received is, and the study is not sealed before it has been idle
    for study_idle_seconds; the sender's retry of the rest within that time gives one complete sealing."""
    storescu = require_tool("storescu")
    out = tmp_path / "phantom"
    manifest = write_phantom(PhantomSpec(rows=256, columns=256, slices=60, pixel_spacing=(1.0, 1.0)), out)
    source, study_uid = out / "dicom", manifest.study_instance_uid
    total = len(_files(source))
    data = tmp_path / "data"
    idle = 6.0
    trigger = RecordingTrigger()
    with running_listener(listener_config(data, idle=idle), trigger) as service:
        incoming = data / "incoming" / study_uid
        sender = subprocess.Popen(
            [
                storescu,
                "-v",
                "-aec",
                "NETRT",
                "--max-send-pdu",
                "16384",
                "+sd",
                LOCALHOST,
                str(service.address[1]),
                str(source),
            ],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_until(lambda: incoming.is_dir() and len(os.listdir(incoming)) >= total // 3, what="a third received")
        finally:
            sender.kill()
        log, _ = sender.communicate(timeout=30)
        killed_at = time.monotonic()
        acknowledged = _acknowledged(log)
        assert 0 < len(acknowledged) < total, f"the kill did not land mid-transfer ({len(acknowledged)} of {total})"

        # The last complete data set may still be handed to the handler after the kill (a temp file
        # while it is written); once nothing is in flight, no temp file may stay.
        def settled() -> bool:
            temp = [n for n in os.listdir(incoming) if n.startswith(TEMP_PREFIX)]
            return service.tracker.in_flight() == 0 and not temp

        wait_until(settled, timeout=30, what="no store in flight and no temp file of the cut-off instance left")
        on_disk = {p.name: p for p in incoming.iterdir()}
        for path in acknowledged:
            assert on_disk[f"{_sop(path)}.dcm"].read_bytes()[132:] != b""
            assert dcmread(on_disk[f"{_sop(path)}.dcm"]) == dcmread(path)
        # Received but unacknowledged instances may be there too (complete: written before the answer).
        for name, path in on_disk.items():
            assert dcmread(path).SOPInstanceUID == name.removesuffix(".dcm")
        time.sleep(max(0.0, idle / 2 - (time.monotonic() - killed_at)))
        assert trigger.calls == [], "the partial study was sealed before it was idle for study_idle_seconds"
        rest = tmp_path / "rest"
        rest.mkdir()
        for path in source.iterdir():
            if path not in acknowledged:
                shutil.copy(path, rest / path.name)
        resent = subprocess.run(
            [storescu, "-aec", "NETRT", "+sd", LOCALHOST, str(service.address[1]), str(rest)],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert resent.returncode == 0, resent.stderr
        calls = trigger.wait_for(1, timeout=idle + 20)
        time.sleep(1.0)
        assert len(trigger.calls) == 1, "the study was sealed more than once"
    assert calls[0].instances == total
    assert trigger.snapshots[0] == sorted(f"{_sop(p)}.dcm" for p in _files(source))


_TMPFS_SIZE = 2 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for this test (needs root; skipped with the reason otherwise)."""
    with mounted_tmpfs(tmp_path / "small-disk", _TMPFS_SIZE) as mount_point:
        yield mount_point


def test_disk_full_during_receive_answers_a700_and_recovers_when_space_returns(
    small_disk: Path, phantom: tuple[Path, str], opened: list[Association]
) -> None:
    """The data dir on a 2 MiB tmpfs nearly filled by a ballast file: stores that do not fit are
    answered 0xA700 "out of disk space" with nothing left behind; once the ballast is gone the same
    association stores them and the study is sealed whole, once."""
    source, study_uid = phantom
    data = small_disk / "data"
    trigger = RecordingTrigger()
    files = _files(source)
    instance_size = min(p.stat().st_size for p in files)  # a CT slice (the RTSTRUCT is larger)
    with running_listener(listener_config(data, idle=1.0), trigger) as service:
        assoc = _scu(service.address[1])
        opened.append(assoc)
        assert assoc.is_established
        free = shutil.disk_usage(small_disk).free
        ballast = small_disk / "ballast"
        ballast.write_bytes(b"\0" * (free - 4 * instance_size - 4096))
        statuses = {}
        for path in files:
            rsp = assoc.send_c_store(dcmread(path))
            statuses[path] = (int(rsp.Status), str(rsp.get("ErrorComment", "")))
        stored = [p for p, (status, _) in statuses.items() if status == 0]
        refused = [p for p, (status, _) in statuses.items() if status != 0]
        assert stored and refused, f"the disk did not fill part-way: {len(stored)} stored, {len(refused)} refused"
        assert {statuses[p] for p in refused} == {(STATUS_OUT_OF_RESOURCES, "cannot store: out of disk space")}
        incoming = data / "incoming" / study_uid
        assert sorted(p.name for p in incoming.iterdir()) == sorted(f"{_sop(p)}.dcm" for p in stored)
        for path in stored:
            assert dcmread(incoming / f"{_sop(path)}.dcm") == dcmread(path)
        ballast.unlink()
        for path in refused:  # the sender's retry, on the same association
            assert int(assoc.send_c_store(dcmread(path)).Status) == 0x0000
        assoc.release()
        calls = trigger.wait_for(1)
        time.sleep(1.5)
        assert len(trigger.calls) == 1
    assert calls[0].instances == len(files)
    assert trigger.snapshots[0] == sorted(f"{_sop(p)}.dcm" for p in files)


# --- abuse: limits ------------------------------------------------------------------------------


def test_burst_of_associations_never_exceeds_max_associations(
    tmp_path: Path, phantom: tuple[Path, str], opened: list[Association]
) -> None:
    """12 associations requested at the same instant against max_associations = 3: exactly 3 are let
    in (each request is checked in its own thread; the count is taken under a lock), the other 9 get
    A-ASSOCIATE-RJ transient / local limit exceeded, and the 3 store normally."""
    data = tmp_path / "data"
    limit, attempts = 3, 12
    template = dcmread(_files(phantom[0])[0])
    with running_listener(listener_config(data, max_associations=limit, idle=30), RecordingTrigger()) as service:
        barrier = threading.Barrier(attempts)
        results: list[Association] = []
        lock = threading.Lock()

        def request() -> None:
            ae = AE(ae_title="BURST")
            ae.add_requested_context(Verification)
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.network_timeout = 15
            barrier.wait(timeout=30)
            assoc = ae.associate(LOCALHOST, service.address[1], ae_title="NETRT")
            with lock:
                results.append(assoc)

        threads = [threading.Thread(target=request) for _ in range(attempts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        opened.extend(results)
        established = [a for a in results if a.is_established]
        rejected = [a for a in results if a.is_rejected]
        assert len(results) == attempts
        assert len(established) == limit, f"{len(established)} associations let in with max_associations={limit}"
        assert len(rejected) == attempts - limit
        for assoc in rejected:
            primitive = assoc.acceptor.primitive
            assert (primitive.result, primitive.result_source, primitive.diagnostic) == (0x02, 0x03, 0x02)
        for k, assoc in enumerate(established):
            ds = deepcopy(template)
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = 100 + k
            assert int(assoc.send_c_store(ds).Status) == 0x0000
    reasons = [str(e["reason"]) for e in _events(data, "association_rejected")]
    assert reasons == [f"{limit} associations already active"] * (attempts - limit)


def _big_ct(template: Dataset, frames_bytes: int) -> Dataset:
    big = deepcopy(template)
    big.SOPInstanceUID = generate_uid()
    big.file_meta.MediaStorageSOPInstanceUID = big.SOPInstanceUID
    big.Rows = big.Columns = 1024
    big.NumberOfFrames = frames_bytes // (1024 * 1024 * 2)
    big.PixelData = np.zeros(int(big.NumberOfFrames) * 1024 * 1024, dtype=np.uint16).tobytes()
    return big


# The listener alone in a child process, so that its peak memory (VmHWM) is its own.
_LISTENER_CHILD = """
import json, signal, sys, threading
from pathlib import Path
from listener.service import ListenerService
from netrt.config import load_config
config = load_config(None)
config.paths.data_dir = Path(sys.argv[1])
config.listener.host = "127.0.0.1"
config.listener.port = int(sys.argv[2])
for key, value in json.loads(sys.argv[3]).items():
    setattr(config.listener, key, value)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
service = ListenerService(config, trigger=lambda study: "unused")
service.start()
print("ready", flush=True)
stop.wait()
service.stop(grace=1.0)
"""


def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
def child_listener(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], int, Path]]:
    port, data = free_port(), tmp_path / "data"
    settings = {"max_dataset_bytes": 4 * 1024 * 1024, "max_pdu_size": 65536, "study_idle_seconds": 60}
    child = subprocess.Popen(
        [sys.executable, "-c", _LISTENER_CHILD, str(data), str(port), json.dumps(settings)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield child, port, data
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)


def test_oversized_data_set_is_answered_a700_without_being_held_in_memory(
    child_listener: tuple[subprocess.Popen[str], int, Path],
    phantom: tuple[Path, str],
    tmp_path: Path,
    opened: list[Association],
) -> None:
    """listener.max_dataset_bytes = 4 MiB, 64 kB PDUs: a 96 MiB data set streamed from a file is
    answered 0xA700 naming the limit, is not stored, and the listener's peak memory grows by far
    less than the data set (pynetdicom alone would gather all of it in memory); the association
    then stores a normal instance."""
    child, port, data = child_listener
    template = dcmread(_files(phantom[0])[0])
    big_file = tmp_path / "big.dcm"
    _big_ct(template, 96 * 1024 * 1024).save_as(big_file, enforce_file_format=True)
    before = _vm_hwm_kib(child.pid)
    assoc = _scu(port, max_pdu=65536)
    opened.append(assoc)
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # the sender streams the file; only the receiver is measured
    try:
        rsp = assoc.send_c_store(big_file)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert int(rsp.Status) == STATUS_OUT_OF_RESOURCES
    assert rsp.ErrorComment == "data set larger than listener.max_dataset_bytes"
    growth_mib = (_vm_hwm_kib(child.pid) - before) / 1024
    assert growth_mib < 24, f"the listener's peak memory grew by {growth_mib:.0f} MiB for a refused 96 MiB data set"
    assert int(assoc.send_c_store(deepcopy(template)).Status) == 0x0000
    assoc.release()
    assert [p.name for p in data.glob("incoming/*/*")] == [f"{template.SOPInstanceUID}.dcm"]


def test_pdu_longer_than_the_limit_closes_the_connection_unread(
    child_listener: tuple[subprocess.Popen[str], int, Path], opened: list[Association]
) -> None:
    """A PDU header announcing 4 GiB (pynetdicom would read, and buffer, all of it): the connection
    is closed at once, logged as association_aborted, the listener's memory does not grow and the
    next association is served."""
    child, port, data = child_listener
    before = _vm_hwm_kib(child.pid)
    with socket.create_connection((LOCALHOST, port), timeout=10) as raw:
        raw.sendall(struct.pack(">BBL", 0x01, 0, 0xFFFFFFF0) + b"\0" * 65536)
        closed = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not closed:
            try:
                raw.sendall(b"\0" * 65536)  # keep streaming: a listener that reads it all never closes
            except OSError:
                closed = True
                break
            raw.settimeout(0.05)
            try:
                closed = raw.recv(4096) == b""
            except TimeoutError:
                pass
            except OSError:
                closed = True
        assert closed, "the listener kept reading a 4 GiB PDU"
    wait_until(lambda: bool(_events(data, "association_aborted")), what="the abort logged")
    assert "PDU of 4294967280 bytes is longer than this node accepts" in str(
        _events(data, "association_aborted")[0]["reason"]
    )
    assert (_vm_hwm_kib(child.pid) - before) / 1024 < 24
    assoc = _scu(port)
    opened.append(assoc)
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0x0000


# --- abuse: crafted names -----------------------------------------------------------------------


def test_path_like_names_and_ae_titles_stay_data_inside_the_data_dir(
    tmp_path: Path, phantom: tuple[Path, str], opened: list[Association]
) -> None:
    """Calling AE title, PatientName, PatientID, SeriesDescription and a private tag holding
    ``../`` paths are stored as data: the only names the listener makes are UIDs (unsafe UIDs are
    refused, tests/test_listener.py::test_store_refuses_unsafe_uids_and_writes_nothing_outside)."""
    source, study_uid = phantom
    data = tmp_path / "data"
    trigger = RecordingTrigger()
    with running_listener(listener_config(data, idle=0.5), trigger) as service:
        assoc = _scu(service.address[1], calling="../../../tmp/x")
        opened.append(assoc)
        assert assoc.is_established
        for path in _files(source):
            ds = dcmread(path)
            ds.PatientName = "../../../../etc/passwd"
            ds.PatientID = "..\\..\\windows"
            ds.SeriesDescription = "/abs/path/../../x"
            assert int(assoc.send_c_store(ds).Status) == 0x0000
        assoc.release()
        calls = trigger.wait_for(1)
    assert calls[0].calling_ae_titles == ("../../../tmp/x",)
    outside = [p for p in tmp_path.rglob("*") if p != data and data not in p.parents]
    assert outside == [], f"written outside the data dir: {outside}"
    names = {p.name for p in data.rglob("*")}
    assert not any(".." in n or n in {"passwd", "windows", "x"} for n in names), names
    assert (data / "studies" / study_uid).is_dir()


# --- no received UIDs in Prefect's own task-failure logs (full anonymization) -------------------


@pytest.mark.slow
def test_task_failure_logged_by_prefect_carries_no_received_uid_in_full_mode(tmp_path: Path) -> None:
    """A study laid out as the listener keeps it (folder and file names are the received UIDs) with
    a truncated RTSTRUCT, processed in full mode: Prefect logs the failed task ("Task run failed
    with exception ...", with traceback) to the terminal and to its database; those lines, the task
    and flow states and NETRT's own logs show mapped UIDs only. (Flow-run parameters keep the input's
    location as received, deliberately: tests/test_anonymize_flow.py.)"""
    import sqlite3

    manifest = write_phantom(PhantomSpec(rows=32, columns=32, slices=6, pixel_spacing=(8.0, 8.0)), tmp_path / "ph")
    study = tmp_path / "received" / manifest.study_instance_uid
    study.mkdir(parents=True)
    uids = {manifest.study_instance_uid}
    for path in _files(tmp_path / "ph" / "dicom"):
        sop = _sop(path)
        uids.add(sop)
        shutil.copy(path, study / f"{sop}.dcm")
    rtstruct = study / f"{manifest.rtstruct_sop_instance_uid}.dcm"
    rtstruct.write_bytes(rtstruct.read_bytes()[:-700])
    data = tmp_path / "data"
    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {data}}}\nanonymization: {{enabled: true, mode: full}}\n"
        f"prefect: {{server_port: {free_port()}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    done = subprocess.run(
        # --verbose: Prefect's own log lines (where it logs the task's exception) on the terminal too
        [sys.executable, "-m", "netrt", "process", str(study), "--config", str(config), "--verbose"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    failed = [line for line in output.splitlines() if "Task run failed with exception" in line]
    assert failed and "file is truncated" in failed[0] and "2.25." in failed[0], output
    leaks = [uid for uid in uids if uid in output]
    assert leaks == [], f"received UIDs on the terminal: {leaks}"
    database = data / "prefect" / "prefect.db"
    assert database.exists()
    with sqlite3.connect(database) as db:
        texts = [
            str(row)
            for table in ("log", "task_run_state", "flow_run_state")
            for row in db.execute(f"select * from {table}")
        ]
    assert any("Task run failed with exception" in text for text in texts)
    assert [uid for uid in uids if any(uid in text for text in texts)] == []
    for path in (data / "logs").rglob("*"):
        if path.is_file():
            assert not [uid for uid in uids if uid in path.read_text(errors="replace")], path


# --- the node's own Prefect server dies while a flow runs ----------------------------------------


@pytest.mark.slow
def test_prefect_server_killed_while_a_flow_runs_then_restart_processes_the_study_once(tmp_path: Path) -> None:
    """SIGKILL of the local Prefect server alone (not the node) while a study's flow run is running:
    `netrt serve` notices, stops everything and exits non-zero (for systemd/Docker to restart it);
    on restart the study is processed and delivered, and ends in processed/ once."""
    from .test_load import serving
    from .test_serve import _descendants, _entries, _write_config

    storescu = require_tool("storescu")
    manifest = write_phantom(PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(4.0, 4.0)), tmp_path / "ph")
    study_uid = manifest.study_instance_uid
    data = tmp_path / "data"
    config, _, dicom_port = _write_config(tmp_path, data, idle=1.0)
    with serving(config) as node:
        sent = subprocess.run(
            [storescu, "-aec", "NETRT", "+sd", LOCALHOST, str(dicom_port), str(tmp_path / "ph" / "dicom")],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: bool(_entries(data, "flow_run_started")), timeout=180, what="the flow run to start")
        servers = [
            pid
            for pid in _descendants(node.process.pid)
            if b"prefect server start" in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        ]
        assert len(servers) == 1, servers
        os.kill(servers[0], signal.SIGKILL)
        code = node.process.wait(timeout=120)
        assert node.process.stdout is not None
        node.lines.extend(node.process.stdout.readlines())
        assert code != 0, node.output
    assert not _entries(data, "delivered"), "the run finished before the kill; nothing was tested"
    assert "the local Prefect server exited" in (data / "logs" / "netrt.log").read_text()
    with serving(config) as node:
        wait_until(lambda: bool(_entries(data, "delivered")), timeout=300, what="the study to be delivered")
        wait_until((data / "processed" / study_uid).is_dir, timeout=60, what="the study in processed/")
        time.sleep(3.0)  # a second run would deliver again here
        assert node.terminate() == 0, node.output
    assert len(_entries(data, "delivered")) == 1, "delivered more than once"
    assert not (data / "studies" / study_uid).exists() and not (data / "incoming" / study_uid).exists()
    assert not list((data / "quarantine").glob("*")), "the study ended in quarantine"
    series = {dcmread(next(s.iterdir())).SeriesDescription for s in (data / "output" / study_uid).iterdir()}
    assert series == {"NETRT axial overlay", "NETRT coronal overlay"}
