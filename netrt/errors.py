"""One exception tree for everything NETRT refuses or fails at.

Every message names what is at fault (a file, a DICOM tag, an ROI, a config key) so that a
physicist reading a quarantine reason or a CLI error knows where to look without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class NetrtError(Exception):
    """Base of every error NETRT raises on purpose."""


class ConfigError(NetrtError):
    """The configuration file or environment is invalid; the message lists every bad key path."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = problems or []


class DicomInputError(NetrtError):
    """A received or loaded DICOM file cannot be used as it is.

    ``path`` and ``tag`` are kept as attributes so callers (quarantine reasons, run summaries)
    can report them without parsing the message.
    """

    def __init__(self, reason: str, path: Path | str | None = None, tag: str | None = None) -> None:
        parts = []
        if path is not None:
            parts.append(str(path))
        if tag is not None:
            parts.append(tag)
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)
        self.path = Path(path) if path is not None else None
        self.tag = tag
        self.reason = reason


class StudyValidationError(DicomInputError):
    """A study is incomplete or inconsistent (missing references, mixed geometry, ...)."""


class RoiError(NetrtError):
    """An ROI of an RTSTRUCT cannot be turned into a mask."""

    def __init__(self, roi_name: str, reason: str) -> None:
        super().__init__(f"ROI {roi_name!r}: {reason}")
        self.roi_name = roi_name
        self.reason = reason


class UnsafeIdentifierError(NetrtError):
    """A UID or name that was to become part of a file path fails its grammar check."""


class DeliveryError(NetrtError):
    """Sending a study to a destination failed; ``retryable`` says whether waiting may help.

    ``stored`` and ``earlier`` count what the destination did acknowledge before the failure, in
    this run and in earlier runs of the same delivery episode (None where nothing was counted), so
    a report of a failed delivery can still say truthfully what did arrive.
    """

    def __init__(
        self,
        destination: str,
        reason: str,
        retryable: bool = True,
        *,
        stored: int | None = None,
        earlier: int | None = None,
    ) -> None:
        super().__init__(f"destination {destination!r}: {reason}")
        self.destination = destination
        self.reason = reason
        self.retryable = retryable
        self.stored = stored
        self.earlier = earlier


class StudyFailedError(NetrtError):
    """A study's flow run failed for good; the study is in quarantine under ``quarantine_id``.

    The message is already free of patient data (it is what the flow run, the CLI and the
    transaction log show), and the original exception is deliberately not chained to it.
    """

    def __init__(self, message: str, stage: str, quarantine_id: str | None, retryable: bool) -> None:
        super().__init__(message)
        self.stage = stage
        self.quarantine_id = quarantine_id
        self.retryable = retryable


class AnonymizationError(NetrtError):
    """A study cannot be anonymized as configured (unreadable secret, a tag that may not be removed, ...).

    In full mode the message never carries a patient's name, ID or birth date or an original UID.
    """


class ScrubbedError(NetrtError):
    """An error that is not NETRT's own, its text scrubbed of patient data; ``retryable`` as for the
    original (an OSError may heal by waiting)."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable
