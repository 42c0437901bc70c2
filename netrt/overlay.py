"""Write the overlay series: the image series again, with the merged ROI mask in Overlay Plane 6000.

What a physicist needs from these files is that the mask shows up exactly where the contours were,
in any viewer, and that re-processing a study replaces its output instead of duplicating it. Hence:

* Geometry (ImagePositionPatient, ImageOrientationPatient, PixelSpacing, SliceThickness) is taken
  from the source files (axial) or from the reformat's :class:`~netrt.geometry.ImageGeometry`;
  the overlay is the mask slice as it is, row for row, so it can only be where the image is.
* Every output UID is derived (:func:`netrt.uids.derived_uid`) from the source series UID, the
  plane, the processing settings key and the burn-in flag: same input + same settings -> same
  UIDs, and a burn-in series never collides with its plain twin.
* The series is a valid instance of the SOURCE's SOP Class (CT stays CT Image Storage, MR stays
  MR), with Patient, Study, Frame of Reference and Equipment modules copied from the source, so a
  PACS files it under the same study and registration-aware viewers line it up with the planning
  images. ImageType is DERIVED\\SECONDARY\\AXIAL for the axial series and
  DERIVED\\SECONDARY\\REFORMATTED for the others (CT requires a third value; dciodvfy accepts
  REFORMATTED as an extension of the defined terms, with a warning, not an error).
* Axial pixel data is copied byte for byte (compressed transfer syntaxes stay compressed) unless
  burn-in is asked for; reformatted pixel data is converted back to the source's stored
  representation with the source's rescale and written uncompressed (Explicit VR Little Endian).

Speed: a series is written by mutating ONE dataset slice after slice (UIDs, position, pixel and
overlay bytes) and saving it each time; nothing is deep-copied per slice. For the reformatted
series the elements that never change are encoded once, by pydicom's own ``write_dataset``, and
only the five slice elements per slice (:class:`_SliceEncoder`; the bytes are those ``dcmwrite``
writes, which a test checks). They are written slab by slab as the reformat produces them
(:func:`write_reformatted_slabs`), so the reformatted volume is never held. Files are written under
a temporary name and renamed, so a reader (or a C-STORE sender) never sees half a file.
"""

from __future__ import annotations

import copy
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    correct_ambiguous_vr,
    dcmwrite,
    write_data_element,
    write_dataset,
    write_file_meta_info,
)
from pydicom.pixels.utils import pack_bits
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from netrt.burnin import burn, burn_value, first_value, outline, stored_range
from netrt.errors import DicomInputError, NetrtError
from netrt.filemeta import encode_file_meta
from netrt.geometry import ImageGeometry
from netrt.outputs.text import disclaimer_masks
from netrt.reformat import PLANES, PlaneSlab, PlaneVolume
from netrt.study.classic import ClassicFrames
from netrt.uids import checked_uid, derived_uid

BoolArray = npt.NDArray[np.bool_]

#: The first overlay group NETRT writes (of the 16 repeating groups 6000-601E; per-ROI overlays
#: use 6000, 6002, ... one per ROI).
OVERLAY_GROUP = 0x6000
#: How many overlay groups a data set can carry (PS3.3 C.9.2: groups 6000-601E, even).
MAX_OVERLAY_GROUPS = 16
TAG_OVERLAY_ROWS = 0x60000010
TAG_OVERLAY_COLUMNS = 0x60000011
TAG_OVERLAY_DESCRIPTION = 0x60000022
TAG_OVERLAY_TYPE = 0x60000040
TAG_OVERLAY_ORIGIN = 0x60000050
TAG_OVERLAY_BITS_ALLOCATED = 0x60000100
TAG_OVERLAY_BIT_POSITION = 0x60000102
TAG_OVERLAY_LABEL = 0x60001500
TAG_OVERLAY_DATA = 0x60003000
TAG_PIXEL_DATA = 0x7FE00010

BURN_IN_SUFFIX = " burn-in"
IMPLEMENTATION_VERSION_NAME = "NETRT"
#: LO (Long String) holds at most 64 characters.
LO_MAX = 64

#: Attributes that describe one source slice or the source's pixel statistics and would be wrong
#: (or misleading) on a reformatted image. Position/orientation/spacing are then set anew.
_REFORMAT_DROP = (
    "SliceLocation",
    "SpacingBetweenSlices",
    "PatientOrientation",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "PixelAspectRatio",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
    "ImagesInAcquisition",
    "IconImageSequence",
    "SourceImageSequence",
    "DerivationCodeSequence",
    "NumberOfFrames",
)

#: Pixel statistics that burning an outline into the pixels would make wrong.
_BURN_IN_DROP = (
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries",
)


