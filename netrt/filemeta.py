"""The start of a DICOM file (preamble, ``DICM``, File Meta Information) encoded without pydicom.

Every file NETRT writes or receives starts with the same six-element group 0002: version, SOP
class, SOP instance, transfer syntax, implementation class UID and version name. pydicom builds and
writes a FileMetaDataset for it at about 0.3-0.7 ms a file (``write_file_meta_info`` was the
largest entry of writing a reformatted series, ``bench/profiles/coronal.txt``); the listener
receives and the writers write hundreds of files per study. The bytes here are the ones pydicom
writes for the same values (``write_file_meta_info(..., enforce_standard=True)``):
``tests/test_filemeta.py`` compares the two, and callers fall back to pydicom for anything else.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

#: A UID as the standard allows it (digits and dots, at most 64 characters); anything else is
#: left to pydicom, which writes what it is given.
_UID = re.compile(r"[0-9.]{1,64}")
_TEXT = re.compile(r"[\x20-\x7e]{0,16}")

PREAMBLE = b"\x00" * 128 + b"DICM"


def _element(tag: bytes, vr: bytes, value: bytes) -> bytes:
    return tag + vr + len(value).to_bytes(2, "little") + value


def file_meta_bytes(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax_uid: str,
    implementation_class_uid: str,
    implementation_version_name: str,
    *,
    preamble: bool = True,
) -> bytes | None:
    """Preamble and ``DICM`` (unless ``preamble`` is False) and the File Meta Information group.

    None when a UID is not a UID or the version name is not short printable text: the caller then
    lets pydicom encode what it was given.
    """
    uids = (sop_class_uid, sop_instance_uid, transfer_syntax_uid, implementation_class_uid)
    if not all(_UID.fullmatch(uid) for uid in uids) or not _TEXT.fullmatch(implementation_version_name):
        return None
    parts = [b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"]  # (0002,0001) version 00 01
    for element, uid in zip((b"\x02\x00", b"\x03\x00", b"\x10\x00", b"\x12\x00"), uids, strict=True):
        raw = uid.encode("ascii")
        parts.append(_element(b"\x02\x00" + element, b"UI", raw + b"\x00" * (len(raw) % 2)))
    if implementation_version_name:
        raw = implementation_version_name.encode("ascii")
        parts.append(_element(b"\x02\x00\x13\x00", b"SH", raw + b" " * (len(raw) % 2)))
    body = b"".join(parts)
    group = b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little") + body
    return PREAMBLE + group if preamble else group


#: The elements :func:`file_meta_bytes` writes, by tag (besides the group length).
_WRITTEN = {0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013}


def encode_file_meta(meta: Dataset, *, preamble: bool = True) -> bytes | None:
    """:func:`file_meta_bytes` of a File Meta Information data set holding exactly those elements
    (the version, if present, 00 01; a non-empty version name); None for anything else."""
    keys = {int(tag) for tag in meta.keys()} - {0x00020000}  # noqa: SIM118 (iterating a Dataset gives elements)
    if not keys <= _WRITTEN or not _WRITTEN - {0x00020001} <= keys:
        return None
    if 0x00020001 in keys and bytes(meta[0x00020001].value) != b"\x00\x01":
        return None
    texts = [str(meta[tag].value or "") for tag in (0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013)]
    if not texts[4]:
        return None
    return file_meta_bytes(*texts, preamble=preamble)
