"""The ``seg`` output kind: one DICOM Segmentation (SEG) per study, one segment per kept ROI.

Overlay groups (60xx) are invisible in OHIF's MPR views, 3D Slicer and many PACS, and carry no
colour or name per ROI. A DICOM SEG does: each kept ROI becomes one segment with its name, its
RTSTRUCT colour and a coded meaning, on the axial source series, so those viewers show every
structure apart. highdicom writes the IOD (functional groups, dimension index, bit packing,
references); this module only decides what goes into it.

Decisions, and why:

* **What the SEG references.** The received (anonymized, when configured) axial source images
  (for an enhanced multi-frame source, its frames: one SEG frame per source frame with content,
  each naming ReferencedSOPInstanceUID + ReferencedFrameNumber; highdicom takes exactly one
  multi-frame source image, so a series split over several multi-frame files gets no SEG, with
  the reason) and nothing else: only slices that were received exist on the receiving side, so a missing grid
  slice is never referenced. Each frame's DerivationImageSequence names its own source image;
  SourceImageSequence and ReferencedSeriesSequence list every received image. Only headers are
  read (``stop_before_pixels``): highdicom needs the geometry and identity, not the pixels.
* **Frames.** BINARY, empty frames omitted. Only the run of received slices between the first and
  last slice any kept ROI touches is handed to highdicom as frames (the other images are still
  referenced, see **Speed**), because highdicom holds the stacked segments (one byte per voxel and
  segment) plus a uint64 overlap count per voxel: cropping to the structures keeps that to the
  slices that carry frames at all. Measured on the 512x512x200 phantom (``netrt phantom
  --extra-spheres 5``; ``write_seg`` alone, first call in a process with highdicom already
  imported, medians of 3 runs on a 2-core machine): the 9 ROIs kept by default span 40 slices,
  0.56 s and 165 MiB above the process's RSS before the call; with the body outline and skull kept
  too (11 ROIs over all 200 slices) 2.0 s and 615 MiB: 8 bytes per voxel of that run of slices
  (highdicom's uint64 count of segments per voxel) plus the pages of each segment's volume its ROI
  touches (``np.zeros`` maps pages when they are first written). A kept whole-body ROI therefore
  makes the SEG the largest holder of memory in a run; going below that needs highdicom to take
  the segments in pieces (it takes one array), which is left open against issue 17's 1000-slice
  memory target.
* **Speed.** Three things, none changing the dataset (tests/test_seg.py compares it with the plain
  call's, apart from the creation times): (1) the segments are built as one contiguous uint8
  volume each and handed over as a view with the segments last (highdicom's layout), so each
  frame highdicom cuts out is contiguous and already uint8 (no gather, no cast) and its overlap
  count adds whole planes; (2) the images outside the run are not passed as
  ``further_source_images``, which highdicom checks one by one (SOP class against its IOD tables,
  about 3.6 ms each, and a spatial match of each against the frames), but as ``source_images``
  too, with the frames' positions given as ``plane_positions`` (the run's own, which highdicom
  would copy): the same references in the same order and each frame derived from its own image,
  matched in one pass. highdicom wants source images with one series, matrix and frame of
  reference and the very same ImageOrientationPatient (NETRT accepts 1e-4 of difference), so
  headers that differ get the plain call; (3) Python's cyclic garbage collector is paused while the
  headers are read and highdicom builds the dataset: the process holds some 150,000 tracked
  objects before the call (60,000 of them pydicom's code dictionaries), the headers and the SEG's
  small datasets add many more, and they triggered one or two full collections per call, each
  walking all of them (about 0.1 s); the collector is restored afterwards, so any cycles made
  meanwhile are collected then. Before these (same measure): 1.04 s and 195 MiB for the 9 ROIs,
  5.0 s and 1065 MiB for the 11.
* **Algorithm type MANUAL.** The contours were drawn by a person or a treatment-planning system;
  NETRT only rasterised them (pixel-centre rule, :mod:`netrt.rasterize`). The RTSTRUCT's
  Manufacturer and StructureSetLabel go into ContentDescription (LO: cut to 64 characters), so a
  viewer shows where the segments came from.
* **Colours.** RecommendedDisplayCIELabValue from the ROI's RGB colour
  (:class:`~netrt.outputs.rois.RoiInfo`: ROIDisplayColor, else the fixed palette), converted by
  highdicom's ``CIELabColor.from_rgb``.
* **Deterministic identity.** SeriesInstanceUID, SOPInstanceUID and the DimensionOrganizationUID
  (highdicom would draw a random one) are derived from the source series UID, the plane name
  ``seg`` and the settings key; ContentDate/ContentTime are the structure set's date and time (the
  contours are the content). The same study with the same settings therefore gives the same
  instance, which overwrites the earlier one at a PACS instead of duplicating it; only
  InstanceCreationDate/Time and the ContributionDateTime of highdicom's own entry in
  ContributingEquipmentSequence say when this copy was made.

Segment codes (SegmentedPropertyCategoryCodeSequence / SegmentedPropertyTypeCodeSequence) come
from RTROIInterpretedType through pydicom's SNOMED CT dictionary (``pydicom.sr.codedict.codes.SCT``;
categories from DICOM CID 7150 "Segmentation Property Categories"):

=============================================  ===================================  =================================
RTROIInterpretedType                           category (SCT)                       type (SCT)
=============================================  ===================================  =================================
ORGAN, OAR (alias)                             91723000 Anatomical Structure        91772007 Organ
EXTERNAL                                       91723000 Anatomical Structure        38266002 Entire body
CAVITY                                         91723000 Anatomical Structure        91806002 Body cavity
GTV                                            49755003 Morphologically Abnormal    228791009 Gross tumor volume
                                               Structure
CTV                                            309825002 Spatial and Relational     228792002 Clinical target volume
                                               Concept
PTV                                            309825002 Spatial and Relational     228793007 Planning target volume
                                               Concept
TREATED_VOLUME, IRRAD_VOLUME                   309825002 Spatial and Relational     228790005 Irradiated Volume
                                               Concept
AVOIDANCE, DOSE_REGION, DOSE_MEASUREMENT,      309825002 Spatial and Relational     118565006 Volume
CONTROL, REGISTRATION, ISOCENTER               Concept
BOLUS                                          260787004 Physical object            228736002 Surface Bolus
MARKER                                         260787004 Physical object            262301009 Opaque Marker
BRACHY_CHANNEL, BRACHY_ACCESSORY,              260787004 Physical object            228748004 Brachytherapy Device
BRACHY_SRC_APP, BRACHY_CHNL_SHLD
SUPPORT, FIXATION                              260787004 Physical object            260787004 Physical object
CONTRAST_AGENT                                 105590001 Substance                  7140000 Contrast agent
empty, or any other value (generic code)       85756007 Tissue                      85756007 Tissue
=============================================  ===================================  =================================

GTV is the visible tumour (a morphologically abnormal structure); CTV and PTV are margins drawn
around it, i.e. spatial concepts. The generic code for an unknown or empty type is Tissue/Tissue:
a contour on a CT or MR almost always outlines tissue, and the code claims nothing more.

highdicom (and pydicom's code dictionary it loads) is imported inside :func:`write_seg`: it costs
about 0.6 s (0.4 s of it pydicom's code dictionaries, which highdicom imports whatever is used),
which every flow-run process would otherwise pay even when ``seg`` is not configured. Importing
only ``highdicom.seg`` costs the same: the package's ``__init__`` imports every subpackage.
"""

