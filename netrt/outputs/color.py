"""The ``color`` output kind: an RGB Secondary Capture series per plane, every ROI in its own colour.

Why this kind exists: overlay groups (60xx) are drawn by few viewers and never in colour, DICOM SEG
by a few more; an RGB image is drawn by every viewer and PACS. So the picture a physicist needs
(the image in its own window, each kept ROI's outline in its RTSTRUCT colour, a legend saying which
colour is which ROI, and a "research only" disclaimer) is burned into the pixels.

Choices, and why:

* **SOP class: single-frame Secondary Capture Image Storage, one instance per slice.** It is the
  oldest and most widely supported image storage class (every PACS and viewer stores and shows it;
  Multi-frame True Color SC is refused or shown frame-less by older PACS and some web viewers), and
  one file per slice is what viewers stack and scroll like the planning CT. Pixels are RGB, 8 bits,
  uncompressed (Explicit VR Little Endian): no lossy step between the drawing and the reader.
* **Geometry kept.** The SC IOD has no Image Plane or Frame of Reference module, but viewers read
  ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness and
  FrameOfReferenceUID wherever they find them (dciodvfy lists them as standard extended attributes,
  a warning, not an error), which lets a viewer sort the slices, show reference lines and sync
  this series with the planning CT. The values are those of the overlay series of the same plane:
  the received slice's own strings for axial, the reformat grid
  (:func:`netrt.reformat.plane_geometry`) for coronal and sagittal. PatientOrientation (what the SC
  IOD does carry) is derived from the same directions.
* **Modality OT, ConversionType WSD, BurnedInAnnotation YES**: the pixels are no longer CT (or MR)
  values but a picture made on a workstation, with text burned in. Patient and study modules are
  copied from the source file (highdicom's ``copy_patient_and_study_information``), which is the
  anonymized copy when anonymization is on, so nothing identifying comes back in.
* **Deterministic UIDs** as for the overlay series (:mod:`netrt.overlay`): the series UID is
  derived from the source series, ``"color-<plane>"`` and the settings key, instances by slice
  index, so a re-run overwrites instead of duplicating. Files are written under a temporary name
  and renamed.
* **Window**: the source's own first WindowCenter/WindowWidth (what the modality chose for it),
  applied with the linear VOI function of PS3.3 C.11.2.1.2.1; without one, CT gets soft tissue
  (40/400 HU) and other modalities the 1st-99th percentile of the volume (MR has no absolute scale).
  One window for the whole series, from its first slice, so slices look alike while scrolling.
* **Reformats show what the overlay series shows.** The coronal/sagittal image is the one the
  overlay series of that plane stores: read from its files when this run wrote them (the flow
  writes overlay series first; :func:`netrt.outputs.overlay.written_plane_image`), which saves
  resampling the source a second time, else resampled here the same way and rounded to the
  source's stored precision as that series rounds it. Both ways give the same pixels (tested), so
  a colour series' UIDs always stand for the same pixels whatever else was configured. Each ROI's
  mask goes through the same signed-distance path as the overlays
  (:func:`netrt.reformat.prepare_mask`), one per ROI, streamed slab by slab beside the image
  slabs: neither the reformatted volume nor any whole-grid ROI mask beyond the one being prepared
  is held.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from netrt import __version__
from netrt.burnin import first_value, outline
from netrt.errors import DicomInputError, NetrtError, RoiError
from netrt.geometry import ImageGeometry
from netrt.outputs.base import OutputContext, OutputKind, WrittenSeries
from netrt.outputs.overlay import WrittenPlaneImage, written_plane_image
from netrt.outputs.rois import RoiBox, RoiInfo, load_roi_box
from netrt.outputs.text import Annotation, composite, render_annotation
from netrt.overlay import PixelFormat, SliceWriter, output_instance_uid
from netrt.reformat import (
    PLANES,
    MaskField,
    mask_slabs,
    plane_geometry,
    prepare_mask,
    prepare_source,
    reformat_slabs,
    slab_bounds,
    slices_holding,
)
from netrt.settings import PLANE_NUMBER
from netrt.stamps import stamp_files
from netrt.study import LoadedStudy
from netrt.study.classic import SourceHeaders
from netrt.study.volume_cache import source_volume
from netrt.uids import derived_uid

if TYPE_CHECKING:  # highdicom (and the pydicom code dictionaries it loads) is imported where used:
    # it costs seconds at import, and a flow run without colour series never needs it
    from highdicom.sc import SCImage

_sitk: Any = sitk

BoolArray = npt.NDArray[np.bool_]
UInt8Array = npt.NDArray[np.uint8]

DEFAULT_DISCLAIMER = "FOR RESEARCH USE ONLY - NOT FOR CLINICAL USE"

#: Soft-tissue window (HU) for CT without a WindowCenter/WindowWidth of its own.
CT_DEFAULT_WINDOW = (40.0, 400.0)
#: Percentiles of the volume spanning the window of other modalities without one.
DEFAULT_PERCENTILES = (1.0, 99.0)
#: Voxels the percentiles are computed from at most (an even subsample of a larger volume): the
#: window only needs two robust quantiles, not a sort of 50 M voxels.
PERCENTILE_SAMPLES = 1 << 22

MANUFACTURER = "NETRT"

#: LO (Long String) holds at most 64 characters.
_LO_MAX = 64


@dataclass(frozen=True)
class ColorSettings:
    """What one colour series looks like.

    ``settings_key``: the hash of every setting that changes the output (as for the overlay series,
    :func:`netrt.pipeline.settings_key`); it feeds the UIDs, so it must change when ``disclaimer``,
    ``fill_opacity`` or ``reformat_spacing_mm`` change. ``series_description`` may hold ``{plane}``.
    ``disclaimer``: burned along the bottom edge; empty turns it off. ``fill_opacity`` (0-1): the
    ROI's colour blended over its inside at this weight; 0 draws the outline only.
    ``reformat_spacing_mm``: the coronal/sagittal grid spacing (None: the finest source spacing),
    as ``processing.reformat_spacing_mm`` for the overlay series.
    """

    settings_key: str
    series_number: int
    series_description: str = "NETRT {plane} colour"
    disclaimer: str = DEFAULT_DISCLAIMER
    fill_opacity: float = 0.0
    reformat_spacing_mm: float | None = None

    def __post_init__(self) -> None:
        opacity = float(self.fill_opacity)
        if not math.isfinite(opacity) or not 0.0 <= opacity <= 1.0:
            raise NetrtError(f"colour fill opacity must be between 0 and 1, got {self.fill_opacity!r}")
        if isinstance(self.series_number, bool) or int(self.series_number) != self.series_number:
            raise NetrtError(f"colour series number must be an integer, got {self.series_number!r}")


def color_series_uid(source_series_uid: str, plane: str, settings_key: str) -> str:
    """SeriesInstanceUID of the colour series of ``plane`` (deterministic; never an overlay series' UID)."""
    _check_plane(plane)
    return derived_uid(source_series_uid, f"color-{plane}", settings_key)


def _check_plane(plane: str) -> None:
    if plane not in PLANES:
        raise NetrtError(f"unknown plane {plane!r}; expected one of {', '.join(PLANES)}")


# --- window -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """A linear VOI window in modality units, and where it came from (for the derivation text)."""

    center: float
    width: float
    origin: str


def series_window(source: Dataset, modality: str, volume: npt.NDArray[Any]) -> Window:
    """The window of a colour series: the source's own, else the modality default (module docstring).

    ``source`` is the series' first file (its header), ``volume`` the image in modality units
    (only read when a percentile window is needed).
    """
    center = first_value(source.get("WindowCenter"))
    width = first_value(source.get("WindowWidth"))
    if center is not None and width is not None and math.isfinite(center) and math.isfinite(width) and width >= 1:
        return Window(center, width, "the source's WindowCenter/WindowWidth")
    if modality.upper() == "CT":
        return Window(*CT_DEFAULT_WINDOW, "CT soft-tissue default")
    flat = volume.reshape(-1)
    sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLES)]
    low, high = (float(v) for v in np.percentile(sample, DEFAULT_PERCENTILES))
    return Window((low + high) / 2.0, max(high - low, 1.0), "1st-99th percentile of the volume")


