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


class _Formatter(logging.Formatter):
    """NETRT's line format; a line logged inside a flow or task run also names that run (as Prefect does)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        if run and run != "<unknown>":
            head, sep, rest = text.partition(": ")
            return f"{head} [{run}]{sep}{rest}"
        return text


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
        handler.setFormatter(_Formatter(_FORMAT))
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


def _file_handler(log_file: Path) -> logging.Handler | None:
    target = str(log_file.resolve())
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        if getattr(handler, "baseFilename", None) == target:
            return handler
    return None


def app_log_file() -> Path | None:
    """The file the ``netrt`` logger writes to (set by :func:`setup_logging`), if any."""
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        name = getattr(handler, "baseFilename", None)
        if name:
            return Path(name)
    return None


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def route_library_logs(log_file: Path, *, verbose: bool) -> None:
    """Every library's log lines (Prefect's per-task INFO lines, their tracebacks, warnings) to ``log_file``.

    Call after the libraries configured their logging (Prefect does so when it is imported, replacing
    the root logger's handlers). The root logger, and every logger that does not pass its lines on to
    it (Prefect's internal one), get the ``netrt`` logger's file handler, so one file holds them all
    in order; unless ``verbose``, their console handlers are silenced, so a command's terminal shows
    only its own lines. Python warnings become log records.
    """
    netrt_logger = setup_logging(log_file, console=verbose)
    handler = _file_handler(log_file)
    if handler is None:  # setup_logging has just added it; never None here
        return
    netrt_logger.propagate = False  # its lines reach the file through its own handler
    loggers = [logging.getLogger()]
    loggers += [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger) and not logger.propagate and name != LOGGER_NAME
    ]
    for logger in loggers:
        consoles = [h for h in logger.handlers if _is_console(h)]
        if (logger is logging.getLogger() or consoles) and handler not in logger.handlers:
            logger.addHandler(handler)
        if not verbose:
            for console in consoles:
                console.setLevel(logging.CRITICAL + 1)
    logging.captureWarnings(True)


def log_unexpected(error: BaseException) -> Path:
    """Write ``error`` with its traceback to the app log (or, before one is set up, a temporary file); return where."""
    where = app_log_file()
    if where is not None:
        logging.getLogger(LOGGER_NAME).error("unexpected error", exc_info=error)
        return where
    import tempfile
    import traceback

    fd, name = tempfile.mkstemp(prefix="netrt-traceback-", suffix=".log")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(f"{utc_now_iso()} netrt: unexpected error\n")
        handle.write("".join(traceback.format_exception(error)))
    return Path(name)


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
