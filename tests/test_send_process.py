"""`netrt process` and `netrt quarantine retry` delivering to a real Orthanc (issue 7's done-when).

One scenario runs the commands as a user would, inside a private network namespace with Orthanc
(see tests/orthanc.py): a study processed twice, a second study processed while Orthanc is down
and retried from quarantine after it is back, and a destination with a wrong called AE title.
What Orthanc received is observed from its side: the REST API (what it stores), a Lua filter
logging every incoming SOPInstanceUID (what went over the wire), and its log (rejected
associations).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from netrt.phantom import PhantomSpec, write_phantom

from .orthanc import Orthanc, OrthancSettings, run_in_namespace

pytestmark = pytest.mark.slow

OVERLAY_DATA = (0x6000, 0x3000)
LUA_LOG = """
function ReceivedInstanceFilter(dicom, origin, info)
  local log = io.open("{log}", "a")
  log:write(dicom.SOPInstanceUID .. "\\n")
  log:close()
  return true
end
"""


def _config(root: Path, name: str, data_dir: Path, pacs: str) -> Path:
    path = root / name
    path.write_text(
        f"paths: {{data_dir: {data_dir}}}\n"
        "destinations:\n"
        f"  - {{name: folder, type: folder, path: {root / 'folder'}}}\n"
        f"  - {{name: pacs, type: dicom, host: 127.0.0.1, port: 4242, {pacs}}}\n"
    )
    return path


def _netrt(*args: str) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "netrt", *args], capture_output=True, text=True, timeout=600)
    return {
        "code": done.returncode,
        "stdout": done.stdout,
        "stderr": done.stderr[-3000:],
        "seconds": time.perf_counter() - started,
    }


def _scenario_process_and_quarantine(params: dict[str, Any]) -> dict[str, Any]:
    root = Path(params["root"])
    log = root / "received.log"
    script = root / "filter.lua"
    script.write_text(LUA_LOG.format(log=log))
    settings = OrthancSettings(root=root / "orthanc", aet="ORTHANC", options={"LuaScripts": [str(script)]})
    good = _config(root, "netrt.yaml", root / "data", "ae_title: ORTHANC, retries: 1, retry_delay_seconds: 0.5")
    wrong = _config(
        root, "wrong.yaml", root / "data-wrong", "ae_title: NOT_ORTHANC, retries: 3, retry_delay_seconds: 5"
    )
    # Another data dir: it may not take the first data dir's local Prefect server as its own, so it
    # names that server as a shared Prefect API (prefect.api_url), as separate nodes sharing one would.
    wrong.write_text(wrong.read_text() + "prefect: {api_url: 'http://127.0.0.1:4200/api'}\n")
    first, second = params["first"], params["second"]

    def received() -> list[str]:
        return log.read_text().split() if log.exists() else []

    # One local Prefect server for every command (each would otherwise start a temporary one).
    from flows.local_server import start_local_server, stop_local_server
    from netrt.config import load_config
    from netrt.prefect_env import local_api_url, prefect_environment

    config = load_config(good)
    server = start_local_server(prefect_environment(config), local_api_url(config), root / "prefect.log")

    out: dict[str, Any] = {}
    orthanc = Orthanc(settings, quick_stop=True)
    orthanc.start()
    try:
        out["process_1"] = _netrt("process", first, "--config", str(good))
        out["count_1"] = orthanc.statistics()["CountInstances"]
        out["received_1"] = received()
        out["process_again"] = _netrt("process", first, "--config", str(good))
        out["count_again"] = orthanc.statistics()["CountInstances"]
        out["received_again"] = received()

        out["wrong_ae"] = _netrt("process", first, "--config", str(wrong))
        out["rejections"] = settings.log_file.read_text().count("bad called AET")

        orthanc.stop()
        out["process_down"] = _netrt("process", second, "--config", str(good))
        out["quarantine_down"] = _netrt("quarantine", "list", "--config", str(good))
        out["received_before_retry"] = received()
        orthanc.start()
        out["retry"] = _netrt("quarantine", "retry", "--all", "--config", str(good))
        out["quarantine_after"] = _netrt("quarantine", "list", "--config", str(good))
        out["received_all"] = received()
        out["count_final"] = orthanc.statistics()["CountInstances"]

        stored = root / "stored"
        stored.mkdir()
        for instance_id in orthanc.instances():
            uid = orthanc.get(f"/instances/{instance_id}")["MainDicomTags"]["SOPInstanceUID"]
            (stored / f"{uid}.dcm").write_bytes(orthanc.instance_file(instance_id))
    finally:
        orthanc.stop()
        stop_local_server(server)
    return out


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("process-orthanc")
    spec = PhantomSpec(rows=64, columns=64, pixel_spacing=(3.0, 3.0), slice_spacing=3.0, slices=20)
    first = write_phantom(spec, root / "first")
    second = write_phantom(PhantomSpec(**{**spec.__dict__, "seed": 7}), root / "second")
    assert first.study_instance_uid != second.study_instance_uid
    params = {"root": str(root), "first": str(root / "first" / "dicom"), "second": str(root / "second" / "dicom")}
    result: dict[str, Any] = run_in_namespace(_scenario_process_and_quarantine, params, root, timeout=900)
    result["root"] = str(root)
    return result


def _folder_copies(root: Path) -> dict[str, Path]:
    return {path.stem: path for path in (root / "folder").rglob("*.dcm")}


def test_process_delivers_every_instance_byte_equal_to_the_folder_copy(scenario: dict[str, Any]) -> None:
    run = scenario["process_1"]
    assert run["code"] == 0, run["stdout"] + run["stderr"]
    assert "pacs" in run["stdout"] and "ok" in run["stdout"]
    root = Path(scenario["root"])
    copies = _folder_copies(root)
    stored = {path.stem: path for path in (root / "stored").glob("*.dcm")}
    assert set(stored) == set(copies), "Orthanc holds exactly the written instances of both studies"
    assert len(scenario["received_1"]) == scenario["count_1"] == len(set(scenario["received_1"]))
    for uid, path in copies.items():
        ours, theirs = pydicom.dcmread(path), pydicom.dcmread(stored[uid])
        assert theirs.PixelData == ours.PixelData, uid
        assert theirs[OVERLAY_DATA].value == ours[OVERLAY_DATA].value, uid


def test_processing_the_same_study_twice_adds_no_instances(scenario: dict[str, Any]) -> None:
    run = scenario["process_again"]
    assert run["code"] == 0, run["stdout"] + run["stderr"]
    assert scenario["count_again"] == scenario["count_1"]
    # A new run is a new delivery (issue 16): every instance went over the wire again, and Orthanc,
    # keyed on SOP Instance UIDs, kept one copy of each.
    again = scenario["received_again"][len(scenario["received_1"]) :]
    assert sorted(again) == sorted(scenario["received_1"])


def test_wrong_called_ae_title_fails_at_once_without_retries(scenario: dict[str, Any]) -> None:
    run = scenario["wrong_ae"]
    assert run["code"] != 0
    assert "called AE title not recognised" in run["stdout"] + run["stderr"]
    assert "'NOT_ORTHANC'" in run["stdout"] + run["stderr"]
    # retries: 3 are configured; a permanent rejection must not use them.
    assert scenario["rejections"] == 1


def test_orthanc_down_quarantines_then_retry_delivers_everything_exactly_once(scenario: dict[str, Any]) -> None:
    down = scenario["process_down"]
    assert down["code"] != 0
    listing = scenario["quarantine_down"]["stdout"]
    assert "pacs" in listing and "unreachable" in listing, listing
    assert scenario["received_before_retry"] == scenario["received_again"], "nothing reached Orthanc while it was down"

    retry = scenario["retry"]
    assert retry["code"] == 0, retry["stdout"] + retry["stderr"]
    assert "the quarantine is empty" in scenario["quarantine_after"]["stdout"]
    second_wave = scenario["received_all"][len(scenario["received_before_retry"]) :]
    assert len(second_wave) == len(set(second_wave)) > 0, "each instance of the retried study was sent once"
    assert scenario["count_final"] == scenario["count_1"] + len(second_wave)
    assert not set(second_wave) & set(scenario["received_1"])