def window_to_grey(values: npt.ArrayLike, window: Window, invert: bool = False) -> UInt8Array:
    """Grey levels 0-255 of ``values`` through the linear VOI LUT of PS3.3 C.11.2.1.2.1.

    ``invert`` for MONOCHROME1 sources (high values shown dark). Returns a new array.
    """
    x = np.asarray(values)
    if x.dtype.kind not in "iuf":
        x = x.astype(np.float32)
    # every value is taken to float32 on the way in (as by np.asarray(values, float32)), without a
    # converted copy of the slice when it is stored integers
    c, w = np.float32(window.center - 0.5), np.float32(window.width - 1.0)
    if w <= 0:
        grey = np.where(x.astype(np.float32) > c, np.float32(255.0), np.float32(0.0))
    else:
        # the formula's operations in its order, on one working array (a slice per call: the
        # temporaries of the plain expression cost more than the arithmetic)
        grey = np.subtract(x, c, dtype=np.float32)
        grey /= w
        grey += np.float32(0.5)
        grey *= np.float32(255.0)
        np.clip(grey, 0.0, 255.0, out=grey)
    levels: UInt8Array = np.rint(grey, out=grey).astype(np.uint8)
    return np.subtract(255, levels, dtype=np.uint8) if invert else levels


# --- drawing ------------------------------------------------------------------------------


