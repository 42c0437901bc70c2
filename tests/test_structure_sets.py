"""Several RTSTRUCTs on one image series: ``processing.structure_sets`` latest | each | merge (issue 18 item 5).

Studies are the phantom plus RTSTRUCTs written from its own: ``RS.dcm`` becomes structure set
PLAN_A (every ROI, the older), ``RS_B.dcm`` is PLAN_B (newer) holding only the phantom's box,
renamed ``Sphere``, and its torus. So every outcome can be read off the truth: with ``merge`` the
newer PLAN_B's ``Sphere`` (a box) replaces PLAN_A's sphere, so the merged overlay holds no voxel of
the analytic sphere; with ``each`` PLAN_B's series show the box and the torus only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from netrt.config import AnonymizationConfig, ProcessingConfig
from netrt.errors import RoiError, StudyValidationError
from netrt.outputs.base import WrittenSeries
from netrt.phantom import PhantomManifest, PhantomSpec, roi_contains, write_phantom
from netrt.pipeline import (
    anonymize_step,
    compute_mask,
    plan_structure_sets,
    structure_set_studies,
    write_output,
)
from netrt.study import LoadedStudy, load_study

from .conftest import REPO, free_port
from .overlay_check import overlay_points, score_series

SPEC = PhantomSpec(rows=128, columns=128, pixel_spacing=(2.0, 2.0), slice_spacing=2.0)
SHAPES = ["sphere", "box", "hollow_sphere", "torus"]


def structure_set(
    source: Path,
    dest: Path,
    label: str,
    date: str,
    time: str,
    created: tuple[str, str] = ("20250101", "000000"),
    rois: dict[str, str] | None = None,
) -> Path:
    """A copy of the RTSTRUCT ``source`` as another structure set: new SOPInstanceUID, label, dates;
    ``rois`` (old name -> new name) keeps only those ROIs, renamed."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StructureSetLabel = label
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = created
    if rois is not None:
        renamed = {
            int(item.ROINumber): rois[item.ROIName] for item in ds.StructureSetROISequence if item.ROIName in rois
        }
        kept_rois = [item for item in ds.StructureSetROISequence if int(item.ROINumber) in renamed]
        for item in kept_rois:
            item.ROIName = renamed[int(item.ROINumber)]
        ds.StructureSetROISequence = kept_rois
        ds.ROIContourSequence = [i for i in ds.ROIContourSequence if int(i.ReferencedROINumber) in renamed]
        observations = [i for i in ds.RTROIObservationsSequence if int(i.ReferencedROINumber) in renamed]
        for item in observations:
            item.ROIObservationLabel = renamed[int(item.ReferencedROINumber)]
        ds.RTROIObservationsSequence = observations
    ds.save_as(dest, enforce_file_format=True)
    return dest


@pytest.fixture(scope="module")
def phantom_template(tmp_path_factory: pytest.TempPathFactory) -> PhantomManifest:
    return write_phantom(SPEC, tmp_path_factory.mktemp("structure-sets") / "phantom")


@pytest.fixture
def study(phantom_template: PhantomManifest, tmp_path: Path) -> tuple[PhantomManifest, Path, Path, Path]:
    """(manifest, dicom folder, PLAN_A's file, PLAN_B's file) in a fresh copy of the phantom."""
    shutil.copytree(phantom_template.out_dir / "dicom", tmp_path / "dicom")
    dicom = tmp_path / "dicom"
    original = phantom_template.rtstruct_file
    plan_a = structure_set(original, dicom / "RS.dcm", "PLAN_A", "20250101", "080000")
    plan_b = structure_set(
        original, dicom / "RS_B.dcm", "PLAN_B", "20250102", "080000", rois={"box": "Sphere", "torus": "torus"}
    )
    return phantom_template, dicom, plan_a, plan_b


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


def sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def make(
    loaded: LoadedStudy, processing: ProcessingConfig, work: Path, kinds: tuple[str, ...] = ("overlay", "seg")
) -> list[tuple[LoadedStudy, list[WrittenSeries]]]:
    """The mask and output steps of every part of the study, as the flow runs them."""
    made = []
    for part in plan_structure_sets(loaded, "anon-key", processing):
        folder = work / part.key[:12]
        masks = compute_mask(part.study, processing, folder)
        written = [
            series
            for kind in kinds
            for series in write_output(
                part.study, masks, kind, "axial" if kind != "seg" else "study", processing, folder
            )
        ]
        made.append((part.study, written))
    return made


def description(series: WrittenSeries) -> str:
    return str(pydicom.dcmread(series.files[0], stop_before_pixels=True).SeriesDescription)


def segment_labels(series: WrittenSeries) -> list[str]:
    ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    return [str(item.SegmentLabel) for item in ds.SegmentSequence]


def overlay_inside(manifest: PhantomManifest, files: list[Path], roi: str) -> int:
    """How many overlay pixels lie inside the analytic shape ``roi``."""
    points, bits = overlay_points(files)
    return int(np.count_nonzero(bits & roi_contains(manifest.spec, roi, points)))


# --- ordering and latest ----------------------------------------------------------------------


def test_structure_sets_are_ordered_by_their_date_time_then_instance_creation(
    study: tuple[PhantomManifest, Path, Path, Path],
) -> None:
    manifest, dicom, plan_a, plan_b = study
    original = manifest.rtstruct_file
    # Created last of all, but its StructureSetDate is the oldest: the structure set's date decides.
    old_but_recent_file = structure_set(
        original, dicom / "RS_old.dcm", "OLD", "20240101", "080000", ("20301231", "235959")
    )
    # Same StructureSetDate/Time as PLAN_B, created later: newer than PLAN_B.
    plan_c = structure_set(original, dicom / "RS_C.dcm", "PLAN_C", "20250102", "080000", ("20250103", "090000"))
    plan_b_ds = pydicom.dcmread(plan_b)
    assert (plan_b_ds.InstanceCreationDate, plan_b_ds.InstanceCreationTime) == ("20250101", "000000")

    loaded = load_study(files_of(dicom))
    assert loaded.rtstruct_file == plan_c
    assert [info.path for info in loaded.structure_sets] == [plan_c]
    assert {plan_a, plan_b, old_but_recent_file} <= set(loaded.other_files)
    (warning,) = [w for w in loaded.warnings if "RTSTRUCTs reference image series" in w]
    assert warning.startswith("4 RTSTRUCTs reference image series")
    assert (
        "using the newest, RS_C.dcm (StructureSetDate/Time 20250102 080000, InstanceCreationDate/Time 20250103"
        in warning
    )

    # each lists all four newest first: C, B (same date/time, created earlier), A, then OLD
    each = load_study(files_of(dicom), "each")
    assert [info.label for info in each.structure_sets] == ["PLAN_C", "PLAN_B", "PLAN_A", "OLD"]
    assert not {plan_a, plan_b, plan_c, old_but_recent_file} & set(each.other_files)


def test_latest_refuses_two_equally_new_structure_sets_naming_both(
    study: tuple[PhantomManifest, Path, Path, Path],
) -> None:
    manifest, dicom, _, plan_b = study
    twin = structure_set(manifest.rtstruct_file, dicom / "RS_twin.dcm", "TWIN", "20250102", "080000")
    with pytest.raises(StudyValidationError) as caught:
        load_study(files_of(dicom))
    message = str(caught.value)
    assert "equally new" in message and "RS_B.dcm" in message and "RS_twin.dcm" in message
    assert "InstanceCreationDate" in message
    # each and merge process them both, so nothing has to be told apart
    assert {info.path for info in load_study(files_of(dicom), "each").structure_sets} == {
        twin,
        plan_b,
        dicom / "RS.dcm",
    }


