"""`netrt doctor` (issue 19 part 5) against a running node and a stopped destination.

The node is a real ListenerService on 127.0.0.1 (the DICOM listener `netrt serve` runs); the
destination that is up is that same listener (it answers C-ECHO), the one that is down is a port on
127.0.0.1 where nothing listens (a stopped Orthanc looks the same to a C-ECHO: connection refused).
Each case runs the real command in a subprocess and reads its lines and exit status. One case
runs it against a real Orthanc (in a private network namespace, tests/orthanc.py) while it runs
and after it is stopped.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from listener.service import ListenerService

from .conftest import free_port
from .listener_helpers import RecordingTrigger, listener_config, running_listener

LOCALHOST = "127.0.0.1"


def doctor(config: Path) -> tuple[int, dict[str, str], str]:
    """Exit status, each check's line by its name, and the whole output."""
    done = subprocess.run(
        [sys.executable, "-m", "netrt", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = {}
    for line in done.stdout.splitlines():
        if line[:4].strip() in ("ok", "FAIL", "info") and ": " in line:
            lines[line[5:].split(": ", 1)[0]] = line
    return done.returncode, lines, done.stdout + done.stderr


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ListenerService]:
    with running_listener(listener_config(tmp_path / "data"), RecordingTrigger()) as service:
        yield service


def _config(tmp_path: Path, node: ListenerService, destinations: str, extra: str = "") -> Path:
    host, port = node.address
    path = tmp_path / "netrt.yaml"
    path.write_text(
        f"paths: {{data_dir: {tmp_path / 'data'}}}\n"
        f"listener: {{host: {host}, port: {port}, ae_title: NETRT}}\n"
        f"prefect: {{server_port: {free_port()}}}\n"
        f"destinations:\n{destinations}{extra}"
    )
    return path


def _dicom(name: str, port: int, ae: str) -> str:
    fields = f"name: {name}, type: dicom, ae_title: {ae}, host: {LOCALHOST}, port: {port}, connect_timeout_seconds: 3"
    return f"  - {{{fields}}}\n"


def test_all_checks_pass_against_a_running_node_and_a_destination_that_answers(
    tmp_path: Path, node: ListenerService
) -> None:
    config = _config(tmp_path, node, _dicom("pacs", node.address[1], "NETRT"))
    code, lines, output = doctor(config)
    assert code == 0, output
    assert lines["config"].startswith("ok ")
    assert lines["data dir"].startswith("ok ") and "GiB free" in lines["data dir"]
    # The port is taken, by us: the running listener answers C-ECHO as our AE.
    assert lines["listener port"].startswith("ok ") and "is ours" in lines["listener port"], output
    assert lines["Prefect API"].startswith("ok "), output
    assert lines["destination pacs"].startswith("ok ") and "answers C-ECHO" in lines["destination pacs"]
    assert output.rstrip().endswith("checks passed")


def test_a_stopped_destination_fails_its_line_names_it_and_exits_1(tmp_path: Path, node: ListenerService) -> None:
    down = free_port()  # nothing listens there: what a stopped Orthanc answers (connection refused)
    destinations = _dicom("orthanc", down, "ORTHANC") + _dicom("pacs", node.address[1], "NETRT")
    config = _config(tmp_path, node, destinations)
    code, lines, output = doctor(config)
    assert code == 1, output
    failed = [line for line in output.splitlines() if line.startswith("FAIL")]
    assert failed == [lines["destination orthanc"]], output  # that line only
    assert f"ORTHANC@{LOCALHOST}:{down}" in failed[0] and "-> fix: " in failed[0]
    assert "netrt echo orthanc" in failed[0]
    assert lines["destination pacs"].startswith("ok ")
    assert lines["listener port"].startswith("ok ")
    assert "1 of" in output and "checks failed: destination orthanc" in output


def test_port_held_by_another_program_and_an_unreachable_api_fail_with_their_fixes(tmp_path: Path) -> None:
    with socket.socket() as other:  # a program on the listener's port that does not speak DICOM
        other.bind((LOCALHOST, 0))
        other.listen(1)
        port = other.getsockname()[1]
        api = f"http://{LOCALHOST}:{free_port()}/api"
        config = tmp_path / "netrt.yaml"
        config.write_text(
            f"paths: {{data_dir: {tmp_path / 'data'}}}\n"
            f"listener: {{host: {LOCALHOST}, port: {port}}}\nprefect: {{api_url: '{api}'}}\n"
        )
        code, lines, output = doctor(config)
    assert code == 1, output
    assert lines["listener port"].startswith("FAIL") and f"{LOCALHOST}:{port} is in use" in lines["listener port"]
    assert "set listener.port" in lines["listener port"]
    assert lines["Prefect API"].startswith("FAIL") and api in lines["Prefect API"]
    assert "prefect.api_url" in lines["Prefect API"]


def test_an_invalid_config_is_the_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("listener: {port: many}\n")
    code, lines, output = doctor(config)
    assert code == 1
    assert list(lines) == ["config"] and "listener.port" in lines["config"], output


def _scenario_orthanc(params: dict[str, object]) -> dict[str, object]:
    """Inside a private network namespace: doctor against a real Orthanc while it runs, then stopped."""
    from .orthanc import Orthanc, OrthancSettings

    root = Path(str(params["root"]))
    config = root / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {root / 'data'}}}\n"
        f"listener: {{host: {LOCALHOST}, port: 11112, ae_title: NETRT}}\n"
        f"prefect: {{server_port: {free_port()}}}\n"
        f"destinations:\n{_dicom('orthanc', 4242, 'ORTHANC')}"
    )
    orthanc = Orthanc(OrthancSettings(root=root / "orthanc", aet="ORTHANC"), quick_stop=True)
    orthanc.start()
    try:
        running = doctor(config)
    finally:
        orthanc.stop()
    stopped = doctor(config)
    return {"running": list(running), "stopped": list(stopped)}


def test_a_real_orthanc_passes_while_it_runs_and_fails_its_line_once_stopped(tmp_path: Path) -> None:
    from .orthanc import require_orthanc, run_in_namespace

    require_orthanc()
    result = run_in_namespace(_scenario_orthanc, {"root": str(tmp_path)}, tmp_path, timeout=300)
    code, lines, output = result["running"]
    assert code == 0, output
    assert lines["destination orthanc"].startswith("ok ") and "answers C-ECHO" in lines["destination orthanc"]
    code, lines, output = result["stopped"]
    assert code == 1, output
    failed = [line for line in output.splitlines() if line.startswith("FAIL")]
    assert failed == [lines["destination orthanc"]], output
    assert f"ORTHANC@{LOCALHOST}:4242" in failed[0] and "-> fix: " in failed[0]
