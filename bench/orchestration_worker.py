"""Worker of the "orchestration" figure: the same study through the flow and through direct calls.

Runs in one process against a running Prefect server (PREFECT_API_URL in the environment), so
both variants pay the same imports once and the difference is what orchestration adds per study:
task-run bookkeeping on the server, result persistence, artifacts, logging. Every run gets a fresh
data dir, so the flow never hits the cache (that would flatter it). The direct variant makes the
calls the flow's tasks make, with the planes scheduled as the flow does (axial beside coronal, then
sagittal).

``python -m bench.orchestration_worker --input DIR --root DIR --runs N --result FILE``
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from netrt.anonymize import load_or_create_secret
from netrt.config import NetrtConfig, load_config
from netrt.deliver import deliver_to_folder
from netrt.layout import DataLayout
from netrt.pipeline import (
    anonymize_step,
    compute_mask,
    content_key,
    preview_step,
    settings_key,
    study_fingerprint,
    write_plane,
)
from netrt.study import find_study, load_study


def _config(root: Path, name: str) -> tuple[Path, NetrtConfig]:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(f"paths: {{data_dir: {root / name}}}\n", encoding="utf-8")
    return path, load_config(path)


def direct(input_dir: Path, config: NetrtConfig) -> None:
    """What the process-study flow does, as plain calls."""
    layout = DataLayout.from_data_dir(config.paths.data_dir).create()
    study = load_study(find_study(input_dir).files)
    fingerprint = study_fingerprint(study)
    secret = load_or_create_secret(config.anonymization, layout.root)
    work = layout.study_dir(layout.work, study.study_instance_uid)
    key = content_key("anonymize", fingerprint)
    anonymized = anonymize_step(study, config.anonymization, secret, work / f"anonymized-{key[:12]}")
    keyed = work / content_key("mask", key, settings_key(config.processing))[:12]
    masks = compute_mask(anonymized.study, config.processing, keyed)
    planes = config.processing.planes
    with ThreadPoolExecutor(max_workers=1) as pool:  # axial beside the reformats, which run one after the other
        axial = [
            pool.submit(write_plane, anonymized.study, masks, p, config.processing, keyed)
            for p in planes
            if p == "axial"
        ]
        by_plane = {
            p: write_plane(anonymized.study, masks, p, config.processing, keyed) for p in planes if p != "axial"
        }
        for future in axial:
            by_plane["axial"] = future.result()
    written = [series for plane in planes for series in by_plane[plane]]
    preview_step(anonymized.study, masks, keyed / "preview.png")
    for destination in config.effective_destinations():
        files = [p for s in written for p in s.files]
        deliver_to_folder(destination.name, destination.path, files, link_from=work)  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.orchestration_worker")
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args(argv)

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    from flows.process_study import process_study

    # As `netrt process` runs its flow runs (netrt.cli): without flow-run heartbeats, whose thread
    # Prefect joins at the end of every run in 1 s steps. Served deployment runs keep them (the
    # end-to-end figure includes that).
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        config_file, _ = _config(args.root, "warm-up")
        process_study(study_dir=str(args.input), config_file=str(config_file))  # first run pays one-off costs
        results: dict[str, list[float]] = {"flow": [], "direct": []}
        for run in range(args.runs):
            order = ["flow", "direct"] if run % 2 == 0 else ["direct", "flow"]
            for variant in order:
                config_file, config = _config(args.root, f"{variant}-{run}")
                start = time.perf_counter()
                if variant == "flow":
                    process_study(study_dir=str(args.input), config_file=str(config_file))
                else:
                    direct(args.input, config)
                results[variant].append(time.perf_counter() - start)
    args.result.write_text(json.dumps(results), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
