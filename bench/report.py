"""Shared pieces of the benchmark report: machine facts, statistics, Markdown tables, BENCHMARKS.md sections.

Every figure (``bench/<figure>.py``) renders its own Markdown section; :func:`write_section` puts it
between ``<!-- bench:<figure>:start -->`` and ``<!-- bench:<figure>:end -->`` in BENCHMARKS.md and
leaves everything else in the file as it was, so figures can be re-measured one at a time.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "BENCHMARKS.md"

FILE_HEADER = """# NETRT benchmarks

Measured with `python -m bench` (see `bench/`). The machines these run on are shared and noisy, so
every figure is a median of several runs, and every claim is a ratio against a baseline measured in
the same run, never a single absolute time. Each section below is rewritten by its own figure;
the rest of this file is left as it is. Run every figure with `.venv/bin/python -m bench`.
"""


@dataclass(frozen=True)
class Options:
    """What ``python -m bench`` was asked for; every figure gets the same options."""

    smoke: bool
    runs: int
    out: Path
    profile: bool


@dataclass(frozen=True)
class Machine:
    """Where and with what a figure was measured."""

    cpu_count: int
    memory_gib: float
    date_utc: str
    platform: str
    python: str
    versions: dict[str, str]

    def markdown(self) -> str:
        versions = ", ".join(f"{name} {version}" for name, version in self.versions.items())
        return (
            f"- machine: {self.cpu_count} CPUs (`os.cpu_count()`), {self.memory_gib:.1f} GiB memory, {self.platform}\n"
            f"- date (UTC): {self.date_utc}\n"
            f"- versions: Python {self.python}, {versions}"
        )


def _memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / (1024 * 1024)
    except OSError:
        pass
    return float("nan")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(distributions: Sequence[str] = ("netrt", "pydicom", "SimpleITK", "numpy")) -> Machine:
    return Machine(
        cpu_count=os.cpu_count() or 0,
        memory_gib=_memory_gib(),
        date_utc=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        platform=f"{platform.system()} {platform.release()} {platform.machine()}",
        python=platform.python_version(),
        versions={name: _version(name) for name in distributions},
    )


def command_line() -> str:
    """The command as the user typed it, as far as ``sys.argv`` tells (``python -m bench ...``)."""
    args = sys.argv[1:]
    return " ".join([".venv/bin/python -m bench", *args]) if args else ".venv/bin/python -m bench"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for the servers a figure starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """``min-max`` of the runs, so a reader sees how noisy the median is."""
    return f"{min(values):.2f}-{max(values):.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def verdict(ratio: float, target: float) -> str:
    """``met`` or ``missed by ...``, said plainly."""
    if ratio <= target:
        return f"met ({ratio:.2f}x <= {target:g}x)"
    return (
        f"missed by {ratio - target:.2f}x ({ratio:.2f}x against a target of <= {target:g}x; "
        f"meeting it takes {ratio / target:.2f} times the speed)"
    )


def markers(figure: str) -> tuple[str, str]:
    return f"<!-- bench:{figure}:start -->", f"<!-- bench:{figure}:end -->"


def write_section(path: Path, figure: str, body: str) -> None:
    """Replace the figure's section of ``path`` (between its markers), or append it; keep the rest."""
    start, end = markers(figure)
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else FILE_HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)


# --- the summary table at the top of BENCHMARKS.md ---------------------------------------------

SUMMARY = "summary"
SUMMARY_ROW = re.compile(r"<!-- bench:row (\{.*?\}) -->")
SUMMARY_HEADERS = ("figure", "NETRT", "comparison", "ratio", "target", "met?", "command")


def summary_row(
    *,
    figure: str,
    netrt: str,
    comparison: str,
    ratio: float | None,
    target: str,
    met: bool | None,
    command: str,
    note: str = "",
) -> str:
    """A machine-readable summary line, kept (invisible) inside the figure's own section.

    :func:`write_summary` collects these from every section of the file, so the summary table is
    right also when figures are re-measured one at a time. ``met`` None: no target.
    """
    data = {
        "figure": figure,
        "netrt": netrt,
        "comparison": comparison,
        "ratio": ratio,
        "target": target,
        "met": met,
        "command": command,
        "note": note,
    }
    return f"<!-- bench:row {json.dumps(data)} -->"


def _met_cell(data: dict[str, object]) -> str:
    met = data.get("met")
    if met is None:
        return "no target"
    if met:
        return "met"
    note = str(data.get("note") or "")
    target = re.fullmatch(r"<=? ?(\d+(?:\.\d+)?)x.*", str(data.get("target", "")))
    ratio = data.get("ratio")
    if not note and target and isinstance(ratio, int | float):
        limit = float(target.group(1))
        note = f"by {float(ratio) - limit:.2f}x ({float(ratio) / limit:.2f} times too slow or big)"
    return f"**missed** {note}".strip()


def summary_table(text: str) -> str:
    rows = []
    for match in SUMMARY_ROW.finditer(text):
        data = json.loads(match.group(1))
        ratio = data.get("ratio")
        rows.append(
            [
                str(data["figure"]),
                str(data["netrt"]),
                str(data["comparison"]),
                "-" if ratio is None else f"{float(ratio):.2f}x",
                str(data["target"]),
                _met_cell(data),
                f"`{data['command']}`",
            ]
        )
    # Figures are numbered as in issue 9; a figure's own lines keep their order (the sort is stable).
    rows.sort(key=lambda row: int(row[0].split(".")[0]) if row[0].split(".")[0].isdigit() else 99)
    return markdown_table(SUMMARY_HEADERS, rows)


def write_summary(path: Path, wall_seconds: float | None = None) -> None:
    """(Re)write the summary table right after the file's header, from every section's rows."""
    text = path.read_text(encoding="utf-8")
    facts = machine(("netrt", "pydicom", "pynetdicom", "SimpleITK", "numpy", "rt-utils", "prefect"))
    wall = f"; the whole run took {wall_seconds / 60:.1f} min of wall time" if wall_seconds is not None else ""
    body = (
        "## Summary\n\n"
        "One line per figure, collected from the sections below (each section says how it was measured). "
        "Ratios are NETRT / comparison of medians over alternating runs in the same process; a lower ratio is "
        f"better. Regenerated by `.venv/bin/python -m bench` (all figures{wall}).\n\n"
        f"{facts.markdown()}\n\n{summary_table(text)}\n"
    )
    start, end = markers(SUMMARY)
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        first = text.find("<!-- bench:")
        text = text.rstrip("\n") + "\n\n" + block + "\n" if first < 0 else text[:first] + block + "\n\n" + text[first:]
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)