@dataclass(frozen=True)
class SeriesSettings:
    """What the user configured for an overlay series, plus the key of the processing settings.

    ``description`` and ``series_number`` become SeriesDescription and SeriesNumber (a burn-in
    series gets ``" burn-in"`` appended); ``roi_label`` names the ROIs in the overlay (e.g.
    ``"NETRT: sphere, box"``); ``settings_key`` is a hash of every setting that changes the output
    (ROI selection, spacing, ...), so changed settings give new UIDs instead of overwriting.
    """

    description: str
    series_number: int
    roi_label: str
    settings_key: str
    # Per-ROI overlay groups (``processing.overlay_groups: per_roi``): one label (the ROI name) per
    # group 6000, 6002, ... in order; empty: the merged mask alone in group 6000.
    layer_labels: tuple[str, ...] = ()
    # Burned into burn-in series only (``processing.disclaimer``), never into plain overlay series.
    disclaimer: str = ""

    @property
    def groups(self) -> tuple[int, ...]:
        """The overlay groups written: 6000 alone (merged), or one per layer label."""
        return tuple(OVERLAY_GROUP + 2 * g for g in range(max(len(self.layer_labels), 1)))


def _lo(text: str) -> str:
    """``text`` made a valid single LO value: no backslash or control characters, <= 64 chars."""
    clean = "".join(" " if ord(c) < 32 else c for c in text).replace("\\", "/").strip()
    return clean if len(clean) <= LO_MAX else clean[: LO_MAX - 3].rstrip() + "..."


def series_description(settings: SeriesSettings, burn_in: bool) -> str:
    """SeriesDescription of a series; the burn-in suffix always survives the 64-character cut.

    A description that already ends with the suffix (the caller added it) is not suffixed twice.
    """
    base = _lo(settings.description)
    if not burn_in or base.endswith(BURN_IN_SUFFIX):
        return base
    return base[: LO_MAX - len(BURN_IN_SUFFIX)].rstrip() + BURN_IN_SUFFIX


def output_series_uid(source_series_uid: str, plane: str, settings_key: str, burn_in: bool) -> str:
    """SeriesInstanceUID of the series written for ``plane`` (deterministic, see module docstring)."""
    if plane not in PLANES:
        raise NetrtError(f"unknown plane {plane!r}; expected one of {', '.join(PLANES)}")
    parts = [source_series_uid, plane, settings_key] + (["burn-in"] if burn_in else [])
    return derived_uid(*parts)


def output_instance_uid(series_uid: str, index: int) -> str:
    """SOPInstanceUID of slice ``index`` (0-based, spatial order) of an output series."""
    return derived_uid(series_uid, "slice", str(index))


def _read(path: Path, *, pixels: bool) -> Dataset:
    try:
        return dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise DicomInputError(f"cannot read DICOM file: {exc}", path=path) from exc


def _required(ds: Dataset, keyword: str, path: Path) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        raise DicomInputError(f"{keyword} is missing or empty", path=path, tag=keyword)
    return value


def _drop_repeating_groups(ds: Dataset) -> None:
    """Remove overlay (60xx) and curve (50xx) groups: group 6000 is now NETRT's mask, and the
    source's own annotations would be misread as part of it (or are wrong on a reformat)."""
    tags = ds.keys()  # iterating the Dataset itself would decode every element
    for tag in [t for t in tags if (t.group & 0xFF00) in (0x5000, 0x6000)]:
        del ds[tag]


def _delete(ds: Dataset, keywords: Iterable[str]) -> None:
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)


def _ds_strings(values: Iterable[float]) -> list[str]:
    """DS strings at full 16-character precision; round-off dust (1e-17) is written as 0."""
    return [format_number_as_ds(0.0 if abs(float(v)) < 1e-12 else float(v)) for v in values]


def _set_series(ds: Dataset, settings: SeriesSettings, series_uid: str, plane: str, burn_in: bool) -> None:
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = series_description(settings, burn_in)
    ds.SeriesNumber = int(settings.series_number)
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if plane == "axial" else "REFORMATTED"]


def _derivation(plane: str, source_series_uid: str, settings: SeriesSettings, burn_in: bool) -> str:
    if plane == "axial":
        what = "source pixel data unchanged" if not burn_in else "source pixel data with the mask outline burned in"
    else:
        what = f"{plane} reformat of the source series (linear image, signed-distance mask)" + (
            "; mask outline burned in" if burn_in else ""
        )
    if settings.layer_labels:
        held = f"overlays 6000-{settings.groups[-1]:04X} hold one ROI each ({_lo(settings.roi_label)})"
    else:
        held = f"overlay 6000 holds the merged ROI mask ({_lo(settings.roi_label)})"
    return f"NETRT overlay series of {source_series_uid}: {what}; {held}"[:1024]


def _spellable(text: str, encodings: list[str]) -> bool:
    for encoding in encodings:
        try:
            text.encode(encoding)
        except (UnicodeError, LookupError):
            continue
        return True
    return False


