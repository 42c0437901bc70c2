"""The DICOM listener against real peers: dcmtk's storescu/echoscu and pynetdicom's own SCU.

Everything binds to 127.0.0.1 on free ports; the flow-run trigger is a recording callback (the
listener's real interface to Prefect, exercised end to end in test_serve.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from copy import deepcopy
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage, Verification  # type: ignore[attr-defined]

from listener import completion
from listener.scp import (
    STATUS_CANNOT_DECODE,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_UID_REFUSED,
    STATUS_STUDY_UID_REFUSED,
    store_success_command,
)
from listener.store import TEMP_PREFIX, TEMP_SUFFIX, file_meta_prefix
from netrt.config import TlsConfig
from netrt.layout import DataLayout
from netrt.logs import TransactionLog
from netrt.phantom import PhantomSpec, write_phantom
from netrt.reactor import EventDrivenDUL

from .conftest import require_tool
from .listener_helpers import (
    LOCALHOST,
    RecordingTrigger,
    dcmtk_env,
    listener_config,
    make_tls_files,
    running_listener,
    storescu,
    wait_until,
)

pytestmark = [pytest.mark.network]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small CT + RTSTRUCT phantom (20 slices of 64x64): its dicom/ folder and StudyInstanceUID."""
    out = tmp_path_factory.mktemp("phantom")
    manifest = write_phantom(PhantomSpec(rows=64, columns=64, slices=20, pixel_spacing=(4.0, 4.0)), out)
    return out / "dicom", manifest.study_instance_uid


