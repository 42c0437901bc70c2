"""The DICOM SCP: who may associate, what is accepted, and the C-STORE handler.

pynetdicom does the protocol. What is ours: the presentation contexts (image and RT storage, the
usual transfer syntaxes including compressed ones), access control with a proper A-ASSOCIATE-RJ
reason and a log line for each refusal, TCP_NODELAY on every accepted socket (a C-STORE response
is a small packet; Nagle's algorithm would hold it back waiting for the ACK of the previous one),
the TLS handshake in the connection's own thread (a peer that never finishes it cannot block the
accept loop), and a store handler that writes the received bytes durably, returns a status and
never raises.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from listener.completion import StudyTracker
from listener.store import StoreError, file_meta_prefix, write_instance
from netrt.commitment import add_report_context, address_allowed, answer_event_report
from netrt.config import ListenerConfig, TlsConfig
from netrt.errors import NetrtError, UnsafeIdentifierError
from netrt.logs import TransactionLog
from netrt.reactor import EventDrivenDUL, make_event_driven, read_exactly
from netrt.uids import checked_uid

LOGGER = logging.getLogger("netrt.listener")

# Storage SOP classes accepted, with the short name used in logs and flow-run tags.
STORAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2": "CT",  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4": "MR",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.3": "MR",  # Enhanced MR Color Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4": "MR",  # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.128": "PT",  # Positron Emission Tomography Image Storage
    "1.2.840.10008.5.1.4.1.1.130": "PT",  # Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.128.1": "PT",  # Legacy Converted Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",  # RT Structure Set Storage
    "1.2.840.10008.5.1.4.1.1.481.5": "RTPLAN",  # RT Plan Storage
    "1.2.840.10008.5.1.4.1.1.481.8": "RTPLAN",  # RT Ion Plan Storage
    "1.2.840.10008.5.1.4.1.1.481.2": "RTDOSE",  # RT Dose Storage
    "1.2.840.10008.5.1.4.1.1.481.1": "RTIMAGE",  # RT Image Storage
    "1.2.840.10008.5.1.4.1.1.66.1": "REG",  # Spatial Registration Storage
    "1.2.840.10008.5.1.4.1.1.66.3": "REG",  # Deformable Spatial Registration Storage
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",  # Segmentation Storage
}

# Transfer syntaxes in order of preference when a sender offers several for one context:
# uncompressed first (a sender never has to compress, and never lossily, for us), then lossless,
# then lossy compression (accepted so that data compressed at the source is kept as it came).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    RLELossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
)

# C-STORE statuses (PS3.4 B.2.3): A7xx refused (out of resources), Cxxx cannot understand.
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_DECODE = 0xC210
STATUS_STUDY_UID_REFUSED = 0xC211
STATUS_SOP_UID_REFUSED = 0xC212
STATUS_PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ (result, source, reason) per PS3.8 9.3.4.
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_BUSY = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded

TLS_HANDSHAKE_TIMEOUT_SECONDS = 15.0

# A PDU may exceed the negotiated maximum (or, when that is unlimited, the data set limit) by this
# much (command set, PDU headers, an A-ASSOCIATE-RQ with many contexts) before it is refused unread.
PDU_SLACK_BYTES = 1 << 20


def pdu_limit(config: ListenerConfig) -> int:
    """Longest PDU the listener reads: longer ones close the connection before they are buffered."""
    return (config.max_pdu_size or config.max_dataset_bytes) + PDU_SLACK_BYTES


class OversizedDataSet(io.BytesIO):
    """Stands in for the receive buffer of a data set past ``listener.max_dataset_bytes``.

    pynetdicom gathers a data set's fragments in memory; once it is too large the buffer is swapped
    for this one, which only counts, so the message still completes and the handler can answer a
    failure status instead of the process holding (or running out of) the memory.
    """

    def __init__(self, received: int) -> None:
        super().__init__()
        self.received = received

    def write(self, data: Any) -> int:
        size = len(data)
        self.received += size
        return size


class ListenerError(NetrtError):
    """The listener cannot start (TLS material unreadable, port taken, ...)."""


def failure(status: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (LO: at most 64 characters) for the sender."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment if len(comment) <= 64 else comment[:61] + "..."
    return ds


def build_ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """Server-side TLS context from ``listener.tls``; None when TLS is off.

    With ``ca_file`` peers must present a certificate signed by one of those CAs (the handshake
    fails otherwise); TLS 1.2 is the oldest version accepted.
    """
    if not tls.enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ListenerError(
            f"listener.tls: cannot load certfile {tls.certfile} / keyfile {tls.keyfile}: {exc}"
        ) from exc
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ListenerError(f"listener.tls.ca_file: cannot load {tls.ca_file}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class NetrtAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY on accepted sockets and TLS in the connection thread."""

    def __init__(
        self,
        *args: Any,
        tls_context: ssl.SSLContext | None = None,
        on_tls_failure: Callable[[str, str], None] | None = None,
        max_pdu_bytes: int = 0,
        on_oversized_pdu: Callable[[Association, int], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self.tls_context = tls_context
        self.on_tls_failure = on_tls_failure
        self.max_pdu_bytes = max_pdu_bytes
        self.on_oversized_pdu = on_oversized_pdu
        kwargs.setdefault("request_handler", NetrtRequestHandler)
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = super().get_request()  # plain accept: the base class has no ssl_context
        with contextlib.suppress(OSError):  # only fails on a non-TCP socket, which cannot happen here
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.tls_context is not None:
            try:
                request.settimeout(TLS_HANDSHAKE_TIMEOUT_SECONDS)
                request = self.tls_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (OSError, ssl.SSLError) as exc:
                host = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
                if self.on_tls_failure is not None:
                    self.on_tls_failure(host, f"{type(exc).__name__}: {exc}")
                with contextlib.suppress(OSError):
                    request.close()
                return
        super().process_request_thread(request, client_address)


class NetrtRequestHandler(RequestHandler):
    """pynetdicom's request handler, with a bound on the PDU length the association reads.

    pynetdicom reads a whole PDU into memory whatever length its header announces (up to 4 GiB) and
    does not check it against the maximum it negotiated; here a longer one closes the connection.
    """

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        make_event_driven(assoc)  # no 1 ms polling in either of the association's threads
        _answer_store_success_directly(assoc)
        server = cast(NetrtAssociationServer, self.server)
        limit = server.max_pdu_bytes
        sock = assoc.dul.socket
        if sock is not None:

            def bounded_recv(nr_bytes: int) -> bytearray:
                if limit > 0 and nr_bytes > limit:
                    if server.on_oversized_pdu is not None:
                        server.on_oversized_pdu(assoc, nr_bytes)
                    sock.close()  # the DUL sees a short read: "transport connection closed"
                    return bytearray()
                return read_exactly(cast(socket.socket, sock.socket), nr_bytes)

            sock.recv = bounded_recv  # type: ignore[method-assign]
        return assoc


_UID_TEXT = re.compile(r"[0-9.]{1,64}")


def store_success_command(message_id: int, sop_class_uid: str, sop_instance_uid: str) -> bytes | None:
    """The command set of a C-STORE-RSP with status Success and nothing else (PS3.7 9.3.1.2),
    encoded here in implicit VR little endian: the same bytes as pynetdicom's ``C_STORE_RSP``
    encodes through pydicom (about 0.4 ms per response; tests/test_listener.py compares them).
    None when a value does not fit the fast path (pynetdicom then encodes the response)."""
    if not (0 <= message_id <= 0xFFFF and _UID_TEXT.fullmatch(sop_class_uid) and _UID_TEXT.fullmatch(sop_instance_uid)):
        return None

    def element(element_number: int, value: bytes) -> bytes:
        return b"\x00\x00" + element_number.to_bytes(2, "little") + len(value).to_bytes(4, "little") + value

    def uid(value: str) -> bytes:
        raw = value.encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw

    body = b"".join(
        (
            element(0x0002, uid(sop_class_uid)),  # Affected SOP Class UID
            element(0x0100, (0x8001).to_bytes(2, "little")),  # Command Field: C-STORE-RSP
            element(0x0120, message_id.to_bytes(2, "little")),  # Message ID Being Responded To
            element(0x0800, (0x0101).to_bytes(2, "little")),  # Command Data Set Type: none
            element(0x0900, (0x0000).to_bytes(2, "little")),  # Status: Success
            element(0x1000, uid(sop_instance_uid)),  # Affected SOP Instance UID
        )
    )
    return element(0x0000, len(body).to_bytes(4, "little")) + body  # Command Group Length


def _answer_store_success_directly(assoc: Association) -> None:
    """Queue a plain C-STORE success response as one P-DATA fragment encoded by
    :func:`store_success_command`; every other message goes through pynetdicom's ``send_msg``.

    Skipped for such responses: pynetdicom's EVT_DIMSE_SENT (NETRT's listener binds nothing to it)
    and its debug log line of the response.
    """
    dul = assoc.dul
    if not isinstance(dul, EventDrivenDUL):  # another pynetdicom: leave it all to pynetdicom
        return
    send_msg = assoc.dimse.send_msg

    def send(primitive: Any, context_id: int) -> None:
        command = None
        if (
            isinstance(primitive, C_STORE)
            and primitive.is_valid_response
            and primitive.Status == STATUS_SUCCESS
            and primitive.ErrorComment is None
            and primitive.OffendingElement is None
            and primitive.DataSet is None
        ):
            command = store_success_command(
                int(primitive.MessageIDBeingRespondedTo or 0),
                str(primitive.AffectedSOPClassUID or ""),
                str(primitive.AffectedSOPInstanceUID or ""),
            )
        limit = assoc.requestor.maximum_length or 0  # the peer's: what pynetdicom splits to
        if command is None or primitive.MessageIDBeingRespondedTo is None or (limit and len(command) + 7 > limit):
            send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list = [[context_id, b"\x03" + command]]  # command, last fragment
        dul.send_pdu(pdata)
        dul.message_queued()

    setattr(assoc.dimse, "send_msg", send)  # noqa: B010  (this association only)


@dataclass
class _AssociationInfo:
    """What one accepted association did, for the transaction log when it closes."""

    source_ip: str
    source_port: int
    calling_ae_title: str
    opened: float
    stored: Counter[str] = field(default_factory=Counter)
    refused: int = 0


def _not_a_uid(what: str, value: object) -> str:
    """Why a UID was refused, without repeating the value: it came from the sender and may hold anything."""
    text = "" if value is None else str(value)
    return f"{what} is not a valid DICOM UID ({len(text)} characters; digits and dots, max 64)"


class ListenerHandlers:
    """The event handlers bound to the SCP; one instance per listener."""

    def __init__(
        self,
        config: ListenerConfig,
        incoming_root: Path,
        tracker: StudyTracker,
        transactions: TransactionLog,
        label: Callable[[str], str],
        commitments_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.commitments_dir = commitments_dir  # storage commitment reports for waiting senders
        self.incoming_root = incoming_root
        self.tracker = tracker
        self.transactions = transactions
        self.label = label
        self._lock = threading.Lock()
        self._associations: dict[Association, _AssociationInfo] = {}
        self._allowed_titles = {t.strip() for t in config.allowed_calling_ae_titles}
        # Associations let in and not yet closed: the max_associations bound, taken under the lock
        # (requests arrive in parallel threads; counting established ones lets a burst through).
        self._slots: set[Association] = set()
        self._receiving: dict[Association, int] = {}  # data set bytes of the message being received

    def bindings(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_N_EVENT_REPORT, self.on_event_report),
            (evt.EVT_PDU_RECV, self.on_pdu_received),
            (evt.EVT_CONN_CLOSE, self.on_closed),
        ]

    # --- access control -------------------------------------------------------------------------

    def _reject(self, event: Event, calling: str, rsd: tuple[int, int, int], why: str) -> None:
        requestor = event.assoc.requestor
        LOGGER.warning(
            "association from %s:%s (calling AE %r) rejected: %s", requestor.address, requestor.port, calling, why
        )
        self.transactions.record("association_rejected", source_ip=requestor.address, source_ae=calling, reason=why)
        event.assoc.acse.send_reject(*rsd)
        # As pynetdicom does after its own rejections: wait until the DUL has sent the A-ASSOCIATE-RJ
        # (else the socket is closed under it and the peer sees an abort instead of the reason).
        event.assoc.kill()

    def on_requested(self, event: Event) -> None:
        """A-ASSOCIATE-RQ received: check network, calling AE, called AE and the association limit."""
        try:
            assoc = event.assoc
            requestor = assoc.requestor
            # requestor.ae_title is filled in only after this event; the request primitive has it.
            calling = str(getattr(requestor.primitive, "calling_ae_title", "") or "").strip()
            called = str(getattr(requestor.primitive, "called_ae_title", "") or "").strip()
            if not address_allowed(requestor.address, self.config.allowed_networks):
                self._reject(
                    event, calling, REJECT_NO_REASON, f"source address {requestor.address} is not in allowed_networks"
                )
            elif self._allowed_titles and calling not in self._allowed_titles:
                self._reject(event, calling, REJECT_CALLING_AE, f"calling AE title {calling!r} is not allowed")
            elif called != self.config.ae_title:
                why = f"called AE title {called!r} is not this node's {self.config.ae_title!r}"
                self._reject(event, calling, REJECT_CALLED_AE, why)
            else:
                with self._lock:
                    busy = len(self._slots) >= self.config.max_associations
                    if not busy:
                        self._slots.add(assoc)  # freed when its connection closes
                if busy:
                    self._reject(
                        event, calling, REJECT_BUSY, f"{self.config.max_associations} associations already active"
                    )
        except Exception:  # fail closed: an association whose check failed is not let in
            LOGGER.exception("access check of an association request failed; rejecting it")
            if not event.assoc.is_rejected:
                with contextlib.suppress(Exception):
                    event.assoc.acse.send_reject(*REJECT_NO_REASON)
                    event.assoc.kill()

    def on_tls_failure(self, host: str, why: str) -> None:
        LOGGER.warning("TLS handshake with %s failed: %s", host, why)
        self.transactions.record("association_rejected", source_ip=host, reason=f"TLS handshake failed: {why}")

    def on_accepted(self, event: Event) -> None:
        requestor = event.assoc.requestor
        info = _AssociationInfo(
            source_ip=str(requestor.address),
            source_port=int(requestor.port or 0),
            calling_ae_title=(requestor.ae_title or "").strip(),
            opened=time.monotonic(),
        )
        with self._lock:
            self._associations[event.assoc] = info
        LOGGER.info(
            "association accepted from %s:%s (calling AE %r)", info.source_ip, info.source_port, info.calling_ae_title
        )
        self.transactions.record("association_opened", source_ip=info.source_ip, source_ae=info.calling_ae_title)

    def on_closed(self, event: Event) -> None:
        """Connection closed: the association no longer holds a study open; log what it delivered."""
        try:
            self.tracker.sender_gone(event.assoc)
            with self._lock:
                self._slots.discard(event.assoc)
                self._receiving.pop(event.assoc, None)
                info = self._associations.pop(event.assoc, None)
            if info is None:
                return  # rejected, or closed before it was accepted
            for uid, count in sorted(info.stored.items()):
                self.transactions.record(
                    "instances_received",
                    study_instance_uid=self.label(uid),
                    source_ip=info.source_ip,
                    source_ae=info.calling_ae_title,
                    counts={"instances": count},
                )
            how = "aborted" if event.assoc.is_aborted else "released" if event.assoc.is_released else "closed"
            self.transactions.record(
                "association_closed",
                source_ip=info.source_ip,
                source_ae=info.calling_ae_title,
                how=how,
                counts={"stored": sum(info.stored.values()), "refused": info.refused, "studies": len(info.stored)},
                seconds=round(time.monotonic() - info.opened, 3),
            )
            LOGGER.info(
                "association from %s (calling AE %r) %s: %d instances stored, %d refused",
                info.source_ip,
                info.calling_ae_title,
                how,
                sum(info.stored.values()),
                info.refused,
            )
        except Exception:
            LOGGER.exception("bookkeeping of a closed association failed")

    # --- size limits ----------------------------------------------------------------------------

    def on_pdu_received(self, event: Event) -> None:
        """Count the data set bytes of the message being received; past the limit, stop keeping them.

        Runs in the association's reader thread before pynetdicom appends the PDU to the message.
        """
        items = getattr(event.pdu, "presentation_data_value_items", None)
        if not items:
            return
        assoc = event.assoc
        with self._lock:
            received = self._receiving.get(assoc, 0)
        for item in items:
            value = item.presentation_data_value or b""
            if not value:
                continue
            if value[0] & 0x01:  # a command fragment: a new message begins
                received = 0
            else:
                received += len(value) - 1
        with self._lock:
            self._receiving[assoc] = received
        if received > self.config.max_dataset_bytes:
            message = assoc.dimse.message
            if message is not None and not isinstance(message.data_set, OversizedDataSet):
                LOGGER.warning(
                    "C-STORE from %s: data set past listener.max_dataset_bytes (%d); discarding the rest",
                    assoc.requestor.address,
                    self.config.max_dataset_bytes,
                )
                message.data_set = OversizedDataSet(received)

    def on_oversized_pdu(self, assoc: Association, length: int) -> None:
        requestor = assoc.requestor
        why = f"PDU of {length} bytes is longer than this node accepts ({pdu_limit(self.config)})"
        LOGGER.warning("connection from %s closed: %s", requestor.address, why)
        self.transactions.record("association_aborted", source_ip=requestor.address, reason=why)

    # --- services -------------------------------------------------------------------------------

    def on_echo(self, event: Event) -> int:
        return STATUS_SUCCESS

    def on_store(self, event: Event) -> int | Dataset:
        """C-STORE: write the instance durably, then answer success; never raises."""
        try:
            result = self._store(event)
        except Exception as exc:  # a bug must cost one instance a failure status, not the association
            LOGGER.exception("C-STORE handler failed")
            result = failure(STATUS_PROCESSING_FAILURE, f"NETRT internal error: {type(exc).__name__}")
        if isinstance(result, Dataset):
            with self._lock:
                info = self._associations.get(event.assoc)
                if info is not None:
                    info.refused += 1
        return result

    def on_event_report(self, event: Event) -> tuple[int, None]:
        """A storage commitment report on a new association (netrt.commitment): recorded in the
        reports folder for the delivery waiting on it, then answered; never raises."""
        if self.commitments_dir is None:
            return 0x0110, None  # processing failure: this listener keeps no reports
        status, _ = answer_event_report(event, self.commitments_dir)
        try:
            requestor = event.assoc.requestor
            self.transactions.record(
                "commitment_report_received",
                source_ip=str(requestor.address),
                source_ae=(requestor.ae_title or "").strip(),
                status=f"0x{status:04X}",
            )
        except Exception:
            LOGGER.exception("transaction log entry of a storage commitment report failed")
        return status, None

    def _refuse(self, event: Event, status: int, why: str) -> Dataset:
        requestor = event.assoc.requestor
        LOGGER.warning(
            "C-STORE from %s (calling AE %r) refused with 0x%04X: %s",
            requestor.address,
            requestor.ae_title,
            status,
            why,
        )
        return failure(status, why)

    def _store_failed(self, event: Event, study_uid: str, exc: StoreError) -> Dataset:
        LOGGER.error("C-STORE from %s: study %s: %s", event.assoc.requestor.address, self.label(study_uid), exc)
        why = "out of disk space" if exc.out_of_resources else "write failed on the NETRT node"
        return failure(STATUS_OUT_OF_RESOURCES, f"cannot store: {why}")

    def _store(self, event: Event) -> int | Dataset:
        request = cast(C_STORE, event.request)
        if isinstance(request.DataSet, OversizedDataSet):
            return self._refuse(event, STATUS_OUT_OF_RESOURCES, "data set larger than listener.max_dataset_bytes")
        try:
            sop_uid = checked_uid(str(request.AffectedSOPInstanceUID or ""), "AffectedSOPInstanceUID")
        except UnsafeIdentifierError:
            return self._refuse(
                event, STATUS_SOP_UID_REFUSED, _not_a_uid("AffectedSOPInstanceUID", request.AffectedSOPInstanceUID)
            )
        try:
            dataset = event.dataset  # decoded lazily: only the two elements below are converted
            study, sop_in_dataset = dataset.get("StudyInstanceUID"), dataset.get("SOPInstanceUID")
        except Exception as exc:  # pydicom raises many types on garbage; all mean "cannot decode"
            return self._refuse(event, STATUS_CANNOT_DECODE, f"cannot decode the data set: {type(exc).__name__}")
        if study is None:
            return self._refuse(event, STATUS_STUDY_UID_REFUSED, "the data set has no StudyInstanceUID")
        try:
            study_uid = checked_uid(str(study), "StudyInstanceUID")
        except UnsafeIdentifierError:
            return self._refuse(event, STATUS_STUDY_UID_REFUSED, _not_a_uid("StudyInstanceUID", study))
        if sop_in_dataset is None:
            return self._refuse(event, STATUS_SOP_UID_REFUSED, "the data set has no SOPInstanceUID")
        if str(sop_in_dataset) != sop_uid:
            return self._refuse(
                event, STATUS_SOP_UID_REFUSED, "SOPInstanceUID of the data set differs from AffectedSOPInstanceUID"
            )
        assoc = event.assoc
        with self._lock:
            info = self._associations.get(assoc)
        calling = info.calling_ae_title if info is not None else (assoc.requestor.ae_title or "").strip()
        modality = STORAGE_SOP_CLASSES.get(str(request.AffectedSOPClassUID))
        # The file as pynetdicom's event.encoded_dataset() makes it, without its two copies of the
        # data set and its pydicom encoding of the file meta (listener.store.file_meta_prefix).
        prefix = file_meta_prefix(str(request.AffectedSOPClassUID), sop_uid, str(event.context.transfer_syntax))
        try:
            folder = self.tracker.begin_store(study_uid, assoc, assoc.is_alive)
        except StoreError as exc:
            return self._store_failed(event, study_uid, exc)
        stored = False
        try:
            if prefix is None:
                write_instance(folder, sop_uid, event.encoded_dataset())
            else:
                with cast(io.BytesIO, request.DataSet).getbuffer() as data_set:
                    write_instance(folder, sop_uid, prefix, data_set)
            stored = True
        except StoreError as exc:
            return self._store_failed(event, study_uid, exc)
        finally:
            self.tracker.end_store(study_uid, stored=stored, calling_ae_title=calling, modality=modality)
        if info is not None:
            with self._lock:
                info.stored[study_uid] += 1
        return STATUS_SUCCESS


def make_ae(config: ListenerConfig) -> AE:
    """The application entity with NETRT's presentation contexts and limits."""
    ae = AE(ae_title=config.ae_title)
    ae.maximum_pdu_size = config.max_pdu_size
    # Our EVT_REQUESTED handler rejects first, with a log line, counting the associations it let in.
    # pynetdicom's own limit counts every acceptor thread, including ones just released and still
    # ending; kept only as a backstop against a flood of connections that never finish negotiating.
    ae.maximum_associations = 2 * config.max_associations + 10
    ae.require_called_aet = True
    if config.allowed_calling_ae_titles:
        ae.require_calling_aet = list(config.allowed_calling_ae_titles)
    ae.add_supported_context(Verification)
    add_report_context(ae)  # storage commitment reports from destinations NETRT delivered to
    for sop_class in STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    return ae
