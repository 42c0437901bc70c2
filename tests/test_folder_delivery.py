"""Folder delivery (netrt.deliver.deliver_to_folder): NETRT's own derived files are hard-linked into
a destination on the same file system (no bytes move), anything else is copied, and a destination
on another file system (a real tmpfs) gets copies; every file lands whole under its UIDs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from netrt.deliver import deliver_to_folder
from netrt.phantom import PhantomSpec, write_phantom

from .conftest import mounted_tmpfs


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    write_phantom(PhantomSpec(rows=32, columns=32, slices=6, pixel_spacing=(8.0, 8.0)), tmp_path / "work" / "p")
    return sorted((tmp_path / "work" / "p" / "dicom").glob("*.dcm"))


def _target(root: Path, path: Path) -> Path:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"


def test_work_files_are_hard_linked_and_other_files_copied(study: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "dest"
    outcome = deliver_to_folder("dest", out, study, link_from=tmp_path / "work")
    assert outcome.stored == len(study) and f"({len(study)} hard-linked, 0 copied)" in outcome.detail
    for path in study:
        target = _target(out, path)
        assert os.stat(target).st_ino == os.stat(path).st_ino and os.stat(path).st_nlink >= 2
    # Files outside NETRT's work dir (a user's own folder) are never linked to: a later edit of the
    # user's file must not change what the destination holds.
    copied = tmp_path / "copied"
    outcome = deliver_to_folder("dest", copied, study, link_from=tmp_path / "elsewhere")
    assert f"(0 hard-linked, {len(study)} copied)" in outcome.detail
    for path in study:
        target = _target(copied, path)
        assert os.stat(target).st_ino != os.stat(path).st_ino and target.read_bytes() == path.read_bytes()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")], "no temporary link is left"


def test_a_rewritten_work_file_replaces_the_delivered_one(study: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "dest"
    deliver_to_folder("dest", out, study, link_from=tmp_path / "work")
    first = study[0]
    ds = pydicom.dcmread(first)
    ds.SeriesDescription = "rewritten"
    replacement = first.with_suffix(".new")
    ds.save_as(replacement)
    os.replace(replacement, first)  # NETRT's writers replace files, never change them in place
    deliver_to_folder("dest", out, study, link_from=tmp_path / "work")
    assert pydicom.dcmread(_target(out, first)).SeriesDescription == "rewritten"


@pytest.fixture
def other_file_system(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted for this test: another file system than the work dir's (needs root)."""
    with mounted_tmpfs(tmp_path / "tmpfs", "64m") as mount_point:
        yield mount_point


def test_a_destination_on_another_file_system_gets_copies(
    study: list[Path], tmp_path: Path, other_file_system: Path
) -> None:
    outcome = deliver_to_folder("dest", other_file_system, study, link_from=tmp_path / "work")
    assert f"(0 hard-linked, {len(study)} copied)" in outcome.detail
    for path in study:
        assert _target(other_file_system, path).read_bytes() == path.read_bytes()
