"""What full and partial anonymization do to one pydicom dataset (in place, on a copy the caller owns).

Full mode walks every element, nested sequences included, and applies the action Table E.1-1
(:mod:`netrt.anonymize.table`) gives its tag, after the selected options:

* an option column that says C (clean) wins over one that says K (keep), and either replaces the
  Basic Profile action: with both Retain Device Identity and Modified Dates, a calibration date is
  shifted rather than kept as it was;
* a compound action (X/Z, X/D, Z/D, X/Z/D, X/Z/U*) becomes the mildest action the IOD allows at the
  element's place: X where the attribute is Type 3 or not part of the IOD, Z where it is Type 2,
  D (or U) where it is Type 1. For a SOP class the PS3.3 tables do not know, the element is kept
  present (Z, else D), which is valid whatever its type;
* D writes a dummy value of the element's VR (``ANONYMIZED``, ``19000101``, ``0``); a D or U on a UID
  writes the keyed mapping of the UID instead; D, K, C and U on a sequence keep it and clean its items;
* C shifts dates (DA, DT) by the patient's keyed offset (Modified Dates), keeps times of day (a
  whole-day shift leaves them valid), and removes the study's identifiers (names, IDs, dates) from text;
* UIDs are mapped only where the table says U (or D); UIDs under the DICOM root ``1.2.840.10008``
  (SOP classes, transfer syntaxes, well-known frames of reference) are never changed;
* private attributes are removed unless listed as safe; group lengths are removed (they would lie).
"""

from __future__ import annotations

import datetime
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_has_tag, dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import MAX_VALUE_LEN

from netrt.anonymize.keys import map_uid
from netrt.anonymize.table import AttributeType, Option, ProfileTable, describe_tag
from netrt.errors import AnonymizationError

DICOM_ROOT = "1.2.840.10008."
#: What cleaned text gets where an identifier was (short: SH and AE values hold 16 characters).
CLEANED = "***"
TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
DATE_VRS = frozenset({"DA", "DT"})
STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_DUMMY_TEXT = "ANONYMIZED"
_DUMMIES: dict[str, Any] = {
    "AE": _DUMMY_TEXT,
    "AS": "000Y",
    "CS": _DUMMY_TEXT,
    "DA": "19000101",
    "DS": "0",
    "DT": "19000101000000",
    "IS": "0",
    "LO": _DUMMY_TEXT,
    "LT": _DUMMY_TEXT,
    "PN": _DUMMY_TEXT,
    "SH": _DUMMY_TEXT,
    "ST": _DUMMY_TEXT,
    "TM": "000000",
    "UC": _DUMMY_TEXT,
    "UR": "urn:netrt:anonymized",
    "UT": _DUMMY_TEXT,
    "FD": 0.0,
    "FL": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
    "AT": 0,
}
# Compound action -> the order in which its alternatives are tried, by attribute type.
_REQUIRED_WITH_VALUE = ("D", "U", "Z", "X")
_REQUIRED_MAY_BE_EMPTY = ("Z", "D", "U", "X")
_OPTIONAL = ("X", "Z", "D", "U")

TypeLookup = Mapping[tuple[str, ...], AttributeType] | None
# Private tags kept: (group, element byte, private creator).
SafePrivate = frozenset[tuple[int, int, str]]


def _tags(ds: Dataset) -> list[BaseTag]:
    """The tags of ``ds`` in order, without decoding any element (iterating a Dataset decodes them all)."""
    return [Tag(elem.tag) for elem in ds.elements()]


def parse_safe_private(entries: Iterable[str]) -> SafePrivate:
    """``["0019,xx0A,ACME 1.0"]`` (as validated by the config) -> ``{(0x0019, 0x0A, "ACME 1.0")}``."""
    safe = set()
    for entry in entries:
        group, element, creator = entry.split(",", 2)
        safe.add((int(group, 16), int(element[2:], 16), creator.strip()))
    return frozenset(safe)


