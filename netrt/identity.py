"""A DICOM file's identity (file meta, study, series and SOP instance UIDs) from its first bytes.

Why not pydicom: delivering a study to a folder names every file by its Study, Series and SOP
Instance UID, and sending one needs its SOP class and transfer syntax. pydicom parses every element
up to the ones asked for (``dcmread(..., specific_tags=...)``: 0.3-0.5 ms a file, 1.2 s of
delivering the 2449 files of a 512x512x200 study with overlay, SEG and colour series under a
profiler). Walking the element headers of an Explicit VR Little Endian data set (what NETRT
writes, and what most senders send) takes 0.06 ms for a phantom CT file against pydicom's 0.3 ms
(measured on this 2-core machine). Anything else (another transfer syntax, a header longer than
what was read, an odd element) gives None, and the caller reads the file with pydicom: this module
only answers when the bytes leave no doubt. ``tests/test_identity.py`` compares it with pydicom on
every kind of file NETRT writes and on damaged ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

#: How much of a file is read: the header of a CT slice or a derived file is a few KiB; a header
#: longer than this (big private sequences before group 0020) is read by pydicom.
HEAD_BYTES = 65536

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"

#: VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD

_STUDY, _SERIES, _SOP = 0x0020000D, 0x0020000E, 0x00080018


class _Unsure(Exception):
    """The bytes do not settle it: the caller falls back to pydicom."""


def parse_file_meta(head: bytes) -> tuple[str, str, str] | None:
    """(MediaStorageSOPClassUID, MediaStorageSOPInstanceUID, TransferSyntaxUID) from the first bytes
    of a DICOM Part 10 file (preamble, ``DICM``, group 0002 in explicit VR little endian), as
    pydicom reads them; None when anything does not fit (then pydicom reads the file meta)."""
    parsed = _file_meta(head)
    return None if parsed is None else parsed[0]


def _file_meta(head: bytes) -> tuple[tuple[str, str, str], int] | None:
    """:func:`parse_file_meta` and the offset where the data set starts."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    found: dict[int, bytes] = {}
    position = 132
    while position + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, position)
        if group != 0x0002:
            break
        vr = head[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if position + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<I", head, position + 8)
            start = position + 12
        else:
            (length,) = struct.unpack_from("<H", head, position + 6)
            start = position + 8
        end = start + length
        if length == _UNDEFINED or end > len(head):
            return None
        found[element] = head[start:end]
        position = end
    try:
        values = tuple(found[element].rstrip(b"\x00 ").decode("ascii") for element in (0x0002, 0x0003, 0x0010))
    except (KeyError, UnicodeDecodeError):
        return None
    if not all(values) or position + 8 > len(head):  # group 0002 may go on past what was read
        return None
    return (values[0], values[1], values[2]), position


@dataclass(frozen=True)
class FileIdentity:
    """What delivery needs to know of a file, as pydicom would read it."""

    sop_class_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


def read_identity(path: Path) -> FileIdentity | None:
    """The identity of the Part 10 file at ``path`` from its first :data:`HEAD_BYTES`; None when the
    file is not Explicit VR Little Endian or its header does not settle it (read it with pydicom).

    The SOP Instance UID is the data set's own (0008,0018), the one pydicom gives as
    ``SOPInstanceUID``. All three must stand in tag order before the first element after
    (0020,000E); anything else is left to pydicom.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        head = handle.read(HEAD_BYTES)
    meta = _file_meta(head)
    if meta is None or meta[0][2] != EXPLICIT_VR_LITTLE_ENDIAN:
        return None
    (sop_class, _, syntax), start = meta
    try:
        values = _top_level_uids(head, start)
    except (_Unsure, struct.error, UnicodeDecodeError):
        return None
    return FileIdentity(sop_class, syntax, values[_STUDY], values[_SERIES], values[_SOP])


def _top_level_uids(head: bytes, position: int) -> dict[int, str]:
    """Study, Series and SOP Instance UID of the data set starting at ``position``, stopping after
    (0020,000E); raises :class:`_Unsure` when the header runs past ``head`` or looks wrong."""
    found: dict[int, str] = {}
    previous = -1
    while True:
        if position + 8 > len(head):
            raise _Unsure  # the data set goes on past what was read
        tag, vr, length, value_start = _element_header(head, position)
        if tag <= previous or tag >> 16 == 0xFFFE:
            raise _Unsure  # tags out of order or a stray delimiter: not a plain data set
        if tag > _SERIES:
            if len(found) < 3:
                raise _Unsure  # one is missing here, or sits out of order further on (pydicom finds it)
            return found
        previous = tag
        if length == _UNDEFINED:
            if vr != b"SQ":
                raise _Unsure  # (UN of undefined length holds implicit VR items: pydicom's job)
            position = _skip_undefined_sequence(head, value_start, depth=0)
            continue
        end = value_start + length
        if end > len(head):
            raise _Unsure
        if tag in (_STUDY, _SERIES, _SOP):
            if vr != b"UI":
                raise _Unsure
            found[tag] = head[value_start:end].rstrip(b"\x00 ").decode("ascii")
        position = end


def _element_header(head: bytes, position: int) -> tuple[int, bytes, int, int]:
    """(tag, VR, value length, value offset) of the explicit VR little endian element at ``position``."""
    group, element = struct.unpack_from("<HH", head, position)
    tag = group << 16 | element
    vr = head[position + 4 : position + 6]
    if vr in _LONG_VRS:
        if position + 12 > len(head):
            raise _Unsure
        (length,) = struct.unpack_from("<I", head, position + 8)
        return tag, vr, length, position + 12
    if not (vr.isalpha() and vr.isupper()):
        raise _Unsure  # not an explicit VR
    (length,) = struct.unpack_from("<H", head, position + 6)
    return tag, vr, length, position + 8


def _delimiter(head: bytes, position: int) -> tuple[int, int]:
    """(tag, length) of an item or delimiter header (no VR) at ``position``."""
    if position + 8 > len(head):
        raise _Unsure
    group, element, length = struct.unpack_from("<HHI", head, position)
    return group << 16 | element, length


def _skip_undefined_sequence(head: bytes, position: int, depth: int) -> int:
    """The offset after the sequence delimiter of an undefined-length sequence whose items start at
    ``position`` (items of defined or undefined length, nested sequences included)."""
    if depth > 16:
        raise _Unsure
    while True:
        tag, length = _delimiter(head, position)
        position += 8
        if tag == _SEQUENCE_END:
            return position
        if tag != _ITEM:
            raise _Unsure
        if length != _UNDEFINED:
            position += length
            continue
        while True:  # the elements of an undefined-length item, up to its delimiter
            tag, length = _delimiter(head, position)
            if tag == _ITEM_END:
                position += 8
                break
            tag, vr, length, value_start = _element_header(head, position)
            if length == _UNDEFINED:
                if vr != b"SQ":
                    raise _Unsure
                position = _skip_undefined_sequence(head, value_start, depth + 1)
            else:
                position = value_start + length
