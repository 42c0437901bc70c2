"""The quarantine keeps failed studies untouched, counts attempts, and deletes only on purge."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from netrt.layout import DataLayout
from netrt.quarantine import (
    QuarantineError,
    begin_retry,
    entry_id_for,
    list_entries,
    purge,
    quarantine_study,
    read_entry,
    release,
)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _study(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i}.dcm").write_bytes(bytes([i]) * (100 + i))
    (folder / "sub").mkdir()
    (folder / "sub" / "rt.dcm").write_bytes(b"rtstruct")
    return folder


def test_received_study_is_moved_whole_with_a_reason_and_attempts_count_up(tmp_path: Path) -> None:
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    study = _study(layout.studies / "1.2.3")
    before = _digest(study)
    entry = quarantine_study(
        layout,
        study,
        [],
        entry_id=entry_id_for(layout, study, None),
        stage="deliver",
        error="destination 'pacs' unreachable",
        retryable=True,
        flow_run_id="run-1",
        study="1.2.3",
    )
    assert entry.id == "1.2.3"
    assert not study.exists(), "a received study is moved, not copied"
    assert _digest(entry.input_dir) == before, "input files must arrive untouched"
    reason = json.loads((entry.folder / "reason.json").read_text())
    assert reason["stage"] == "deliver" and reason["attempts"] == 1 and reason["retryable"] is True
    assert reason["flow_run_id"] == "run-1" and reason["first_failed_at"] == reason["last_failed_at"]

    # Retry: input goes back to studies/, reason stays marked retrying.
    back = begin_retry(layout, "1.2.3")
    assert back == layout.studies / "1.2.3" and _digest(back) == before
    assert read_entry(layout, "1.2.3").status == "retrying"
    assert not release(layout, "9.9", processed=layout.processed / "9.9"), "nothing to release for an unknown id"

    # It fails again: one more attempt, history kept.
    again = quarantine_study(
        layout, back, [], entry_id="1.2.3", stage="deliver", error="still down", retryable=True, flow_run_id="run-2"
    )
    assert again.attempts == 2 and len(again.history) == 2 and again.status == "quarantined"
    assert again.first_failed_at == entry.first_failed_at
    assert _digest(again.input_dir) == before
    line = list_entries(layout)[0].summary_line()
    assert "1.2.3" in line and "stage=deliver" in line and "attempts=2" in line and "still down" in line


def test_study_from_a_user_folder_is_copied_and_left_in_place(tmp_path: Path) -> None:
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    user = _study(tmp_path / "user" / "export")
    before = _digest(user)
    files = [user / "0.dcm", user / "sub" / "rt.dcm"]
    entry = quarantine_study(
        layout, user, files, entry_id="1.2.840.5", stage="validate", error="no RTSTRUCT", retryable=False
    )
    assert _digest(user) == before, "the user's own files must not be touched"
    assert sorted(_digest(entry.input_dir)) == ["0.dcm", "sub/rt.dcm"], "only the study's own files are copied"


def test_release_only_after_the_input_has_left_and_purge_deletes(tmp_path: Path) -> None:
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    study = _study(layout.studies / "1.2.4")
    quarantine_study(layout, study, [], entry_id="1.2.4", stage="write", error="disk full", retryable=True)
    processed = layout.processed / "1.2.4"
    assert not release(layout, "1.2.4", processed=processed), "an entry still holding the study must not be released"
    retried = begin_retry(layout, "1.2.4")
    assert not release(layout, "1.2.4", processed=processed), "the retried study is in studies/, not processed"
    retried.rename(processed)  # what the flow run that processed it does
    assert release(layout, "1.2.4", processed=processed)
    assert not (layout.quarantine / "1.2.4").exists()

    study = _study(layout.studies / "1.2.5")
    quarantine_study(layout, study, [], entry_id="1.2.5", stage="validate", error="bad", retryable=False)
    purged = purge(layout, "1.2.5")
    assert purged.id == "1.2.5" and not (layout.quarantine / "1.2.5").exists()


@pytest.mark.parametrize("elsewhere", ["studies", "incoming", "nowhere", "other-processed-folder"])
def test_release_keeps_an_entry_whose_study_this_run_did_not_move_to_processed(tmp_path: Path, elsewhere: str) -> None:
    """The input has left the entry (a retry moved it), but the study is not in processed/<id>
    from this run: still in studies/<id>, back in incoming/<id> (re-opened by the listener), gone,
    or the caller names another folder. The entry and its reason stay."""
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    study = _study(layout.studies / "1.2.7")
    quarantine_study(layout, study, [], entry_id="1.2.7", stage="deliver", error="unreachable", retryable=True)
    retried = begin_retry(layout, "1.2.7")
    before = _digest(retried)
    processed = layout.processed / "1.2.7"
    if elsewhere == "incoming":
        retried = retried.rename(layout.incoming / "1.2.7")
    elif elsewhere == "nowhere":
        retried = retried.rename(tmp_path / "moved-away")
    elif elsewhere == "other-processed-folder":
        retried = retried.rename(layout.processed / "1.2.7.earlier-x")
        processed = retried
    assert not release(layout, "1.2.7", processed=processed)
    assert read_entry(layout, "1.2.7").status == "retrying"
    assert _digest(retried) == before
    if elsewhere in ("studies", "incoming"):  # a copy waits for its own run, beside a processed one
        processed.mkdir()
        assert not release(layout, "1.2.7", processed=processed)
        assert read_entry(layout, "1.2.7").status == "retrying"


@pytest.mark.parametrize("bad", ["../etc", "a/b", "", ".hidden", "x" * 200])
def test_ids_that_could_name_other_paths_are_refused(tmp_path: Path, bad: str) -> None:
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    with pytest.raises(QuarantineError):
        read_entry(layout, bad)
    with pytest.raises(QuarantineError):
        purge(layout, bad)


def test_entry_without_reason_is_listed_not_hidden(tmp_path: Path) -> None:
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    (layout.quarantine / "1.2.6" / "input").mkdir(parents=True)
    (entry,) = list_entries(layout)
    assert entry.id == "1.2.6" and "missing" in entry.error
