"""Hardening, part 1 and 4 (issue 10): a corpus of bad and awkward studies, each with its documented outcome.

Every case is built by editing a copy of one small phantom (64 x 48 pixels of 4 mm, 12 slices),
or of the real MIM export in ../shared/data, and run through the same steps the process-study
flow runs (:mod:`netrt.pipeline`, called directly: fast). The outcome is one of

* ``processed``: no warning, every overlay series written (and, where the case changes nothing
  the mask depends on, the very mask of the clean phantom);
* ``warning``: processed, and the run summary's warnings name the cause;
* ``quarantined``: a :class:`netrt.errors.NetrtError` whose message (the quarantine reason) names
  the cause (file, tag, ROI).

Anything else (another exception type, a file neither used nor named) fails the case: never an
unhandled exception, never a silent drop. The inputs must come out byte-identical.

A representative few run through the real flow (a temporary Prefect server) with full
anonymization on, to check reason.json, the run summary and every log line for the cause and for
the absence of patient data and received UIDs (part 4). HARDENING.md lists the same cases.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless, generate_uid

from netrt.config import AnonymizationConfig, ProcessingConfig
from netrt.errors import NetrtError
from netrt.layout import DataLayout
from netrt.phantom import PhantomManifest, PhantomSpec, write_phantom
from netrt.pipeline import compute_mask, load_mask, pass_through_step, write_plane
from netrt.study import NoStructureSetError, find_images_only, find_studies, load_found_study
from tests.conftest import require_shared, require_tool

SPEC = PhantomSpec(rows=64, columns=48, pixel_spacing=(4.0, 4.0), slice_spacing=4.0, slices=12, seed=11)
SECRET_NAME, SECRET_ID = "SECRETNAME^GIVEN", "PID-778899"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"


# ------------------------------------------------------------------------------------------
# Running a folder the way the flow does, without Prefect
# ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one study of a folder."""

    kind: str  # "processed" | "warning" | "quarantined"
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    mask: npt.NDArray[np.bool_] | None = None
    used: set[Path] = field(default_factory=set)  # input files that fed the outputs
    written: dict[str, int] = field(default_factory=dict)  # plane -> instances
    received_slices: int = 0
    sop_classes: set[str] = field(default_factory=set)


def run_folder(folder: Path, processing: ProcessingConfig, work: Path) -> list[Outcome]:
    """Every study under ``folder`` through validate -> mask -> write, as flows/process_study.py runs them.

    Only NetrtError counts as a handled failure (the flow quarantines on it); anything else
    propagates and fails the test.
    """
    outcomes = []
    for found in find_studies(folder):
        uid = found.study_instance_uid
        try:
            study = load_found_study(folder, uid)
        except NoStructureSetError as exc:
            if processing.images_without_rtstruct != "pass_through":
                outcomes.append(Outcome("quarantined", reason=str(exc)))
                continue
            images = find_images_only(folder, uid)
            passed = pass_through_step(images, AnonymizationConfig(enabled=False), b"", work / uid / "pass-through")
            outcomes.append(
                Outcome(
                    "warning",
                    warnings=list(passed.warnings),
                    used=set(images.files),
                    written={"pass-through": len(passed.files)},
                )
            )
            continue
        except NetrtError as exc:
            outcomes.append(Outcome("quarantined", reason=str(exc)))
            continue
        try:
            masks = compute_mask(study, processing, work / uid)
            written = [
                s for plane in processing.planes for s in write_plane(study, masks, plane, processing, work / uid)
            ]
        except NetrtError as exc:
            outcomes.append(Outcome("quarantined", reason=str(exc)))
            continue
        warnings = [*study.warnings, *masks.warnings]
        outcomes.append(
            Outcome(
                "warning" if warnings else "processed",
                warnings=warnings,
                mask=load_mask(masks.mask_path),
                used={*study.images.files, study.rtstruct_file},
                written={f"{s.plane}{'-burn-in' if s.burn_in else ''}": len(s.files) for s in written},
                received_slices=len(study.images.files),
                sop_classes={str(pydicom.dcmread(s.files[0], stop_before_pixels=True).SOPClassUID) for s in written},
            )
        )
    if not outcomes:
        raise AssertionError(f"no study found under {folder}: a corpus case must yield an outcome")
    return outcomes


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------
# Editing tools (test setup only; they write copies in tmp_path)
# ------------------------------------------------------------------------------------------


