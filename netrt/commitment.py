"""Storage Commitment Push Model (PS3.4 Annex J): the request, the report, and where reports land.

After its C-STOREs a sender may ask the destination to take responsibility for the instances
(N-ACTION, Action Type 1, with a new Transaction UID per request). The destination answers the
N-ACTION at once and later sends an N-EVENT-REPORT (Event Type 1: all committed; 2: some failed,
each failed instance with a FailureReason), either on the same association (the requestor then
must have proposed the SCP role for the SOP class in role selection) or on a new association to
the requestor's AE title. NETRT accepts both:

- same association: :mod:`netrt.send` binds :func:`parse_report` to the requesting association;
- new association, NETRT's listener running (``netrt serve`` / ``netrt listener``): the listener
  accepts the Storage Commitment context and hands the N-EVENT-REPORT to
  :func:`answer_event_report`, which writes the report to ``<data_dir>/state/commitments/
  <TransactionUID>.json`` (fsync'd) before answering success; the waiting sender, another process,
  polls that folder;
- new association, no listener (``netrt process``): the sender runs a :class:`ReportReceiver` (a
  short-lived SCP on ``listener.host``:``listener.port`` with ``listener.ae_title``) while it
  waits. When the port is taken (the listener, or another sender's receiver, both of which write
  every report to the folder) it relies on the folder and tries to bind again while it waits.

Orthanc 1.10 sends its report on a new association, even when the same one would be allowed
(tests/test_storage_commitment.py establishes it), to the address its ``DicomModalities`` lists
for NETRT's AE title; it refuses the N-ACTION of an AE title not listed there.

This module is the domain side (pynetdicom only); the listener imports it, never the reverse.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from netrt.config import ListenerConfig
from netrt.errors import NetrtError, UnsafeIdentifierError
from netrt.fileio import atomic_write_bytes
from netrt.logs import utc_now_iso
from netrt.uids import checked_uid

if TYPE_CHECKING:  # pynetdicom is imported where it is used: the flow module imports ReportRoute only
    from pynetdicom import AE
    from pynetdicom.dimse_primitives import N_EVENT_REPORT
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

logger = logging.getLogger(__name__)

# PS3.4 J.3: the well-known SOP Instance of the Push Model, the action and event type ids.
STORAGE_COMMITMENT_SOP_CLASS = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
ACTION_REQUEST_COMMIT = 1
EVENT_ALL_COMMITTED = 1
EVENT_FAILURES_EXIST = 2

# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8) NETRT answers with.
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_NO_SUCH_EVENT_TYPE = 0x0113
STATUS_INVALID_ARGUMENT = 0x0115
STATUS_NO_SUCH_SOP_CLASS = 0x0118

# PS3.3 C.14.1.1 Failure Reason values, for messages.
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP class not supported",
    0x0119: "class / instance conflict",
    0x0131: "duplicate transaction UID",
}

# How often a waiting sender looks at the folder, and tries to bind a taken port again.
POLL_SECONDS = 0.02
REBIND_SECONDS = 0.5


class CommitmentError(NetrtError):
    """A storage commitment report is malformed, or cannot be recorded."""


def reports_folder(data_dir: Path | str) -> Path:
    """Where N-EVENT-REPORTs received on new associations are kept until their sender reads them."""
    return Path(data_dir) / "state" / "commitments"


@dataclass(frozen=True)
class ReportRoute:
    """Where a report on a new association reaches NETRT: the reports folder, and the listener's
    AE title, address and allowlists (for the short-lived receiver). Small and plain, so a flow
    can pass it to its delivery task."""

    reports_dir: str
    ae_title: str
    host: str
    port: int
    allowed_calling_ae_titles: tuple[str, ...] = ()
    allowed_networks: tuple[str, ...] = ()
    receiver: bool = True  # False: rely on a running listener (listener.tls is on; the receiver is plain TCP)

    @classmethod
    def from_listener(cls, data_dir: Path | str, listener: ListenerConfig) -> ReportRoute:
        return cls(
            reports_dir=str(reports_folder(data_dir)),
            ae_title=listener.ae_title,
            host=listener.host,
            port=listener.port,
            allowed_calling_ae_titles=tuple(listener.allowed_calling_ae_titles),
            allowed_networks=tuple(str(n) for n in listener.allowed_networks),
            receiver=not listener.tls.enabled,
        )

    def make_receiver(self) -> ReportReceiver | None:
        if not self.receiver:
            return None
        return ReportReceiver(
            Path(self.reports_dir),
            ae_title=self.ae_title,
            host=self.host,
            port=self.port,
            allowed_calling_ae_titles=self.allowed_calling_ae_titles,
            allowed_networks=[ip_network(n, strict=False) for n in self.allowed_networks],
        )

    def where(self) -> str:
        return f"AE {self.ae_title} at {self.host}:{self.port}"


def failure_reason_text(code: int | None) -> str:
    if code is None:
        return "no FailureReason given"
    name = FAILURE_REASONS.get(code)
    return f"FailureReason 0x{code:04X}" + (f" {name}" if name else "")


@dataclass(frozen=True)
class CommitmentReport:
    """One N-EVENT-REPORT of a storage commitment transaction.

    ``committed``: SOPInstanceUIDs the destination commits to keep; ``failed``: SOPInstanceUID ->
    FailureReason (None when the item had none); ``route``: how it came ("same association" or
    "new association from AE X at IP").
    """

    transaction_uid: str
    event_type: int
    committed: frozenset[str]
    failed: dict[str, int | None]
    route: str
    received_at: str = field(default_factory=utc_now_iso)

    def as_json(self) -> dict[str, Any]:
        return {
            "transaction_uid": self.transaction_uid,
            "event_type": self.event_type,
            "committed": sorted(self.committed),
            "failed": self.failed,
            "route": self.route,
            "received_at": self.received_at,
        }

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> CommitmentReport:
        failed = record.get("failed") or {}
        return cls(
            transaction_uid=str(record["transaction_uid"]),
            event_type=int(record["event_type"]),
            committed=frozenset(str(u) for u in record.get("committed", [])),
            failed={str(k): (None if v is None else int(v)) for k, v in failed.items()},
            route=str(record.get("route", "")),
            received_at=str(record.get("received_at", "")),
        )


def request_dataset(transaction_uid: str, instances: Iterable[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information: Transaction UID and (SOP class, SOP instance) references."""
    info = Dataset()
    info.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    info.ReferencedSOPSequence = items
    return info


