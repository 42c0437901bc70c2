"""The process-study flow as a record users steer from the Prefect UI: retries as configured,
cache hits on re-runs, artifacts on every run, quarantine with a reason, and its retries
(by `netrt quarantine retry` and by the scheduled `rerun-quarantine` flow).

Destinations here are a real pynetdicom storage SCP on 127.0.0.1 (tests/store_scp.py) that can
refuse stores on cue; the Prefect server is the session's test server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest

from netrt.burnin import outline
from netrt.layout import DataLayout
from netrt.logs import TransactionLog
from netrt.phantom import PhantomSpec, roi_definitions, truth_masks, write_phantom
from netrt.preview import preview_panels, read_preview

from .conftest import REPO, free_port
from .store_scp import store_scp

pytestmark = [pytest.mark.slow, pytest.mark.network]

SPEC = PhantomSpec(rows=128, columns=128, pixel_spacing=(2.0, 2.0), slice_spacing=3.0)
KEPT = ["sphere", "box", "hollow_sphere", "torus"]
CACHED_TASKS = ["anonymize", "extract-masks", "write-axial", "write-coronal", "write-sagittal", "preview"]


def _config(tmp: Path, data: Path, port: int, *, retries: int = 0, extra: str = "") -> Path:
    path = tmp / "netrt.yaml"
    path.write_text(
        f"paths: {{data_dir: {data}}}\n"
        "destinations:\n"
        f"  - {{name: pacs, type: dicom, ae_title: TESTPACS, host: 127.0.0.1, port: {port}, "
        f"retries: {retries}, retry_delay_seconds: 0, connect_timeout_seconds: 2}}\n" + extra
    )
    return path


def _received_study(tmp: Path, layout: DataLayout, seed: int = 0) -> tuple[Path, str]:
    """A phantom placed in studies/<uid>/ the way the listener seals a received study."""
    manifest = write_phantom(PhantomSpec(**{**SPEC.__dict__, "seed": seed}), tmp / f"phantom-{seed}")
    target = layout.studies / manifest.study_instance_uid
    shutil.copytree(tmp / f"phantom-{seed}" / "dicom", target)
    return target, manifest.study_instance_uid


def _task_states(flow_run_id: str) -> dict[str, tuple[str, int]]:
    """task-run name without its random suffix -> (state name, run count), read from the API."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    states = {}
    for run in runs:
        name = run.name if run.name.startswith(("write-", "deliver-")) else run.name.rsplit("-", 1)[0]
        assert run.state is not None
        states[name] = (run.state.name, run.run_count)
    return states


def _artifacts(flow_run_id: str) -> dict[str, Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]))
        )
    return {str(a.key): a for a in found}


def test_retries_as_configured_artifacts_and_cache_on_rerun(prefect_harness: None, tmp_path: Path) -> None:
    """A destination that refuses twice then works gets the study (3 runs of the deliver task);
    each run has its summary and a preview that shows the mask where the analytic truth is; a
    second run of the unchanged study does no anonymize, mask, write or preview work."""
    from flows.process_study import process_study

    write_phantom(SPEC, tmp_path / "phantom")
    source = tmp_path / "phantom" / "dicom"
    with store_scp(fail_first_associations=2) as pacs:
        config = _config(tmp_path, tmp_path / "data", pacs.port, retries=3)
        first = process_study(study_dir=str(source), config_file=str(config))
        assert pacs.refused > 0 and pacs.associations == 3
        total = sum(s["instances"] for s in first["series"])
        assert total > 0 and len(pacs.stored) == total and set(pacs.stored.values()) == {1}

        states = _task_states(first["flow_run_id"])
        assert states["deliver-pacs"] == ("Completed", 3), states
        assert all(states[name][0] == "Completed" for name in CACHED_TASKS), states

        # The run's artifacts: markdown summary with ROI voxel counts, series, destination, times.
        artifacts = _artifacts(first["flow_run_id"])
        (summary_key,) = [k for k in artifacts if k.endswith("-summary")]
        markdown = str(artifacts[summary_key].data)
        for name in [*KEPT, "Skull", "Patient_Outline"]:
            assert f"| {name} |" in markdown
        assert "| pacs | delivered |" in markdown and "## Time per stage" in markdown
        for series in first["series"]:
            assert f"| {series['instances']} | `{series['series_instance_uid']}` |" in markdown

        # The preview: shown in the run as an image, saved under the data dir, mask where the truth is.
        (preview_key,) = [k for k in artifacts if k.endswith("-preview")]
        url = str(artifacts[preview_key].data)
        png = Path(first["preview"])
        assert png.is_relative_to(tmp_path / "data")
        assert base64.b64decode(url.removeprefix("data:image/png;base64,")) == png.read_bytes()
        _assert_preview_matches_truth(png)

        written = {p: p.stat().st_mtime_ns for p in (tmp_path / "data" / "work").rglob("*.dcm")}
        second = process_study(study_dir=str(source), config_file=str(config))
        states = _task_states(second["flow_run_id"])
        assert all(states[name][0] == "Cached" for name in CACHED_TASKS), states
        assert states["deliver-pacs"][0] == "Completed", "delivery is never cached"
        assert {p: p.stat().st_mtime_ns for p in written} == written, "a cache hit must not rewrite files"
        assert [s["cached"] for s in second["stages"] if s["stage"] == "write"] == [True]
        assert second["series"] == first["series"]


