"""C-STORE delivery (netrt.send) against a real Orthanc in a private network namespace.

The series sent are written by the processing pipeline from a small phantom. Each scenario below
runs inside the namespace (see tests/orthanc.py) and returns plain data; the tests assert on it.
What Orthanc received is observed from Orthanc's side: its REST API (what it stores) and a Lua
``ReceivedInstanceFilter`` that appends every incoming SOPInstanceUID to a log (what went over the
wire, duplicates included).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from netrt.config import DicomDestination, ProcessingConfig
from netrt.deliver import deliver_to_folder
from netrt.errors import DeliveryError
from netrt.phantom import PhantomSpec, write_phantom
from netrt.pipeline import compute_mask, write_plane
from netrt.send import send_to_dicom
from netrt.study import find_study, load_study

from .conftest import free_port
from .orthanc import Orthanc, OrthancSettings, run_in_namespace

ORTHANC_AET = "ORTHANC"
OVERLAY_DATA = (0x6000, 0x3000)

# Appends each received instance's UID to LOG; refuses nothing (Orthanc 1.10 answers Success to a
# C-STORE its filter refuses, so refusals are tested with SOP classes instead). With CRASH_FLAG
# present, Orthanc kills itself (SIGKILL: no release, no abort) while receiving instance number
# CRASH_AT, so that instance and every later one are never acknowledged.
LUA_FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  local log = io.open("{log}", "a")
  log:write(dicom.SOPInstanceUID .. "\\n")
  log:close()
  local flag = io.open("{crash_flag}", "r")
  if flag ~= nil then
    flag:close()
    local count = 0
    for _ in io.lines("{log}") do count = count + 1 end
    if count >= {crash_at} then
      os.remove("{crash_flag}")
      local stat = io.open("/proc/self/stat", "r")
      local pid = stat:read("*n")
      stat:close()
      os.execute("kill -KILL " .. pid)
    end
  end
  return true
end
"""


def _destination(**changes: Any) -> DicomDestination:
    values: dict[str, Any] = {
        "name": "pacs",
        "type": "dicom",
        "ae_title": ORTHANC_AET,
        "host": "127.0.0.1",
        "port": 4242,
        "dimse_timeout_seconds": 20,
    }
    values.update(changes)
    return DicomDestination(**values)


def _orthanc_settings(root: Path, log: Path | None = None, crash_at: int = 0, **options: Any) -> OrthancSettings:
    if log is not None:
        script = root / "filter.lua"
        root.mkdir(parents=True, exist_ok=True)
        script.write_text(LUA_FILTER.format(log=log, crash_flag=root / "crash.flag", crash_at=crash_at))
        options["LuaScripts"] = [str(script)]
    return OrthancSettings(root=root, aet=ORTHANC_AET, options=options)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _error(exc: DeliveryError) -> dict[str, Any]:
    return {"message": str(exc), "retryable": exc.retryable, "destination": exc.destination}


