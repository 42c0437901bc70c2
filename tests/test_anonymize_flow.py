"""Full anonymization through `netrt process` (the real flow, a temporary Prefect server): nothing
identifying in any file NETRT writes, in its logs, its output on the terminal, its run names or
its artifacts; overlays equal to a non-anonymized run.

What is deliberately not searched: the Prefect database under ``<data_dir>/prefect/`` keeps each
flow run's parameters, i.e. where the input is (the study folder and, for `netrt process`, the
StudyInstanceUID as received, which selects the study in that folder). That is the run's pointer
to its input, which is itself kept as received. Names, IDs and birth dates are not there either,
and the test checks that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from .conftest import REPO, free_port
from .test_anonymize import SENTINEL, make_sentinel_study, original_uids

pytestmark = [pytest.mark.slow]


def _netrt(*args: str, data: Path, extra: str = "") -> subprocess.CompletedProcess[str]:
    config = data.parent / f"{data.name}.yaml"
    # Each data dir its own local Prefect server port: the port of another data dir's server is refused.
    config.write_text(f"paths: {{data_dir: {data}}}\nprefect: {{server_port: {free_port()}}}\n{extra}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return subprocess.run(
        [sys.executable, "-m", "netrt", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )


def _overlays(output: Path) -> dict[tuple[str, int], bytes]:
    """(SeriesDescription, InstanceNumber) -> OverlayData of every written instance."""
    found = {}
    for path in output.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        found[(str(ds.SeriesDescription), int(ds.InstanceNumber))] = bytes(ds[0x6000, 0x3000].value)
    return found


def test_full_mode_through_the_flow_leaks_nothing(tmp_path: Path) -> None:
    files = make_sentinel_study(tmp_path / "study")
    study_dir = files[0].parent
    uids = original_uids(files)
    assert len(uids) > 10
    identity = []
    first = pydicom.dcmread(files[0])
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        value = str(first.get(keyword) or "")
        if len(value) >= 4:
            identity.append(value)

    full = _netrt(
        "process",
        str(study_dir),
        data=tmp_path / "full",
        extra="anonymization: {enabled: true, mode: full}\n",
    )
    assert full.returncode == 0, full.stdout + full.stderr
    plain = _netrt("process", str(study_dir), data=tmp_path / "plain", extra="anonymization: {enabled: false}\n")
    assert plain.returncode == 0, plain.stdout + plain.stderr

    data = tmp_path / "full"
    searched = [p for p in data.rglob("*") if p.is_file() and "prefect" not in p.relative_to(data).parts]
    assert any(p.suffix == ".dcm" for p in searched) and any(p.name == "transactions.jsonl" for p in searched)
    assert any(p.name == "netrt.log" for p in searched) and any(p.name == "summary.md" for p in searched)
    needles = [SENTINEL, *identity, *uids]
    for path in searched:
        content = path.read_bytes()
        for needle in needles:
            assert needle.encode() not in content, f"{needle!r} found in {path}"
    terminal = full.stdout + full.stderr
    for needle in needles:
        assert needle not in terminal, f"{needle!r} printed by netrt process"

    # The Prefect database (run names, logs, artifacts, parameters) holds no patient identity.
    database = (data / "prefect" / "prefect.db").read_bytes()
    for needle in [SENTINEL, *identity]:
        assert needle.encode() not in database, f"{needle!r} in the Prefect database"

    # The same overlays as without anonymization. (The sentinel study is deliberately not a valid IOD,
    # see test_anonymize.py; dciodvfy on full-mode outputs of a valid study is checked there.)
    full_overlays = _overlays(data / "output")
    assert full_overlays == _overlays(tmp_path / "plain" / "output") and len(full_overlays) > 20
    shutil.rmtree(tmp_path / "plain")
