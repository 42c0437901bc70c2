"""One run of the "outputs" figure in a fresh process (see :mod:`bench.outputs`).

``python -m bench.outputs_worker --input DIR --work DIR --result FILE --outputs overlay,seg,color``
loads the one study under DIR, computes its masks, writes every kind's series (per plane, SEG once)
and copies them to a folder destination, timing each stage; it writes the stage times, the total
(imports excluded), the peak RSS (``ru_maxrss``) and the decoded pixel bytes to FILE as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--outputs", required=True)
    args = parser.parse_args()

    from netrt.config import ProcessingConfig
    from netrt.deliver import deliver_to_folder
    from netrt.outputs.routing import output_calls, output_label
    from netrt.pipeline import compute_mask, write_output
    from netrt.study import find_studies, load_study

    processing = ProcessingConfig(outputs=args.outputs.split(","))
    if {"seg", "color"} & set(processing.outputs):
        # highdicom is imported where SEG and colour series are written (netrt keeps it off the
        # overlay-only path); imported here, so that "imports excluded" holds for every variant
        import highdicom  # noqa: F401
    stages: dict[str, float] = {}
    started = time.perf_counter()

    def timed(stage: str, call):  # type: ignore[no-untyped-def]
        begin = time.perf_counter()
        value = call()
        stages[stage] = time.perf_counter() - begin
        return value

    (found,) = timed("find", lambda: find_studies(args.input))
    study = timed("validate", lambda: load_study(found.files))
    masks = timed("masks", lambda: compute_mask(study, processing, args.work / "work"))
    files = []
    for kind, plane in output_calls(processing):
        written = timed(
            f"write {output_label(kind, plane)}",
            lambda k=kind, p=plane: write_output(study, masks, k, p, processing, args.work / "work"),
        )
        files += [path for series in written for path in series.files]
    # as the flow does: derived files under the work dir are hard-linked into the folder destination
    outcome = timed(
        "deliver", lambda: deliver_to_folder("bench", args.work / "delivered", files, link_from=args.work / "work")
    )
    if outcome.stored != len(files):
        raise RuntimeError(outcome.detail)
    seconds = time.perf_counter() - started
    rows, columns = study.images.geometry.shape[1:]
    result = {
        "seconds": seconds,
        "stages": stages,
        "rois": masks.kept,
        "files": len(files),
        # the sizes of the written files, for the I/O floor of the same output (bench.outputs.io_floor)
        "sizes": [path.stat().st_size for path in files],
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "decoded_pixel_bytes": len(study.images.files) * rows * columns * 2,
    }
    args.result.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