def edit(path: Path, change: Callable[[Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def slices(folder: Path) -> list[Path]:
    """The phantom's CT files, in spatial order (its InstanceNumber order)."""
    return sorted(folder.glob("CT_*.dcm"))


def write_raw(path: Path, meta_syntax: str, implicit: bool, *, preamble: bool = True, meta: bool = True) -> None:
    """Re-encode a file with the data set in ``implicit``/explicit VR and ``meta_syntax`` in its file meta,
    whether they agree or not (what a careless sender writes)."""
    ds = pydicom.dcmread(path)
    buffer = DicomBytesIO()
    if preamble:
        buffer.write(b"\0" * 128 + b"DICM")
    if meta:
        ds.file_meta.TransferSyntaxUID = meta_syntax
        write_file_meta_info(buffer, ds.file_meta, enforce_standard=True)
    buffer.is_little_endian = True
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, ds)
    path.write_bytes(buffer.getvalue())


def contours(ds: Dataset, roi_number: int) -> DicomSequence:
    (item,) = [rc for rc in ds.ROIContourSequence if int(rc.ReferencedROINumber) == roi_number]
    sequence: DicomSequence = item.ContourSequence
    return sequence


def roi_number(ds: Dataset, name: str) -> int:
    return next(int(item.ROINumber) for item in ds.StructureSetROISequence if item.ROIName == name)


def points_of(contour: Dataset) -> npt.NDArray[np.float64]:
    return np.asarray([float(v) for v in contour.ContourData]).reshape(-1, 3)


def set_points(contour: Dataset, points: npt.NDArray[np.float64]) -> None:
    contour.ContourData = [f"{v:.4f}" for v in points.ravel()]
    contour.NumberOfContourPoints = len(points)


def on_rois(name: str, change: Callable[[Dataset, int], None]) -> Callable[[Path, Corpus], None]:
    """A case that edits the contours of ROI ``name`` in RS.dcm."""

    def build(folder: Path, corpus: Corpus) -> None:
        edit(folder / "RS.dcm", lambda ds: change(ds, roi_number(ds, name)))

    return build


def add_roi(ds: Dataset, name: str, items: list[Dataset] | None) -> None:
    """Append ROI ``name`` (number 90+) with the given contour items (None: no ContourSequence at all)."""
    number = 90 + len(ds.StructureSetROISequence)
    roi = copy.deepcopy(ds.StructureSetROISequence[0])
    roi.ROINumber, roi.ROIName = number, name
    ds.StructureSetROISequence.append(roi)
    item = Dataset()
    item.ROIDisplayColor = [255, 255, 0]
    item.ReferencedROINumber = number
    if items is not None:
        item.ContourSequence = DicomSequence(items)
    ds.ROIContourSequence.append(item)
    observation = copy.deepcopy(ds.RTROIObservationsSequence[0])
    observation.ObservationNumber = observation.ReferencedROINumber = number
    ds.RTROIObservationsSequence.append(observation)


def remove_slices(folder: Path, indices: list[int]) -> None:
    """Delete slices as if never sent; the RTSTRUCT stops referencing them (else: absent-image refusal)."""
    files = slices(folder)
    gone = {str(pydicom.dcmread(files[k], stop_before_pixels=True).SOPInstanceUID) for k in indices}
    for k in indices:
        files[k].unlink()

    def drop(ds: Dataset) -> None:
        series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        series.ContourImageSequence = [i for i in series.ContourImageSequence if i.ReferencedSOPInstanceUID not in gone]
        for roi in ds.ROIContourSequence:
            roi.ContourSequence = [
                c for c in roi.ContourSequence if c.ContourImageSequence[0].ReferencedSOPInstanceUID not in gone
            ]

    edit(folder / "RS.dcm", drop)


def retag_images(folder: Path, sop_class: str, change: Callable[[Dataset], None]) -> None:
    """Turn the CT series into another modality: SOP class, modality attributes, RTSTRUCT references."""

    def image(ds: Dataset) -> None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        for keyword in ("KVP", "ConvolutionKernel", "RescaleType", "ExposureTime", "XRayTubeCurrent", "Exposure"):
            if keyword in ds:
                delattr(ds, keyword)
        stored = np.frombuffer(ds.PixelData, "<i2").astype(np.int32)
        ds.PixelRepresentation = 0
        ds.PixelData = np.clip(stored, 0, 65535).astype("<u2").tobytes()
        change(ds)

    for path in slices(folder):
        edit(path, image)

    def references(ds: Dataset) -> None:
        series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
        for item in series.ContourImageSequence:
            item.ReferencedSOPClassUID = sop_class
        for roi in ds.ROIContourSequence:
            for contour in roi.ContourSequence:
                for item in contour.ContourImageSequence:
                    item.ReferencedSOPClassUID = sop_class

    edit(folder / "RS.dcm", references)


# ------------------------------------------------------------------------------------------
# The corpus
# ------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Shared, never edited: the clean phantom, a second study, an oblique phantom."""

    clean: PhantomManifest
    other: PhantomManifest
    oblique: PhantomManifest
    work: Path


def b_truncated_slice(folder: Path, corpus: Corpus) -> None:
    path = slices(folder)[6]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def b_truncated_rtstruct(folder: Path, corpus: Corpus) -> None:
    data = (folder / "RS.dcm").read_bytes()
    (folder / "RS.dcm").write_bytes(data[: len(data) * 2 // 3])


def b_no_preamble_no_meta(folder: Path, corpus: Corpus) -> None:
    write_raw(slices(folder)[3], "1.2.840.10008.1.2", implicit=True, preamble=False, meta=False)


def b_stray_file(folder: Path, corpus: Corpus) -> None:
    (folder / "notes.txt").write_text("sent by mistake\n")


def b_unknown_syntax(folder: Path, corpus: Corpus) -> None:
    edit(slices(folder)[3], lambda ds: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.3.4.5"))


def b_explicit_label_implicit_data(folder: Path, corpus: Corpus) -> None:
    write_raw(slices(folder)[3], "1.2.840.10008.1.2.1", implicit=True)


def b_implicit_label_explicit_data(folder: Path, corpus: Corpus) -> None:
    write_raw(slices(folder)[3], "1.2.840.10008.1.2", implicit=False)


def b_compressed_label_native_data(folder: Path, corpus: Corpus) -> None:
    write_raw(slices(folder)[5], JPEG2000Lossless, implicit=False)


def b_big_endian_label(folder: Path, corpus: Corpus) -> None:
    write_raw(slices(folder)[3], "1.2.840.10008.1.2.2", implicit=False)


def _duplicate(folder: Path, source: int, change: Callable[[Dataset], None] | None) -> None:
    """zz_copy.dcm carries the SOPInstanceUID of slice 3, with the content of slice ``source`` (changed)."""
    files = slices(folder)
    sop = str(pydicom.dcmread(files[3], stop_before_pixels=True).SOPInstanceUID)
    copy_path = folder / "zz_copy.dcm"
    shutil.copy(files[source], copy_path)

    def retag(ds: Dataset) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        if change is not None:
            change(ds)

    edit(copy_path, retag)


def b_duplicate_other_position(folder: Path, corpus: Corpus) -> None:
    _duplicate(folder, 4, None)


def b_duplicate_other_pixels(folder: Path, corpus: Corpus) -> None:
    def brighter(ds: Dataset) -> None:
        ds.PixelData = (np.frombuffer(ds.PixelData, "<i2") + 100).astype("<i2").tobytes()

    _duplicate(folder, 3, brighter)


def b_duplicate_same_image(folder: Path, corpus: Corpus) -> None:
    shutil.copy(slices(folder)[3], folder / "zz_copy.dcm")


def b_duplicate_same_image_recompressed(folder: Path, corpus: Corpus) -> None:
    shutil.copy(slices(folder)[3], folder / "zz_copy.dcm")
    edit(folder / "zz_copy.dcm", lambda ds: ds.compress(RLELossless, generate_instance_uid=False))


def b_two_studies(folder: Path, corpus: Corpus) -> None:
    for path in sorted((corpus.other.out_dir / "dicom").iterdir()):
        shutil.copy(path, folder / f"other_{path.name}")


def b_images_never_arrive(folder: Path, corpus: Corpus) -> None:
    for path in slices(folder)[4:6]:
        path.unlink()


def b_rtstruct_only(folder: Path, corpus: Corpus) -> None:
    for path in slices(folder):
        path.unlink()


def b_images_only(folder: Path, corpus: Corpus) -> None:
    (folder / "RS.dcm").unlink()


def _shift(dx: float) -> Callable[[Dataset, int], None]:
    def change(ds: Dataset, number: int) -> None:
        for contour in contours(ds, number):
            set_points(contour, points_of(contour) + np.array([dx, 0.0, 0.0]))

    return change


def _between_slices(ds: Dataset, number: int) -> None:
    first = contours(ds, number)[0]
    set_points(first, points_of(first) + np.array([0.0, 0.0, SPEC.slice_spacing / 2]))


def _open(ds: Dataset, number: int) -> None:
    contours(ds, number)[0].ContourGeometricType = "OPEN_PLANAR"


def _few_points(ds: Dataset, number: int) -> None:
    first, second = contours(ds, number)[:2]
    set_points(first, points_of(first)[:2])
    set_points(second, points_of(second)[:1])


def _self_intersecting(ds: Dataset, number: int) -> None:
    first = contours(ds, number)[0]
    points = points_of(first)
    x, y, z = points[:, 0].mean(), points[:, 1].mean(), points[0, 2]
    bow_tie = np.array([[x - 10, y - 10, z], [x + 10, y + 10, z], [x + 10, y - 10, z], [x - 10, y + 10, z]])
    set_points(first, bow_tie)


def b_point_roi(folder: Path, corpus: Corpus) -> None:
    def change(ds: Dataset) -> None:
        marker = copy.deepcopy(contours(ds, roi_number(ds, "box"))[0])
        marker.ContourGeometricType = "POINT"
        set_points(marker, points_of(marker)[:1])
        add_roi(ds, "marker", [marker])

    edit(folder / "RS.dcm", change)


def b_empty_roi(folder: Path, corpus: Corpus) -> None:
    edit(folder / "RS.dcm", lambda ds: add_roi(ds, "planned_later", None))


def _rename(name: str, charset: str) -> Callable[[Path, Corpus], None]:
    def build(folder: Path, corpus: Corpus) -> None:
        def change(ds: Dataset) -> None:
            ds.SpecificCharacterSet = charset
            ds.StructureSetROISequence[0].ROIName = name

        edit(folder / "RS.dcm", change)

    return build


def b_oblique(folder: Path, corpus: Corpus) -> None:
    for path in list(folder.iterdir()):
        path.unlink()
    for path in (corpus.oblique.out_dir / "dicom").iterdir():
        shutil.copy(path, folder / path.name)


def b_gantry_tilt(folder: Path, corpus: Corpus) -> None:
    """Tilted image planes, slices still stacked along the table (z): a sheared stack."""
    tilt = math.radians(15)
    for path in slices(folder):
        edit(
            path,
            lambda ds: setattr(
                ds, "ImageOrientationPatient", [1, 0, 0, 0, f"{math.cos(tilt):.6f}", f"{-math.sin(tilt):.6f}"]
            ),
        )


def b_uneven_spacing(folder: Path, corpus: Corpus) -> None:
    def move(ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, f"{z + 1.3:.4f}"]

    for path in slices(folder)[7:]:
        edit(path, move)


def b_one_missing_slice(folder: Path, corpus: Corpus) -> None:
    remove_slices(folder, [6])


def b_three_missing_slices(folder: Path, corpus: Corpus) -> None:
    remove_slices(folder, [5, 6, 7])


def _second_rtstruct(folder: Path, newer: bool) -> None:
    shutil.copy(folder / "RS.dcm", folder / "RS_v2.dcm")

    def change(ds: Dataset) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if newer:
            ds.StructureSetTime = "235959"

    edit(folder / "RS_v2.dcm", change)


def b_two_rtstructs(folder: Path, corpus: Corpus) -> None:
    _second_rtstruct(folder, newer=True)


def b_two_rtstructs_equally_new(folder: Path, corpus: Corpus) -> None:
    _second_rtstruct(folder, newer=False)


def b_mr(folder: Path, corpus: Corpus) -> None:
    def mr(ds: Dataset) -> None:
        ds.Modality = "MR"
        for keyword in ("RescaleIntercept", "RescaleSlope"):
            delattr(ds, keyword)
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime, ds.MagneticFieldStrength = "2D", 10, 500, 1.5

    retag_images(folder, MR_IMAGE_STORAGE, mr)


def b_pet(folder: Path, corpus: Corpus) -> None:
    def pet(ds: Dataset) -> None:
        ds.Modality, ds.Units, ds.RescaleIntercept = "PT", "BQML", 0
        ds.RescaleSlope = f"{0.5 + 0.1 * int(ds.InstanceNumber):.3f}"  # differs per slice, as PET's does

    retag_images(folder, PET_IMAGE_STORAGE, pet)


def _compressed(syntax: str) -> Callable[[Path, Corpus], None]:
    def build(folder: Path, corpus: Corpus) -> None:
        for path in slices(folder):
            if syntax == JPEGLosslessSV1:
                out = path.with_suffix(".tmp")
                subprocess.run([require_tool("dcmcjpeg"), "+e1", str(path), str(out)], check=True, capture_output=True)
                out.replace(path)
            else:
                edit(path, lambda ds: ds.compress(syntax, generate_instance_uid=False))

    return build


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path, Corpus], None]
    outcome: str  # "processed" | "warning" | "quarantined"
    expect: tuple[str, ...] = ()  # in the reason (quarantined) or in the warnings (warning)
    processing: dict[str, Any] = field(default_factory=dict)
    same_mask: bool = False  # the merged mask must equal the clean phantom's
    studies: int = 1


CASES = [
    Case("truncated-slice", b_truncated_slice, "quarantined", ("CT_0007.dcm", "truncated")),
    Case("truncated-rtstruct", b_truncated_rtstruct, "quarantined", ("RS.dcm", "truncated")),
    Case(
        "no-preamble-or-file-meta",
        b_no_preamble_no_meta,
        "quarantined",
        ("CT_0004.dcm", "without the Part 10 file header", "dcmconv", "absent"),
    ),
    Case("stray-non-dicom-file", b_stray_file, "warning", ("notes.txt", "not usable DICOM"), same_mask=True),
    Case(
        "unknown-transfer-syntax",
        b_unknown_syntax,
        "quarantined",
        ("CT_0004.dcm", "(0002,0010)", "unknown transfer syntax 1.2.3.4.5"),
    ),
    Case(
        "wrong-syntax-explicit-label-implicit-data",
        b_explicit_label_implicit_data,
        "quarantined",
        ("CT_0004.dcm", "wrong transfer syntax", "implicit VR"),
    ),
    Case(
        "wrong-syntax-implicit-label-explicit-data",
        b_implicit_label_explicit_data,
        "quarantined",
        ("CT_0004.dcm", "wrong transfer syntax", "explicit VR"),
    ),
    Case(
        "wrong-syntax-jpeg2000-label-native-pixels",
        b_compressed_label_native_data,
        "quarantined",
        ("CT_0006.dcm", "requires encapsulated pixel data"),
    ),
    Case("wrong-syntax-big-endian-label", b_big_endian_label, "quarantined", ("CT_0004.dcm", "not usable DICOM")),
    Case(
        "duplicate-sop-uid-other-position",
        b_duplicate_other_position,
        "quarantined",
        ("CT_0004.dcm", "zz_copy.dcm", "different images", "ImagePositionPatient"),
    ),
    Case("duplicate-sop-uid-other-pixels", b_duplicate_other_pixels, "quarantined", ("zz_copy.dcm", "PixelData")),
    Case(
        "duplicate-sop-uid-same-image",
        b_duplicate_same_image,
        "warning",
        ("zz_copy.dcm", "repeat an image"),
        same_mask=True,
    ),
    Case(
        "duplicate-sop-uid-same-image-recompressed",
        b_duplicate_same_image_recompressed,
        "warning",
        ("zz_copy.dcm", "repeat an image"),
        same_mask=True,
    ),
    Case("two-studies-interleaved-in-one-folder", b_two_studies, "processed", studies=2),
    Case(
        "rtstruct-references-images-that-never-arrive",
        b_images_never_arrive,
        "quarantined",
        ("RS.dcm", "references 2 image(s) absent"),
    ),
    Case(
        "rtstruct-only",
        b_rtstruct_only,
        "quarantined",
        ("RS.dcm", "not in this study", "image series in the study: none"),
    ),
    Case("images-only-quarantine", b_images_only, "quarantined", ("no RTSTRUCT in study",)),
    Case(
        "images-only-pass-through",
        b_images_only,
        "warning",
        ("no RTSTRUCT", "passed through without an overlay"),
        processing={"images_without_rtstruct": "pass_through"},
    ),
    Case(
        "contours-outside-the-image",
        on_rois("sphere", _shift(1000.0)),
        "warning",
        ("ROI 'sphere'", "outside the image", "mask is empty"),
    ),
    Case("contours-partly-outside-the-image", on_rois("box", _shift(60.0)), "processed"),
    Case(
        "contour-between-slices",
        on_rois("sphere", _between_slices),
        "warning",
        ("ROI 'sphere': contour 0 skipped", "between slices"),
    ),
    Case("open-contour", on_rois("sphere", _open), "warning", ("ROI 'sphere': contour 0 skipped", "OPEN_PLANAR")),
    Case(
        "contours-with-1-and-2-points", on_rois("sphere", _few_points), "warning", ("has 2 point(s)", "has 1 point(s)")
    ),
    Case("self-intersecting-contour", on_rois("sphere", _self_intersecting), "processed"),
    Case("point-roi", b_point_roi, "warning", ("ROI 'marker'", "POINT contour marks a location", "mask is empty")),
    Case("empty-roi", b_empty_roi, "warning", ("ROI 'planned_later'", "mask is empty")),
    Case("non-ascii-roi-name-latin1", _rename("Tumör_Gehirn", "ISO_IR 100"), "processed", same_mask=True),
    # The overlay copies of the Latin-1 images are re-declared UTF-8 (tests/test_overlay.py checks the label).
    Case("non-ascii-roi-name-utf8", _rename("腫瘍_Ωmega", "ISO_IR 192"), "processed", same_mask=True),
    Case("oblique-series", b_oblique, "processed"),
    Case("gantry-tilt", b_gantry_tilt, "quarantined", ("(0020,0032) ImagePositionPatient", "gantry-tilted or sheared")),
    Case(
        "non-uniform-slice-spacing",
        b_uneven_spacing,
        "quarantined",
        ("(0020,0032) ImagePositionPatient", "CT_0008.dcm"),
    ),
    Case("one-missing-slice", b_one_missing_slice, "warning", ("missing slice", "filled by interpolation")),
    Case("three-missing-slices", b_three_missing_slices, "quarantined", ("gap is too large",)),
    Case(
        "two-rtstructs-for-one-series",
        b_two_rtstructs,
        "warning",
        ("2 RTSTRUCTs reference image series", "using the newest", "RS_v2.dcm"),
    ),
    Case("two-rtstructs-equally-new", b_two_rtstructs_equally_new, "quarantined", ("equally new", "RS_v2.dcm")),
    Case("mr-series", b_mr, "processed"),
    Case("pet-series", b_pet, "processed"),
    Case("jpeg-lossless", _compressed(JPEGLosslessSV1), "processed", processing={"burn_in": True}, same_mask=True),
    Case("jpeg-2000", _compressed(JPEG2000Lossless), "processed", processing={"burn_in": True}, same_mask=True),
    Case("rle", _compressed(RLELossless), "processed", processing={"burn_in": True}, same_mask=True),
]


#: Axial (the received images with the overlay) and one reformatted plane: every code path, less I/O.
CASE_PROCESSING: dict[str, Any] = {"planes": ["axial", "sagittal"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus")
    return Corpus(
        clean=write_phantom(SPEC, root / "clean"),
        other=write_phantom(PhantomSpec(**{**SPEC.__dict__, "seed": 12, "patient_id": "OTHER-2"}), root / "other"),
        oblique=write_phantom(PhantomSpec(**{**SPEC.__dict__, "orientation": "oblique"}), root / "oblique"),
        work=root / "work",
    )


@pytest.fixture(scope="module")
def clean_mask(corpus: Corpus) -> npt.NDArray[np.bool_]:
    (outcome,) = run_folder(corpus.clean.out_dir / "dicom", ProcessingConfig(), corpus.work / "clean")
    assert outcome.kind == "processed" and outcome.mask is not None and outcome.mask.sum() > 500
    return outcome.mask


def check(case: Case, folder: Path, outcomes: list[Outcome], clean: npt.NDArray[np.bool_] | None) -> None:
    assert len(outcomes) == case.studies
    text = {"quarantined": lambda o: o.reason, "warning": lambda o: " | ".join(o.warnings)}
    for outcome in outcomes:
        assert outcome.kind == case.outcome, (
            f"{case.id}: {outcome.kind}, expected {case.outcome}: {outcome.reason or outcome.warnings}"
        )
        if case.outcome in text:
            shown = text[case.outcome](outcome)
            for needle in case.expect:
                assert needle in shown, f"{case.id}: {needle!r} not in {shown!r}"
        if outcome.kind == "quarantined":
            continue
        for plane, count in outcome.written.items():
            assert count > 0, f"{case.id}: {plane} series is empty"
            if plane.startswith("axial"):
                assert count == outcome.received_slices
        if case.same_mask:
            assert outcome.mask is not None and clean is not None
            np.testing.assert_array_equal(outcome.mask, clean, err_msg=f"{case.id}: mask differs from the clean run")
    # Never a silent drop: every input file fed an output, or the run summary names it.
    if all(o.kind != "quarantined" for o in outcomes):
        used = set().union(*(o.used for o in outcomes))
        named = " | ".join(w for o in outcomes for w in o.warnings)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            assert path in used or path.name in named, f"{case.id}: {path.name} neither used nor named in the summary"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus_case(case: Case, corpus: Corpus, clean_mask: npt.NDArray[np.bool_], tmp_path: Path) -> None:
    folder = tmp_path / "study"
    shutil.copytree(corpus.clean.out_dir / "dicom", folder)
    case.build(folder, corpus)
    before = snapshot(folder)
    processing = ProcessingConfig(**{**CASE_PROCESSING, **case.processing})
    outcomes = run_folder(folder, processing, tmp_path / "work")
    assert snapshot(folder) == before, f"{case.id}: the input was changed"
    check(case, folder, outcomes, clean_mask)


def test_modality_of_mr_and_pet_outputs_follows_the_input(corpus: Corpus, tmp_path: Path) -> None:
    """The axial overlay series of an MR or PET study are MR / PET images (copies of the received ones)."""
    for build, sop_class in ((b_mr, MR_IMAGE_STORAGE), (b_pet, PET_IMAGE_STORAGE)):
        folder = tmp_path / sop_class
        shutil.copytree(corpus.clean.out_dir / "dicom", folder)
        build(folder, corpus)
        (outcome,) = run_folder(folder, ProcessingConfig(planes=["axial"]), tmp_path / "work")
        assert outcome.kind == "processed" and outcome.sop_classes == {sop_class}


def test_real_mim_export_is_processed(tmp_path: Path) -> None:
    """The real export in ../shared/data (GE CT, MIM RTSTRUCT): processed, contours on 3 of its 5 slices."""
    source = require_shared("rtutils-mim-ge-phantom")
    folder = tmp_path / "mim"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.txt", "*.md"))
    outcomes = run_folder(folder, ProcessingConfig(reformat_spacing_mm=2.0), tmp_path / "work")
    assert [o.kind for o in outcomes] in (["processed"], ["warning"]), outcomes[0].reason
    (outcome,) = outcomes
    assert outcome.mask is not None and outcome.mask.shape == (5, 512, 512)
    assert int(outcome.mask.any(axis=(1, 2)).sum()) == 3
    assert outcome.written["axial"] == 5


# ------------------------------------------------------------------------------------------
# A 1000-slice series (32 x 32 pixels, so the test stays fast)
# ------------------------------------------------------------------------------------------


def thousand_slices(folder: Path, template: PhantomManifest) -> tuple[int, int]:
    """1000 CT slices 1 mm apart cloned from a phantom slice, an RTSTRUCT with one 40 x 40 mm square
    on slices 300-699; returns (slices, expected mask voxels)."""
    folder.mkdir()
    first = pydicom.dcmread(template.image_files[0])
    series_uid, count, rows = generate_uid(), 1000, 32
    sop_uids = [generate_uid() for _ in range(count)]
    first.Rows = first.Columns = rows
    first.PixelSpacing = [4, 4]
    first.SeriesInstanceUID = series_uid
    first.PixelData = np.full((rows, rows), 1000, "<i2").tobytes()
    for keyword in ("SliceLocation",):
        if keyword in first:
            delattr(first, keyword)
    for k, sop in enumerate(sop_uids):
        first.SOPInstanceUID = first.file_meta.MediaStorageSOPInstanceUID = sop
        first.InstanceNumber = k + 1
        first.ImagePositionPatient = [-62, -62, k * 1.0]
        first.save_as(folder / f"CT_{k + 1:04d}.dcm", enforce_file_format=True)

    rs = pydicom.dcmread(template.rtstruct_file)
    series = rs.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    series.SeriesInstanceUID = series_uid
    template_image = series.ContourImageSequence[0]
    images = []
    for sop in sop_uids:
        item = copy.deepcopy(template_image)
        item.ReferencedSOPInstanceUID = sop
        images.append(item)
    series.ContourImageSequence = DicomSequence(images)
    number = int(rs.StructureSetROISequence[0].ROINumber)
    rs.StructureSetROISequence = DicomSequence([rs.StructureSetROISequence[0]])
    rs.StructureSetROISequence[0].ROIName = "square"
    rs.RTROIObservationsSequence = DicomSequence([rs.RTROIObservationsSequence[0]])
    roi = rs.ROIContourSequence[0]
    roi.ReferencedROINumber = number
    template_contour = roi.ContourSequence[0]
    items = []
    for k in range(300, 700):
        contour = copy.deepcopy(template_contour)
        contour.ContourImageSequence[0].ReferencedSOPInstanceUID = sop_uids[k]
        # columns 5..14 and rows 5..14 (pixel centres at -62 + 4 i): edges between centres
        square = np.array([[-44.0, -44.0, k], [-4.0, -44.0, k], [-4.0, -4.0, k], [-44.0, -4.0, k]])
        set_points(contour, square)
        items.append(contour)
    roi.ContourSequence = DicomSequence(items)
    rs.ROIContourSequence = DicomSequence([roi])
    rs.save_as(folder / "RS.dcm", enforce_file_format=True)
    return count, 400 * 10 * 10


@pytest.mark.slow
def test_thousand_slice_series(corpus: Corpus, tmp_path: Path) -> None:
    folder = tmp_path / "thousand"
    count, voxels = thousand_slices(folder, corpus.clean)
    processing = ProcessingConfig(reformat_spacing_mm=4.0)
    (outcome,) = run_folder(folder, processing, tmp_path / "work")
    assert outcome.kind == "processed", outcome.reason or outcome.warnings
    assert outcome.mask is not None and outcome.mask.shape == (count, 32, 32)
    assert int(outcome.mask.sum()) == voxels
    assert outcome.written["axial"] == count
    assert outcome.written["coronal"] > 0 and outcome.written["sagittal"] > 0


# ------------------------------------------------------------------------------------------
# Through the real flow, full anonymization on: the cause is named, no patient data anywhere
# ------------------------------------------------------------------------------------------

#: case -> (words of the cause the quarantine reason must hold, spatial index of the slice it must name or None).
FLOW_FAILURES: dict[str, tuple[tuple[str, ...], int | None]] = {
    "unknown-transfer-syntax": (("TransferSyntaxUID", "unknown transfer syntax"), 3),
    "duplicate-sop-uid-other-position": (("different images", "ImagePositionPatient"), 3),
    "images-only-quarantine": (("no RTSTRUCT",), None),
    "gantry-tilt": (("gantry-tilted or sheared",), None),
    "no-preamble-or-file-meta": (("without the Part 10 file header", "absent"), 3),
    "truncated-slice": (("truncated",), 6),
    "wrong-syntax-jpeg2000-label-native-pixels": (("requires encapsulated pixel data",), 5),
}


def _name_like_the_listener(folder: Path) -> dict[str, str]:
    """Rename every file to ``<SOPInstanceUID>.dcm`` as the listener stores them (a second file with a
    SOP UID already taken keeps its name); returns old name -> SOP UID."""
    renamed = {}
    for path in sorted(folder.iterdir()):
        sop = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).SOPInstanceUID)
        if not (folder / f"{sop}.dcm").exists():
            path.rename(folder / f"{sop}.dcm")
        renamed[path.name] = sop
    return renamed


def _flow_logs(flow_run_id: str) -> str:
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])))
    return "\n".join(log.message for log in logs)


