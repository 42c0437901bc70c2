"""The ``overlay`` and ``burn_in`` output kinds: the image series again, per plane, with the mask.

``overlay`` puts the mask in Overlay Plane groups (``processing.overlay_groups``: one merged group
6000, or one group per kept ROI labelled with its name); ``burn_in`` burns the merged mask's
outline into the pixels (for viewers that ignore overlays), with the same overlay groups. The
writing itself is :mod:`netrt.overlay`; this module only chooses what goes in.

Per-ROI groups: a data set holds at most 16 overlay groups (6000-601E). With more kept ROIs, the
first 15 get a group each and the rest are merged into group 601E, labelled with their names; the
written series carries a note saying so, which the run summary shows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from netrt.errors import DicomInputError, NetrtError
from netrt.masks import load_mask
from netrt.outputs.base import OutputContext, OutputKind, WrittenSeries
from netrt.outputs.rois import RoiBox, RoiInfo, load_roi_box
from netrt.overlay import (
    MAX_OVERLAY_GROUPS,
    PixelFormat,
    SeriesOutput,
    SeriesSettings,
    output_instance_uid,
    output_series_uid,
    pixel_data_header,
    write_axial_series,
    write_reformatted_slabs,
)
from netrt.reformat import MaskField, plane_geometry, prepare_mask, prepare_source, reformat_slabs
from netrt.settings import PLANE_NUMBER
from netrt.stamps import stamp_files
from netrt.study import LoadedStudy
from netrt.study.volume_cache import source_volume

BoolArray = npt.NDArray[np.bool_]
BURN_IN_NUMBER_OFFSET = 10


def series_settings(
    context: OutputContext, plane: str, roi_names: list[str], burn_in: bool, layer_labels: tuple[str, ...] = ()
) -> SeriesSettings:
    """SeriesDescription, SeriesNumber, overlay label and UID key of one overlay or burn-in series."""
    processing = context.processing
    description = context.describe(processing.series_description.replace("{plane}", plane))
    number = processing.series_number_base + PLANE_NUMBER[plane]
    if burn_in:
        description = f"{description} burn-in"[:64]
        number += BURN_IN_NUMBER_OFFSET
    label = "NETRT: " + ", ".join(roi_names)
    return SeriesSettings(
        description=description[:64],
        series_number=number,
        roi_label=label[:64],
        settings_key=context.settings_key(
            "overlay", processing.overlay_groups, *([processing.disclaimer] if burn_in else [])
        ),
        layer_labels=layer_labels,
        disclaimer=processing.disclaimer if burn_in else "",
    )


def overlay_layers(rois: Sequence[RoiInfo]) -> tuple[list[list[RoiInfo]], tuple[str, ...], tuple[str, ...]]:
    """The ROIs of each per-ROI overlay group, the groups' labels, and notes for the run summary.

    One ROI per group; beyond 16 kept ROIs the 16th and later share the last group (601E).
    """
    if len(rois) <= MAX_OVERLAY_GROUPS:
        groups = [[roi] for roi in rois]
        return groups, tuple(roi.name for roi in rois), ()
    groups = [[roi] for roi in rois[: MAX_OVERLAY_GROUPS - 1]] + [list(rois[MAX_OVERLAY_GROUPS - 1 :])]
    rest = groups[-1]
    labels = (*(roi.name for roi in rois[: MAX_OVERLAY_GROUPS - 1]), ", ".join(r.name for r in rest))
    note = (
        f"{len(rois)} kept ROIs but an image holds at most {MAX_OVERLAY_GROUPS} overlay groups: "
        f"{', '.join(repr(r.name) for r in rest)} share the last group (601E)"
    )
    return groups, labels, (note,)


def _group_boxes(roi_masks: Path, groups: list[list[RoiInfo]]) -> list[list[RoiBox]]:
    return [[load_roi_box(roi_masks, roi.number) for roi in group] for group in groups]


def _slice_of(boxes: list[RoiBox], k: int) -> BoolArray:
    out = boxes[0].slice_at(k)
    for box in boxes[1:]:
        out |= box.slice_at(k)
    return out


def _field_of(boxes: list[RoiBox], study: LoadedStudy) -> MaskField:
    geometry = study.images.geometry
    if len(boxes) == 1:
        return prepare_mask(boxes[0].mask, geometry, within=boxes[0].box)
    whole = boxes[0].full()
    for box in boxes[1:]:
        whole[box.box] |= box.mask
    return prepare_mask(whole, geometry)


def series_folder(work_dir: Path, plane: str, burn_in: bool) -> Path:
    """Where the overlay (or burn-in) series of ``plane`` is written under the work dir (and read
    back by :func:`written_plane_image`)."""
    return work_dir / "series" / f"{plane}{'-burn-in' if burn_in else ''}"


def write_overlay_series(context: OutputContext, plane: str, burn_in: bool) -> list[WrittenSeries]:
    """Write the overlay (or, with ``burn_in``, the burn-in) series of ``plane`` under the work dir.

    The axial series is the received images again with their pixels untouched (burn-in: outline
    burned in), one output image per received image (no invented image for a missing slice).
    Coronal and sagittal sample the whole uniform grid and are streamed
    (:func:`netrt.reformat.reformat_slabs` into :func:`netrt.overlay.write_reformatted_slabs`):
    the source is held once, as int16 where that is exact, and of the output one slab at a time.
    """
    study, processing = context.study, context.processing
    names = [roi.name for roi in context.rois]
    per_roi = processing.overlay_groups == "per_roi"
    groups, labels, notes = overlay_layers(context.rois) if per_roi else ([], (), ())
    settings = series_settings(context, plane, names, burn_in, labels)
    folder = series_folder(context.work_dir, plane, burn_in)
    output = SeriesOutput(folder, settings, burn_in)
    mask = load_mask(context.merged_mask)
    boxes = _group_boxes(context.roi_masks, groups) if per_roi else []
    if plane == "axial":
        received = list(study.images.slice_indices)
        # every grid slice received (the usual case): the mask itself, not a second mask-sized copy
        rows = mask if received == list(range(mask.shape[0])) else mask[received]
        del mask

        def layers(index: int) -> list[BoolArray]:
            return [_slice_of(group, received[index]) for group in boxes]

        slices = study.images.received_slices()
        files = write_axial_series(
            [s.path for s in slices],
            rows,
            folder,
            settings,
            burn_in,
            layers if per_roi else None,
            [s.frame_number for s in slices] if study.images.is_multiframe else (),
        )
    else:
        # Streamed: the mask is reduced to its bounding box's distance map before the source image
        # is read, the image is read once into SimpleITK, and each slab is written before the next
        # is resampled, so the output volume is never held.
        geometry = study.images.geometry
        mask_field = prepare_mask(mask, geometry)
        del mask
        fields = [_field_of(group, study) for group in boxes]
        source = prepare_source(source_volume(study.images, context.volume_cache), mask_field, geometry, fields)
        target = plane_geometry(geometry, plane, processing.reformat_spacing_mm)
        first = study.images.received_slices()[0]  # the template; a frame of a multi-frame file as classic
        (files,) = write_reformatted_slabs(
            plane, target, reformat_slabs(source, target), first.path, [output], first.frame_number
        )
    series_uid = output_series_uid(study.images.series_instance_uid, plane, settings.settings_key, burn_in)
    kind = "burn_in" if burn_in else "overlay"
    return [WrittenSeries(plane, burn_in, series_uid, folder, tuple(files), stamp_files(files), kind, notes)]


@dataclass(frozen=True)
class WrittenPlaneImage:
    """The image of a reformatted plane as the overlay series of this work dir stores it.

    Its files end with the native PixelData element (:class:`netrt.overlay.SliceWriter`), so a
    slice's stored values are the file's last ``rows * columns * bytes`` bytes, read without
    parsing the data set; the 12 bytes before them must be the PixelData header, or nothing is
    read. Other kinds of the same plane read the image here instead of resampling the source again
    (:mod:`netrt.outputs.color`; 0.5-1 s per plane of 512 x 512 x 200, ``BENCHMARKS.md`` figure 9).
    """

    files: tuple[Path, ...]
    rows: int
    columns: int
    pixel_format: PixelFormat

    @property
    def _pixel_bytes(self) -> int:
        return self.rows * self.columns * self.pixel_format.dtype.itemsize

    @property
    def _header(self) -> bytes:
        return pixel_data_header("OB" if self.pixel_format.bits_allocated == 8 else "OW", self._pixel_bytes)

    def ends_with_pixels(self, path: Path) -> bool:
        """Whether ``path`` ends with a PixelData element of this image's size (12 bytes read)."""
        try:
            with open(path, "rb") as handle:
                handle.seek(-(self._pixel_bytes + len(self._header)), os.SEEK_END)
                return handle.read(len(self._header)) == self._header
        except OSError:
            return False

    def stored(self, first: int, count: int) -> npt.NDArray[Any]:
        """Stored values (``pixel_format.dtype``, ``[slice, row, col]``) of slices ``first .. first + count - 1``
        (``pixel_format.to_modality`` gives the modality values).

        Raises:
            NetrtError: a file is gone or no longer ends with its pixels (re-run the step).
        """
        fmt = self.pixel_format
        size, header = self._pixel_bytes, self._header
        stored = np.empty((count, self.rows, self.columns), dtype=fmt.dtype)
        for offset, path in enumerate(self.files[first : first + count]):
            try:
                with open(path, "rb") as handle:
                    handle.seek(-(size + len(header)), os.SEEK_END)
                    found = handle.read(len(header))
                    read = handle.readinto(memoryview(stored[offset]).cast("B"))
            except OSError as exc:
                raise NetrtError(f"{path}: cannot read the written plane image: {exc}") from exc
            if found != header or read != size:
                raise NetrtError(f"{path}: does not end with the {size} bytes of pixels it was written with")
        return stored