def _assert_preview_matches_truth(png: Path) -> None:
    """Each kept ROI's outline is drawn in its RTSTRUCT colour where the analytic truth's boundary is
    (within one panel pixel: the rasterised contour and the analytic solid may differ by a voxel)."""
    masks = truth_masks(SPEC)
    truth = np.zeros_like(next(iter(masks.values())))
    for name in KEPT:
        truth |= masks[name]
    colors = {roi.name: roi.color for roi in roi_definitions(SPEC)}
    pixels = read_preview(png)
    spacing = (SPEC.pixel_spacing[1], SPEC.pixel_spacing[0], SPEC.slice_spacing)
    drawn = set()
    for panel in preview_panels(truth, spacing):
        shown = pixels[panel.y0 : panel.y0 + panel.height, panel.x0 : panel.x0 + panel.width]
        for name in KEPT:
            expected = outline(panel.sample(masks[name]))
            if expected.sum() < 10:
                continue
            painted = np.pad(np.all(shown == np.asarray(colors[name], dtype=np.uint8), axis=2), 1)
            near = np.zeros_like(expected)
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    near |= painted[1 + dr : painted.shape[0] - 1 + dr, 1 + dc : painted.shape[1] - 1 + dc]
            share = (near & expected).sum() / expected.sum()
            assert share >= 0.9, f"{panel.plane} preview: {name}'s outline in {colors[name]} on {share:.0%}"
            drawn.add(name)
    assert drawn == set(KEPT), f"ROIs no panel cuts: {set(KEPT) - drawn}"


