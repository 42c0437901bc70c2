"""A real pynetdicom storage SCP on 127.0.0.1 for tests that need a destination which misbehaves
on cue (refuses the first N associations' stores with 0xA700, out of resources), which Orthanc
cannot be told to do. It stores nothing on disk; it records what it acknowledged."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .conftest import free_port


@dataclass
class StoreRecorder:
    port: int
    ae_title: str
    fail_first_associations: int = 0
    associations: int = 0
    stored: dict[str, int] = field(default_factory=dict)  # SOPInstanceUID -> times acknowledged
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_open(self, event: Any) -> None:
        with self.lock:
            self.associations += 1

    def _on_store(self, event: Any) -> int:
        with self.lock:
            failing = self.associations <= self.fail_first_associations
            if failing:
                self.refused += 1
                return 0xA700
            uid = str(event.request.AffectedSOPInstanceUID)
            self.stored[uid] = self.stored.get(uid, 0) + 1
        return 0x0000


@contextmanager
def store_scp(
    ae_title: str = "TESTPACS", fail_first_associations: int = 0, port: int | None = None
) -> Iterator[StoreRecorder]:
    """Run the SCP for the duration of the block; yields its recorder (port, counts)."""
    recorder = StoreRecorder(port or free_port(), ae_title, fail_first_associations)
    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    handlers = [(evt.EVT_C_STORE, recorder._on_store), (evt.EVT_ESTABLISHED, recorder._on_open)]
    server = ae.start_server(("127.0.0.1", recorder.port), block=False, evt_handlers=handlers)
    try:
        yield recorder
    finally:
        server.shutdown()
