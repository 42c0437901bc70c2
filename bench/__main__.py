"""``python -m bench [FIGURE ...] [--smoke] [--runs N] [--out BENCHMARKS.md] [--profile]``

Runs the named figures (all of them when none is named), prints each figure's section and writes it
into BENCHMARKS.md between its markers, leaving the other sections as they are. Exit status 0 only
when every figure ran.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from bench import deliver, orchestration, process, receive
from bench.report import DEFAULT_OUT, Options, write_section

# Figure name -> function measuring it and returning its Markdown section. Issue 9 adds the others.
FIGURES: dict[str, Callable[[Options], str]] = {
    process.FIGURE: process.run,
    orchestration.FIGURE: orchestration.run,
    deliver.FIGURE: deliver.run,
    receive.FIGURE: receive.run,
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
    for name in args.figures or list(FIGURES):
        section = FIGURES[name](options)
        print(section)
        write_section(options.out, name, section)
        print(f"{name}: section written to {options.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