def test_latest_processes_the_newest_only_with_the_uids_it_always_had(
    study: tuple[PhantomManifest, Path, Path, Path], tmp_path: Path
) -> None:
    manifest, dicom, _, plan_b = study
    latest = ProcessingConfig(planes=["axial"])
    ((part, written),) = make(load_study(files_of(dicom)), latest, tmp_path / "work")
    assert part.rtstruct_file == plan_b
    overlay, seg = written
    assert description(overlay) == "NETRT axial overlay" and description(seg) == "NETRT segmentation"
    assert segment_labels(seg) == ["Sphere", "torus"]
    for score in score_series(manifest, list(overlay.files), ["box", "torus"]):
        assert score.dice >= 0.98, score
    # merge and each are other settings: their series never take latest's UIDs
    merged = make(
        load_study(files_of(dicom), "merge"), ProcessingConfig(planes=["axial"], structure_sets="merge"), tmp_path / "m"
    )
    ((_, merged_written),) = merged
    assert {s.series_instance_uid for s in merged_written}.isdisjoint({s.series_instance_uid for s in written})


# --- each -------------------------------------------------------------------------------------


def test_each_structure_set_gets_its_own_masks_and_series_with_distinct_stable_uids(
    study: tuple[PhantomManifest, Path, Path, Path], tmp_path: Path
) -> None:
    manifest, dicom, plan_a, plan_b = study
    processing = ProcessingConfig(planes=["axial"], structure_sets="each")
    loaded = load_study(files_of(dicom), "each")
    assert [info.path for info in loaded.structure_sets] == [plan_b, plan_a]
    assert loaded.rtstruct_file == plan_b
    assert (
        "2 RTSTRUCTs reference image series" in loaded.warnings[0] and "each processed on its own" in loaded.warnings[0]
    )
    assert [p.rtstruct_file for p in structure_set_studies(loaded)] == [plan_b, plan_a]

    first = make(loaded, processing, tmp_path / "first")
    (study_b, (overlay_b, seg_b)), (study_a, (overlay_a, seg_a)) = first
    assert study_b.rtstruct_sop_instance_uid == sop(plan_b) and study_a.rtstruct_sop_instance_uid == sop(plan_a)
    assert description(overlay_a) == "NETRT axial overlay [PLAN_A]"
    assert description(overlay_b) == "NETRT axial overlay [PLAN_B]"
    assert description(seg_a) == "NETRT segmentation [PLAN_A]"
    assert description(seg_b) == "NETRT segmentation [PLAN_B]"
    assert segment_labels(seg_a) == SHAPES and segment_labels(seg_b) == ["Sphere", "torus"]
    # each overlay is its own structure set's ROIs, checked against the analytic shapes
    for score in score_series(manifest, list(overlay_a.files), SHAPES):
        assert score.dice >= 0.98, score
    for score in score_series(manifest, list(overlay_b.files), ["box", "torus"]):
        assert score.dice >= 0.98, score
    assert overlay_inside(manifest, list(overlay_b.files), "sphere") == 0
    assert overlay_inside(manifest, list(overlay_a.files), "sphere") > 0

    uids = [s.series_instance_uid for _, written in first for s in written]
    instances = [sop(path) for _, written in first for s in written for path in s.files]
    assert len(set(uids)) == 4 and len(set(instances)) == len(instances)
    # the same study processed again elsewhere: the very same UIDs
    again = make(load_study(files_of(dicom), "each"), processing, tmp_path / "again")
    assert [s.series_instance_uid for _, written in again for s in written] == uids
    assert [sop(path) for _, written in again for s in written for path in s.files] == instances


def test_each_with_one_structure_set_still_names_it_and_keeps_its_uids_apart_from_latest(
    phantom_template: PhantomManifest, tmp_path: Path
) -> None:
    dicom = tmp_path / "dicom"
    shutil.copytree(phantom_template.out_dir / "dicom", dicom)
    each = make(
        load_study(files_of(dicom), "each"),
        ProcessingConfig(planes=["axial"], structure_sets="each"),
        tmp_path / "e",
        ("overlay",),
    )
    latest = make(load_study(files_of(dicom)), ProcessingConfig(planes=["axial"]), tmp_path / "l", ("overlay",))
    ((_, (each_overlay,)),) = each
    ((_, (latest_overlay,)),) = latest
    assert description(each_overlay) == "NETRT axial overlay [NETRT_PHANTOM]"
    assert each_overlay.series_instance_uid != latest_overlay.series_instance_uid