def new_transaction_uid() -> str:
    return str(generate_uid())


def parse_report(event_type: int, info: Dataset | None, route: str) -> CommitmentReport:
    """A :class:`CommitmentReport` from an N-EVENT-REPORT's Event Type ID and Event Information.

    Raises :class:`CommitmentError` naming what is wrong (unknown event type, no or invalid
    Transaction UID, an item without a valid SOPInstanceUID).
    """
    if event_type not in (EVENT_ALL_COMMITTED, EVENT_FAILURES_EXIST):
        raise CommitmentError(f"storage commitment report with Event Type ID {event_type} (expected 1 or 2)")
    if info is None:
        raise CommitmentError("storage commitment report without Event Information")
    try:
        transaction = checked_uid(info.get("TransactionUID"), "TransactionUID")
        committed = frozenset(
            checked_uid(item.get("ReferencedSOPInstanceUID"), "ReferencedSOPSequence: ReferencedSOPInstanceUID")
            for item in info.get("ReferencedSOPSequence", [])
        )
        failed: dict[str, int | None] = {}
        for item in info.get("FailedSOPSequence", []):
            uid = checked_uid(item.get("ReferencedSOPInstanceUID"), "FailedSOPSequence: ReferencedSOPInstanceUID")
            reason = item.get("FailureReason")
            failed[uid] = None if reason is None else int(reason)
    except UnsafeIdentifierError as exc:
        raise CommitmentError(f"storage commitment report: {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:  # a garbled sequence or value
        raise CommitmentError(f"storage commitment report is malformed: {exc}") from exc
    return CommitmentReport(transaction, event_type, committed, failed, route)


def report_path(folder: Path, transaction_uid: str) -> Path:
    """``<folder>/<TransactionUID>.json``, the UID checked against the grammar first."""
    return folder / f"{checked_uid(transaction_uid, 'TransactionUID')}.json"


def record_report(folder: Path, report: CommitmentReport) -> Path:
    """Write ``report`` durably (temp file, fsync, rename, fsync of the folder); return its path."""
    target = report_path(folder, report.transaction_uid)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(target, (json.dumps(report.as_json(), indent=1) + "\n").encode("utf-8"))
    except OSError as exc:
        raise CommitmentError(f"cannot record the storage commitment report {target}: {exc.strerror or exc}") from exc


def read_report(folder: Path, transaction_uid: str) -> CommitmentReport | None:
    """The recorded report of ``transaction_uid``, or None when none has arrived (or it is unreadable)."""
    path = report_path(folder, transaction_uid)
    try:
        return CommitmentReport.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("%s: unreadable storage commitment report (%s)", path, exc)
        return None


def discard_report(folder: Path, transaction_uid: str) -> None:
    """Remove a report its sender has taken in (the progress file is the lasting record)."""
    report_path(folder, transaction_uid).unlink(missing_ok=True)


def answer_event_report(event: Event, folder: Path) -> tuple[int, None]:
    """N-EVENT-REPORT handler for reports on new associations: record, then answer; never raises.

    Success only once the report is on disk (a sender in another process reads it there); a
    malformed report or a write failure is answered with a failure status and logged.
    """
    try:
        request = cast("N_EVENT_REPORT", event.request)
        if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_SOP_CLASS:
            logger.warning("N-EVENT-REPORT for SOP class %s refused", request.AffectedSOPClassUID)
            return STATUS_NO_SUCH_SOP_CLASS, None
        requestor = event.assoc.requestor
        route = f"new association from AE {(requestor.ae_title or '').strip()!r} at {requestor.address}"
        event_type = int(request.EventTypeID or 0)
        if event_type not in (EVENT_ALL_COMMITTED, EVENT_FAILURES_EXIST):
            logger.warning("storage commitment report (%s) with Event Type ID %s refused", route, event_type)
            return STATUS_NO_SUCH_EVENT_TYPE, None
        report = parse_report(event_type, event.event_information, route)  # type: ignore[attr-defined]
        path = record_report(folder, report)
    except CommitmentError as exc:
        logger.warning("storage commitment report refused: %s", exc)
        return STATUS_INVALID_ARGUMENT, None
    except Exception:
        logger.exception("storage commitment report could not be handled")
        return STATUS_PROCESSING_FAILURE, None
    logger.info(
        "storage commitment report %s (%s): %d committed, %d failed; recorded in %s",
        report.transaction_uid,
        route,
        len(report.committed),
        len(report.failed),
        path,
    )
    return STATUS_SUCCESS, None


def add_report_context(ae: AE) -> None:
    """Let ``ae`` accept the Storage Commitment Push Model context a reporting peer proposes,
    with the peer as SCP of the SOP class (SCP/SCU role selection) or in the default roles."""
    ae.add_supported_context(STORAGE_COMMITMENT_SOP_CLASS, scu_role=True, scp_role=True)


def address_allowed(address: str, networks: Sequence[IPv4Network | IPv6Network]) -> bool:
    """Whether a peer address is inside one of ``networks`` (empty: every address), IPv4-mapped
    IPv6 addresses taken as IPv4 (the listener's and the report receiver's allowlist)."""
    if not networks:
        return True
    try:
        ip = ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


class ReportReceiver:
    """A short-lived SCP that takes N-EVENT-REPORTs on new associations for a waiting sender.

    It answers only to ``ae_title``, applies the listener's calling-AE and network allowlists,
    accepts only the Storage Commitment context, and records every report in ``folder`` (whoever
    waits for it). :meth:`try_start` returns False when the port is taken.
    """

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str,
        host: str,
        port: int,
        allowed_calling_ae_titles: Sequence[str] = (),
        allowed_networks: Sequence[IPv4Network | IPv6Network] = (),
    ) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self._titles = {t.strip() for t in allowed_calling_ae_titles}
        self._networks = list(allowed_networks)
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._server is not None

    def _on_requested(self, event: Event) -> None:
        try:
            requestor = event.assoc.requestor
            calling = str(getattr(requestor.primitive, "calling_ae_title", "") or "").strip()
            why = None
            if not address_allowed(requestor.address, self._networks):
                why = f"source address {requestor.address} is not in allowed_networks"
            elif self._titles and calling not in self._titles:
                why = f"calling AE title {calling!r} is not allowed"
            if why is not None:
                logger.warning("storage commitment receiver: association from %s refused: %s", requestor.address, why)
                event.assoc.acse.send_reject(0x01, 0x01, 0x03 if "AE title" in why else 0x01)
                event.assoc.kill()
        except Exception:
            logger.exception("storage commitment receiver: access check failed; rejecting")
            event.assoc.acse.send_reject(0x01, 0x01, 0x01)
            event.assoc.kill()

    def _on_report(self, event: Event) -> tuple[int, None]:
        return answer_event_report(event, self.folder)

    def try_start(self) -> bool:
        """Bind and serve; False (nothing started) when the address is taken or cannot be bound."""
        with self._lock:
            if self._server is not None:
                return True
            from pynetdicom import AE, evt

            ae = AE(ae_title=self.ae_title)
            ae.require_called_aet = True
            add_report_context(ae)
            try:
                server = ae.start_server(
                    (self.host, self.port),
                    block=False,
                    evt_handlers=[(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_N_EVENT_REPORT, self._on_report)],
                )
            except OSError as exc:
                logger.debug("storage commitment receiver: cannot bind %s:%d (%s)", self.host, self.port, exc)
                return False
            self._server = server
            logger.info("storage commitment receiver: AE %s on %s:%d", self.ae_title, self.host, self.port)
            return True

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()


