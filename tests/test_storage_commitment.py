"""Storage Commitment (PS3.4 Annex J) against a real Orthanc 1.10 in a private network namespace.

What these scenarios established about Orthanc 1.10 (Debian ``orthanc``), asserted below:

- its N-EVENT-REPORT always comes on a **new association** that Orthanc opens (calling AE
  ``ORTHANC``) to the host and port its ``DicomModalities`` lists for NETRT's AE title, even though
  NETRT proposes (and Orthanc accepts) the SCP role on the requesting association; nothing came on
  the requesting association in any run;
- it refuses the N-ACTION of an AE title missing from ``DicomModalities`` (its log: "Rejected
  N-ACTION request from remote DICOM modality"; NETRT gets no N-ACTION response);
- an instance deleted after it was stored is reported in FailedSOPSequence with FailureReason
  0x0112 (no such object instance);
- a round trip (N-ACTION sent to the report received on a new association) took 0.03-0.04 s for
  9 instances here (three runs of ``pytest -s -n 0 tests/test_storage_commitment.py -k
  new_association``, which prints it); the whole attempt, association and C-STOREs included,
  0.6-0.7 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from netrt.commitment import ReportRoute
from netrt.config import DicomDestination, ListenerConfig
from netrt.errors import DeliveryError
from netrt.phantom import PhantomSpec, write_phantom
from netrt.send import send_to_dicom

from .orthanc import Orthanc, OrthancSettings, run_in_namespace

ORTHANC_AET = "ORTHANC"
NETRT_PORT = 11112  # inside the namespace: where Orthanc reports, and where NETRT listens

# Logs every received SOPInstanceUID (what went over the wire). While DELETE_FLAG exists, deletes
# the instance whose SOPInstanceUID is in it right after Orthanc stored it (a purge between store
# and commitment).
LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  local log = io.open("{log}", "a")
  log:write(dicom.SOPInstanceUID .. "\\n")
  log:close()
  return true
end

function OnStoredInstance(instanceId, tags, metadata, origin)
  local flag = io.open("{delete_flag}", "r")
  if flag ~= nil then
    local uid = flag:read("*l")
    flag:close()
    if tags["SOPInstanceUID"] == uid then
      RestApiDelete("/instances/" .. instanceId)
    end
  end
end
"""


def _orthanc(root: Path, report_port: int | None) -> tuple[OrthancSettings, Path, Path]:
    """Orthanc with the Lua above; NETRT registered at ``report_port`` (None: not registered)."""
    root.mkdir(parents=True, exist_ok=True)
    log, flag = root / "received.log", root / "delete.flag"
    (root / "script.lua").write_text(LUA.format(log=log, delete_flag=flag))
    options: dict[str, Any] = {"LuaScripts": [str(root / "script.lua")]}
    if report_port is not None:
        options["DicomModalities"] = {"netrt": ["NETRT", "127.0.0.1", report_port]}
    return OrthancSettings(root=root / "orthanc", aet=ORTHANC_AET, options=options), log, flag


def _destination(**changes: Any) -> DicomDestination:
    values: dict[str, Any] = {
        "name": "pacs",
        "type": "dicom",
        "ae_title": ORTHANC_AET,
        "host": "127.0.0.1",
        "port": 4242,
        "dimse_timeout_seconds": 20,
        "storage_commitment": True,
        "storage_commitment_timeout_seconds": 10,
    }
    values.update(changes)
    return DicomDestination(**values)


def _route(data_dir: Path, port: int = NETRT_PORT) -> ReportRoute:
    return ReportRoute.from_listener(data_dir, ListenerConfig(host="127.0.0.1", port=port, ae_title="NETRT"))


def _progress_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _outcome(outcome: Any) -> dict[str, Any]:
    return {
        "instances": outcome.instances,
        "stored": outcome.stored,
        "committed": outcome.committed,
        "detail": outcome.detail,
    }