def _use_utf8_if_needed(ds: Dataset, texts: Iterable[str]) -> None:
    """Re-declare the copy UTF-8 (ISO_IR 192) when the texts NETRT adds cannot be spelled in its
    character set.

    The overlay label (the ROI names) and descriptions go into copies of the received images, in
    their SpecificCharacterSet; a ROI name in Greek or Japanese on a Latin-1 series would otherwise
    come out as ``?``. Every text already in the copy is decoded in the original character set first
    (``Dataset.decode``), so re-encoding it in UTF-8 changes no value.
    """
    try:
        encodings = convert_encodings(ds.get("SpecificCharacterSet", ""))
    except LookupError:
        encodings = ["iso8859"]
    if all(_spellable(text, encodings) for text in texts):
        return
    ds.decode()
    ds.SpecificCharacterSet = "ISO_IR 192"


def _overlay_tag(group: int, element: int) -> int:
    return (group << 16) | element


def _add_overlay_module(ds: Dataset, rows: int, columns: int, settings: SeriesSettings) -> None:
    """Overlay Plane modules, one per group of ``settings``; OverlayData is filled per slice by
    :func:`_set_overlays`. Merged: group 6000 labelled with every kept ROI; per ROI: group
    6000 + 2g labelled with ROI g's name (OverlayLabel) and described as one ROI of NETRT's."""
    labels = settings.layer_labels or (settings.roi_label,)
    descriptions = [f"NETRT ROI: {label}" for label in labels] if settings.layer_labels else [settings.roi_label]
    _use_utf8_if_needed(
        ds,
        (
            *(_lo(t) for t in (*labels, *descriptions)),
            str(ds.get("SeriesDescription", "")),
            str(ds.get("DerivationDescription", "")),
        ),
    )
    for group, label, description in zip(settings.groups, labels, descriptions, strict=True):
        ds.add_new(_overlay_tag(group, 0x0010), "US", rows)
        ds.add_new(_overlay_tag(group, 0x0011), "US", columns)
        ds.add_new(_overlay_tag(group, 0x0022), "LO", _lo(description))
        ds.add_new(_overlay_tag(group, 0x0040), "CS", "G")
        ds.add_new(_overlay_tag(group, 0x0050), "SS", [1, 1])
        ds.add_new(_overlay_tag(group, 0x0100), "US", 1)
        ds.add_new(_overlay_tag(group, 0x0102), "US", 0)
        ds.add_new(_overlay_tag(group, 0x1500), "LO", _lo(label))
        ds.add_new(_overlay_tag(group, 0x3000), "OW", b"")


def _set_overlays(ds: Dataset, masks: Sequence[BoolArray]) -> None:
    """OverlayData of one slice, one mask per group: row by row, first pixel in the lowest bit (PS3.5 8.1.1)."""
    for g, mask_slice in enumerate(masks):
        ds[_overlay_tag(OVERLAY_GROUP + 2 * g, 0x3000)].value = pack_bits(
            np.ascontiguousarray(mask_slice).view(np.uint8)
        )


def _file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _set_instance(ds: Dataset, sop_instance: str, instance_number: int) -> None:
    ds.SOPInstanceUID = sop_instance
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    ds.InstanceNumber = instance_number


