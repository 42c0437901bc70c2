"""The direct side of the "oneoff" figure: what `netrt process` does for one study, as plain calls,
in a fresh process (its wall time, measured by the caller, counts interpreter start and imports).

``python -m bench.oneoff_direct --input DIR --config FILE``
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.oneoff_direct")
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)

    from bench.orchestration_worker import direct
    from netrt.config import load_config
    from netrt.study import find_studies

    (study,) = find_studies(args.input)  # what `netrt process` does first: one study is expected here
    direct(args.input, load_config(args.config))
    return 0 if study.study_instance_uid else 1


if __name__ == "__main__":
    raise SystemExit(main())