# --- the written series --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three overlay series (axial 20, coronal and sagittal 64 images each) written by the pipeline
    from a 64 x 64 x 20 phantom, and their folder-destination copy."""
    root = tmp_path_factory.mktemp("written")
    write_phantom(
        PhantomSpec(rows=64, columns=64, pixel_spacing=(3.0, 3.0), slice_spacing=3.0, slices=20), root / "phantom"
    )
    study = load_study(find_study(root / "phantom" / "dicom").files)
    processing = ProcessingConfig()
    masks = compute_mask(study, processing, root / "work")
    files = [
        f
        for plane in processing.planes
        for s in write_plane(study, masks, plane, processing, root / "work")
        for f in s.files
    ]
    deliver_to_folder("folder", root / "folder", files)
    folder_copies = {
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in (root / "folder").rglob("*.dcm")
    }
    return {"root": root, "files": [str(f) for f in files], "folder": folder_copies}


# --- delivery, twice, byte-equal -----------------------------------------------------------------


def _scenario_deliver(params: dict[str, Any]) -> dict[str, Any]:
    from pynetdicom.dimse_primitives import C_ECHO
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from netrt.send import _associate

    root = Path(params["root"])
    log = root / "received.log"
    files = [Path(f) for f in params["files"]]
    progress = root / "progress.jsonl"
    destination = _destination()
    out: dict[str, Any] = {}
    with Orthanc(_orthanc_settings(root / "orthanc", log), quick_stop=True) as orthanc:
        out["ready_seconds"] = orthanc.ready_seconds
        assoc, _ = _associate(destination, "NETRT", [build_context(Verification)])
        raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        out["tcp_nodelay"] = raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) if raw is not None else None
        # pynetdicom's reactor race (see netrt.association._keep_responses_for_the_sender), forced: the
        # reactor takes a response; it must reach the queue the sender waits on.
        response = C_ECHO()
        response.MessageIDBeingRespondedTo, response.Status = 7, 0x0000
        assoc._serve_request(response, 1)
        _, handed_back = assoc.dimse.get_msg(block=False)
        out["handed_back"] = handed_back is response
        assoc.release()

        started = time.perf_counter()
        first = send_to_dicom(destination, files, calling_ae_title="NETRT", progress_file=progress)
        out["first"] = {
            "sent": first.stored,
            "earlier": first.earlier,
            "instances": first.instances,
            "detail": first.detail,
        }
        out["first_seconds"] = time.perf_counter() - started
        out["after_first"] = orthanc.statistics()["CountInstances"]
        out["received_after_first"] = len(_lines(log))
        out["progress_lines"] = len(progress.read_text().splitlines())

        again = send_to_dicom(destination, files, calling_ae_title="NETRT", progress_file=progress)
        out["again_detail"] = again.detail
        out["received_after_again"] = len(_lines(log))

        resend = send_to_dicom(destination, files, calling_ae_title="NETRT")  # no progress file: all again
        out["resend_sent"] = resend.stored
        out["received_after_resend"] = len(_lines(log))
        out["after_resend"] = orthanc.statistics()["CountInstances"]

        stored = root / "stored"
        stored.mkdir()
        syntaxes = {}
        for instance_id in orthanc.instances():
            data = orthanc.instance_file(instance_id)
            uid = str(orthanc.get(f"/instances/{instance_id}")["MainDicomTags"]["SOPInstanceUID"])
            (stored / f"{uid}.dcm").write_bytes(data)
            syntaxes[uid] = orthanc.request("GET", f"/instances/{instance_id}/metadata/TransferSyntax").decode()
        out["stored"] = str(stored)
        out["syntaxes"] = syntaxes
    return out


@pytest.fixture(scope="module")
def delivered(written: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("deliver")
    result: dict[str, Any] = run_in_namespace(_scenario_deliver, {"root": str(root), "files": written["files"]}, root)
    return result


def test_orthanc_starts_quickly_and_the_socket_has_tcp_nodelay(delivered: dict[str, Any]) -> None:
    assert delivered["ready_seconds"] < 0.5, "Orthanc's REST API should answer in under half a second"
    assert delivered["tcp_nodelay"], "TCP_NODELAY is not set on the association's socket"
    assert delivered["handed_back"], "a response taken by pynetdicom's reactor must go back to the sender"


def test_every_written_instance_arrives_byte_equal_to_the_folder_copy(
    written: dict[str, Any], delivered: dict[str, Any]
) -> None:
    count = len(written["files"])
    assert count == 20 + 64 + 64
    assert delivered["first"]["sent"] == delivered["first"]["instances"] == count
    assert delivered["first"]["earlier"] == 0
    assert delivered["after_first"] == count
    assert delivered["received_after_first"] == count, "each instance went over the wire exactly once"
    stored = {p.stem: p for p in Path(delivered["stored"]).glob("*.dcm")}
    assert set(stored) == set(written["folder"])
    for uid, folder_copy in written["folder"].items():
        ours = pydicom.dcmread(folder_copy)
        theirs = pydicom.dcmread(stored[uid])
        assert theirs.PixelData == ours.PixelData, uid
        assert theirs[OVERLAY_DATA].value == ours[OVERLAY_DATA].value, uid
        assert theirs == ours, f"{uid}: Orthanc's data set differs from the folder copy"
        # The stored transfer syntax was kept (no needless conversion).
        assert delivered["syntaxes"][uid] == ours.file_meta.TransferSyntaxUID


def test_sending_the_same_study_again_leaves_the_same_instances(
    written: dict[str, Any], delivered: dict[str, Any]
) -> None:
    count = len(written["files"])
    # With the progress file a second attempt sends nothing at all ...
    assert delivered["progress_lines"] == count
    assert delivered["received_after_again"] == count
    assert "already acknowledged" in delivered["again_detail"]
    # ... and without it everything goes again, yet Orthanc still holds each instance once.
    assert delivered["received_after_resend"] == 2 * count
    assert delivered["after_resend"] == count


# --- refusals, unreachable, echo -------------------------------------------------------------------


def _scenario_refusals(params: dict[str, Any]) -> dict[str, Any]:
    root = Path(params["root"])
    log = root / "received.log"
    files = [Path(f) for f in params["files"]]
    config = Path(params["config"])
    out: dict[str, Any] = {}

    def echo(name: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-m", "netrt", "echo", name, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return {"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr}

    orthanc = Orthanc(_orthanc_settings(root / "orthanc", log), quick_stop=True)
    with orthanc:
        started = time.perf_counter()
        try:
            send_to_dicom(_destination(ae_title="NOT_ORTHANC"), files, calling_ae_title="NETRT")
        except DeliveryError as exc:
            out["wrong_ae"] = _error(exc)
        out["wrong_ae_seconds"] = time.perf_counter() - started
        out["received_after_wrong_ae"] = len(_lines(log))
        out["echo_ok"] = echo("pacs")
        out["echo_wrong_ae"] = echo("wrong-ae")
        out["echo_folder"] = echo("folder")
    # A PACS that only talks to registered modalities: NETRT's calling AE title must be one of them.
    registered = {
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": False,
        "DicomModalities": {"netrt": ["NETRT", "127.0.0.1", 104]},
    }
    with Orthanc(_orthanc_settings(root / "registered", **registered), quick_stop=True) as orthanc:
        try:
            send_to_dicom(_destination(), files, calling_ae_title="STRANGER")
        except DeliveryError as exc:
            out["unknown_calling_ae"] = _error(exc)
        out["registered_calling_ae"] = send_to_dicom(_destination(), files, calling_ae_title="NETRT").stored
    try:
        send_to_dicom(_destination(), files, calling_ae_title="NETRT")
    except DeliveryError as exc:
        out["stopped"] = _error(exc)
    out["echo_stopped"] = echo("pacs")
    return out


@pytest.fixture(scope="module")
def refusals(written: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("refusals")
    config = root / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {root / 'data'}}}\n"
        "destinations:\n"
        f"  - {{name: folder, type: folder, path: {root / 'out'}}}\n"
        f"  - {{name: pacs, type: dicom, ae_title: {ORTHANC_AET}, host: 127.0.0.1, port: 4242}}\n"
        "  - {name: wrong-ae, type: dicom, ae_title: NOT_ORTHANC, host: 127.0.0.1, port: 4242}\n"
    )
    params = {"root": str(root), "files": written["files"][:5], "config": str(config)}
    result: dict[str, Any] = run_in_namespace(_scenario_refusals, params, root)
    return result


def test_wrong_called_ae_title_is_fatal_and_says_so(refusals: dict[str, Any]) -> None:
    error = refusals["wrong_ae"]
    assert error["retryable"] is False
    assert error["destination"] == "pacs"
    assert "'NOT_ORTHANC'" in error["message"] and "called AE title not recognised" in error["message"]
    assert "destination 'pacs'" in error["message"]
    assert refusals["received_after_wrong_ae"] == 0
    assert refusals["wrong_ae_seconds"] < 5, "a permanent rejection must not be waited on or retried"


def test_calling_ae_title_unknown_to_the_destination_is_fatal_and_says_so(refusals: dict[str, Any]) -> None:
    error = refusals["unknown_calling_ae"]
    assert error["retryable"] is False
    assert "calling AE title 'STRANGER'" in error["message"] and "not recognised" in error["message"]
    assert refusals["registered_calling_ae"] == 5


def test_stopped_destination_is_retryable_and_named(refusals: dict[str, Any]) -> None:
    error = refusals["stopped"]
    assert error["retryable"] is True
    assert "destination 'pacs'" in error["message"]
    assert "unreachable" in error["message"] and "127.0.0.1:4242" in error["message"]
    assert "refused" in error["message"].lower()


def test_netrt_echo_exit_codes(refusals: dict[str, Any]) -> None:
    ok = refusals["echo_ok"]
    assert ok["code"] == 0, ok["stderr"]
    assert "pacs: C-ECHO ok from ORTHANC@127.0.0.1:4242" in ok["stdout"]
    wrong = refusals["echo_wrong_ae"]
    assert wrong["code"] == 1 and "called AE title not recognised" in wrong["stderr"]
    stopped = refusals["echo_stopped"]
    assert stopped["code"] == 1 and "unreachable" in stopped["stderr"]
    folder = refusals["echo_folder"]
    assert folder["code"] == 1 and "is a folder destination" in folder["stderr"]


def test_unreachable_port_is_retryable(written: dict[str, Any]) -> None:
    port = free_port()  # nothing listens there: connection refused, on 127.0.0.1 only
    with pytest.raises(DeliveryError) as caught:
        send_to_dicom(_destination(port=port), [Path(written["files"][0])], calling_ae_title="NETRT")
    assert caught.value.retryable is True
    assert f"127.0.0.1:{port}" in str(caught.value) and "unreachable" in str(caught.value)


@pytest.fixture
def silent_peer() -> Iterator[int]:
    """A TCP listener on 127.0.0.1 that accepts connections and never says anything."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    server.close()


