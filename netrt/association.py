"""Associations NETRT requests as a sender: sockets with TCP_NODELAY, and why one did not come up.

Why the socket details matter: without TCP_NODELAY, Nagle's algorithm and the peer's delayed ACK
hold back the last small segment of every C-STORE message, costing tens of milliseconds per
instance (measured here: 148 small files to Orthanc in 7.8 s without it, 0.85 s with it).
pynetdicom 3 has no public hook for socket options, so :class:`_NetrtAE` overrides its socket
factories (``_create_socket`` of the AE and of :class:`~pynetdicom.transport.AssociationSocket`;
pynetdicom is pinned to 3.x and a test checks the option on a live association) to hand pynetdicom
a socket with TCP_NODELAY that also records why a connection failed (pynetdicom only logs that),
so errors say "connection refused", "timed out" or which TLS check failed instead of a bare
"aborted". Used by :mod:`netrt.send` (C-STORE, C-ECHO, Storage Commitment).
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AddressInformation, AssociationSocket

from netrt.config import DicomDestination
from netrt.errors import DeliveryError
from netrt.reactor import make_event_driven, read_exactly

logger = logging.getLogger("netrt.send")

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 permanent, 2 transient; source 1 service user, 2 ACSE
# provider, 3 presentation provider; reasons of the service user.
_REJECTED_PERMANENT = 1
_SOURCE_SERVICE_USER = 1
_SOURCE_PRESENTATION = 3
_REASON_CALLING_AE = 3
_REASON_CALLED_AE = 7


@dataclass
class _Trace:
    """What happened on the wire, gathered from the socket and pynetdicom's ACSE events."""

    connect_error: OSError | None = None
    connected: bool = False
    response: A_ASSOCIATE | A_ABORT | A_P_ABORT | None = None
    rejection: A_ASSOCIATE | None = None
    peer_aborted: bool = False
    closed: bool = False
    tls_error: ssl.SSLError | None = None


def _ended(trace: _Trace) -> str:
    """Why an established association ended, as far as the wire tells."""
    if trace.peer_aborted or isinstance(trace.response, A_ABORT):
        return "the destination aborted the association"
    if trace.closed:
        return "the destination closed the connection"
    return "the association was aborted"


# --- sockets: TCP_NODELAY and the reason a connection failed ---------------------------------


class _TracedSocket(socket.socket):
    """A TCP socket that remembers why ``connect`` failed (pynetdicom catches and only logs it)."""

    trace: _Trace | None = None

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)
        except OSError as exc:
            if self.trace is not None:
                self.trace.connect_error = exc
            raise
        if self.trace is not None:
            self.trace.connected = True


def _traced_ssl_socket_class(trace: _Trace) -> type[ssl.SSLSocket]:
    """An SSLSocket class for one association's context (``SSLContext.sslsocket_class`` is made
    for this), so a TLS handshake or connect failure is recorded like a plain one."""

    class _TracedSSLSocket(ssl.SSLSocket):
        def connect(self, address: Any) -> None:
            try:
                super().connect(address)
            except OSError as exc:
                trace.connect_error = exc
                raise
            trace.connected = True

        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            # With TLS 1.3 a server's refusal of the client certificate arrives as an alert after
            # the handshake, on the first read; keep it so the error names it.
            try:
                return super().recv(buflen, flags)
            except ssl.SSLError as exc:
                trace.tls_error = exc
                raise

        def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
            # netrt.reactor.read_exactly reads PDUs with recv_into: the same record as recv.
            try:
                return super().recv_into(buffer, nbytes, flags)  # type: ignore[arg-type]
            except ssl.SSLError as exc:
                trace.tls_error = exc
                raise

    return _TracedSSLSocket


class _TracedAssociationSocket(AssociationSocket):
    def __init__(self, assoc: Association, address: AddressInformation, trace: _Trace) -> None:
        self._trace = trace
        super().__init__(assoc, address=address)

    def _create_socket(self, address: AddressInformation) -> socket.socket:
        """A bound, unconnected TCP socket with TCP_NODELAY, in the family of ``address``."""
        family = socket.AF_INET6 if address.is_ipv6 else socket.AF_INET
        sock = _TracedSocket(family, socket.SOCK_STREAM)
        sock.trace = self._trace
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.assoc.network_timeout is not None:
            sock.settimeout(self.assoc.network_timeout)
        sock.bind(address.as_tuple)
        self._is_connected = False
        return sock

    def recv(self, nr_bytes: int) -> bytearray:
        """A whole PDU (or its header) in one buffer, not in pynetdicom's 4 KiB steps."""
        return read_exactly(cast(socket.socket, self.socket), nr_bytes)


