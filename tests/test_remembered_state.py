"""Remembered state must not make NETRT claim work it did not do in this run (issue 16, part 3).

Each test changes what a state claims behind NETRT's back and asserts that NETRT does the work
again (or keeps what it would otherwise drop):

- result-cache hits: a cached step whose files were truncated, altered or replaced is recomputed;
- quarantine release: only a study this run moved from the quarantine to processed/ releases it;
- processed/ moves: an earlier processed copy of the same study is kept whole, never merged;
- the listener's state files (state/sealed/*.json): recovery creates a run whenever none will
  process the sealed study, and never a second run for one sealing.

The flow tests run the real process-study flow on the session's Prefect test server with a folder
destination; the listener tests drive the real StudyTracker (no network needed).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
from pydicom import dcmread

from listener.completion import SealedStudy, StudyTracker
from netrt.layout import DataLayout
from netrt.logs import TransactionLog
from netrt.phantom import PhantomSpec, write_phantom
from netrt.pipeline import MaskStepResult, WrittenSeries, result_files_intact
from netrt.quarantine import begin_retry, quarantine_study, read_entry
from netrt.stamps import FileStamp, stamp_file

SPEC = PhantomSpec(rows=48, columns=48, slices=16, pixel_spacing=(5.0, 5.0), slice_spacing=5.0)
CACHED_STEPS = ["anonymize", "extract-masks", "write-axial", "write-coronal", "write-sagittal", "preview"]
STAGE_OF = {name: "write" if name.startswith("write-") else name for name in CACHED_STEPS}


# --- helpers ----------------------------------------------------------------------------------


def _config(tmp: Path, data: Path, destination: Path, name: str = "netrt.yaml") -> Path:
    """Partial anonymization (the default), so anonymize is a cached step too; a folder destination."""
    path = tmp / name
    path.write_text(
        f"paths: {{data_dir: {data}}}\n"
        f"destinations:\n  - {{name: out, type: folder, path: {destination}}}\n"
        "processing: {burn_in: true}\n"
    )
    return path


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _products(data: Path) -> dict[str, object]:
    """What the cached steps made under work/: DICOM and PNG bytes, the mask's voxels (an .npz
    carries the time it was zipped, so its bytes differ between two writes of the same mask)."""
    from netrt.pipeline import load_mask

    work = data / "work"
    made: dict[str, object] = {}
    for path in sorted(work.rglob("*")):
        if path.suffix in (".dcm", ".png"):
            made[str(path.relative_to(work))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.suffix == ".npz" and path.name.startswith("mask-"):
            made[str(path.relative_to(work))] = hashlib.sha256(load_mask(path).tobytes()).hexdigest()
        elif path.suffix == ".npz":  # the per-ROI masks: each array's bytes
            with np.load(path) as arrays:
                made[str(path.relative_to(work))] = {k: hashlib.sha256(arrays[k].tobytes()).hexdigest() for k in arrays}
    return made


def _task_states(flow_run_id: str) -> dict[str, list[str]]:
    """Task name (random suffix dropped) -> the state names of all its task runs in the flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)])))
    states: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        name = run.name if run.name.startswith(("write-", "deliver-")) else run.name.rsplit("-", 1)[0]
        assert run.state is not None
        states[name].append(run.state.name)
    return states


def _events(layout: DataLayout, name: str) -> list[dict[str, Any]]:
    return [e for e in TransactionLog(layout.transaction_log).entries() if e["event"] == name]


def _work_file(data: Path, step: str) -> Path:
    """One file the given cached step wrote under work/."""
    work = data / "work"
    if step == "anonymize":
        return sorted(work.rglob("anonymized-*/**/*.dcm"))[0]
    if step == "extract-masks":
        (mask,) = work.rglob("mask-*.npz")
        return mask
    if step == "preview":
        (png,) = work.rglob("preview.png")
        return png
    plane = step.removeprefix("write-")
    return sorted(next(work.rglob(f"series/{plane}")).glob("*.dcm"))[1]