def test_peer_that_never_answers_times_out_retryably(written: dict[str, Any], silent_peer: int) -> None:
    destination = _destination(port=silent_peer, acse_timeout_seconds=0.5)
    started = time.perf_counter()
    with pytest.raises(DeliveryError) as caught:
        send_to_dicom(destination, [Path(written["files"][0])], calling_ae_title="NETRT")
    assert time.perf_counter() - started < 5
    assert caught.value.retryable is True
    assert "no answer" in str(caught.value) and "0.5 s" in str(caught.value)


# --- a crash mid-way: the next attempt sends only what was not acknowledged ----------------------


CRASH_AT = 41


def _scenario_crash_and_resume(params: dict[str, Any]) -> dict[str, Any]:
    root = Path(params["root"])
    log = root / "received.log"
    files = [Path(f) for f in params["files"]]
    progress = root / "progress.jsonl"
    destination = _destination()
    settings = _orthanc_settings(root / "orthanc", log, crash_at=CRASH_AT)
    (settings.root / "crash.flag").touch()
    out: dict[str, Any] = {}
    orthanc = Orthanc(settings, quick_stop=True)
    orthanc.start()
    try:
        started = time.perf_counter()
        try:
            send_to_dicom(destination, files, calling_ae_title="NETRT", progress_file=progress, run="run-a#1")
        except DeliveryError as exc:
            out["first"] = {**_error(exc), "stored": exc.stored, "earlier": exc.earlier}
        out["first_seconds"] = time.perf_counter() - started
        deadline = time.monotonic() + 15  # the send fails as Orthanc dies; its exit may lag under load
        while orthanc.running and time.monotonic() < deadline:
            time.sleep(0.1)
        out["crashed"] = not orthanc.running
        orthanc.stop()
        out["acknowledged"] = [json.loads(line)["sop_instance_uid"] for line in progress.read_text().splitlines()]
        out["received_first"] = _lines(log)
        orthanc.start()
        # The task's own retry: the same run, so what the first attempt stored counts as this run's.
        outcome = send_to_dicom(destination, files, calling_ae_title="NETRT", progress_file=progress, run="run-a#1")
        out["second"] = {"sent": outcome.stored, "earlier": outcome.earlier, "detail": outcome.detail}
        # A later run handed the same progress file (a quarantine retry of the same delivery episode):
        # nothing is sent, and everything is reported as stored by earlier runs, not by this one.
        later = send_to_dicom(destination, files, calling_ae_title="NETRT", progress_file=progress, run="run-b#1")
        out["later"] = {"sent": later.stored, "earlier": later.earlier, "detail": later.detail}
        out["received_all"] = _lines(log)
        out["count"] = orthanc.statistics()["CountInstances"]
    finally:
        orthanc.stop()
    return out


