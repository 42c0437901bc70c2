"""Application log and transaction log, both under ``<data_dir>/logs/``.

The transaction log is the audit trail a hospital asks for: one JSON object per line for every
association, study and delivery (who sent what, where it went, when). It is appended and fsync'd
per record so that it survives a crash of the process that wrote it.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOGGER_NAME = "netrt"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def utc_now_iso() -> str:
    """The current time as UTC ISO 8601 with milliseconds and a Z suffix."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def setup_logging(log_file: Path, level: int = logging.INFO, console: bool = True) -> logging.Logger:
    """Send the ``netrt`` logger to a rotating file (and stderr); idempotent per file."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    target = str(log_file.resolve())
    if not any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=20 * 1024 * 1024, backupCount=10, encoding="utf-8"
        )
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)
    if console and not any(type(h) is logging.StreamHandler for h in logger.handlers):
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(stream)
    if console:
        # Our own console handler prints each line; Prefect's root console handler (configured as
        # soon as Prefect is imported, e.g. by `netrt serve`) would print it a second time.
        logger.propagate = False
    return logger


class TransactionLog:
    """Appends JSON lines: ``event``, ``time`` (UTC ISO 8601) and the given fields.

    Known fields: ``study_instance_uid``, ``source_ip``, ``source_ae``, ``destination``,
    ``counts``, ``flow_run_id``; None values are left out. Thread-safe within a process; lines are
    short single ``write`` calls on an O_APPEND file, so several processes may share it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"event": event, "time": utc_now_iso()}
        entry.update({k: v for k, v in fields.items() if v is not None})
        line = (json.dumps(entry, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        return entry

    def entries(self) -> list[dict[str, Any]]:
        """Every record so far (for tests and `netrt` reports); a torn last line is skipped."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
