"""Anonymization of a study before anything is derived from it: off, partial, or full (DICOM PS3.15 Annex E).

Users send real patients; what leaves NETRT must be exactly as identifiable as the config says and
still valid, self-consistent DICOM. The ``process-study`` flow calls :func:`anonymize_study` on the
received files right after validation and processes the copies it returns, so the overlay series
copy their patient and study attributes from anonymized files and derive their UIDs from mapped ones.

* ``anonymization.enabled: false``: nothing is copied or changed; the input files are returned.
* ``mode: partial``: each keyword of ``partial_tags`` is emptied where the IOD has it as Type 2
  (so the file stays valid) and removed where it is Type 3 or not part of the IOD, at the top level
  and inside sequences. Every other element is written back from its original bytes; no prefix or
  marker is added anywhere. Where PS3.3 requires a value (Type 1) it is emptied all the same and the
  run summary says so.
* ``mode: full``: the Basic Application Level Confidentiality Profile (Table E.1-1, every listed
  attribute, sequences included; see :mod:`netrt.anonymize.table` for where the table comes from and
  :mod:`netrt.anonymize.dataset` for how each action is applied), with the options the config selects;
  every instance UID is replaced by a keyed mapping (:func:`map_uid`) so references still resolve;
  PatientName and PatientID become a keyed pseudonym; private attributes are removed unless listed
  as safe; PatientIdentityRemoved, DeidentificationMethod, the De-identification Method Code Sequence
  (CID 7050 codes of the profile and of each option used) and LongitudinalTemporalInformationModified
  are set. Pixel data is not changed (no Clean Pixel Data option): a file whose BurnedInAnnotation
  is YES is refused rather than passed on with text in its pixels.

Anonymized copies are written under ``out_dir`` as ``<SOPInstanceUID>.dcm`` (the output UID), each
atomically and fsync'd; the inputs are never modified. Nothing this module returns or raises in
full mode carries a patient's name, ID or birth date or an original UID: the flow may log it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from netrt.anonymize.dataset import (
    CLEANED,
    FullPlan,
    PartialResult,
    anonymize_full,
    anonymize_partial,
    collect_identifiers,
    is_well_known_uid,
    parse_safe_private,
    values_of,
)
from netrt.anonymize.keys import (
    create_secret,
    date_shift_days,
    identifier_pattern,
    map_uid,
    pseudonym,
    read_secret,
    scrub_text,
    secret_path,
)
from netrt.anonymize.table import BASIC_PROFILE_EDITION, Option, iod_attribute_types, iod_name, profile_table
from netrt.config import AnonymizationConfig
from netrt.errors import AnonymizationError, DicomInputError
from netrt.fileio import atomic_output, fsync_dir
from netrt.uids import checked_uid

__all__ = [
    "AnonymizedStudy",
    "anonymize_study",
    "load_or_create_secret",
    "map_uid",
    "public_study_uid",
    "scrub_text",
    "study_identifier_sets",
    "study_identifiers",
]

IMPLEMENTATION_VERSION_NAME = "NETRT"
DEIDENTIFICATION_METHOD = f"NETRT: PS3.15 E.1-1 Basic Profile, DICOM {BASIC_PROFILE_EDITION}"
#: CID 7050 code (pydicom ``codes.DCM`` name) of each option NETRT can apply.
_OPTION_CODE_NAMES = {
    "modified_dates": "RetainLongitudinalTemporalInformationModifiedDatesOption",
    "patient_characteristics": "RetainPatientCharacteristicsOption",
    "device_identity": "RetainDeviceIdentityOption",
    "institution_identity": "RetainInstitutionIdentityOption",
    "clean_descriptors": "CleanDescriptorsOption",
    "safe_private": "RetainSafePrivateOption",
    "profile": "BasicApplicationConfidentialityProfile",
}


def _code(name: str) -> Any:
    """The CID 7050 code of an option (or ``"profile"``).

    pydicom's code dictionary is imported here, not at module level: it takes 0.6 s to import (its
    concept tables), which every flow-run process and ``netrt`` command would pay up front, also
    with anonymization off.
    """
    from pydicom.sr.codedict import codes

    return getattr(codes.DCM, _OPTION_CODE_NAMES[name])


_PATIENT_TAGS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate")


@dataclass(frozen=True)
class AnonymizedStudy:
    """What :func:`anonymize_study` produced; holds no PHI in full mode (safe to log and to cache).

    ``files`` are the files to process from now on (the inputs themselves when anonymization is
    off); ``study_instance_uid`` is theirs (the mapped UID in full mode); ``pseudonym`` is the
    PatientID written in full mode (None otherwise); ``actions`` summarises what was done.
    """

    files: tuple[Path, ...]
    study_instance_uid: str
    pseudonym: str | None
    actions: tuple[str, ...]


def load_or_create_secret(config: AnonymizationConfig, data_dir: Path) -> bytes:
    """The secret of the keyed mappings: ``anonymization.secret_file``, else ``<data_dir>/secret.key``.

    Created on first use (32 random bytes as hex, mode 0600, fsync'd). The same secret gives the same
    pseudonyms, UIDs and date shifts in every run; losing it means the next studies of a patient get
    a new pseudonym. Raises :class:`AnonymizationError` naming the file when it is unreadable or malformed.
    """
    path = secret_path(config.secret_file, data_dir)
    try:
        return read_secret(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise AnonymizationError(f"{path}: cannot read the anonymization secret: {exc.strerror or exc}") from exc
    try:
        return create_secret(path)
    except OSError as exc:
        raise AnonymizationError(f"{path}: cannot create the anonymization secret: {exc.strerror or exc}") from exc


def public_study_uid(study_instance_uid: str, config: AnonymizationConfig, secret: bytes) -> str:
    """The StudyInstanceUID that may appear in logs, run names, the transaction log and quarantine reasons.

    Full mode: the mapped UID, the same one written into the anonymized files. Otherwise the original.
    """
    if config.enabled and config.mode == "full" and not is_well_known_uid(study_instance_uid):
        return map_uid(study_instance_uid, secret)
    return study_instance_uid


def _options(config: AnonymizationConfig) -> frozenset[Option]:
    selected: list[Option] = []
    if config.retain_longitudinal_modified_dates:
        selected.append("modified_dates")
    if config.retain_patient_characteristics:
        selected.append("patient_characteristics")
    if config.retain_device_identity:
        selected.append("device_identity")
    if config.retain_institution_identity:
        selected.append("institution_identity")
    if config.clean_descriptors:
        selected.append("clean_descriptors")
    return frozenset(selected)


def _read(path: Path, *, header_only: bool) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=header_only)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise DicomInputError(f"cannot read for anonymization: {exc}", path=path) from exc


def study_identifier_sets(files: Sequence[Path], config: AnonymizationConfig) -> tuple[frozenset[str], frozenset[str]]:
    """The identifying strings of a study and, apart, the UIDs the profile maps.

    Identifying strings: every person name (whole and in parts), and every text or date value the
    configured profile removes (IDs, accession number, birth date in its usual spellings, addresses,
    ...). Kept apart, so a caller can map the UIDs (:func:`map_uid`) instead of blanking them. Reads
    headers only. Unreadable files are skipped: this runs on studies that failed.
    """
    table = profile_table()
    identifiers: set[str] = set()
    uids: set[str] = set()
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            collect_identifiers(ds, table, _options(config), identifiers, uids)
            identifiers.update(str(ds.get(k)) for k in ("PatientID", "OtherPatientIDs", "AccessionNumber") if ds.get(k))
        except Exception:  # a failed study may hold anything; scrubbing its messages must not fail on it
            continue
    return frozenset(identifiers), frozenset(uids)


def study_identifiers(files: Sequence[Path], config: AnonymizationConfig) -> frozenset[str]:
    """The identifying strings of a study, for :func:`scrub_text` on its log lines and error messages:
    those of :func:`study_identifier_sets` and every UID full mode maps."""
    identifiers, uids = study_identifier_sets(files, config)
    return identifiers | uids


# --------------------------------------------------------------------------------------------------
# anonymize_study
# --------------------------------------------------------------------------------------------------


def anonymize_study(
    files: Sequence[Path], out_dir: Path, config: AnonymizationConfig, secret: bytes
) -> AnonymizedStudy:
    """Anonymize one study's files as ``config`` says; see the module docstring for each mode.

    Writes the copies into ``out_dir`` (created if needed) and returns them with the study's (output)
    StudyInstanceUID. Two files holding the same SOPInstanceUID give one output (the first in path
    order). Raises :class:`AnonymizationError` (or :class:`DicomInputError` for an unreadable file)
    with a message that, in full mode, names files by their output SOPInstanceUID, never by PHI.
    """
    paths = [Path(p) for p in files]
    if not paths:
        raise AnonymizationError("no files given to anonymize")
    if not config.enabled:
        study_uid = _single_study_uid([_read(p, header_only=True) for p in paths[:1]])
        return AnonymizedStudy(tuple(paths), study_uid, None, ("anonymization disabled: files passed on unchanged",))
    if config.mode == "partial":
        return _anonymize_partial(paths, out_dir, config)
    return _anonymize_full(paths, out_dir, config, secret)


def _single_study_uid(headers: Sequence[Dataset], secret: bytes | None = None) -> str:
    found = sorted({str(ds.get("StudyInstanceUID", "")) for ds in headers})
    if len(found) != 1 or not found[0]:
        shown = ", ".join(map_uid(u, secret) if secret is not None and u else (u or "(none)") for u in found)
        raise AnonymizationError(f"files given as one study hold {len(found)} StudyInstanceUIDs: {shown}")
    return found[0]


def _unique_by_sop(paths: Sequence[Path], headers: Sequence[Dataset]) -> list[tuple[Path, Dataset]]:
    seen: dict[str, tuple[Path, Dataset]] = {}
    for path, ds in sorted(zip(paths, headers, strict=True), key=lambda pair: str(pair[0])):
        sop = str(ds.get("SOPInstanceUID", ""))
        if not sop:
            raise DicomInputError("no SOPInstanceUID", path=path, tag="SOPInstanceUID (0008,0018)")
        seen.setdefault(sop, (path, ds))
    return list(seen.values())


def _check_out_dir(out_dir: Path, outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    sources = {p.resolve() for p in inputs}
    clashes = [p for p in outputs if p.resolve() in sources]
    if clashes:
        raise AnonymizationError(f"{out_dir}: writing anonymized copies there would overwrite the input {clashes[0]}")


def _file_meta(ds: Dataset, original: FileMetaDataset | None) -> FileMetaDataset:
    """A new File Meta Information for a file NETRT writes (sender AE titles and addresses do not travel)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
    syntax = original.get("TransferSyntaxUID") if original is not None else None
    if syntax is None:
        syntax = ImplicitVRLittleEndian if ds.original_encoding[0] else ExplicitVRLittleEndian
    meta.TransferSyntaxUID = UID(str(syntax))
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _write(ds: Dataset, target: Path) -> Path:
    with atomic_output(target) as handle:
        dcmwrite(handle, ds, enforce_file_format=True)
    return target


# --------------------------------------------------------------------------------------------------
# Partial mode
# --------------------------------------------------------------------------------------------------


def _anonymize_partial(paths: list[Path], out_dir: Path, config: AnonymizationConfig) -> AnonymizedStudy:
    from pydicom.datadict import tag_for_keyword

    tags: dict[int, str] = {}
    for keyword in config.partial_tags:
        tag = tag_for_keyword(keyword)
        if tag is None:  # the config validator refuses these; a hand-built config may not have run it
            raise AnonymizationError(f"anonymization.partial_tags: {keyword!r} is not a DICOM keyword")
        tags[int(tag)] = keyword
    headers = [_read(p, header_only=True) for p in paths]
    study_uid = _single_study_uid(headers)
    unique = _unique_by_sop(paths, headers)
    targets = [out_dir / f"{checked_uid(ds.get('SOPInstanceUID'), 'SOPInstanceUID')}.dcm" for _, ds in unique]
    _check_out_dir(out_dir, targets, paths)
    result = PartialResult()
    written = []
    for (path, header), target in zip(unique, targets, strict=True):
        ds = _read(path, header_only=False)
        sop_class = str(header.get("SOPClassUID", ""))
        iod = iod_name(sop_class) or f"unknown ({sop_class or 'no SOP class'})"
        anonymize_partial(ds, tags, iod_attribute_types(sop_class), iod, result)
        if not ds.file_meta or "TransferSyntaxUID" not in ds.file_meta:
            ds.file_meta = _file_meta(ds, ds.file_meta if ds.file_meta else None)
        written.append(_write(ds, target))
    fsync_dir(out_dir)
    actions = [f"partial: {len(written)} files written"]
    for keyword in tags.values():
        done = [f"emptied in {result.emptied[keyword]}"] if result.emptied[keyword] else []
        done += [f"removed in {result.removed[keyword]}"] if result.removed[keyword] else []
        actions.append(f"{keyword}: {', '.join(done) if done else 'not present'}")
    for place, count in sorted(result.required_emptied.items()):
        actions.append(f"warning: {place} emptied in {count} files; PS3.3 requires a value there")
    if len(unique) < len(paths):
        actions.append(f"{len(paths) - len(unique)} duplicate copies of an instance written once")
    return AnonymizedStudy(tuple(written), study_uid, None, tuple(actions))


# --------------------------------------------------------------------------------------------------
# Full mode
# --------------------------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def _patient_key(headers: Sequence[Dataset], secret: bytes, study_uid: str) -> str:
    """The patient's identity as the pseudonym and date shift are keyed on: issuer + PatientID, else name +
    birth date, else (nothing identifies the patient) the study itself."""
    ids = {(_text(ds, "IssuerOfPatientID"), _text(ds, "PatientID")) for ds in headers if _text(ds, "PatientID")}
    if len(ids) > 1:
        raise AnonymizationError(
            f"study {map_uid(study_uid, secret)}: its files name {len(ids)} different patients (PatientID or "
            "IssuerOfPatientID differ); full anonymization needs one patient per study"
        )
    if ids:
        issuer, patient_id = ids.pop()
        return f"id\x1f{issuer}\x1f{patient_id}"
    names = {(_text(ds, "PatientName"), _text(ds, "PatientBirthDate")) for ds in headers if _text(ds, "PatientName")}
    if len(names) == 1:
        name, birth = names.pop()
        return f"name\x1f{name}\x1f{birth}"
    return f"study\x1f{study_uid}"


def _code_item(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _mark_deidentified(ds: Dataset, plan: FullPlan, safe_private: bool) -> None:
    """PatientIdentityRemoved, DeidentificationMethod (+ Code Sequence) and LongitudinalTemporalInformationModified."""
    used = [_code("profile")]
    used += [_code(o) for o in sorted(plan.options)]
    if safe_private:
        used.append(_code("safe_private"))
    ds.PatientIdentityRemoved = "YES"
    methods = [str(v) for v in values_of(ds.get("DeidentificationMethod")) if str(v)]
    for text in [DEIDENTIFICATION_METHOD, *(str(code.meaning)[:64] for code in used[1:])]:
        if text not in methods:
            methods.append(text)
    ds.DeidentificationMethod = methods if len(methods) > 1 else methods[0]
    items = list(ds.get("DeidentificationMethodCodeSequence", []) or [])
    present = {(str(i.get("CodeValue", "")), str(i.get("CodingSchemeDesignator", ""))) for i in items}
    for code in used:
        if (code.value, code.scheme_designator) not in present:
            items.append(_code_item(code))
    ds.DeidentificationMethodCodeSequence = DicomSequence(items)
    ds.LongitudinalTemporalInformationModified = "MODIFIED" if plan.shift_days is not None else "REMOVED"


def _where(path: Path, output_sop: str, identifiers: frozenset[str]) -> str:
    """A file named for a full-mode message: its name scrubbed of identifiers, plus its output SOPInstanceUID."""
    return f"{scrub_text(path.name, identifiers)} (anonymized SOPInstanceUID {output_sop})"


def _anonymize_full(paths: list[Path], out_dir: Path, config: AnonymizationConfig, secret: bytes) -> AnonymizedStudy:
    table = profile_table()
    options = _options(config)
    headers = [_read(p, header_only=True) for p in paths]
    study_uid = _single_study_uid(headers, secret)
    new_study_uid = map_uid(study_uid, secret)
    patient_key = _patient_key(headers, secret, study_uid)
    alias = pseudonym(patient_key, secret, config.pseudonym_prefix)
    shift = date_shift_days(patient_key, secret, config.max_date_shift_days) if "modified_dates" in options else None
    found: set[str] = set()
    uids: set[str] = set()
    for ds in headers:
        collect_identifiers(ds, table, options, found, uids)
    everything = frozenset(found | uids)
    pattern = identifier_pattern(found)

    def scrub(text: str) -> str:
        return pattern.sub(CLEANED, text) if pattern is not None else text

    unique = _unique_by_sop(paths, headers)
    outputs = [map_uid(str(ds.SOPInstanceUID), secret) for _, ds in unique]
    targets = [out_dir / f"{checked_uid(sop, 'SOPInstanceUID')}.dcm" for sop in outputs]
    _check_out_dir(out_dir, targets, paths)
    for (path, ds), sop in zip(unique, outputs, strict=True):
        if _text(ds, "BurnedInAnnotation").upper() == "YES":
            raise AnonymizationError(
                f"{_where(path, sop, everything)}: BurnedInAnnotation is YES; NETRT does not clean pixel data, so "
                "full anonymization cannot vouch for this image (remove the series or anonymize it upstream)"
            )
    safe = parse_safe_private(config.safe_private_tags)
    plan = FullPlan(table, options, secret, alias, shift, scrub, safe)
    written = []
    for (path, header), target, sop in zip(unique, targets, outputs, strict=True):
        ds = _read(path, header_only=False)
        original_meta = ds.file_meta if ds.file_meta else None
        try:
            anonymize_full(ds, plan, iod_attribute_types(str(header.get("SOPClassUID", ""))))
        except AnonymizationError as exc:
            raise AnonymizationError(f"{_where(path, sop, everything)}: {scrub_text(str(exc), everything)}") from None
        ds.PatientName = alias
        ds.PatientID = alias
        _mark_deidentified(ds, plan, bool(safe))
        ds.file_meta = _file_meta(ds, original_meta)
        written.append(_write(ds, target))
    fsync_dir(out_dir)
    mapping = None
    if config.mapping_file is not None:
        mapping = _record_mapping(config.mapping_file, headers[0], alias, study_uid, new_study_uid, shift)
    return AnonymizedStudy(tuple(written), new_study_uid, alias, _full_actions(plan, len(written), len(paths), mapping))


def _full_actions(plan: FullPlan, written: int, given: int, mapping: Path | None) -> tuple[str, ...]:
    meanings = [str(_code(o).meaning) for o in sorted(plan.options)]
    if plan.safe_private:
        meanings.append(str(_code("safe_private").meaning))
    counts: Counter[str] = plan.counts
    done = ", ".join(
        f"{counts[what]} {what}"
        for what in (
            "removed",
            "emptied",
            "replaced",
            "cleaned",
            "dates shifted",
            "UIDs mapped",
            "private attributes removed",
        )
    )
    actions = [
        f"full: PS3.15 Basic Application Level Confidentiality Profile (Table E.1-1, DICOM {BASIC_PROFILE_EDITION})",
        f"options: {', '.join(meanings) if meanings else 'none'}",
        f"{written} files written; attribute values: {done}",
        f"patient pseudonym {plan.pseudonym}",
        "dates shifted by one keyed offset per patient" if plan.shift_days is not None else "dates removed or emptied",
    ]
    if counts["overlay planes removed"]:
        actions.append(f"{counts['overlay planes removed']} overlay planes of the input removed")
    if plan.roi_names_emptied:
        actions.append(
            "ROI names emptied (anonymization.clean_descriptors is off): include_rois/ignore_rois cannot match them"
        )
    if written < given:
        actions.append(f"{given - written} duplicate copies of an instance written once")
    if mapping is not None:
        actions.append(f"re-identification record kept in {mapping}")
    return tuple(actions)


def _record_mapping(
    path: Path, header: Dataset, alias: str, study_uid: str, new_study_uid: str, shift: int | None
) -> Path:
    """Append one JSON line (original patient and study -> pseudonym, new study UID, date shift) to the
    re-identification file, created owner-only (0600) and kept so; a study already recorded is not repeated."""
    record = {
        "recorded": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "pseudonym": alias,
        "anonymized_study_instance_uid": new_study_uid,
        "study_instance_uid": study_uid,
        "date_shift_days": shift,
        **{keyword: _text(header, keyword) for keyword in _PATIENT_TAGS},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a+", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            handle.seek(0)
            for line in handle:
                try:
                    known = json.loads(line)
                except ValueError:
                    continue
                if known.get("anonymized_study_instance_uid") == new_study_uid and known.get("pseudonym") == alias:
                    return path
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise AnonymizationError(f"{path}: cannot write the re-identification mapping: {exc.strerror or exc}") from exc
    return path