def test_crash_mid_way_then_retry_sends_only_the_missing_instances(written: dict[str, Any], tmp_path: Path) -> None:
    result = run_in_namespace(_scenario_crash_and_resume, {"root": str(tmp_path), "files": written["files"]}, tmp_path)
    total = len(written["files"])
    all_uids = set(written["folder"])
    assert result["crashed"], "Orthanc should have killed itself mid-way"
    first = result["first"]
    assert first["retryable"] is True
    assert f"{total - (CRASH_AT - 1)} of {total} instances not stored" in first["message"]
    assert "closed the connection" in first["message"]
    assert result["first_seconds"] < 10, "a dead peer must be noticed at once, not after the DIMSE timeout"
    acknowledged = result["acknowledged"]
    assert len(acknowledged) == len(set(acknowledged)) == CRASH_AT - 1
    assert len(result["received_first"]) == CRASH_AT
    second_wave = result["received_all"][len(result["received_first"]) :]
    assert sorted(second_wave) == sorted(all_uids - set(acknowledged)), "the retry re-sent exactly the missing ones"
    assert first["stored"] == CRASH_AT - 1 and first["earlier"] == 0
    assert f"{CRASH_AT - 1} stored in this attempt" in first["message"]
    assert result["second"]["sent"] == total and result["second"]["earlier"] == 0
    assert f"{CRASH_AT - 1} by earlier attempts of this run" in result["second"]["detail"]
    # second_wave above also holds whatever the later run sent: exactly the missing ones, so none.
    assert result["later"]["sent"] == 0 and result["later"]["earlier"] == total
    assert f"0 in this run, {total} in earlier runs" in result["later"]["detail"]
    assert result["count"] == total


