"""The listener as one service: recovery, the SCP, study completion, and a clean stop.

``netrt serve`` (and ``netrt listener``) build a :class:`ListenerService` with a ``trigger``
callback that creates the flow run of a sealed study; the listener itself never imports Prefect or
``flows/``. Start order matters for "nothing lost": recovery runs before the port is opened, so a
study left by a crash is known before a sender can add to it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import cast

from pynetdicom import AE

from listener.completion import RunPendingFn, StudyTracker, TriggerFn
from listener.scp import (
    ListenerError,
    ListenerHandlers,
    NetrtAssociationServer,
    build_ssl_context,
    make_ae,
    pdu_limit,
)
from netrt.anonymize import load_or_create_secret, public_study_uid
from netrt.commitment import reports_folder
from netrt.config import NetrtConfig
from netrt.layout import DataLayout
from netrt.logs import TransactionLog

LOGGER = logging.getLogger("netrt.listener")

# On SIGTERM: associations get this long to end by themselves, then are aborted; stores already
# being written always finish (their files are durable) before the process exits.
SHUTDOWN_GRACE_SECONDS = 5.0
IN_FLIGHT_WAIT_SECONDS = 30.0


def study_label(config: NetrtConfig, layout: DataLayout) -> Callable[[str], str]:
    """How a StudyInstanceUID appears in logs: the public UID (mapped in full anonymization mode).

    The folder names under the data dir keep the UID as received; that is the layout contract.
    """
    anonymization = config.anonymization
    secret = load_or_create_secret(anonymization, layout.root) if anonymization.enabled else b""

    def label(uid: str) -> str:
        return public_study_uid(uid, anonymization, secret)

    return label


class ListenerService:
    """The DICOM listener of one NETRT node."""

    def __init__(
        self,
        config: NetrtConfig,
        *,
        trigger: TriggerFn,
        is_run_pending: RunPendingFn | None = None,
    ) -> None:
        self.config = config
        self.layout = DataLayout.from_data_dir(config.paths.data_dir).create()
        self.transactions = TransactionLog(self.layout.transaction_log)
        self.label = study_label(config, self.layout)
        self.tracker = StudyTracker(
            self.layout,
            idle_seconds=config.listener.study_idle_seconds,
            trigger=trigger,
            transactions=self.transactions,
            is_run_pending=is_run_pending,
            label=self.label,
        )
        self.handlers = ListenerHandlers(
            config.listener,
            self.layout.incoming,
            self.tracker,
            self.transactions,
            self.label,
            commitments_dir=reports_folder(self.layout.root),
        )
        self._ssl_context = build_ssl_context(config.listener.tls)
        self._ae: AE | None = None
        self._server: NetrtAssociationServer | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the SCP listens on."""
        if self._server is None:
            raise ListenerError("the listener is not running")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Recover what a previous run left, open the port, start completion tracking."""
        if self._server is not None:
            return
        self.tracker.recover()
        listener = self.config.listener
        self._ae = make_ae(listener)
        try:
            server = self._ae.make_server(
                (listener.host, listener.port),
                evt_handlers=self.handlers.bindings(),
                server_class=NetrtAssociationServer,
                tls_context=self._ssl_context,
                on_tls_failure=self.handlers.on_tls_failure,
                max_pdu_bytes=pdu_limit(listener),
                on_oversized_pdu=self.handlers.on_oversized_pdu,
            )
        except OSError as exc:
            raise ListenerError(
                f"cannot listen on {listener.host}:{listener.port} ({exc.strerror or exc}); "
                "is another NETRT or DICOM node using listener.port?"
            ) from exc
        self._server = cast(NetrtAssociationServer, server)
        # As AE.start_server does: the AE knows its servers (AssociationServer.shutdown removes it).
        self._ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="netrt-dicom-accept", daemon=True).start()
        self.tracker.start()
        host, port = self.address
        tls = " over TLS" if self._ssl_context is not None else ""
        LOGGER.info("DICOM listener: AE %s on %s:%d%s", listener.ae_title, host, port, tls)
        self.transactions.record("listener_started", ae_title=listener.ae_title, host=host, port=port)

    def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, let associations end (abort them after ``grace``), finish in-flight stores."""
        server = self._server
        if server is None:
            return
        self._server = None
        self.tracker.pause_sealing()
        server.shutdown()  # no new associations from here on
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and server.active_associations:
            time.sleep(0.05)
        remaining = server.active_associations
        for assoc in remaining:
            LOGGER.warning("aborting the association from %s at shutdown", assoc.requestor.address)
            assoc.abort()
        deadline = time.monotonic() + IN_FLIGHT_WAIT_SECONDS
        while time.monotonic() < deadline and self.tracker.in_flight():
            time.sleep(0.02)
        self.tracker.stop()
        LOGGER.info("DICOM listener stopped")
        self.transactions.record("listener_stopped", aborted_associations=len(remaining) or None)

    def __enter__(self) -> ListenerService:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
