"""The one small interface every output kind implements, and how kinds are found.

A kind is a module in this package with a module-level ``KIND`` (an :class:`OutputKind`): its name
(the value in ``processing.outputs`` and ``destinations[].outputs``), whether it writes one series
per configured plane or one per study, and a ``write`` function from an :class:`OutputContext` to
the series it wrote. :func:`output_kinds` finds the modules by scanning the package, so adding a
kind is adding a module (and its name to the config's list of kinds): nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from netrt.config import ProcessingConfig
from netrt.outputs.rois import RoiInfo
from netrt.settings import kind_settings_key
from netrt.stamps import FileStamp
from netrt.study import LoadedStudy


@dataclass(frozen=True)
class OutputContext:
    """What a kind writes from: the study as it leaves NETRT (anonymized when configured), the
    merged mask and the per-ROI masks (files, on ``study.images.geometry``), the kept ROIs in
    order, the processing settings, and the folder the kind writes under."""

    study: LoadedStudy
    merged_mask: Path
    roi_masks: Path
    rois: tuple[RoiInfo, ...]
    processing: ProcessingConfig
    work_dir: Path

    @property
    def volume_cache(self) -> Path:
        """Where the decoded source volume is shared between the kinds' writers
        (:mod:`netrt.study.volume_cache`)."""
        return self.work_dir / "volume"

    def settings_key(self, kind: str, *options: object) -> str:
        """The key a kind derives its UIDs from (:func:`netrt.settings.kind_settings_key`).

        With ``processing.structure_sets: each`` the structure set's SOPInstanceUID enters it, so the
        series made from each RTSTRUCT on the image series get UIDs of their own, stable across runs.
        """
        return kind_settings_key(self.processing, kind, *options, *_structure_set_parts(self.study))

    def describe(self, description: str) -> str:
        """A SeriesDescription (before a kind's own suffix) naming the structure set with ``each``:
        ``NETRT axial overlay [PLAN_B]``; the structure set's name survives the 64-character cut."""
        parts = _structure_set_parts(self.study)
        if not parts:
            return description[:64]
        suffix = f" [{self.study.structure_sets[0].name}]"[:64]
        return description[: 64 - len(suffix)].rstrip() + suffix


def _structure_set_parts(study: LoadedStudy) -> tuple[str, ...]:
    if study.structure_set_mode != "each" or len(study.structure_sets) != 1:
        return ()
    return ("structure-set", study.structure_sets[0].sop_instance_uid)


@dataclass(frozen=True)
class WrittenSeries:
    """One series written to the work dir, ready for delivery; ``stamps``: its ``files`` as written.

    ``kind`` is the output kind that wrote it; ``plane`` is ``axial``/``coronal``/``sagittal`` for
    per-plane kinds and ``study`` for per-study kinds (SEG).
    """

    plane: str
    burn_in: bool
    series_instance_uid: str
    folder: Path
    files: tuple[Path, ...]
    # The default only lets a result persisted before stamps load (Prefect reads every field of a
    # cached result); such a result is never intact (netrt.pipeline.result_files_intact): recomputed.
    stamps: tuple[FileStamp, ...] = ()
    kind: str = "overlay"
    notes: tuple[str, ...] = field(default=())  # sentences for the run summary (e.g. ROIs merged)


WriteFn = Callable[[OutputContext, str], list[WrittenSeries]]


@dataclass(frozen=True)
class OutputKind:
    """An output kind: ``write(context, plane)`` writes its series (``plane`` is ``"study"`` for a
    per-study kind) and returns them. ``series_number_offset`` is added to
    ``processing.series_number_base`` (per-plane kinds add 1, 2, 3 for axial, coronal, sagittal)."""

    name: str
    per_plane: bool
    write: WriteFn
    series_number_offset: int
    description: str


STUDY = "study"


@cache
def output_kinds() -> dict[str, OutputKind]:
    """Every kind in this package, by name (each module with a ``KIND``)."""
    import netrt.outputs as package

    kinds: dict[str, OutputKind] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        kind = getattr(module, "KIND", None)
        if isinstance(kind, OutputKind):
            if kind.name in kinds:
                raise RuntimeError(f"two output kinds are named {kind.name!r}")
            kinds[kind.name] = kind
    return kinds


def output_kind(name: str) -> OutputKind:
    """The kind called ``name``; KeyError naming the known kinds otherwise."""
    kinds = output_kinds()
    if name not in kinds:
        raise KeyError(f"unknown output kind {name!r}; known: {', '.join(sorted(kinds))}")
    return kinds[name]
