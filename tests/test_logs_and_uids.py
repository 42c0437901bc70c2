"""Transaction log records and the UID grammar that guards every path built from a UID."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from netrt.errors import UnsafeIdentifierError
from netrt.layout import DataLayout
from netrt.logs import TransactionLog, setup_logging
from netrt.uids import checked_uid, derived_uid, is_valid_uid


def test_transaction_log_writes_json_lines_with_utc_times(tmp_path: Path) -> None:
    log = TransactionLog(tmp_path / "logs" / "transactions.jsonl")
    log.record("association_opened", source_ip="127.0.0.1", source_ae="STORESCU")
    log.record(
        "study_delivered", study_instance_uid="1.2.3", destination="pacs", counts={"instances": 5}, flow_run_id=None
    )
    lines = (tmp_path / "logs" / "transactions.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "association_opened" and first["source_ae"] == "STORESCU"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert second["counts"] == {"instances": 5} and "flow_run_id" not in second
    assert log.entries() == [first, second]


def test_transaction_log_is_whole_lines_under_concurrency(tmp_path: Path) -> None:
    log = TransactionLog(tmp_path / "t.jsonl")
    threads = [
        threading.Thread(target=lambda i=i: [log.record("x", n=i * 100 + j) for j in range(50)]) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    numbers = sorted(e["n"] for e in log.entries())
    assert numbers == sorted(i * 100 + j for i in range(4) for j in range(50))


def test_app_log_goes_to_the_data_dir(tmp_path: Path) -> None:
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    logger = setup_logging(layout.app_log, console=False)
    logger.info("hello from the test")
    for handler in logger.handlers:
        handler.flush()
    assert "hello from the test" in layout.app_log.read_text()
    assert {p.name for p in layout.root.iterdir()} >= {"incoming", "studies", "quarantine", "logs", "work", "cache"}


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "2.25.1234567890", "0.1"])
def test_valid_uids_pass(uid: str) -> None:
    assert checked_uid(uid) == uid


@pytest.mark.parametrize(
    "uid", ["../../etc", "1.2/3", "1.02.3", "1..2", "1.2.", "", "1", "1.2.3\x00", "1." + "1" * 64, " 1.2", None]
)
def test_unsafe_or_malformed_uids_are_refused(uid: object) -> None:
    assert not is_valid_uid(str(uid) if uid is not None else "")
    with pytest.raises(UnsafeIdentifierError, match="StudyInstanceUID"):
        checked_uid(uid, "StudyInstanceUID")


def test_study_dir_never_leaves_its_area(tmp_path: Path) -> None:
    layout = DataLayout.from_data_dir(tmp_path)
    assert layout.study_dir(layout.incoming, "1.2.3") == layout.incoming / "1.2.3"
    with pytest.raises(UnsafeIdentifierError):
        layout.study_dir(layout.incoming, "../../etc")


def test_derived_uids_are_deterministic_valid_and_distinct() -> None:
    a = derived_uid("1.2.3", "axial", "settings-hash")
    assert a == derived_uid("1.2.3", "axial", "settings-hash")
    assert a != derived_uid("1.2.3", "coronal", "settings-hash")
    assert is_valid_uid(a) and a.startswith("2.25.")
    # no ambiguity from joining parts
    assert derived_uid("1.2", "3") != derived_uid("1.23")