def _crop(mask: BoolArray) -> tuple[int, int, BoolArray] | None:
    """``(row0, col0, mask[rows, cols])`` around the True pixels with one pixel of margin (None: empty).

    One pixel of background margin (or the image edge, which :func:`netrt.burnin.outline` treats as
    background too) gives the crop the same outline as the whole slice, at a fraction of the cost.
    """
    if not mask.any():  # most ROIs miss most slices: a flat test is 4x cheaper than the row test
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))  # only the rows that hold the ROI
    r0, c0 = max(int(rows[0]) - 1, 0), max(int(cols[0]) - 1, 0)
    r1, c1 = min(int(rows[-1]) + 2, mask.shape[0]), min(int(cols[-1]) + 2, mask.shape[1])
    return r0, c0, mask[r0:r1, c0:c1]


def draw_slice(
    grey: UInt8Array,
    rois: Sequence[tuple[tuple[int, int, int], BoolArray]],
    fill_opacity: float,
    annotation: Annotation,
) -> UInt8Array:
    """One colour image: ``grey`` ``[row, col]`` as RGB, each ROI (colour, mask slice) drawn, text on top.

    Fills go first (``round((1 - a) * pixel + a * colour)`` inside each mask), then every ROI's
    one-pixel outline (:func:`netrt.burnin.outline`) in its pure colour, so no fill tints an
    outline (where two outlines meet, the later ROI's colour wins), then the legend and disclaimer.
    Returns a new ``[row, col, 3]`` uint8 array; the inputs are not changed.
    """
    rgb = np.stack((grey, grey, grey), axis=-1)  # 4x faster than broadcasting into [..., 3]
    crops = [(np.asarray(color, dtype=np.float32), _crop(mask)) for color, mask in rois]
    if fill_opacity > 0:
        for color, cropped in crops:
            if cropped is None:
                continue
            r0, c0, inside = cropped
            region = rgb[r0 : r0 + inside.shape[0], c0 : c0 + inside.shape[1]]
            blended = (1.0 - fill_opacity) * region[inside].astype(np.float32) + fill_opacity * color
            region[inside] = np.rint(blended).astype(np.uint8)
    for color, cropped in crops:
        if cropped is None:
            continue
        r0, c0, inside = cropped
        region = rgb[r0 : r0 + inside.shape[0], c0 : c0 + inside.shape[1]]
        region[outline(inside)] = color.astype(np.uint8)
    return composite(rgb, annotation, in_place=True)


