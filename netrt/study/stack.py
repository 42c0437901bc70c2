"""Stack geometry: read each slice's header and check that the slices form one regular grid."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from netrt.errors import StudyValidationError
from netrt.geometry import (
    ImageGeometry,
    SliceSpacingReport,
    check_slice_spacing,
    geometry_from_slices,
    orientation_vectors,
    slice_positions,
    spatial_order,
)
from netrt.study._common import (
    IMAGE_SOP_CLASSES,
    MAX_LISTED,
    MAX_MISSING_SLICES_PER_GAP,
    ORIENTATION_MATCH_TOLERANCE,
    PIXEL_SPACING_MATCH_TOLERANCE_MM,
    TAG_FRAME,
    TAG_IOP,
    TAG_IPP,
    FloatArray64,
    _listed,
    _numbers,
    _tag,
    _text,
    _uid_name,
)
from netrt.study.discovery import _Instance, _read_dataset
from netrt.study.multiframe import ENHANCED_SOP_CLASSES, is_enhanced, read_frame_geometry
from netrt.study.pixels import _check_pixel_data, _image_difference


@dataclass(frozen=True)
class _Slice:
    """The per-slice attributes that define the grid, read and checked from one file."""

    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    frame_of_reference_uid: str
    position: tuple[float, float, float]
    orientation: tuple[float, float, float, float, float, float]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    frame_number: int = 0  # 1-based frame of an enhanced multi-frame file; 0 for a classic slice

    @property
    def name(self) -> str:
        """How messages name the slice: the file, and the frame of a multi-frame file."""
        return f"{self.path.name} frame {self.frame_number}" if self.frame_number else self.path.name


def _read_slices(instance: _Instance) -> list[_Slice]:
    """The slices one image file holds: itself (classic), or each frame of an enhanced image.

    Raises:
        DicomInputError: unreadable or truncated file.
        StudyValidationError: unsupported SOP class, missing or malformed geometry tags or
            functional groups, no pixel data (each naming the file, tag and frame).
    """
    ds = _read_dataset(instance.path, defer_large_values=True)
    if is_enhanced(_text(ds, "SOPClassUID")):
        return _read_frames(instance, ds)
    return [_read_slice(instance, ds)]


def _read_frames(instance: _Instance, ds: Dataset) -> list[_Slice]:
    """Each frame of an enhanced multi-frame image as one slice (see :mod:`netrt.study.multiframe`)."""
    path = instance.path
    rows = int(_numbers(ds, "Rows", 1, path)[0])
    columns = int(_numbers(ds, "Columns", 1, path)[0])
    frames = read_frame_geometry(ds, path)
    frame = _text(ds, "FrameOfReferenceUID")
    if not frame:
        raise StudyValidationError("required attribute is missing or empty", path=path, tag=TAG_FRAME)
    _check_pixel_data(ds, path, rows, columns, frames=len(frames))
    return [
        _Slice(
            path=path,
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=_text(ds, "SOPClassUID"),
            modality=_text(ds, "Modality").upper(),
            frame_of_reference_uid=frame,
            position=f.position,
            orientation=f.orientation,
            rows=rows,
            columns=columns,
            pixel_spacing=f.pixel_spacing,
            slice_thickness=f.slice_thickness,
            frame_number=f.frame_number,
        )
        for f in frames
    ]


def _read_slice(instance: _Instance, ds: Dataset | None = None) -> _Slice:
    """Read and check the header of one image slice (pixel data deferred, not decoded).

    Raises:
        DicomInputError: unreadable or truncated file.
        StudyValidationError: unsupported SOP class, missing or malformed geometry tags, no pixel
            data (each naming the file and tag).
    """
    path = instance.path
    if ds is None:
        ds = _read_dataset(path, defer_large_values=True)
    sop_class = _text(ds, "SOPClassUID")
    if sop_class not in IMAGE_SOP_CLASSES:
        raise StudyValidationError(
            f"SOP class {_uid_name(sop_class) if sop_class else '(none)'} is not an image class NETRT can "
            f"stack (supported: {', '.join([*IMAGE_SOP_CLASSES.values(), *ENHANCED_SOP_CLASSES.values()])})",
            path=path,
            tag=_tag("SOPClassUID"),
        )
    rows = int(_numbers(ds, "Rows", 1, path)[0])
    columns = int(_numbers(ds, "Columns", 1, path)[0])
    position = _numbers(ds, "ImagePositionPatient", 3, path)
    orientation = _numbers(ds, "ImageOrientationPatient", 6, path)
    spacing = _numbers(ds, "PixelSpacing", 2, path)
    thickness = ds.get("SliceThickness")
    try:
        slice_thickness = float(thickness) if thickness not in (None, "") else None
    except (TypeError, ValueError):
        slice_thickness = None
    frame = _text(ds, "FrameOfReferenceUID")
    if not frame:
        raise StudyValidationError("required attribute is missing or empty", path=path, tag=TAG_FRAME)
    _check_pixel_data(ds, path, rows, columns)
    return _Slice(
        path=path,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=sop_class,
        modality=_text(ds, "Modality").upper(),
        frame_of_reference_uid=frame,
        position=(position[0], position[1], position[2]),
        orientation=(orientation[0], orientation[1], orientation[2], orientation[3], orientation[4], orientation[5]),
        rows=rows,
        columns=columns,
        pixel_spacing=(spacing[0], spacing[1]),
        slice_thickness=slice_thickness,
    )


def _check_same_frame(slices: list[_Slice], series_uid: str) -> str:
    counts = Counter(s.frame_of_reference_uid for s in slices)
    if len(counts) == 1:
        return slices[0].frame_of_reference_uid
    majority = counts.most_common(1)[0][0]
    odd = [s for s in slices if s.frame_of_reference_uid != majority]
    raise StudyValidationError(
        f"image series {series_uid} mixes frames of reference: {counts[majority]} files in {majority}, "
        f"{len(odd)} elsewhere ({_listed([f'{s.name}: {s.frame_of_reference_uid}' for s in odd])})",
        path=odd[0].path,
        tag=TAG_FRAME,
    )


def _frame(s: _Slice) -> str:
    """``frame N: `` for a frame of a multi-frame file (its path alone does not say which), else ""."""
    return f"frame {s.frame_number}: " if s.frame_number else ""


def _check_same_plane(slices: list[_Slice]) -> None:
    """One SOP class, orientation, matrix size and pixel spacing for every slice of the series."""
    first = slices[0]
    for s in slices[1:]:
        if s.sop_class_uid != first.sop_class_uid:
            raise StudyValidationError(
                f"{_frame(s)}SOP class {_uid_name(s.sop_class_uid)} differs from {first.name}'s "
                f"{_uid_name(first.sop_class_uid)} in the same series",
                path=s.path,
                tag=_tag("SOPClassUID"),
            )
        difference = float(np.max(np.abs(np.subtract(s.orientation, first.orientation))))
        if difference > ORIENTATION_MATCH_TOLERANCE:
            raise StudyValidationError(
                f"{_frame(s)}orientation {list(s.orientation)} differs from {first.name}'s {list(first.orientation)} "
                f"by up to {difference:.3g} (tolerance {ORIENTATION_MATCH_TOLERANCE}); a series must have one "
                "orientation",
                path=s.path,
                tag=TAG_IOP,
            )
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise StudyValidationError(
                f"{_frame(s)}{s.rows}x{s.columns} pixels, but {first.name} has {first.rows}x{first.columns}",
                path=s.path,
                tag=f"{_tag('Rows')}, {_tag('Columns')}",
            )
        if float(np.max(np.abs(np.subtract(s.pixel_spacing, first.pixel_spacing)))) > PIXEL_SPACING_MATCH_TOLERANCE_MM:
            raise StudyValidationError(
                f"{_frame(s)}pixel spacing {list(s.pixel_spacing)} mm differs from {first.name}'s "
                f"{list(first.pixel_spacing)} mm",
                path=s.path,
                tag=_tag("PixelSpacing"),
            )


@dataclass(frozen=True)
class _Grid:
    """The sorted slices of a series and the uniform grid they sit on (see :func:`_grid`)."""

    ordered: list[_Slice]
    geometry: ImageGeometry
    positions: tuple[float, ...]  # of the received slices, mm along the normal
    slice_indices: tuple[int, ...]  # grid slice of each received slice
    missing: tuple[int, ...]  # grid slices without a file
    warnings: list[str]


def _grid_indices(along: FloatArray64, report: SliceSpacingReport) -> tuple[npt.NDArray[np.intp], float] | None:
    """Grid slice of each sorted position and the grid step, if the only irregularity is missing slices.

    The grid runs from the first to the last position in the whole number of nominal spacings that
    fits between them (its step is that distance divided evenly, so both ends lie exactly on it, as
    for a complete series). The positions qualify when each lies within the spacing tolerance of a
    distinct grid slice and each interval is within tolerance of a whole number of steps: then the
    stack is a regular one with slices left out. Duplicates (two slices on one grid slice), spacing
    that is not a multiple of the nominal one and a stack without any gap do not qualify (None).
    """
    nominal, tolerance = report.nominal_spacing, report.tolerance
    if nominal <= tolerance:
        return None
    extent = float(along[-1] - along[0])
    count = round(extent / nominal) + 1
    if count < 2:
        return None
    step = extent / (count - 1)
    indices = np.rint((along - along[0]) / step).astype(np.intp)
    counts = np.diff(indices)
    if np.any(counts < 1) or not np.any(counts > 1):
        return None
    if float(np.max(np.abs(along - (along[0] + indices * step)))) > tolerance:
        return None
    if float(np.max(np.abs(np.diff(along) - counts * step))) > tolerance:
        return None
    return indices, step


def _grid(slices: list[_Slice], series_uid: str) -> _Grid:
    """Sort along the normal and build the uniform grid; missing slices are allowed, nothing else.

    A stack whose only irregularity is slices left out of a regular grid (:func:`_grid_indices`)
    is described on the full grid, with one warning per gap, as long as no gap lacks more than
    :data:`MAX_MISSING_SLICES_PER_GAP` slices; a bigger hole is refused as too large to fill
    safely. Any other non-uniform spacing (duplicates, uneven spacing, drift) is refused with the
    spacing report, because no uniform grid holds those slices without moving them, and a mask on
    a moved slice is a mask on the wrong anatomy.
    """
    first = slices[0]
    try:
        _, _, normal = orientation_vectors(first.orientation)
    except StudyValidationError as exc:
        raise StudyValidationError(exc.reason, path=first.path, tag=exc.tag) from exc
    positions = np.array([s.position for s in slices], dtype=np.float64)
    order = spatial_order(positions, first.orientation)
    ordered = [slices[int(i)] for i in order]
    along = slice_positions(positions, first.orientation)[order]
    ipp = positions[order]
    report = check_slice_spacing(along)
    indices: npt.NDArray[np.intp] = np.arange(len(ordered), dtype=np.intp)
    warnings: list[str] = []
    grid_positions = ipp
    if len(ordered) > 1 and not report.is_uniform:
        on_grid = _grid_indices(along, report)
        if on_grid is None:
            where = "; ".join(
                f"slice {gap.index} = {ordered[gap.index].name}, slice {gap.index + 1} = {ordered[gap.index + 1].name}"
                for gap in report.irregular[:3]
            )
            path = ordered[report.irregular[0].index + 1].path if report.irregular else first.path
            raise StudyValidationError(
                f"image series {series_uid}: {report.describe()}" + (f" (files: {where})" if where else ""),
                path=path,
                tag=TAG_IPP,
            )
        indices, step = on_grid
        warnings = _check_gaps(ordered, along, indices, step, series_uid)
        grid_positions = _grid_positions(ipp, along, indices, step, normal)
    try:
        geometry = geometry_from_slices(
            grid_positions,
            first.orientation,
            first.pixel_spacing,
            first.rows,
            first.columns,
            slice_thickness=first.slice_thickness,
        )
    except StudyValidationError as exc:
        raise StudyValidationError(f"image series {series_uid}: {exc.reason}", path=first.path, tag=exc.tag) from exc
    present = set(indices.tolist())
    missing = tuple(k for k in range(int(indices[-1]) + 1) if k not in present)
    return _Grid(ordered, geometry, tuple(float(p) for p in along), tuple(int(k) for k in indices), missing, warnings)


def _check_gaps(
    ordered: list[_Slice], along: FloatArray64, indices: npt.NDArray[np.intp], step: float, series_uid: str
) -> list[str]:
    """One warning per gap in the stack, or a refusal naming every gap too large to fill safely."""
    warnings: list[str] = []
    too_large: list[str] = []
    for k in np.flatnonzero(np.diff(indices) > 1).tolist():
        lacking = int(indices[k + 1] - indices[k]) - 1
        before, after = ordered[k], ordered[k + 1]
        gap = (
            f"gap of {float(along[k + 1] - along[k]):.3f} mm between {before.name} at {float(along[k]):.3f} mm "
            f"and {after.name} at {float(along[k + 1]):.3f} mm along the slice normal"
        )
        if lacking > MAX_MISSING_SLICES_PER_GAP:
            too_large.append(f"{gap}: {lacking} slices missing")
            continue
        filled = ", ".join(f"{float(along[k]) + step * (j + 1):.3f}" for j in range(lacking))
        warnings.append(
            f"image series {series_uid}: {gap}; {lacking} missing slice(s) at {filled} mm filled by interpolation "
            f"(images linearly, the mask by shape) onto the uniform {step:.4g} mm grid; the axial output holds only "
            "the received slices"
        )
    if too_large:
        first_gap = int(np.flatnonzero(np.diff(indices) > MAX_MISSING_SLICES_PER_GAP + 1)[0])
        raise StudyValidationError(
            f"image series {series_uid}: slices are missing and the gap is too large to fill safely by "
            f"interpolation (at most {MAX_MISSING_SLICES_PER_GAP} missing slices per gap at the nominal spacing "
            f"{step:.4g} mm; more would invent anatomy): "
            + "; ".join(too_large[:MAX_LISTED])
            + (f"; and {len(too_large) - MAX_LISTED} more" if len(too_large) > MAX_LISTED else ""),
            path=ordered[first_gap + 1].path,
            tag=TAG_IPP,
        )
    return warnings


def _grid_positions(
    ipp: FloatArray64, along: FloatArray64, indices: npt.NDArray[np.intp], step: float, normal: FloatArray64
) -> FloatArray64:
    """An IPP for every grid slice, for :func:`geometry_from_slices` to build and check the grid from.

    Received slices keep their in-plane position and are moved along the normal onto the grid (by
    at most the spacing tolerance), so the shear check still sees exactly where each received slice
    is; a missing slice takes the in-plane position interpolated between its neighbours, which
    adds no drift of its own.
    """
    moved = ipp + np.outer(along[0] + indices * step - along, normal)
    grid = np.arange(int(indices[-1]) + 1, dtype=np.float64)
    out: FloatArray64 = np.column_stack([np.interp(grid, indices, moved[:, axis]) for axis in range(3)])
    return out


def _instances(
    ordered: list[_Slice],
) -> tuple[tuple[Path, ...], tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    """Files, SOP instance UIDs, slice files and frame numbers of :class:`ImageSeries` for sorted slices.

    Classic slices: one file per slice, no slice files or frame numbers. Frames of multi-frame
    files: each file once (in the order its first frame comes), and per slice its file's index
    and its frame number.
    """
    if not any(s.frame_number for s in ordered):
        return tuple(s.path for s in ordered), tuple(s.sop_instance_uid for s in ordered), (), ()
    index: dict[Path, int] = {}
    uids: list[str] = []
    for s in ordered:
        if s.path not in index:
            index[s.path] = len(index)
            uids.append(s.sop_instance_uid)
    return tuple(index), tuple(uids), tuple(index[s.path] for s in ordered), tuple(s.frame_number for s in ordered)


def _image_members(instances: list[_Instance]) -> tuple[list[_Instance], list[str]]:
    """The instances of the image series that are slices of the volume, and warnings for the rest.

    Set aside (kept in ``other_files``, reported): a second file with the SOPInstanceUID of one
    already taken when it holds the same image (the same image received twice; the first by path
    is used), localizer images (a scout in the axial series is not a slice of the stack), and
    RTSTRUCTs mistakenly given the image series' SeriesInstanceUID.

    Raises:
        StudyValidationError: two files carry one SOPInstanceUID but hold different images (see
            :func:`_image_difference`): which one the contours were drawn on cannot be known.
    """
    seen: dict[str, _Instance] = {}
    copies: list[str] = []
    localizers: list[str] = []
    for inst in sorted(instances, key=lambda i: str(i.path)):
        if inst.is_rtstruct:
            continue
        if inst.is_localizer:
            localizers.append(inst.path.name)
        elif inst.sop_instance_uid in seen:
            first = seen[inst.sop_instance_uid].path
            differences = _image_difference(first, inst.path)
            if differences:
                raise StudyValidationError(
                    f"{first.name} and {inst.path.name} both carry SOPInstanceUID {inst.sop_instance_uid} but hold "
                    f"different images ({differences} differ); cannot tell which one is the real instance, so "
                    "neither is used in its place: remove the wrong one and retry",
                    path=inst.path,
                    tag=_tag("SOPInstanceUID"),
                )
            copies.append(inst.path.name)
        else:
            seen[inst.sop_instance_uid] = inst
    warnings = []
    if copies:
        warnings.append(
            f"{len(copies)} file(s) repeat an image already in the series and were not used: {_listed(copies)}"
        )
    if localizers:
        warnings.append(f"{len(localizers)} localizer image(s) in the series were not used: {_listed(localizers)}")
    return list(seen.values()), warnings
