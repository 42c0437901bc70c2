"""Delivered means delivered (issue 16): delivery episodes, against a real Orthanc and on their own.

The scenario runs `netrt process` and `netrt quarantine retry` as a user would, inside a private
network namespace with Orthanc (tests/orthanc.py). What Orthanc received is observed from its
side: its REST API (what it holds) and a Lua filter that logs every incoming SOPInstanceUID (what
went over the wire, duplicates included). Then the episode rules themselves are tested without a
network (netrt.episodes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from netrt.episodes import (
    EPISODES_FOLDER,
    OPEN_POINTER,
    begin_delivery,
    closed_episodes,
    files_digest,
    open_episode,
)
from netrt.phantom import PhantomSpec, write_phantom

from .orthanc import Orthanc, OrthancSettings, run_in_namespace

# Logs every received SOPInstanceUID. While the crash file exists and holds a number N, Orthanc
# kills itself (SIGKILL: no release, no abort) while receiving the instance that makes the log N
# lines long, so that instance and every later one of the association are never acknowledged.
LUA_FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  local log = io.open("{log}", "a")
  log:write(dicom.SOPInstanceUID .. "\\n")
  log:close()
  local flag = io.open("{crash}", "r")
  if flag ~= nil then
    local limit = flag:read("*n")
    flag:close()
    local count = 0
    for _ in io.lines("{log}") do count = count + 1 end
    if limit ~= nil and count >= limit then
      os.remove("{crash}")
      local stat = io.open("/proc/self/stat", "r")
      local pid = stat:read("*n")
      stat:close()
      os.execute("kill -KILL " .. pid)
    end
  end
  return true
end
"""
# Orthanc dies while receiving the CRASH_AT-th instance of a delivery: CRASH_AT - 1 are acknowledged.
CRASH_AT = 9


def _config(root: Path, name: str, pacs: str) -> Path:
    path = root / name
    path.write_text(
        f"paths: {{data_dir: {root / 'data'}}}\n"
        "destinations:\n"
        f"  - {{name: pacs, type: dicom, host: 127.0.0.1, port: 4242, ae_title: ORTHANC, {pacs}}}\n"
    )
    return path


