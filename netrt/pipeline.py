"""The steps of processing one study, as plain functions over paths and UIDs.

Each function is one Prefect task's body (see ``flows/process_study.py``), and together they are
also the direct, orchestration-free path the benchmarks compare the flow against. Big objects
(the volume, the mask) never cross a step boundary: the mask is stored under the study's work dir
and steps hand each other its path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom

from netrt import __version__
from netrt.config import ProcessingConfig
from netrt.fileio import atomic_output
from netrt.masks import MergedMask, RoiReport, build_merged_mask, ignored_names, kept_names
from netrt.overlay import SeriesSettings, write_axial_series, write_reformatted_series
from netrt.reformat import reformat
from netrt.study import LoadedStudy, read_image_volume

PLANE_NUMBER = {"axial": 1, "coronal": 2, "sagittal": 3}
BURN_IN_NUMBER_OFFSET = 10


@dataclass(frozen=True)
class MaskStepResult:
    """Where the merged mask is stored and what went into it."""

    mask_path: Path
    rois: tuple[RoiReport, ...]
    warnings: tuple[str, ...]
    voxel_count: int

    @property
    def kept(self) -> list[str]:
        return kept_names(self.rois)

    @property
    def ignored(self) -> list[str]:
        return ignored_names(self.rois)


@dataclass(frozen=True)
class WrittenSeries:
    """One series written to the work dir, ready for delivery."""

    plane: str
    burn_in: bool
    series_instance_uid: str
    folder: Path
    files: tuple[Path, ...]


def settings_key(processing: ProcessingConfig) -> str:
    """A short hash of everything that changes the written series, plus the code version.

    It feeds the output UIDs (same study + same settings -> same UIDs, so a re-send overwrites)
    and the cache keys of the flow's deterministic tasks.
    """
    payload = json.dumps({"processing": processing.model_dump(mode="json"), "netrt": __version__}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def series_settings(processing: ProcessingConfig, plane: str, roi_names: list[str], burn_in: bool) -> SeriesSettings:
    description = processing.series_description.replace("{plane}", plane)
    number = processing.series_number_base + PLANE_NUMBER[plane]
    if burn_in:
        description = f"{description} burn-in"[:64]
        number += BURN_IN_NUMBER_OFFSET
    label = "NETRT: " + ", ".join(roi_names)
    return SeriesSettings(
        description=description[:64],
        series_number=number,
        roi_label=label[:64],
        settings_key=settings_key(processing),
    )


def save_mask(mask: npt.NDArray[np.bool_], path: Path) -> Path:
    """Store a boolean volume bit-packed (1/8 of its bytes) with its shape."""
    with atomic_output(path, durable=False) as handle:
        np.savez(handle, bits=np.packbits(mask, axis=None), shape=np.asarray(mask.shape, dtype=np.int64))
    return path


def load_mask(path: Path) -> npt.NDArray[np.bool_]:
    with np.load(path) as data:
        shape = tuple(int(n) for n in data["shape"])
        count = int(np.prod(shape))
        return np.unpackbits(data["bits"], count=count).astype(bool).reshape(shape)


def compute_mask(study: LoadedStudy, processing: ProcessingConfig, work_dir: Path) -> MaskStepResult:
    """Rasterise and merge the kept ROIs on the image grid; store the mask under ``work_dir``."""
    merged: MergedMask = build_merged_mask(
        study.rtstruct_file, study.images.geometry, processing.include_rois, processing.ignore_rois
    )
    mask_path = save_mask(merged.mask, work_dir / f"mask-{settings_key(processing)}.npz")
    return MaskStepResult(mask_path, merged.rois, tuple(merged.warnings), int(merged.mask.sum()))


def write_plane(
    study: LoadedStudy, masks: MaskStepResult, plane: str, processing: ProcessingConfig, work_dir: Path
) -> list[WrittenSeries]:
    """Write the overlay series of one plane (and its burn-in twin when configured) under ``work_dir``."""
    mask = load_mask(masks.mask_path)
    variants = [False, True] if processing.burn_in else [False]
    written = []
    if plane == "axial":
        for burn_in in variants:
            settings = series_settings(processing, plane, masks.kept, burn_in)
            folder = work_dir / "series" / f"{plane}{'-burn-in' if burn_in else ''}"
            files = write_axial_series(study.images.files, mask, folder, settings, burn_in=burn_in)
            written.append(_written(plane, burn_in, folder, files))
        return written
    volume = read_image_volume(study.images)
    planar = reformat(volume, mask, study.images.geometry, plane, processing.reformat_spacing_mm)
    del volume
    for burn_in in variants:
        settings = series_settings(processing, plane, masks.kept, burn_in)
        folder = work_dir / "series" / f"{plane}{'-burn-in' if burn_in else ''}"
        files = write_reformatted_series(planar, study.images.files[0], folder, settings, burn_in=burn_in)
        written.append(_written(plane, burn_in, folder, files))
    return written


def _written(plane: str, burn_in: bool, folder: Path, files: list[Path]) -> WrittenSeries:
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID) if files else ""
    return WrittenSeries(plane, burn_in, series_uid, folder, tuple(files))