def written_plane_image(context: OutputContext, plane: str) -> WrittenPlaneImage | None:
    """The image of ``plane`` (coronal or sagittal) from the overlay series this run wrote in
    ``context.work_dir``, or None when that series is not there whole (not configured, not written
    yet, a file missing or not as written): then the caller resamples the source itself.

    The series is found by its deterministic UIDs (:func:`netrt.overlay.output_series_uid` with the
    overlay kind's settings key), so only a series written for this study, grid and settings is
    read; its files are never changed after their rename.
    """
    if plane == "axial":
        return None
    study, processing = context.study, context.processing
    per_roi = processing.overlay_groups == "per_roi"
    _, labels, _ = overlay_layers(context.rois) if per_roi else ([], (), ())
    settings = series_settings(context, plane, [roi.name for roi in context.rois], False, labels)
    series_uid = output_series_uid(study.images.series_instance_uid, plane, settings.settings_key, False)
    target = plane_geometry(study.images.geometry, plane, processing.reformat_spacing_mm)
    folder = series_folder(context.work_dir, plane, False)
    files = tuple(folder / f"{output_instance_uid(series_uid, index)}.dcm" for index in range(target.shape[0]))
    if not all(path.is_file() for path in files):
        return None
    try:
        first = dcmread(files[0], stop_before_pixels=True)
        fmt = PixelFormat.of(first, files[0])
    except (InvalidDicomError, DicomInputError, OSError, EOFError, ValueError):
        return None
    _, rows, columns = target.shape
    if (int(first.get("Rows", 0)), int(first.get("Columns", 0))) != (rows, columns):
        return None
    image = WrittenPlaneImage(files, rows, columns, fmt)
    return image if all(image.ends_with_pixels(path) for path in files) else None


def _write_overlay(context: OutputContext, plane: str) -> list[WrittenSeries]:
    return write_overlay_series(context, plane, burn_in=False)


KIND = OutputKind(
    name="overlay",
    per_plane=True,
    write=_write_overlay,
    series_number_offset=0,
    description="the image series with the mask in Overlay Plane groups (60xx)",
)