# --- transfer syntaxes: kept where accepted, converted where not; refused SOP classes ------------


def _scenario_syntaxes(params: dict[str, Any]) -> dict[str, Any]:
    root = Path(params["root"])
    rle = [Path(f) for f in params["rle"]]
    private = Path(params["private"])
    out: dict[str, Any] = {}

    def stored(orthanc: Orthanc) -> dict[str, Any]:
        result = {}
        for instance_id in orthanc.instances():
            uid = str(orthanc.get(f"/instances/{instance_id}")["MainDicomTags"]["SOPInstanceUID"])
            path = root / f"{orthanc.settings.root.name}-{uid}.dcm"
            path.write_bytes(orthanc.instance_file(instance_id))
            result[uid] = str(path)
        return result

    # Orthanc's defaults accept RLE: the files go as stored.
    with Orthanc(_orthanc_settings(root / "accepts-rle"), quick_stop=True) as orthanc:
        send_to_dicom(_destination(), rle, calling_ae_title="NETRT")
        out["rle_kept"] = stored(orthanc)
    # Only Implicit VR Little Endian: converted (decoded) on the way, same SOP instances.
    implicit_only = {"AcceptedTransferSyntaxes": [ImplicitVRLittleEndian]}
    with Orthanc(_orthanc_settings(root / "implicit-only", **implicit_only), quick_stop=True) as orthanc:
        send_to_dicom(_destination(), rle, calling_ae_title="NETRT")
        out["converted"] = stored(orthanc)
    # An unknown SOP class is refused (presentation context rejected): fatal for that instance,
    # the others are stored, and after the PACS is reconfigured only it is sent.
    progress = root / "progress.jsonl"
    log = root / "received.log"
    refusing = _orthanc_settings(root / "sop-classes", log, UnknownSopClassAccepted=False)
    with Orthanc(refusing, quick_stop=True) as orthanc:
        try:
            send_to_dicom(_destination(), [*rle, private], calling_ae_title="NETRT", progress_file=progress)
        except DeliveryError as exc:
            out["refused"] = _error(exc)
        out["refused_count"] = orthanc.statistics()["CountInstances"]
    out["received_before"] = _lines(log)
    accepting = _orthanc_settings(root / "sop-classes", log, UnknownSopClassAccepted=True)
    with Orthanc(accepting, quick_stop=True) as orthanc:
        outcome = send_to_dicom(_destination(), [*rle, private], calling_ae_title="NETRT", progress_file=progress)
        out["after_reconfiguration"] = {"sent": outcome.stored, "detail": outcome.detail}
        out["final_count"] = orthanc.statistics()["CountInstances"]
    out["received_all"] = _lines(log)
    return out


