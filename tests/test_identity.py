"""netrt.identity against pydicom: the same UIDs on every kind of file NETRT writes, None (pydicom's
turn) on anything it cannot settle, never a wrong answer on damaged files."""

from __future__ import annotations

import random
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from netrt.config import ProcessingConfig
from netrt.identity import HEAD_BYTES, FileIdentity, read_identity
from netrt.phantom import PhantomSpec, write_phantom
from netrt.pipeline import compute_mask, write_output
from netrt.study import find_studies, load_study


def _by_pydicom(path: Path) -> FileIdentity:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return FileIdentity(
        str(ds.file_meta.MediaStorageSOPClassUID),
        str(ds.file_meta.TransferSyntaxUID),
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("SeriesInstanceUID", "")),
        str(ds.get("SOPInstanceUID", "")),
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """The phantom's input files and one series of every output kind NETRT writes."""
    root = tmp_path_factory.mktemp("identity")
    spec = PhantomSpec(rows=24, columns=24, pixel_spacing=(4.0, 4.0), slice_spacing=4.0, slices=8)
    write_phantom(spec, root / "ph")
    processing = ProcessingConfig(outputs=["overlay", "burn_in", "seg", "color"], overlay_groups="per_roi")
    (found,) = find_studies(root / "ph" / "dicom")
    study = load_study(found.files)
    masks = compute_mask(study, processing, root / "work")
    files: dict[str, list[Path]] = {"input": list(found.files)}
    for kind, plane in [("overlay", "axial"), ("overlay", "sagittal"), ("burn_in", "coronal"), ("seg", "study")]:
        for series in write_output(study, masks, kind, plane, processing, root / "work"):
            files[f"{series.kind}-{plane}"] = list(series.files)
    for series in write_output(study, masks, "color", "axial", processing, root / "work"):
        files["color-axial"] = list(series.files)
    return files


def test_every_file_netrt_reads_or_writes_gives_pydicoms_uids(written: dict[str, list[Path]]) -> None:
    assert {"input", "overlay-axial", "overlay-sagittal", "seg-study", "color-axial"} <= set(written)
    answered = 0
    for kind, paths in written.items():
        for path in paths:
            identity = read_identity(path)
            if identity is not None:
                answered += 1
                assert identity == _by_pydicom(path), f"{kind}: {path.name}"
    total = sum(len(paths) for paths in written.values())
    assert answered == total  # NETRT's own files are all explicit VR little endian: none left to pydicom


def test_nested_undefined_length_sequences_before_the_uids_are_skipped(tmp_path: Path) -> None:
    source = pydicom.dcmread(_a_ct(tmp_path))
    inner = Dataset()
    inner.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    inner.ReferencedSOPInstanceUID = "1.2.3.4"
    middle = Dataset()
    middle.ReferencedImageSequence = Sequence([inner, inner])
    middle.CodeValue = "X"
    source.ReferencedStudySequence = Sequence([middle])  # (0008,1110): before group 0020
    source.SourceImageSequence = Sequence([inner])
    path = tmp_path / "nested.dcm"
    source.save_as(path, enforce_file_format=True)  # pydicom writes sequences with undefined length
    assert read_identity(path) == _by_pydicom(path)


def _a_ct(tmp_path: Path) -> Path:
    spec = PhantomSpec(rows=8, columns=8, pixel_spacing=(4.0, 4.0), slice_spacing=4.0, slices=3)
    write_phantom(spec, tmp_path / "ct")
    return sorted((tmp_path / "ct" / "dicom").glob("CT_*.dcm"))[0]


def test_other_transfer_syntaxes_and_long_headers_are_left_to_pydicom(tmp_path: Path) -> None:
    path = _a_ct(tmp_path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(tmp_path / "implicit.dcm", enforce_file_format=True)
    assert read_identity(tmp_path / "implicit.dcm") is None
    ds.add_new(0x00091010, "OB", b"\x01" * HEAD_BYTES)  # a private blob before group 0020: past what is read
    ds.save_as(tmp_path / "long.dcm", enforce_file_format=True)
    assert read_identity(tmp_path / "long.dcm") is None
    (tmp_path / "short.dcm").write_bytes(path.read_bytes()[:300])
    assert read_identity(tmp_path / "short.dcm") is None


def test_damaged_headers_never_give_a_wrong_answer(tmp_path: Path) -> None:
    """Random byte changes in the header: read_identity answers None or exactly what pydicom reads
    from the same bytes (when pydicom reads them at all)."""
    original = _a_ct(tmp_path).read_bytes()
    header_end = original.index(b"\xe0\x7f\x10\x00")  # PixelData: change only the header
    rng = random.Random(20261206)
    damaged = tmp_path / "damaged.dcm"
    answered = 0
    for _ in range(300):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(132, header_end)] = rng.randrange(256)
        damaged.write_bytes(bytes(data))
        identity = read_identity(damaged)
        if identity is None:
            continue
        try:
            expected = _by_pydicom(damaged)
        except Exception:
            continue  # pydicom cannot read it; delivery would then refuse the file on the UID check
        answered += 1
        assert identity == expected
    assert answered > 100  # most changes hit values, not structure: the fast path still answers
