"""The `process-study` flow: one run per study, each step a thin task over `netrt.pipeline`.

Tasks exchange paths, UIDs and small reports only. Run names carry a short pseudonymous study id
(a hash of the StudyInstanceUID), never patient data.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.runtime import flow_run

from netrt.config import DicomDestination, FolderDestination, ProcessingConfig, load_config
from netrt.deliver import DeliveryOutcome, deliver_to_folder
from netrt.errors import NetrtError
from netrt.layout import DataLayout
from netrt.pipeline import MaskStepResult, WrittenSeries, compute_mask, write_plane
from netrt.study import LoadedStudy, find_study, load_study


def short_study_id(study_instance_uid: str) -> str:
    """8 hex characters of a hash of the StudyInstanceUID: tells runs apart, reveals nothing."""
    return hashlib.sha256(study_instance_uid.encode("ascii")).hexdigest()[:8]


def _run_name() -> str:
    parameters = flow_run.parameters or {}
    key = str(parameters.get("study_instance_uid") or parameters.get("study_dir") or "")
    return f"study-{short_study_id(key)}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"


@task(name="validate")
def validate(study_dir: str, study_instance_uid: str | None) -> LoadedStudy:
    return load_study(find_study(Path(study_dir), study_instance_uid).files)


@task(name="extract-masks")
def extract_masks(study: LoadedStudy, processing: ProcessingConfig, work_dir: str) -> MaskStepResult:
    return compute_mask(study, processing, Path(work_dir))


@task(name="write-plane", task_run_name="write-{plane}")
def write_plane_series(
    study: LoadedStudy, masks: MaskStepResult, plane: str, processing: ProcessingConfig, work_dir: str
) -> list[WrittenSeries]:
    return write_plane(study, masks, plane, processing, Path(work_dir))


@task(name="deliver", task_run_name="deliver-{destination.name}")
def deliver(destination: FolderDestination | DicomDestination, files: list[Path]) -> DeliveryOutcome:
    if isinstance(destination, FolderDestination):
        return deliver_to_folder(destination.name, destination.path, files)
    raise NetrtError(f"destination {destination.name!r}: C-STORE delivery is not implemented yet")


@flow(name="process-study", flow_run_name=_run_name)
def process_study(
    study_dir: str, config_file: str | None = None, study_instance_uid: str | None = None
) -> dict[str, Any]:
    """Validate, mask, write each configured plane, deliver to every destination; return a summary."""
    config = load_config(config_file)
    layout = DataLayout.from_data_dir(config.paths.data_dir).create()
    study = validate(study_dir, study_instance_uid)
    work_dir = str(layout.study_dir(layout.work, study.study_instance_uid))
    masks = extract_masks(study, config.processing, work_dir)
    futures = [
        write_plane_series.submit(study, masks, plane, config.processing, work_dir)
        for plane in config.processing.planes
    ]
    written = [series for future in futures for series in future.result()]
    files = [path for series in written for path in series.files]
    outcomes = [deliver(destination, files) for destination in config.effective_destinations()]
    return {
        "study_instance_uid": study.study_instance_uid,
        "rois_kept": masks.kept,
        "rois_ignored": masks.ignored,
        "mask_voxels": masks.voxel_count,
        "warnings": [*study.warnings, *masks.warnings],
        "series": [
            {
                "plane": s.plane,
                "burn_in": s.burn_in,
                "series_instance_uid": s.series_instance_uid,
                "instances": len(s.files),
            }
            for s in written
        ],
        "destinations": [{"name": o.destination, "instances": o.instances_sent, "ok": o.ok} for o in outcomes],
    }