def test_transfer_syntax_is_kept_or_converted_and_refusals_are_fatal(written: dict[str, Any], tmp_path: Path) -> None:
    sources = [Path(f) for f in written["files"][:3]]
    rle = []
    for index, source in enumerate(sources):
        ds = pydicom.dcmread(source)
        ds.compress(RLELossless, generate_instance_uid=False)
        rle.append(tmp_path / f"rle-{index}.dcm")
        ds.save_as(rle[-1], enforce_file_format=True)
    private = pydicom.dcmread(sources[0])
    private.SOPClassUID = private.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.10.543.7.1"
    private.SOPInstanceUID = private.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.543.7.2"
    private.save_as(tmp_path / "private.dcm", enforce_file_format=True)
    params = {"root": str(tmp_path), "rle": [str(p) for p in rle], "private": str(tmp_path / "private.dcm")}
    result = run_in_namespace(_scenario_syntaxes, params, tmp_path)

    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in sources}
    assert set(result["rle_kept"]) == set(originals) == set(result["converted"])
    for uid, path in result["rle_kept"].items():
        kept = pydicom.dcmread(path)
        assert kept.file_meta.TransferSyntaxUID == RLELossless
        assert (kept.pixel_array == originals[uid].pixel_array).all()
    for uid, path in result["converted"].items():
        converted = pydicom.dcmread(path)
        assert converted.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert converted.PixelData == originals[uid].PixelData, "lossless round trip through RLE"
        assert converted[OVERLAY_DATA].value == originals[uid][OVERLAY_DATA].value
        assert originals[uid].file_meta.TransferSyntaxUID == ExplicitVRLittleEndian

    refused = result["refused"]
    assert refused["retryable"] is False
    assert "1 of 4 instances not stored" in refused["message"]
    assert "1.2.826.0.1.3680043.10.543.7.1" in refused["message"]
    assert result["refused_count"] == 3
    assert result["final_count"] == 4
    assert result["received_all"][len(result["received_before"]) :] == ["1.2.826.0.1.3680043.10.543.7.2"]


# --- the progress file ------------------------------------------------------------------------------


def test_progress_file_survives_a_torn_last_line(written: dict[str, Any], tmp_path: Path) -> None:
    from netrt.progress import _acknowledged, _ProgressLog
    from netrt.send import _read_instance

    first, second = (_read_instance(_destination(), Path(f)) for f in written["files"][:2])
    progress = tmp_path / "progress.jsonl"
    log = _ProgressLog(progress, "pacs")
    log.record(first, 0)
    log.close()
    with progress.open("a") as handle:  # a crash in the middle of the next append
        handle.write('{"sop_instance_uid": "1.2.3", "sha2')
    assert set(_acknowledged(progress)) == {(first.sop_instance_uid, first.sha256)}
    log = _ProgressLog(progress, "pacs")
    log.record(second, 0xB000)
    log.close()
    assert set(_acknowledged(progress)) == {
        (first.sop_instance_uid, first.sha256),
        (second.sop_instance_uid, second.sha256),
    }
    # Same UID, other content: not acknowledged (a re-written instance is sent again).
    assert (first.sop_instance_uid, second.sha256) not in _acknowledged(progress)