def _save_as(out_dir: Path, sop_instance_uid: str, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``<out_dir>/<SOPInstanceUID>.dcm`` with ``write`` via a temporary name and a rename.

    No fsync: the output is derived and re-created by re-running the flow, unlike received data.
    """
    uid = checked_uid(sop_instance_uid, "output SOPInstanceUID")
    final = out_dir / f"{uid}.dcm"
    temporary = out_dir / f".{uid}.dcm.tmp"
    try:
        with open(temporary, "wb") as handle:
            write(handle)
        os.replace(temporary, final)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return final


def _save(ds: Dataset, out_dir: Path) -> Path:
    """Write ``ds`` as ``<out_dir>/<SOPInstanceUID>.dcm`` (see :func:`_save_as`)."""
    return _save_as(out_dir, ds.SOPInstanceUID, lambda handle: dcmwrite(handle, ds, enforce_file_format=True))


@dataclass(frozen=True)
class PixelFormat:
    """The stored pixel representation of a source series, for converting back to it (and from it)."""

    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    slope: float
    intercept: float
    dtype: np.dtype[Any]

    @classmethod
    def of(cls, ds: Dataset, path: Path) -> PixelFormat:
        samples = int(ds.get("SamplesPerPixel", 1))
        photometric = str(ds.get("PhotometricInterpretation", ""))
        if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise DicomInputError(
                f"only single-sample greyscale images can be reformatted, got SamplesPerPixel {samples}, "
                f"PhotometricInterpretation {photometric!r}",
                path=path,
                tag="(0028,0004) PhotometricInterpretation",
            )
        if "ModalityLUTSequence" in ds:
            raise DicomInputError(
                "a Modality LUT cannot be inverted to store reformatted values; only RescaleSlope/Intercept is "
                "supported",
                path=path,
                tag="(0028,3000) ModalityLUTSequence",
            )
        allocated = int(_required(ds, "BitsAllocated", path))
        stored = int(ds.get("BitsStored", allocated))
        representation = int(ds.get("PixelRepresentation", 0))
        if allocated not in (8, 16, 32) or not 1 <= stored <= allocated or representation not in (0, 1):
            raise DicomInputError(
                f"unsupported pixel format BitsAllocated {allocated}, BitsStored {stored}, "
                f"PixelRepresentation {representation}",
                path=path,
                tag="(0028,0100) BitsAllocated",
            )
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        dtype = np.dtype(f"<{'i' if representation else 'u'}{allocated // 8}")
        return cls(allocated, stored, representation, slope, intercept, dtype)

    def to_stored(self, values: npt.NDArray[np.floating[Any]]) -> npt.NDArray[Any]:
        """Modality values -> stored values: inverse rescale, round, clip to the stored range."""
        lowest, highest = stored_range(self.bits_stored, self.pixel_representation)
        # one working copy, then in place: the same float operations as the plain expression
        # ``clip(rint((values - intercept) / slope))`` without four slab-sized temporaries
        work = values - self.intercept if self.intercept != 0 else values.copy()
        if self.slope != 1:
            work /= self.slope
        np.rint(work, out=work)
        np.clip(work, lowest, highest, out=work)
        stored: npt.NDArray[Any] = work.astype(self.dtype)
        return stored

    def to_modality(self, stored: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Stored values -> modality values (float32): the values a series in this format shows.

        :func:`to_stored` then this is what a reformatted plane holds once written; the colour
        series windows exactly these (:mod:`netrt.outputs.color`)."""
        values: npt.NDArray[np.float32] = stored.astype(np.float32)
        if self.slope != 1:
            values *= np.float32(self.slope)
        if self.intercept != 0:
            values += np.float32(self.intercept)
        return values


def _burned(
    ds: Dataset, stored: npt.NDArray[Any], mask_slice: BoolArray, fmt: PixelFormat, disclaimer: str = ""
) -> npt.NDArray[Any]:
    """``stored`` with the mask outline, and the disclaimer's letters, burned in at
    :func:`netrt.burnin.burn_value` (the letters' outline at the lowest stored value, so the text
    reads on bright and dark anatomy). Every other pixel keeps its stored value exactly."""
    edge = outline(mask_slice)
    fill, stroke = disclaimer_masks(*stored.shape, disclaimer) if disclaimer else (None, None)
    if not edge.any() and fill is None:
        return stored
    value = burn_value(
        fmt.bits_stored,
        fmt.pixel_representation,
        int(stored.max()),
        slope=fmt.slope,
        intercept=fmt.intercept,
        window_center=first_value(ds.get("WindowCenter")),
        window_width=first_value(ds.get("WindowWidth")),
    )
    burned = burn(stored, edge, value)
    if fill is not None and stroke is not None:
        lowest, _ = stored_range(fmt.bits_stored, fmt.pixel_representation)
        burned = burn(burn(burned, stroke, lowest), fill, value)
    return burned


def _check_mask(mask: npt.ArrayLike, slices: int, what: str) -> BoolArray:
    array = np.asarray(mask, dtype=bool)
    if array.ndim != 3 or array.shape[0] != slices:
        raise ValueError(f"mask shape {array.shape} does not match {slices} {what}")
    return np.ascontiguousarray(array)


def _check_layers(settings: SeriesSettings, given: bool) -> None:
    if len(settings.layer_labels) > MAX_OVERLAY_GROUPS:
        raise ValueError(
            f"{len(settings.layer_labels)} overlay layers; a data set holds at most {MAX_OVERLAY_GROUPS} groups"
        )
    if bool(settings.layer_labels) != given:
        raise ValueError("per-ROI layers are given exactly when the settings name them (layer_labels)")


def _slice_layers(
    settings: SeriesSettings, layers: Callable[[int], Sequence[BoolArray]] | None, index: int, merged: BoolArray
) -> Sequence[BoolArray]:
    if layers is None:
        return [merged]
    masks = layers(index)
    if len(masks) != len(settings.layer_labels) or any(m.shape != merged.shape for m in masks):
        raise ValueError(
            f"slice {index}: {len(masks)} layer masks for {len(settings.layer_labels)} labels, "
            f"or not of the slice's shape {merged.shape}"
        )
    return masks


def write_axial_series(
    source_files: Sequence[Path],
    mask: npt.ArrayLike,
    out_dir: Path,
    settings: SeriesSettings,
    burn_in: bool = False,
    layers: Callable[[int], Sequence[BoolArray]] | None = None,
    frame_numbers: Sequence[int] = (),
) -> list[Path]:
    """Write the axial overlay series: each source slice again, with ``mask[k]`` as its overlay.

    ``frame_numbers`` (one per source slice, 1-based; empty for classic files) are the frames of
    enhanced multi-frame sources: ``source_files[k]`` then repeats the multi-frame file, and slice
    ``k`` is written as a classic single-frame CT/MR image of frame ``frame_numbers[k]``
    (:class:`netrt.study.classic.ClassicFrames`: its position, orientation, spacing and rescale,
    the stored values unchanged but uncompressed) whose SourceImageSequence names the source
    instance and frame. Outputs are single-frame because viewers draw overlays on single frames
    more reliably.

    With per-ROI overlay groups (``settings.layer_labels``), ``layers(k)`` gives the masks of
    file ``k``, one per group in label order, and the merged ``mask`` only feeds the burn-in.

    ``source_files`` are the image files in spatial order (slice ``k`` of ``mask``, ``[slice,
    row, col]``, belongs to ``source_files[k]``). Everything but the series/instance identity,
    ImageType, derivation and overlay is kept as received; the pixel bytes too, unless
    ``burn_in``, in which case the outline is burned into decoded pixels written uncompressed.
    Returns the written files in spatial order.

    Raises:
        DicomInputError: a file is unreadable, of another series, or its Rows/Columns differ from
            the mask slice (named by path and tag).
        ValueError: the mask does not have one slice per file.
    """
    files = [Path(p) for p in source_files]
    if not files:
        raise ValueError("no source files given")
    masks = _check_mask(mask, len(files), "source files")
    if frame_numbers and len(frame_numbers) != len(files):
        raise ValueError(f"{len(frame_numbers)} frame numbers for {len(files)} source slices")
    multiframe: dict[Path, ClassicFrames] = {}
    _check_layers(settings, layers is not None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    source_series = ""
    series_uid = ""
    for index, path in enumerate(files):
        frame = frame_numbers[index] if frame_numbers else 0
        if frame:
            source = multiframe.get(path) or multiframe.setdefault(path, ClassicFrames(path))
            ds = source.frame(frame, pixels=True)
        else:
            ds = _read(path, pixels=True)
        this_series = str(_required(ds, "SeriesInstanceUID", path))
        if index == 0:
            source_series = this_series
            series_uid = output_series_uid(source_series, "axial", settings.settings_key, burn_in)
        elif this_series != source_series:
            raise DicomInputError(
                f"belongs to series {this_series}, not {source_series} like the first file",
                path=path,
                tag="(0020,000E) SeriesInstanceUID",
            )
        rows, columns = int(_required(ds, "Rows", path)), int(_required(ds, "Columns", path))
        if (rows, columns) != masks.shape[1:]:
            raise DicomInputError(
                f"image is {rows} rows x {columns} columns but the mask slice is {masks.shape[1]} x {masks.shape[2]}",
                path=path,
                tag="(0028,0010) Rows",
            )
        if "PixelData" not in ds:
            raise DicomInputError("has no pixel data", path=path, tag="(7FE0,0010) PixelData")
        sop_class = str(_required(ds, "SOPClassUID", path))
        source_instance = str(_required(ds, "SOPInstanceUID", path))
        transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))

        if burn_in:
            fmt = PixelFormat.of(ds, path)
            stored = _burned(ds, np.asarray(ds.pixel_array), masks[index], fmt, settings.disclaimer)
            del ds[TAG_PIXEL_DATA]
            ds.add_new(TAG_PIXEL_DATA, "OB" if fmt.bits_allocated == 8 else "OW", stored.astype(fmt.dtype).tobytes())
            _delete(ds, _BURN_IN_DROP)
            transfer_syntax = ExplicitVRLittleEndian

        _drop_repeating_groups(ds)
        _set_series(ds, settings, series_uid, "axial", burn_in)
        ds.DerivationDescription = _derivation("axial", source_series, settings, burn_in)
        source_item = Dataset()
        source_item.ReferencedSOPClassUID = sop_class
        source_item.ReferencedSOPInstanceUID = source_instance
        if frame:
            source_item = multiframe[path].reference(frame)
        ds.SourceImageSequence = DicomSequence([source_item])
        instance_uid = output_instance_uid(series_uid, index)
        ds.file_meta = _file_meta(sop_class, instance_uid, transfer_syntax)
        _set_instance(ds, instance_uid, index + 1)
        _add_overlay_module(ds, rows, columns, settings)
        _set_overlays(ds, _slice_layers(settings, layers, index, masks[index]))
        written.append(_save(ds, out_dir))
    return written