def _identity(folder: Path) -> set[str]:
    """The patient data and every UID received in ``folder`` (what must not leak in full mode)."""
    found = {SECRET_NAME, SECRET_NAME.split("^")[0], SECRET_ID}
    for path in folder.rglob("*"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            continue
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            value = str(ds.get(keyword, "") or "")
            if value.count(".") > 3:
                found.add(value)
    return found


@pytest.mark.slow
@pytest.mark.network
def test_flow_quarantines_the_corpus_failures_by_cause_without_patient_data(
    prefect_harness: None, tmp_path: Path
) -> None:
    from flows.process_study import process_study
    from netrt.errors import StudyFailedError

    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {layout.root}}}\nanonymization: {{enabled: true, mode: full}}\n"
        f"destinations:\n  - {{name: out, type: folder, path: {tmp_path / 'out'}}}\n"
    )
    from netrt.anonymize import load_or_create_secret, map_uid
    from netrt.config import load_config

    key = load_or_create_secret(load_config(config).anonymization, layout.root)
    spec = PhantomSpec(**{**SPEC.__dict__, "patient_name": SECRET_NAME, "patient_id": SECRET_ID})
    by_id = {case.id: case for case in CASES}
    for index, (case_id, (causes, named_slice)) in enumerate(FLOW_FAILURES.items()):
        manifest = write_phantom(PhantomSpec(**{**spec.__dict__, "seed": 40 + index}), tmp_path / case_id)
        study_dir = layout.studies / manifest.study_instance_uid
        shutil.copytree(manifest.out_dir / "dicom", study_dir)
        by_id[case_id].build(study_dir, None)  # type: ignore[arg-type]  # these builders need no corpus
        sops = _name_like_the_listener(study_dir)
        secrets = _identity(study_dir)
        with pytest.raises(StudyFailedError) as failure:
            process_study(study_dir=str(study_dir), config_file=str(config))
        entry = layout.quarantine / manifest.study_instance_uid
        reason = json.loads((entry / "reason.json").read_text())
        assert reason["stage"] == "validate" and reason["retryable"] is False, reason
        for cause in causes:
            assert cause in reason["error"], f"{case_id}: {cause!r} not in the quarantine reason {reason['error']!r}"
        if named_slice is not None:  # the file at fault, named by its mapped SOP UID
            mapped = map_uid(sops[manifest.image_files[named_slice].name], key)
            assert mapped in reason["error"], f"{case_id}: {reason['error']!r} does not name {mapped}"
        assert len(list((entry / "input").rglob("*"))) == len(list((manifest.out_dir / "dicom").iterdir())) + (
            1 if case_id == "duplicate-sop-uid-other-position" else 0
        ) - (1 if case_id == "images-only-quarantine" else 0), f"{case_id}: quarantine must hold every received file"
        texts = {
            "error": str(failure.value),
            "reason.json": (entry / "reason.json").read_text(),
            "transactions": layout.transaction_log.read_text(),
            "flow-run logs": _flow_logs(reason["flow_run_id"]),
        }
        if layout.app_log.exists():
            texts["app log"] = layout.app_log.read_text()
        for where, text in texts.items():
            for secret in secrets:
                assert secret not in text, f"{case_id}: {secret!r} leaked into the {where}: {text[:400]}"


