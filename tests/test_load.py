"""Load (issue 10, done-when): 20 studies over 4 concurrent associations to the real `netrt serve`.

Four storescu processes start at once, each sending 5 small phantom studies in one association, to
a node started as a user starts it (its own Prefect server, the served deployments, the listener,
the default folder destination). Every study must be received, processed once and delivered once,
and the peak memory of the node's process tree is reported (sampled from /proc while it runs).

Run alone: ``.venv/bin/pytest -m load -s`` (the numbers are printed).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from pydicom import dcmread

from netrt.phantom import PhantomSpec, write_phantom

from .conftest import require_tool
from .listener_helpers import LOCALHOST, dcmtk_env, wait_until
from .test_serve import _descendants, _entries, _write_config, serving

pytestmark = [pytest.mark.load, pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(900)]

SENDERS = 4
STUDIES_PER_SENDER = 5
SLICES = 8


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the memory of a process and all its descendants every 0.2 s until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.hwm: dict[int, int] = {}  # pid -> VmHWM (peak RSS) seen, KiB
        self.names: dict[int, str] = {}
        self.peak_rss_sum = 0  # KiB: largest sum of VmRSS over the tree at one sample
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = [self.pid, *_descendants(self.pid)]
            total = 0
            for pid in pids:
                total += _status_kib(pid, "VmRSS")
                hwm = _status_kib(pid, "VmHWM")
                if hwm:
                    self.hwm[pid] = max(self.hwm.get(pid, 0), hwm)
                    if pid not in self.names:
                        try:
                            self.names[pid] = (
                                Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80].decode()
                            )
                        except OSError:
                            self.names[pid] = "?"
            self.peak_rss_sum = max(self.peak_rss_sum, total)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(0.2)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def test_twenty_studies_over_four_concurrent_associations_all_delivered_once(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    studies: dict[str, Path] = {}
    batches: list[list[Path]] = [[] for _ in range(SENDERS)]
    for k in range(SENDERS * STUDIES_PER_SENDER):
        out = tmp_path / "phantoms" / f"p{k:02d}"
        spec = PhantomSpec(rows=32, columns=32, slices=SLICES, pixel_spacing=(8.0, 8.0), slice_spacing=8.0, seed=k)
        manifest = write_phantom(spec, out)
        studies[manifest.study_instance_uid] = out / "dicom"
        batches[k % SENDERS].append(out / "dicom")
    assert len(studies) == SENDERS * STUDIES_PER_SENDER, "phantom study UIDs collide"
    files_per_study = SLICES + 1
    data = tmp_path / "data"
    config, _, dicom_port = _write_config(tmp_path, data, idle=2.0)
    with serving(config) as node, TreeMemory(node.process.pid) as memory:
        started = time.monotonic()
        senders = [
            subprocess.Popen(
                [storescu, "-aet", f"SENDER{n}", "-aec", "NETRT", "+sd", LOCALHOST, str(dicom_port)]
                + [str(folder) for folder in batch],
                env=dcmtk_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for n, batch in enumerate(batches)
        ]
        outputs = [sender.communicate(timeout=180)[0] for sender in senders]
        sent_seconds = time.monotonic() - started
        assert [s.returncode for s in senders] == [0] * SENDERS, outputs
        wait_until(
            lambda: len(_entries(data, "delivered")) >= len(studies),
            timeout=600,
            what=f"{len(studies)} studies delivered",
        )
        delivered_seconds = time.monotonic() - started
        wait_until(
            lambda: all((data / "processed" / uid).is_dir() for uid in studies),
            timeout=60,
            what="every study in processed/",
        )
        time.sleep(3.0)  # a duplicate run would show up here
        assert node.terminate() == 0, node.output
    opened = _entries(data, "association_opened")
    assert sorted(str(e["source_ae"]) for e in opened) == [f"SENDER{n}" for n in range(SENDERS)]
    received = Counter()
    for entry in _entries(data, "instances_received"):
        received[str(entry["study_instance_uid"])] += int(entry["counts"]["instances"])  # type: ignore[index]
    assert received == dict.fromkeys(studies, files_per_study), "an instance was lost or counted twice"
    created = Counter(str(e["study_instance_uid"]) for e in _entries(data, "flow_run_created"))
    assert created == dict.fromkeys(studies, 1), "a study got no flow run or more than one"
    delivered = Counter(str(e["study_instance_uid"]) for e in _entries(data, "delivered"))
    assert delivered == dict.fromkeys(studies, 1), "a study was not delivered, or delivered twice"
    assert not _entries(data, "quarantined")
    for uid, source in studies.items():
        assert sorted(p.name for p in (data / "processed" / uid).iterdir()) == sorted(
            f"{dcmread(p, stop_before_pixels=True).SOPInstanceUID}.dcm" for p in source.iterdir()
        )
        series = sorted((data / "output" / uid).iterdir())
        planes = sorted(str(dcmread(next(s.iterdir()), stop_before_pixels=True).SeriesDescription) for s in series)
        assert planes == ["NETRT axial overlay", "NETRT coronal overlay"], planes
        axial = next(s for s in series if "axial" in str(dcmread(next(s.iterdir())).SeriesDescription))
        assert len(list(axial.iterdir())) == SLICES
    largest = sorted(memory.hwm.items(), key=lambda item: -item[1])[:4]
    print(
        f"\nload: {len(studies)} studies ({len(studies) * files_per_study} instances) over {SENDERS} associations: "
        f"sent in {sent_seconds:.1f} s, all delivered after {delivered_seconds:.1f} s; "
        f"peak memory of the netrt serve tree: {memory.peak_rss_sum / 1024:.0f} MiB (largest sum of VmRSS "
        f"over {memory.peak_processes} processes at most), per-process VmHWM max "
        + ", ".join(f"{kib / 1024:.0f} MiB ({memory.names.get(pid, '?').strip()[:70]})" for pid, kib in largest)
    )
    assert memory.peak_rss_sum > 0 and memory.hwm
