"""The flow server `netrt serve` runs: both deployments registered (rerun-quarantine on its cron),
and a flow run created the way the listener creates one is picked up and processes the study."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from uuid import UUID

import pytest

from netrt.layout import DataLayout
from netrt.phantom import PhantomSpec, write_phantom

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_served_deployments_and_a_triggered_run(prefect_harness: None, tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import (
        PROCESS_STUDY_DEPLOYMENT,
        RERUN_QUARANTINE_DEPLOYMENT,
        start_flow_server,
        stop_flow_server,
        trigger_process_study,
    )

    data = tmp_path / "data"
    config = tmp_path / "netrt.yaml"
    config.write_text(f"paths: {{data_dir: {data}}}\nquarantine: {{retry_cron: '7 */2 * * *'}}\n")
    layout = DataLayout.from_data_dir(data).create()
    manifest = write_phantom(PhantomSpec(rows=64, columns=64, pixel_spacing=(3.0, 3.0), slices=30), tmp_path / "p")
    study_dir = layout.studies / manifest.study_instance_uid
    shutil.copytree(tmp_path / "p" / "dicom", study_dir)

    server = start_flow_server(str(config), {"PREFECT_API_URL": str(PREFECT_API_URL.value())}, tmp_path / "serve.log")
    try:
        with get_client(sync_client=True) as client:
            rerun = client.read_deployment_by_name(RERUN_QUARANTINE_DEPLOYMENT)
            assert [s.schedule.cron for s in rerun.schedules] == ["7 */2 * * *"]  # type: ignore[union-attr]
            process = client.read_deployment_by_name(PROCESS_STUDY_DEPLOYMENT)
            assert process.parameters["config_file"] == str(config)

        run_id = trigger_process_study(
            study_dir,
            study_instance_uid=manifest.study_instance_uid,
            config_file=str(config),
            tags=["source-ae:TESTSCU", "modality:CT"],
        )
        deadline = time.monotonic() + 180
        state = None
        with get_client(sync_client=True) as client:
            while time.monotonic() < deadline:
                flow_run = client.read_flow_run(UUID(run_id))
                state = flow_run.state
                if state is not None and state.is_final():
                    break
                time.sleep(1.0)
        assert state is not None and state.is_completed(), (state, (tmp_path / "serve.log").read_text()[-3000:])
        assert {"source-ae:TESTSCU", "modality:CT"} <= set(flow_run.tags)
        assert flow_run.name.startswith("study-")
        assert (layout.processed / manifest.study_instance_uid).is_dir() and not study_dir.exists()
        output = data / "output"
        assert len(list(output.rglob("*.dcm"))) > 0
    finally:
        stop_flow_server(server)
    assert server.poll() is not None
