"""Burn the outline of a mask into stored pixel values, for viewers that ignore overlays.

Some PACS viewers and most web viewers never draw the Overlay Plane; a physicist checking a
contour there sees nothing. The burn-in series therefore carries the mask's outline in the pixel
data itself. Only the outline (not the filled mask) is burned, so the anatomy under the ROI stays
readable, and the value is chosen to show as white in the series' own window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from netrt.errors import NetrtError

BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.integer]


def outline(mask: npt.ArrayLike) -> BoolArray:
    """The in-plane border of a mask: mask voxels with a 4-neighbour outside it, per slice.

    ``mask & ~erode(mask)`` with a 3x3 cross, slice by slice (a 2-D or ``[slice, row, col]`` 3-D
    array). The erosion is in-plane only because each written image shows one slice: a 3-D erosion
    would also mark whole top and bottom slices of a structure, which then read as filled areas.
    Pixels outside the image count as background, so a mask touching the image edge is closed there.
    The cross (not the full 3x3 square) gives a 1-pixel, 8-connected line, thin enough to leave the
    anatomy visible.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim not in (2, 3):
        raise ValueError(f"outline needs a 2-D or 3-D mask, got shape {m.shape}")
    interior = m.copy()
    # Row neighbours (axis -2) and column neighbours (axis -1); the first/last row and column
    # have a neighbour outside the image, i.e. background, so they never stay interior.
    interior[..., 1:, :] &= m[..., :-1, :]
    interior[..., :-1, :] &= m[..., 1:, :]
    interior[..., :, 1:] &= m[..., :, :-1]
    interior[..., :, :-1] &= m[..., :, 1:]
    interior[..., 0, :] = False
    interior[..., -1, :] = False
    interior[..., :, 0] = False
    interior[..., :, -1] = False
    result: BoolArray = m & ~interior
    return result


def stored_range(bits_stored: int, pixel_representation: int) -> tuple[int, int]:
    """Smallest and largest stored value that BitsStored / PixelRepresentation allow."""
    if not 1 <= bits_stored <= 32 or pixel_representation not in (0, 1):
        raise NetrtError(
            f"unsupported pixel format: BitsStored {bits_stored}, PixelRepresentation {pixel_representation}"
        )
    if pixel_representation == 1:
        return -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    return 0, (1 << bits_stored) - 1


def burn_value(
    bits_stored: int,
    pixel_representation: int,
    image_max: int,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    window_center: float | None = None,
    window_width: float | None = None,
) -> int:
    """The stored value to draw the outline with.

    The top of the window (``center + width / 2`` in modality units, converted to a stored value)
    is the lowest value a viewer shows as full white in the series' default window, so it stands
    out without a huge number that would stretch an auto-window; it is used when it is at least
    the image's own maximum (so the line is the brightest thing on the slice) and fits the stored
    range. Otherwise (no window, or bright anatomy or metal above it) the largest stored value is
    used.
    """
    _, highest = stored_range(bits_stored, pixel_representation)
    if window_center is not None and window_width is not None and slope != 0:
        top = int(np.ceil((window_center + window_width / 2.0 - intercept) / slope))
        if image_max <= top <= highest:
            return top
    return highest


def burn(stored_pixels: npt.ArrayLike, outline_mask: npt.ArrayLike, value: int) -> npt.NDArray[np.generic]:
    """A copy of ``stored_pixels`` with ``value`` at every outline pixel; the input is untouched."""
    pixels = np.asarray(stored_pixels)
    where = np.asarray(outline_mask, dtype=bool)
    if pixels.shape != where.shape:
        raise ValueError(f"outline shape {where.shape} does not match the pixels {pixels.shape}")
    info = np.iinfo(pixels.dtype) if np.issubdtype(pixels.dtype, np.integer) else None
    if info is not None and not info.min <= value <= info.max:
        raise ValueError(f"burn value {value} does not fit the pixel type {pixels.dtype}")
    result = pixels.copy()
    result[where] = value
    return result


def first_value(value: object) -> float | None:
    """The first number of a possibly multi-valued DS (WindowCenter may hold several windows)."""
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return float(value[0]) if len(value) else None
    try:
        return float(str(value))
    except (TypeError, ValueError):
        return None
