"""DICOM PS3.15 Table E.1-1 (what the confidentiality profile does to each attribute) and PS3.3 attribute types.

Where the table comes from (the issue forbids a hand-picked list):

* **Basic Profile actions** (D, Z, X, U and the compound X/Z, X/D, Z/D, X/Z/D, X/Z/U*): from
  ``dicom-anonymizer`` (KitwareMedical, import name ``dicomanonymizer``), database ``dicomfields_2026c``:
  Table E.1-1 of DICOM edition 2026c, scraped from the standard's published HTML by the project's own
  script. Of the three packages the issue names it is the only one that ships the standard's table:
  ``deid`` applies its own recipe (``REMOVE endswith:Date``, ``contains:UID``, ...), and ``dicognito``
  anonymizes by VR and a keyword list of its own; neither follows Table E.1-1. ``dicom-anonymizer`` has
  no option columns, and its engine (random dummies, unkeyed UIDs) is not used here, only its table.
* **Option columns** (Retain Longitudinal Temporal Information with Modified Dates, Retain Patient
  Characteristics, Retain Device Identity, Retain Institution Identity, Clean Descriptors): from
  ``ps315_e1_1_options.json`` beside this module, innolitics/dicom-standard's machine-readable export of
  the same table (edition 2024b; source URL, commit and licence inside the file). That project's PyPI
  release (0.1.0) is years old, so the file is kept here. Its Basic Profile column agrees with
  ``dicom-anonymizer``'s for every attribute both list (a test checks this); attributes added to the
  table after 2024b get their Basic Profile action and no option, which is the stricter outcome.
* **Attribute types** (1, 1C, 2, 2C, 3 per IOD and sequence path), needed because a compound action
  means "X unless Z (or D) is required to keep the IOD valid", and partial mode empties Type 2 but
  removes Type 3 attributes: from ``highdicom``'s tables of PS3.3 (generated from the standard). They
  are read through ``highdicom._standard_utils``, a private module: ``tests/test_anonymize.py`` checks
  that it still answers as expected whenever the lock file moves highdicom.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydicom.datadict import keyword_for_tag

from netrt.errors import AnonymizationError

#: The edition of Table E.1-1 the Basic Profile actions come from (a dicom-anonymizer database name).
BASIC_PROFILE_EDITION = "2026c"
_BASIC_PROFILE_DATABASE = f"dicomfields_{BASIC_PROFILE_EDITION}"
OPTIONS_FILE = Path(__file__).with_name("ps315_e1_1_options.json")

# dicom-anonymizer's category names -> the action as Table E.1-1 writes it.
_CATEGORY_ACTIONS = {
    "D_TAGS": "D",
    "Z_TAGS": "Z",
    "X_TAGS": "X",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

Option = Literal[
    "modified_dates", "patient_characteristics", "device_identity", "institution_identity", "clean_descriptors"
]
# Column names of the innolitics export -> the options NETRT offers. Full dates, UIDs, structured
# content and graphics are not offered (UIDs are always mapped; dates are removed or shifted).
_OPTION_COLUMNS: dict[str, Option] = {
    "rtnLongModifDatesOpt": "modified_dates",
    "rtnPatCharsOpt": "patient_characteristics",
    "rtnDevIdOpt": "device_identity",
    "rtnInstIdOpt": "institution_identity",
    "cleanDescOpt": "clean_descriptors",
}

AttributeType = Literal["1", "1C", "2", "2C", "3"]
_STRICTNESS: dict[str, int] = {"1": 5, "1C": 4, "2": 3, "2C": 2, "3": 1}


@dataclass(frozen=True)
class TagPattern:
    """A tag or a tag range of the table: matches ``tag`` when ``tag & mask == value & mask``."""

    value: int
    mask: int = 0xFFFFFFFF

    def matches(self, tag: int) -> bool:
        return (tag & self.mask) == (self.value & self.mask)


@dataclass(frozen=True)
class ProfileTable:
    """Table E.1-1 as NETRT uses it: Basic Profile action and option actions per tag."""

    basic: Mapping[int, str]
    basic_ranges: tuple[tuple[TagPattern, str], ...]
    options: Mapping[int, Mapping[Option, str]]
    option_ranges: tuple[tuple[TagPattern, Mapping[Option, str]], ...]
    options_edition: str

    def basic_action(self, tag: int) -> str | None:
        """The Basic Profile action of a public ``tag``; None when the table does not list it (keep)."""
        action = self.basic.get(tag)
        if action is not None:
            return action
        for pattern, ranged in self.basic_ranges:
            if pattern.matches(tag):
                return ranged
        return None

    def option_actions(self, tag: int) -> Mapping[Option, str]:
        """The option columns that name ``tag`` (``{"modified_dates": "C", ...}``)."""
        found = self.options.get(tag)
        if found is not None:
            return found
        for pattern, ranged in self.option_ranges:
            if pattern.matches(tag):
                return ranged
        return {}

    def option_tags(self, option: Option) -> frozenset[int]:
        """Every exact tag an option column names (documentation and tests)."""
        return frozenset(tag for tag, columns in self.options.items() if option in columns)


def _pattern_from_tuple(entry: tuple[int, ...]) -> TagPattern:
    if len(entry) == 2:
        return TagPattern((entry[0] << 16) | entry[1])
    group, element, group_mask, element_mask = entry
    return TagPattern((group << 16) | element, (group_mask << 16) | element_mask)


def _pattern_from_text(text: str) -> TagPattern | None:
    """``(0008,0050)`` or ``(60XX,4000)`` -> pattern; None for rows that are not tags (private attributes)."""
    inner = text.strip().strip("()").replace(" ", "")
    parts = inner.split(",")
    if len(parts) != 2 or any(len(p) != 4 for p in parts):
        return None
    digits = parts[0] + parts[1]
    value = mask = 0
    for char in digits:
        value <<= 4
        mask <<= 4
        if char in "xX":
            continue
        try:
            value |= int(char, 16)
        except ValueError:
            return None
        mask |= 0xF
    return TagPattern(value, mask)


def _basic_profile() -> tuple[dict[int, str], list[tuple[TagPattern, str]]]:
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    try:
        database: dict[str, list[tuple[int, ...]]] = dicom_anonymization_database_selector(_BASIC_PROFILE_DATABASE)
    except (ValueError, AttributeError) as exc:
        raise AnonymizationError(
            f"dicom-anonymizer has no table {_BASIC_PROFILE_DATABASE!r} ({exc}); the installed version does not "
            "match the lock file"
        ) from exc
    basic: dict[int, str] = {}
    ranges: list[tuple[TagPattern, str]] = []
    for category, action in _CATEGORY_ACTIONS.items():
        for entry in database[category]:
            pattern = _pattern_from_tuple(tuple(entry))
            if pattern.mask == 0xFFFFFFFF:
                basic[pattern.value] = action
            else:
                ranges.append((pattern, action))
    return basic, ranges


def _option_columns() -> tuple[dict[int, dict[Option, str]], list[tuple[TagPattern, dict[Option, str]]], str]:
    try:
        data: dict[str, Any] = json.loads(OPTIONS_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AnonymizationError(f"{OPTIONS_FILE}: cannot read the PS3.15 option table: {exc}") from exc
    exact: dict[int, dict[Option, str]] = {}
    ranges: list[tuple[TagPattern, dict[Option, str]]] = []
    for row in data["attributes"]:
        pattern = _pattern_from_text(str(row["tag"]))
        columns: dict[Option, str] = {
            option: str(row[column]) for column, option in _OPTION_COLUMNS.items() if row.get(column)
        }
        if pattern is None or not columns:
            continue
        if pattern.mask == 0xFFFFFFFF:
            exact[pattern.value] = columns
        else:
            ranges.append((pattern, columns))
    return exact, ranges, str(data["edition"])


@lru_cache(maxsize=1)
def profile_table() -> ProfileTable:
    """Table E.1-1, loaded once per process."""
    basic, basic_ranges = _basic_profile()
    options, option_ranges, edition = _option_columns()
    return ProfileTable(basic, tuple(basic_ranges), options, tuple(option_ranges), edition)


def option_rows() -> list[dict[str, str]]:
    """The rows of the stored option table as they are in the file (tests compare it with the basic table)."""
    data: dict[str, Any] = json.loads(OPTIONS_FILE.read_text(encoding="utf-8"))
    return [dict(row) for row in data["attributes"]]


# --------------------------------------------------------------------------------------------------
# Attribute types per IOD (PS3.3), from highdicom
# --------------------------------------------------------------------------------------------------

Path_ = tuple[str, ...]


@lru_cache(maxsize=64)
def iod_attribute_types(sop_class_uid: str) -> Mapping[Path_, AttributeType] | None:
    """``{(sequence keywords..., keyword): type}`` of every attribute the IOD of ``sop_class_uid`` defines.

    An attribute that two modules of the IOD both define gets the stricter type. None when the
    SOP class is unknown to the tables (a private or very new SOP class).
    """
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map

    iod = get_sop_class_iod_map().get(sop_class_uid)
    if iod is None:
        return None
    attributes = get_module_attribute_map()
    types: dict[Path_, AttributeType] = {}
    for module in get_iod_module_map()[iod]:
        for attribute in attributes.get(module["key"], []):
            key = (*attribute["path"], attribute["keyword"])
            kind = str(attribute["type"])
            if kind not in _STRICTNESS:
                continue
            current = types.get(key)
            if current is None or _STRICTNESS[kind] > _STRICTNESS[current]:
                types[key] = kind  # type: ignore[assignment]
    return types


def iod_name(sop_class_uid: str) -> str | None:
    """The IOD name highdicom gives ``sop_class_uid`` (``ct-image``), None when unknown."""
    from highdicom._standard_utils import get_sop_class_iod_map

    name = get_sop_class_iod_map().get(sop_class_uid)
    return str(name) if name is not None else None


def describe_tag(tag: int) -> str:
    """``AccessionNumber (0008,0050)`` for messages."""
    keyword = keyword_for_tag(tag) or "private or unknown attribute"
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})"