def _truncate(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def _alter_in_place(path: Path) -> None:
    """Same size, other bytes (the last 64 bytes inverted), written through the same inode."""
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.seek(size - 64)
        tail = handle.read(64)
        handle.seek(size - 64)
        handle.write(bytes(b ^ 0xFF for b in tail))


def _replace_keeping_mtime(path: Path) -> None:
    """A same-size file with other bytes renamed onto it, its mtime set back to the original's."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    temp = path.with_name(path.name + ".tmp")
    temp.write_bytes(bytes(data))
    os.utime(temp, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(temp, path)
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


ALTERATIONS: dict[str, tuple[str, Callable[[Path], None]]] = {
    # step: (what is done to one of its files, how)
    "anonymize": ("truncated", _truncate),
    "extract-masks": ("altered in place", _alter_in_place),
    "write-axial": ("truncated", _truncate),
    "write-coronal": ("altered in place", _alter_in_place),
    "write-sagittal": ("replaced, mtime restored", _replace_keeping_mtime),
    "preview": ("deleted", lambda p: p.unlink()),
}


# --- result-cache hits ------------------------------------------------------------------------


@pytest.mark.slow
def test_cache_hit_with_a_changed_file_is_recomputed_and_delivers_what_a_fresh_run_does(
    prefect_harness: None, tmp_path: Path
) -> None:
    """For each cached step in turn: one of its files is truncated, altered, replaced or deleted in
    the work dir; the next run recomputes that step (a real task run, the summary's stage not
    cached), trusts the others (Cached), restores the file, and delivers exactly what the first,
    fresh run delivered."""
    from flows.process_study import process_study

    write_phantom(SPEC, tmp_path / "phantom")
    source = tmp_path / "phantom" / "dicom"
    data = tmp_path / "data"
    fresh_out = tmp_path / "fresh-out"
    fresh = process_study(study_dir=str(source), config_file=str(_config(tmp_path, data, fresh_out)))
    assert all("Cached" not in s for s in _task_states(fresh["flow_run_id"]).values())
    delivered = _digests(fresh_out)
    assert len(delivered) == sum(s["instances"] for s in fresh["series"]) > 0
    work_before = _products(data)

    for step, (how, alter) in ALTERATIONS.items():
        target = _work_file(data, step)
        alter(target)
        out = tmp_path / f"out-{step}"
        summary = process_study(study_dir=str(source), config_file=str(_config(tmp_path, data, out, f"{step}.yaml")))
        states = _task_states(summary["flow_run_id"])
        assert "Completed" in states[step], f"{step}: a file {how}, yet the step was not run again: {states}"
        for other in CACHED_STEPS:
            if STAGE_OF[other] != STAGE_OF[step]:
                assert states[other] == ["Cached"], f"{step} {how}: {other} should have stayed cached: {states}"
        stages = {s["stage"]: s["cached"] for s in summary["stages"] if s["stage"] in STAGE_OF.values()}
        assert stages[STAGE_OF[step]] is False, f"{step} {how}: the summary calls it cached: {stages}"
        assert _digests(out) == delivered, f"{step} {how}: delivered files differ from a fresh run's"
        assert _products(data) == work_before, f"{step} {how}: the work dir was not restored"


@pytest.mark.slow
def test_persisted_results_from_before_stamps_are_recomputed_not_trusted(prefect_harness: None, tmp_path: Path) -> None:
    """Results persisted by an older NETRT (no stamps; the preview a bare path string) count as not
    present: every cached step runs again, nothing crashes, delivery is unchanged."""
    from flows.process_study import process_study

    write_phantom(SPEC, tmp_path / "phantom")
    source = tmp_path / "phantom" / "dicom"
    data = tmp_path / "data"
    fresh = process_study(study_dir=str(source), config_file=str(_config(tmp_path, data, tmp_path / "fresh")))
    assert fresh["series"]
    rewritten = _strip_stamps_from_persisted_results(data / "cache" / "results")
    assert rewritten == {"AnonymizeStepResult", "MaskStepResult", "list", "FileStamp"}, rewritten

    out = tmp_path / "again"
    summary = process_study(study_dir=str(source), config_file=str(_config(tmp_path, data, out, "again.yaml")))
    states = _task_states(summary["flow_run_id"])
    for step in CACHED_STEPS:
        assert "Completed" in states[step], f"{step}: an old result was trusted: {states}"
    assert not any(s["cached"] for s in summary["stages"]), summary["stages"]
    assert _digests(out) == _digests(tmp_path / "fresh")


def _strip_stamps_from_persisted_results(results: Path) -> set[str]:
    """Rewrite every persisted result the way an older NETRT stored it; return the types rewritten."""
    import cloudpickle

    kinds = set()
    for path in results.iterdir():
        if not path.is_file():
            continue
        record = json.loads(path.read_bytes())
        serializer = record.get("metadata", {}).get("serializer", {})
        assert serializer.get("type") == "pickle", f"{path}: result serializer {serializer} (test needs updating)"
        value = cloudpickle.loads(base64.b64decode(record["result"]))
        kinds.add(type(value).__name__)
        if isinstance(value, FileStamp):
            value = str(value.path)  # the preview task returned the PNG's path
        else:
            for item in value if isinstance(value, list) else [value]:
                for field in ("stamps", "mask_stamp"):
                    item.__dict__.pop(field, None)
        record["result"] = base64.b64encode(cloudpickle.dumps(value)).decode("ascii")
        path.write_text(json.dumps(record))
    return kinds


def test_result_check_rejects_old_shapes_and_changed_files(tmp_path: Path) -> None:
    """The domain check itself: intact results pass; old pickles (no stamp fields), bare strings,
    empty lists and a stamp whose path list does not match are all 'not intact', never errors."""
    a, b = tmp_path / "a.dcm", tmp_path / "b.dcm"
    a.write_bytes(b"a" * 100)
    b.write_bytes(b"b" * 100)
    series = WrittenSeries("axial", False, "1.2.3", tmp_path, (a, b), (stamp_file(a), stamp_file(b)))
    mask = MaskStepResult(a, (), (), 5, stamp_file(a), b, stamp_file(b))
    assert result_files_intact([series]) and result_files_intact(mask) and result_files_intact(stamp_file(b))
    # A mask result from before per-ROI masks (no roi_masks) is recomputed, never trusted.
    assert not result_files_intact(MaskStepResult(a, (), (), 5, stamp_file(a)))

    old_series = pickle.loads(pickle.dumps(series))
    del old_series.__dict__["stamps"]  # what unpickling a WrittenSeries from before stamps gives
    old_mask = pickle.loads(pickle.dumps(mask))
    del old_mask.__dict__["mask_stamp"]
    assert not result_files_intact([old_series])
    assert not result_files_intact(old_mask)
    assert not result_files_intact(str(b)) and not result_files_intact([]) and not result_files_intact(None)
    swapped = WrittenSeries("axial", False, "1.2.3", tmp_path, (a, b), (stamp_file(b), stamp_file(a)))
    assert not result_files_intact([swapped])

    a.write_bytes(b"a" * 99)
    assert not result_files_intact([series]) and not result_files_intact(mask)
    assert result_files_intact(stamp_file(b))


# --- quarantine release -----------------------------------------------------------------------


def _quarantined_and_retrying(tmp: Path, layout: DataLayout) -> tuple[Path, str]:
    """A received study that failed delivery, whose retry has moved it back to studies/<uid>."""
    manifest = write_phantom(SPEC, tmp / "phantom")
    received = layout.studies / manifest.study_instance_uid
    shutil.copytree(tmp / "phantom" / "dicom", received)
    quarantine_study(
        layout,
        received,
        [],
        entry_id=manifest.study_instance_uid,
        stage="deliver",
        error="destination 'out' unreachable",
        retryable=True,
        flow_run_id="earlier-run",
        study=manifest.study_instance_uid,
    )
    begin_retry(layout, manifest.study_instance_uid)
    return tmp / "phantom" / "dicom", manifest.study_instance_uid


@pytest.mark.slow
@pytest.mark.parametrize("retry_copy_in", ["studies", "incoming"])
def test_processing_another_copy_does_not_release_a_retrying_entry(
    prefect_harness: None, tmp_path: Path, retry_copy_in: str
) -> None:
    """The entry's input was moved on by a retry (to studies/<uid>, or on to incoming/<uid> by the
    listener re-opening it), and a different copy of the same study is processed by
    `netrt process PATH`: the entry, its history and the retried files all stay. Then the retried
    copy itself is processed: that run releases the entry."""
    from flows.process_study import process_study

    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    user_copy, uid = _quarantined_and_retrying(tmp_path, layout)
    retried = layout.studies / uid
    if retry_copy_in == "incoming":
        os.rename(retried, layout.incoming / uid)
        retried = layout.incoming / uid
    files_before = _digests(retried)
    config = _config(tmp_path, layout.root, tmp_path / "out")

    summary = process_study(study_dir=str(user_copy), config_file=str(config), study_instance_uid=uid)
    assert summary["destinations"] and all(d["ok"] for d in summary["destinations"])
    entry = read_entry(layout, uid)
    assert entry.status == "retrying" and entry.attempts == 1 and entry.flow_run_id == "earlier-run"
    assert _digests(retried) == files_before, "the retried copy must stay where the retry put it"
    assert not (layout.processed / uid).exists()
    assert _events(layout, "released_from_quarantine") == []

    if retry_copy_in == "incoming":
        os.rename(retried, layout.studies / uid)  # what sealing does
    process_study(study_dir=str(layout.studies / uid), config_file=str(config))
    assert not (layout.quarantine / uid).exists(), "the run that processed the quarantined copy releases it"
    assert _digests(layout.processed / uid) == files_before
    assert len(_events(layout, "released_from_quarantine")) == 1


# --- processed/ moves -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_study_processed_again_keeps_the_earlier_processed_copy_whole(prefect_harness: None, tmp_path: Path) -> None:
    """processed/<uid> exists from an earlier success; a re-sent, different copy of the same study
    is processed: processed/<uid> is exactly the new copy, and the earlier copy is kept whole
    beside it (nothing overwritten, nothing merged), as the transaction log says."""
    from flows.process_study import process_study

    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    manifest = write_phantom(SPEC, tmp_path / "phantom")
    uid = manifest.study_instance_uid
    config = _config(tmp_path, layout.root, tmp_path / "out")
    shutil.copytree(tmp_path / "phantom" / "dicom", layout.studies / uid)
    process_study(study_dir=str(layout.studies / uid), config_file=str(config))
    earlier = _digests(layout.processed / uid)

    # The re-sent copy: one slice under another file name, the RTSTRUCT re-issued with a new label.
    resent = layout.studies / uid
    shutil.copytree(tmp_path / "phantom" / "dicom", resent)
    os.rename(resent / "CT_0001.dcm", resent / "CT_resent_0001.dcm")
    rtstruct = dcmread(resent / "RS.dcm")
    rtstruct.StructureSetLabel = "re-sent"
    rtstruct.save_as(resent / "RS.dcm")
    new = _digests(resent)
    assert new != earlier

    process_study(study_dir=str(resent), config_file=str(config))
    assert _digests(layout.processed / uid) == new, "processed/<uid> must be this run's copy, unmixed"
    (kept,) = [p for p in layout.processed.iterdir() if p.name != uid]
    assert kept.name.startswith(f"{uid}.earlier-")
    assert _digests(kept) == earlier, "the earlier processed copy must be kept whole"
    (event,) = _events(layout, "earlier_processed_copy_kept")
    assert kept.name == uid + event["suffix"]


# --- the listener's state files ---------------------------------------------------------------


class PrefectLikeTrigger:
    """Creates runs the way Prefect's run_deployment does with an idempotency key: the same key
    returns the run created first (see test_real_prefect_trigger_and_run_check_behave_so)."""

    def __init__(self, on_call: Callable[[SealedStudy], None] | None = None) -> None:
        self.by_key: dict[str, str] = {}
        self.calls: list[SealedStudy] = []
        self.on_call = on_call

    def __call__(self, study: SealedStudy) -> str:
        self.calls.append(study)
        if self.on_call is not None:
            self.on_call(study)
        return self.by_key.setdefault(study.idempotency_key, f"run-{len(self.by_key) + 1}")

    @property
    def runs(self) -> list[str]:
        return list(self.by_key.values())


def _tracker(layout: DataLayout, trigger: PrefectLikeTrigger, pending: Callable[[str], bool]) -> StudyTracker:
    return StudyTracker(
        layout,
        idle_seconds=0.0,
        trigger=trigger,
        transactions=TransactionLog(layout.transaction_log),
        is_run_pending=pending,
    )


def _receive(tracker: StudyTracker, uid: str, name: str) -> None:
    folder = tracker.begin_store(uid, sender=name, is_alive=lambda: False)
    (folder / f"{name}.dcm").write_bytes(b"instance " + name.encode())
    tracker.end_store(uid, stored=True)


def _state(layout: DataLayout, uid: str) -> dict[str, Any]:
    return dict(json.loads((layout.state / "sealed" / f"{uid}.json").read_text()))


UID = "1.2.826.0.1.3680043.8.498.1"


def test_recovery_replaces_a_dead_recorded_run_under_a_new_key_once(tmp_path: Path) -> None:
    """State says 'created run-1'; after a restart run-1 has crashed or was deleted. It gets one
    replacement under a new idempotency key (Prefect would hand back run-1 for the old one), and
    restarting again adds nothing."""
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    trigger = PrefectLikeTrigger()
    alive = {"run-1": False}
    first = _tracker(layout, trigger, lambda run: alive.get(run, True))
    _receive(first, UID, "a")
    first.poll()
    assert trigger.runs == ["run-1"] and _state(layout, UID)["flow_run_id"] == "run-1"

    for _restart in range(2):
        again = _tracker(layout, trigger, lambda run: alive.get(run, True))
        again.recover()
        again.poll()
    assert trigger.runs == ["run-1", "run-2"], "one new run, and only one, for the dead one"
    assert trigger.calls[-1].seal_id == trigger.calls[0].seal_id, "still the same sealing"
    assert trigger.calls[-1].idempotency_key != trigger.calls[0].idempotency_key
    assert _state(layout, UID)["flow_run_id"] == "run-2"


def test_recovery_after_a_crash_between_run_created_and_run_id_written(tmp_path: Path) -> None:
    """The run was created but the state still says 'no run'. Recovery repeats the trigger with
    the sealing's key: while that run is pending this returns it (no second run); when it has
    ended (crashed) meanwhile, recovery notices and creates one replacement."""
    for ended in (False, True):
        layout = DataLayout.from_data_dir(tmp_path / f"data-{ended}").create()
        trigger = PrefectLikeTrigger()
        tracker = _tracker(layout, trigger, lambda run: True)
        _receive(tracker, UID, "a")
        tracker.poll()
        state = _state(layout, UID)
        state["flow_run_id"] = None  # the crash: the id was never written down
        (layout.state / "sealed" / f"{UID}.json").write_text(json.dumps(state))

        again = _tracker(layout, trigger, lambda run, ended=ended: not (ended and run == "run-1"))
        again.recover()
        again.poll()
        again.poll()
        expected = ["run-1", "run-2"] if ended else ["run-1"]
        assert trigger.runs == expected, f"ended={ended}"
        assert _state(layout, UID)["flow_run_id"] == expected[-1]


def test_a_sealed_study_without_any_state_file_gets_a_key_that_survives_a_second_crash(tmp_path: Path) -> None:
    """studies/<uid> with no state file at all (lost). Recovery's trigger creates a run and the
    node dies before it learns the run's id; the next recovery must find the same idempotency key
    again (so the key is written down before the trigger), not make up a new one and a second run."""
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    (layout.studies / UID).mkdir()
    (layout.studies / UID / "a.dcm").write_bytes(b"instance")
    trigger = PrefectLikeTrigger()

    def crash_after_creating(study: SealedStudy) -> str:
        trigger(study)
        raise RuntimeError("the node died before the run id came back (test)")

    tracker = StudyTracker(
        layout,
        idle_seconds=0.0,
        trigger=crash_after_creating,
        transactions=TransactionLog(layout.transaction_log),
        is_run_pending=lambda run: True,
    )
    tracker.recover()
    tracker.poll()
    assert trigger.runs == ["run-1"]
    again = _tracker(layout, trigger, lambda run: True)
    again.recover()
    again.poll()
    assert trigger.runs == ["run-1"], "a second run for one sealing"
    assert _state(layout, UID)["flow_run_id"] == "run-1"


def test_a_late_trigger_of_an_earlier_sealing_does_not_overwrite_the_resealed_state(tmp_path: Path) -> None:
    """Sealing 1's run is being created when more instances re-open the study and it is sealed
    again (sealing 2, its own run). When sealing 1's trigger returns last, the state file must
    still describe sealing 2 and its run, so a restart neither loses nor duplicates it."""
    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    tracker: StudyTracker

    def reopen_during_first_trigger(study: SealedStudy) -> None:
        if len(trigger.calls) == 1:  # inside sealing 1's trigger: a new instance, then sealing 2
            _receive(tracker, UID, "b")
            tracker.poll()

    trigger = PrefectLikeTrigger(on_call=reopen_during_first_trigger)
    tracker = _tracker(layout, trigger, lambda run: True)
    _receive(tracker, UID, "a")
    tracker.poll()
    first, second = trigger.calls
    assert first.seal_id != second.seal_id and first.idempotency_key != second.idempotency_key
    run_of = {c.seal_id: trigger.by_key[c.idempotency_key] for c in trigger.calls}
    state = _state(layout, UID)
    assert (state["seal_id"], state["flow_run_id"]) == (second.seal_id, run_of[second.seal_id])
    assert state["instances"] == 2

    again = _tracker(layout, trigger, lambda run: True)
    again.recover()
    again.poll()
    assert len(trigger.calls) == 2, "the state of sealing 2 says its run exists: no third trigger"


@pytest.mark.slow
def test_real_prefect_trigger_and_run_check_behave_so(prefect_harness: None, tmp_path: Path) -> None:
    """The listener's real callbacks against a real Prefect server: the same sealing's key gives
    back the same run (no second run after a crash), a replacement key a new one, and a run that
    crashed or was deleted is reported as not pending."""
    from prefect import get_client
    from prefect.states import Crashed

    from flows.process_study import process_study
    from netrt.cli import _flow_run_callbacks

    deployment = process_study.to_deployment(name="process-study")
    deployment.apply()
    trigger, is_run_pending = _flow_run_callbacks(None)
    sealed = SealedStudy(UID, tmp_path / "studies" / UID, 3, ("TESTSCU",), ("CT",), seal_id="s1")
    created: list[str] = []
    try:
        first = trigger(sealed)
        created.append(first)
        assert trigger(sealed) == first, "a repeated trigger of one sealing must return its run"
        assert is_run_pending(first), "a scheduled run will still process the study"
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(UUID(first), Crashed(), force=True)
        assert not is_run_pending(first)
        replacement = dataclasses.replace(sealed, replaces_run_id=first)
        second = trigger(replacement)
        created.append(second)
        assert second != first and trigger(replacement) == second
        with get_client(sync_client=True) as client:
            client.delete_flow_run(UUID(second))
        created.remove(second)
        assert not is_run_pending(second), "a deleted run processes nothing"
    finally:
        with get_client(sync_client=True) as client:
            for run_id in created:  # leave no scheduled run for a later test's flow server
                client.delete_flow_run(UUID(run_id))
