"""Output kinds through the whole node (issue 17): routing per destination, `source`, per-ROI overlays.

One `netrt process` run, as a user would start it, in a private network namespace with Orthanc
(tests/orthanc.py): the study gets overlay series with one overlay group per ROI, a SEG and a
colour series; a folder destination asks for `overlay` and `seg`, Orthanc for `color` and
`source`. Each must get exactly its kinds, compared instance by instance with what the run wrote
under its work dir. The forwarded source must be a study NETRT's own loader accepts. The per-ROI
overlay groups are checked with readers nobody here wrote: dcmtk's dcm2pnm draws each group where
pydicom reads it, and dciodvfy finds no error in any kind's files.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from netrt.phantom import PhantomSpec, write_phantom
from netrt.study import load_study

from .conftest import require_tool
from .orthanc import Orthanc, OrthancSettings, run_in_namespace

pytestmark = pytest.mark.slow

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def _scenario(params: dict[str, Any]) -> dict[str, Any]:
    root = Path(params["root"])
    config = root / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {root / 'data'}}}\n"
        "anonymization: {mode: full}\n"
        "processing: {outputs: [overlay, seg, color], overlay_groups: per_roi}\n"
        "destinations:\n"
        f"  - {{name: derived, type: folder, path: {root / 'folder'}, outputs: [overlay, seg]}}\n"
        "  - {name: pacs, type: dicom, host: 127.0.0.1, port: 4242, ae_title: ORTHANC, outputs: [color, source]}\n"
    )
    out: dict[str, Any] = {}
    with Orthanc(OrthancSettings(root=root / "orthanc", aet="ORTHANC"), quick_stop=True) as orthanc:
        done = subprocess.run(
            [sys.executable, "-m", "netrt", "process", params["study"], "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        out["code"], out["stdout"], out["stderr"] = done.returncode, done.stdout, done.stderr[-4000:]
        stored = root / "orthanc-files"
        stored.mkdir()
        for uid, data in orthanc.files_by_sop_instance_uid().items():
            (stored / f"{uid}.dcm").write_bytes(data)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("kinds")
    # A registered second CT in the same frame of reference travels with the study (source routing).
    spec = PhantomSpec(
        rows=80, columns=80, pixel_spacing=(2.5, 2.5), slice_spacing=3.0, slices=36, registered_series="shifted"
    )
    manifest = write_phantom(spec, root / "phantom")
    params = {"root": str(root), "study": str(root / "phantom" / "dicom")}
    result: dict[str, Any] = run_in_namespace(_scenario, params, root, timeout=900)
    assert result["code"] == 0, result["stdout"] + result["stderr"]
    result["root"] = root
    result["registered"] = len(manifest.registered_files)
    return result


def _work_series(root: Path) -> dict[str, set[str]]:
    """Written instances by work-dir folder name (axial, coronal, seg, color-axial, ...)."""
    by_folder: dict[str, set[str]] = defaultdict(set)
    for path in (root / "data" / "work").glob("*/*/series/*/*.dcm"):
        by_folder[path.parent.name].add(path.stem)
    return by_folder


def _uids(folder: Path) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in folder.rglob("*.dcm")}


def test_each_destination_gets_exactly_the_kinds_it_lists(run: dict[str, Any]) -> None:
    root = run["root"]
    written = _work_series(root)
    overlay = written["axial"] | written["coronal"] | written["sagittal"]
    color = written["color-axial"] | written["color-coronal"] | written["color-sagittal"]
    assert overlay and color and len(written["seg"]) == 1
    assert _uids(root / "folder") == overlay | written["seg"]

    stored = {p.stem: pydicom.dcmread(p, stop_before_pixels=True) for p in (root / "orthanc-files").glob("*.dcm")}
    classes = defaultdict(set)
    for uid, ds in stored.items():
        classes[str(ds.SOPClassUID)].add(uid)
    assert classes[SC_CLASS] == color, "Orthanc holds exactly the colour series"
    assert len(classes[RTSTRUCT_CLASS]) == 1 and SEG_CLASS not in classes
    source = set(stored) - color
    registered = run["registered"]
    assert registered > 0
    assert len(source) == 36 + 1 + registered, "the CT slices, the RTSTRUCT and the registered series were forwarded"
    assert len({stored[uid].SeriesInstanceUID for uid in source if str(stored[uid].Modality) == "CT"}) == 2
    assert f"pacs {len(color) + 37 + registered} (all stored in this run)" in run["stdout"], run["stdout"]
    assert f"derived {len(overlay) + 1} (all stored in this run)" in run["stdout"], run["stdout"]


def test_forwarded_source_is_the_anonymized_study_and_loads_as_one(run: dict[str, Any], tmp_path: Path) -> None:
    root = run["root"]
    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (root / "phantom/dicom").iterdir()}
    forwarded = []
    for path in (root / "orthanc-files").glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if str(ds.SOPClassUID) != SC_CLASS:
            forwarded.append(path)
            assert ds.SOPInstanceUID not in received, "full mode maps every UID"
            assert ds.PatientName != "PHANTOM^NETRT" and ds.PatientID != "NETRT-PHANTOM-001"
    study = load_study(forwarded)  # NETRT's own loader: references resolve, one stack, one RTSTRUCT
    assert len(study.images.files) == 36 and len(study.registered_files) == run["registered"]


def _render(tool: str, path: Path, out: Path, overlay: int | None) -> np.ndarray:
    args = [tool, "+Ww", "1000000", "1"]
    args += ["-O"] if overlay is None else ["+O", str(overlay), "+Omr", "+Osf", "1"]
    subprocess.run([*args, str(path), str(out)], check=True, capture_output=True, timeout=60)
    return np.asarray(Image.open(out)).astype(np.int32)


def test_dcm2pnm_draws_each_per_roi_overlay_group_where_pydicom_reads_it(run: dict[str, Any], tmp_path: Path) -> None:
    tool = require_tool("dcm2pnm")
    folder = run["root"] / "folder"
    checked = 0
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        if str(ds.SOPClassUID) == SEG_CLASS:
            continue
        groups = [g for g in range(0x6000, 0x6020, 2) if (g, 0x3000) in ds]
        labels = [str(ds[g, 0x1500].value) for g in groups]
        assert labels == ["sphere", "box", "hollow_sphere", "torus"], labels
        overlays = [ds.overlay_array(g).astype(bool) for g in groups]
        if sum(int(o.any()) for o in overlays) < 2:
            continue  # check the slices where at least two ROIs show, so a mix-up of groups is visible
        blank = _render(tool, path, tmp_path / "none.pgm", None)
        for number, overlay in enumerate(overlays, start=1):
            drawn = _render(tool, path, tmp_path / f"o{number}.pgm", number) != blank
            assert np.array_equal(drawn, overlay), f"{path.name}: group {number} ({labels[number - 1]})"
        checked += 1
    assert checked >= 6, f"only {checked} slices showed two ROIs"


def test_every_kind_passes_dciodvfy(run: dict[str, Any]) -> None:
    tool = require_tool("dciodvfy")
    root = run["root"]
    picks = []
    for folder in sorted((root / "data" / "work").glob("*/*/series/*")):
        files = sorted(folder.glob("*.dcm"))
        picks.append(files[len(files) // 2])
    kinds = {p.parent.name for p in picks}
    assert {"axial", "coronal", "sagittal", "seg", "color-axial", "color-coronal", "color-sagittal"} <= kinds
    failures = []
    for path in picks:
        result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        if errors:
            failures.append(f"{path.parent.name}/{path.name}: {errors[:3]}")
    assert not failures, failures
