"""Event-driven waits for pynetdicom 3.0 associations, instead of its 1 ms polling (issue 20).

pynetdicom runs two threads per association, and both poll. Its network thread (the DUL) looks at
the socket with a zero-timeout ``select`` and sleeps 1 ms whenever there was nothing to do; the
association thread sleeps 1 ms on every turn of its loop before it looks for a decoded message.
Every C-STORE crosses both threads twice: the request, decoded on the DUL thread, waits for the
association thread's next turn; the response it queues waits for the DUL thread's next turn. With
storescu sending 80 CT slices to NETRT's listener, those waits were about a third of the time per
instance (``bench/profiles/receive.txt``: ``time.sleep`` was the largest entry of both threads).
pynetdicom's own source says so at ``_run_loop_delay``: "TODO: try and make this event based
rather than running loops".

Here both threads wait on events instead:

- :class:`EventDrivenDUL` blocks in ``select`` on the association's socket *and* a wake-up
  socket pair; a primitive queued for it (:meth:`~EventDrivenDUL.send_pdu`, by the association
  thread: a response, a release, an abort) and a request to stop write one byte there when it is
  waiting. It wakes at least every :data:`WAIT_SECONDS` anyway, for its timers (ARTIM, idle).
- The association thread's loop (:func:`_run_reactor`) waits on a :class:`threading.Event` that
  the DUL thread sets after each state-machine action (a decoded message, a release or abort
  request, a closed connection) and when it ends; also at least every :data:`WAIT_SECONDS`.

Nothing else changes: the two loops below are pynetdicom 3.0.4's ``DULServiceProvider.run_reactor``
and ``Association._run_reactor`` with only the waits replaced (and the pause handshake of the
association loop made exact, see :func:`_run_reactor`); messages, the state machine, timeouts and
events are pynetdicom's. :func:`make_event_driven` applies this to one association before it
starts (the listener's request handler and the sender's AE do). ``tests/test_reactor.py`` pins
the source of every pynetdicom method replaced or copied here (SHA-256), so upgrading pynetdicom
fails that test until this module has been compared with the new code.

:func:`read_exactly` is the other replacement: pynetdicom reads a PDU of n bytes in 4 KiB
``recv`` calls appended to a growing ``bytearray`` (a 512 KiB CT slice: 128 calls and copies);
it reads straight into one buffer of the PDU's size.

The two loops are adapted from pynetdicom 3.0.4 and keep its licence, which follows:

    Copyright (c) 2012-2021 Patrice Munger and pynetdicom contributors

    Permission is hereby granted, free of charge, to any person obtaining a copy of this software
    and associated documentation files (the "Software"), to deal in the Software without
    restriction, including without limitation the rights to use, copy, modify, merge, publish,
    distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
    Software is furnished to do so, subject to the following conditions:

    The above copyright notice and this permission notice shall be included in all copies or
    substantial portions of the Software.

    THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING
    BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
    NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
    DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
    OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import queue
import select
import socket
import ssl
import threading
import time
import types
from typing import Any, cast

import pynetdicom
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket

#: Longest a waiting thread sleeps without an event: how late a timer (ARTIM, network idle) or a
#: kill from another thread can be noticed. pynetdicom's polling looked every 1 ms.
WAIT_SECONDS = 0.02

#: P-DATA fragments queued for the DUL thread before it is woken in the middle of a message.
WAKE_BATCH = 8

#: The pynetdicom these copies were taken from; :data:`PINNED_SOURCES` names what was copied.
PYNETDICOM_VERSION = "3.0.4"


class EventDrivenDUL(DULServiceProvider):
    """pynetdicom's DUL (network) thread, waiting in ``select`` on the socket and a wake-up pair."""

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        #: Set after every state-machine action and when this thread ends: the association
        #: thread's wake-up (it then looks at its queues and flags as pynetdicom's loop does).
        self.user_event = threading.Event()
        self._wake_pair: tuple[socket.socket, socket.socket] | None = None
        self._waiting = False  # in _wait_for_work: a wake-up byte is needed

    # --- wake-ups from other threads -------------------------------------------------------------

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        # A DIMSE message is queued as many P-DATA fragments (16 KiB each to Orthanc: 20 for a CT
        # slice), one call each: waking the thread for each costs a syscall and a switch of the GIL
        # per fragment. The end of the message wakes it (make_event_driven wraps DIMSE send_msg),
        # so does a queue of WAKE_BATCH fragments; it then sends all that is queued without waiting.
        if isinstance(primitive, P_DATA) and self.to_provider_queue.qsize() < WAKE_BATCH:
            return
        self._wake()

    def message_queued(self) -> None:
        """The association thread has queued a whole DIMSE message: send it."""
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        """pynetdicom's ``stop_dul`` (3.0.4), plus the wake-up of a thread waiting in ``select``."""
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
            while self.is_alive():
                time.sleep(self._run_loop_delay)
            return True
        return False

    def _wake(self) -> None:
        # The waiting thread sets _waiting before it looks at its queues and flags, so either it
        # sees what the caller queued or set before calling this, or the caller sees _waiting.
        pair = self._wake_pair
        if self._waiting and pair is not None:
            with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed (ended)
                pair[1].send(b"\0")

    def _wait_for_work(self, timeout: float) -> None:
        """Return when there may be something to do: data on the socket, a queued primitive or
        event, a stop request; or after ``timeout``. Replaces ``time.sleep(self._run_loop_delay)``."""
        pair = self._wake_pair
        if pair is None:  # not started by run_reactor: behave as pynetdicom does
            time.sleep(self._run_loop_delay)
            return
        self._waiting = True
        try:
            if self._kill_thread or not self.to_provider_queue.empty() or not self.event_queue.empty():
                return
            watched: list[Any] = [pair[0]]
            assoc_socket = self.socket
            raw = assoc_socket.socket if assoc_socket is not None and assoc_socket._is_connected else None
            if raw is not None:
                if isinstance(raw, ssl.SSLSocket) and raw.pending():
                    return  # decrypted bytes already buffered: select would not see them
                watched.append(raw)
            try:
                select.select(watched, [], [], timeout)
            except (OSError, ValueError):  # the socket was closed under us: the loop's own check says so
                return
        finally:
            self._waiting = False
        with contextlib.suppress(OSError):
            while pair[0].recv(4096):
                pass

    # --- the thread --------------------------------------------------------------------------------

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``DULServiceProvider.run_reactor`` with :meth:`_wait_for_work` in
        place of its 1 ms sleep, and :attr:`user_event` set after each state-machine action."""
        read_end, write_end = socket.socketpair()
        read_end.setblocking(False)
        write_end.setblocking(False)
        self._wake_pair = (read_end, write_end)
        try:
            self._run_reactor_loop()
        finally:
            self._wake_pair = None
            read_end.close()
            write_end.close()
            self.user_event.set()

    def _run_reactor_loop(self) -> None:
        # From here to the end of this method: pynetdicom 3.0.4 (dul.py), two lines changed (marked).
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        sleep = False

        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True

            if sleep:
                self._wait_for_work(WAIT_SECONDS)  # changed: was time.sleep(self._run_loop_delay)

            if self._kill_thread:
                break

            if self.artim_timer.expired:
                self.event_queue.put("Evt18")

            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                pynetdicom.dul.LOGGER.error("Exception in DUL.run(), aborting association")
                pynetdicom.dul.LOGGER.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return

            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue

            self.state_machine.do_action(event)
            self.user_event.set()  # changed: added, the association thread's wake-up
            sleep = False


def _run_reactor(self: Association) -> None:
    """pynetdicom 3.0.4's ``Association._run_reactor``, waiting on the DUL's event, not sleeping.

    The pause handshake (``send_*`` and ``release`` clear ``_reactor_checkpoint`` and wait for
    ``_is_paused``) is kept, with the reactor counting as paused while it waits, so a caller goes
    ahead at once instead of after the next 1 ms turn. After passing the checkpoint the loop looks
    again: a caller that paused it just then (and may have seen the flag still set) goes first,
    where pynetdicom's loop could take that caller's response off the queue.
    """
    dul = cast(EventDrivenDUL, self.dul)
    wake = dul.user_event
    self._is_paused = False
    while not self._kill:
        # changed: was time.sleep(0.001), with _is_paused False during it
        self._is_paused = True
        wake.clear()
        if self.dimse.msg_queue.empty() and dul.to_user_queue.empty():
            wake.wait(WAIT_SECONDS)
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():
            continue  # changed: added (see the docstring)

        # From here to the end: pynetdicom 3.0.4 (association.py), unchanged.
        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, cast(int, context_id))

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            pynetdicom.association.LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            pynetdicom.association.LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            pynetdicom.association.LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()

            self.kill()
            return


def make_event_driven(assoc: Association) -> None:
    """Give ``assoc`` (created, not started) the event-driven DUL and association loop.

    With another pynetdicom than the one these copies come from, ``assoc`` is left as it is
    (pynetdicom's polling: slower, not wrong); ``tests/test_reactor.py`` fails meanwhile.
    """
    if pynetdicom.__version__ != PYNETDICOM_VERSION:
        return
    if assoc._started_dul or assoc.is_alive():
        raise RuntimeError("make_event_driven: the association has already started")
    old = assoc.dul
    if old.state_machine.current_state != "Sta1" or not old.to_provider_queue.empty():
        raise RuntimeError("make_event_driven: the association's DUL has already been used")
    dul = EventDrivenDUL(assoc)
    # The acceptor's socket is set before this (and has queued "Evt5", connection indication,
    # on the old DUL's event queue); the requestor's is set after.
    dul.socket = old.socket
    dul.event_queue = old.event_queue
    assoc.dul = dul
    # The timeout setters configure the DUL's timers: apply them to the new one.
    assoc.acse_timeout = assoc.acse_timeout
    assoc.network_timeout = assoc.network_timeout
    setattr(assoc, "_run_reactor", types.MethodType(_run_reactor, assoc))  # noqa: B010  (this instance only)
    send_msg = assoc.dimse.send_msg

    def send_msg_then_wake(primitive: Any, context_id: int) -> None:
        try:
            send_msg(primitive, context_id)
        finally:
            dul.message_queued()

    setattr(assoc.dimse, "send_msg", send_msg_then_wake)  # noqa: B010  (this instance only)


def read_exactly(sock: socket.socket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` without the 4 KiB steps: read ``nr_bytes`` into one buffer.

    As pynetdicom's: blocks until all are read, returns fewer only when the peer closed the
    connection (the DUL then reports a short PDU), and lets ``OSError`` (timeouts included) through.
    """
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    read = 0
    while read < nr_bytes:
        count = sock.recv_into(view[read:], nr_bytes - read)
        if count == 0:
            view.release()
            del buffer[read:]
            return buffer
        read += count
    view.release()
    return buffer


# --- the pins ----------------------------------------------------------------------------------------

#: Every pynetdicom function this module (or the listener) replaces, copies or relies on, with the
#: digest (:func:`source_digest`) of its source in pynetdicom 3.0.4. When one differs, compare the
#: new code with what is copied or assumed here before updating the digest.
PINNED_SOURCES: dict[str, str] = {
    # subclassed: queues, timers, _run_loop_delay, the thread target
    "pynetdicom.dul:DULServiceProvider.__init__": "c82dafa9438ddf70",
    # copied into EventDrivenDUL._run_reactor_loop
    "pynetdicom.dul:DULServiceProvider.run_reactor": "e3a10eb3a0931e48",
    # the only producer of P-DATA primitives: queues every fragment of a message, then returns
    "pynetdicom.dimse:DIMSEServiceProvider.send_msg": "a839cf2fb46976d9",
    # P-DATA fragments of a message are queued one by one
    "pynetdicom.dimse_messages:DIMSEMessage.encode_msg": "73000c902c52832d",
    # extended: wake-up
    "pynetdicom.dul:DULServiceProvider.send_pdu": "7cbce5da8594124e",
    # extended: wake-up
    "pynetdicom.dul:DULServiceProvider.kill_dul": "5ceccf8dd01c2072",
    # copied with a wake-up
    "pynetdicom.dul:DULServiceProvider.stop_dul": "28a7e0be126e7b30",
    # what the wait must wake for
    "pynetdicom.dul:DULServiceProvider._is_transport_event": "8725ed03bb8fbdef",
    # what the wait must wake for
    "pynetdicom.dul:DULServiceProvider._process_recv_primitive": "4c0ebbb3e646e35e",
    # calls AssociationSocket.recv(n) for a whole PDU
    "pynetdicom.dul:DULServiceProvider._read_pdu_data": "19f2d4e38c13c835",
    # make_event_driven swaps the DUL it makes
    "pynetdicom.association:Association.__init__": "eb07516b8009ad8f",
    # copied into _run_reactor
    "pynetdicom.association:Association._run_reactor": "f28838c5559e462a",
    # ends the loop through _kill and the checkpoint
    "pynetdicom.association:Association.kill": "8f9713666a7f4cff",
    # re-applied to the new DUL
    "pynetdicom.association:Association.acse_timeout": "566a68ae4a69df9d",
    # re-applied to the new DUL
    "pynetdicom.association:Association.network_timeout": "a07caedf3f0383f6",
    # the pause handshake with the reactor
    "pynetdicom.association:Association.send_c_store": "fa5a8127f349f8e7",
    # calls _create_socket before the association starts
    "pynetdicom.ae:ApplicationEntity.associate": "dbc8cf47090386b2",
    # queues Evt5 on the DUL present then
    "pynetdicom.transport:AssociationSocket.__init__": "1f0325fdef2cc353",
    # replaced by read_exactly
    "pynetdicom.transport:AssociationSocket.recv": "6bc20a33b1b7cfe7",
    # checked before the wait
    "pynetdicom.transport:AssociationSocket.ready": "3eb58e3d39dc076d",
    # the listener's hook
    "pynetdicom.transport:RequestHandler._create_association": "05c8d12b79863cdb",
    # answers through dimse.send_msg, which the listener wraps (listener.scp.store_success_command)
    "pynetdicom.service_class:StorageServiceClass.SCP": "63afca7fc6c6e7ee",
    # listener.store.file_meta_prefix writes the same bytes
    "pynetdicom.events:Event.encoded_dataset": "879e44cd3dc43358",
    # listener.store.file_meta_prefix writes the same bytes
    "pynetdicom.events:Event.file_meta": "dfb0c2851e2e2614",
    # listener.store.file_meta_prefix writes the same bytes
    "pynetdicom.dsutils:create_file_meta": "035ed415f5aeea15",
}


def _source_of(qualified: str) -> str:
    module_name, _, path = qualified.partition(":")
    target: Any = __import__(module_name, fromlist=["_"])
    for part in path.split("."):
        target = getattr(target, part)
    if isinstance(target, property):
        target = target.fget
    return inspect.getsource(target)


def source_digest(qualified: str) -> str:
    """The first 16 hex digits of the SHA-256 of the current source of ``module:Class.method``."""
    return hashlib.sha256(_source_of(qualified).encode("utf-8")).hexdigest()[:16]