def test_progress_lines_reach_the_file_at_once_and_are_synced_on_a_timer(
    written: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed sender loses no acknowledgement (each line is flushed to the kernel before the next
    instance is sent); fsync runs once per interval and at close, not per instance."""
    import netrt.progress as progress_module
    import netrt.send as send

    first, second, third = (send._read_instance(_destination(), Path(f)) for f in written["files"][:3])
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(progress_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    progress = tmp_path / "progress.jsonl"
    log = progress_module._ProgressLog(progress, "pacs", sync_seconds=3600)
    synced.clear()  # creating the file syncs its folder
    log.record(first, 0)
    log.record(second, 0)
    # Another reader (the next attempt after a crash) sees both lines before any close or fsync.
    assert set(progress_module._acknowledged(progress)) == {(i.sop_instance_uid, i.sha256) for i in (first, second)}
    assert synced == []
    log.close()
    assert len(synced) == 1
    eager = progress_module._ProgressLog(tmp_path / "eager.jsonl", "pacs", sync_seconds=0)
    synced.clear()
    eager.record(third, 0)
    assert len(synced) == 1  # the interval has passed: this line is synced as it is written
    eager.close()


@pytest.mark.parametrize(
    ("result", "source", "reason", "retryable", "words"),
    [
        (1, 1, 7, False, "called AE title not recognised"),
        (1, 1, 3, False, "calling AE title not recognised"),
        (1, 2, 2, False, "Protocol version not supported"),
        (2, 1, 1, True, "rejected transiently"),
        (1, 3, 1, True, "Temporary congestion"),  # a busy peer, whatever result it claims
        (2, 3, 2, True, "Local limit exceeded"),
    ],
)
def test_association_rejections_are_classified_by_cause(
    result: int, source: int, reason: int, retryable: bool, words: str
) -> None:
    """Rejections Orthanc cannot be made to send (busy, limits, protocol), built as pynetdicom
    would receive them."""
    from pynetdicom.pdu_primitives import A_ASSOCIATE

    from netrt.association import _not_established, _Trace

    response = A_ASSOCIATE()
    response.result, response.result_source, response.diagnostic = result, source, reason
    error = _not_established(_destination(), _Trace(connected=True, response=response), "NETRT")
    assert error.retryable is retryable
    assert words in str(error) and "destination 'pacs'" in str(error)
    # The same rejection seen only as the A-ASSOCIATE-RJ PDU (pynetdicom's requesting thread gave up
    # after the peer closed the connection, before reading it): the same verdict.
    from pynetdicom.pdu import A_ASSOCIATE_RJ

    sent, received = A_ASSOCIATE_RJ(), A_ASSOCIATE_RJ()
    sent.from_primitive(response)
    received.decode(sent.encode())
    seen = _Trace(connected=True, closed=True, rejection=received.to_primitive())
    assert _not_established(_destination(), seen, "NETRT").retryable is retryable
    assert words in str(_not_established(_destination(), seen, "NETRT"))


# --- reading the instances (issue 20: file meta parsed here, digests on a background thread) ---------


def test_file_meta_is_read_as_pydicom_reads_it(written: dict[str, Any], tmp_path: Path) -> None:
    from pydicom.filereader import read_file_meta_info

    from netrt.identity import parse_file_meta as _parse_file_meta

    for name in written["files"]:
        meta = read_file_meta_info(name)
        expected = (
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
        )
        assert _parse_file_meta(Path(name).read_bytes()[:4096]) == expected
    head = Path(written["files"][0]).read_bytes()[:4096]
    assert _parse_file_meta(head[:200]) is None  # group 0002 cut short: pydicom reads the file
    assert _parse_file_meta(b"\x00" * 132 + head[132:]) is None  # no DICM
    assert _parse_file_meta(head[:128] + b"DICM") is None  # no file meta at all


def test_instances_read_lazily_are_the_instances_read_at_once(written: dict[str, Any], tmp_path: Path) -> None:
    from netrt.send import _Digests, _read_instance, _read_instance_lazily

    paths = [Path(f) for f in written["files"][:10]]
    unreadable = tmp_path / "gone.dcm"
    unreadable.write_bytes(paths[0].read_bytes())
    digests = _Digests([*paths, unreadable])
    try:
        unreadable.unlink()  # the file meta was read before; the digest thread may find it gone
        for path, digest in zip(paths, digests.futures, strict=False):
            lazy = _read_instance_lazily(_destination(), path, digest)
            eager = _read_instance(_destination(), path)
            got = (lazy.path, lazy.sop_class_uid, lazy.sop_instance_uid, lazy.transfer_syntax, lazy.sha256)
            assert got == (eager.path, eager.sop_class_uid, eager.sop_instance_uid, eager.transfer_syntax, eager.sha256)
    finally:
        digests.close()


def test_a_first_attempt_sends_a_repeated_instance_once_and_records_every_digest(
    written: dict[str, Any], tmp_path: Path
) -> None:
    """The lazy first attempt (nothing acknowledged yet) keeps the upfront pass's semantics: the same
    SOP instance with the same content listed twice goes once (counted with the earlier ones), and
    each progress line carries the file's SHA-256, so a retry skips exactly those."""
    from netrt.progress import _acknowledged
    from netrt.send import _read_instance

    from .store_scp import store_scp

    files = [Path(f) for f in written["files"][:6]]
    progress = tmp_path / "progress.jsonl"
    with store_scp() as pacs:
        destination = _destination(ae_title=pacs.ae_title, port=pacs.port)
        outcome = send_to_dicom(
            destination, [*files, files[0], files[3]], calling_ae_title="NETRT", progress_file=progress
        )
        again = send_to_dicom(destination, files, calling_ae_title="NETRT", progress_file=progress)
    assert (outcome.instances, outcome.stored, outcome.earlier) == (8, 6, 2)
    assert sorted(pacs.stored.values()) == [1] * 6
    expected = {(i.sop_instance_uid, i.sha256) for i in (_read_instance(_destination(), f) for f in files)}
    assert set(_acknowledged(progress)) == expected
    assert "already acknowledged" in again.detail