def _reformat_template(
    template_file: Path,
    plane: str,
    geometry: ImageGeometry,
    settings: SeriesSettings,
    burn_in: bool,
    template_frame: int = 0,
) -> tuple[Dataset, PixelFormat, str]:
    """The dataset every slice of a reformatted series starts from, its pixel format and series UID.

    ``template_frame`` > 0: the template is that frame of an enhanced multi-frame file, as a
    classic single-frame image (:class:`netrt.study.classic.ClassicFrames`).
    """
    path = Path(template_file)
    ds = ClassicFrames(path).frame(template_frame, pixels=False) if template_frame else _read(path, pixels=False)
    fmt = PixelFormat.of(ds, path)
    sop_class = str(_required(ds, "SOPClassUID", path))
    source_series = str(_required(ds, "SeriesInstanceUID", path))
    _required(ds, "FrameOfReferenceUID", path)
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomInputError(
            "multi-frame images cannot serve as the template of a single-frame series",
            path=path,
            tag="(0028,0008) NumberOfFrames",
        )
    ds.remove_private_tags()  # vendor data of one source slice, meaningless on a reformat
    _drop_repeating_groups(ds)
    _delete(ds, _REFORMAT_DROP)

    columns, rows, _ = geometry.size
    series_uid = output_series_uid(source_series, plane, settings.settings_key, burn_in)
    _set_series(ds, settings, series_uid, plane, burn_in)
    ds.DerivationDescription = _derivation(plane, source_series, settings, burn_in)
    ds.ImageOrientationPatient = _ds_strings([*geometry.row_direction, *geometry.column_direction])
    ds.PixelSpacing = _ds_strings([geometry.spacing[1], geometry.spacing[0]])
    ds.SliceThickness = _ds_strings([geometry.spacing[2]])[0]
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = fmt.bits_allocated
    ds.BitsStored = fmt.bits_stored
    ds.HighBit = fmt.bits_stored - 1
    ds.PixelRepresentation = fmt.pixel_representation
    ds.SamplesPerPixel = 1
    ds.file_meta = _file_meta(sop_class, series_uid, ExplicitVRLittleEndian)
    _add_overlay_module(ds, rows, columns, settings)
    ds.add_new(TAG_PIXEL_DATA, "OB" if fmt.bits_allocated == 8 else "OW", b"")
    return ds, fmt, series_uid


