"""`python -m flows.serve --config FILE`: serve NETRT's deployments from this process.

Started by `netrt serve` (see :func:`flows.deployments.start_flow_server`) against the API in
PREFECT_API_URL. It registers `process-study` (run on demand, one per sealed study) and
`rerun-quarantine` (on the cron schedule `quarantine.retry_cron`), then runs the flow runs they
get until SIGTERM. This is what makes both visible, triggerable and scheduled in the Prefect UI
without a separate worker in the one-command workstation setup.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from prefect import serve

from flows.process_study import process_study
from flows.rerun_quarantine import rerun_quarantine
from netrt.config import load_config


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--config", metavar="FILE", help="NETRT YAML config (default: built-in defaults)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    process = process_study.to_deployment(
        name="process-study",
        parameters={"config_file": args.config},
        description="Process one study: validate, anonymize, mask, write overlay series, deliver.",
        tags=["netrt"],
    )
    rerun = rerun_quarantine.to_deployment(
        name="rerun-quarantine",
        parameters={"config_file": args.config},
        cron=config.quarantine.retry_cron,
        description="Retry quarantined studies whose failure may have healed (delivery, not validation).",
        tags=["netrt"],
    )
    # Poll for new flow runs every second (Prefect's default is 10 s): a sealed study starts promptly
    # (the poll is one cheap API query; at 2 s it added about 1 s on average to every study).
    # `limit`: serve() otherwise starts every pending run at once (a process of ~0.5 GB each, all
    # competing for the cores); the rest wait as Scheduled/Pending until a slot frees.
    serve(
        process,
        rerun,
        print_starting_message=True,
        query_seconds=1,
        limit=config.prefect.process_study_concurrency,
    )


if __name__ == "__main__":
    main()
