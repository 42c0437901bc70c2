"""Fuzzing (issue 10, part 3): mutated DICOM through the real store handler and the study loader.

Hypothesis mutates the data set of a small phantom's files (bytes flipped, lengths rewritten,
truncated, bytes inserted, most of them in the header part before the pixel data) and:

- sends each over a real association to the running listener (pynetdicom's SCU streams the file's
  bytes as they are): the answer must come (no hang), be success or a refusal status (never the
  0x0110 "internal error" of a handler bug), the association must survive, and a success must be
  on disk byte-equal to what was sent, a refusal must leave nothing;
- loads the study with the mutated file in place of the original: it loads, or it fails with a
  :class:`NetrtError` (what the flow turns into a quarantine reason), never anything else.

Bounded: a fixed number of examples (about 20 s on the CI machine), a DIMSE timeout per store and
the pytest timeout around the whole test.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage  # type: ignore[attr-defined]

from listener.scp import (
    STATUS_CANNOT_DECODE,
    STATUS_OUT_OF_RESOURCES,
    STATUS_SOP_UID_REFUSED,
    STATUS_STUDY_UID_REFUSED,
    STATUS_SUCCESS,
)
from netrt.errors import NetrtError
from netrt.phantom import PhantomSpec, write_phantom
from netrt.study import find_study, load_study

from .listener_helpers import LOCALHOST, RecordingTrigger, listener_config, running_listener

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(180)]

REFUSALS = {STATUS_CANNOT_DECODE, STATUS_STUDY_UID_REFUSED, STATUS_SOP_UID_REFUSED, STATUS_OUT_OF_RESOURCES}
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
LENGTHS = [0, 1, 2, 3, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF]
INSERTS = [b"../", b"\x00", b"\\", b"\xff\xfe\x00\xe0", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"1.2.3.4", b"\xc3("]


class Source:
    """One phantom file split into its file-meta prefix (kept) and its data set (mutated)."""

    def __init__(self, path: Path) -> None:
        raw = path.read_bytes()
        meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
        self.path = path
        self.meta = raw[:meta_end]
        self.body = raw[meta_end:]
        pixel = self.body.find(PIXEL_DATA_TAG)
        self.header_end = pixel + 12 if pixel >= 0 else len(self.body)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Source]:
    out = tmp_path_factory.mktemp("fuzz-phantom")
    write_phantom(PhantomSpec(rows=16, columns=16, slices=4, pixel_spacing=(12.0, 12.0), slice_spacing=10.0), out)
    return [Source(p) for p in sorted((out / "dicom").iterdir())]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    data = tmp_path_factory.mktemp("fuzz-data")
    with running_listener(listener_config(data, idle=3600), RecordingTrigger()) as service:
        ae = AE(ae_title="FUZZER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(RTStructureSetStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.network_timeout = 10
        ae.dimse_timeout = 10  # no answer within 10 s counts as a hang
        assoc = ae.associate(LOCALHOST, service.address[1], ae_title="NETRT")
        assert assoc.is_established
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # send the mutated bytes exactly as they are
        try:
            yield {"assoc": assoc, "data": data, "service": service, "work": tmp_path_factory.mktemp("fuzz-work")}
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
            if assoc.is_established:
                assoc.release()


@st.composite
def mutations(draw: st.DrawFn, sources: list[Source]) -> tuple[int, bytes]:
    index = draw(st.integers(0, len(sources) - 1))
    source = sources[index]
    body = bytearray(source.body)
    for _ in range(draw(st.integers(1, 5))):
        # Mostly in the header part (tags, VRs, lengths, UIDs), sometimes anywhere.
        end = max(1, source.header_end if draw(st.integers(0, 3)) else len(body))
        at = draw(st.integers(0, max(0, min(end, len(body)) - 1)))
        kind = draw(st.sampled_from(["flip", "length", "truncate", "insert", "delete"]))
        if not body:
            break
        if kind == "flip":
            body[at] = draw(st.integers(0, 255))
        elif kind == "length":
            body[at : at + 4] = struct.pack("<I", draw(st.sampled_from(LENGTHS)))
        elif kind == "truncate":
            del body[at:]
        elif kind == "insert":
            body[at:at] = draw(st.one_of(st.sampled_from(INSERTS), st.binary(min_size=1, max_size=12)))
        else:
            del body[at : at + draw(st.integers(1, 16))]
    return index, bytes(body)


def _stored_copies(data: Path, sop_uid: str) -> list[Path]:
    return list((data / "incoming").glob(f"*/{sop_uid}.dcm"))


def _check_store(node: dict[str, Any], source: Source, body: bytes, n: int) -> int:
    assoc: Association = node["assoc"]
    data: Path = node["data"]
    sop_uid = str(dcmread(source.path, stop_before_pixels=True).SOPInstanceUID)
    for old in _stored_copies(data, sop_uid):  # each example starts from "not stored"
        old.unlink()
    sent = node["work"] / f"sent-{n}.dcm"
    sent.write_bytes(source.meta + body)
    try:
        rsp = assoc.send_c_store(sent)
    finally:
        sent.unlink()
    assert assoc.is_established, "the association did not survive a mutated data set"
    assert "Status" in rsp, "no answer to the C-STORE within the DIMSE timeout (hang)"
    status = int(rsp.Status)
    assert status == STATUS_SUCCESS or status in REFUSALS, f"status 0x{status:04X}: {rsp.get('ErrorComment')}"
    copies = _stored_copies(data, sop_uid)
    if status == STATUS_SUCCESS:
        assert len(copies) == 1 and copies[0].read_bytes().endswith(body), "success, but not stored as sent"
    else:
        assert copies == [], "refused, but a copy was stored"
    assert node["service"].tracker.in_flight() == 0
    return status


def _check_load(node: dict[str, Any], sources: list[Source], index: int, body: bytes) -> str:
    folder: Path = node["work"] / "study"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for k, source in enumerate(sources):
        target = folder / source.path.name
        if k == index:
            target.write_bytes(source.meta + body)
        else:
            os.link(source.path, target)
    try:
        load_study(find_study(folder).files)
    except NetrtError as exc:
        assert str(exc), "a NetrtError without a message"
        return "refused"
    return "loaded"


def test_mutated_dicom_never_crashes_the_store_handler_or_the_loader(
    node: dict[str, Any], sources: list[Source]
) -> None:
    outcomes: dict[str, int] = {}
    counter = iter(range(10**9))

    @settings(
        max_examples=150,
        deadline=None,  # bounded by the DIMSE timeout per store and the test's timeout instead
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(mutations(sources))
    def fuzz(case: tuple[int, bytes]) -> None:
        index, body = case
        # A data set that opens with a group 0002 element cannot be sent from a Part 10 file as it
        # is: the sender's reader takes that element as part of the file meta and sends the rest.
        assume(not body.startswith(b"\x02\x00"))
        status = _check_store(node, sources[index], body, next(counter))
        loaded = _check_load(node, sources, index, body)
        key = f"store 0x{status:04X} / load {loaded}"
        outcomes[key] = outcomes.get(key, 0) + 1

    fuzz()
    print("fuzz outcomes:", dict(sorted(outcomes.items())))
    # The mutations reach both sides: some inputs are refused by the handler, some by the loader.
    assert any(k.startswith("store 0x0000") for k in outcomes), outcomes
    assert any(not k.startswith("store 0x0000") for k in outcomes), outcomes
    assert any(k.endswith("load refused") for k in outcomes), outcomes