def _slice_tags(settings: SeriesSettings) -> tuple[int, ...]:
    """The elements that differ between the slices of a reformatted series (see :func:`_set_slice`):
    SOPInstanceUID, InstanceNumber, ImagePositionPatient, each group's OverlayData, PixelData."""
    overlays = tuple(_overlay_tag(group, 0x3000) for group in settings.groups)
    return (0x00080018, 0x00200013, 0x00200032, *overlays, TAG_PIXEL_DATA)


def _set_slice(
    ds: Dataset,
    series_uid: str,
    index: int,
    position: Iterable[float],
    stored: npt.NDArray[Any],
    masks: Sequence[BoolArray],
) -> None:
    """Make ``ds`` slice ``index``: SOP Instance UID, InstanceNumber, ImagePositionPatient, overlays, pixels."""
    ds.ImagePositionPatient = _ds_strings(position)
    ds[TAG_PIXEL_DATA].value = stored.tobytes()
    _set_overlays(ds, masks)
    _set_instance(ds, output_instance_uid(series_uid, index), index + 1)


@dataclass(frozen=True)
class _SliceEncoder:
    """The file bytes of one series' slices, with the constant elements encoded once.

    A slice file is what ``dcmwrite(path, ds, enforce_file_format=True)`` writes for the template
    after :func:`_set_slice`: preamble, ``DICM``, the File Meta Information (encoded per slice:
    its group length depends on the SOP Instance UID) and the data set in tag order. The data set
    is cut at the slice tags (:func:`_slice_tags`); the runs of elements between them never change and are
    encoded once, by pydicom's own ``write_dataset``, and only the slice elements are encoded
    per slice (``write_data_element``). ``tests/test_overlay.py`` checks the bytes against
    ``dcmwrite`` slice for slice.
    """

    ds: Dataset
    slice_tags: tuple[int, ...]
    runs: tuple[bytes, ...]  # len(slice_tags) + 1 runs around the slice elements
    encodings: str | list[str]


def _encoder(ds: Dataset, slice_tags: tuple[int, ...]) -> _SliceEncoder:
    """Prepare ``ds`` (already holding every slice element, see :func:`_set_slice`) for :func:`_encode`.

    Every element is decoded and its VR made unambiguous first, so that an element encodes to the
    same bytes alone as within the whole data set (``dcmwrite`` does the same conversion whenever
    the source's encoding or character set differs from the output's).
    """
    missing = [f"({tag >> 16:04X},{tag & 0xFFFF:04X})" for tag in slice_tags if tag not in ds]
    if missing:
        raise ValueError(f"the template lacks slice elements {', '.join(missing)}")
    for tag in list(ds.keys()):
        ds[tag]  # RawDataElement -> DataElement, in the data set's own character set
    correct_ambiguous_vr(ds, True)
    encodings = ds.get("SpecificCharacterSet", default_encoding)
    runs: list[bytes] = []
    tags = sorted(ds.keys())
    for low, high in pairwise([-1, *slice_tags, 0x100000000]):
        part = Dataset()
        for tag in tags:
            if low < tag < high:
                part.add(ds[tag])
        buffer = _buffer()
        write_dataset(buffer, part, encodings)
        runs.append(buffer.getvalue())
    return _SliceEncoder(ds, slice_tags, tuple(runs), encodings)