from __future__ import annotations

import datetime
import gc
import threading
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from netrt import __version__
from netrt.errors import DicomInputError, NetrtError, RoiError
from netrt.fileio import atomic_output, fsync_dir
from netrt.outputs.base import OutputContext, OutputKind, WrittenSeries
from netrt.outputs.rois import RoiBox, RoiInfo, load_roi_box
from netrt.stamps import stamp_files
from netrt.study import LoadedStudy
from netrt.uids import checked_uid, derived_uid

BoolArray = npt.NDArray[np.bool_]
U8Array = npt.NDArray[np.uint8]

#: The name standing in for a plane in the derived UIDs (overlay series use axial/coronal/sagittal).
SEG_PLANE = "seg"
#: SeriesNumber when the caller gives none: beside the overlay series (9000 + 1..3, burn-in + 10).
DEFAULT_SERIES_NUMBER = 9020
DEFAULT_SERIES_DESCRIPTION = "NETRT segmentation"
MANUFACTURER = "NETRT"
#: Enhanced General Equipment makes DeviceSerialNumber type 1; software has no serial number, so
#: the product name stands in (a host name would leak where NETRT runs and break determinism).
DEVICE_SERIAL_NUMBER = "NETRT"
#: ContentLabel (CS, 16 characters, upper case).
CONTENT_LABEL = "RTSTRUCT"
#: LO (Long String) holds at most 64 characters.
LO_MAX = 64

