"""``python -m bench.preview_image [--out docs/preview.png] [--time DICOM_DIR]``

Regenerates the preview image the README shows (``docs/preview.png``): the default phantom
(``netrt phantom``'s defaults) through the same steps ``netrt process`` runs before its preview
(mask step with the default config, then :func:`netrt.pipeline.preview_step` with the default
disclaimer), without starting Prefect, so the picture is exactly what a newcomer's first run shows.

``--time DICOM_DIR`` instead times :func:`preview_step` alone on an existing study (median of 3,
after the mask step), e.g. on ``netrt phantom /tmp/pv --rows 512 --columns 512 --slices 200
--extra-spheres 5``'s ``/tmp/pv/dicom``: the figure issue 19 asks to stay at or under 0.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from netrt.config import ProcessingConfig
from netrt.phantom import PhantomSpec, write_phantom
from netrt.pipeline import compute_mask, preview_step
from netrt.study import load_found_study, load_study

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "preview.png"


def make_image(out: Path) -> Path:
    """Write the default phantom's preview to ``out``."""
    processing = ProcessingConfig()
    with tempfile.TemporaryDirectory(prefix="netrt-preview-") as tmp:
        manifest = write_phantom(PhantomSpec(), Path(tmp) / "phantom")
        study = load_study([*manifest.image_files, manifest.rtstruct_file])
        masks = compute_mask(study, processing, Path(tmp) / "work")
        preview_step(study, masks, out, processing.disclaimer)
    return out


def time_preview(dicom_dir: Path, runs: int = 3) -> list[float]:
    """Seconds of each of ``runs`` :func:`preview_step` calls on the study in ``dicom_dir``."""
    processing = ProcessingConfig()
    study = load_found_study(dicom_dir)
    seconds = []
    with tempfile.TemporaryDirectory(prefix="netrt-preview-") as tmp:
        masks = compute_mask(study, processing, Path(tmp) / "work")
        for run in range(runs):
            start = time.perf_counter()
            preview_step(study, masks, Path(tmp) / f"preview-{run}.png", processing.disclaimer)
            seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.preview_image", description=__doc__.splitlines()[2])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--time", type=Path, metavar="DICOM_DIR")
    args = parser.parse_args()
    if args.time is not None:
        seconds = time_preview(args.time)
        print(f"preview_step: median {statistics.median(seconds):.3f} s of {', '.join(f'{s:.3f}' for s in seconds)}")
        return
    out = make_image(args.out)
    print(f"{out} ({out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