def _buffer() -> DicomBytesIO:
    """An empty Explicit VR Little Endian buffer (the encoding of every file NETRT writes here)."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    return buffer


def _encode(encoder: _SliceEncoder) -> list[bytes]:
    """The file of the encoder's data set as it stands (after :func:`_set_slice`), in pieces."""
    ds = encoder.ds
    start = encode_file_meta(ds.file_meta)  # pydicom's bytes without pydicom (netrt.filemeta)
    if start is None:
        meta = _buffer()
        write_file_meta_info(meta, copy.copy(ds.file_meta), enforce_standard=True)
        start = _PREAMBLE + meta.getvalue()
    pieces = [start, encoder.runs[0]]
    for tag, run in zip(encoder.slice_tags, encoder.runs[1:], strict=True):
        pixels = _pixel_data_pieces(ds[tag]) if tag == TAG_PIXEL_DATA else None
        if pixels is not None:
            pieces += [*pixels, run]
            continue
        element = _buffer()
        write_data_element(element, ds[tag], encoder.encodings)
        pieces += [element.getvalue(), run]
    return pieces


def _pixel_data_pieces(element: DataElement) -> list[bytes] | None:
    """Native PixelData (OB/OW bytes, explicit VR little endian) as header, value and pad: the bytes
    ``write_data_element`` writes, without copying the value (half a MiB per CT slice, a quarter of
    the time of encoding a slice). None for anything else (pydicom encodes it)."""
    value = element.value
    if element.VR not in ("OB", "OW") or not isinstance(value, bytes) or element.is_undefined_length:
        return None
    pad = b"\x00" if len(value) % 2 else b""
    return [pixel_data_header(element.VR, len(value) + len(pad)), value, pad]


def pixel_data_header(vr: str, length: int) -> bytes:
    """The explicit VR little endian header of a native PixelData element of ``length`` bytes (the
    12 bytes before the pixels, which end every file :class:`SliceWriter` writes)."""
    return struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr.encode("ascii"), 0, length)


#: Preamble and prefix of a DICOM file (``dcmwrite`` writes 128 zero bytes when there is none).
_PREAMBLE = b"\x00" * 128 + b"DICM"


def _save_bytes(pieces: Sequence[bytes], sop_instance_uid: str, out_dir: Path) -> Path:
    """Write ``pieces`` as ``<out_dir>/<uid>.dcm`` (see :func:`_save_as`)."""
    return _save_as(out_dir, sop_instance_uid, lambda handle: handle.writelines(pieces))


class SliceWriter:
    """Writes the files of a series whose slices differ only in ``slice_tags``: every other element
    is encoded once (see :class:`_SliceEncoder`), each file is what ``dcmwrite(ds,
    enforce_file_format=True)`` writes for ``ds`` as it stands, under ``<SOPInstanceUID>.dcm``,
    written atomically (:func:`_save_as`). Set the slice elements on ``ds`` (every one must already
    be present when the writer is made), then call :meth:`write`; ``ds`` must be Explicit VR
    Little Endian. Used by output kinds that write many slices (the colour series)."""

    def __init__(self, ds: Dataset, slice_tags: Sequence[int]) -> None:
        self._encoder = _encoder(ds, tuple(sorted(slice_tags)))

    @property
    def ds(self) -> Dataset:
        return self._encoder.ds

    def write(self, out_dir: Path) -> Path:
        return _save_bytes(_encode(self._encoder), str(self._encoder.ds.SOPInstanceUID), out_dir)


@dataclass(frozen=True)
class SeriesOutput:
    """One series to write from a reformatted plane: its folder, settings and burn-in flag."""

    out_dir: Path
    settings: SeriesSettings
    burn_in: bool = False


@dataclass
class _SeriesWriter:
    out_dir: Path
    burn_in: bool
    series_uid: str
    encoder: _SliceEncoder
    written: list[Path]