#: RTROIInterpretedType -> (SCT keyword of the category, SCT keyword of the type) in
#: ``pydicom.sr.codedict.codes.SCT``; see the table in the module docstring.
TYPE_CODES: dict[str, tuple[str, str]] = {
    "ORGAN": ("AnatomicalStructure", "Organ"),
    "OAR": ("AnatomicalStructure", "Organ"),
    "EXTERNAL": ("AnatomicalStructure", "EntireBody"),
    "CAVITY": ("AnatomicalStructure", "BodyCavity"),
    "GTV": ("MorphologicallyAbnormalStructure", "GrossTumorVolume"),
    "CTV": ("SpatialAndRelationalConcept", "ClinicalTargetVolume"),
    "PTV": ("SpatialAndRelationalConcept", "PlanningTargetVolume"),
    "TREATED_VOLUME": ("SpatialAndRelationalConcept", "IrradiatedVolume"),
    "IRRAD_VOLUME": ("SpatialAndRelationalConcept", "IrradiatedVolume"),
    "AVOIDANCE": ("SpatialAndRelationalConcept", "Volume"),
    "DOSE_REGION": ("SpatialAndRelationalConcept", "Volume"),
    "DOSE_MEASUREMENT": ("SpatialAndRelationalConcept", "Volume"),
    "CONTROL": ("SpatialAndRelationalConcept", "Volume"),
    "REGISTRATION": ("SpatialAndRelationalConcept", "Volume"),
    "ISOCENTER": ("SpatialAndRelationalConcept", "Volume"),
    "BOLUS": ("PhysicalObject", "SurfaceBolus"),
    "MARKER": ("PhysicalObject", "OpaqueMarker"),
    "BRACHY_CHANNEL": ("PhysicalObject", "BrachytherapyDevice"),
    "BRACHY_ACCESSORY": ("PhysicalObject", "BrachytherapyDevice"),
    "BRACHY_SRC_APP": ("PhysicalObject", "BrachytherapyDevice"),
    "BRACHY_CHNL_SHLD": ("PhysicalObject", "BrachytherapyDevice"),
    "SUPPORT": ("PhysicalObject", "PhysicalObject"),
    "FIXATION": ("PhysicalObject", "PhysicalObject"),
    "CONTRAST_AGENT": ("Substance", "ContrastAgent"),
}
#: Category and type for an empty or unknown RTROIInterpretedType.
GENERIC_CODES: tuple[str, str] = ("Tissue", "Tissue")


def seg_series_uid(source_series_uid: str, settings_key: str) -> str:
    """SeriesInstanceUID of the SEG of a source series (same inputs and settings -> same UID)."""
    return derived_uid(checked_uid(source_series_uid, "SeriesInstanceUID"), SEG_PLANE, settings_key)


def seg_instance_uid(series_uid: str) -> str:
    """SOPInstanceUID of the one SEG instance in its series."""
    return derived_uid(series_uid, "instance", "1")


def type_code_keywords(interpreted_type: str) -> tuple[str, str]:
    """(category, type) SCT keywords for an RTROIInterpretedType; the generic pair when unknown."""
    return TYPE_CODES.get(interpreted_type.strip().upper(), GENERIC_CODES)