def _run_cli(*args: str, config: Path, api_url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_API_URL"] = api_url
    return subprocess.run(
        [sys.executable, "-m", "netrt", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )


def test_failed_delivery_is_quarantined_and_retry_delivers_without_recomputing(
    prefect_harness: None, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL

    from flows.process_study import process_study
    from netrt.errors import StudyFailedError

    api_url = str(PREFECT_API_URL.value())
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    study_dir, uid = _received_study(tmp_path, layout)
    before = {p.name: p.read_bytes() for p in study_dir.iterdir()}
    port = free_port()  # nothing listens here yet: the destination is down
    config = _config(tmp_path, layout.root, port, retries=1, extra=f"prefect: {{api_url: {api_url}}}\n")

    with pytest.raises(StudyFailedError) as failure:
        process_study(study_dir=str(study_dir), config_file=str(config))
    assert failure.value.stage == "deliver" and failure.value.retryable
    assert "pacs" in str(failure.value) and "unreachable" in str(failure.value)
    assert not study_dir.exists()
    entry = layout.quarantine / uid
    assert {p.name: p.read_bytes() for p in (entry / "input").iterdir()} == before, "input must stay untouched"
    reason = json.loads((entry / "reason.json").read_text())
    assert reason["stage"] == "deliver" and reason["attempts"] == 1 and reason["retryable"] is True
    assert "pacs" in reason["error"] and "unreachable" in reason["error"] and reason["flow_run_id"]

    listing = _run_cli("quarantine", "list", config=config, api_url=api_url)
    assert listing.returncode == 0, listing.stderr
    assert uid in listing.stdout and "stage=deliver" in listing.stdout and "attempts=1" in listing.stdout

    with store_scp(port=port) as pacs:
        retry = _run_cli("quarantine", "retry", "--all", config=config, api_url=api_url)
        assert retry.returncode == 0, retry.stdout + retry.stderr
        assert len(pacs.stored) > 0 and set(pacs.stored.values()) == {1}, "every instance exactly once"
    assert not entry.exists(), "a delivered study leaves the quarantine"
    assert {p.name for p in (layout.processed / uid).iterdir()} == set(before)

    events = TransactionLog(layout.transaction_log).entries()
    runs = [e["flow_run_id"] for e in events if e["event"] == "flow_run_started"]
    assert len(runs) == 2
    states = _task_states(runs[-1])
    assert all(states[name][0] == "Cached" for name in CACHED_TASKS), states
    assert [e["event"] for e in events].count("released_from_quarantine") == 1
    delivered = [e for e in events if e["event"] == "delivered"]
    assert delivered[-1]["destination"] == "pacs" and delivered[-1]["flow_run_id"] == runs[-1]


def test_validation_failure_is_quarantined_untouched_and_not_rerun_on_schedule(
    prefect_harness: None, tmp_path: Path
) -> None:
    from flows.process_study import process_study
    from flows.rerun_quarantine import rerun_quarantine
    from netrt.errors import StudyFailedError

    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    broken_dir, broken_uid = _received_study(tmp_path, layout, seed=1)
    (broken_dir / "RS.dcm").unlink()
    good_dir, good_uid = _received_study(tmp_path, layout, seed=2)
    port = free_port()
    config = _config(tmp_path, layout.root, port, extra="quarantine: {max_attempts: 2}\n")

    with pytest.raises(StudyFailedError) as failure:
        process_study(study_dir=str(broken_dir), config_file=str(config))
    assert failure.value.stage == "validate" and not failure.value.retryable
    assert "RTSTRUCT" in str(failure.value)
    with pytest.raises(StudyFailedError):
        process_study(study_dir=str(good_dir), config_file=str(config))  # destination down

    # Scheduled re-run with the destination still down: the retryable study fails again (attempt 2),
    # the validation failure is not touched.
    with pytest.raises(Exception, match="1 of 1 quarantined studies failed again"):
        rerun_quarantine(config_file=str(config))
    broken = json.loads((layout.quarantine / broken_uid / "reason.json").read_text())
    good = json.loads((layout.quarantine / good_uid / "reason.json").read_text())
    assert broken["attempts"] == 1 and broken["stage"] == "validate" and broken["retryable"] is False
    assert good["attempts"] == 2 and good["stage"] == "deliver"

    # At max_attempts nothing is eligible any more, even with the destination back.
    with store_scp(port=port) as pacs:
        assert rerun_quarantine(config_file=str(config))["eligible"] == 0
        assert not pacs.stored
    assert (layout.quarantine / good_uid / "input").is_dir()


def test_rerun_quarantine_delivers_healed_studies(prefect_harness: None, tmp_path: Path) -> None:
    from flows.process_study import process_study
    from flows.rerun_quarantine import rerun_quarantine
    from netrt.errors import StudyFailedError

    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    study_dir, uid = _received_study(tmp_path, layout, seed=3)
    port = free_port()
    config = _config(tmp_path, layout.root, port)
    with pytest.raises(StudyFailedError):
        process_study(study_dir=str(study_dir), config_file=str(config))
    with store_scp(port=port) as pacs:
        summary = rerun_quarantine(config_file=str(config))
        assert summary["succeeded"] == [uid] and summary["failed"] == []
        assert len(pacs.stored) > 0
    assert not (layout.quarantine / uid).exists()
    assert (layout.processed / uid).is_dir()


def test_a_run_for_a_study_reopened_by_the_listener_leaves_it_alone(prefect_harness: None, tmp_path: Path) -> None:
    """The listener moved studies/<uid> back to incoming/ (more instances came): the queued run ends
    without touching it and without a quarantine entry; a run for a folder found nowhere fails clearly."""
    from flows.process_study import process_study
    from netrt.errors import StudyFailedError

    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    study_dir, uid = _received_study(tmp_path, layout, seed=4)
    study_dir.rename(layout.incoming / uid)
    config = _config(tmp_path, layout.root, free_port())
    summary = process_study(study_dir=str(study_dir), config_file=str(config))
    assert summary["skipped"] == "re-opened"
    assert (layout.incoming / uid).is_dir() and not list(layout.quarantine.iterdir())

    with pytest.raises(StudyFailedError, match="in none of studies/, processed/ or quarantine/"):
        process_study(study_dir=str(layout.studies / "1.2.3.999"), config_file=str(config))
    assert not list(layout.quarantine.iterdir())


def test_full_mode_failure_messages_carry_no_identity_and_map_uids(prefect_harness: None, tmp_path: Path) -> None:
    """A study that fails validation with full anonymization on: the flow's error, reason.json and the
    transaction log name it by its mapped UID, never by its received UIDs or patient identity."""
    from flows.process_study import process_study
    from netrt.anonymize import load_or_create_secret, map_uid
    from netrt.config import load_config
    from netrt.errors import StudyFailedError

    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    spec = PhantomSpec(**{**SPEC.__dict__, "seed": 5, "patient_name": "SECRETNAME^GIVEN", "patient_id": "PID-778899"})
    manifest = write_phantom(spec, tmp_path / "phantom")
    study_dir = layout.studies / manifest.study_instance_uid
    shutil.copytree(tmp_path / "phantom" / "dicom", study_dir)
    (study_dir / "RS.dcm").unlink()
    config = _config(tmp_path, layout.root, free_port(), extra="anonymization: {enabled: true, mode: full}\n")

    with pytest.raises(StudyFailedError) as failure:
        process_study(study_dir=str(study_dir), config_file=str(config))
    secret = load_or_create_secret(load_config(config).anonymization, layout.root)
    mapped = map_uid(manifest.study_instance_uid, secret)
    reason = (layout.quarantine / manifest.study_instance_uid / "reason.json").read_text()
    log = layout.transaction_log.read_text()
    from netrt.quarantine import list_entries

    (entry,) = list_entries(layout)
    assert f"study={mapped}" in entry.summary_line(), "`netrt quarantine list` must show the study UID the error names"
    for text in (str(failure.value), reason, log):
        assert mapped in text, "the study must still be named, by its mapped UID"
        for needle in (manifest.study_instance_uid, "SECRETNAME", "PID-778899"):
            assert needle not in text, f"{needle!r} leaked into {text[:300]}"


def test_progress_artifacts_reach_100_percent_and_the_roi_table_has_volumes_and_colours(
    prefect_harness: None, tmp_path: Path
) -> None:
    """The Prefect UI shows the long stages' progress (series written, instances stored per
    destination) as progress artifacts that end at 100 % with the true counts, a table artifact of
    the ROIs (kept, voxels, volume in cm³, colour), and the summary's ROI table with colour swatches."""
    import json

    import pydicom
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.process_study import process_study

    manifest = write_phantom(SPEC, tmp_path / "phantom")
    copies = tmp_path / "copies"
    with store_scp() as pacs:
        config = _config(
            tmp_path, tmp_path / "data", pacs.port, extra=f"  - {{name: copy, type: folder, path: {copies}}}\n"
        )
        summary = process_study(study_dir=str(tmp_path / "phantom" / "dicom"), config_file=str(config))
    total = sum(s["instances"] for s in summary["series"])
    assert len(pacs.stored) == total

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(summary["flow_run_id"])]))
        )
    progress = {str(a.description): float(a.data) for a in found if a.type == "progress"}  # type: ignore[arg-type]
    assert progress == {
        f"series written: {len(summary['series'])} of {len(summary['series'])}": 100.0,
        f"instances stored at pacs: {total} of {total}": 100.0,
        f"instances stored at copy: {total} of {total}": 100.0,
    }, progress

    (table,) = [a for a in found if a.type == "table"]
    rows = {row["name"]: row for row in json.loads(str(table.data))}
    rtstruct = pydicom.dcmread(manifest.rtstruct_file)
    numbers = {str(r.ROIName): int(r.ROINumber) for r in rtstruct.StructureSetROISequence}
    colours = {int(c.ReferencedROINumber): [int(v) for v in c.ROIDisplayColor] for c in rtstruct.ROIContourSequence}
    voxel_mm3 = SPEC.pixel_spacing[0] * SPEC.pixel_spacing[1] * SPEC.slice_spacing
    for name in KEPT:
        row = rows[name]
        assert row["kept"] and row["voxels"] > 0
        assert abs(row["volume_cm3"] - row["voxels"] * voxel_mm3 / 1000) < 0.001
        assert row["color"] == "#{:02x}{:02x}{:02x}".format(*colours[numbers[name]])
    assert not rows["Skull"]["kept"] and rows["Skull"]["color"] == ""
    markdown = (tmp_path / "data" / "work" / summary["study_instance_uid"] / "summary.md").read_text()
    assert f'<span style="color:{rows["box"]["color"]}">&#9632;</span>' in markdown