# --- DICOM --------------------------------------------------------------------------------


def _ds_strings(values: Sequence[float] | npt.NDArray[np.float64]) -> list[str]:
    """DS strings exactly as :mod:`netrt.overlay` writes reformatted geometry (16 characters, no dust)."""
    return [format_number_as_ds(0.0 if abs(float(v)) < 1e-12 else float(v)) for v in values]


def _orientation_letters(direction: npt.NDArray[np.float64]) -> str:
    """PatientOrientation letters of a direction (PS3.3 C.7.6.1.1.1): LPS axes by decreasing weight."""
    letters = []
    for axis in np.argsort(-np.abs(direction), kind="stable"):
        component = float(direction[axis])
        if abs(component) > 1e-4:
            letters.append(("L", "P", "H")[axis] if component > 0 else ("R", "A", "F")[axis])
    return "".join(letters)


def _lo(text: str) -> str:
    clean = "".join(" " if ord(c) < 32 else c for c in text).replace("\\", "/").strip()
    return clean if len(clean) <= _LO_MAX else clean[: _LO_MAX - 3].rstrip() + "..."


def _template(
    source: Dataset,
    source_path: Path,
    plane: str,
    geometry: ImageGeometry,
    settings: ColorSettings,
    series_uid: str,
    window: Window,
    roi_names: Sequence[str],
) -> SCImage:
    """The SC data set every slice of the series starts from (pixels and per-slice values set later)."""
    if not source.get("FrameOfReferenceUID"):
        raise DicomInputError("FrameOfReferenceUID is missing or empty", path=source_path, tag="FrameOfReferenceUID")
    _, rows, columns = geometry.shape
    row_letters = _orientation_letters(geometry.row_direction)
    column_letters = _orientation_letters(geometry.column_direction)
    from highdicom.sc import SCImage

    sc = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.zeros((rows, columns, 3), dtype=np.uint8),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=int(settings.series_number),
        sop_instance_uid=output_instance_uid(series_uid, 0),
        instance_number=1,
        manufacturer=MANUFACTURER,
        # highdicom accepts one letter per axis; the full oblique letters are set just below
        patient_orientation=(row_letters[0], column_letters[0]),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=_lo(settings.series_description.replace("{plane}", plane)),
        software_versions=f"netrt {__version__}",
    )
    sc.copy_patient_and_study_information(source)  # every Patient/Study module attribute, not just the IDs
    sc.PatientOrientation = [row_letters, column_letters]
    sc.ConversionType = "WSD"
    sc.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if plane == "axial" else "REFORMATTED"]
    sc.BurnedInAnnotation = "YES"
    sc.FrameOfReferenceUID = source.FrameOfReferenceUID
    for keyword in ("PositionReferenceIndicator", "BodyPartExamined", "Laterality"):
        if keyword in source:
            setattr(sc, keyword, source[keyword].value)
    if "Laterality" not in sc and not sc.get("BodyPartExamined"):
        # Type 2C, required unless the body part is known to be unpaired; NETRT does not know the body
        # part, and PS3.3 allows an empty value exactly when laterality is unknown (dciodvfy: no error).
        sc.Laterality = ""
    if plane != "axial":
        sc.ImageOrientationPatient = _ds_strings([*geometry.row_direction, *geometry.column_direction])
        spacing: list[Any] = _ds_strings([geometry.spacing[1], geometry.spacing[0]])
        sc.PixelSpacing = spacing
        sc.SliceThickness = _ds_strings([geometry.spacing[2]])[0]
    what = "source slices" if plane == "axial" else f"{plane} reformat (linear, as the overlay series)"
    sc.DerivationDescription = (
        f"NETRT colour series of {source.SeriesInstanceUID}: {what}, window {window.center:g}/{window.width:g} "
        f"({window.origin}); ROI outlines in their display colours: {', '.join(roi_names) or 'none'}"
    )[:1024]
    return sc


