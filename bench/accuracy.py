"""Figure "accuracy": per-ROI Dice and volume error against the phantom's analytic truth, for
NETRT's rasteriser and for rt-utils (the plain script's masks), at three grids.

For each grid a phantom (``netrt.phantom``, 10 ROIs) is written; then

- NETRT: ``load_study`` + ``netrt.masks.read_structure_set`` + ``netrt.masks.roi_mask`` for every
  ROI on the study's grid (what ``compute_mask`` does per kept ROI before merging);
- rt-utils: ``RTStructBuilder.create_from`` + ``get_roi_mask_by_name`` (:mod:`bench.rtutils_script`);

and both are compared with the truth ``netrt.phantom.truth_mask`` (each solid's implicit function
at every voxel centre, never derived from the contours): Dice = 2|A and T| / (|A| + |T|), and
volume error = (voxels x voxel volume - the solid's analytic volume) / analytic volume. The truth
mask's own volume error (the pixel-centre sampling of the solid, the best any mask on that grid
can do by voxel counting) is shown beside them. Accuracy does not depend on the machine's speed.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.report import Options, command_line, machine, markdown_table, summary_row

FIGURE = "accuracy"


@dataclass(frozen=True)
class Grid:
    label: str
    rows: int
    columns: int
    pixel_mm: float
    slice_mm: float

    def describe(self) -> str:
        return f"{self.rows}x{self.columns}, {self.pixel_mm:g} mm pixels, {self.slice_mm:g} mm slices"


GRIDS = (
    Grid("1 mm slices", 256, 256, 1.0, 1.0),
    Grid("2.5 mm slices", 256, 256, 1.0, 2.5),
    Grid("2 mm isotropic", 128, 128, 2.0, 2.0),
)
SMOKE_GRIDS = (Grid("2 mm isotropic", 128, 128, 2.0, 2.0),)


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


@dataclass(frozen=True)
class RoiScore:
    grid: str
    roi: str
    shape: str
    analytic_mm3: float
    truth_error: float
    netrt_dice: float
    netrt_error: float
    rtutils_dice: float
    rtutils_error: float


def measure_grid(grid: Grid, root: Path) -> list[RoiScore]:
    from bench import rtutils_script
    from netrt.masks import read_structure_set, roi_mask
    from netrt.phantom import PhantomSpec, truth_mask, write_phantom
    from netrt.study import find_studies, load_study

    spec = PhantomSpec(
        rows=grid.rows,
        columns=grid.columns,
        pixel_spacing=(grid.pixel_mm, grid.pixel_mm),
        slice_spacing=grid.slice_mm,
        extra_spheres=4,
    )
    manifest = write_phantom(spec, root)
    folder = root / "dicom"
    study = load_study(find_studies(folder)[0].files)
    geometry = study.images.geometry
    voxel_mm3 = grid.pixel_mm * grid.pixel_mm * grid.slice_mm
    netrt_rois = {roi.name: roi for roi in read_structure_set(study.rtstruct_file)}
    rtstruct = rtutils_script.load(folder)
    scores = []
    for roi in manifest.rois:
        truth = truth_mask(spec, roi.name)
        netrt_mask, _, skipped = roi_mask(netrt_rois[roi.name], geometry)
        if skipped:
            raise RuntimeError(f"{grid.label}: NETRT skipped contours of {roi.name}: {skipped}")
        # rt-utils: (rows, columns, slices), slices sorted along the normal -> [slice, row, column]
        rt_mask = np.transpose(np.asarray(rtstruct.get_roi_mask_by_name(roi.name), dtype=bool), (2, 0, 1))
        if netrt_mask.shape != truth.shape or rt_mask.shape != truth.shape:
            raise RuntimeError(f"{roi.name}: shapes {netrt_mask.shape}, {rt_mask.shape}, truth {truth.shape}")
        analytic = roi.analytic_volume_mm3

        def error(mask: npt.NDArray[np.bool_], analytic: float = analytic) -> float:
            return (int(mask.sum()) * voxel_mm3 - analytic) / analytic

        scores.append(
            RoiScore(
                grid=grid.label,
                roi=roi.name,
                shape=roi.shape,
                analytic_mm3=analytic,
                truth_error=error(truth),
                netrt_dice=dice(netrt_mask, truth),
                netrt_error=error(netrt_mask),
                rtutils_dice=dice(rt_mask, truth),
                rtutils_error=error(rt_mask),
            )
        )
    return scores


def _pct(value: float) -> str:
    return f"{value * 100:+.2f} %"


def _max_mean(errors: list[float]) -> str:
    magnitudes = [abs(e) * 100 for e in errors]
    return f"{max(magnitudes):.2f} % / {np.mean(magnitudes):.2f} %"


def render(options: Options, grids: tuple[Grid, ...], scores: list[RoiScore]) -> str:
    rows = [
        [
            s.grid,
            s.roi,
            s.shape,
            f"{s.analytic_mm3 / 1000:.1f}",
            f"{s.netrt_dice:.4f}",
            f"{s.rtutils_dice:.4f}",
            _pct(s.netrt_error),
            _pct(s.rtutils_error),
            _pct(s.truth_error),
        ]
        for s in scores
    ]
    per_grid = []
    for grid in grids:
        mine = [s for s in scores if s.grid == grid.label]
        per_grid.append(
            [
                grid.label,
                f"{min(s.netrt_dice for s in mine):.4f} / {np.mean([s.netrt_dice for s in mine]):.4f}",
                f"{min(s.rtutils_dice for s in mine):.4f} / {np.mean([s.rtutils_dice for s in mine]):.4f}",
                _max_mean([s.netrt_error for s in mine]),
                _max_mean([s.rtutils_error for s in mine]),
                f"{sum(s.netrt_dice >= s.rtutils_dice for s in mine)} of {len(mine)}",
            ]
        )
    netrt_min = min(s.netrt_dice for s in scores)
    rt_min = min(s.rtutils_dice for s in scores)
    netrt_err = max(abs(s.netrt_error) for s in scores)
    rt_err = max(abs(s.rtutils_error) for s in scores)
    lines = [
        "## Mask accuracy (against the analytic truth)",
        "",
        "`netrt.phantom` with 10 ROIs (sphere, box, hollow sphere, torus, 4 more spheres, skull shell, body "
        "cylinder), one phantom per grid: " + "; ".join(f"{g.label}: {g.describe()}" for g in grids) + ". "
        "Truth: each solid's implicit function at every voxel centre (`netrt.phantom.truth_mask`). NETRT: "
        "`netrt.masks.roi_mask` on the loaded study's grid (what `compute_mask` merges). rt-utils: "
        "`get_roi_mask_by_name`. Volume error: voxel count x voxel volume against the solid's analytic volume; "
        "the last column is the same for the truth mask itself (what pixel-centre sampling of that grid allows).",
        "",
        f"- command: `{command_line()}`" + (" (smoke: one grid only)" if options.smoke else ""),
        machine(("netrt", "rt-utils", "pydicom", "numpy")).markdown(),
        "",
        markdown_table(
            [
                "grid",
                "Dice min / mean NETRT",
                "Dice min / mean rt-utils",
                "abs volume error max / mean NETRT",
                "abs volume error max / mean rt-utils",
                "ROIs where NETRT's Dice >= rt-utils'",
            ],
            per_grid,
        ),
        "",
        markdown_table(
            [
                "grid",
                "ROI",
                "solid",
                "analytic volume cm3",
                "Dice NETRT",
                "Dice rt-utils",
                "volume error NETRT",
                "volume error rt-utils",
                "volume error of the truth mask",
            ],
            rows,
        ),
        "",
        summary_row(
            figure="7. Mask accuracy",
            netrt=f"Dice >= {netrt_min:.4f}, abs volume error <= {netrt_err * 100:.2f} %",
            comparison=f"rt-utils: Dice >= {rt_min:.4f}, abs volume error <= {rt_err * 100:.2f} %",
            ratio=None,
            target="none set (worst Dice shown)",
            met=None,
            command=command_line(),
        ),
    ]
    return "\n".join(lines) + "\n"


def run(options: Options) -> str:
    grids = SMOKE_GRIDS if options.smoke else GRIDS
    root = Path(tempfile.mkdtemp(prefix="netrt-bench-accuracy-"))
    try:
        scores: list[RoiScore] = []
        for index, grid in enumerate(grids):
            started = time.perf_counter()
            scores += measure_grid(grid, root / f"grid{index}")
            print(f"accuracy: {grid.label} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        return render(options, grids, scores)
    finally:
        shutil.rmtree(root, ignore_errors=True)