def test_each_fails_naming_the_structure_set_that_keeps_no_roi(
    study: tuple[PhantomManifest, Path, Path, Path], tmp_path: Path
) -> None:
    manifest, dicom, _, plan_b = study
    structure_set(manifest.rtstruct_file, plan_b, "COUCH", "20250102", "080000", rois={"Skull": "Skull"})
    loaded = load_study(files_of(dicom), "each")
    processing = ProcessingConfig(structure_sets="each")
    (couch, plan_a) = structure_set_studies(loaded)
    assert compute_mask(plan_a, processing, tmp_path / "a").kept == SHAPES
    with pytest.raises(RoiError) as caught:
        compute_mask(couch, processing, tmp_path / "b")
    assert "RS_B.dcm" in str(caught.value) and "'COUCH'" in str(caught.value)
    assert "no ROI is left" in str(caught.value)


# --- merge ------------------------------------------------------------------------------------


def test_merge_combines_the_rois_and_the_newer_wins_a_name_clash_with_a_warning(
    study: tuple[PhantomManifest, Path, Path, Path], tmp_path: Path
) -> None:
    manifest, dicom, plan_a, plan_b = study
    processing = ProcessingConfig(planes=["axial"], structure_sets="merge")
    loaded = load_study(files_of(dicom), "merge")
    assert [info.path for info in loaded.structure_sets] == [plan_b, plan_a]
    masks = compute_mask(loaded, processing, tmp_path / "masks")
    # PLAN_B's ROIs first, then PLAN_A's not named in PLAN_B (case and spaces aside)
    assert masks.kept == ["Sphere", "torus", "box", "hollow_sphere"]
    assert [info.number for info in masks.roi_infos] == [1, 2, 3, 4]
    superseded = {r.name: r.reason for r in masks.rois if not r.kept and "superseded" in r.reason}
    assert set(superseded) == {"sphere", "torus"}
    assert "RS_B.dcm" in superseded["sphere"]
    clash = [w for w in masks.warnings if w.startswith("ROI 'sphere'")]
    assert len(clash) == 1
    assert "RS.dcm" in clash[0] and "RS_B.dcm" in clash[0] and "the newer one's is used" in clash[0]
    assert "'PLAN_A'" in clash[0] and "'PLAN_B'" in clash[0]

    ((_, (overlay, seg)),) = make(loaded, processing, tmp_path / "work")
    assert description(overlay) == "NETRT axial overlay"
    assert segment_labels(seg) == ["Sphere", "torus", "box", "hollow_sphere"]
    # one merged overlay: box (twice), hollow sphere and torus; PLAN_A's sphere was replaced
    for score in score_series(manifest, list(overlay.files), ["box", "hollow_sphere", "torus"]):
        assert score.dice >= 0.98, score
    assert overlay_inside(manifest, list(overlay.files), "sphere") == 0


def test_merge_gives_rois_without_a_colour_distinct_fallback_colours_across_files(
    study: tuple[PhantomManifest, Path, Path, Path], tmp_path: Path
) -> None:
    _, dicom, plan_a, plan_b = study

    def without_colours(ds: Dataset) -> None:
        for item in ds.ROIContourSequence:
            del item.ROIDisplayColor

    for path in (plan_a, plan_b):
        ds = pydicom.dcmread(path)
        without_colours(ds)
        ds.save_as(path, enforce_file_format=True)
    masks = compute_mask(load_study(files_of(dicom), "merge"), ProcessingConfig(structure_sets="merge"), tmp_path / "m")
    colours = [info.color for info in masks.roi_infos]
    assert len(colours) == 4 and len(set(colours)) == 4
    assert not any(info.color_from_rtstruct for info in masks.roi_infos)


def test_merge_refuses_a_clash_between_equally_new_structure_sets_naming_both(
    study: tuple[PhantomManifest, Path, Path, Path], tmp_path: Path
) -> None:
    manifest, dicom, _, plan_b = study
    structure_set(manifest.rtstruct_file, plan_b, "PLAN_B", "20250101", "080000", rois={"box": "Sphere"})
    loaded = load_study(files_of(dicom), "merge")
    with pytest.raises(StudyValidationError) as caught:
        compute_mask(loaded, ProcessingConfig(structure_sets="merge"), tmp_path / "masks")
    message = str(caught.value)
    assert "equally new" in message and "RS.dcm" in message and "RS_B.dcm" in message
    assert "'Sphere'" in message and "'sphere'" in message


