"""The processing benchmark runs end to end at smoke size and writes its section of BENCHMARKS.md.

It runs the real command in a subprocess (``python -m bench process --smoke --out <tmp>/B.md``), so
any break in the benchmark, the worker processes or the NETRT calls they make fails this test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from bench.process_worker import NETRT_STAGES

REPO_ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:process:start -->", "<!-- bench:process:end -->"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _ratio(cell: str) -> float:
    match = re.fullmatch(r"\**(\d+\.\d+)x\**", cell)
    assert match, f"not a numeric ratio: {cell!r}"
    return float(match.group(1))


def test_process_benchmark_smoke_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "B.md"
    out.write_text(
        f"# Benchmarks\n\nintro kept\n\n{START}\nstale section\n{END}\n\n## Receive\n\nother figure kept\n",
        encoding="utf-8",
    )
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "process", "--smoke", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    text = out.read_text(encoding="utf-8")
    assert "intro kept" in text and "other figure kept" in text
    assert "stale section" not in text
    assert text.count(START) == 1 and text.count(END) == 1
    section = text[text.index(START) : text.index(END)]
    assert "## Processing" in section
    assert "--smoke" in section
    assert "pydicom 3" in section and "SimpleITK" in section and "numpy" in section

    rows = {_cells(line)[0]: _cells(line) for line in section.splitlines() if line.startswith("| ")}
    header = rows["stage"]
    share_column = header.index("stage / floor total")
    netrt_column = header.index("NETRT median s (min-max)")
    shares = {}
    for stage in NETRT_STAGES:
        assert stage in rows, f"no row for stage {stage}:\n{section}"
        cells = rows[stage]
        assert float(cells[netrt_column].split()[0]) >= 0.0
        shares[stage] = _ratio(cells[share_column])
        assert shares[stage] > 0.0, stage
    total = _ratio(rows["**total**"][header.index("NETRT / counterpart")])
    # The total ratio is the sum of the per-stage shares of the floor (each rounded to 0.01).
    assert abs(total - sum(shares.values())) <= 0.01 * (len(shares) + 1)
    assert re.search(r"NETRT total / floor total <= 1\.5x: (met|missed by \d+\.\d+x)", section)
    assert re.search(r"\| NETRT \| \d+ \(\d+-\d+\) \|", section), "no peak RSS row for NETRT"
    # The printed table is the written one.
    assert "| **total** |" in completed.stdout


def test_orchestration_benchmark_smoke_reports_a_paired_overhead(tmp_path: Path) -> None:
    """The figure starts a real local Prefect server, runs flow and direct calls, and says whether
    the overhead target is met, with the measured numbers."""
    out = tmp_path / "B.md"
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "orchestration", "--smoke", "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    section = text[text.index("<!-- bench:orchestration:start -->") : text.index("<!-- bench:orchestration:end -->")]
    rows = {_cells(line)[0]: _cells(line) for line in section.splitlines() if line.startswith("| ")}
    flow = float(rows["process-study flow (running server, SQLite)"][1])
    direct = float(rows["the same netrt calls, direct"][1])
    overhead = float(rows["overhead per study (paired median)"][1])
    assert flow > 0 and direct > 0
    assert abs(overhead - (flow - direct)) < 0.02  # one run: the paired median is the difference
    assert re.search(r"= \d+\.\d+ s: (met|\*\*missed by \d+\.\d+ s\*\*) \(", section), section
