"""The keyed mappings of full anonymization: secret, UIDs, pseudonyms, date shifts, and text scrubbing.

Everything here is a pure function of the secret and the original value, so the same patient gets
the same pseudonym and date shift in every study and every run, the same UID maps to the same new
UID in every file that mentions it (references stay resolvable), and nobody without the secret can
recompute the mapping from a guessed name or UID (HMAC-SHA-256, not a bare hash).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from netrt.errors import AnonymizationError
from netrt.fileio import fsync_dir

SECRET_FILE_NAME = "secret.key"
SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
PSEUDONYM_HEX_DIGITS = 16
#: What :func:`scrub_text` puts where an identifier was.
REMOVED = "<removed>"
#: Identifiers shorter than this are never scrubbed (a one-letter initial would eat every word).
MIN_IDENTIFIER_LENGTH = 2
#: Identifiers at least this long are removed wherever they occur, shorter ones only as whole words.
SUBSTRING_IDENTIFIER_LENGTH = 5


def secret_path(secret_file: Path | None, data_dir: Path) -> Path:
    """Where the secret lives: the configured file, else ``<data_dir>/secret.key``."""
    return secret_file if secret_file is not None else data_dir / SECRET_FILE_NAME


def read_secret(path: Path) -> bytes:
    """The secret stored in ``path`` (hex digits, whitespace ignored)."""
    text = path.read_text(encoding="ascii", errors="replace")
    digits = "".join(text.split())
    try:
        secret = bytes.fromhex(digits)
    except ValueError:
        raise AnonymizationError(
            f"{path}: the anonymization secret must be hexadecimal digits (at least {2 * MIN_SECRET_BYTES})"
        ) from None
    if len(secret) < MIN_SECRET_BYTES:
        raise AnonymizationError(
            f"{path}: the anonymization secret holds {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed"
        )
    return secret


def create_secret(path: Path) -> bytes:
    """Create ``path`` with a new random secret (0600, fsync'd) unless another process just did; return it.

    The secret is written to a private temporary file first and hard-linked into place, so a
    concurrent reader sees either no file or the whole secret, and two processes racing to create
    it end up with the same one (the loser of the link reads the winner's file).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".secret-", suffix=".part", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(os.urandom(SECRET_BYTES).hex() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
        except OSError:
            # File systems without hard links: exclusive create is still atomic against a second creator.
            _create_exclusive(path, Path(temp).read_bytes())
    finally:
        Path(temp).unlink(missing_ok=True)
    fsync_dir(path.parent)
    return read_secret(path)


def _create_exclusive(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _keyed(secret: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(secret, f"{purpose}\x1f{value}".encode(), hashlib.sha256).digest()


def map_uid(uid: str, secret: bytes) -> str:
    """The UID that replaces ``uid``: ``2.25.<128-bit integer>`` from an HMAC of the UID (PS3.5 B.2).

    The 128 bits are given the version and variant bits of a UUID (version 4), so the result is
    a well-formed UUID-derived UID of at most 44 characters.
    """
    digest = _keyed(secret, "uid", uid.strip("\x00 "))
    return "2.25." + str(uuid.UUID(bytes=digest[:16], version=4).int)


def pseudonym(patient_key: str, secret: bytes, prefix: str) -> str:
    """``prefix`` + 16 upper-case hex digits keyed on the patient's identity."""
    return prefix + _keyed(secret, "pseudonym", patient_key).hex()[:PSEUDONYM_HEX_DIGITS].upper()


def date_shift_days(patient_key: str, secret: bytes, max_days: int) -> int:
    """Days (negative, 1..``max_days`` back) every date of this patient moves by."""
    number = int.from_bytes(_keyed(secret, "date-shift", patient_key)[:8], "big")
    return -(1 + number % max_days)


def identifier_pattern(identifiers: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive regex matching any of ``identifiers`` (longest first), or None if none qualifies.

    Identifiers of :data:`SUBSTRING_IDENTIFIER_LENGTH` characters or more match anywhere (``DOE``
    inside ``GTV_DOE`` is caught by the word rule, ``SMITHSON`` inside ``GTVSMITHSON`` by this one);
    shorter ones only where no letter or digit touches them, so the ID ``12`` does not eat ``2012``.
    """
    parts = []
    for ident in sorted({i.strip() for i in identifiers if i and i.strip()}, key=lambda s: (-len(s), s)):
        if len(ident) < MIN_IDENTIFIER_LENGTH:
            continue
        escaped = re.escape(ident)
        if len(ident) >= SUBSTRING_IDENTIFIER_LENGTH:
            parts.append(escaped)
        else:
            parts.append(rf"(?<![0-9A-Za-z]){escaped}(?![0-9A-Za-z])")
    if not parts:
        return None
    return re.compile("|".join(parts), re.IGNORECASE)


def scrub_text(text: str, identifiers: Iterable[str]) -> str:
    """``text`` with every occurrence of each identifier replaced by ``<removed>``.

    For error messages and log lines of studies anonymized in full or partial mode: pass the
    study's identifiers (:func:`netrt.anonymize.study_identifiers`: names and their parts, IDs,
    birth date in common spellings, original UIDs). Case-insensitive; see :func:`identifier_pattern`
    for which identifiers match inside words.
    """
    pattern = identifier_pattern(identifiers)
    if pattern is None:
        return text
    return pattern.sub(REMOVED, text)