def is_well_known_uid(uid: str) -> bool:
    """A UID the standard defines (class, transfer syntax, well-known instance): never mapped."""
    return uid.strip("\x00 ").startswith(DICOM_ROOT)


def resolve_compound(action: str, kind: AttributeType | None, iod_known: bool) -> str:
    """The single action a (possibly compound) Table E.1-1 action comes to for an attribute of type ``kind``."""
    if "/" not in action:
        return action.rstrip("*")
    choices = {part.rstrip("*") for part in action.split("/")}
    if not iod_known:
        order = _REQUIRED_MAY_BE_EMPTY
    elif kind in ("1", "1C"):
        order = _REQUIRED_WITH_VALUE
    elif kind in ("2", "2C"):
        order = _REQUIRED_MAY_BE_EMPTY
    else:
        order = _OPTIONAL
    return next(choice for choice in order if choice in choices)


def effective_action(tag: int, table: ProfileTable, options: frozenset[Option]) -> str | None:
    """Table E.1-1's action for a public ``tag`` under ``options``; None when the table does not list it."""
    columns = table.option_actions(tag)
    chosen = {columns[o] for o in options if o in columns}
    if "C" in chosen:
        return "C"
    if "K" in chosen:
        return "K"
    return table.basic_action(tag)


def empty_value(vr: str) -> Any:
    if vr == "SQ":
        return DicomSequence([])
    return "" if vr in STRING_VRS else None


def values_of(value: Any) -> list[Any]:
    """The values of an element value: [] for None, the items of a multi-value, else [value]."""
    if value is None:
        return []
    if isinstance(value, (list, MultiValue)):
        return list(value)
    return [value]


def has_value(elem: DataElement) -> bool:
    """Whether emptying ``elem`` would change it."""
    if elem.VR == "SQ":
        return len(elem.value) > 0
    return any(v not in (None, "", b"") and str(v) != "" for v in values_of(elem.value))


def _set_values(elem: DataElement, values: list[Any]) -> None:
    elem.value = values[0] if len(values) == 1 else values


def _truncate(text: str, vr: str) -> str:
    limit = MAX_VALUE_LEN.get(vr)
    return text if limit is None or len(text) <= limit else text[:limit]


def _date(text: str) -> datetime.date | None:
    digits = text.strip().replace(".", "") if len(text.strip()) == 10 else text.strip()
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return None


def _format_date(day: datetime.date) -> str:
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


def shift_da(text: str, days: int) -> str | None:
    """A DA value moved by ``days``; None when it is not a date (the caller then falls back)."""
    if not text.strip():
        return text
    day = _date(text)
    if day is None:
        return None
    try:
        return _format_date(day + datetime.timedelta(days=days))
    except OverflowError:
        return None


def shift_dt(text: str, days: int) -> str | None:
    """A DT value (``YYYY[MM[DD[HH...]]][&ZZXX]``) with its date moved by ``days``, precision and rest kept."""
    value = text.strip()
    if not value:
        return text
    match = re.match(r"^(\d{4})(\d{2})?(\d{2})?(.*)$", value)
    if match is None:
        return None
    year, month, day, rest = match.group(1), match.group(2), match.group(3), match.group(4)
    shifted = shift_da(f"{year}{month or '01'}{day or '01'}", days)
    if shifted is None:
        return None
    precision = 4 + (2 if month else 0) + (2 if day else 0)
    return shifted[:precision] + rest