@pytest.mark.slow
@pytest.mark.network
def test_flow_warnings_and_pass_through_carry_no_patient_data(prefect_harness: None, tmp_path: Path) -> None:
    """Processed-with-warning (a stray file, a second RTSTRUCT, a repeated slice) and an images-only study
    passed through, full anonymization on: the summary names the cause, never the patient or a received UID;
    the passed-through images are delivered anonymized."""
    from flows.process_study import process_study

    layout = DataLayout.from_data_dir(tmp_path / "data").create()
    out = tmp_path / "out"
    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {layout.root}}}\nanonymization: {{enabled: true, mode: full}}\n"
        "processing: {images_without_rtstruct: pass_through, planes: [axial]}\n"
        f"destinations:\n  - {{name: out, type: folder, path: {out}}}\n"
    )
    spec = PhantomSpec(**{**SPEC.__dict__, "patient_name": SECRET_NAME, "patient_id": SECRET_ID, "seed": 50})
    manifest = write_phantom(spec, tmp_path / "warned")
    study_dir = layout.studies / manifest.study_instance_uid
    shutil.copytree(manifest.out_dir / "dicom", study_dir)
    for build in (b_stray_file, b_two_rtstructs, b_duplicate_same_image):
        build(study_dir, None)  # type: ignore[arg-type]
    secrets = _identity(study_dir)
    summary = process_study(study_dir=str(study_dir), config_file=str(config))
    warnings = " | ".join(summary["warnings"])
    for cause in ("notes.txt", "2 RTSTRUCTs reference image series", "repeat an image"):
        assert cause in warnings, f"{cause!r} not in the run summary's warnings {warnings!r}"
    markdown = (layout.study_dir(layout.work, summary["study_instance_uid"]) / "summary.md").read_text()
    assert "notes.txt" in markdown
    for where, text in {
        "warnings": warnings,
        "summary.md": markdown,
        "logs": _flow_logs(summary["flow_run_id"]),
    }.items():
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked into the {where}"

    manifest = write_phantom(PhantomSpec(**{**spec.__dict__, "seed": 51}), tmp_path / "images-only")
    study_dir = layout.studies / manifest.study_instance_uid
    shutil.copytree(manifest.out_dir / "dicom", study_dir)
    (study_dir / "RS.dcm").unlink()
    secrets = _identity(study_dir)
    summary = process_study(study_dir=str(study_dir), config_file=str(config))
    assert summary["passed_through"] == len(manifest.image_files) and summary["series"] == []
    assert "passed through without an overlay" in " | ".join(summary["warnings"])
    assert summary["destinations"] == [
        {
            "name": "out",
            "ok": True,
            "instances": len(manifest.image_files),
            "stored": len(manifest.image_files),
            "earlier": 0,
            "committed": None,
            "detail": summary["destinations"][0]["detail"],
        }
    ]
    delivered = sorted((out / summary["study_instance_uid"]).rglob("*.dcm"))
    assert len(delivered) == len(manifest.image_files)
    for path in delivered:
        ds = pydicom.dcmread(path)
        assert ds.PatientName != SECRET_NAME and ds.PatientID != SECRET_ID
        assert str(ds.SOPInstanceUID) not in secrets and (0x6000, 0x3000) not in ds
    for text in (" | ".join(summary["warnings"]), _flow_logs(summary["flow_run_id"])):
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked"
    assert (layout.processed / manifest.study_instance_uid).is_dir()
