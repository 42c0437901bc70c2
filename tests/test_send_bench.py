"""The delivery benchmark runs end to end at smoke size and writes only its own BENCHMARKS.md section.

It runs the real command (``python -m bench.deliver --smoke --out <tmp>/B.md``): a break in the
benchmark, its namespace scenario, Orthanc start-up or netrt.send fails this test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .orthanc import REPO, require_orthanc

START, END = "<!-- bench:deliver:start -->", "<!-- bench:deliver:end -->"


def test_deliver_benchmark_smoke_writes_its_section(tmp_path: Path) -> None:
    require_orthanc()
    out = tmp_path / "B.md"
    out.write_text(f"# Benchmarks\n\nintro kept\n\n{START}\nstale\n{END}\n\n## Other\n\nother kept\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "bench.deliver", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "intro kept" in text and "other kept" in text and "stale" not in text
    section = text[text.index(START) : text.index(END)]
    assert "## Delivery (C-STORE to Orthanc)" in section
    assert "148 files (20 axial, 64 coronal, 64 sagittal" in section
    assert "python -m bench.deliver --smoke" in section
    rows = [line for line in section.splitlines() if line.startswith("| netrt ") or line.startswith("| storescu ")]
    assert len(rows) == 2
    for row in rows:
        seconds = float(row.split("|")[3].split()[0])
        assert seconds > 0
    match = re.search(r"Target: NETRT / storescu <= 2x: (met|missed by)", section)
    assert match, section