@pytest.fixture(scope="module")
def second_phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("phantom2")
    manifest = write_phantom(PhantomSpec(rows=32, columns=32, slices=8, pixel_spacing=(8.0, 8.0), seed=7), out)
    return out / "dicom", manifest.study_instance_uid


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _scu(
    port: int, *, calling: str = "TESTSCU", called: str = "NETRT", tls: ssl.SSLContext | None = None
) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(RTStructureSetStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = 10
    ae.network_timeout = 10
    tls_args = (tls, LOCALHOST) if tls is not None else None
    return ae.associate(LOCALHOST, port, ae_title=called, tls_args=tls_args)


@pytest.fixture
def released() -> Iterator[list[Association]]:
    """Associations a test opens; released (or aborted) at the end whatever happens."""
    opened: list[Association] = []
    yield opened
    for assoc in opened:
        if assoc.is_established:
            assoc.release()


def _transactions(data: Path) -> list[dict[str, object]]:
    return TransactionLog(DataLayout.from_data_dir(data).transaction_log).entries()


def _events(data: Path, name: str) -> list[dict[str, object]]:
    return [e for e in _transactions(data) if e["event"] == name]


# --- receive with dcmtk -------------------------------------------------------------------------


def test_storescu_study_lands_durably_is_sealed_and_triggered_once(tmp_path: Path, phantom: tuple[Path, str]) -> None:
    storescu_path = require_tool("storescu")
    source, study_uid = phantom
    data = tmp_path / "data"
    config = listener_config(data)
    trigger = RecordingTrigger()
    with running_listener(config, trigger) as service:
        result = storescu(storescu_path, service.address[1], source)
        assert result.returncode == 0, result.stderr
        calls = trigger.wait_for(1)
        time.sleep(3 * config.listener.study_idle_seconds)  # no second run for the same sealing
        assert len(trigger.calls) == 1
    sealed = calls[0]
    layout = DataLayout.from_data_dir(data)
    assert sealed.study_instance_uid == study_uid
    assert sealed.folder == layout.studies / study_uid
    assert sealed.instances == 21
    assert sealed.calling_ae_titles == ("STORESCU",)
    assert sealed.modalities == ("CT", "RTSTRUCT")
    assert not (layout.incoming / study_uid).exists()
    # Every instance is stored as received: same data set, file named by its SOPInstanceUID.
    stored = {dcmread(p).SOPInstanceUID: p for p in _files(sealed.folder)}
    assert len(stored) == 21
    for original in _files(source):
        ds = dcmread(original)
        copy = dcmread(stored[ds.SOPInstanceUID])
        assert stored[ds.SOPInstanceUID].name == f"{ds.SOPInstanceUID}.dcm"
        assert copy == ds
        assert copy.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert copy.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    # Nothing of the listener's bookkeeping inside the study folder.
    assert all(p.suffix == ".dcm" for p in sealed.folder.iterdir())
    state = json.loads((layout.state / "sealed" / f"{study_uid}.json").read_text())
    assert state["flow_run_id"] == "run-1"
    # The transaction log names the source and the study.
    opened = _events(data, "association_opened")
    assert opened and opened[0]["source_ip"] == LOCALHOST and opened[0]["source_ae"] == "STORESCU"
    received = _events(data, "instances_received")
    assert received == [
        {**received[0], "study_instance_uid": study_uid, "source_ip": LOCALHOST, "counts": {"instances": 21}}
    ]
    assert [e["study_instance_uid"] for e in _events(data, "study_sealed")] == [study_uid]
    created = _events(data, "flow_run_created")
    assert [(e["study_instance_uid"], e["flow_run_id"]) for e in created] == [(study_uid, "run-1")]


def test_echoscu_gets_success(tmp_path: Path) -> None:
    echoscu = require_tool("echoscu")
    config = listener_config(tmp_path / "data")
    with running_listener(config, RecordingTrigger()) as service:
        result = subprocess.run(
            [echoscu, "-v", "-aec", "NETRT", LOCALHOST, str(service.address[1])],
            env=dcmtk_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert "Received Echo Response (Success)" in result.stdout + result.stderr


# --- the store handler with pynetdicom's SCU ----------------------------------------------------


def _status(assoc: Association, ds: Dataset) -> int:
    rsp = assoc.send_c_store(ds)
    assert "Status" in rsp, "no C-STORE response"
    return int(rsp.Status)


def test_store_refuses_unsafe_uids_and_writes_nothing_outside(
    tmp_path: Path, phantom: tuple[Path, str], released: list[Association]
) -> None:
    source, _ = phantom
    data = tmp_path / "data"
    config = listener_config(data)
    trigger = RecordingTrigger()
    template = dcmread(_files(source)[0])
    with running_listener(config, trigger) as service:
        assoc = _scu(service.address[1])
        released.append(assoc)
        assert assoc.is_established
        bad_study = deepcopy(template)
        bad_study.StudyInstanceUID = "../../../escaped"
        rsp = assoc.send_c_store(bad_study)
        assert int(rsp.Status) == STATUS_STUDY_UID_REFUSED
        assert rsp.ErrorComment.startswith("StudyInstanceUID is not a valid DICOM UID")
        assert "escaped" not in rsp.ErrorComment  # the sender's value is not echoed (nor logged)
        no_study = deepcopy(template)
        del no_study.StudyInstanceUID
        assert _status(assoc, no_study) == STATUS_STUDY_UID_REFUSED
        bad_sop = deepcopy(template)
        bad_sop.SOPInstanceUID = "../../escaped-sop"
        bad_sop.file_meta.MediaStorageSOPInstanceUID = "../../escaped-sop"
        assert _status(assoc, bad_sop) == STATUS_SOP_UID_REFUSED
        slash = deepcopy(template)
        slash.SOPInstanceUID = "1.2/3"
        assert _status(assoc, slash) == STATUS_SOP_UID_REFUSED
        long_uid = deepcopy(template)
        long_uid.StudyInstanceUID = "1." + "2" * 63  # 65 characters
        assert _status(assoc, long_uid) == STATUS_STUDY_UID_REFUSED
        assert _status(assoc, deepcopy(template)) == 0x0000
        assoc.release()
        wait_until(lambda: len(_events(data, "association_closed")) == 1, what="association closed")
    everything = [p for p in tmp_path.rglob("*")]
    outside = [p for p in everything if p != data and data not in p.parents]
    assert outside == [], f"written outside the data dir: {outside}"
    assert not any("escaped" in p.name for p in everything)
    stored = list(data.glob("*/*/*.dcm"))
    assert [p.name for p in stored] == [f"{template.SOPInstanceUID}.dcm"]
    closed = _events(data, "association_closed")[0]
    assert closed["counts"] == {"stored": 1, "refused": 5, "studies": 1}


def test_store_refuses_undecodable_data_set_with_c210(
    tmp_path: Path, phantom: tuple[Path, str], released: list[Association]
) -> None:
    source, _ = phantom
    template = dcmread(_files(source)[0])
    broken = tmp_path / "broken.dcm"
    # Valid file meta, then a data set whose first element has a VR that does not exist.
    good = tmp_path / "good.dcm"
    template.save_as(good, enforce_file_format=True)
    raw = good.read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    broken.write_bytes(raw[:meta_end] + b"\x08\x00\x18\x00ZZ\x04\x001.2.")
    data = tmp_path / "data"
    with running_listener(listener_config(data), RecordingTrigger()) as service:
        assoc = _scu(service.address[1])
        released.append(assoc)
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are
        try:
            rsp = assoc.send_c_store(broken)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
        assert int(rsp.Status) == STATUS_CANNOT_DECODE
        assert "cannot decode" in str(rsp.get("ErrorComment", ""))
        # The association survives a refused instance.
        assert _status(assoc, deepcopy(template)) == 0x0000
    assert len(list(data.glob("*/*/*.dcm"))) == 1


def test_same_sop_instance_twice_replaces_the_first(
    tmp_path: Path, phantom: tuple[Path, str], released: list[Association]
) -> None:
    source, study_uid = phantom
    data = tmp_path / "data"
    template = dcmread(_files(source)[0])
    with running_listener(listener_config(data, idle=30), RecordingTrigger()) as service:
        assoc = _scu(service.address[1])
        released.append(assoc)
        first = deepcopy(template)
        first.SeriesDescription = "first copy"
        second = deepcopy(template)
        second.SeriesDescription = "second copy"
        assert _status(assoc, first) == 0x0000
        assert _status(assoc, second) == 0x0000
        folder = data / "incoming" / study_uid
        assert [p.name for p in folder.iterdir()] == [f"{template.SOPInstanceUID}.dcm"]
        assert dcmread(folder / f"{template.SOPInstanceUID}.dcm").SeriesDescription == "second copy"


def test_success_is_answered_only_after_the_instance_and_its_folder_entry_are_fsynced(
    tmp_path: Path, phantom: tuple[Path, str], released: list[Association], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The durability rule, watched from inside the listener: for every instance, the temp file's
    data is fsync'd, then it is renamed to <sop>.dcm, then the study folder is fsync'd, and only
    then is the C-STORE response handed to pynetdicom to send. The file is byte for byte what
    pynetdicom's own ``Event.encoded_dataset()`` would have written."""
    source, study_uid = phantom
    log: list[tuple[str, Any]] = []
    lock = threading.Lock()
    real_fsync, real_replace, real_send_pdu = os.fsync, os.replace, EventDrivenDUL.send_pdu

    def fsync(fd: int) -> None:
        real_fsync(fd)
        with lock:
            log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        real_replace(src, dst, **kwargs)
        with lock:
            log.append(("replace", f"{os.fspath(src)} -> {os.fspath(dst)}"))

    def send_pdu(self: EventDrivenDUL, primitive: Any) -> None:
        # Every C-STORE-RSP leaves as a P-DATA command fragment (pynetdicom's encoding or the
        # listener's own, listener.scp.store_success_command) queued here for the network thread.
        if isinstance(primitive, P_DATA) and self.assoc.is_acceptor:
            for _, value in primitive.presentation_data_value_list:
                if value[:1] == b"\x03":
                    with lock:
                        log.append(("response", value[1:]))
        real_send_pdu(self, primitive)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(EventDrivenDUL, "send_pdu", send_pdu)
    data = tmp_path / "data"
    sent = [dcmread(p) for p in _files(source)[:5]]
    with running_listener(listener_config(data, idle=30), RecordingTrigger()) as service:
        assoc = _scu(service.address[1])
        released.append(assoc)
        for ds in sent:
            assert _status(assoc, ds) == 0x0000
    folder = data / "incoming" / study_uid
    with lock:
        entries = list(log)
    for ds in sent:
        sop = str(ds.SOPInstanceUID)
        final = folder / f"{sop}.dcm"
        (renamed,) = [i for i, (kind, what) in enumerate(entries) if kind == "replace" and what.endswith(f"{final}")]
        temp = entries[renamed][1].split(" -> ")[0]
        data_synced = [i for i, e in enumerate(entries[:renamed]) if e == ("fsync", temp)]
        folder_synced = [i for i, e in enumerate(entries) if i > renamed and e == ("fsync", str(folder))]
        (answered,) = [i for i, (kind, what) in enumerate(entries) if kind == "response" and sop.encode() in what]
        assert data_synced, f"{sop}: renamed before its data was fsync'd"
        assert folder_synced and folder_synced[0] < answered, f"{sop}: answered before the folder was fsync'd"
        expected = (
            b"\x00" * 128
            + b"DICM"
            + encode_file_meta(
                create_file_meta(
                    sop_class_uid=ds.SOPClassUID,
                    sop_instance_uid=ds.SOPInstanceUID,
                    transfer_syntax=ExplicitVRLittleEndian,
                )
            )
            + (encode(ds, False, True) or b"")
        )
        assert final.read_bytes() == expected


def test_store_success_command_is_what_pynetdicom_encodes() -> None:
    for message_id, sop_class, sop in (
        (1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4"),  # odd and even lengths
        (65535, "1.2.840.10008.5.1.4.1.1.481.3", "1.2.826.0.1.3680043.8.498." + "1" * 38),  # 64 characters
        (0, "1.2.840.10008.5.1.4.1.1.4", "2.25.1"),
    ):
        response = C_STORE()
        response.MessageID = response.MessageIDBeingRespondedTo = message_id
        response.AffectedSOPClassUID, response.AffectedSOPInstanceUID, response.Status = sop_class, sop, 0x0000
        message = C_STORE_RSP()
        message.primitive_to_message(response)
        (fragment,) = message.encode_msg(1, 16384)
        ours = store_success_command(message_id, sop_class, sop)
        assert ours is not None and fragment.presentation_data_value_list[0][1] == b"\x03" + ours
    assert store_success_command(1, "1.2.840.10008.5.1.4.1.1.2", "1.2.x") is None  # pynetdicom encodes it


def test_file_meta_prefix_is_what_pynetdicom_encodes() -> None:
    for sop_class, sop, syntax in (
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even and odd lengths
        ("1.2.840.10008.5.1.4.1.1.481.3", "1.2.826.0.1.3680043.8.498.12345678901234567890", "1.2.840.10008.1.2"),
        ("1.2.840.10008.5.1.4.1.1.4", "2.25.1", "1.2.840.10008.1.2.4.70"),
    ):
        ours = file_meta_prefix(sop_class, sop, syntax)
        theirs = (
            b"\x00" * 128
            + b"DICM"
            + encode_file_meta(create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop, transfer_syntax=syntax))
        )
        assert ours == theirs
    assert file_meta_prefix("1.2.840.10008.5.1.4.1.1.2", "1.2.x", "1.2.840.10008.1.2") is None  # pydicom encodes it


# --- access control -----------------------------------------------------------------------------


def _rejection(assoc: Association) -> tuple[int, int, int]:
    assert assoc.is_rejected, "association was not rejected"
    primitive = assoc.acceptor.primitive
    assert primitive is not None
    return int(primitive.result), int(primitive.result_source), int(primitive.diagnostic)


def test_calling_ae_allowlist_rejects_others_with_reason(tmp_path: Path, released: list[Association]) -> None:
    data = tmp_path / "data"
    config = listener_config(data, allowed_calling_ae_titles=["TPS_A", "PACS"])
    with running_listener(config, RecordingTrigger()) as service:
        port = service.address[1]
        denied = _scu(port, calling="INTRUDER")
        assert _rejection(denied) == (0x01, 0x01, 0x03)  # permanent, service user, calling AE not recognised
        allowed = _scu(port, calling="PACS")
        released.append(allowed)
        assert allowed.is_established
        assert int(allowed.send_c_echo().Status) == 0x0000
    rejected = _events(data, "association_rejected")
    assert len(rejected) == 1
    assert rejected[0]["source_ae"] == "INTRUDER" and rejected[0]["source_ip"] == LOCALHOST
    assert "INTRUDER" in str(rejected[0]["reason"])


def test_storescu_with_unlisted_calling_ae_is_rejected(tmp_path: Path, phantom: tuple[Path, str]) -> None:
    storescu_path = require_tool("storescu")
    data = tmp_path / "data"
    config = listener_config(data, allowed_calling_ae_titles=["TPS_A"])
    with running_listener(config, RecordingTrigger()) as service:
        result = storescu(storescu_path, service.address[1], phantom[0], calling="STORESCU")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
    assert not list(data.glob("*/*/*.dcm"))


def test_network_allowlist(tmp_path: Path, released: list[Association]) -> None:
    data = tmp_path / "data"
    with running_listener(listener_config(data, allowed_networks=["10.0.0.0/8", "::1/128"]), RecordingTrigger()) as svc:
        denied = _scu(svc.address[1])
        assert _rejection(denied) == (0x01, 0x01, 0x01)  # permanent, service user, no reason given
    assert "not in allowed_networks" in str(_events(data, "association_rejected")[0]["reason"])
    with running_listener(
        listener_config(tmp_path / "d2", allowed_networks=["127.0.0.0/8"]), RecordingTrigger()
    ) as svc:
        allowed = _scu(svc.address[1])
        released.append(allowed)
        assert allowed.is_established


def test_wrong_called_ae_title_is_rejected(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_listener(listener_config(data), RecordingTrigger()) as service:
        assoc = _scu(service.address[1], called="SOMEONE_ELSE")
        assert _rejection(assoc) == (0x01, 0x01, 0x07)  # called AE title not recognised
    rejected = _events(data, "association_rejected")
    assert len(rejected) == 1 and "'SOMEONE_ELSE' is not this node's 'NETRT'" in str(rejected[0]["reason"])


def test_max_associations_rejects_the_extra_one_as_busy(tmp_path: Path, released: list[Association]) -> None:
    data = tmp_path / "data"
    with running_listener(listener_config(data, max_associations=2), RecordingTrigger()) as service:
        port = service.address[1]
        first, second = _scu(port), _scu(port)
        released.extend([first, second])
        assert first.is_established and second.is_established
        third = _scu(port)
        assert _rejection(third) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
        assert "2 associations already active" in str(_events(data, "association_rejected")[0]["reason"])
        first.release()
        wait_until(lambda: len(_events(data, "association_closed")) == 1, what="first association closed")
        fourth = _scu(port)
        released.append(fourth)
        assert fourth.is_established


def test_tls_with_client_certificates(tmp_path: Path, released: list[Association]) -> None:
    pytest.importorskip("cryptography")
    tls = make_tls_files(tmp_path / "tls")
    data = tmp_path / "data"
    config = listener_config(data)
    config.listener.tls = TlsConfig(enabled=True, certfile=tls.server_cert, keyfile=tls.server_key, ca_file=tls.ca)

    def client(cert: Path | None, key: Path | None) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
        return context

    with running_listener(config, RecordingTrigger()) as service:
        port = service.address[1]
        good = _scu(port, tls=client(tls.client_cert, tls.client_key))
        released.append(good)
        assert good.is_established
        assert int(good.send_c_echo().Status) == 0x0000
        good.release()
        without_cert = _scu(port, tls=client(None, None))
        assert not without_cert.is_established
        rogue = _scu(port, tls=client(tls.rogue_cert, tls.rogue_key))
        assert not rogue.is_established
        plain = _scu(port)
        assert not plain.is_established
        wait_until(lambda: len(_events(data, "association_rejected")) >= 3, what="three TLS refusals logged")
    reasons = [str(e["reason"]) for e in _events(data, "association_rejected")]
    assert all(r.startswith("TLS handshake failed") for r in reasons), reasons


# --- completion, re-opening, recovery -----------------------------------------------------------


def test_open_association_holds_its_study_until_released(
    tmp_path: Path, phantom: tuple[Path, str], released: list[Association]
) -> None:
    source, study_uid = phantom
    data = tmp_path / "data"
    trigger = RecordingTrigger()
    idle = 0.4
    with running_listener(listener_config(data, idle=idle), trigger) as service:
        assoc = _scu(service.address[1])
        released.append(assoc)
        files = _files(source)
        for path in files[:5]:
            assert _status(assoc, dcmread(path)) == 0x0000
        time.sleep(4 * idle)  # idle, but the association that sent it is still open
        assert trigger.calls == []
        assert (data / "incoming" / study_uid).is_dir()
        for path in files[5:]:
            assert _status(assoc, dcmread(path)) == 0x0000
        assoc.release()
        calls = trigger.wait_for(1)
    assert calls[0].instances == 21
    assert trigger.snapshots[0] == sorted(f"{dcmread(p).SOPInstanceUID}.dcm" for p in files)


def test_association_moving_on_to_another_study_releases_the_first(
    tmp_path: Path, phantom: tuple[Path, str], second_phantom: tuple[Path, str], released: list[Association]
) -> None:
    (first_dir, first_uid), (second_dir, second_uid) = phantom, second_phantom
    data = tmp_path / "data"
    trigger = RecordingTrigger()
    idle = 0.4
    with running_listener(listener_config(data, idle=idle), trigger) as service:
        assoc = _scu(service.address[1])
        released.append(assoc)
        for path in _files(first_dir):
            assert _status(assoc, dcmread(path)) == 0x0000
        for path in _files(second_dir)[:3]:
            assert _status(assoc, dcmread(path)) == 0x0000
        calls = trigger.wait_for(1)
        assert [c.study_instance_uid for c in calls] == [first_uid]
        time.sleep(3 * idle)
        assert len(trigger.calls) == 1, "the study the open association is still sending was sealed"
        for path in _files(second_dir)[3:]:
            assert _status(assoc, dcmread(path)) == 0x0000
        assoc.release()
        calls = trigger.wait_for(2)
    assert [c.study_instance_uid for c in calls] == [first_uid, second_uid]
    assert calls[1].instances == len(_files(second_dir))


@pytest.mark.parametrize("area", ["studies", "processed", "quarantine"])
def test_new_instance_reopens_a_sealed_study(
    tmp_path: Path, phantom: tuple[Path, str], released: list[Association], area: str
) -> None:
    source, study_uid = phantom
    data = tmp_path / "data"
    layout = DataLayout.from_data_dir(data)
    trigger = RecordingTrigger()
    files = _files(source)
    with running_listener(listener_config(data), trigger) as service:
        assoc = _scu(service.address[1])
        released.append(assoc)
        for path in files[:-1]:
            assert _status(assoc, dcmread(path)) == 0x0000
        assoc.release()
        trigger.wait_for(1)
        if area == "processed":  # what the flow does on success
            os.rename(layout.studies / study_uid, layout.processed / study_uid)
        elif area == "quarantine":  # what the flow does on failure, through the quarantine module
            from netrt.quarantine import quarantine_study

            sealed_files = _files(layout.studies / study_uid)
            quarantine_study(
                layout,
                layout.studies / study_uid,
                sealed_files,
                entry_id=study_uid,
                stage="validate",
                error="test failure",
                retryable=False,
                flow_run_id="run-1",
                study=study_uid,
            )
            assert (layout.quarantine / study_uid / "input").is_dir()
        late = _scu(service.address[1])
        released.append(late)
        assert _status(late, dcmread(files[-1])) == 0x0000
        late.release()
        calls = trigger.wait_for(2)
    assert calls[1].folder == layout.studies / study_uid
    assert calls[1].instances == len(files), "re-opened study not processed as a whole"
    assert len(trigger.snapshots[1]) == len(files)
    assert not (layout.processed / study_uid).exists()
    assert not (layout.quarantine / study_uid / "input").exists()
    reopened = _events(data, "study_reopened")
    assert [(e["area"], e["counts"]) for e in reopened] == [(area, {"instances": len(files) - 1})]
    if area == "quarantine":
        reason = json.loads((layout.quarantine / study_uid / "reason.json").read_text())
        assert reason["status"] == "retrying"


def test_recovery_picks_up_incoming_and_untriggered_sealed_studies(
    tmp_path: Path, phantom: tuple[Path, str], second_phantom: tuple[Path, str]
) -> None:
    (first_dir, first_uid), (second_dir, second_uid) = phantom, second_phantom
    data = tmp_path / "data"
    layout = DataLayout.from_data_dir(data).create()
    # A crash mid-transfer: some instances in incoming/, plus a temp file of an unacknowledged one.
    incoming = layout.incoming / first_uid
    incoming.mkdir()
    for path in _files(first_dir)[:7]:
        shutil.copy(path, incoming / f"{dcmread(path).SOPInstanceUID}.dcm")
    (incoming / f"{TEMP_PREFIX}abc{TEMP_SUFFIX}").write_bytes(b"half an instance")
    # A crash right after sealing: sealed, no flow run created.
    sealed = layout.studies / second_uid
    sealed.mkdir()
    for path in _files(second_dir):
        shutil.copy(path, sealed / f"{dcmread(path).SOPInstanceUID}.dcm")
    trigger = RecordingTrigger()
    with running_listener(listener_config(data, idle=0.5), trigger):
        calls = trigger.wait_for(2)
    by_uid = {c.study_instance_uid: c for c in calls}
    assert set(by_uid) == {first_uid, second_uid}
    assert by_uid[first_uid].instances == 7
    assert by_uid[second_uid].instances == len(_files(second_dir))
    assert not any(p.name.startswith(TEMP_PREFIX) for p in (layout.studies / first_uid).iterdir())
    recovered = {(e["study_instance_uid"], e["area"]) for e in _events(data, "study_recovered")}
    assert recovered == {(first_uid, "incoming"), (second_uid, "studies")}


@pytest.mark.parametrize("still_pending", [True, False])
def test_recovery_asks_whether_a_recorded_flow_run_will_still_process_the_study(
    tmp_path: Path, second_phantom: tuple[Path, str], still_pending: bool
) -> None:
    source, study_uid = second_phantom
    data = tmp_path / "data"
    layout = DataLayout.from_data_dir(data).create()
    sealed = layout.studies / study_uid
    sealed.mkdir()
    for path in _files(source):
        shutil.copy(path, sealed / f"{dcmread(path).SOPInstanceUID}.dcm")
    (layout.state / "sealed").mkdir(parents=True)
    (layout.state / "sealed" / f"{study_uid}.json").write_text(
        json.dumps({"study_instance_uid": study_uid, "flow_run_id": "old-run", "seal_id": "s1"})
    )
    asked: list[str] = []

    def is_run_pending(run_id: str) -> bool:
        asked.append(run_id)
        return still_pending

    trigger = RecordingTrigger()
    with running_listener(listener_config(data, idle=0.3), trigger, is_run_pending=is_run_pending):
        wait_until(lambda: asked == ["old-run"], what="the recorded run to be checked")
        time.sleep(1.0)
    assert len(trigger.calls) == (0 if still_pending else 1)
    if not still_pending:
        assert trigger.calls[0].seal_id == "s1"  # same sealing: the same idempotency key
        state = json.loads((layout.state / "sealed" / f"{study_uid}.json").read_text())
        assert state["flow_run_id"] == "run-1"


def test_failed_trigger_is_retried_until_a_run_is_created(
    tmp_path: Path, phantom: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    storescu_path = require_tool("storescu")
    monkeypatch.setattr(completion, "FIRST_RETRY_SECONDS", 0.2)
    source, study_uid = phantom
    data = tmp_path / "data"
    trigger = RecordingTrigger(fail_times=2)
    with running_listener(listener_config(data, idle=0.3), trigger) as service:
        assert storescu(storescu_path, service.address[1], source).returncode == 0
        calls = trigger.wait_for(1)
    assert [c.study_instance_uid for c in calls] == [study_uid]
    failed = _events(data, "flow_run_failed")
    assert [e["attempts"] for e in failed] == [1, 2]
    assert "unreachable" in str(failed[0]["error"])
    assert [e["flow_run_id"] for e in _events(data, "flow_run_created")] == ["run-1"]


def test_sealed_study_is_never_triggered_twice_for_one_sealing(tmp_path: Path, phantom: tuple[Path, str]) -> None:
    """A restart after the run was created does not create another one (the state file says so)."""
    storescu_path = require_tool("storescu")
    source, _ = phantom
    data = tmp_path / "data"
    first = RecordingTrigger()
    config = listener_config(data, idle=0.3)
    with running_listener(config, first) as service:
        assert storescu(storescu_path, service.address[1], source).returncode == 0
        first.wait_for(1)
    second = RecordingTrigger()
    with running_listener(listener_config(data, idle=0.3), second):
        time.sleep(1.5)
    assert second.calls == []


_LIMITED_LISTENER = """
import resource, signal, sys, threading
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from listener.service import ListenerService
from netrt.config import load_config
config = load_config(None)
config.paths.data_dir = Path(sys.argv[1])
config.listener.host = "127.0.0.1"
config.listener.port = int(sys.argv[2])
config.listener.study_idle_seconds = 60
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
service = ListenerService(config, trigger=lambda study: "unused")
service.start()
print("ready", flush=True)
stop.wait()
service.stop(grace=1.0)
"""


def test_write_failure_answers_a700_and_the_listener_recovers(
    tmp_path: Path, phantom: tuple[Path, str], released: list[Association]
) -> None:
    """A real failed write (the file-size limit of the listener process: EFBIG) is answered 0xA700."""
    source, study_uid = phantom
    from .conftest import REPO, free_port

    port = free_port()
    data = tmp_path / "data"
    child = subprocess.Popen(
        [sys.executable, "-c", _LIMITED_LISTENER, str(data), str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        small = dcmread(_files(source)[0])
        big = deepcopy(small)
        big.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        big.Rows = big.Columns = 512
        big.PixelData = bytes(512 * 512 * 2)  # 512 kB: past the 200 kB limit
        assoc = _scu(port)
        released.append(assoc)
        rsp = assoc.send_c_store(big)
        assert int(rsp.Status) == STATUS_OUT_OF_RESOURCES
        assert "cannot store" in str(rsp.ErrorComment)
        assert _status(assoc, small) == 0x0000  # the next instance is stored again
        assoc.release()
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
    folder = data / "incoming" / study_uid
    assert [p.name for p in folder.iterdir()] == [f"{small.SOPInstanceUID}.dcm"], "partial or temp file left behind"


def test_listener_command_without_a_prefect_api_says_so(tmp_path: Path) -> None:
    from .conftest import REPO, free_port

    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {tmp_path / 'data'}}}\nprefect: {{server_port: {free_port()}}}\n"
        f"listener: {{host: {LOCALHOST}, port: {free_port()}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run(
        [sys.executable, "-m", "netrt", "listener", "--config", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "no Prefect API answers" in done.stderr and "flow runs could not be created" in done.stderr