def _error(exc: DeliveryError) -> dict[str, Any]:
    return {"message": str(exc), "retryable": exc.retryable, "stored": exc.stored}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small phantom: 8 CT slices and an RTSTRUCT (sent as they are by the send-level tests,
    processed by `netrt process` in the flow-level test)."""
    root = tmp_path_factory.mktemp("phantom")
    write_phantom(PhantomSpec(rows=32, columns=32, pixel_spacing=(4.0, 4.0), slice_spacing=4.0, slices=8), root)
    files = sorted(str(p) for p in (root / "dicom").glob("*.dcm"))
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    return {"dicom": str(root / "dicom"), "files": files, "uids": uids}


# --- send level: netrt.send against Orthanc ------------------------------------------------------


def _scenario_commit(params: dict[str, Any]) -> dict[str, Any]:
    root = Path(params["root"])
    settings, _, _ = _orthanc(root, NETRT_PORT)
    files = [Path(f) for f in params["files"]]
    progress = root / "progress.jsonl"
    data_dir = root / "data"
    with Orthanc(settings, quick_stop=True) as orthanc:
        started = time.perf_counter()
        outcome = send_to_dicom(
            _destination(),
            files,
            calling_ae_title="NETRT",
            progress_file=progress,
            run="r1",
            report_route=_route(data_dir),
        )
        seconds = time.perf_counter() - started
        count = orthanc.statistics()["CountInstances"]
    return {
        "outcome": _outcome(outcome),
        "seconds": seconds,
        "count": count,
        "progress": _progress_lines(progress),
        "reports_left": sorted(p.name for p in (data_dir / "state" / "commitments").glob("*")),
    }


def test_every_instance_committed_report_on_a_new_association(study: dict[str, Any], tmp_path: Path) -> None:
    result = run_in_namespace(_scenario_commit, {"root": str(tmp_path), "files": study["files"]}, tmp_path)
    n = len(study["files"])
    outcome = result["outcome"]
    assert result["count"] == n
    assert outcome["instances"] == n and outcome["stored"] == n
    assert outcome["committed"] == n
    assert f"storage commitment: all {n} committed" in outcome["detail"]
    # Established: Orthanc 1.10 reports on a new association it opens as AE ORTHANC (never on the
    # requesting one, though NETRT offers the SCP role there and Orthanc accepts it).
    assert "report on the new association from AE 'ORTHANC' at 127.0.0.1" in outcome["detail"], outcome["detail"]
    committed = [line for line in result["progress"] if line.get("state") == "committed"]
    assert sorted(line["sop_instance_uid"] for line in committed) == sorted(study["uids"])
    assert len({line["transaction_uid"] for line in committed}) == 1
    stored = [line for line in result["progress"] if "state" not in line]
    assert len(stored) == n
    assert result["reports_left"] == []  # taken in, then discarded: the progress file is the record
    round_trip = float(outcome["detail"].rsplit(" after ", 1)[1].split(" s")[0])
    print(f"storage commitment round trip ({n} instances): {round_trip:.3f} s; whole attempt {result['seconds']:.2f} s")


def _scenario_deleted(params: dict[str, Any]) -> dict[str, Any]:
    root = Path(params["root"])
    settings, log, flag = _orthanc(root, NETRT_PORT)
    files = [Path(f) for f in params["files"]]
    progress = root / "progress.jsonl"
    route = _route(root / "data")
    out: dict[str, Any] = {}
    flag.write_text(params["victim"] + "\n")
    with Orthanc(settings, quick_stop=True) as orthanc:
        try:
            send_to_dicom(
                _destination(), files, calling_ae_title="NETRT", progress_file=progress, run="r1", report_route=route
            )
            out["first"] = None
        except DeliveryError as exc:
            out["first"] = _error(exc)
        out["count_after_first"] = orthanc.statistics()["CountInstances"]
        out["progress_after_first"] = _progress_lines(progress)
        flag.unlink()
        received_before = log.read_text().split()
        outcome = send_to_dicom(
            _destination(), files, calling_ae_title="NETRT", progress_file=progress, run="r1", report_route=route
        )
        out["second"] = _outcome(outcome)
        out["resent"] = log.read_text().split()[len(received_before) :]
        out["count_after_second"] = orthanc.statistics()["CountInstances"]
    return out


def test_instance_deleted_before_commitment_fails_named_and_the_retry_resends_it(
    study: dict[str, Any], tmp_path: Path
) -> None:
    victim = study["uids"][0]  # the first sent: its deletion is done long before the N-ACTION
    n = len(study["files"])
    result = run_in_namespace(
        _scenario_deleted, {"root": str(tmp_path), "files": study["files"], "victim": victim}, tmp_path
    )
    first = result["first"]
    assert first is not None, "the delivery succeeded although Orthanc no longer held an instance"
    assert victim in first["message"]
    # Established: Orthanc reports a deleted instance with FailureReason 0x0112.
    assert f"{victim} (FailureReason 0x0112 no such object instance)" in first["message"]
    assert f"1 of {n} instances not committed" in first["message"]
    assert first["retryable"] is True
    assert result["count_after_first"] == n - 1
    states = {(line["sop_instance_uid"], line.get("state")) for line in result["progress_after_first"]}
    assert (victim, "commit_failed") in states
    assert all((uid, "committed") in states for uid in study["uids"] if uid != victim)
    # The retry sends exactly the failed instance again and asks for it again.
    assert result["resent"] == [victim]
    assert result["count_after_second"] == n
    second = result["second"]
    assert second["committed"] == n
    assert "1 instances stored" in second["detail"]


def _scenario_timeout(params: dict[str, Any]) -> dict[str, Any]:
    root = Path(params["root"])
    # Orthanc reports to port 11199, where nothing listens; NETRT waits on 11112.
    settings, _, _ = _orthanc(root, 11199)
    files = [Path(f) for f in params["files"]]
    progress = root / "progress.jsonl"
    out: dict[str, Any] = {}
    with Orthanc(settings, quick_stop=True) as orthanc:
        started = time.perf_counter()
        try:
            send_to_dicom(
                _destination(storage_commitment_timeout_seconds=2),
                files,
                calling_ae_title="NETRT",
                progress_file=progress,
                run="r1",
                report_route=_route(root / "data"),
            )
            out["error"] = None
        except DeliveryError as exc:
            out["error"] = _error(exc)
        out["seconds"] = time.perf_counter() - started
        out["count"] = orthanc.statistics()["CountInstances"]
    out["progress"] = _progress_lines(progress)
    return out


def test_no_report_in_time_is_a_retryable_failure_naming_the_transaction(study: dict[str, Any], tmp_path: Path) -> None:
    result = run_in_namespace(_scenario_timeout, {"root": str(tmp_path), "files": study["files"]}, tmp_path)
    error = result["error"]
    assert error is not None, "the delivery succeeded without a commitment report"
    assert error["retryable"] is True
    assert "no storage commitment report" in error["message"]
    assert "within 2 s" in error["message"]
    assert "as AE NETRT at 127.0.0.1:11112 (its own receiver)" in error["message"]
    assert "Transaction UID 1." in error["message"] or "Transaction UID 2." in error["message"]
    assert 2 <= result["seconds"] < 10
    assert result["count"] == len(study["files"])
    # Stored and acknowledged, but none committed: the next attempt asks again without re-sending.
    assert not [line for line in result["progress"] if line.get("state")]


def _scenario_listener(params: dict[str, Any]) -> dict[str, Any]:
    from listener.service import ListenerService
    from netrt.config import NetrtConfig

    root = Path(params["root"])
    settings, _, _ = _orthanc(root, NETRT_PORT)
    data_dir = root / "data"
    config = NetrtConfig.model_validate(
        {"paths": {"data_dir": str(data_dir)}, "listener": {"host": "127.0.0.1", "port": NETRT_PORT}}
    )
    files = [Path(f) for f in params["files"]]
    progress = root / "progress.jsonl"
    out: dict[str, Any] = {}
    with ListenerService(config, trigger=lambda study: "unused"), Orthanc(settings, quick_stop=True):
        outcome = send_to_dicom(
            _destination(),
            files,
            calling_ae_title="NETRT",
            progress_file=progress,
            run="r1",
            report_route=_route(data_dir),
        )
        out["outcome"] = _outcome(outcome)
    log = data_dir / "logs" / "transactions.jsonl"
    out["events"] = [json.loads(line) for line in log.read_text().splitlines()]
    out["reports_left"] = sorted(p.name for p in (data_dir / "state" / "commitments").glob("*"))
    return out


def test_running_listener_receives_the_report_and_the_waiting_send_completes(
    study: dict[str, Any], tmp_path: Path
) -> None:
    result = run_in_namespace(_scenario_listener, {"root": str(tmp_path), "files": study["files"]}, tmp_path)
    n = len(study["files"])
    assert result["outcome"]["committed"] == n
    reports = [e for e in result["events"] if e["event"] == "commitment_report_received"]
    # The listener held the port, so the report reached the waiting send through the listener's
    # reports folder (the send's own receiver could not bind).
    assert len(reports) == 1
    assert reports[0]["source_ae"] == ORTHANC_AET and reports[0]["status"] == "0x0000"
    assert result["reports_left"] == []


# --- flow level: `netrt process` ------------------------------------------------------------------


def _netrt(*args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "netrt", *args], capture_output=True, text=True, timeout=600)
    return {"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-3000:]}


def _config(path: Path, data_dir: Path, listener_port: int, timeout: float) -> Path:
    path.write_text(
        f"paths: {{data_dir: {data_dir}}}\n"
        f"listener: {{host: 127.0.0.1, port: {listener_port}, ae_title: NETRT}}\n"
        "destinations:\n"
        "  - {name: pacs, type: dicom, ae_title: ORTHANC, host: 127.0.0.1, port: 4242, retries: 0,\n"
        f"     storage_commitment: true, storage_commitment_timeout_seconds: {timeout}}}\n"
    )
    return path


def _scenario_process(params: dict[str, Any]) -> dict[str, Any]:
    from flows.local_server import start_local_server, stop_local_server
    from netrt.config import load_config
    from netrt.prefect_env import local_api_url, prefect_environment

    root = Path(params["root"])
    settings, _, _ = _orthanc(root, NETRT_PORT)
    data_dir = root / "data"
    good = _config(root / "netrt.yaml", data_dir, NETRT_PORT, 20)
    # Same data dir, but NETRT waits on another port than the one Orthanc reports to.
    deaf = _config(root / "deaf.yaml", data_dir, 11113, 2)
    config = load_config(good)
    server = start_local_server(prefect_environment(config), local_api_url(config), root / "prefect.log")
    out: dict[str, Any] = {}
    try:
        with Orthanc(settings, quick_stop=True) as orthanc:
            out["ok"] = _netrt("process", params["dicom"], "--config", str(good))
            out["count"] = orthanc.statistics()["CountInstances"]
            out["summaries"] = {str(p): p.read_text() for p in (data_dir / "work").glob("*/summary.md")}
            out["timeout"] = _netrt("process", params["dicom"], "--config", str(deaf))
            out["reasons"] = [json.loads(p.read_text()) for p in (data_dir / "quarantine").glob("*/reason.json")]
        log = data_dir / "logs" / "transactions.jsonl"
        out["events"] = [json.loads(line) for line in log.read_text().splitlines()]
    finally:
        stop_local_server(server)
    return out


@pytest.mark.slow
def test_netrt_process_reports_commitment_and_quarantines_a_timeout_as_retryable(
    study: dict[str, Any], tmp_path: Path
) -> None:
    result = run_in_namespace(
        _scenario_process, {"root": str(tmp_path), "dicom": study["dicom"]}, tmp_path, timeout=600
    )
    ok = result["ok"]
    assert ok["code"] == 0, ok["stderr"]
    delivered = [e for e in result["events"] if e["event"] == "delivered"]
    assert len(delivered) == 1
    total = delivered[0]["counts"]["instances"]
    assert total == result["count"] > 0
    assert delivered[0]["counts"]["committed"] == total
    assert f"[storage commitment: all {total} committed]" in ok["stdout"]
    (summary,) = result["summaries"].values()
    assert f"- pacs: storage commitment: all {total} committed" in summary
    # No report in time (NETRT waits on a port Orthanc does not report to): exit 1, quarantined
    # as retryable, no second `delivered` event.
    timeout = result["timeout"]
    assert timeout["code"] == 1
    (reason,) = result["reasons"]
    assert reason["stage"] == "deliver"
    assert reason["retryable"] is True
    assert "no storage commitment report" in reason["error"]
    assert len([e for e in result["events"] if e["event"] == "delivered"]) == 1


# --- loopback (127.0.0.1): the routes Orthanc does not use, and hostile reports -------------------


def test_report_on_the_requesting_association_is_taken(study: dict[str, Any], tmp_path: Path) -> None:
    """No Orthanc route uses it, so a pynetdicom peer (a real association over loopback) plays a
    PACS that answers the N-ACTION and then reports on the same association, as PS3.4 J.3.3
    allows once NETRT has proposed the SCP role; no listener, no receiver (no report route)."""
    import threading

    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

    from .conftest import free_port

    port = free_port()
    peer = AE("PEER")
    for f in study["files"]:
        peer.add_supported_context(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID)
    peer.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    answered: list[int] = []

    def on_store(event: Any) -> int:
        return 0x0000

    def on_action(event: Any) -> tuple[int, None]:
        # pynetdicom's reactor can take the response meant for a send_* call made outside a
        # handler (netrt.send works around it for NETRT's side; the same here for the peer's).
        from netrt.association import _keep_responses_for_the_sender

        _keep_responses_for_the_sender(event.assoc)
        info = event.action_information
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        report.ReferencedSOPSequence = info.ReferencedSOPSequence

        def send_report() -> None:
            time.sleep(0.1)
            status, _ = event.assoc.send_n_event_report(report, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
            answered.append(int(status.Status) if "Status" in status else -1)

        threading.Thread(target=send_report, daemon=True).start()
        return 0x0000, None

    server = peer.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_N_ACTION, on_action)]
    )
    try:
        outcome = send_to_dicom(
            _destination(ae_title="PEER", port=port, storage_commitment_timeout_seconds=5),
            [Path(f) for f in study["files"]],
            calling_ae_title="NETRT",
            progress_file=tmp_path / "progress.jsonl",
            run="r1",
        )
    finally:
        server.shutdown()
    assert outcome.committed == len(study["files"])
    assert "report on the same association" in outcome.detail
    assert answered == [0x0000]


def test_a_hostile_report_is_refused_and_never_becomes_a_path(tmp_path: Path) -> None:
    """A report on a new association whose Transaction UID is a path (``../../x``) is answered
    0x0115 by the receiver and nothing is written; a good one is recorded under its checked UID."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role
    from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

    from netrt.commitment import ReportReceiver, read_report

    from .conftest import free_port

    port = free_port()
    folder = tmp_path / "data" / "state" / "commitments"
    receiver = ReportReceiver(folder, ae_title="NETRT", host="127.0.0.1", port=port)
    assert receiver.try_start()
    statuses = {}
    try:
        pacs = AE("PACS")
        pacs.add_requested_context(StorageCommitmentPushModel)
        assoc = pacs.associate(
            "127.0.0.1", port, ae_title="NETRT", ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)]
        )
        assert assoc.is_established
        for name, uid in (("hostile", "../../escaped"), ("good", "1.2.3.4")):
            report = Dataset()
            report.TransactionUID = uid
            item = Dataset()
            item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
            item.ReferencedSOPInstanceUID = "1.2.3.4.5"
            report.ReferencedSOPSequence = [item]
            status, _ = assoc.send_n_event_report(report, 1, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1")
            statuses[name] = int(status.Status)
        assoc.release()
    finally:
        receiver.stop()
    assert statuses == {"hostile": 0x0115, "good": 0x0000}
    assert sorted(p.name for p in folder.iterdir()) == ["1.2.3.4.json"]
    assert not (tmp_path / "escaped.json").exists() and not (tmp_path / "data" / "escaped.json").exists()
    recorded = read_report(folder, "1.2.3.4")
    assert recorded is not None and recorded.committed == {"1.2.3.4.5"}
    assert recorded.route == "new association from AE 'PACS' at 127.0.0.1"
