"""Issue 18 item 3 on genuine Enhanced multi-frame images written by someone else, not by NETRT's phantom.

The files come from the PyPI package ``pydicom-data`` (pydicom's external test files; dev group of
pyproject.toml), found by ``pydicom.data.get_testdata_file`` through pydicom's entry point, copied
into ``tmp_path`` (the installed files are never touched):

* ``eCT_Supplemental.dcm``: David Clunie's Enhanced CT Image Storage sample ("Acme Medical
  Devices"): 2 frames of 512x512, Explicit VR Little Endian, per-frame Plane Position (z -159 for
  frame 1, -149 for frame 2), shared Plane Orientation [-1,0,0,0,1,0] (the row direction is -x, so
  the slice normal is -z), Pixel Measures 0.388672 mm and 10 mm slices, shared rescale -1024, and a
  Supplemental Palette Color LUT on its MONOCHROME2 pixels.
* ``emri_small.dcm``: an Enhanced MR Image Storage file of 10 frames 64x64 whose functional groups
  were removed (no Per-Frame nor Shared Functional Groups Sequence, so no position, orientation or
  pixel spacing anywhere): NETRT must refuse it, naming the file, the tag and what is wrong.

No RTSTRUCT comes with them, so one is written here with pydicom, with two ROIs on both frames
(a rectangle and a 72-gon ellipse, a different size on each frame so that a swapped frame order
shows) at each frame's exact position, edges placed off pixel centres. The expected masks are
computed here independently: pixel centres from each frame's ImagePositionPatient + index *
spacing * direction, an even-odd crossing test in numpy (never :mod:`netrt.rasterize`). Readers
of NETRT's outputs are independent too: pydicom (overlay bits, pixels), dicom3tools' ``dciodvfy``
(IOD), dcmqi's ``segimage2itkimage`` (SEG).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from netrt.config import ProcessingConfig
from netrt.errors import StudyValidationError
from netrt.masks import load_mask
from netrt.outputs.rois import load_roi_mask
from netrt.pipeline import compute_mask, write_output
from netrt.study import LoadedStudy, find_studies, load_study, read_image_volume

from .conftest import IN_CI, dciodvfy_errors, free_port, segimage2itkimage

BoolArray = npt.NDArray[np.bool_]
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
PALETTE = [f"{c}PaletteColorLookupTable{p}" for c in ("Red", "Green", "Blue") for p in ("Descriptor", "Data")]

# ROI number -> (name, ROIDisplayColor); contours in patient (x, y) mm per frame number.
ROIS = {1: ("Box", (255, 0, 0)), 2: ("Ellipse", (0, 128, 255))}


def pydicom_data_file(name: str) -> Path:
    """An installed file of pydicom-data, found through pydicom (never downloaded: the package is
    checked first, and the path must lie inside it)."""
    spec = importlib.util.find_spec("data_store")
    if spec is None or not spec.submodule_search_locations:
        message = "pydicom-data is not installed (dev group of pyproject.toml)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name)
    assert found is not None, name
    path = Path(found)
    package = Path(next(iter(spec.submodule_search_locations)))
    assert path.is_relative_to(package), f"{path} is not pydicom-data's file"
    return path


def shapes(frame: int) -> dict[int, npt.NDArray[np.float64]]:
    """The contours of each ROI on ``frame``, (x, y) patient mm; frame 1 (z -159) gets the larger ones."""
    grow = frame == 1
    x0, x1, y0, y1 = (-20.13, 30.29, -250.21, -180.67) if grow else (-10.13, 25.29, -240.21, -190.67)
    box = np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)])
    t = np.linspace(0.0, 2 * np.pi, 73)[:-1]
    a, b = (25.1, 15.3) if grow else (18.31, 11.77)
    ellipse = np.stack([40.113 + a * np.cos(t), -150.071 + b * np.sin(t)], axis=1)
    return {1: np.round(box, 4), 2: np.round(ellipse, 4)}  # as written in ContourData


def write_rtstruct(image: Dataset, contours: dict[int, dict[int, npt.NDArray[np.float64]]], z: dict[int, float],
                   path: Path) -> None:  # fmt: skip
    """An RTSTRUCT on ``image``'s frames: every frame named in ReferencedFrameOfReferenceSequence
    (ContourImageSequence items with ReferencedSOPInstanceUID + ReferencedFrameNumber), one
    CLOSED_PLANAR contour per ROI and frame at the frame's ``z``, each naming its frame."""

    def reference(frame: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = image.SOPClassUID
        item.ReferencedSOPInstanceUID = image.SOPInstanceUID
        item.ReferencedFrameNumber = frame
        return item

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = RTSTRUCT
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):  # fmt: skip
        setattr(ds, keyword, image.get(keyword, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 99
    ds.InstanceNumber = 1
    ds.Manufacturer = "tests/test_enhanced_real.py"
    ds.OperatorsName = ""
    ds.StructureSetLabel = "REAL-ENHANCED"
    ds.StructureSetDate, ds.StructureSetTime = "20240101", "120000"
    frames = sorted(z)
    series = Dataset()
    series.SeriesInstanceUID = image.SeriesInstanceUID
    series.ContourImageSequence = [reference(n) for n in frames]
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study.ReferencedSOPInstanceUID = image.StudyInstanceUID
    study.RTReferencedSeriesSequence = [series]
    frame_of_reference = Dataset()
    frame_of_reference.FrameOfReferenceUID = image.FrameOfReferenceUID
    frame_of_reference.RTReferencedStudySequence = [study]
    ds.ReferencedFrameOfReferenceSequence = [frame_of_reference]
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for number, (name, color) in ROIS.items():
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = image.FrameOfReferenceUID
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = list(color)
        item.ContourSequence = []
        for frame in frames:
            points = contours[frame][number]
            contour = Dataset()
            contour.ContourImageSequence = [reference(frame)]
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points)
            contour.ContourData = [f"{v:.4f}" for x, y in points for v in (x, y, z[frame])]
            item.ContourSequence.append(contour)
        ds.ROIContourSequence.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(observation)
    ds.save_as(path, enforce_file_format=True)


# --- the expected masks, computed here ----------------------------------------------------------


def even_odd(polygon: npt.NDArray[np.float64], x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> BoolArray:
    """Pixel centres at patient ``(x[r, c], y[r, c])`` inside ``polygon`` by the crossing number: a
    ray from each centre towards +x crosses the edges whose y span holds the centre's y (half-open,
    so a vertex is counted once); an odd count is inside. Fails when a centre lies within 1e-3 mm of
    an edge crossing or of a vertex's y, where the pixel-centre rule would have a tie."""
    inside = np.zeros(x.shape, dtype=bool)
    start, end = polygon, np.roll(polygon, -1, axis=0)
    assert np.abs(y[..., None] - polygon[:, 1]).min() > 1e-3, "a pixel centre row passes through a vertex"
    for (x1, y1), (x2, y2) in zip(start, end, strict=True):
        if y1 == y2:
            continue
        spans = (np.minimum(y1, y2) <= y) & (y < np.maximum(y1, y2))
        crossing = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        assert np.abs(crossing - x)[spans].min(initial=1.0) > 1e-3, "a pixel centre lies on an edge"
        inside ^= spans & (x < crossing)
    return inside


def plane_of(image: Dataset) -> dict[str, Any]:
    """What the functional groups say, read here with pydicom: each frame's position, the shared
    orientation and pixel measures, and the stack order along the normal (row x column)."""
    shared = image.SharedFunctionalGroupsSequence[0]
    orientation = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    measures = shared.PixelMeasuresSequence[0]
    row_spacing, column_spacing = (float(v) for v in measures.PixelSpacing)
    positions = {
        n: np.array([float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient])
        for n, item in enumerate(image.PerFrameFunctionalGroupsSequence, 1)
    }
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    order = sorted(positions, key=lambda n: float(positions[n] @ normal))
    return {
        "positions": positions,
        "row": row,
        "column": column,
        "normal": normal,
        "spacing": (row_spacing, column_spacing),
        "thickness": float(measures.SliceThickness),
        "order": order,
    }


def expected_masks(image: Dataset, plane: dict[str, Any]) -> dict[int, dict[int, BoolArray]]:
    """ROI number -> frame number -> the mask of that frame (rows x columns)."""
    rows, columns = int(image.Rows), int(image.Columns)
    assert np.allclose(np.abs(plane["normal"]), [0, 0, 1])  # axial: the contours' (x, y) are in-plane
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    row_spacing, column_spacing = plane["spacing"]
    out: dict[int, dict[int, BoolArray]] = {number: {} for number in ROIS}
    for frame, origin in plane["positions"].items():
        # centre of pixel (row r, column c): IPP + c * column spacing * row direction
        #                                     + r * row spacing * column direction
        centres = (
            origin[None, None, :]
            + (c * column_spacing)[..., None] * plane["row"][None, None, :]
            + (r * row_spacing)[..., None] * plane["column"][None, None, :]
        )
        for number, polygon in shapes(frame).items():
            out[number][frame] = even_odd(polygon, centres[..., 0], centres[..., 1])
    return out


# --- the Enhanced CT -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ect(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """eCT_Supplemental copied beside an RTSTRUCT written for it; loaded, masked, every output written."""
    folder = tmp_path_factory.mktemp("ect") / "dicom"
    folder.mkdir()
    source = pydicom_data_file("eCT_Supplemental.dcm")
    digest = source.read_bytes()
    image_path = folder / "eCT_Supplemental.dcm"
    shutil.copy(source, image_path)
    image = pydicom.dcmread(image_path)
    plane = plane_of(image)
    z = {n: float(p[2]) for n, p in plane["positions"].items()}
    write_rtstruct(image, {n: shapes(n) for n in z}, z, folder / "RS.dcm")

    (found,) = find_studies(folder)
    study = load_study(list(found.files))
    processing = ProcessingConfig(outputs=["overlay", "burn_in", "color", "seg"])
    work = folder.parent / "work"
    masks = compute_mask(study, processing, work)
    written: dict[tuple[str, str], list[Path]] = {}
    for kind in ("overlay", "color"):
        for view in ("axial", "coronal", "sagittal"):
            (series,) = write_output(study, masks, kind, view, processing, work)
            written[(kind, view)] = list(series.files)
    (burn_in,) = write_output(study, masks, "burn_in", "axial", processing, work)
    written[("burn_in", "axial")] = list(burn_in.files)
    (seg,) = write_output(study, masks, "seg", "study", processing, work)
    written[("seg", "study")] = list(seg.files)
    assert source.read_bytes() == digest  # the installed file is untouched
    return {
        "folder": folder,
        "found": found,
        "image": image,
        "plane": plane,
        "study": study,
        "masks": masks,
        "expected": expected_masks(image, plane),
        "written": written,
        "work": work,
    }


def test_the_file_is_the_genuine_enhanced_ct(ect: dict[str, Any]) -> None:
    image: Dataset = ect["image"]
    assert image.SOPClassUID == ENHANCED_CT and image.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert str(image.Manufacturer) == "Acme Medical Devices" and int(image.NumberOfFrames) == 2
    assert (image.Rows, image.Columns) == (512, 512)
    assert "PlanePositionSequence" not in image.SharedFunctionalGroupsSequence[0]
    plane = ect["plane"]
    assert [float(p[2]) for p in plane["positions"].values()] == [-159.0, -149.0]
    assert list(plane["row"]) == [-1.0, 0.0, 0.0] and list(plane["normal"]) == [0.0, 0.0, -1.0]


def test_it_loads_as_a_stack_of_two_slices_sorted_along_the_normal(ect: dict[str, Any]) -> None:
    study: LoadedStudy = ect["study"]
    image, plane = ect["image"], ect["plane"]
    assert sorted(ect["found"].files) == sorted([ect["folder"] / "RS.dcm", ect["folder"] / "eCT_Supplemental.dcm"])
    images = study.images
    assert images.sop_class_uid == ENHANCED_CT and images.modality == "CT" and images.is_multiframe
    assert images.files == (ect["folder"] / "eCT_Supplemental.dcm",)
    assert images.sop_instance_uids == (image.SOPInstanceUID,)
    # normal -z: frame 2 (z -149) comes first along it, frame 1 (z -159) second
    assert plane["order"] == [2, 1] and list(images.frame_numbers) == plane["order"]
    assert images.positions == pytest.approx((149.0, 159.0))
    geometry = images.geometry
    assert geometry.shape == (2, 512, 512)
    assert geometry.origin == pytest.approx(plane["positions"][2])
    assert geometry.row_direction == pytest.approx(plane["row"])
    assert geometry.column_direction == pytest.approx(plane["column"])
    assert geometry.normal == pytest.approx(plane["normal"])
    assert geometry.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    assert study.warnings == () and study.rtstruct_file == ect["folder"] / "RS.dcm"
    # HU of each slice: the frame's stored values through the shared Pixel Value Transformation (-1024)
    volume = read_image_volume(images)
    stored = image.pixel_array
    for k, frame in enumerate(plane["order"]):
        assert np.array_equal(volume[k], stored[frame - 1].astype(np.float64) - 1024.0), frame


def test_each_roi_mask_equals_the_mask_computed_here(ect: dict[str, Any]) -> None:
    masks, expected, order = ect["masks"], ect["expected"], ect["plane"]["order"]
    assert [(r.number, r.name, tuple(r.color)) for r in masks.roi_infos] == [
        (n, name, color) for n, (name, color) in ROIS.items()
    ]
    union = np.zeros((2, 512, 512), dtype=bool)
    for number, (name, _) in ROIS.items():
        truth = np.stack([expected[number][frame] for frame in order])
        assert truth[0].sum() > 1000 and truth[1].sum() > truth[0].sum(), name  # frame 1's shape is larger
        mask = load_roi_mask(masks.roi_masks, number)
        assert mask.shape == truth.shape and np.array_equal(mask, truth), (name, int((mask != truth).sum()))
        union |= truth
    assert np.array_equal(load_mask(masks.mask_path), union)
    assert masks.voxel_count == int(union.sum())


def test_axial_overlays_are_classic_ct_images_of_each_frame(ect: dict[str, Any]) -> None:
    image, plane, expected = ect["image"], ect["plane"], ect["expected"]
    stored = image.pixel_array
    seen = []
    for path in ect["written"][("overlay", "axial")]:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == CT_IMAGE and ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE
        assert "NumberOfFrames" not in ds and "PerFrameFunctionalGroupsSequence" not in ds
        assert "SharedFunctionalGroupsSequence" not in ds and not any(k in ds for k in PALETTE)
        (source,) = ds.SourceImageSequence
        assert source.ReferencedSOPClassUID == ENHANCED_CT and source.ReferencedSOPInstanceUID == image.SOPInstanceUID
        frame = int(source.ReferencedFrameNumber)
        seen.append(frame)
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(list(plane["positions"][frame]))
        assert [float(v) for v in ds.ImageOrientationPatient] == [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert [float(v) for v in ds.PixelSpacing] == [0.388672, 0.388672] and float(ds.SliceThickness) == 10.0
        assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
        assert ds.StudyInstanceUID == image.StudyInstanceUID and ds.FrameOfReferenceUID == image.FrameOfReferenceUID
        assert np.array_equal(ds.pixel_array, stored[frame - 1])  # stored values untouched
        union = expected[1][frame] | expected[2][frame]
        assert np.array_equal(ds.overlay_array(0x6000).astype(bool), union), frame
    assert sorted(seen) == [1, 2]


@pytest.mark.parametrize("view", ["coronal", "sagittal"])
def test_reformatted_overlays_show_each_frame_mask_at_its_end(ect: dict[str, Any], view: str) -> None:
    """Coronal and sagittal images cut through both frames: their first row lies next to frame 2's
    plane (z -149), their last next to frame 1's (z -159); those rows carry the frame's mask along
    that image's source row (coronal) or column (sagittal), at most one boundary pixel off per side,
    and no image shows anything outside the two frames' union."""
    expected, plane = ect["expected"], ect["plane"]
    origin = plane["positions"][1]
    files = ect["written"][("overlay", view)]
    assert len(files) == 512
    shown = 0
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == CT_IMAGE and list(ds.ImageType)[2] == "REFORMATTED"
        position = [float(v) for v in ds.ImagePositionPatient]
        assert -149.5 < position[2] <= -149.0  # the top row at frame 2's plane
        if view == "coronal":  # an image per source row; its columns are the source columns
            index = round((position[1] - origin[1]) / plane["spacing"][0])
            cut = {frame: expected[1][frame][index, :] | expected[2][frame][index, :] for frame in (1, 2)}
        else:  # an image per source column; its columns run along the source rows
            index = round((origin[0] - position[0]) / plane["spacing"][1])
            cut = {frame: expected[1][frame][:, index] | expected[2][frame][:, index] for frame in (1, 2)}
        overlay = ds.overlay_array(0x6000).astype(bool)
        assert int((overlay[0] != cut[2]).sum()) <= 2 and int((overlay[-1] != cut[1]).sum()) <= 2, (view, index)
        assert not (overlay.any(axis=0) & ~(cut[1] | cut[2])).any()
        shown += bool(overlay.any())
    assert shown > 150


def test_colour_series_outline_each_roi_in_its_display_colour(ect: dict[str, Any]) -> None:
    expected, plane = ect["expected"], ect["plane"]
    files = ect["written"][("color", "axial")]
    assert len(files) == 2
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == SECONDARY_CAPTURE and ds.PhotometricInterpretation == "RGB"
        frame = next(n for n, p in plane["positions"].items() if float(ds.ImagePositionPatient[2]) == p[2])
        pixels = ds.pixel_array
        for number, (name, color) in ROIS.items():
            mask = expected[number][frame]
            interior = mask.copy()
            interior[1:, :] &= mask[:-1, :]
            interior[:-1, :] &= mask[1:, :]
            interior[:, 1:] &= mask[:, :-1]
            interior[:, :-1] &= mask[:, 1:]
            edge = mask & ~interior
            right = np.all(pixels[edge] == np.array(color, dtype=np.uint8), axis=1)
            assert edge.sum() > 100 and right.mean() > 0.95, (name, frame, float(right.mean()))


def test_dciodvfy_reports_no_error_on_any_derived_file_kind(ect: dict[str, Any]) -> None:
    """Every kind and plane (first, middle and last file): the classic CT frames carry no
    Supplemental Palette Color LUT of the enhanced file, which a MONOCHROME2 CT Image may not have."""
    failures = []
    checked = 0
    for (kind, view), files in sorted(ect["written"].items()):
        for path in {files[0], files[len(files) // 2], files[-1]}:
            checked += 1
            errors = dciodvfy_errors(path)
            if errors:
                failures.append(f"{kind} {view} {path.name}: {errors[:3]}")
    assert checked >= 15 and not failures, failures


def test_the_seg_read_by_dcmqi_has_both_segments_on_the_source_frames(ect: dict[str, Any]) -> None:
    image, plane, expected = ect["image"], ect["plane"], ect["expected"]
    (path,) = ect["written"][("seg", "study")]
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SEG_STORAGE and ds.FrameOfReferenceUID == image.FrameOfReferenceUID
    (series,) = ds.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == image.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence] == [image.SOPInstanceUID]
    frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns)).astype(bool)
    seen = set()
    for item, pixels in zip(ds.PerFrameFunctionalGroupsSequence, frames, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        (source,) = item.DerivationImageSequence[0].SourceImageSequence
        assert source.ReferencedSOPInstanceUID == image.SOPInstanceUID and source.ReferencedSOPClassUID == ENHANCED_CT
        frame = int(source.ReferencedFrameNumber)
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx(list(plane["positions"][frame]))
        assert np.array_equal(pixels, expected[number][frame]), (number, frame)
        seen.add((number, frame))
    assert seen == {(n, f) for n in ROIS for f in (1, 2)}

    # dcmqi's reader, its volumes placed on the grid described here from the functional groups
    out = ect["work"] / "dcmqi"
    out.mkdir()
    cmd = [segimage2itkimage(), "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nii"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = json.loads((out / "meta.json").read_text())
    reference = sitk.Image(512, 512, 2, sitk.sitkUInt8)
    first = plane["order"][0]
    reference.SetOrigin(tuple(float(v) for v in plane["positions"][first]))
    reference.SetSpacing((plane["spacing"][1], plane["spacing"][0], 10.0))
    reference.SetDirection(tuple(float(v) for v in np.stack([plane["row"], plane["column"], plane["normal"]], 1).flat))
    segments = {}
    for file_index, group in enumerate(meta["segmentAttributes"], 1):
        volume = sitk.ReadImage(str(out / f"{file_index}.nii.gz"))
        for attributes in group:
            label = sitk.Equal(volume, int(attributes["labelID"]))
            resampled = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            segments[attributes["SegmentLabel"]] = (attributes, sitk.GetArrayFromImage(resampled).astype(bool))
    assert sorted(segments) == sorted(name for name, _ in ROIS.values())
    for number, (name, color) in ROIS.items():
        attributes, mask = segments[name]
        truth = np.stack([expected[number][frame] for frame in plane["order"]])
        assert tuple(attributes["recommendedDisplayRGBValue"]) == color
        assert int(mask.sum()) == int(truth.sum()) and np.array_equal(mask, truth), name


# --- the Enhanced MR without functional groups -------------------------------------------------


def emri_study(folder: Path) -> Path:
    """emri_small copied beside an RTSTRUCT naming two of its frames; returns the image's path."""
    folder.mkdir(parents=True)
    path = folder / "emri_small.dcm"
    shutil.copy(pydicom_data_file("emri_small.dcm"), path)
    image = pydicom.dcmread(path, stop_before_pixels=True)
    assert image.SOPClassUID == ENHANCED_MR and int(image.NumberOfFrames) == 10
    assert "PerFrameFunctionalGroupsSequence" not in image and "SharedFunctionalGroupsSequence" not in image
    square = np.array([(-10.3, -10.3), (10.3, -10.3), (10.3, 10.3), (-10.3, 10.3)])
    contours = {n: {1: square, 2: square * 0.5} for n in (1, 2)}
    write_rtstruct(image, contours, {1: 0.0, 2: 1.2}, folder / "RS.dcm")
    return path


def test_an_enhanced_mr_without_functional_groups_is_refused_naming_file_and_tag(tmp_path: Path) -> None:
    path = emri_study(tmp_path / "emri")
    (found,) = find_studies(tmp_path / "emri")
    with pytest.raises(StudyValidationError) as caught:
        load_study(list(found.files))
    error = caught.value
    assert error.path == path and error.tag == "(5200,9230) PerFrameFunctionalGroupsSequence"
    assert error.reason == (
        "10 frames (NumberOfFrames) but none per-frame functional group items; one per frame expected"
    )
    assert "emri_small.dcm" in str(error) and "PerFrameFunctionalGroupsSequence" in str(error)


# --- netrt process, end to end -----------------------------------------------------------------


def copy_ect_study(ect: dict[str, Any], target: Path) -> None:
    target.mkdir(parents=True)
    for name in ("eCT_Supplemental.dcm", "RS.dcm"):
        shutil.copy(ect["folder"] / name, target / name)


@pytest.mark.slow
def test_netrt_process_writes_the_ct_outputs_and_quarantines_the_mr(ect: dict[str, Any], tmp_path: Path) -> None:
    """One folder holding both studies: the Enhanced CT is processed (classic CT overlays in three
    planes, colour, one SEG on its frames, the file itself forwarded by ``source`` routing); the
    Enhanced MR is quarantined, its reason naming the file and the tag."""
    incoming = tmp_path / "incoming"
    copy_ect_study(ect, incoming / "ct")
    emri_study(incoming / "mr")
    data, out = tmp_path / "data", tmp_path / "out"
    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {data}}}\n"
        f"prefect: {{server_port: {free_port()}}}\n"
        "processing: {outputs: [overlay, seg, color]}\n"
        "destinations:\n"
        f"  - {{name: out, type: folder, path: {out}, outputs: [overlay, seg, color, source]}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "netrt", "process", str(incoming), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]  # one of the two studies failed
    image: Dataset = ect["image"]
    lines = done.stdout.splitlines()
    assert any(image.StudyInstanceUID in line and ": ok: " in line for line in lines), done.stdout
    assert any("FAILED" in line and "PerFrameFunctionalGroupsSequence" in line for line in lines), done.stdout

    (reason_file,) = (data / "quarantine").glob("*/reason.json")
    reason = reason_file.read_text()
    assert "emri_small.dcm" in reason and "(5200,9230) PerFrameFunctionalGroupsSequence" in reason
    assert "none per-frame functional group items" in reason

    by_class: dict[str, list[Dataset]] = {}
    for path in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
        assert ds.StudyInstanceUID == image.StudyInstanceUID  # nothing of the refused MR study went out
    (forwarded,) = by_class[ENHANCED_CT]
    assert forwarded.SOPInstanceUID == image.SOPInstanceUID and forwarded.PixelData == image.PixelData
    classic = by_class[CT_IMAGE]
    kinds = [str(ds.ImageType[2]) for ds in classic]
    assert kinds.count("AXIAL") == 2 and kinds.count("REFORMATTED") == 2 * 512
    assert not any("NumberOfFrames" in ds or any(k in ds for k in PALETTE) for ds in classic)
    axial = {int(ds.SourceImageSequence[0].ReferencedFrameNumber): ds for ds in classic if ds.ImageType[2] == "AXIAL"}
    assert sorted(axial) == [1, 2]
    for frame, ds in axial.items():
        truth = ect["expected"][1][frame] | ect["expected"][2][frame]
        assert np.array_equal(ds.overlay_array(0x6000).astype(bool), truth), frame
    (seg,) = by_class[SEG_STORAGE]
    references = {
        (item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID,
         int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber))
        for item in seg.PerFrameFunctionalGroupsSequence
    }  # fmt: skip
    assert references == {(image.SOPInstanceUID, 1), (image.SOPInstanceUID, 2)}
    assert len(by_class[SECONDARY_CAPTURE]) == 2 + 2 * 512  # colour, three planes