def long_string(text: str) -> str:
    """``text`` as one valid LO value: no backslash or control characters, at most 64 characters.

    A longer text is cut at a character boundary (Python strings are characters, not bytes) and
    ends with ``...``, so a reader sees it was cut.
    """
    clean = "".join(" " if ord(c) < 32 or c == "\\" else c for c in text).strip()
    return clean if len(clean) <= LO_MAX else clean[: LO_MAX - 3].rstrip() + "..."


def content_description(rtstruct: Dataset) -> str:
    """ContentDescription naming the structure set the segments come from (label and manufacturer)."""
    label = str(rtstruct.get("StructureSetLabel", "") or "").strip() or "(no StructureSetLabel)"
    maker = str(rtstruct.get("Manufacturer", "") or "").strip() or "unknown manufacturer"
    return long_string(f"RTSTRUCT {label} by {maker}")


def _read_header(path: Path) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise DicomInputError(f"cannot read DICOM header: {exc}", path) from exc


def _roi_box(roi_masks: Path, roi: RoiInfo, grid: tuple[int, int, int]) -> RoiBox:
    """The ROI's stored mask (cut to its bounding box), checked against the image grid."""
    try:
        box = load_roi_box(roi_masks, roi.number)
    except KeyError as exc:
        raise RoiError(roi.name, f"{roi_masks} holds no mask for ROI number {roi.number}") from exc
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise NetrtError(f"{roi_masks}: cannot read the per-ROI masks ({exc})") from exc
    if box.shape != grid:
        raise RoiError(
            roi.name,
            f"mask in {roi_masks} has shape {box.shape} (slices, rows, columns); the image grid is {grid}",
        )
    return box


def _received_rows(box: RoiBox, received: Sequence[int]) -> list[tuple[int, int]]:
    """(position in ``received``, slice of ``box.mask``) for each received slice the ROI touches."""
    start, stop = box.box[0].start, box.box[0].stop
    return [(i, k - start) for i, k in enumerate(received) if start <= k < stop and box.mask[k - start].any()]


def _structure_set_timestamp(rtstruct: Dataset) -> tuple[datetime.date, datetime.time] | None:
    """StructureSetDate/Time as date and time, None when absent or not parseable."""
    day = str(rtstruct.get("StructureSetDate", "") or "").strip()
    clock = str(rtstruct.get("StructureSetTime", "") or "").strip() or "000000"
    try:
        date = datetime.datetime.strptime(day, "%Y%m%d").date()
        whole, _, fraction = clock.partition(".")
        time = datetime.datetime.strptime(whole.ljust(6, "0")[:6], "%H%M%S").time()
        if fraction.isdigit():
            time = time.replace(microsecond=int(fraction[:6].ljust(6, "0")))
    except ValueError:
        return None
    return date, time


def _set_dimension_organization_uid(seg: Dataset, uid: str) -> None:
    """Replace the random DimensionOrganizationUID highdicom draws by a derived one, everywhere."""
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = uid
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = uid


def _one_geometry(headers: Sequence[Dataset]) -> bool:
    """Whether the headers pass highdicom's checks of ``source_images`` (one study, series, frame of
    reference and matrix size, and the very same ImageOrientationPatient)."""
    first = headers[0]

    def key(ds: Dataset) -> tuple[Any, ...]:
        return (
            ds.get("StudyInstanceUID"),
            ds.get("SeriesInstanceUID"),
            ds.get("FrameOfReferenceUID"),
            ds.get("Rows"),
            ds.get("Columns"),
        )

    orientation, common = first.get("ImageOrientationPatient"), key(first)
    return orientation is not None and all(
        key(ds) == common and ds.get("ImageOrientationPatient") == orientation for ds in headers
    )


_pause_guard = threading.Lock()
_pauses = 0  # SEG writes inside _collection_paused now, in any thread of the process
_enabled_before = False  # whether the collector ran before the first of them paused it


