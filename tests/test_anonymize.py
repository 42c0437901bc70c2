"""Anonymization (netrt.anonymize): full PS3.15 Annex E profile, partial mode, keyed pseudonyms/UIDs/dates,
mapping file, disabled mode; outputs checked byte by byte, with dciodvfy and dcentvfy, and through the
processing pipeline (overlays equal to a non-anonymized run)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from netrt.anonymize import (
    AnonymizedStudy,
    anonymize_study,
    load_or_create_secret,
    map_uid,
    public_study_uid,
    scrub_text,
    study_identifiers,
)
from netrt.anonymize.dataset import resolve_compound, shift_da, shift_dt
from netrt.anonymize.table import BASIC_PROFILE_EDITION, iod_attribute_types, option_rows, profile_table
from netrt.config import AnonymizationConfig, ProcessingConfig
from netrt.errors import AnonymizationError, ConfigError
from netrt.phantom import PhantomSpec, write_phantom
from netrt.pipeline import compute_mask, write_plane
from netrt.study import load_study
from tests.conftest import require_tool

SENTINEL = "ZQXSENTINEL"
SENTINEL_DATE = "19010203"
SENTINEL_TIME = "040506.789"
SENTINEL_NUMBERS = {"DS": "777.777", "IS": "7777777", "AS": "077Y"}
SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
PLANES = ("axial", "coronal", "sagittal")
SPEC = PhantomSpec(rows=64, columns=64, pixel_spacing=(3.0, 3.0), slice_spacing=4.0, slices=24)
FULL = AnonymizationConfig(mode="full")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET = "1.2.840.10008.5.1.4.1.1.481.3"
DICOM_ROOT = "1.2.840.10008."
PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "ACME 1.0"


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def _phantom(root: Path, **changes: Any) -> list[Path]:
    spec = PhantomSpec(**{**SPEC.__dict__, **changes})
    write_phantom(spec, root)
    return _dicom_files(root / "dicom")


def _hashes(files: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --------------------------------------------------------------------------------------------------
# The sentinel study: every identifying attribute of Table E.1-1 the IOD may carry holds a sentinel
# --------------------------------------------------------------------------------------------------


def _sentinel_value(vr: str) -> Any:
    if vr in ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"):
        return SENTINEL
    if vr == "DA":
        return SENTINEL_DATE
    if vr == "DT":
        return SENTINEL_DATE + "040506"
    if vr == "TM":
        return SENTINEL_TIME
    return SENTINEL_NUMBERS.get(vr)


def _sentinel_item(study_uid: str) -> Dataset:
    """A sequence item holding identifying attributes of the table (and an original UID)."""
    item = Dataset()
    item.PatientID = SENTINEL
    item.PersonName = SENTINEL
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    item.ReferencedSOPInstanceUID = study_uid
    return item


def _plant(ds: Dataset, types: Any, path: tuple[str, ...], study_uid: str) -> int:
    """Put sentinels into every table attribute the IOD defines at ``path`` (an existing dataset/item)."""
    table = profile_table()
    planted = 0
    for key in [k for k in types if len(k) == len(path) + 1 and k[:-1] == path]:
        keyword = key[-1]
        tag = tag_for_keyword(keyword)
        if tag is None or keyword == "ROIName":  # ROI names must survive to compare masks (see test below)
            continue
        action = table.basic_action(tag)
        if action is None or action in ("K", "U"):
            continue
        vr = dictionary_VR(tag)
        if vr == "SQ":
            if keyword not in ds:
                setattr(ds, keyword, DicomSequence([_sentinel_item(study_uid)]))
                planted += 1
            continue
        value = _sentinel_value(vr)
        if value is not None:
            setattr(ds, keyword, value)
            planted += 1
    for elem in list(ds):
        if elem.VR == "SQ" and not elem.tag.is_private:
            for item in elem.value:
                planted += _plant(item, types, (*path, elem.keyword), study_uid)
    return planted


def _add_private(ds: Dataset) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", SENTINEL)
    block.add_new(0x02, "LO", "harmless")


def make_sentinel_study(root: Path, **changes: Any) -> list[Path]:
    files = _phantom(root, **changes)
    for path in files:
        ds = dcmread(path)
        types = iod_attribute_types(str(ds.SOPClassUID))
        assert types is not None
        assert _plant(ds, types, (), str(ds.StudyInstanceUID)) > 40
        for structure in ds.get("StructureSetROISequence", []):
            structure.ROIDescription = f"{structure.ROIName} of {SENTINEL}"
        _add_private(ds)
        ds.save_as(path, enforce_file_format=True)
    return files


def original_uids(files: list[Path]) -> set[str]:
    """Every UID value in the files that the standard does not define (instance UIDs of the study)."""
    found: set[str] = set()

    def walk(ds: Dataset) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value:
                    walk(item)
            elif elem.VR == "UI":
                values = elem.value if isinstance(elem.value, list) else [elem.value]
                found.update(str(v) for v in values if v and not str(v).startswith(DICOM_ROOT))

    for path in files:
        ds = dcmread(path)
        walk(ds)
        found.add(str(ds.file_meta.MediaStorageSOPInstanceUID))
    return found


def _process(files: list[Path], work: Path) -> tuple[list[str], dict[str, list[Path]]]:
    """The processing pipeline without Prefect: validate, mask, write each plane."""
    study = load_study(files)
    processing = ProcessingConfig()
    masks = compute_mask(study, processing, work)
    written = {}
    for plane in PLANES:
        (series,) = write_plane(study, masks, plane, processing, work)
        written[plane] = list(series.files)
    return masks.kept, written


def _overlays(files: list[Path]) -> list[tuple[int, bytes]]:
    """(InstanceNumber, OverlayData) of a series in instance order."""
    found = []
    for path in files:
        ds = dcmread(path)
        found.append((int(ds.InstanceNumber), bytes(ds[0x6000, 0x3000].value)))
    return sorted(found)


def dciodvfy_errors(path: Path) -> list[str]:
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@dataclass
class FullRun:
    sources: list[Path]
    source_hashes: dict[Path, str]
    result: AnonymizedStudy
    kept: list[str]
    written: dict[str, list[Path]]
    baseline_kept: list[str]
    baseline: dict[str, list[Path]]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> FullRun:
    root = tmp_path_factory.mktemp("sentinel")
    sources = make_sentinel_study(root / "phantom")
    hashes = _hashes(sources)
    baseline_kept, baseline = _process(sources, root / "work-plain")
    result = anonymize_study(sources, root / "work" / "anonymized", FULL, SECRET)
    kept, written = _process(list(result.files), root / "work")
    return FullRun(sources, hashes, result, kept, written, baseline_kept, baseline)


def test_full_mode_leaves_no_sentinel_and_no_original_uid_in_any_written_file(full_run: FullRun) -> None:
    written = list(full_run.result.files) + [p for files in full_run.written.values() for p in files]
    assert len(full_run.result.files) == len(full_run.sources) and all(full_run.written.values())
    needles = {SENTINEL, SENTINEL_DATE, SENTINEL_TIME, *SENTINEL_NUMBERS.values(), *original_uids(full_run.sources)}
    needles.update(("PHANTOM^NETRT", "NETRT-PHANTOM-001", "19700101", "ACC0001"))  # the phantom's own identity
    assert len(needles) > len(full_run.sources) + 10
    hits = []
    for path in written:
        data = path.read_bytes()
        hits += [f"{path.name}: {needle}" for needle in needles if needle.encode() in data]
    assert not hits, f"{len(hits)} identifying values survived: {hits[:10]}"
    # The sentinels really were there before: the search above can fail.
    source_bytes = full_run.sources[0].read_bytes()
    assert SENTINEL.encode() in source_bytes and SENTINEL_DATE.encode() in source_bytes


def test_full_mode_overlays_equal_those_of_a_non_anonymized_run(full_run: FullRun) -> None:
    assert full_run.kept == full_run.baseline_kept == ["sphere", "box", "hollow_sphere", "torus"]
    for plane in PLANES:
        anonymized = _overlays(full_run.written[plane])
        plain = _overlays(full_run.baseline[plane])
        assert len(anonymized) == len(plain) > 0
        assert anonymized == plain, plane
        assert any(bits.strip(b"\x00") for _, bits in anonymized), f"{plane}: empty overlays prove nothing"


def _rtstruct_and_a_ct(files: list[Path] | tuple[Path, ...]) -> list[Path]:
    modality = {p: str(dcmread(p, stop_before_pixels=True).Modality) for p in files}
    return [next(p for p in files if modality[p] == "RTSTRUCT"), next(p for p in files if modality[p] == "CT")]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[AnonymizedStudy, dict[str, list[Path]]]:
    """A valid phantom (no sentinels), full mode with modified dates, then the pipeline."""
    root = tmp_path_factory.mktemp("clean")
    sources = _phantom(root / "phantom")
    config = AnonymizationConfig(mode="full", retain_longitudinal_modified_dates=True)
    result = anonymize_study(sources, root / "work" / "anonymized", config, SECRET)
    _, written = _process(list(result.files), root / "work")
    return result, written


def test_full_mode_outputs_of_a_valid_study_pass_dciodvfy(clean_run: tuple[AnonymizedStudy, Any]) -> None:
    result, written = clean_run
    samples = [*_rtstruct_and_a_ct(result.files), *(files[len(files) // 2] for files in written.values())]
    failures = {p.name: dciodvfy_errors(p) for p in samples}
    assert not any(failures.values()), failures


def test_full_mode_adds_no_dciodvfy_error_to_the_sentinel_study(full_run: FullRun) -> None:
    """The sentinel study is not valid DICOM (sentinels in coded and conditional attributes); what matters
    is that anonymizing it makes nothing worse: every error dciodvfy reports on an anonymized file or
    overlay series it also reports on the original file or on the overlay series of the plain run."""
    pairs = list(zip(_rtstruct_and_a_ct(full_run.result.files), _rtstruct_and_a_ct(full_run.sources), strict=True))
    pairs += [(full_run.written[p][0], full_run.baseline[p][0]) for p in PLANES]
    table = profile_table()
    for anonymized, original in pairs:
        added = set(dciodvfy_errors(anonymized)) - set(dciodvfy_errors(original))
        for error in sorted(added):
            # Table E.1-1 itself keeps some conditional attributes (D or Z) while removing (X) the one their
            # condition names, e.g. Clinical Trial Protocol Ethics Committee Name (D, 1C: required if the
            # Approval Number (X) is present). dciodvfy then reports the kept one as present without its
            # condition. That follows the standard's table; any other new error fails the test.
            match = re.search(r"present when condition unsatisfied .* Element=<(\w+)>", error)
            tag = tag_for_keyword(match.group(1)) if match else None
            if tag is not None and table.basic_action(tag) in ("D", "Z"):
                added.discard(error)
        assert not added, f"{anonymized.name}: {sorted(added)[:5]}"


def test_full_mode_never_touches_its_inputs(full_run: FullRun) -> None:
    assert _hashes(full_run.sources) == full_run.source_hashes
    assert not set(full_run.result.files) & set(full_run.sources)


def test_full_mode_marks_the_deidentification_and_keeps_references_resolvable(full_run: FullRun) -> None:
    result = full_run.result
    assert result.study_instance_uid == public_study_uid(
        str(dcmread(full_run.sources[0]).StudyInstanceUID), FULL, SECRET
    )
    assert result.pseudonym is not None and result.pseudonym.startswith("ANON-") and len(result.pseudonym) == 21
    for path in result.files:
        ds = dcmread(path, stop_before_pixels=True)
        assert path.name == f"{ds.SOPInstanceUID}.dcm" == f"{ds.file_meta.MediaStorageSOPInstanceUID}.dcm"
        assert ds.StudyInstanceUID == result.study_instance_uid
        assert ds.PatientID == ds.PatientName == result.pseudonym
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert [(i.CodeValue, i.CodingSchemeDesignator) for i in ds.DeidentificationMethodCodeSequence] == [
            ("113100", "DCM"),
            ("113105", "DCM"),
        ]
        assert BASIC_PROFILE_EDITION in ds.DeidentificationMethod[0]
        assert not [elem for elem in ds if elem.tag.is_private]
    assert any(action.startswith("full:") for action in result.actions)
    # load_study on the anonymized copies resolved the RTSTRUCT to its images: every reference was mapped alike.
    assert full_run.kept


def test_basic_profile_without_options_removes_descriptors_too(tmp_path: Path) -> None:
    sources = make_sentinel_study(tmp_path / "phantom")
    config = AnonymizationConfig(mode="full", clean_descriptors=False)
    result = anonymize_study(sources, tmp_path / "out", config, SECRET)
    for path in result.files:
        data = path.read_bytes()
        assert SENTINEL.encode() not in data
        ds = dcmread(path, stop_before_pixels=True)
        assert "StudyDescription" not in ds and "SeriesDescription" not in ds
        for item in ds.get("StructureSetROISequence", []):
            assert item.ROIName == ""  # Table E.1-1: Z without the Clean Descriptors Option
        assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == ["113100"]
    assert any("ROI names emptied" in action for action in result.actions)


# --------------------------------------------------------------------------------------------------
# Partial mode
# --------------------------------------------------------------------------------------------------


def _elements(ds: Dataset, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], int, Any]]:
    for elem in ds:
        where = (*path, elem.keyword or str(elem.tag))
        if elem.VR == "SQ":
            yield where, elem.tag, len(elem.value)
            for index, item in enumerate(elem.value):
                yield from _elements(item, (*where, str(index)))
        else:
            yield where, elem.tag, elem.value


def test_partial_mode_changes_exactly_the_configured_tags(tmp_path: Path) -> None:
    sources = _phantom(tmp_path / "phantom")
    # Nested occurrences too: an OtherPatientIDsSequence item carries a PatientID (Type 1 there).
    for path in sources:
        ds = dcmread(path)
        other = Dataset()
        other.PatientID = "OTHER-ID-7"
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = DicomSequence([other])
        _add_private(ds)
        ds.save_as(path, enforce_file_format=True)
    hashes = _hashes(sources)
    tags = ["AccessionNumber", "PatientID", "InstitutionName", "OperatorsName"]
    config = AnonymizationConfig(mode="partial", partial_tags=tags)
    result = anonymize_study(sources, tmp_path / "out", config, SECRET)
    assert _hashes(sources) == hashes
    assert result.pseudonym is None
    by_sop = {str(dcmread(p).SOPInstanceUID): p for p in sources}
    configured = {int(tag_for_keyword(k)) for k in tags}  # type: ignore[arg-type]
    for path in result.files:
        after = dcmread(path)
        before = dcmread(by_sop[str(after.SOPInstanceUID)])
        old = {where: (tag, value) for where, tag, value in _elements(before)}
        new = {where: (tag, value) for where, tag, value in _elements(after)}
        for where, (tag, value) in old.items():
            if tag in configured:
                # Type 2 (AccessionNumber, PatientID; OperatorsName in the RT Series module) and Type 1
                # (PatientID inside OtherPatientIDsSequence) are emptied; Type 3 (InstitutionName;
                # OperatorsName of a CT series) is removed.
                keyword = keyword_for_tag(tag)
                removed = keyword == "InstitutionName" or (keyword == "OperatorsName" and after.Modality == "CT")
                if removed:
                    assert where not in new, where
                else:
                    assert new[where] == (tag, ""), where
            else:
                assert new[where] == (tag, value), where
        assert set(new) <= set(old)
        assert after.file_meta.MediaStorageSOPInstanceUID == before.file_meta.MediaStorageSOPInstanceUID
        assert path.name == f"{after.SOPInstanceUID}.dcm"
        assert "PatientIdentityRemoved" not in after
    rtstruct = next(p for p in result.files if dcmread(p).Modality == "RTSTRUCT")
    assert "OperatorsName" in dcmread(rtstruct)  # Type 2 in the RT Series module: emptied, not removed
    assert any("OtherPatientIDsSequence > PatientID (Type 1" in action for action in result.actions)
    assert result.study_instance_uid == str(dcmread(sources[0]).StudyInstanceUID)


def test_partial_mode_by_default_empties_accession_number_and_patient_id_and_adds_no_prefix(tmp_path: Path) -> None:
    sources = _phantom(tmp_path / "phantom")
    result = anonymize_study(sources, tmp_path / "out", AnonymizationConfig(), SECRET)
    by_sop = {str(dcmread(p).SOPInstanceUID): p for p in sources}
    for path in result.files:
        after = dcmread(path)
        before = dcmread(by_sop[str(after.SOPInstanceUID)])
        assert after.AccessionNumber == "" and after.PatientID == ""
        for keyword in ("AccessionNumber", "PatientID"):
            delattr(after, keyword)
            delattr(before, keyword)
        assert after == before  # nothing else changed: no prefix, no marker, no new attribute
    assert [a for a in result.actions if a.startswith(("AccessionNumber", "PatientID"))] == [
        f"AccessionNumber: emptied in {len(sources)}",
        f"PatientID: emptied in {len(sources)}",
    ]
    for path in _rtstruct_and_a_ct(result.files):
        assert dciodvfy_errors(path) == [], path


# --------------------------------------------------------------------------------------------------
# Consistency across studies and runs
# --------------------------------------------------------------------------------------------------


def _dates(files: tuple[Path, ...] | list[Path]) -> dict[str, str]:
    ds = dcmread(next(p for p in files if dcmread(p, stop_before_pixels=True).Modality == "CT"))
    return {k: str(ds.get(k, "")) for k in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate")}


def _days(after: str, before: str) -> int:
    from datetime import date

    def parse(text: str) -> date:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))

    return (parse(after) - parse(before)).days


def test_same_patient_gets_the_same_pseudonym_and_date_shift_across_studies(tmp_path: Path) -> None:
    config = AnonymizationConfig(mode="full", retain_longitudinal_modified_dates=True)
    first = _phantom(tmp_path / "a", seed=1)
    second = _phantom(tmp_path / "b", seed=2)
    other = _phantom(tmp_path / "c", seed=3, patient_id="SOMEONE-ELSE", patient_name="ELSE^SOMEONE")
    assert len({str(dcmread(files[0]).StudyInstanceUID) for files in (first, second, other)}) == 3
    results = [anonymize_study(files, tmp_path / f"out{i}", config, SECRET) for i, files in enumerate((first, second))]
    elsewhere = anonymize_study(other, tmp_path / "out-other", config, SECRET)
    assert results[0].pseudonym == results[1].pseudonym
    assert elsewhere.pseudonym != results[0].pseudonym
    assert results[0].study_instance_uid != results[1].study_instance_uid
    shifts = set()
    for sources, result in zip((first, second), results, strict=True):
        before, after = _dates(sources), _dates(result.files)
        for key in before:
            assert before[key] and after[key] and after[key] != before[key], key
            shifts.add(_days(after[key], before[key]))
        ds = dcmread(result.files[0], stop_before_pixels=True)
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert "113107" in [i.CodeValue for i in ds.DeidentificationMethodCodeSequence]
    assert len(shifts) == 1 and -config.max_date_shift_days <= shifts.pop() <= -1
    before, after = _dates(other), _dates(elsewhere.files)
    assert {_days(after[k], before[k]) for k in before} != set() and after != _dates(results[0].files)


def test_same_secret_gives_the_same_uids_and_another_secret_different_ones(tmp_path: Path) -> None:
    sources = _phantom(tmp_path / "phantom")
    once = anonymize_study(sources, tmp_path / "one", FULL, SECRET)
    again = anonymize_study(sources, tmp_path / "two", FULL, SECRET)
    other = anonymize_study(sources, tmp_path / "three", FULL, OTHER_SECRET)
    names = [{p.name for p in r.files} for r in (once, again, other)]
    assert names[0] == names[1] and not names[0] & names[2]
    assert once.study_instance_uid == again.study_instance_uid != other.study_instance_uid
    assert once.pseudonym == again.pseudonym != other.pseudonym
    for a, b in zip(sorted(once.files), sorted(again.files), strict=True):
        assert dcmread(a) == dcmread(b)


def test_dcentvfy_finds_no_inconsistency_in_an_anonymized_study(
    full_run: FullRun, clean_run: tuple[AnonymizedStudy, Any], tmp_path: Path
) -> None:
    tool = require_tool("dcentvfy")
    for files in (full_run.result.files, clean_run[0].files):
        result = subprocess.run([tool, *map(str, files)], capture_output=True, text=True, timeout=120)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert result.returncode == 0 and not errors, errors[:5]
    # dcentvfy does catch an inconsistency: one file with another patient name fails it.
    tampered = tmp_path / "tampered"
    shutil.copytree(full_run.result.files[0].parent, tampered)
    victim = _dicom_files(tampered)[0]
    ds = dcmread(victim)
    ds.PatientName = "SOMEONE^ELSE"
    ds.save_as(victim)
    bad = subprocess.run([tool, *map(str, _dicom_files(tampered))], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "PatientName" in bad.stdout + bad.stderr


# --------------------------------------------------------------------------------------------------
# Mapping file, secret, disabled mode
# --------------------------------------------------------------------------------------------------


def test_mapping_file_is_off_by_default_and_owner_only_when_on(tmp_path: Path) -> None:
    sources = _phantom(tmp_path / "phantom")
    result = anonymize_study(sources, tmp_path / "out", FULL, SECRET)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in result.files)
    assert not [a for a in result.actions if "re-identification" in a]
    mapping = tmp_path / "private" / "mapping.jsonl"
    config = AnonymizationConfig(mode="full", mapping_file=mapping, retain_longitudinal_modified_dates=True)
    result = anonymize_study(sources, tmp_path / "out2", config, SECRET)
    anonymize_study(sources, tmp_path / "out3", config, SECRET)  # the same study again: not recorded twice
    assert stat.S_IMODE(mapping.stat().st_mode) == 0o600
    (record,) = [json.loads(line) for line in mapping.read_text().splitlines()]
    original = dcmread(sources[0])
    assert record["PatientID"] == "NETRT-PHANTOM-001" and record["PatientName"] == "PHANTOM^NETRT"
    assert record["pseudonym"] == result.pseudonym
    assert record["study_instance_uid"] == original.StudyInstanceUID
    assert record["anonymized_study_instance_uid"] == result.study_instance_uid
    assert isinstance(record["date_shift_days"], int) and record["date_shift_days"] < 0
    mapping.chmod(0o644)  # loosened by someone: the next write makes it owner-only again
    anonymize_study(_phantom(tmp_path / "second", seed=5), tmp_path / "out4", config, SECRET)
    assert stat.S_IMODE(mapping.stat().st_mode) == 0o600 and len(mapping.read_text().splitlines()) == 2


def test_secret_is_created_once_owner_only_and_reused(tmp_path: Path) -> None:
    secret = load_or_create_secret(AnonymizationConfig(), tmp_path / "data")
    path = tmp_path / "data" / "secret.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(secret) == 32
    assert load_or_create_secret(AnonymizationConfig(), tmp_path / "data") == secret
    assert load_or_create_secret(AnonymizationConfig(), tmp_path / "elsewhere") != secret
    own = tmp_path / "own.key"
    own.write_text("not hex at all\n")
    with pytest.raises(AnonymizationError, match=str(own)):
        load_or_create_secret(AnonymizationConfig(secret_file=own), tmp_path / "data")
    own.write_text(SECRET.hex())
    assert load_or_create_secret(AnonymizationConfig(secret_file=own), tmp_path / "data") == SECRET


def test_disabled_returns_the_input_files_untouched(tmp_path: Path) -> None:
    sources = _phantom(tmp_path / "phantom")
    hashes = _hashes(sources)
    config = AnonymizationConfig(enabled=False, mode="full")
    result = anonymize_study(sources, tmp_path / "out", config, SECRET)
    assert list(result.files) == sources
    assert not (tmp_path / "out").exists()
    assert _hashes(sources) == hashes
    assert result.pseudonym is None and result.study_instance_uid == str(dcmread(sources[0]).StudyInstanceUID)
    assert public_study_uid(result.study_instance_uid, config, SECRET) == result.study_instance_uid


# --------------------------------------------------------------------------------------------------
# Refusals, options, scrubbing, the table itself
# --------------------------------------------------------------------------------------------------


def test_burned_in_annotation_is_refused_without_naming_the_patient(tmp_path: Path) -> None:
    sources = _phantom(tmp_path / "phantom")
    ds = dcmread(sources[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(sources[0])
    with pytest.raises(AnonymizationError, match="BurnedInAnnotation") as caught:
        anonymize_study(sources, tmp_path / "out", FULL, SECRET)
    message = str(caught.value)
    assert "PHANTOM" not in message and "NETRT-PHANTOM-001" not in message
    assert not any(uid in message for uid in original_uids(sources))


def test_a_study_naming_two_patients_is_refused_without_naming_them(tmp_path: Path) -> None:
    sources = _phantom(tmp_path / "phantom")
    ds = dcmread(sources[1])
    ds.PatientID = "INTRUDER-9"
    ds.save_as(sources[1])
    with pytest.raises(AnonymizationError, match="2 different patients") as caught:
        anonymize_study(sources, tmp_path / "out", FULL, SECRET)
    message = str(caught.value)
    assert "INTRUDER-9" not in message and "NETRT-PHANTOM-001" not in message
    assert not any(uid in message for uid in original_uids(sources))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_output_dir_may_not_overwrite_the_inputs(tmp_path: Path) -> None:
    sources = _phantom(tmp_path / "phantom")
    renamed = []
    for path in sources:
        target = path.with_name(f"{dcmread(path).SOPInstanceUID}.dcm")
        path.rename(target)
        renamed.append(target)
    with pytest.raises(AnonymizationError, match="overwrite"):
        anonymize_study(renamed, renamed[0].parent, AnonymizationConfig(), SECRET)


def test_retain_options_keep_what_they_name_and_safe_private_tags_survive(tmp_path: Path) -> None:
    sources = _phantom(tmp_path / "phantom")
    for path in sources:
        ds = dcmread(path)
        ds.PatientSex = "F"
        ds.PatientAge = "042Y"
        _add_private(ds)
        ds.save_as(path, enforce_file_format=True)
    config = AnonymizationConfig(
        mode="full",
        retain_device_identity=True,
        retain_institution_identity=True,
        retain_patient_characteristics=True,
        safe_private_tags=[f"{PRIVATE_GROUP:04X},xx02,{PRIVATE_CREATOR}"],
    )
    result = anonymize_study(sources, tmp_path / "out", config, SECRET)
    ds = dcmread(next(p for p in result.files if dcmread(p, stop_before_pixels=True).Modality == "CT"))
    assert ds.StationName == "PHANTOM" and ds.DeviceSerialNumber == "0001"
    assert ds.InstitutionName == "NETRT"
    assert ds.PatientSex == "F" and ds.PatientAge == "042Y"
    assert ds.PatientBirthDate == ""  # not a patient characteristic in Table E.1-1
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert block[0x02].value == "harmless" and (block.get_tag(0x01) not in ds)
    codes = {i.CodeValue for i in ds.DeidentificationMethodCodeSequence}
    assert codes == {"113100", "113105", "113108", "113109", "113111", "113112"}


def test_unsafe_private_tag_forms_are_config_errors() -> None:
    for bad in ["0010,xx01,EVEN GROUP", "0011,1001,NO XX", "0011,xx01,"]:
        with pytest.raises((ConfigError, ValueError)):
            AnonymizationConfig(safe_private_tags=[bad])


def test_scrub_text_removes_identifiers_case_insensitively_and_whole_words_for_short_ones() -> None:
    text = "Study of doe^john (id 12, born 1970-01-01) uid 1.2.3.4.5 in 2012; GTV_DOE, JOHNSTON"
    scrubbed = scrub_text(text, ["DOE^JOHN", "DOE", "JOHN", "12", "1970-01-01", "1.2.3.4.5", "", "X"])
    assert scrubbed == (
        "Study of <removed> (id <removed>, born <removed>) uid <removed> in 2012; GTV_<removed>, JOHNSTON"
    )
    assert scrub_text("nothing here", []) == "nothing here"


def test_study_identifiers_name_patient_data_and_uids(tmp_path: Path) -> None:
    sources = _phantom(tmp_path / "phantom")
    found = study_identifiers(sources, FULL)
    assert {"PHANTOM^NETRT", "PHANTOM", "NETRT-PHANTOM-001", "19700101", "1970-01-01", "ACC0001"} <= found
    assert original_uids(sources) - {str(dcmread(sources[0]).file_meta.ImplementationClassUID)} <= found
    message = f"{sources[0].name}: patient NETRT-PHANTOM-001 in study {dcmread(sources[0]).StudyInstanceUID}"
    assert "NETRT-PHANTOM-001" not in scrub_text(message, found)


def test_public_study_uid_is_the_uid_written_in_full_mode_only() -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345"
    assert public_study_uid(uid, FULL, SECRET) == map_uid(uid, SECRET) != uid
    assert public_study_uid(uid, AnonymizationConfig(mode="partial"), SECRET) == uid
    mapped = map_uid(uid, SECRET)
    assert mapped.startswith("2.25.") and len(mapped) <= 64 and map_uid(uid, OTHER_SECRET) != mapped


def test_dates_shift_by_whole_days_with_their_precision_kept() -> None:
    assert shift_da("20240301", -1) == "20240229"
    assert shift_da("", -5) == ""
    assert shift_da("2024.03.01", -1) == "20240229"
    assert shift_da("not a date", -1) is None
    assert shift_dt("20240301101500.123456+0100", -1) == "20240229101500.123456+0100"
    assert shift_dt("202403", -1) == "202402"


def test_compound_actions_resolve_by_attribute_type() -> None:
    assert resolve_compound("X/Z", "3", True) == "X"
    assert resolve_compound("X/Z", "2", True) == "Z"
    assert resolve_compound("X/Z/D", "1", True) == "D"
    assert resolve_compound("X/D", None, True) == "X"
    assert resolve_compound("X/D", None, False) == "D"
    assert resolve_compound("Z/D", "2C", True) == "Z"
    assert resolve_compound("X/Z/U*", "1C", True) == "U"
    assert resolve_compound("D", "3", True) == "D"


def test_the_two_table_sources_agree_and_the_type_tables_answer() -> None:
    table = profile_table()
    rows = option_rows()
    compared = 0
    for row in rows:
        text = row["tag"].strip("()")
        if "X" in text.upper().replace("0X", "") or not all(c in "0123456789ABCDEFabcdef," for c in text):
            continue
        tag = int(text.replace(",", ""), 16)
        action = table.basic_action(tag)
        if action is not None:
            assert action == row["basicProfile"], row
            compared += 1
    assert compared > 550
    assert len(table.basic) > 600
    assert table.basic_action(int(tag_for_keyword("PatientName") or 0)) == "Z"
    assert table.basic_action(int(tag_for_keyword("SOPInstanceUID") or 0)) == "U"
    assert table.basic_action(0x60003000) == table.basic_action(0x60023000) == "X"  # Overlay Data, any group
    ct = iod_attribute_types(CT_IMAGE)
    rt = iod_attribute_types(RT_STRUCTURE_SET)
    assert ct is not None and rt is not None
    assert ct[("PatientID",)] == "2" and ct[("InstitutionName",)] == "3" and ct[("SOPInstanceUID",)] == "1"
    assert rt[("OperatorsName",)] == "2" and rt[("StructureSetROISequence", "ROIName")] == "2"
    assert iod_attribute_types("1.2.3.4.private.sop.class") is None
    assert "Institution Name" in {row["name"] for row in rows if row.get("rtnInstIdOpt") == "K"}
