"""netrt.reactor: pynetdicom's association threads waiting on events instead of polling (issue 20).

The listener and the sender use it on every association, so their own tests (test_listener.py,
test_send*.py, test_hardening_network.py) exercise it end to end; these tests pin what it copies
from pynetdicom and check what it promises: no 1 ms polling, prompt ends, whole PDUs read.
Network tests bind to 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from netrt import reactor
from netrt.reactor import PINNED_SOURCES, PYNETDICOM_VERSION, EventDrivenDUL, read_exactly, source_digest

from .listener_helpers import LOCALHOST, RecordingTrigger, listener_config, running_listener, wait_until

pytestmark = [pytest.mark.network]


def test_pynetdicom_is_the_version_the_copies_come_from() -> None:
    """Fails when pynetdicom is upgraded: compare netrt/reactor.py with the new loops first."""
    assert pynetdicom.__version__ == PYNETDICOM_VERSION


@pytest.mark.parametrize("qualified", sorted(PINNED_SOURCES))
def test_pinned_pynetdicom_source_is_unchanged(qualified: str) -> None:
    """Each pynetdicom function netrt.reactor (or the listener's file meta) copies, replaces or relies
    on still has the source it was written against."""
    assert source_digest(qualified) == PINNED_SOURCES[qualified], (
        f"{qualified} changed in pynetdicom {pynetdicom.__version__}: check netrt/reactor.py against it"
    )


def _scu(port: int) -> Association:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = 10
    ae.network_timeout = 10
    assoc = ae.associate(LOCALHOST, port, ae_title="NETRT")
    assert assoc.is_established
    return assoc


def test_listener_associations_are_event_driven_and_do_not_poll_while_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An open, idle association: the listener's network thread wakes about every WAIT_SECONDS
    (pynetdicom's loop: every 1 ms, ~500 times in 0.5 s), and a C-ECHO is still answered at once."""
    turns: list[float] = []
    real_wait = EventDrivenDUL._wait_for_work

    def counted(self: EventDrivenDUL, timeout: float) -> None:
        turns.append(time.monotonic())
        real_wait(self, timeout)

    monkeypatch.setattr(EventDrivenDUL, "_wait_for_work", counted)
    with running_listener(listener_config(tmp_path / "data"), RecordingTrigger()) as service:
        assoc = _scu(service.address[1])
        try:
            (acceptor,) = service._server.active_associations  # type: ignore[union-attr]
            assert isinstance(acceptor.dul, EventDrivenDUL)
            assert assoc.send_c_echo().Status == 0x0000
            time.sleep(0.1)
            before = len(turns)
            time.sleep(0.5)
            idle_turns = len(turns) - before
            assert idle_turns <= 0.5 / reactor.WAIT_SECONDS * 2 + 5, f"{idle_turns} turns in 0.5 s idle"
            started = time.monotonic()
            for _ in range(20):
                assert assoc.send_c_echo().Status == 0x0000
            per_echo = (time.monotonic() - started) / 20
            # Generous on a shared machine; polling on both sides made this >= 2 ms, waiting on
            # events a fraction of that. Only a wait that never woke would come near WAIT_SECONDS.
            assert per_echo < reactor.WAIT_SECONDS, f"{per_echo * 1000:.1f} ms per C-ECHO"
        finally:
            assoc.release()
        wait_until(lambda: not service._server.active_associations, timeout=5, what="the association to end")  # type: ignore[union-attr]


def test_abort_from_another_thread_ends_both_threads_promptly(tmp_path: Path) -> None:
    """A kill from outside the association's threads (the listener's stop) wakes their waits."""
    with running_listener(listener_config(tmp_path / "data"), RecordingTrigger()) as service:
        assoc = _scu(service.address[1])
        (acceptor,) = service._server.active_associations  # type: ignore[union-attr]
        started = time.monotonic()
        acceptor.abort()
        acceptor.join(timeout=5)
        acceptor.dul.join(timeout=5)
        took = time.monotonic() - started
        assert not acceptor.is_alive() and not acceptor.dul.is_alive()
        assert took < 2.0, f"{took:.2f} s"  # abort() itself sleeps 0.1 s
        wait_until(lambda: not assoc.is_established, timeout=5, what="the peer to see the abort")


def test_make_event_driven_refuses_a_started_association(tmp_path: Path) -> None:
    with running_listener(listener_config(tmp_path / "data"), RecordingTrigger()) as service:
        assoc = _scu(service.address[1])
        try:
            with pytest.raises(RuntimeError, match="already started"):
                reactor.make_event_driven(assoc)
        finally:
            assoc.release()


def test_read_exactly_gathers_a_pdu_sent_in_pieces_and_returns_short_when_the_peer_closes() -> None:
    left, right = socket.socketpair()
    payload = bytes(range(256)) * 4096  # 1 MiB

    def send_in_pieces() -> None:
        for start in range(0, len(payload), 70_001):
            right.sendall(payload[start : start + 70_001])
            time.sleep(0.001)

    sender = threading.Thread(target=send_in_pieces)
    sender.start()
    try:
        got = read_exactly(left, len(payload))
    finally:
        sender.join(timeout=10)
    assert bytes(got) == payload
    right.sendall(b"abc")
    right.close()
    short = read_exactly(left, 10)
    assert bytes(short) == b"abc"  # the DUL then reports the PDU as shorter than announced
    left.close()


def test_the_sender_uses_the_event_driven_reactor(monkeypatch: pytest.MonkeyPatch) -> None:
    """netrt.association's AE gives every association it requests the event-driven threads."""
    from pynetdicom.transport import AddressInformation

    from netrt.association import _NetrtAE, _Trace

    ae = _NetrtAE("NETRT", _Trace())
    assoc = Association(ae, "requestor")
    sock: Any = ae._create_socket(assoc, AddressInformation.from_tuple((LOCALHOST, 0)), None)
    try:
        assert isinstance(assoc.dul, EventDrivenDUL)
        assert assoc.dul.artim_timer.timeout == ae.acse_timeout
    finally:
        sock.socket.close()