def _netrt(*args: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "netrt", *args], capture_output=True, text=True, timeout=600)
    return {"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr[-3000:]}


def _scenario(params: dict[str, Any]) -> dict[str, Any]:
    root = Path(params["root"])
    study = params["study"]
    log, crash = root / "received.log", root / "crash.count"
    script = root / "filter.lua"
    script.write_text(LUA_FILTER.format(log=log, crash=crash))
    settings = OrthancSettings(root=root / "orthanc", aet="ORTHANC", options={"LuaScripts": [str(script)]})
    # Task retries with a delay that lets a test bring a crashed Orthanc back in between.
    retrying = _config(root, "netrt.yaml", "retries: 1, retry_delay_seconds: 4, connect_timeout_seconds: 3")
    # No task retries: a failed delivery goes straight to quarantine.
    once = _config(root, "once.yaml", "retries: 0, connect_timeout_seconds: 3")
    transactions = root / "data" / "logs" / "transactions.jsonl"

    def received() -> list[str]:
        return log.read_text().split() if log.exists() else []

    def delivered_events() -> int:
        if not transactions.exists():
            return 0
        events = [json.loads(line) for line in transactions.read_text().splitlines()]
        return sum(1 for e in events if e["event"] == "delivered" and e.get("destination") == "pacs")

    def delete_all_studies() -> None:
        for study_id in orthanc.get("/studies"):
            orthanc.request("DELETE", f"/studies/{study_id}")

    def step(name: str, *args: str) -> None:
        before = len(received())
        out[name] = _netrt(*args)
        out[name]["new"] = received()[before:]
        out[name]["count"] = orthanc.statistics()["CountInstances"] if orthanc.running else None
        out[name]["delivered_events"] = delivered_events()

    from flows.local_server import start_local_server, stop_local_server
    from netrt.config import load_config
    from netrt.prefect_env import local_api_url, prefect_environment

    config = load_config(retrying)
    server = start_local_server(prefect_environment(config), local_api_url(config), root / "prefect.log")
    out: dict[str, Any] = {}
    orthanc = Orthanc(settings, quick_stop=True)
    orthanc.start()
    try:
        step("first", "process", study, "--config", str(retrying))
        delete_all_studies()
        out["count_after_delete"] = orthanc.statistics()["CountInstances"]
        step("again", "process", study, "--config", str(retrying))

        orthanc.stop()
        step("down", "process", study, "--config", str(once))
        out["quarantine_down"] = _netrt("quarantine", "list", "--config", str(once))
        orthanc.start()
        step("retry", "quarantine", "retry", "--all", "--config", str(once))

        # Orthanc dies mid-delivery; no task retry: quarantined with CRASH_AT - 1 acknowledged.
        delete_all_studies()
        crash.write_text(str(len(received()) + CRASH_AT))
        step("crashed", "process", study, "--config", str(once))
        out["quarantine_crashed"] = _netrt("quarantine", "list", "--config", str(once))
        orthanc.stop()
        orthanc.start()
        step("resumed", "quarantine", "retry", "--all", "--config", str(once))

        # Orthanc dies mid-delivery and is back before the task's own retry.
        delete_all_studies()
        crash.write_text(str(len(received()) + CRASH_AT))

        # Orthanc must be restarted from this thread (its parent-death signal follows the starting
        # thread), so the command runs in another one.
        before = len(received())
        command: dict[str, Any] = {}
        runner = threading.Thread(target=lambda: command.update(_netrt("process", study, "--config", str(retrying))))
        runner.start()
        deadline = time.monotonic() + 120
        while orthanc.running and runner.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        out["revived"] = not orthanc.running
        orthanc.stop()
        orthanc.start()
        runner.join(timeout=300)
        out["task_retry"] = {**command, "new": received()[before:], "count": orthanc.statistics()["CountInstances"]}
        out["task_retry"]["delivered_events"] = delivered_events()
        out["stored_uids"] = sorted(
            orthanc.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances()
        )
        out["events"] = [json.loads(line) for line in transactions.read_text().splitlines()]
    finally:
        orthanc.stop()
        stop_local_server(server)
    return out


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("episodes")
    spec = PhantomSpec(rows=48, columns=48, pixel_spacing=(4.0, 4.0), slice_spacing=4.0, slices=12)
    write_phantom(spec, root / "phantom")
    params = {"root": str(root), "study": str(root / "phantom" / "dicom")}
    result: dict[str, Any] = run_in_namespace(_scenario, params, root, timeout=900)
    return result


def _ok(run: dict[str, Any]) -> None:
    assert run["code"] == 0, run["stdout"] + run["stderr"]


def test_a_new_run_delivers_everything_again_after_the_pacs_lost_the_study(scenario: dict[str, Any]) -> None:
    first, again = scenario["first"], scenario["again"]
    _ok(first)
    total = first["count"]
    assert total > 0 and sorted(first["new"]) == sorted(set(first["new"])) and len(first["new"]) == total
    assert scenario["count_after_delete"] == 0
    _ok(again)
    assert again["count"] == total, "Orthanc holds every instance again"
    assert sorted(again["new"]) == sorted(first["new"]), "the second run sent every instance once more"
    assert first["delivered_events"] == 1 and again["delivered_events"] == 2
    assert f"pacs {total} (all stored in this run)" in again["stdout"]


def test_an_unreachable_pacs_is_never_reported_delivered(scenario: dict[str, Any]) -> None:
    down = scenario["down"]
    assert down["code"] == 1, down["stdout"] + down["stderr"]
    assert "FAILED" in down["stdout"] and "delivered to" not in down["stdout"]
    assert down["delivered_events"] == scenario["again"]["delivered_events"], "no delivered event was added"
    listing = scenario["quarantine_down"]["stdout"]
    assert "stage=deliver" in listing and "unreachable" in listing, listing
    failed = [e for e in scenario["events"] if e["event"] == "delivery_failed"]
    assert failed and failed[0]["counts"] == {
        "instances": scenario["first"]["count"],
        "stored_this_run": 0,
        "stored_earlier": 0,
    }


def test_quarantine_retry_after_the_pacs_is_back_delivers_exactly_the_missing_instances(
    scenario: dict[str, Any],
) -> None:
    retry, total = scenario["retry"], scenario["first"]["count"]
    _ok(retry)
    # The failed run stored nothing, so every instance was missing: each sent exactly once.
    assert sorted(retry["new"]) == sorted(scenario["first"]["new"])
    assert retry["delivered_events"] == scenario["down"]["delivered_events"] + 1
    assert f"pacs {total} (all stored in this run)" in retry["stdout"]


def test_quarantine_retry_resumes_an_interrupted_delivery_of_the_same_episode(scenario: dict[str, Any]) -> None:
    crashed, resumed, total = scenario["crashed"], scenario["resumed"], scenario["first"]["count"]
    assert crashed["code"] == 1
    assert len(crashed["new"]) == CRASH_AT, "Orthanc received CRASH_AT instances and died on the last"
    assert crashed["delivered_events"] == scenario["retry"]["delivered_events"], "no delivered event was added"
    acknowledged = crashed["new"][: CRASH_AT - 1]
    _ok(resumed)
    assert sorted(resumed["new"]) == sorted(set(scenario["first"]["new"]) - set(acknowledged)), (
        "the quarantine retry sent exactly the instances Orthanc had not acknowledged"
    )
    assert resumed["count"] == total
    assert (
        f"pacs {total} ({total - CRASH_AT + 1} stored in this run, {CRASH_AT - 1} by earlier runs"
        in (resumed["stdout"])
    )
    delivered = [e for e in scenario["events"] if e["event"] == "delivered"]
    assert delivered[3]["counts"] == {
        "instances": total,
        "stored_this_run": total - CRASH_AT + 1,
        "stored_earlier": CRASH_AT - 1,
    }


def test_the_task_retry_of_an_interrupted_delivery_sends_only_what_was_not_acknowledged(
    scenario: dict[str, Any],
) -> None:
    run, total = scenario["task_retry"], scenario["first"]["count"]
    assert scenario["revived"], "Orthanc died mid-delivery and was restarted before the task's retry"
    _ok(run)
    first_attempt, second_attempt = run["new"][:CRASH_AT], run["new"][CRASH_AT:]
    assert sorted(second_attempt) == sorted(set(scenario["first"]["new"]) - set(first_attempt[: CRASH_AT - 1]))
    assert run["count"] == total
    assert scenario["stored_uids"] == sorted(scenario["first"]["new"])
    # Both attempts belong to this run: nothing came from an earlier run.
    assert f"pacs {total} (all stored in this run)" in run["stdout"]
    assert run["delivered_events"] == 5


# --- the episode rules, without a network -----------------------------------------------------------


def test_a_run_continues_only_an_episode_it_belongs_to(tmp_path: Path) -> None:
    delivery = tmp_path / "delivery"
    first = begin_delivery(delivery, "run-1", {"run-1"})
    assert not first.resumed and first.runs == ["run-1"]
    assert (delivery / OPEN_POINTER).read_text() == first.id
    first.progress_file("pacs").write_text('{"sop_instance_uid": "1.2", "sha256": "ab"}\n')

    # A quarantine retry (run-2 continues run-1) and a UI retry of run-2 (its own id): same episode.
    second = begin_delivery(delivery, "run-2", {"run-2", "run-1"})
    assert second.id == first.id and second.resumed and second.runs == ["run-1", "run-2"]
    assert begin_delivery(delivery, "run-2", {"run-2"}).id == first.id

    # A new run (netrt process again, a re-sealed study): a new episode with an empty progress file.
    third = begin_delivery(delivery, "run-3", {"run-3"})
    assert third.id != first.id and not third.resumed
    assert not third.progress_file("pacs").exists()
    (superseded,) = closed_episodes(delivery)
    assert superseded.id == first.id and superseded.status == "superseded" and superseded.closed_at
    # Closed episodes are never consulted again: run-1's retry no longer continues anything.
    assert begin_delivery(delivery, "run-1", {"run-1"}).id not in (first.id, third.id)


def test_a_completed_episode_closes_and_a_retry_of_its_run_starts_afresh(tmp_path: Path) -> None:
    delivery = tmp_path / "delivery"
    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    for path in files:
        path.write_bytes(b"x" * 10)
    digest = files_digest(files)
    episode = begin_delivery(delivery, "run-1", {"run-1"})
    episode.mark_delivered("folder", digest, "run-1", 2)
    assert not episode.close_if_complete(["folder", "pacs"]), "pacs has not delivered yet"
    episode.mark_failed("pacs", "run-1", "unreachable")
    assert open_episode(delivery) is not None

    resumed = begin_delivery(delivery, "run-2", {"run-2", "run-1"})
    assert resumed.delivered_earlier("folder", digest) is not None, "the folder holds these files already"
    assert resumed.delivered_earlier("pacs", digest) is None
    files[0].write_bytes(b"y" * 11)  # other files (a changed study): the earlier delivery does not count
    assert resumed.delivered_earlier("folder", files_digest(files)) is None
    resumed.mark_delivered("pacs", digest, "run-2", 2)
    assert resumed.close_if_complete(["folder", "pacs"])
    assert open_episode(delivery) is None and not (delivery / OPEN_POINTER).exists()

    # A UI retry of the completed run-2 is a new run: new episode, nothing delivered in it.
    fresh = begin_delivery(delivery, "run-2", {"run-2"})
    assert fresh.id != resumed.id and fresh.delivered_earlier("pacs", digest) is None
    assert [e.status for e in closed_episodes(delivery)] == ["complete"]


def test_an_open_pointer_that_is_not_an_episode_id_is_never_used_as_a_path(tmp_path: Path) -> None:
    delivery = tmp_path / "delivery"
    delivery.mkdir()
    (delivery / OPEN_POINTER).write_text("../../etc")
    assert open_episode(delivery) is None
    episode = begin_delivery(delivery, "run-1", {"run-1"})
    assert episode.folder.parent == delivery / EPISODES_FOLDER
