"""The ``burn_in`` output kind: per plane, the overlay series with the ROI outlines burned into the
pixels, for viewers that draw no overlays (see :mod:`netrt.outputs.overlay`, which writes both)."""

from __future__ import annotations

from netrt.outputs.base import OutputContext, OutputKind, WrittenSeries
from netrt.outputs.overlay import BURN_IN_NUMBER_OFFSET, write_overlay_series


def _write_burn_in(context: OutputContext, plane: str) -> list[WrittenSeries]:
    return write_overlay_series(context, plane, burn_in=True)


KIND = OutputKind(
    name="burn_in",
    per_plane=True,
    write=_write_burn_in,
    series_number_offset=BURN_IN_NUMBER_OFFSET,
    description="the overlay series with the merged mask's outline burned into the pixels",
)
