"""NETRT's deployments: serving them next to the listener, and creating flow runs from it.

`netrt serve` runs the deployments in a child process (``python -m flows.serve``), like the local
Prefect server: the listener's threads never share an event loop with Prefect's runner, and a
crash of one does not take the other down. The listener creates one flow run per sealed study
with :func:`trigger_process_study`; the same deployment name works whether the run is picked up
by this served runner or by workers of the ``netrt`` work pool (prefect.yaml).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from flows.local_server import die_with_parent, stop_process_group
from netrt.errors import NetrtError

PROCESS_STUDY_DEPLOYMENT = "process-study/process-study"
RERUN_QUARANTINE_DEPLOYMENT = "rerun-quarantine/rerun-quarantine"


def deployment_exists(name: str) -> bool:
    """True when the API at PREFECT_API_URL knows the deployment ``flow/deployment``."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except ObjectNotFound:
        return False
    return True


def start_flow_server(
    config_file: str | None, env: Mapping[str, str], log_path: Path, ready_timeout: float = 120.0
) -> subprocess.Popen[bytes]:
    """Serve the process-study and rerun-quarantine deployments in a child process.

    Returns once both deployments are registered with the API named by ``env["PREFECT_API_URL"]``,
    so a flow run created right after this call has a runner to pick it up. Raises NetrtError when
    the child exits or does not register them within ``ready_timeout`` seconds (its output is in
    ``log_path``).
    """
    command = [sys.executable, "-m", "flows.serve"]
    if config_file is not None:
        command += ["--config", str(config_file)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    child_env = {**os.environ, **env}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command,
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise NetrtError(f"the flow server exited with code {process.returncode}; see {log_path}")
        try:
            if deployment_exists(PROCESS_STUDY_DEPLOYMENT) and deployment_exists(RERUN_QUARANTINE_DEPLOYMENT):
                return process
        except Exception:  # the API may still be starting; keep polling until the deadline
            pass
        time.sleep(0.5)
    stop_flow_server(process)
    raise NetrtError(f"the flow server did not register its deployments within {ready_timeout:.0f} s; see {log_path}")


def stop_flow_server(process: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM the runner (it lets running flows finish their current step), SIGKILL after ``grace``."""
    stop_process_group(process, grace)


def trigger_process_study(
    study_dir: Path,
    *,
    study_instance_uid: str | None,
    config_file: str | None,
    tags: Sequence[str] = (),
    idempotency_key: str | None = None,
) -> str:
    """Create a process-study flow run for a sealed study and return its id without waiting.

    ``tags`` should carry the source AE title and modality, never patient data (they show in the UI).
    ``idempotency_key`` (e.g. the study's seal id) makes a repeated call after a crash return the
    run created the first time instead of a second one.
    """
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        PROCESS_STUDY_DEPLOYMENT,
        parameters={
            "study_dir": str(study_dir),
            "config_file": config_file,
            "study_instance_uid": study_instance_uid,
        },
        timeout=0,
        tags=list(tags),
        idempotency_key=idempotency_key,
        as_subflow=False,
    )
    return str(flow_run.id)