def write_reformatted_slabs(
    plane: str,
    geometry: ImageGeometry,
    slabs: Iterable[PlaneSlab],
    template_file: Path,
    outputs: Sequence[SeriesOutput],
    template_frame: int = 0,
) -> list[list[Path]]:
    """Write coronal or sagittal overlay series slab by slab, as :func:`netrt.reformat.reformat_slabs` yields them.

    Each slab is written (to every series in ``outputs``, e.g. plain and burn-in) before the next
    is asked for, so the reformatted volume is never held. The files are those of
    :func:`write_reformatted_series` (see there) for the same values. Returns the written files of
    each output, in slice order. ``template_frame`` > 0 takes the template from that frame of an
    enhanced multi-frame ``template_file`` (the series is classic single-frame either way).

    Raises:
        NetrtError: ``plane`` is axial (write that with :func:`write_axial_series`).
        DicomInputError: the template is unreadable, colour, multi-frame or lacks a required tag.
        ValueError: the slabs are not consecutive from slice 0, do not match the grid, or do not
            cover it.
    """
    if plane not in PLANES or plane == "axial":
        raise NetrtError(f"write_reformatted_slabs writes coronal/sagittal planes, not {plane!r}")
    slices, rows, columns = geometry.shape
    step = geometry.spacing[2] * geometry.normal
    writers: list[_SeriesWriter] = []
    fmt: PixelFormat | None = None
    for output in outputs:
        if output.settings.layer_labels:
            _check_layers(output.settings, True)
        ds, fmt, series_uid = _reformat_template(
            Path(template_file), plane, geometry, output.settings, output.burn_in, template_frame
        )
        empty = [np.zeros((rows, columns), bool)] * len(output.settings.groups)
        _set_slice(ds, series_uid, 0, geometry.origin, np.zeros((rows, columns), fmt.dtype), empty)
        out_dir = Path(output.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        writers.append(
            _SeriesWriter(out_dir, output.burn_in, series_uid, _encoder(ds, _slice_tags(output.settings)), [])
        )
    expected = 0
    for slab in slabs:
        if slab.first != expected or slab.image.shape[1:] != (rows, columns) or slab.mask.shape != slab.image.shape:
            raise ValueError(
                f"slab at slice {slab.first} with image {slab.image.shape} / mask {slab.mask.shape} does not continue "
                f"slice {expected} of the grid {geometry.shape}"
            )
        expected += slab.image.shape[0]
        if expected > slices:
            raise ValueError(f"slabs run past the {slices} slices of the grid")
        if fmt is None:
            continue
        for output in outputs:
            if output.settings.layer_labels and (
                len(slab.layers) != len(output.settings.layer_labels)
                or any(layer.shape != slab.mask.shape for layer in slab.layers)
            ):
                raise ValueError(
                    f"slab at slice {slab.first}: {len(slab.layers)} layer masks for "
                    f"{len(output.settings.layer_labels)} overlay labels, or not of the slab's shape"
                )
        stored_slab = fmt.to_stored(slab.image)
        for offset in range(slab.image.shape[0]):
            index = slab.first + offset
            mask_slice = np.ascontiguousarray(slab.mask[offset])
            layer_slices = [np.ascontiguousarray(layer[offset]) for layer in slab.layers]
            for writer, output in zip(writers, outputs, strict=True):
                stored = stored_slab[offset]
                if writer.burn_in:
                    stored = _burned(writer.encoder.ds, stored, mask_slice, fmt, output.settings.disclaimer)
                overlays = layer_slices if output.settings.layer_labels else [mask_slice]
                _set_slice(
                    writer.encoder.ds, writer.series_uid, index, geometry.origin + index * step, stored, overlays
                )
                pieces = _encode(writer.encoder)
                writer.written.append(_save_bytes(pieces, writer.encoder.ds.SOPInstanceUID, writer.out_dir))
    if expected != slices:
        raise ValueError(f"slabs cover {expected} of the {slices} slices of the grid")
    return [writer.written for writer in writers]


def write_reformatted_series(
    plane: PlaneVolume,
    template_file: Path,
    out_dir: Path,
    settings: SeriesSettings,
    burn_in: bool = False,
) -> list[Path]:
    """Write a coronal or sagittal overlay series from a :class:`~netrt.reformat.PlaneVolume`.

    ``template_file`` is one source slice: its Patient, Study, Series-level, Frame of Reference,
    Equipment and acquisition attributes, SOP Class, rescale and window are carried over; slice
    specific, private and pixel-statistics attributes are dropped. Slice ``k`` of the plane becomes
    InstanceNumber ``k + 1`` at ImagePositionPatient = the centre of its first voxel. Pixel values
    are converted back to the template's stored representation (round, clip to the BitsStored
    range). Returns the written files in slice order.

    Raises:
        NetrtError: ``plane`` is axial (write that with :func:`write_axial_series`).
        DicomInputError: the template is unreadable, colour, multi-frame or lacks a required tag.
    """
    if plane.plane == "axial":
        raise NetrtError("write_reformatted_series writes coronal/sagittal planes; use write_axial_series for axial")
    geometry = plane.geometry
    if plane.image.shape != geometry.shape or plane.mask.shape != geometry.shape:
        raise ValueError(
            f"plane image {plane.image.shape} / mask {plane.mask.shape} do not match the grid {geometry.shape}"
        )
    whole = PlaneSlab(0, plane.image, plane.mask)
    output = SeriesOutput(Path(out_dir), settings, burn_in)
    return write_reformatted_slabs(plane.plane, geometry, [whole], Path(template_file), [output])[0]
