"""The `netrt` command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom

NETRT = [sys.executable, "-m", "netrt"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NETRT, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("serve", "process", "config", "phantom"):
        assert command in result.stdout
    assert run("--version").stdout.startswith("netrt ")
    assert run("no-such-command").returncode == 2


def test_phantom_command_writes_a_study_with_truth(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    result = run(
        "phantom",
        str(out),
        "--rows",
        "40",
        "--columns",
        "32",
        "--pixel-spacing",
        "5",
        "5",
        "--slice-spacing",
        "5",
        "--slices",
        "20",
        "--reverse-order",
    )
    assert result.returncode == 0, result.stderr
    assert "ROI sphere" in result.stdout
    files = sorted((out / "dicom").iterdir())
    assert len(files) == 21 and (out / "dicom" / "RS.dcm") in files
    first = pydicom.dcmread(out / "dicom" / "CT_0001.dcm")
    assert (first.Rows, first.Columns) == (40, 32)
    assert "SliceLocation" not in first
    manifest = json.loads((out / "phantom.json").read_text())
    assert {r["name"] for r in manifest["rois"]} >= {
        "sphere",
        "box",
        "hollow_sphere",
        "torus",
        "Skull",
        "Patient_Outline",
    }
    assert sorted(p.name for p in (out / "truth").iterdir())[0].endswith(".nii.gz")
    again = run("phantom", str(out))
    assert again.returncode == 1 and "already holds files" in again.stderr