#: The elements that differ between the slices of a colour series: SOPInstanceUID, InstanceNumber,
#: ImagePositionPatient, PixelData; on axial also SourceImageSequence and the received slice's own
#: orientation, spacing and thickness. Everything else is encoded once per series
#: (:class:`netrt.overlay.SliceWriter`), which made writing 3x faster than ``dcmwrite`` per slice.
_SLICE_TAGS = (0x00080018, 0x00200013, 0x00200032, 0x7FE00010)
_AXIAL_SLICE_TAGS = (*_SLICE_TAGS, 0x00082112, 0x00200037, 0x00280030, 0x00180050)


class _LazyWriter:
    """A :class:`SliceWriter` made at the first write, once the first slice's elements are set
    (an axial source may lack an optional geometry element: then it is not a slice element)."""

    def __init__(self, sc: SCImage, plane: str, out_dir: Path) -> None:
        self._sc, self._out_dir = sc, out_dir
        self._tags = _AXIAL_SLICE_TAGS if plane == "axial" else _SLICE_TAGS
        self._writer: SliceWriter | None = None

    def write(self) -> Path:
        if self._writer is None:
            self._writer = SliceWriter(self._sc, [tag for tag in self._tags if tag in self._sc])
        return self._writer.write(self._out_dir)


def _set_slice(sc: SCImage, series_uid: str, index: int, rgb: UInt8Array) -> None:
    uid = output_instance_uid(series_uid, index)
    sc.SOPInstanceUID = uid
    sc.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    sc.InstanceNumber = index + 1
    sc.PixelData = np.ascontiguousarray(rgb).tobytes()


class _OrderedWriter:
    """Encodes and writes the slices of a series in a thread of its own, one after the other in the
    order given, while the caller draws the next ones (drawing is numpy and writing is mostly system
    calls, both without the GIL: the two overlap on a second core). At most ``depth`` drawn slices
    wait; an error of the writing thread is raised in the caller at its next ``put`` or at
    ``finish``. The data set ``sc`` is only touched by the writing thread once the first slice is put.
    """

    def __init__(self, sc: SCImage, series_uid: str, writer: _LazyWriter, depth: int = 4) -> None:
        self._sc, self._series_uid, self._writer, self._depth = sc, series_uid, writer, depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netrt-colour-write")
        self._pending: deque[Future[Path]] = deque()
        self.written: list[Path] = []

    def __enter__(self) -> _OrderedWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)

    def put(self, index: int, rgb: UInt8Array, elements: dict[str, Any]) -> None:
        """Write slice ``index`` with these pixels, after setting ``elements`` (keyword -> value)."""
        if len(self._pending) >= self._depth:
            self.written.append(self._pending.popleft().result())
        self._pending.append(self._pool.submit(self._write, index, rgb, elements))

    def finish(self) -> list[Path]:
        """Every slice written; the files in the order put."""
        while self._pending:
            self.written.append(self._pending.popleft().result())
        return self.written

    def _write(self, index: int, rgb: UInt8Array, elements: dict[str, Any]) -> Path:
        for keyword, value in elements.items():
            setattr(self._sc, keyword, value)
        _set_slice(self._sc, self._series_uid, index, rgb)
        return self._writer.write()


# --- the series ---------------------------------------------------------------------------


def _roi_box(path: Path, roi: RoiInfo, shape: tuple[int, int, int]) -> RoiBox:
    """The ROI's mask, cut to its bounding box, from the per-ROI mask file; named errors otherwise."""
    try:
        box = load_roi_box(path, roi.number)
    except KeyError as exc:
        raise RoiError(roi.name, f"ROI number {roi.number} has no mask in {path}") from exc
    if box.shape != shape:
        raise RoiError(roi.name, f"mask of grid shape {box.shape} in {path} is not on the image grid {shape}")
    return box


