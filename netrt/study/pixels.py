"""Pixel data: check that a slice's pixel data is present and decodable, and decode slices into volumes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut
from pydicom.uid import UID

from netrt.errors import DicomInputError, StudyValidationError
from netrt.geometry import (
    place_sitk_image,
)
from netrt.study._common import (
    _PIXEL_DATA_TAG,
    _UNDEFINED_LENGTH,
    TAG_PIXEL_DATA,
    FloatArray32,
    _numbers,
    _sitk,
    _tag,
    _text,
    _uid_name,
)
from netrt.study.discovery import _read_dataset
from netrt.study.model import ImageSeries
from netrt.study.multiframe import decode_frames


def _check_pixel_data(ds: Dataset, path: Path, rows: int, columns: int, frames: int = 1) -> None:
    """Pixel data present, long enough (native syntaxes) and with a decoder installed.

    ``frames`` > 1: an enhanced multi-frame image of that many frames (its NumberOfFrames was
    read with its functional groups); otherwise the image must be a single frame.
    """
    if _PIXEL_DATA_TAG not in ds:
        raise StudyValidationError("image has no pixel data", path=path, tag=TAG_PIXEL_DATA)
    if frames == 1 and ds.get("NumberOfFrames") not in (None, ""):
        frames = int(_numbers(ds, "NumberOfFrames", 1, path)[0])
        if frames != 1:
            raise StudyValidationError(
                f"{frames} frames in one instance; only single-frame slices are supported",
                path=path,
                tag=_tag("NumberOfFrames"),
            )
    samples = int(_numbers(ds, "SamplesPerPixel", 1, path)[0])
    if samples != 1:
        raise StudyValidationError(
            f"{samples} samples per pixel; CT/MR/PET slices must be greyscale",
            path=path,
            tag=_tag("SamplesPerPixel"),
        )
    syntax = UID(_text(ds.file_meta, "TransferSyntaxUID"))
    if not syntax:
        raise DicomInputError("file meta has no transfer syntax", path=path, tag=_tag("TransferSyntaxUID"))
    if not syntax.is_transfer_syntax:
        raise DicomInputError(
            f"unknown transfer syntax {syntax}: not a DICOM transfer syntax NETRT (pydicom) can read",
            path=path,
            tag=_tag("TransferSyntaxUID"),
        )
    elem = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
    if isinstance(elem, RawDataElement):
        encapsulated = elem.length == _UNDEFINED_LENGTH
    else:  # already converted: it remembers how it was read
        encapsulated = bool(getattr(elem, "is_undefined_length", False))
    if encapsulated != syntax.is_encapsulated:
        raise StudyValidationError(
            f"wrong transfer syntax: {_uid_name(syntax)} {'requires' if syntax.is_encapsulated else 'forbids'} "
            f"encapsulated pixel data, but the pixel data is {'encapsulated' if encapsulated else 'native'}",
            path=path,
            tag=_tag("TransferSyntaxUID"),
        )
    if syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise StudyValidationError(
                f"no pixel data decoder for transfer syntax {_uid_name(syntax)}",
                path=path,
                tag=_tag("TransferSyntaxUID"),
            ) from exc
        if not decoder.is_available:
            raise StudyValidationError(
                f"the decoder for {_uid_name(syntax)} is not installed ({'; '.join(decoder.missing_dependencies)})",
                path=path,
                tag=_tag("TransferSyntaxUID"),
            )
        return
    bits = int(_numbers(ds, "BitsAllocated", 1, path)[0])
    length = elem.length if isinstance(elem, RawDataElement) else len(ds.PixelData)
    needed = rows * columns * (bits // 8) * frames
    if bits >= 8 and length < needed:
        of_frames = f" in each of {frames} frames" if frames > 1 else ""
        raise StudyValidationError(
            f"pixel data has {length} bytes, {rows}x{columns} pixels of {bits} bits{of_frames} need {needed}",
            path=path,
            tag=TAG_PIXEL_DATA,
        )


def _check_decodes(path: Path, rows: int, columns: int, sop_instance_uid: str, frame_number: int = 0) -> None:
    """Decode one received slice (a classic file, or frame ``frame_number`` of a multi-frame file) to
    prove it can be.

    Raises:
        DicomInputError: it cannot be decoded or is not the validated instance (named).
    """
    if frame_number:
        for _ in decode_frames(path, sop_instance_uid, [frame_number], rows, columns):
            pass
    else:
        _decode_slice(path, rows, columns, sop_instance_uid)


def _decode_slice(path: Path, rows: int, columns: int, sop_instance_uid: str) -> npt.NDArray[Any]:
    """One slice in modality units (Modality LUT or RescaleSlope/Intercept applied by pydicom).

    The file must still hold the instance that was validated: a slice replaced between validation
    and decoding would otherwise be stacked silently into the volume.
    """
    try:
        ds = dcmread(path)
        found = _text(ds, "SOPInstanceUID")
        values: npt.NDArray[Any] = apply_modality_lut(ds.pixel_array, ds)
    except Exception as exc:  # decoder errors come in many types; all mean "this slice is unusable"
        raise DicomInputError(
            f"pixel data cannot be read or decoded: {type(exc).__name__}: {exc}", path=path, tag=TAG_PIXEL_DATA
        ) from exc
    if found != sop_instance_uid:
        raise DicomInputError(
            f"file now holds SOPInstanceUID {found or '(none)'}, not the validated {sop_instance_uid}",
            path=path,
            tag=_tag("SOPInstanceUID"),
        )
    if values.shape != (rows, columns):
        raise DicomInputError(
            f"decoded pixel data has shape {values.shape}, expected {rows}x{columns}", path=path, tag=TAG_PIXEL_DATA
        )
    return values


_SAME_IMAGE_KEYWORDS = (
    "SOPClassUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "RescaleSlope",
    "RescaleIntercept",
)


def _image_difference(first: Path, second: Path) -> str:
    """ "" when two files holding one SOPInstanceUID hold the same image, else the attributes that differ.

    Byte-identical files are the same image. Otherwise (the same image may come back in another
    transfer syntax or with other header details) the geometry attributes and the decoded pixel
    values in modality units must be equal.

    Raises:
        DicomInputError: either file cannot be read or its pixel data cannot be decoded (named).
    """
    if first.stat().st_size == second.stat().st_size and first.read_bytes() == second.read_bytes():
        return ""
    datasets = []
    for path in (first, second):
        ds = _read_dataset(path, defer_large_values=False)
        datasets.append(ds)
    a, b = datasets
    differing = [keyword for keyword in _SAME_IMAGE_KEYWORDS if a.get(keyword) != b.get(keyword)]
    if not differing:
        pixels = []
        for path, ds in ((first, a), (second, b)):
            try:
                pixels.append(apply_modality_lut(ds.pixel_array, ds))
            except Exception as exc:  # decoder errors come in many types
                raise DicomInputError(
                    f"pixel data cannot be read or decoded: {type(exc).__name__}: {exc}", path=path, tag=TAG_PIXEL_DATA
                ) from exc
        if pixels[0].shape != pixels[1].shape or not np.array_equal(pixels[0], pixels[1]):
            differing.append("PixelData")
    return ", ".join(differing)


def _received_values(series: ImageSeries) -> Iterator[tuple[int, npt.NDArray[Any]]]:
    """(grid slice, values in modality units) of every received slice, one slice in memory at a time.

    Classic slices come in spatial order; the frames of a multi-frame file in frame order (each
    file decoded once, frame by frame: decoding it per slice would read it once per frame).
    """
    rows, columns = series.geometry.shape[1:]
    if not series.is_multiframe:
        for k, path, sop_uid in zip(series.slice_indices, series.files, series.sop_instance_uids, strict=True):
            yield k, _decode_slice(path, rows, columns, sop_uid)
        return
    by_file: dict[int, dict[int, int]] = {}
    for f, number, k in zip(series.slice_files, series.frame_numbers, series.slice_indices, strict=True):
        by_file.setdefault(f, {})[number] = k
    for f, grid in sorted(by_file.items()):
        for number, values in decode_frames(series.files[f], series.sop_instance_uids[f], sorted(grid), rows, columns):
            yield grid[number], values


def read_image_volume(series: ImageSeries) -> FloatArray32:
    """The whole grid as float32 ``[slice, row, col]`` in modality units, in spatial order.

    CT comes out in HU: pydicom's modality LUT applies each slice's own RescaleSlope and
    RescaleIntercept (they may differ between slices, PET's always do). Compressed transfer
    syntaxes are decoded by pydicom's pixel handlers (pylibjpeg plugins). Each file is checked
    to still be the instance that was validated.

    Received slices are placed on their grid slice untouched. A missing slice (see
    :attr:`ImageSeries.missing_slices`) is the linear interpolation along the normal of the nearest
    received slices below and above it, weighted by distance: the reformats need a value on every
    grid slice, and a straight blend of the two measured neighbours is the estimate that adds
    nothing the scanner did not see. It is never written back as an axial image.

    Raises:
        DicomInputError: a slice is missing, replaced, or its pixel data cannot be decoded (named).
    """
    slices, rows, columns = series.geometry.shape
    volume = np.empty((slices, rows, columns), dtype=np.float32)
    for k, values in _received_values(series):
        volume[k] = values
    for k in series.missing_slices:
        below, above = series.received_neighbours(k)
        weight = (k - below) / (above - below)
        volume[k] = (1.0 - weight) * volume[below] + weight * volume[above]
    return volume


#: Received slices decoded into a buffer before it is pasted into the SimpleITK image of
#: :func:`read_source_image`: SimpleITK's in-place paste costs ~1.3 ms a call whatever its size, so
#: slice-by-slice pasting of 400 slices took 1.2 s against 0.17 s in chunks of 8 (measured).
_PASTE_SLICES = 8

_INT16 = np.iinfo(np.int16)


def _exact_int16(values: npt.NDArray[Any]) -> npt.NDArray[np.int16] | None:
    """``values`` as int16 when that changes none of them (integers within the int16 range), else None."""
    if values.size == 0:
        return values.astype(np.int16)
    low, high = values.min(), values.max()
    if not (_INT16.min <= low and high <= _INT16.max):  # also False for NaN
        return None
    candidate = values.astype(np.int16)
    return candidate if np.array_equal(candidate, values) else None


def read_source_image(series: ImageSeries) -> sitk.Image:
    """The values of :func:`read_image_volume` as a SimpleITK image on ``series.geometry``, held once.

    This is what the reformats resample. The image is filled in place a few slices at a time, so
    the volume is never held twice (a numpy volume plus SimpleITK's copy of it), and its pixel type
    is the smallest that holds every value exactly: int16 when every modality value is an integer in
    the int16 range (CT in HU with the usual integer rescale: half the memory of float32), float32
    otherwise (fractional rescale, wider values, or missing slices, which are interpolated exactly as
    :func:`read_image_volume` does). Either way SimpleITK's linear interpolation reads the same
    numbers as from the float32 volume, so the resampled values are identical.

    Raises:
        DicomInputError: a slice is missing, replaced, or its pixel data cannot be decoded (named).
    """
    slices, rows, columns = series.geometry.shape
    compact = not series.missing_slices
    image: Any = _sitk.Image([columns, rows, slices], sitk.sitkInt16 if compact else sitk.sitkFloat32)
    buffer: npt.NDArray[Any] = np.empty((_PASTE_SLICES, rows, columns), dtype=np.int16 if compact else np.float32)
    start, count = 0, 0

    def flush() -> None:
        if count:
            image[:, :, start : start + count] = _sitk.GetImageFromArray(buffer[:count])

    for k, values in _received_values(series):
        exact = _exact_int16(values) if compact else None
        if compact and exact is None:  # first value int16 cannot hold: float32 from here on
            compact = False
            image = _sitk.Cast(image, sitk.sitkFloat32)
            buffer = buffer.astype(np.float32)
        if count == _PASTE_SLICES or (count and k != start + count):
            flush()
            count = 0
        if count == 0:
            start = k
        buffer[count] = exact if exact is not None else values
        count += 1
    flush()
    for k in series.missing_slices:
        below, above = series.received_neighbours(k)
        weight = (k - below) / (above - below)
        stored = _sitk.GetArrayViewFromImage(image)
        blended = (1.0 - weight) * stored[below] + weight * stored[above]
        del stored
        image[:, :, k : k + 1] = _sitk.GetImageFromArray(blended[None])
    result: sitk.Image = place_sitk_image(image, series.geometry)
    return result


@dataclass(frozen=True)
class CrossSections:
    """Three planes through the grid, in modality units as :func:`read_image_volume` gives them.

    ``axial`` ``[row, col]`` is grid slice ``slice_index``; ``coronal`` ``[slice, col]`` is grid row
    ``row_index`` of every slice; ``sagittal`` ``[slice, row]`` is grid column ``column_index`` of
    every slice (slices in spatial order, as the volume's first axis).
    """

    slice_index: int
    row_index: int
    column_index: int
    axial: FloatArray32
    coronal: FloatArray32
    sagittal: FloatArray32


def _native_dtype(ds: Dataset) -> tuple[np.dtype[Any], int] | None:
    """How the pixel data of a native (uncompressed) greyscale slice reads straight from the file:
    its numpy dtype and the unused high bits to clear (BitsAllocated - BitsStored); None for
    anything else (encapsulated syntaxes, 1-bit or float data), which is decoded in full instead."""
    syntax = UID(_text(ds.file_meta, "TransferSyntaxUID"))
    if not syntax or not syntax.is_transfer_syntax or syntax.is_encapsulated or syntax.is_deflated:
        return None
    try:
        allocated = int(ds.BitsAllocated)
        stored = int(ds.get("BitsStored", allocated))
        signed = int(ds.PixelRepresentation) == 1
        samples = int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError):
        return None
    if allocated not in (8, 16, 32) or not 0 < stored <= allocated or samples != 1:
        return None
    order = "<" if syntax.is_little_endian else ">"
    return np.dtype(f"{order}{'i' if signed else 'u'}{allocated // 8}"), allocated - stored


def _read_native_frame(
    path: Path, rows: int, columns: int, sop_instance_uid: str
) -> tuple[npt.NDArray[Any], Dataset] | None:
    """The stored values ``[row, col]`` of a native slice, read from the file at the pixel data's
    offset without pydicom's decoding (the header is parsed with the pixel data deferred), and
    the header for the Modality LUT; None when the slice is not plain native data.

    The values are those pydicom's native decoder gives (unused high bits cleared or sign-extended
    exactly as its ``correct_unused_bits``); only the Modality LUT is left to the caller.
    """
    try:
        with path.open("rb") as handle:
            ds = dcmread(handle, defer_size=1024)
            found = _text(ds, "SOPInstanceUID")
            layout = _native_dtype(ds)
            elem = ds.get_item(_PIXEL_DATA_TAG, keep_deferred=True)
            if layout is None or not isinstance(elem, RawDataElement) or elem.value_tell is None:
                return None
            dtype, unused_bits = layout
            count = rows * columns
            handle.seek(elem.value_tell)
            raw = handle.read(count * dtype.itemsize)
    except Exception as exc:  # pydicom raises several unrelated types on damaged files
        raise DicomInputError(f"cannot read DICOM file: {type(exc).__name__}: {exc}", path=path) from exc
    if found != sop_instance_uid:
        raise DicomInputError(
            f"file now holds SOPInstanceUID {found or '(none)'}, not the validated {sop_instance_uid}",
            path=path,
            tag=_tag("SOPInstanceUID"),
        )
    if len(raw) < count * dtype.itemsize:
        raise DicomInputError(
            f"pixel data has {len(raw)} bytes, {rows}x{columns} pixels need {count * dtype.itemsize}",
            path=path,
            tag=TAG_PIXEL_DATA,
        )
    frame = np.frombuffer(raw, dtype=dtype).reshape(rows, columns).astype(dtype.newbyteorder("="))
    if unused_bits:
        np.left_shift(frame, unused_bits, out=frame)
        np.right_shift(frame, unused_bits, out=frame)
    return frame, ds


def read_cross_sections(series: ImageSeries, slice_index: int, row_index: int, column_index: int) -> CrossSections:
    """The axial, coronal and sagittal planes through grid voxel (``slice_index``, ``row_index``,
    ``column_index``), with the values :func:`read_image_volume` would give there, without decoding
    the volume.

    Why: a preview needs three planes, and decoding and holding a 512 x 512 x 200 volume costs
    seconds and 100 MB for what is three slices' worth of pixels. Native (uncompressed) slices are
    read straight from their file at the pixel data's offset, and the Modality LUT (each slice's own
    rescale) is applied to the one row and one column kept, plus the whole axial slice; compressed
    slices are decoded in full (a codec cannot give a row alone) and cut. Missing grid slices are
    interpolated along the normal from their received neighbours exactly as :func:`read_image_volume`
    does. Each file is checked to still be the instance that was validated.

    Raises:
        ValueError: an index is outside the grid.
        DicomInputError: a slice is missing, replaced, or its pixel data cannot be read (named).
    """
    slices, rows, columns = series.geometry.shape
    for name, value, size in (
        ("slice", slice_index, slices),
        ("row", row_index, rows),
        ("column", column_index, columns),
    ):
        if not 0 <= value < size:
            raise ValueError(f"{name} index {value} is outside the grid's 0..{size - 1}")
    # the axial plane comes from its own slice, or from the two slices a missing one is blended from
    wanted = {slice_index} if slice_index not in series.missing_slices else set(series.received_neighbours(slice_index))
    frames: dict[int, FloatArray32] = {}
    coronal = np.empty((slices, columns), dtype=np.float32)
    sagittal = np.empty((slices, rows), dtype=np.float32)
    native_slices = not series.is_multiframe
    classic = zip(series.slice_indices, series.files, series.sop_instance_uids, strict=True) if native_slices else ()
    for k, values in [] if native_slices else _received_values(series):  # multi-frame: decoded frame by frame
        coronal[k] = values[row_index]
        sagittal[k] = values[:, column_index]
        if k in wanted:
            frames[k] = values.astype(np.float32)
    for k, path, sop_uid in classic:
        native = _read_native_frame(path, rows, columns, sop_uid)
        if native is None:
            values = _decode_slice(path, rows, columns, sop_uid)
            coronal[k] = values[row_index]
            sagittal[k] = values[:, column_index]
            if k in wanted:
                frames[k] = values.astype(np.float32)
            continue
        stored, header = native
        try:
            coronal[k] = apply_modality_lut(stored[row_index], header)
            sagittal[k] = apply_modality_lut(stored[:, column_index], header)
            if k in wanted:
                frames[k] = np.asarray(apply_modality_lut(stored, header), dtype=np.float32)
        except Exception as exc:  # a malformed Modality LUT or rescale
            raise DicomInputError(
                f"modality LUT cannot be applied: {type(exc).__name__}: {exc}", path=path, tag=TAG_PIXEL_DATA
            ) from exc
    for k in series.missing_slices:
        below, above = series.received_neighbours(k)
        weight = (k - below) / (above - below)
        coronal[k] = (1.0 - weight) * coronal[below] + weight * coronal[above]
        sagittal[k] = (1.0 - weight) * sagittal[below] + weight * sagittal[above]
    if slice_index in frames:
        axial = frames[slice_index]
    else:
        below, above = series.received_neighbours(slice_index)
        weight = (slice_index - below) / (above - below)
        axial = ((1.0 - weight) * frames[below] + weight * frames[above]).astype(np.float32)
    return CrossSections(slice_index, row_index, column_index, axial, coronal, sagittal)