def date_variants(text: str) -> list[str]:
    """A DA value as people write it in free text: 19700101, 1970-01-01, 01.01.1970, 01/01/1970."""
    day = _date(text)
    if day is None:
        return [text] if text.strip() else []
    y, m, d = f"{day.year:04d}", f"{day.month:02d}", f"{day.day:02d}"
    return [f"{y}{m}{d}", f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{d}/{m}/{y}", f"{m}/{d}/{y}"]


def name_parts(value: object) -> list[str]:
    """A PN value and its components (family, given, ... of every representation)."""
    text = str(value).strip()
    if not text:
        return []
    parts = [text, text.replace("^", " ").strip()]
    parts.extend(p for p in re.split(r"[\^=\s,]+", text) if p)
    return parts


@dataclass
class FullPlan:
    """Everything full mode needs for one study; counts what it did (for the run summary)."""

    table: ProfileTable
    options: frozenset[Option]
    secret: bytes
    pseudonym: str
    shift_days: int | None
    scrub: Callable[[str], str]
    safe_private: SafePrivate
    counts: Counter[str] = field(default_factory=Counter)
    roi_names_emptied: bool = False


def _private_creator(ds: Dataset, tag: BaseTag) -> str | None:
    block = tag.element >> 8
    creator_tag = Tag(tag.group, block)
    if block < 0x10 or creator_tag not in ds:
        return None
    value = ds[creator_tag].value
    return str(value).strip() if value is not None else None


def _clean_private(ds: Dataset, plan: FullPlan) -> None:
    """Remove private attributes not listed as safe, and private creators no kept attribute uses."""
    private = [tag for tag in _tags(ds) if tag.is_private]
    if not private:
        return
    kept_blocks: set[tuple[int, int]] = set()
    for tag in private:
        if tag.element >= 0x1000:
            creator = _private_creator(ds, tag)
            if creator is not None and (tag.group, tag.element & 0xFF, creator) in plan.safe_private:
                kept_blocks.add((tag.group, tag.element >> 8))
    for tag in private:
        if tag.element >= 0x1000:
            keep = (tag.group, tag.element >> 8) in kept_blocks and (
                tag.group,
                tag.element & 0xFF,
                _private_creator(ds, tag) or "",
            ) in plan.safe_private
        else:
            keep = 0x10 <= tag.element <= 0xFF and (tag.group, tag.element) in kept_blocks
        if not keep:
            del ds[tag]
            plan.counts["private attributes removed"] += 1


def _remove_overlay_groups(ds: Dataset, plan: FullPlan) -> None:
    """An overlay whose Overlay Data (60xx,3000) the profile removes is removed whole (else it is invalid)."""
    groups = {tag.group for tag in _tags(ds) if 0x6000 <= tag.group <= 0x601E and tag.group % 2 == 0}
    for group in groups:
        if plan.table.basic_action(Tag(group, 0x3000)) in ("X", None) and Tag(group, 0x3000) in ds:
            for tag in [t for t in _tags(ds) if t.group == group]:
                del ds[tag]
            plan.counts["overlay planes removed"] += 1


def anonymize_full(ds: Dataset, plan: FullPlan, types: TypeLookup, path: tuple[str, ...] = ()) -> None:
    """Apply the confidentiality profile to ``ds`` and, recursively, to the items of its sequences."""
    if not path:
        _remove_overlay_groups(ds, plan)
    _clean_private(ds, plan)
    for tag in _tags(ds):
        if tag.element == 0 and tag.group != 0x0002:
            del ds[tag]  # group length: deprecated, and wrong once anything in the group changes
            continue
        if tag.is_private:
            continue
        elem = ds[tag]
        keyword = elem.keyword or keyword_for_tag(tag)
        action = effective_action(tag, plan.table, plan.options)
        if action is None:
            if elem.VR == "SQ":
                for item in elem.value:
                    anonymize_full(item, plan, types, (*path, keyword))
            continue
        kind = types.get((*path, keyword)) if types is not None else None
        resolved = resolve_compound(action, kind, types is not None)
        _apply(ds, elem, resolved, plan, types, path, keyword)


def _apply(
    ds: Dataset, elem: DataElement, action: str, plan: FullPlan, types: TypeLookup, path: tuple[str, ...], keyword: str
) -> None:
    vr = elem.VR
    if action == "X":
        del ds[elem.tag]
        plan.counts["removed"] += 1
        return
    if vr == "SQ":
        if action == "Z":
            elem.value = DicomSequence([])
            plan.counts["emptied"] += 1
        else:  # K, C, D, U: keep the sequence, clean what its items hold
            for item in elem.value:
                anonymize_full(item, plan, types, (*path, keyword))
        return
    if action == "K":
        return
    if action == "Z":
        if has_value(elem):
            if keyword == "ROIName":
                plan.roi_names_emptied = True
            elem.value = empty_value(vr)
            plan.counts["emptied"] += 1
        return
    if action in ("D", "U"):
        _replace(elem, plan)
        return
    if action == "C":
        _clean(ds, elem, plan, types, path, keyword)
        return
    raise AnonymizationError(f"{describe_tag(elem.tag)}: unknown Table E.1-1 action {action!r}")


def _replace(elem: DataElement, plan: FullPlan) -> None:
    """D (dummy value) or U (mapped UID)."""
    vr = elem.VR
    if vr == "UI":
        values = [str(v) for v in values_of(elem.value)]
        mapped = [v if not v or is_well_known_uid(v) else map_uid(v, plan.secret) for v in values]
        if mapped != values:
            _set_values(elem, mapped)
            plan.counts["UIDs mapped"] += sum(a != b for a, b in zip(mapped, values, strict=True))
        return
    if vr in BINARY_VRS:
        elem.value = b"\x00\x00"
    elif vr in _DUMMIES:
        elem.value = _DUMMIES[vr]
    else:
        elem.value = empty_value(vr)
    plan.counts["replaced"] += 1


def _clean(
    ds: Dataset, elem: DataElement, plan: FullPlan, types: TypeLookup, path: tuple[str, ...], keyword: str
) -> None:
    """C: shift dates, keep times of day, remove the study's identifiers from text."""
    vr = elem.VR
    values = values_of(elem.value)
    if vr in DATE_VRS:
        shift = plan.shift_days
        shifter = shift_da if vr == "DA" else shift_dt
        shifted = [shifter(str(v), shift) if shift is not None else None for v in values]
        if all(s is not None for s in shifted):
            if shifted != [str(v) for v in values]:
                _set_values(elem, [str(s) for s in shifted])
                plan.counts["dates shifted"] += 1
            return
        # Not a date NETRT can shift: do what the Basic Profile does without the option.
        basic = plan.table.basic_action(elem.tag) or "X"
        kind = types.get((*path, keyword)) if types is not None else None
        _apply(ds, elem, resolve_compound(basic, kind, types is not None), plan, types, path, keyword)
        return
    if vr in TEXT_VRS:
        cleaned = [_truncate(plan.scrub(str(v)), vr) for v in values]
        if cleaned != [str(v) for v in values]:
            _set_values(elem, cleaned)
            plan.counts["cleaned"] += 1


# --------------------------------------------------------------------------------------------------
# Identifiers of a study (what descriptors are cleaned of, and what log lines are scrubbed of)
# --------------------------------------------------------------------------------------------------


def _may_identify(ds: Dataset, tag: BaseTag, table: ProfileTable, options: frozenset[Option], with_uids: bool) -> bool:
    """False when :func:`collect_identifiers` would take nothing from element ``tag`` of ``ds``,
    decided from its raw VR and the profile without decoding its value (decoding every element of
    every header made collecting a 60-slice study's identifiers take seconds). Raw elements of
    implicit-VR files (no VR) and UN are decoded to learn their VR, as before."""
    vr = ds.get_item(tag).VR
    if vr is None or vr == "UN":
        vr = ds[tag].VR
    if vr in ("SQ", "PN"):
        return True
    action = effective_action(tag, table, options)
    if action is None or action in ("K", "C"):
        return False
    if vr == "UI":
        return with_uids and ("U" in action or action == "D")
    return vr in DATE_VRS or vr in TEXT_VRS


def collect_identifiers(
    ds: Dataset, table: ProfileTable, options: frozenset[Option], out: set[str], uids: set[str] | None = None
) -> None:
    """Add to ``out`` the identifying values ``ds`` holds, nested sequences included.

    Identifying: every person name (and its parts), and the value of every attribute the profile
    removes, empties or replaces (not those it keeps, maps or cleans) whose VR is text or a date:
    IDs, addresses, institution and station names, dates (in their usual spellings). Descriptions
    (cleaned, not removed) are not identifiers themselves. With ``uids``, the UIDs the profile maps
    are added there.
    """
    for tag in _tags(ds):
        if tag.is_private or tag.element == 0:
            continue
        if not _may_identify(ds, tag, table, options, uids is not None):
            continue  # not decoded: most of a header (numbers, codes, kept attributes) is skipped unread
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                collect_identifiers(item, table, options, out, uids)
            continue
        values = values_of(elem.value)
        if elem.VR == "PN":
            for value in values:
                out.update(name_parts(value))
            continue
        action = effective_action(tag, table, options)
        if action is None or action in ("K", "C"):
            continue
        if elem.VR == "UI":
            if uids is not None and ("U" in action or action == "D"):
                uids.update(str(v) for v in values if str(v) and not is_well_known_uid(str(v)))
            continue
        if elem.VR == "DA":
            for value in values:
                out.update(date_variants(str(value)))
        elif elem.VR == "DT":
            for value in values:
                out.update(date_variants(str(value)[:8]))
        elif elem.VR in TEXT_VRS:
            out.update(str(v).strip() for v in values if len(str(v).strip()) >= 3)


# --------------------------------------------------------------------------------------------------
# Partial mode
# --------------------------------------------------------------------------------------------------


@dataclass
class PartialResult:
    emptied: Counter[str] = field(default_factory=Counter)
    removed: Counter[str] = field(default_factory=Counter)
    #: "Keyword at path in IOD" -> times a Type 1 attribute was emptied (the file no longer conforms there).
    required_emptied: Counter[str] = field(default_factory=Counter)
    changed_groups: set[int] = field(default_factory=set)


def _element_vr(ds: Dataset, tag: BaseTag) -> str | None:
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    if vr in (None, "UN") and dictionary_has_tag(tag):
        return str(dictionary_VR(tag))
    return str(vr) if vr is not None else None


def anonymize_partial(
    ds: Dataset,
    tags: Mapping[int, str],
    types: TypeLookup,
    iod: str,
    result: PartialResult,
    path: tuple[str, ...] = (),
) -> None:
    """Empty (Type 1 or 2) or remove (Type 3, or not in the IOD) each of ``tags`` wherever it occurs in ``ds``.

    Only the elements named are decoded and changed; every other element, nested ones included,
    is written back from its original bytes. An attribute the IOD requires with a value (Type 1,
    e.g. PatientID inside OtherPatientIDsSequence) is emptied all the same, because the user asked
    for that value to go, and counted in ``result.required_emptied`` so the run summary says the
    file no longer conforms there. For an IOD the PS3.3 tables do not know, attributes are emptied.
    """
    sequences = [tag for tag in _tags(ds) if not tag.is_private and tag not in tags and _element_vr(ds, tag) == "SQ"]
    for tag, keyword in tags.items():
        if tag not in ds:
            continue
        kind = types.get((*path, keyword)) if types is not None else None
        if types is None or kind in ("1", "1C", "2", "2C"):
            elem = ds[tag]
            if has_value(elem):
                elem.value = empty_value(elem.VR)
                result.emptied[keyword] += 1
                result.changed_groups.add(tag >> 16)
                if kind in ("1", "1C"):
                    result.required_emptied[f"{' > '.join((*path, keyword))} (Type {kind} in {iod})"] += 1
        else:
            del ds[tag]
            result.removed[keyword] += 1
            result.changed_groups.add(tag >> 16)
    for tag in sequences:
        keyword = keyword_for_tag(tag)
        for item in ds[tag].value:
            anonymize_partial(item, tags, types, iod, result, (*path, keyword))
    if not path:
        for group in result.changed_groups:
            if Tag(group, 0) in ds and group != 0x0002:
                del ds[Tag(group, 0)]