def write_color_series(
    study: LoadedStudy,
    rois: Sequence[RoiInfo],
    roi_masks: Path,
    plane: str,
    out_dir: Path,
    settings: ColorSettings,
    *,
    volume_cache: Path | None = None,
    plane_image: WrittenPlaneImage | None = None,
) -> list[Path]:
    """Write the colour series of ``plane`` for ``study`` into ``out_dir``; the files in slice order.

    ``volume_cache``: the folder where the decoded source volume is shared with the other writers of
    the run (:func:`netrt.study.volume_cache.source_volume`); None decodes it here.
    ``plane_image``: coronal/sagittal, the plane's image as its overlay series stores it
    (:func:`netrt.outputs.overlay.written_plane_image`), read instead of resampling the source.
    Either way the image is windowed at the source's stored precision (resampled, stored as the
    overlay series stores it, back to modality values), so the pixels do not depend on whether an
    overlay series was there to read: the same UIDs always carry the same pixels.

    ``rois`` are the ROIs to draw, in legend order (drawing order too: a later ROI's outline wins
    where two meet); ``roi_masks`` the file of :func:`netrt.outputs.rois.save_roi_masks` /
    ``build_roi_masks`` holding each one's mask on ``study.images.geometry``. No ROI gives the
    windowed image with the disclaimer only. Axial: one image per received slice, like the axial
    overlay series. Coronal/sagittal: one image per slice of
    :func:`netrt.reformat.plane_geometry` ``(geometry, plane, settings.reformat_spacing_mm)``,
    streamed (see the module docstring).

    Raises:
        NetrtError: unknown plane.
        RoiError: an ROI has no mask in ``roi_masks`` or one on another grid.
        DicomInputError: a source file is unreadable or lacks FrameOfReferenceUID.
    """
    _check_plane(plane)
    series = study.images
    geometry = series.geometry
    target = plane_geometry(geometry, plane, settings.reformat_spacing_mm)  # a bad spacing fails before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    headers = SourceHeaders(series)  # a frame of a multi-frame source as a classic single-frame image
    source = headers.header(0)
    series_uid = color_series_uid(series.series_instance_uid, plane, settings.settings_key)
    invert = str(source.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"

    volume = source_volume(series, volume_cache)
    window = series_window(source, series.modality, volume)
    sc = _template(source, headers.slices[0].path, plane, target, settings, series_uid, window, [r.name for r in rois])
    _, rows, columns = target.shape
    annotation = render_annotation(rows, columns, [(r.name, r.color) for r in rois], settings.disclaimer)
    opacity = float(settings.fill_opacity)

    with _OrderedWriter(sc, series_uid, _LazyWriter(sc, plane, out_dir)) as output:
        if plane == "axial":
            boxes = [_roi_box(roi_masks, roi, geometry.shape) for roi in rois]  # boxes only: ROIs are small
            for index, k in enumerate(series.slice_indices):
                header = source if index == 0 else headers.header(index)
                elements = {
                    keyword: header[keyword].value
                    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness")
                    if keyword in header
                }
                elements["SourceImageSequence"] = DicomSequence([headers.reference(index)])
                drawn = draw_slice(
                    window_to_grey(volume[k], window, invert),
                    [(r.color, b.slice_at(k)) for r, b in zip(rois, boxes, strict=True)],
                    opacity,
                    annotation,
                )
                output.put(index, drawn, elements)
            return output.finish()

        # each ROI prepared from its box (no whole-grid mask), resampled beside the image as a layer
        fields = []
        for roi in rois:
            box = _roi_box(roi_masks, roi, geometry.shape)
            fields.append(prepare_mask(box.mask, geometry, within=box.box))
        step = target.spacing[2] * target.normal

        def draw(
            first: int,
            image: npt.NDArray[Any],
            layers: Sequence[BoolArray],
            grey: Callable[[npt.NDArray[Any]], UInt8Array],
        ) -> None:
            # which slices of the slab each ROI touches, in one pass per layer (most touch few of them)
            touched = [slices_holding(layer) for layer in layers]
            for offset in range(image.shape[0]):
                index = first + offset
                drawn = draw_slice(
                    grey(image[offset]),
                    [
                        (roi.color, layer[offset])
                        for roi, layer, hit in zip(rois, layers, touched, strict=True)
                        if hit[offset]
                    ],
                    opacity,
                    annotation,
                )
                output.put(index, drawn, {"ImagePositionPatient": _ds_strings(target.origin + index * step)})

        if plane_image is not None:  # the plane as its overlay series stores it: no second resampling
            grey = _stored_to_grey(plane_image.pixel_format, window, invert)
            layers = [mask_slabs(field, target) for field in fields]
            for first, count in slab_bounds(target):
                draw(first, plane_image.stored(first, count), [next(layer) for layer in layers], grey)
            return output.finish()
        stored_format = _stored_format(source, headers.slices[0].path)
        if stored_format is None:
            for slab in reformat_slabs(prepare_source(volume, MaskField("empty"), geometry, fields), target):
                draw(slab.first, slab.image, slab.layers, lambda values: window_to_grey(values, window, invert))
            return output.finish()
        grey = _stored_to_grey(stored_format, window, invert)
        for slab in reformat_slabs(prepare_source(volume, MaskField("empty"), geometry, fields), target):
            draw(slab.first, stored_format.to_stored(slab.image), slab.layers, grey)
        return output.finish()


def _stored_to_grey(fmt: PixelFormat, window: Window, invert: bool) -> Callable[[npt.NDArray[Any]], UInt8Array]:
    """Grey levels of stored values: the window applied to ``fmt.to_modality(stored)``, with the
    rescale folded into the window (one pass over the slice instead of three), so that the file
    path and the resampling path, which both hold stored values, give the same grey levels.

    ``((s * slope + intercept) - (c - 0.5)) / (w - 1)`` equals ``(s - (c' - 0.5)) / (w' - 1)`` with
    ``c' = (c - 0.5 - intercept) / slope + 0.5`` and ``w' = (w - 1) / slope + 1``. A negative slope
    (allowed, never seen) takes the plain route.
    """
    if fmt.slope <= 0:
        return lambda stored: window_to_grey(fmt.to_modality(stored), window, invert)
    folded = Window(
        (window.center - 0.5 - fmt.intercept) / fmt.slope + 0.5, (window.width - 1.0) / fmt.slope + 1.0, window.origin
    )
    return lambda stored: window_to_grey(stored, folded, invert)


def _stored_format(source: Dataset, path: Path) -> PixelFormat | None:
    """The source's stored pixel format, which a reformatted overlay series is written in; None
    when no overlay series can be (colour, a Modality LUT: the resampled values are used as they are)."""
    try:
        return PixelFormat.of(source, path)
    except DicomInputError:
        return None


#: SeriesNumber of the colour series: processing.series_number_base plus this plus 1, 2, 3 (plane).
SERIES_NUMBER_OFFSET = 20


def _write_kind(context: OutputContext, plane: str) -> list[WrittenSeries]:
    processing = context.processing
    key = context.settings_key("color", processing.disclaimer, processing.color_fill_opacity)
    settings = ColorSettings(
        settings_key=key,
        series_number=processing.series_number_base + SERIES_NUMBER_OFFSET + PLANE_NUMBER[plane],
        series_description=f"{context.describe(processing.series_description.replace('{plane}', plane))} colour"[:64],
        disclaimer=processing.disclaimer,
        fill_opacity=processing.color_fill_opacity,
        reformat_spacing_mm=processing.reformat_spacing_mm,
    )
    folder = context.work_dir / "series" / f"color-{plane}"
    files = write_color_series(
        context.study,
        context.rois,
        context.roi_masks,
        plane,
        folder,
        settings,
        volume_cache=context.volume_cache,
        plane_image=written_plane_image(context, plane),
    )
    series_uid = color_series_uid(context.study.images.series_instance_uid, plane, key)
    return [WrittenSeries(plane, False, series_uid, folder, tuple(files), stamp_files(files), "color")]


KIND = OutputKind(
    name="color",
    per_plane=True,
    write=_write_kind,
    series_number_offset=SERIES_NUMBER_OFFSET,
    description="RGB Secondary Capture per plane: each ROI outlined in its colour, legend, disclaimer",
)