def test_merge_ignores_a_clash_of_rois_the_patterns_drop(
    study: tuple[PhantomManifest, Path, Path, Path], tmp_path: Path
) -> None:
    manifest, dicom, _, plan_b = study
    # equally new, both hold Skull (dropped by the default ignore_rois): no refusal, no warning
    structure_set(
        manifest.rtstruct_file, plan_b, "PLAN_B", "20250101", "080000", rois={"Skull": "SKULL", "torus": "ring"}
    )
    masks = compute_mask(load_study(files_of(dicom), "merge"), ProcessingConfig(structure_sets="merge"), tmp_path / "m")
    assert masks.kept == [*SHAPES, "ring"]  # equally new: in order of their paths, RS.dcm before RS_B.dcm
    assert not any("SKULL" in w or "Skull" in w for w in masks.warnings)


def test_full_anonymization_keeps_the_received_order_for_merge(
    study: tuple[PhantomManifest, Path, Path, Path], tmp_path: Path
) -> None:
    """Full mode removes the dates that rank the structure sets; the copies keep the received order."""
    _, dicom, plan_a, plan_b = study
    loaded = load_study(files_of(dicom), "merge")
    config = AnonymizationConfig(enabled=True, mode="full")
    result = anonymize_step(loaded, config, b"k" * 32, tmp_path / "anonymized")
    copies = result.study
    assert [info.file_name for info in copies.structure_sets] == ["RS_B.dcm", "RS.dcm"]
    assert {info.sop_instance_uid for info in copies.structure_sets}.isdisjoint({sop(plan_a), sop(plan_b)})
    assert copies.rtstruct_file == copies.structure_sets[0].path
    assert not str(pydicom.dcmread(copies.rtstruct_file).get("StructureSetDate", ""))  # the date really is gone
    masks = compute_mask(copies, ProcessingConfig(structure_sets="merge"), tmp_path / "masks")
    assert masks.kept == ["Sphere", "torus", "box", "hollow_sphere"]


# --- other image series -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["each", "merge"])
def test_an_rtstruct_on_another_image_series_is_kept_not_processed(mode: str, tmp_path: Path) -> None:
    manifest = write_phantom(
        PhantomSpec(rows=64, columns=64, pixel_spacing=(4.0, 4.0), slice_spacing=4.0, registered_series="shifted"),
        tmp_path / "phantom",
    )
    dicom = manifest.out_dir / "dicom"
    registered_series = str(pydicom.dcmread(manifest.registered_files[0], stop_before_pixels=True).SeriesInstanceUID)

    def on_registered(ds: Dataset) -> None:
        series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        series.SeriesInstanceUID = registered_series
        del series.ContourImageSequence
        for roi in ds.ROIContourSequence:
            for contour in roi.ContourSequence:
                del contour.ContourImageSequence

    other = structure_set(manifest.rtstruct_file, dicom / "RS_MR.dcm", "ON_MR", "20200101", "080000")
    ds = pydicom.dcmread(other)
    on_registered(ds)
    ds.save_as(other, enforce_file_format=True)

    loaded = load_study(files_of(dicom), mode)
    assert [info.path for info in loaded.structure_sets] == [manifest.rtstruct_file]
    assert other in loaded.other_files
    (warning,) = [w for w in loaded.warnings if "RS_MR.dcm" in w]
    assert "kept with the study but not processed" in warning and registered_series in warning


# --- end to end: netrt process with each ------------------------------------------------------


