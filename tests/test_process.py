"""The process-study flow end to end on phantoms: overlays exactly where the analytic shapes are,
in all three planes, at several geometries; valid IODs; clear errors on broken input."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest

from netrt.phantom import PhantomManifest, PhantomSpec, write_phantom

from .conftest import free_port, require_tool
from .overlay_check import score_series

pytestmark = pytest.mark.slow

SHAPES = ["sphere", "box", "hollow_sphere", "torus"]

GEOMETRIES = {
    "1mm-iso": PhantomSpec(rows=200, columns=200, pixel_spacing=(1.0, 1.0), slice_spacing=1.0, slices=110),
    "0.98x0.98x2.5": PhantomSpec(rows=256, columns=256, pixel_spacing=(0.98, 0.98), slice_spacing=2.5),
    "2mm-iso": PhantomSpec(rows=128, columns=128, pixel_spacing=(2.0, 2.0), slice_spacing=2.0),
    "non-square-512x400": PhantomSpec(rows=512, columns=400, pixel_spacing=(0.7, 0.7), slice_spacing=3.0, slices=34),
    "oblique": PhantomSpec(rows=160, columns=160, pixel_spacing=(1.5, 1.5), slice_spacing=2.0, orientation="oblique"),
    "reversed": PhantomSpec(rows=128, columns=128, pixel_spacing=(2.0, 2.0), slice_spacing=2.0, reverse_order=True),
}


def write_config(tmp: Path, data_dir: Path, **processing: Any) -> Path:
    # Each data dir its own local Prefect server port: the port of another data dir's server is refused.
    lines = [f"paths: {{data_dir: {data_dir}}}", f"prefect: {{server_port: {free_port()}}}"]
    if processing:
        items = ", ".join(f"{k}: {v}" for k, v in processing.items())
        lines.append(f"processing: {{{items}}}")
    path = tmp / "netrt.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def series_files(output: Path, summary: dict[str, Any], plane: str, burn_in: bool = False) -> list[Path]:
    (series,) = [s for s in summary["series"] if s["plane"] == plane and s["burn_in"] == burn_in]
    folder = output / summary["study_instance_uid"] / series["series_instance_uid"]
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == series["instances"] > 0
    return files


@pytest.fixture(scope="module")
def processed(
    prefect_harness: None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[PhantomManifest, dict[str, Any], Path]]:
    from flows.process_study import process_study

    results = {}
    for label, spec in GEOMETRIES.items():
        root = tmp_path_factory.mktemp(label)
        manifest = write_phantom(spec, root / "phantom")
        config = write_config(root, root / "data")
        summary = process_study(study_dir=str(root / "phantom" / "dicom"), config_file=str(config))
        results[label] = (manifest, summary, root / "data" / "output")
    return results


@pytest.mark.parametrize("label", list(GEOMETRIES))
def test_axial_overlays_match_the_analytic_shapes(processed: dict[str, Any], label: str) -> None:
    manifest, summary, output = processed[label]
    assert summary["rois_kept"] == SHAPES
    assert summary["rois_ignored"] == ["Skull", "Patient_Outline"]
    for score in score_series(manifest, series_files(output, summary, "axial"), SHAPES):
        assert score.dice >= 0.98, f"{label} axial {score}"
        assert score.volume_error <= 0.015, f"{label} axial {score}"


@pytest.mark.parametrize("label", list(GEOMETRIES))
@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_reformatted_overlays_match_the_analytic_shapes(processed: dict[str, Any], label: str, plane: str) -> None:
    manifest, summary, output = processed[label]
    for score in score_series(manifest, series_files(output, summary, plane), SHAPES):
        assert score.dice >= 0.95, f"{label} {plane} {score}"


def test_hollow_sphere_keeps_its_hole(processed: dict[str, Any]) -> None:
    manifest, summary, output = processed["1mm-iso"]
    centre = manifest.roi("hollow_sphere").centre_patient
    from .overlay_check import overlay_points

    for plane in ("axial", "coronal", "sagittal"):
        points, bits = overlay_points(series_files(output, summary, plane))
        distance = ((points - centre) ** 2).sum(axis=1) ** 0.5
        assert not bits[distance < 10].any(), f"{plane}: the hole (r < 12 mm) is filled"
        assert bits[(distance > 14) & (distance < 20)].mean() > 0.95, f"{plane}: the shell is missing"


def test_written_series_follow_the_source(processed: dict[str, Any]) -> None:
    manifest, summary, output = processed["0.98x0.98x2.5"]
    source = pydicom.dcmread(manifest.image_files[0])
    uids = set()
    for plane in ("axial", "coronal", "sagittal"):
        files = series_files(output, summary, plane)
        ds = pydicom.dcmread(files[0])
        assert ds.SOPClassUID == source.SOPClassUID
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds[0x6000, 0x0040].value == "G" and list(ds[0x6000, 0x0050].value) == [1, 1]
        assert ds[0x6000, 0x0100].value == 1 and ds[0x6000, 0x0102].value == 0
        uids.add(ds.SeriesInstanceUID)
    assert len(uids) == 3


def test_axial_pixels_are_untouched(processed: dict[str, Any]) -> None:
    manifest, summary, output = processed["2mm-iso"]
    sources = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f).PixelData for f in manifest.image_files}
    for path in series_files(output, summary, "axial"):
        ds = pydicom.dcmread(path)
        (reference,) = [item.ReferencedSOPInstanceUID for item in ds.SourceImageSequence]
        assert ds.PixelData == sources[reference]


def test_every_written_file_passes_dciodvfy(processed: dict[str, Any]) -> None:
    dciodvfy = require_tool("dciodvfy")
    _, summary, output = processed["2mm-iso"]
    files = [f for plane in ("axial", "coronal", "sagittal") for f in series_files(output, summary, plane)]
    failures = []
    for path in files:
        result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        if errors:
            failures.append(f"{path.name}: {errors[:3]}")
    assert not failures, f"{len(failures)} of {len(files)} files fail dciodvfy: {failures[:5]}"


def test_processing_twice_gives_the_same_uids(prefect_harness: None, processed: dict[str, Any], tmp_path: Path) -> None:
    from flows.process_study import process_study

    manifest, summary, _ = processed["2mm-iso"]
    config = write_config(tmp_path, tmp_path / "data")
    again = process_study(study_dir=str(manifest.image_files[0].parent), config_file=str(config))
    assert [s["series_instance_uid"] for s in again["series"]] == [s["series_instance_uid"] for s in summary["series"]]


def _hash_tree(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _broken(kind: str, source: Path, target: Path) -> None:
    shutil.copytree(source, target)
    slices = sorted(target.glob("CT_*.dcm"))
    if kind == "absent-images":
        slices[len(slices) // 2].unlink()
    elif kind == "no-rtstruct":
        (target / "RS.dcm").unlink()
    elif kind == "truncated":
        data = slices[3].read_bytes()
        slices[3].write_bytes(data[: len(data) // 2])
    elif kind == "mixed-frames":
        ds = pydicom.dcmread(slices[2])
        ds.FrameOfReferenceUID = "1.2.3.4.5.6.7"
        ds.save_as(slices[2])


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("absent-images", "absent from image series"),
        ("no-rtstruct", "no RTSTRUCT"),
        ("truncated", "CT_0004.dcm"),
        ("mixed-frames", "FrameOfReferenceUID"),
    ],
)
def test_broken_input_fails_clearly_and_keeps_every_file(kind: str, expected: str, tmp_path: Path) -> None:
    phantom = tmp_path / "phantom"
    write_phantom(PhantomSpec(rows=48, columns=40, pixel_spacing=(5.0, 5.0), slice_spacing=5.0), phantom)
    study = tmp_path / "study"
    _broken(kind, phantom / "dicom", study)
    before = _hash_tree(study)
    config = write_config(tmp_path, tmp_path / "data")
    result = subprocess.run(
        [sys.executable, "-m", "netrt", "process", str(study), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout + result.stderr, result.stdout + result.stderr
    assert _hash_tree(study) == before, "the input was changed"


def test_netrt_process_command_prints_one_line_per_study_and_delivers(tmp_path: Path) -> None:
    spec = PhantomSpec(rows=48, columns=40, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
    first = write_phantom(spec, tmp_path / "a")
    second = write_phantom(
        PhantomSpec(rows=48, columns=40, pixel_spacing=(5.0, 5.0), slice_spacing=5.0, seed=7), tmp_path / "b"
    )
    both = tmp_path / "both"
    shutil.copytree(tmp_path / "a" / "dicom", both / "a")
    shutil.copytree(tmp_path / "b" / "dicom", both / "b")
    config = write_config(tmp_path, tmp_path / "data", planes="[axial, sagittal]", burn_in="true")
    result = subprocess.run(
        [sys.executable, "-m", "netrt", "process", str(both), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if ": ok: " in line]
    assert sorted(line.split(":")[0] for line in lines) == sorted([first.study_instance_uid, second.study_instance_uid])
    slices = len(first.image_files)
    assert all(
        f"series axial {slices}, sagittal " in line and f", burn-in-axial {slices}, burn-in-sagittal " in line
        for line in lines
    )
    output = tmp_path / "data" / "output"
    for manifest in (first, second):
        series = sorted((output / manifest.study_instance_uid).iterdir())
        assert len(series) == 4  # axial, sagittal, and a burn-in series of each
        for folder in series:
            assert all(
                p.name.endswith(".dcm") and p.stem == pydicom.dcmread(p).SOPInstanceUID for p in folder.iterdir()
            )
