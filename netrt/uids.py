"""DICOM UID checks and deterministic UID derivation.

A UID that reaches a file name comes from the network; the grammar check below is what keeps
``../../etc`` or a 2 kB string from ever becoming a path (PS3.5 9.1: digits and dots, no
leading zeros in a component, at most 64 characters).
"""

from __future__ import annotations

import hashlib
import re

from netrt.errors import UnsafeIdentifierError

_UID_GRAMMAR = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
MAX_UID_LENGTH = 64


def is_valid_uid(value: str) -> bool:
    return len(value) <= MAX_UID_LENGTH and bool(_UID_GRAMMAR.match(value))


def checked_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` when it is a grammatical UID, else raise naming ``what`` and the value."""
    text = str(value) if value is not None else ""
    if not is_valid_uid(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise UnsafeIdentifierError(f"{what} {shown!r} is not a valid DICOM UID (digits and dots, max 64)")
    return text


def derived_uid(*parts: str) -> str:
    """A UID under the ``2.25`` root derived from ``parts`` (PS3.5 B.2: UUID-derived UIDs).

    Same parts -> same UID, so processing a study twice yields the same output UIDs and a re-send
    overwrites instead of duplicating.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    # 128 bits as an unsigned integer, like a UUID; 2.25.<39 digits> fits in 64 characters.
    return "2.25." + str(int.from_bytes(digest[:16], "big"))