class ReportBox:
    """Holds the reports that arrive on the requesting association (filled by pynetdicom's thread).

    A report is handed out only once NETRT's N-EVENT-REPORT response has been sent (``sent``,
    bound to EVT_DIMSE_SENT): otherwise the sender could release the association before the
    peer has its answer.
    """

    def __init__(self) -> None:
        self._reports: dict[str, CommitmentReport] = {}
        self._answering: list[CommitmentReport] = []
        self._lock = threading.Lock()

    def sent(self, event: Event) -> None:
        """EVT_DIMSE_SENT handler: a report whose response has gone out becomes available."""
        if type(event.message).__name__ != "N_EVENT_REPORT_RSP":  # type: ignore[attr-defined]
            return
        with self._lock:
            for report in self._answering:
                self._reports[report.transaction_uid] = report
            self._answering.clear()

    def handler(self, event: Event) -> tuple[int, None]:
        """EVT_N_EVENT_REPORT handler for the requesting association; never raises."""
        try:
            request = cast("N_EVENT_REPORT", event.request)
            if str(request.AffectedSOPClassUID) != STORAGE_COMMITMENT_SOP_CLASS:
                return STATUS_NO_SUCH_SOP_CLASS, None
            report = parse_report(
                int(request.EventTypeID or 0),
                event.event_information,  # type: ignore[attr-defined]
                "same association",
            )
        except CommitmentError as exc:
            logger.warning("storage commitment report on the requesting association refused: %s", exc)
            return STATUS_INVALID_ARGUMENT, None
        except Exception:
            logger.exception("storage commitment report on the requesting association could not be handled")
            return STATUS_PROCESSING_FAILURE, None
        with self._lock:
            self._answering.append(report)
        return STATUS_SUCCESS, None

    def get(self, transaction_uid: str) -> CommitmentReport | None:
        with self._lock:
            return self._reports.get(transaction_uid)


def wait_for_report(
    transaction_uid: str,
    timeout: float,
    *,
    box: ReportBox | None,
    folder: Path | None,
    receiver: ReportReceiver | None,
) -> CommitmentReport | None:
    """Wait up to ``timeout`` seconds for the report of ``transaction_uid`` in ``box`` (same
    association) or ``folder`` (new associations); keep trying to start ``receiver`` while its
    port is taken. None when no report came in time."""
    deadline = time.monotonic() + timeout
    next_bind = 0.0
    while True:
        report = box.get(transaction_uid) if box is not None else None
        if report is None and folder is not None:
            report = read_report(folder, transaction_uid)
        if report is not None:
            return report
        now = time.monotonic()
        if now >= deadline:
            return None
        if receiver is not None and not receiver.running and now >= next_bind:
            receiver.try_start()
            next_bind = now + REBIND_SECONDS
        time.sleep(min(POLL_SECONDS, max(0.0, deadline - now)))
