"""Which output series a run writes, and which files each destination gets.

``processing.outputs`` (plus ``burn_in: true``) says which kinds are made; per-plane kinds are
written once per configured plane, per-study kinds once. ``destinations[].outputs`` says which
kinds a destination gets (null: every kind made; ``source``, the study as it leaves NETRT, only
when listed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from netrt.config import DicomDestination, FolderDestination, ProcessingConfig
from netrt.outputs.base import STUDY, output_kind


def output_calls(processing: ProcessingConfig) -> list[tuple[str, str]]:
    """(kind, plane) of every series-writing step, in a fixed order; plane ``"study"`` for SEG."""
    calls: list[tuple[str, str]] = []
    for kind in processing.output_kinds():
        if output_kind(kind).per_plane:
            calls += [(kind, plane) for plane in processing.planes]
        else:
            calls.append((kind, STUDY))
    return calls


def output_label(kind: str, plane: str) -> str:
    """A step's short name: ``axial`` for the overlay of the axial plane (as before kinds
    existed), ``burn-in-axial``, ``color-coronal``, ``seg``."""
    if kind == "overlay":
        return plane
    name = kind.replace("_", "-")
    return name if plane == STUDY else f"{name}-{plane}"


def shaping_settings(processing: ProcessingConfig) -> dict[str, Any]:
    """Every processing setting that may change some written series (for cache keys); which kinds
    are made is left out: a kind's own step is keyed by its name."""
    return processing.model_dump(mode="json", exclude={"outputs", "burn_in", "images_without_rtstruct"})


def route_files(
    destinations: Sequence[FolderDestination | DicomDestination], made: Mapping[str, Sequence[Path]]
) -> dict[str, list[Path]]:
    """Destination name -> the files it gets: those of the kinds it lists (every kind made but
    ``source`` when it lists none), in the order of ``made``."""
    routes: dict[str, list[Path]] = {}
    for destination in destinations:
        wanted = destination.outputs if destination.outputs is not None else [k for k in made if k != "source"]
        routes[destination.name] = [path for kind, files in made.items() if kind in wanted for path in files]
    return routes
