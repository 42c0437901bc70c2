"""A PNG preview of a processed study: axial, coronal and sagittal mid-slices with the mask in colour.

The preview is what a physicist glances at in the Prefect UI to see that the overlay sits on the
anatomy before opening a viewer. It is drawn on the image series' own voxel grid (not on the
written series), so it checks the mask itself: each panel is one grid slice through the middle of
the mask's extent, scaled with nearest-neighbour sampling to square millimetre pixels, grey-scale
windowed, with mask voxels tinted red and their outline drawn in full red.

Panels sit side by side in one RGB PNG written with SimpleITK (no imaging library beyond the ones
NETRT already uses). :class:`PreviewPanel` records where each panel is and which grid voxel every
panel pixel shows, so a test can check the drawing against an independent truth.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

_sitk: Any = sitk

PANEL_SIZE = 320
GAP = 4
FILL_ALPHA = 0.45
RED = np.array([255, 32, 32], dtype=np.float32)


@dataclass(frozen=True)
class PreviewPanel:
    """One panel of the preview.

    ``rows`` and ``cols`` are, for every panel pixel row/column, the grid index shown there along
    the panel's vertical and horizontal axes; ``fixed`` is the index of the slice through the grid.
    Axial: vertical = grid row, horizontal = grid column, fixed = slice. Coronal: vertical = slice
    (top = highest), horizontal = column, fixed = row. Sagittal: vertical = slice (top = highest),
    horizontal = grid row, fixed = column.
    """

    plane: str
    x0: int
    y0: int
    fixed: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def height(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return len(self.cols)

    def sample(self, volume: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The ``[slice, row, col]`` volume as this panel shows it (same shape as the panel)."""
        rows = np.asarray(self.rows)[:, None]
        cols = np.asarray(self.cols)[None, :]
        if self.plane == "axial":
            cut = volume[self.fixed]
        elif self.plane == "coronal":
            cut = volume[:, self.fixed, :]
        else:
            cut = volume[:, :, self.fixed]
        sampled: npt.NDArray[Any] = cut[rows, cols]
        return sampled


@dataclass(frozen=True)
class Preview:
    path: Path
    width: int
    height: int
    panels: tuple[PreviewPanel, ...]


def _middle(mask: npt.NDArray[np.bool_], axis: int) -> int:
    """Index along ``axis`` through the middle of the mask's extent (the grid's middle when empty)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(mask.any(axis=other))
    if present.size == 0:
        return int(mask.shape[axis]) // 2
    return int((present[0] + present[-1]) // 2)


def _axis_samples(count: int, spacing: float, pixel_mm: float, reverse: bool) -> tuple[int, ...]:
    """Nearest grid index for each panel pixel along one axis with ``pixel_mm`` square pixels."""
    length = max(1, round(count * spacing / pixel_mm))
    centres = (np.arange(length) + 0.5) * pixel_mm / spacing - 0.5
    indices = np.clip(np.rint(centres), 0, count - 1).astype(int)
    if reverse:
        indices = indices[::-1]
    return tuple(int(i) for i in indices)


def _window(values: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Grey levels 0-255 from the 1st-99th percentile of the slice (works for CT, MR and PET alike)."""
    low, high = np.percentile(values, [1.0, 99.0])
    if high <= low:
        high = low + 1.0
    grey: npt.NDArray[np.float32] = np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32) * 255.0
    return grey


def _outline(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    padded = np.pad(mask, 1)
    interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _draw(image: npt.NDArray[np.float32], mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    grey = _window(image)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[mask] = (1.0 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * RED
    rgb[_outline(mask)] = RED
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def preview_panels(mask: npt.NDArray[np.bool_], spacing: tuple[float, float, float]) -> tuple[PreviewPanel, ...]:
    """Where the three panels go and which voxels they show, for a ``[slice, row, col]`` grid.

    Each panel cuts through the middle of the mask's extent along its axis; pixels are square,
    ``pixel_mm`` wide, chosen so the longest side of the grid spans about :data:`PANEL_SIZE` pixels.
    """
    slices, rows, cols = mask.shape
    col_mm, row_mm, slice_mm = spacing
    extent = max(cols * col_mm, rows * row_mm, slices * slice_mm)
    pixel_mm = max(extent / PANEL_SIZE, min(spacing))
    along_cols = _axis_samples(cols, col_mm, pixel_mm, reverse=False)
    along_rows = _axis_samples(rows, row_mm, pixel_mm, reverse=False)
    slices_up = _axis_samples(slices, slice_mm, pixel_mm, reverse=True)
    layout = [
        ("axial", _middle(mask, 0), along_rows, along_cols),
        ("coronal", _middle(mask, 1), slices_up, along_cols),
        ("sagittal", _middle(mask, 2), slices_up, along_rows),
    ]
    panels = []
    x = 0
    for plane, fixed, panel_rows, panel_cols in layout:
        panels.append(PreviewPanel(plane, x, 0, fixed, panel_rows, panel_cols))
        x += len(panel_cols) + GAP
    return tuple(panels)


def render_preview(
    volume: npt.NDArray[Any],
    mask: npt.NDArray[np.bool_],
    spacing: tuple[float, float, float],
    path: Path,
) -> Preview:
    """Write the three-panel PNG for ``volume`` and ``mask`` (both ``[slice, row, col]``) to ``path``.

    ``volume`` holds modality values in any real dtype (only the three cut planes are converted).

    ``spacing`` is (column, row, slice) in mm, as :attr:`netrt.geometry.ImageGeometry.spacing`.
    The PNG is written atomically (temp file, rename). Returns where each panel is and what it shows.

    Raises:
        ValueError: volume and mask differ in shape.
    """
    if volume.shape != mask.shape:
        raise ValueError(f"volume {volume.shape} and mask {mask.shape} differ in shape")
    panels = preview_panels(mask, spacing)
    width = max(p.x0 + p.width for p in panels)
    height = max(p.y0 + p.height for p in panels)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for panel in panels:
        drawn = _draw(panel.sample(volume).astype(np.float32), panel.sample(mask).astype(bool))
        canvas[panel.y0 : panel.y0 + panel.height, panel.x0 : panel.x0 + panel.width] = drawn
    image = _sitk.GetImageFromArray(canvas, isVector=True)
    # SimpleITK picks the format from the extension and writes by name: write beside, then rename.
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
    try:
        _sitk.WriteImage(image, str(temporary))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return Preview(path, width, height, tuple(panels))


def read_preview(path: Path) -> npt.NDArray[np.uint8]:
    """The preview PNG as an ``[y, x, rgb]`` array (for tests and reports)."""
    pixels: npt.NDArray[np.uint8] = _sitk.GetArrayFromImage(_sitk.ReadImage(str(path)))
    return pixels