class _NetrtAE(AE):
    """An AE whose requested associations use :class:`_TracedAssociationSocket`."""

    def __init__(self, ae_title: str, trace: _Trace) -> None:
        super().__init__(ae_title=ae_title)
        self.trace = trace

    def _create_socket(
        self, assoc: Association, address: AddressInformation, tls_args: tuple[ssl.SSLContext, str] | None
    ) -> AssociationSocket:
        # pynetdicom's two association threads poll every 1 ms (its network thread whenever it
        # finds nothing to do: between the PDUs of one instance and while the response is due; and
        # send_c_store waits for the association thread's next turn); netrt.reactor makes both
        # wait on events instead. Called by AE.associate before the association starts.
        make_event_driven(assoc)
        sock = _TracedAssociationSocket(assoc, address, self.trace)
        sock.tls_args = tls_args
        return sock


# --- association -------------------------------------------------------------------------------


def _where(destination: DicomDestination) -> str:
    return f"{destination.ae_title}@{destination.host}:{destination.port}"


def _resolve(destination: DicomDestination) -> tuple[str, int, int]:
    """The destination's address as pynetdicom needs it: numeric, IPv4 or (address, flow, scope).

    pynetdicom picks the socket family by looking for '.' or ':' in the host string, which a host
    name like ``pacs`` defeats, so names are resolved here (and DNS failures named clearly).
    """
    try:
        infos = socket.getaddrinfo(destination.host, destination.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise DeliveryError(
            destination.name, f"destination unreachable: cannot resolve host {destination.host!r}: {exc}"
        ) from exc
    family, _, _, _, sockaddr = infos[0]
    parts: tuple[Any, ...] = tuple(sockaddr)
    if family == socket.AF_INET6:
        return (str(parts[0]), int(parts[2]), int(parts[3]))
    return (str(parts[0]), 0, 0)


def _tls_args(destination: DicomDestination, trace: _Trace) -> tuple[ssl.SSLContext, str] | None:
    tls = destination.tls
    if not tls.enabled:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
        context.check_hostname = tls.check_hostname
        if tls.certfile is not None and tls.keyfile is not None:
            context.load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise DeliveryError(
            destination.name, f"TLS set-up failed (tls.ca_file/certfile/keyfile): {exc}", retryable=False
        ) from exc
    context.sslsocket_class = _traced_ssl_socket_class(trace)
    return context, destination.host


def _not_established(destination: DicomDestination, trace: _Trace, calling_ae_title: str) -> DeliveryError:
    """The error for an association that did not come up, worded by cause, fatal or retryable."""
    where = _where(destination)
    name = destination.name
    timeout = destination.connect_timeout_seconds
    exc = trace.connect_error
    if exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return DeliveryError(
                name,
                f"TLS: the certificate of {where} was not accepted ({exc.verify_message}); "
                "check tls.ca_file / tls.check_hostname",
                retryable=False,
            )
        if isinstance(exc, ssl.SSLError):
            return DeliveryError(name, f"TLS handshake with {where} failed: {exc}", retryable=False)
        if isinstance(exc, TimeoutError):
            return DeliveryError(name, f"destination unreachable: no connection to {where} within {timeout:g} s")
        return DeliveryError(
            name, f"destination unreachable: cannot connect to {where}: {exc.strerror or exc}", retryable=True
        )
    if trace.tls_error is not None:
        return DeliveryError(
            name,
            f"TLS: {where} ended the connection ({trace.tls_error.reason or trace.tls_error}); "
            "does it require a client certificate (tls.certfile/keyfile) it trusts?",
            retryable=False,
        )
    response = trace.response
    rejection = trace.rejection
    if rejection is None and isinstance(response, A_ASSOCIATE) and response.result in (1, 2):
        rejection = response
    if rejection is not None:
        source, reason = rejection.result_source, rejection.diagnostic
        permanent = rejection.result == _REJECTED_PERMANENT and source != _SOURCE_PRESENTATION
        kind = "permanently" if permanent else "transiently"
        if source == _SOURCE_SERVICE_USER and reason == _REASON_CALLED_AE:
            detail = (
                f"{destination.host}:{destination.port} does not answer to the called AE title "
                f"{destination.ae_title!r} (association rejected {kind}: called AE title not recognised); "
                "check the destination's ae_title"
            )
        elif source == _SOURCE_SERVICE_USER and reason == _REASON_CALLING_AE:
            detail = (
                f"{where} does not accept NETRT's calling AE title {calling_ae_title!r} (association rejected "
                f"{kind}: calling AE title not recognised); register it at the destination or set calling_ae_title"
            )
        else:
            detail = f"association rejected {kind} by {where}: {rejection.reason_str} ({rejection.source_str})"
        return DeliveryError(name, detail, retryable=not permanent)
    if isinstance(response, A_ASSOCIATE) and response.result == 0:
        return DeliveryError(
            name,
            f"{where} accepted none of the proposed presentation contexts (SOP class and transfer syntax); "
            "configure the destination to accept them",
            retryable=False,
        )
    if trace.peer_aborted or isinstance(response, A_ABORT | A_P_ABORT):
        return DeliveryError(name, f"association aborted by {where} while it was being negotiated")
    if trace.connected:
        return DeliveryError(
            name, f"no answer from {where} to the association request within {destination.acse_timeout_seconds:g} s"
        )
    return DeliveryError(name, f"destination unreachable: no association with {where}")


def _associate(
    destination: DicomDestination,
    calling_ae_title: str,
    contexts: list[PresentationContext],
    *,
    roles: Sequence[SCP_SCU_RoleSelectionNegotiation] = (),
    handlers: Sequence[tuple[Any, Any]] = (),
) -> tuple[Association, _Trace]:
    """An established association, or the DeliveryError saying why not."""
    trace = _Trace()
    address = _resolve(destination)
    ae = _NetrtAE(calling_ae_title, trace)
    ae.connection_timeout = destination.connect_timeout_seconds
    ae.acse_timeout = destination.acse_timeout_seconds
    ae.dimse_timeout = destination.dimse_timeout_seconds
    ae.network_timeout = destination.network_timeout_seconds

    def on_acse(event: Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        if isinstance(primitive, A_ASSOCIATE | A_ABORT | A_P_ABORT):
            trace.response = primitive

    def on_pdu(event: Event) -> None:
        # Recorded as the DUL thread decodes the PDU: under load pynetdicom's requesting thread can
        # find the connection already closed after an A-ASSOCIATE-RJ and give up without reading
        # the rejection, so EVT_ACSE_RECV alone would miss why.
        pdu = event.pdu  # type: ignore[attr-defined]
        if isinstance(pdu, A_ASSOCIATE_RJ):
            trace.rejection = pdu.to_primitive()
        elif isinstance(pdu, A_ABORT_RQ):
            trace.peer_aborted = True

    def on_close(event: Event) -> None:
        trace.closed = True

    addr: str | tuple[str, int, int] = address if ":" in address[0] else address[0]
    assoc = ae.associate(
        addr,
        destination.port,
        contexts=contexts,
        ae_title=destination.ae_title,
        max_pdu=destination.max_pdu_size,
        tls_args=_tls_args(destination, trace),
        ext_neg=list(roles) or None,
        evt_handlers=[
            (evt.EVT_ACSE_RECV, on_acse),
            (evt.EVT_PDU_RECV, on_pdu),
            (evt.EVT_CONN_CLOSE, on_close),
            *handlers,
        ],
    )
    if not assoc.is_established:
        raise _not_established(destination, trace, calling_ae_title)
    _keep_responses_for_the_sender(assoc)
    return assoc, trace


def _keep_responses_for_the_sender(assoc: Association) -> None:
    """Hand back to the waiting ``send_*`` call any DIMSE response pynetdicom's reactor takes.

    pynetdicom 3's association reactor pauses for ``send_c_store`` through a flag that is briefly
    true while the reactor passes a checkpoint that was still open; a sender that looks in that
    instant goes on, and the reactor can then take the response off the queue the sender waits on,
    drop it ("Received unexpected C-STORE service message") and leave the sender to the DIMSE
    timeout. Seen here under load about once in 40 deliveries of 148 instances. As the requestor
    NETRT serves no requests, so any response the reactor gets is put back where the sender waits.
    """
    serve_request = assoc._serve_request

    def serve_or_hand_back(msg: Any, context_id: int) -> None:
        if msg.is_valid_response:
            logger.debug("a %s taken by pynetdicom's reactor is handed back to the sender", msg.msg_type)
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve_request(msg, context_id)

    setattr(assoc, "_serve_request", serve_or_hand_back)  # noqa: B010  (an instance attribute, on purpose)