@pytest.mark.slow
def test_netrt_process_each_delivers_the_series_of_every_structure_set(
    study: tuple[PhantomManifest, Path, Path, Path], tmp_path: Path
) -> None:
    manifest, dicom, plan_a, plan_b = study
    data = tmp_path / "data"
    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {data}}}\nprefect: {{server_port: {free_port()}}}\n"
        "processing: {structure_sets: each, planes: [axial], outputs: [overlay, seg]}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    result = subprocess.run(
        [sys.executable, "-m", "netrt", "process", str(dicom), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ROIs PLAN_B: Sphere, PLAN_B: torus, PLAN_A: sphere" in result.stdout
    assert "axial [PLAN_B]" in result.stdout and "seg [PLAN_A]" in result.stdout
    # one preview per structure set, the newest first, each of its own ROIs
    shown = [line.split(": ", 1) for line in result.stdout.splitlines() if line.startswith("preview")]
    assert [label for label, _ in shown] == ["preview [PLAN_B]", "preview [PLAN_A]"], result.stdout
    pngs = [Path(path) for _, path in shown]
    assert all(png.read_bytes().startswith(b"\x89PNG") for png in pngs)
    assert pngs[0].read_bytes() != pngs[1].read_bytes()

    (delivered,) = (data / "output").iterdir()
    by_description: dict[str, list[Path]] = {}
    for folder in delivered.iterdir():
        files = sorted(folder.glob("*.dcm"))
        described = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription) for p in files}
        (name,) = described
        by_description[name] = files
    assert set(by_description) == {
        "NETRT axial overlay [PLAN_A]",
        "NETRT axial overlay [PLAN_B]",
        "NETRT segmentation [PLAN_A]",
        "NETRT segmentation [PLAN_B]",
    }
    for score in score_series(manifest, by_description["NETRT axial overlay [PLAN_A]"], SHAPES):
        assert score.dice >= 0.98, score
    for score in score_series(manifest, by_description["NETRT axial overlay [PLAN_B]"], ["box", "torus"]):
        assert score.dice >= 0.98, score

    events = [json.loads(line) for line in (data / "logs" / "transactions.jsonl").read_text().splitlines()]
    (processed,) = [e for e in events if e["event"] == "processed"]
    assert processed["structure_sets"] == [sop(plan_b), sop(plan_a)]  # partial mode keeps the UIDs
    (summary,) = (data / "work").glob("*/summary.md")
    text = summary.read_text()
    assert "## Structure sets processed" in text and "PLAN_A" in text and "PLAN_B" in text
    assert "each processed on its own" in text
    assert f"Preview of PLAN_B (axial, coronal, sagittal): `{pngs[0]}`" in text
    assert f"Preview of PLAN_A (axial, coronal, sagittal): `{pngs[1]}`" in text


@pytest.mark.slow
def test_the_flow_merges_in_full_mode_with_the_received_order_and_names(
    prefect_harness: None, study: tuple[PhantomManifest, Path, Path, Path], tmp_path: Path
) -> None:
    """Full anonymization through the process-study flow: the copies lose the dates, the newer
    structure set still wins the clash, and the warnings name the received files, no received UID."""
    from flows.process_study import process_study

    manifest, dicom, plan_a, plan_b = study
    data = tmp_path / "data"
    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {data}}}\nprefect: {{server_port: {free_port()}}}\n"
        "anonymization: {enabled: true, mode: full}\n"
        "processing: {structure_sets: merge, planes: [axial], outputs: [overlay]}\n"
    )
    summary = process_study(study_dir=str(dicom), config_file=str(config))
    assert summary["rois_kept"] == ["Sphere", "torus", "box", "hollow_sphere"]
    assert len(summary["structure_sets"]) == 2
    (clash,) = [w for w in summary["warnings"] if w.startswith("ROI 'sphere'")]
    assert "RS_B.dcm" in clash and "RS.dcm" in clash and "the newer one's is used" in clash
    received = {sop(plan_a), sop(plan_b), manifest.study_instance_uid}
    text = json.dumps(summary)
    assert not any(uid in text for uid in received)

    ((series,),) = [[s for s in summary["series"] if s["kind"] == "overlay"]]
    files = sorted((data / "output" / summary["study_instance_uid"] / series["series_instance_uid"]).glob("*.dcm"))
    for score in score_series(manifest, files, ["box", "hollow_sphere", "torus"]):
        assert score.dice >= 0.98, score
    assert overlay_inside(manifest, files, "sphere") == 0