@contextmanager
def _collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside (as it was after): see the module docstring.

    The collector is one switch for the whole process: SEG writes that overlap in threads share
    one pause, and the last to leave restores what was there before the first came in (a plain
    save-and-restore per call would leave it off when two overlap)."""
    global _pauses, _enabled_before
    with _pause_guard:
        if _pauses == 0:
            _enabled_before = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_guard:
            _pauses -= 1
            if _pauses == 0 and _enabled_before:
                gc.enable()


def _segmentation(
    headers: list[Dataset], first: int, last: int, segments: U8Array, *, plain: bool = False, **options: Any
) -> Dataset:
    """highdicom's BINARY Segmentation of ``segments`` (segment, frame, row, column) on the source
    images ``headers[first : last + 1]`` (one per frame), referencing the other headers too.

    ``plain`` makes the call in its plain form (bool array with the segments last, the other images
    as ``further_source_images``); the default gives highdicom the same content in the form it
    handles fastest (see the module docstring), and tests/test_seg.py checks both give the same
    dataset.
    """
    import highdicom as hd

    run, others = headers[first : last + 1], headers[:first] + headers[last + 1 :]
    options |= {"segmentation_type": hd.seg.SegmentationTypeValues.BINARY, "omit_empty_frames": True}
    if plain:
        stack = np.moveaxis(segments, 0, -1).astype(bool, order="C")  # segments last, contiguous
        return hd.seg.Segmentation(source_images=run, further_source_images=others, pixel_array=stack, **options)
    # Segment s of frame f is segments[s, f], contiguous and already uint8: highdicom's per-frame
    # slices need neither a gather nor a cast.
    stack = np.moveaxis(segments, 0, -1)
    if not others or not _one_geometry(headers):
        return hd.seg.Segmentation(source_images=run, further_source_images=others, pixel_array=stack, **options)
    # highdicom checks each further source image on its own (SOP class against the IOD tables, its
    # own spatial match against the frames): as source images, with the frames' positions given
    # (the run's own, as highdicom would copy them), it matches them all at once. Same references
    # in the same order, same per-frame derivation (each frame's own image, locations preserved).
    positions = hd.utils.get_plane_positions_of_series(run)
    return hd.seg.Segmentation(source_images=run + others, plane_positions=positions, pixel_array=stack, **options)


def write_seg(
    study: LoadedStudy,
    rois: Sequence[RoiInfo],
    roi_masks: Path,
    out_dir: Path,
    settings_key: str,
    *,
    series_number: int = DEFAULT_SERIES_NUMBER,
    series_description: str = DEFAULT_SERIES_DESCRIPTION,
) -> list[Path]:
    """Write the study's SEG into ``out_dir`` (``<SOPInstanceUID>.dcm``, atomically); return its path.

    ``rois`` are the kept ROIs in segment order (segment ``i`` is ``rois[i - 1]``), ``roi_masks``
    the file of :func:`netrt.outputs.rois.save_roi_masks`, each mask on ``study.images.geometry``.

    Raises:
        RoiError: no ROI given, an ROI without a mask or with a mask of the wrong shape, or every
            kept ROI empty on the received slices (a SEG must hold at least one frame).
        DicomInputError: a source image header or the RTSTRUCT cannot be read.
        NetrtError: the mask file cannot be read.
    """
    import highdicom as hd  # about 0.6 s; see the module docstring
    from pydicom.sr.codedict import codes

    if not rois:
        raise RoiError("(all)", "no kept ROI to write as a segment")
    images = study.images
    grid = images.geometry.shape
    received = list(images.slice_indices)

    # Pass 1: the received slices each ROI touches (one ROI's box in memory at a time).
    touched = np.zeros(len(received), dtype=bool)
    for roi in rois:
        for i, _ in _received_rows(_roi_box(roi_masks, roi, grid), received):
            touched[i] = True
    if not touched.any():
        names = ", ".join(repr(r.name) for r in rois)
        raise RoiError("(all)", f"every kept ROI ({names}) is empty on the received slices; a SEG needs a frame")
    first, last = int(np.argmax(touched)), len(touched) - 1 - int(np.argmax(touched[::-1]))
    if images.is_multiframe:
        if len(images.files) != 1:
            raise NetrtError(
                f"image series {images.series_instance_uid} is split over {len(images.files)} multi-frame files; "
                "a SEG references one multi-frame source image, so no SEG is written for it"
            )
        # one multi-frame source: segmentation frame i is source frame i + 1 (highdicom's rule), all frames
        first, last = 0, len(received) - 1
        position = [n - 1 for n in images.frame_numbers]  # received slice -> its frame's index
    else:
        position = [i - first for i in range(len(received))]

    # Pass 2: the segments over the run of received slices (frames) that holds any frame, one
    # contiguous uint8 volume per segment (see _segmentation for why this layout).
    segments = np.zeros((len(rois), last - first + 1, grid[1], grid[2]), dtype=np.uint8)
    for index, roi in enumerate(rois):
        box = _roi_box(roi_masks, roi, grid)
        for i, row in _received_rows(box, received):
            segments[index, position[i], box.box[1], box.box[2]] = box.mask[row]

    with _collection_paused():
        headers = [_read_header(path) for path in images.files]
    if images.is_multiframe:
        first, last = 0, 0  # the one multi-frame image is the source; its frames are the SEG's references
    try:
        rtstruct = dcmread(study.rtstruct_file, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise DicomInputError(f"cannot read RTSTRUCT: {exc}", study.rtstruct_file) from exc

    descriptions = []
    for number, roi in enumerate(rois, 1):
        category, kind = type_code_keywords(roi.interpreted_type)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=long_string(roi.name) or f"ROI {roi.number}",
                segmented_property_category=getattr(codes.SCT, category),
                segmented_property_type=getattr(codes.SCT, kind),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
                display_color=hd.color.CIELabColor.from_rgb(*roi.color),
            )
        )

    series_uid = seg_series_uid(images.series_instance_uid, settings_key)
    instance_uid = seg_instance_uid(series_uid)
    timestamp = _structure_set_timestamp(rtstruct)
    extra: dict[str, Any] = {}
    if timestamp is not None:
        extra["content_date"], extra["content_time"] = timestamp
    try:
        with _collection_paused():
            seg = _segmentation(
                headers,
                first,
                last,
                segments,
                segment_descriptions=descriptions,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=instance_uid,
                instance_number=1,
                manufacturer=MANUFACTURER,
                manufacturer_model_name=MANUFACTURER,
                software_versions=__version__,
                device_serial_number=DEVICE_SERIAL_NUMBER,
                content_description=content_description(rtstruct),
                content_label=CONTENT_LABEL,
                series_description=long_string(series_description),
                **extra,
            )
    except (ValueError, TypeError, AttributeError) as exc:
        # highdicom checks the source headers (same series, same size, geometry present); name them.
        raise DicomInputError(f"cannot build the SEG from the source images: {exc}", images.files[0]) from exc
    del segments
    _set_dimension_organization_uid(seg, derived_uid(series_uid, "dimension-organization"))

    target = out_dir / f"{checked_uid(instance_uid, 'SOPInstanceUID')}.dcm"
    with atomic_output(target) as handle:
        seg.save_as(handle, enforce_file_format=True)
    fsync_dir(out_dir)
    return [target]


#: SeriesNumber of the SEG: processing.series_number_base plus this.
SERIES_NUMBER_OFFSET = 30


def _write_kind(context: OutputContext, plane: str) -> list[WrittenSeries]:
    processing = context.processing
    key = context.settings_key("seg")
    folder = context.work_dir / "series" / "seg"
    files = write_seg(
        context.study,
        context.rois,
        context.roi_masks,
        folder,
        key,
        series_number=processing.series_number_base + SERIES_NUMBER_OFFSET,
        series_description=context.describe(DEFAULT_SERIES_DESCRIPTION),
    )
    series_uid = seg_series_uid(context.study.images.series_instance_uid, key)
    return [WrittenSeries(plane, False, series_uid, folder, tuple(files), stamp_files(files), "seg")]


KIND = OutputKind(
    name="seg",
    per_plane=False,
    write=_write_kind,
    series_number_offset=SERIES_NUMBER_OFFSET,
    description="one DICOM Segmentation per study, a segment per kept ROI (name, colour, coded type)",
)
