"""``python -m bench [FIGURE ...] [--smoke] [--runs N] [--out BENCHMARKS.md] [--profile]``

Runs the named figures (all of them when none is named), prints each figure's section and writes it
into BENCHMARKS.md between its markers, leaving the other sections as they are. Exit status 0 only
when every figure ran.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import (
    accuracy,
    deliver,
    endtoend,
    flowmemory,
    oneoff,
    orchestration,
    outputs,
    process,
    receive,
    scaling,
)
from bench.report import DEFAULT_OUT, Options, write_section, write_summary

# Figure name -> function measuring it and returning its Markdown section (issue 9's order).
FIGURES: dict[str, Callable[[Options], str]] = {
    receive.FIGURE: receive.run,
    deliver.FIGURE: deliver.run,
    process.FIGURE: process.run,
    endtoend.FIGURE: endtoend.run,
    orchestration.FIGURE: orchestration.run,
    scaling.FIGURE: scaling.run,
    accuracy.FIGURE: accuracy.run,
    oneoff.FIGURE: oneoff.run,
    outputs.FIGURE: outputs.run,
    flowmemory.FIGURE: flowmemory.run,
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="NETRT benchmarks (see BENCHMARKS.md).")
    parser.add_argument(
        "figures", nargs="*", metavar="FIGURE", help=f"figures to run: {', '.join(FIGURES)} (default: all)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and 1 run: checks the benchmark works")
    parser.add_argument("--runs", type=_positive, help="runs per variant; the median is reported (default 3, smoke 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to update (default BENCHMARKS.md)")
    parser.add_argument("--profile", action="store_true", help="profile the slowest stage (bench/profiles/)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.figures if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    runs = args.runs if args.runs is not None else (1 if args.smoke else 3)
    options = Options(smoke=args.smoke, runs=runs, out=args.out, profile=args.profile)
    started = time.perf_counter()
    names = args.figures or list(FIGURES)
    failed: list[str] = []
    for name in names:
        figure_started = time.perf_counter()
        try:
            section = FIGURES[name](options)
        except Exception:  # one broken figure must not cost the others' measurements
            traceback.print_exc()
            print(f"{name}: FAILED; its section is left as it was", file=sys.stderr)
            failed.append(name)
            continue
        print(section)
        write_section(options.out, name, section)
        took = time.perf_counter() - figure_started
        print(f"{name}: section written to {options.out} ({took:.0f} s)", file=sys.stderr)
    wall = time.perf_counter() - started
    write_summary(options.out, wall if len(names) == len(FIGURES) and not failed else None)
    print(f"summary written to {options.out}; {len(names)} figure(s) in {wall:.0f} s", file=sys.stderr)
    if failed:
        print(f"failed figure(s): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
