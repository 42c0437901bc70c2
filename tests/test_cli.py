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


def test_process_of_bare_data_sets_says_what_they_are_and_how_to_read_them(tmp_path: Path) -> None:
    """A folder of data sets without the Part 10 header (as some planning systems export) is not
    "no study" without a reason: the error names the files, what they are and the two ways in."""
    assert run("phantom", str(tmp_path / "ph"), "--rows", "16", "--columns", "16", "--slices", "4").returncode == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    for source in sorted((tmp_path / "ph" / "dicom").iterdir()):
        ds = pydicom.dcmread(source)
        syntax = ds.file_meta.TransferSyntaxUID
        ds.preamble = None
        del ds.file_meta
        ds.save_as(bare / source.name, implicit_vr=syntax.is_implicit_VR, little_endian=True, enforce_file_format=False)
        assert (bare / source.name).read_bytes()[:2] == b"\x08\x00"  # a bare data set: group 0008 first
    (bare / "notes.bin").write_bytes(b"\x08\x00" + b"not DICOM at all" * 10)  # starts alike, is not one
    config = tmp_path / "netrt.yaml"
    config.write_text(f"paths: {{data_dir: {tmp_path / 'data'}}}\n")
    result = run("process", str(bare), "--config", str(config))
    assert result.returncode != 0
    assert "no DICOM study found" in result.stderr
    assert "5 file(s)" in result.stderr and "without the Part 10 file header" in result.stderr
    assert "dcmconv" in result.stderr and "storescu" in result.stderr
    assert "1 file(s), e.g. " + str(bare / "notes.bin") + ": not a DICOM file" in result.stderr
