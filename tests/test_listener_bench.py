"""The receive benchmark runs end to end at smoke size (storescp and NETRT in a private network
namespace, real storescu) and writes its section of BENCHMARKS.md with a ratio and a breakdown."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import IN_CI, REPO, require_tool

START, END = "<!-- bench:receive:start -->", "<!-- bench:receive:end -->"

pytestmark = [pytest.mark.slow, pytest.mark.network]


def test_receive_benchmark_smoke_writes_its_section(tmp_path: Path) -> None:
    for tool in ("storescu", "storescp", "echoscu", "unshare", "ip"):
        require_tool(tool)
    if os.geteuid() != 0:
        message = "the receive benchmark needs root for `unshare -n`"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path / "B.md"
    out.write_text(f"# Benchmarks\n\nintro kept\n\n{START}\nstale\n{END}\n", encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "receive", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "intro kept" in text and "stale" not in text
    section = text[text.index(START) : text.index(END)]
    assert "## Receive" in section and "--smoke" in section
    ratio = re.search(r"\| NETRT listener [^|]*\| [^|]*\| [^|]*\| \*\*(\d+\.\d+)x\*\* \|", section)
    assert ratio, section
    assert float(ratio.group(1)) > 0
    assert re.search(r"Target: NETRT / storescp <= 2x: (met|missed)", section)
    fsync = re.search(r"\| --- of which the two fsyncs \| (\d+\.\d+) \|", section)
    handler = re.search(r"\| - in NETRT's C-STORE handler \| (\d+\.\d+) \|", section)
    assert fsync and handler and 0 < float(fsync.group(1)) <= float(handler.group(1))
