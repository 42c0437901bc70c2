"""The `rerun-quarantine` flow: retry quarantined studies whose cause may have healed.

Only entries marked retryable (a destination unreachable or timing out, a full disk) are retried,
each at most ``quarantine.max_attempts`` times in all; a study that failed validation stays until
someone fixes it and runs `netrt quarantine retry`. Each retry is a `process-study` subflow, so it
has its own run history and, its series being cached, only delivers again.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.process_study import process_study
from netrt.config import load_config
from netrt.layout import DataLayout
from netrt.quarantine import begin_retry, list_entries


@flow(name="rerun-quarantine")
def rerun_quarantine(config_file: str | None = None) -> dict[str, Any]:
    """Retry every retryable quarantined study below the attempt limit; fail if any fails again."""
    config = load_config(config_file)
    layout = DataLayout.from_data_dir(config.paths.data_dir).create()
    logger = get_run_logger()
    limit = config.quarantine.max_attempts
    entries = list_entries(layout)
    eligible = [e for e in entries if e.retryable and e.attempts < limit and e.status != "retrying"]
    logger.info("%d quarantined studies, %d eligible for a retry", len(entries), len(eligible))
    succeeded: list[str] = []
    failed: list[str] = []
    for entry in eligible:
        study_dir = begin_retry(layout, entry.id)
        try:
            process_study(study_dir=str(study_dir), config_file=config_file)
        except Exception as exc:  # the subflow has quarantined the study again with its reason
            logger.warning("quarantined study %s failed again: %s", entry.id, exc)
            failed.append(entry.id)
        else:
            succeeded.append(entry.id)
    summary = {"eligible": len(eligible), "succeeded": succeeded, "failed": failed}
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(eligible)} quarantined studies failed again: {', '.join(failed)}")
    return summary
