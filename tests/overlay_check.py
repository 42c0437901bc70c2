"""Read overlay series back and score them in patient space against a phantom's analytic shapes.

Nothing here trusts NETRT's own geometry code: positions come from each written file's
ImagePositionPatient, ImageOrientationPatient and PixelSpacing, and the truth from the phantom's
implicit functions (`roi_contains`), so a wrong transform anywhere shows up as a low Dice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from netrt.phantom import PhantomManifest, roi_contains


@dataclass
class PlaneScore:
    roi: str
    dice: float
    predicted_voxels: int
    truth_voxels: int

    @property
    def volume_error(self) -> float:
        return abs(self.predicted_voxels - self.truth_voxels) / self.truth_voxels


def overlay_points(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates of every pixel centre of a series, and its overlay bit."""
    points = []
    bits = []
    for path in files:
        ds = pydicom.dcmread(path)
        rows, cols = int(ds.Rows), int(ds.Columns)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        row_dir, col_dir = iop[:3], iop[3:]
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        r, c = np.mgrid[0:rows, 0:cols]
        xyz = ipp + c[..., None] * col_spacing * row_dir + r[..., None] * row_spacing * col_dir
        overlay = ds.overlay_array(0x6000).astype(bool)
        assert overlay.shape == (rows, cols), f"{path}: overlay {overlay.shape} vs image {(rows, cols)}"
        points.append(xyz.reshape(-1, 3))
        bits.append(overlay.ravel())
    return np.concatenate(points), np.concatenate(bits)


def score_series(manifest: PhantomManifest, files: list[Path], rois: list[str]) -> list[PlaneScore]:
    """Dice per ROI. A pixel belongs to the ROI whose analytic shape contains it (the shapes do not
    overlap); a pixel inside none (a false positive) is charged to the ROI with the nearest centre."""
    points, bits = overlay_points(files)
    inside = np.stack([roi_contains(manifest.spec, name, points) for name in rois])
    centres = np.array([manifest.roi(name).centre_patient for name in rois], dtype=float)
    owner = np.argmax(inside, axis=0)
    outside_all = ~inside.any(axis=0)
    if outside_all.any():
        stray = points[outside_all]
        owner[outside_all] = np.argmin(np.linalg.norm(stray[:, None, :] - centres[None, :, :], axis=2), axis=1)
    scores = []
    for index, name in enumerate(rois):
        truth = inside[index]
        predicted = bits & (owner == index)
        both = int((truth & predicted).sum())
        total = int(truth.sum()) + int(predicted.sum())
        scores.append(PlaneScore(name, 2.0 * both / total if total else 1.0, int(predicted.sum()), int(truth.sum())))
    return scores
