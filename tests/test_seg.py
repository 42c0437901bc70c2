"""The ``seg`` output kind (issue 17, part 3): one DICOM SEG per study, read back by others.

What is trusted here is never NETRT's own reading of its file: segments are read back by dcmqi's
``segimage2itkimage`` (a C++ reader written elsewhere) and by highdicom, and compared with the
phantom's analytic truth (computed from the solids, not from the contours) and, on the real MIM
export in ../shared/data, with plastimatch's masks. Colours are compared with ROIDisplayColor read
from the RTSTRUCT with pydicom, not with NETRT's RoiInfo. dciodvfy checks the IOD.
"""

from __future__ import annotations

import functools
import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from netrt.config import ProcessingConfig
from netrt.errors import NetrtError, RoiError
from netrt.masks import read_structure_set, roi_mask
from netrt.outputs import seg as seg_module
from netrt.outputs.rois import RoiInfo, build_roi_masks, load_roi_mask, save_roi_masks
from netrt.outputs.seg import (
    GENERIC_CODES,
    LO_MAX,
    TYPE_CODES,
    content_description,
    seg_series_uid,
    write_seg,
)
from netrt.phantom import PhantomManifest, PhantomSpec, truth_masks, write_phantom
from netrt.study import LoadedStudy, load_study
from netrt.uids import is_valid_uid

from .conftest import require_shared, require_tool, segimage2itkimage
from .test_study import dicom_files, edit, remove_slices

BoolArray = npt.NDArray[np.bool_]
# SimpleITK's SWIG functions carry no annotations (the same device as in netrt.geometry).
_sitk: Any = sitk

#: The analytic truth at 1 mm: 1 mm pixels and 1 mm slices; two extra spheres (ORGAN, r = 10 mm).
SPEC = PhantomSpec(rows=256, columns=256, pixel_spacing=(1.0, 1.0), slice_spacing=1.0, extra_spheres=2)
#: A small, coarse phantom for the cases where geometry matters more than accuracy.
SMALL = PhantomSpec(rows=64, columns=64, pixel_spacing=(4.0, 4.0), slice_spacing=3.0)
#: Spatial index of the slice removed for the missing-slice case: mid-stack, through the solids.
GONE = 14
MIM = "rtutils-mim-ge-phantom"
DEFAULTS = ProcessingConfig()


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def dice(a: BoolArray, b: BoolArray) -> float:
    total = int(a.sum()) + int(b.sum())
    assert total > 0, "Dice of two empty masks says nothing"
    return 2.0 * int((a & b).sum()) / total


def dciodvfy_errors(path: Path) -> list[str]:
    tool = require_tool("dciodvfy")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if "Error" in line]


def read_with_dcmqi(seg_file: Path, out: Path) -> list[tuple[dict[str, Any], sitk.Image]]:
    """Every segment dcmqi finds: (its meta.json attributes, a 0/1 image of it), in file order."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [segimage2itkimage(), "--inputDICOM", str(seg_file), "--outputDirectory", str(out), "-t", "nii"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    meta = json.loads((out / "meta.json").read_text())
    segments = []
    # One NIfTI per inner list of segmentAttributes (file i+1), voxels of a segment == its labelID.
    for file_index, group in enumerate(meta["segmentAttributes"], 1):
        image = sitk.ReadImage(str(out / f"{file_index}.nii.gz"))
        for attributes in group:
            segments.append((attributes, _sitk.Equal(image, int(attributes["labelID"]))))
    return segments


def on_grid(image: sitk.Image, reference: sitk.Image) -> BoolArray:
    """``image`` resampled (nearest neighbour, 0 outside) onto ``reference``'s grid, as a mask."""
    resampled = _sitk.Resample(image, reference, _sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    mask: BoolArray = sitk.GetArrayFromImage(resampled).astype(bool)
    return mask


def display_colors(rtstruct: Path) -> dict[str, tuple[int, int, int]]:
    """ROI name -> ROIDisplayColor, read straight from the RTSTRUCT with pydicom."""
    ds = pydicom.dcmread(rtstruct)
    names = {int(item.ROINumber): str(item.ROIName) for item in ds.StructureSetROISequence}
    return {
        names[int(item.ReferencedROINumber)]: tuple(int(v) for v in item.ROIDisplayColor)  # type: ignore[misc]
        for item in ds.ROIContourSequence
        if "ROIDisplayColor" in item
    }


def kept_names(study: LoadedStudy) -> list[str]:
    ignored = {"Skull", "Patient_Outline"}  # what the default ignore_rois drops from the phantom
    return [roi.name for roi in read_structure_set(study.rtstruct_file) if roi.name not in ignored]


def write_for(
    study: LoadedStudy, work: Path, settings_key: str = "test", *, include: list[str] | None = None
) -> tuple[list[RoiInfo], Path]:
    """Per-ROI masks with the default ROI selection, then the SEG; returns (rois, SEG file)."""
    rois, masks = build_roi_masks(
        study.rtstruct_file,
        study.images.geometry,
        DEFAULTS.include_rois if include is None else include,
        DEFAULTS.ignore_rois,
        work / "roi-masks.npz",
    )
    written = write_seg(study, rois, masks, work / "seg", settings_key)
    assert len(written) == 1 and written[0].parent == work / "seg"
    return rois, written[0]


def without_creation_time(path: Path) -> Dataset:
    """The SEG without the timestamps of this copy's creation (InstanceCreationDate/Time, and the
    ContributionDateTime highdicom gives its own entry in ContributingEquipmentSequence)."""
    ds = pydicom.dcmread(path)
    del ds.InstanceCreationDate, ds.InstanceCreationTime
    for item in ds.ContributingEquipmentSequence:
        if item.get("ManufacturerModelName") == "highdicom":
            del item.ContributionDateTime
    return ds


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomManifest, LoadedStudy]:
    manifest = write_phantom(SPEC, tmp_path_factory.mktemp("seg-phantom") / "phantom")
    return manifest, load_study(dicom_files(manifest))


@pytest.fixture(scope="module")
def phantom_seg(
    phantom: tuple[PhantomManifest, LoadedStudy], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[RoiInfo], Path]:
    return write_for(phantom[1], tmp_path_factory.mktemp("seg-phantom-out"))


@pytest.fixture(scope="module")
def mim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedStudy, list[RoiInfo], Path]:
    """The MIM export (read in place, never changed) with every ROI kept, and its SEG."""
    folder = require_shared(MIM)
    study = load_study(sorted(folder.glob("*.dcm")))
    rois, seg = write_for(study, tmp_path_factory.mktemp("seg-mim"), include=[])
    return folder, study, rois, seg


# --------------------------------------------------------------------------------------------
# The phantom, read back by dcmqi and by highdicom
# --------------------------------------------------------------------------------------------


def test_dcmqi_reads_one_segment_per_kept_roi_with_its_name_colour_and_shape(
    phantom: tuple[PhantomManifest, LoadedStudy], phantom_seg: tuple[list[RoiInfo], Path], tmp_path: Path
) -> None:
    manifest, study = phantom
    segments = read_with_dcmqi(phantom_seg[1], tmp_path / "dcmqi")
    expected = kept_names(study)
    assert [attributes["SegmentLabel"] for attributes, _ in segments] == expected
    assert len(expected) == 6  # sphere, box, hollow_sphere, torus, sphere_2, sphere_3

    colors = display_colors(manifest.rtstruct_file)
    scores = {}
    for attributes, image in segments:
        name = attributes["SegmentLabel"]
        rgb = attributes["recommendedDisplayRGBValue"]
        assert all(abs(int(a) - b) <= 2 for a, b in zip(rgb, colors[name], strict=True)), (name, rgb, colors[name])
        assert attributes["SegmentAlgorithmType"] == "MANUAL"
        truth = sitk.ReadImage(str(manifest.truth_files[name]))
        scores[name] = dice(on_grid(image, truth), sitk.GetArrayFromImage(truth).astype(bool))
    print("Dice of dcmqi's segments against the analytic truth at 1 mm:", {k: round(v, 4) for k, v in scores.items()})
    assert all(score >= 0.98 for score in scores.values()), scores


def test_highdicom_reads_the_same_segments_on_the_source_images(
    phantom: tuple[PhantomManifest, LoadedStudy], phantom_seg: tuple[list[RoiInfo], Path]
) -> None:
    manifest, study = phantom
    seg = hd.seg.segread(phantom_seg[1])
    names = kept_names(study)
    colors = display_colors(manifest.rtstruct_file)
    assert seg.segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    assert seg.segment_numbers == list(range(1, len(names) + 1))

    types = {
        item.ReferencedROINumber: item.RTROIInterpretedType
        for item in pydicom.dcmread(manifest.rtstruct_file).RTROIObservationsSequence
    }
    numbers = {roi.name: roi.number for roi in read_structure_set(study.rtstruct_file)}
    for number, name in enumerate(names, 1):
        description = seg.get_segment_description(number)
        assert description.segment_label == name
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.MANUAL
        lab = hd.color.CIELabColor.from_dicom_value(tuple(description.RecommendedDisplayCIELabValue))
        assert all(abs(a - b) <= 2 for a, b in zip(lab.to_rgb(), colors[name], strict=True))
        category, kind = TYPE_CODES[types[numbers[name]]]
        assert description.segmented_property_category.value == getattr(codes.SCT, category).value
        assert description.segmented_property_type.value == getattr(codes.SCT, kind).value
    # GTV and PTV by the table: the phantom's sphere and box.
    assert seg.get_segment_description(1).segmented_property_type.value == "228791009"
    assert seg.get_segment_description(2).segmented_property_type.value == "228793007"

    # Provenance: the RTSTRUCT's label and manufacturer, within LO's 64 characters.
    assert "NETRT_PHANTOM" in seg.ContentDescription and "NETRT phantom" in seg.ContentDescription
    assert len(seg.ContentDescription) <= LO_MAX

    # Frames by source image: every received image has its plane, frames differ from the truth
    # by less than 2 % (Dice), and no stored frame is empty (omitted instead).
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study.images.files]
    pixels = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True).astype(bool)
    truth = truth_masks(SPEC)
    scores = {name: dice(pixels[..., index], truth[name]) for index, name in enumerate(names)}
    print(
        "Dice of highdicom's segments against the analytic truth at 1 mm:", {k: round(v, 4) for k, v in scores.items()}
    )
    assert all(score >= 0.98 for score in scores.values()), scores
    stored = seg.pixel_array.reshape(int(seg.NumberOfFrames), -1)
    assert stored.any(axis=1).all(), "an empty frame was stored"
    assert int(seg.NumberOfFrames) == int(pixels.any(axis=(1, 2)).sum()), "one frame per non-empty slice and segment"


def test_dciodvfy_finds_no_error_in_the_phantom_seg(phantom_seg: tuple[list[RoiInfo], Path]) -> None:
    assert dciodvfy_errors(phantom_seg[1]) == []


# --------------------------------------------------------------------------------------------
# The real MIM export
# --------------------------------------------------------------------------------------------


def test_mim_export_segments_match_plastimatch(
    mim: tuple[Path, LoadedStudy, list[RoiInfo], Path], tmp_path: Path
) -> None:
    folder, _, rois, seg_file = mim
    assert [roi.name for roi in rois] == ["ROI-1", "ROI-2", "ROI-3", "ROI-4"]
    segments = read_with_dcmqi(seg_file, tmp_path / "dcmqi")
    assert [attributes["SegmentLabel"] for attributes, _ in segments] == ["ROI-1", "ROI-2", "ROI-3", "ROI-4"]
    colors = display_colors(folder / "rt.dcm")
    scores = {}
    for attributes, image in segments:
        name = attributes["SegmentLabel"]
        rgb = attributes["recommendedDisplayRGBValue"]
        assert all(abs(int(a) - b) <= 2 for a, b in zip(rgb, colors[name], strict=True)), (name, rgb)
        # MIM leaves RTROIInterpretedType empty: the documented generic code.
        assert (
            attributes["SegmentedPropertyCategoryCodeSequence"]["CodeValue"]
            == getattr(codes.SCT, GENERIC_CODES[0]).value
        )
        assert (
            attributes["SegmentedPropertyTypeCodeSequence"]["CodeValue"] == getattr(codes.SCT, GENERIC_CODES[1]).value
        )
        reference = sitk.ReadImage(str(folder / "reference_masks" / f"{name}.nii.gz"))
        scores[name] = dice(on_grid(image, reference), sitk.GetArrayFromImage(reference).astype(bool))
    print("Dice of dcmqi's segments against plastimatch (MIM export):", {k: round(v, 4) for k, v in scores.items()})
    assert all(score >= 0.99 for score in scores.values()), scores

    seg = pydicom.dcmread(seg_file)
    assert seg.ContentDescription == "RTSTRUCT RTstruct by MIM Software Inc."
    # The SEG goes with the MIM study: same patient and study as the CT it was drawn on.
    ct = pydicom.dcmread(next(p for p in sorted(folder.glob("*.dcm")) if p.name != "rt.dcm"))
    assert (seg.StudyInstanceUID, seg.PatientID, seg.FrameOfReferenceUID) == (
        ct.StudyInstanceUID,
        ct.PatientID,
        ct.FrameOfReferenceUID,
    )


def test_dciodvfy_finds_no_error_in_the_mim_seg(mim: tuple[Path, LoadedStudy, list[RoiInfo], Path]) -> None:
    assert dciodvfy_errors(mim[3]) == []


# --------------------------------------------------------------------------------------------
# Identity: deterministic UIDs, received slices only
# --------------------------------------------------------------------------------------------


def test_same_study_and_settings_give_the_same_seg(
    phantom: tuple[PhantomManifest, LoadedStudy], tmp_path: Path
) -> None:
    _, study = phantom
    rois, masks = build_roi_masks(
        study.rtstruct_file, study.images.geometry, [], DEFAULTS.ignore_rois, tmp_path / "roi-masks.npz"
    )
    first = write_seg(study, rois, masks, tmp_path / "one", "settings-a")
    second = write_seg(study, rois, masks, tmp_path / "two", "settings-a")
    assert [p.name for p in first] == [p.name for p in second]
    one, two = without_creation_time(first[0]), without_creation_time(second[0])
    assert one == two, "same study and settings: the same dataset apart from when this copy was made"
    assert one.SeriesInstanceUID == seg_series_uid(study.images.series_instance_uid, "settings-a")
    assert first[0].name == f"{one.SOPInstanceUID}.dcm"
    assert is_valid_uid(one.SeriesInstanceUID) and is_valid_uid(one.SOPInstanceUID)
    assert one.SeriesInstanceUID != study.images.series_instance_uid

    # Processing again into the same folder replaces the file; other settings give other UIDs.
    again = write_seg(study, rois, masks, tmp_path / "one", "settings-a")
    assert again == first and sorted(p.name for p in (tmp_path / "one").iterdir()) == [first[0].name]
    other = pydicom.dcmread(write_seg(study, rois, masks, tmp_path / "three", "settings-b")[0])
    assert other.SeriesInstanceUID != one.SeriesInstanceUID and other.SOPInstanceUID != one.SOPInstanceUID


def test_a_missing_slice_is_never_referenced(tmp_path: Path) -> None:
    manifest = write_phantom(SMALL, tmp_path / "phantom")
    gone_uids = remove_slices(manifest, [GONE])
    study = load_study(dicom_files(manifest))
    assert study.images.missing_slices == (GONE,)
    _, seg_file = write_for(study, tmp_path / "out")

    received = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in study.images.files}
    seg = pydicom.dcmread(seg_file)
    referenced = {
        item.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for item in s.ReferencedInstanceSequence
    }
    assert referenced == set(received), "every received image and nothing else"
    assert not referenced & set(gone_uids)
    assert {item.ReferencedSOPInstanceUID for item in seg.SourceImageSequence} == set(received)

    positions = {
        uid: [float(v) for v in pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient]
        for uid, p in received.items()
    }
    frame_sources = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (source,) = frame.DerivationImageSequence[0].SourceImageSequence
        uid = source.ReferencedSOPInstanceUID
        assert uid in received, "a frame derived from an image that was never received"
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(position, positions[uid], atol=1e-3), "a frame is not on its source image"
        frame_sources.add(uid)
    # The gap crosses the solids, so its neighbours carry frames.
    below, above = (manifest.image_files[GONE + d] for d in (-1, 1))
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (below, above)} <= frame_sources

    # Each received image carries its own slice of each ROI, not a neighbour's (past the gap too).
    pixels = hd.seg.segread(seg_file).get_pixels_by_source_instance(
        list(received), assert_missing_frames_are_empty=True
    )
    structures = {roi.name: roi for roi in read_structure_set(study.rtstruct_file)}
    truth = truth_masks(SMALL)
    for index, name in enumerate(kept_names(study)):
        expected = roi_mask(structures[name], study.images.geometry)[0][list(study.images.slice_indices)]
        assert np.array_equal(pixels[..., index].astype(bool), expected), name
        assert dice(pixels[..., index].astype(bool), truth[name][list(study.images.slice_indices)]) >= 0.9, name


def fast_and_plain(study: LoadedStudy, work: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Dataset, Dataset]:
    """The SEG as written (highdicom given the input in its fastest form) and as the plain call
    writes it (bool array, segments last, the images off the run as further_source_images)."""
    _, fast = write_for(study, work / "fast")
    plain_call = functools.partial(seg_module._segmentation, plain=True)
    monkeypatch.setattr(seg_module, "_segmentation", plain_call)
    _, plain = write_for(study, work / "plain")
    return without_creation_time(fast), without_creation_time(plain)


def frame_sources(seg: Dataset) -> set[str]:
    return {
        source.ReferencedSOPInstanceUID
        for frame in seg.PerFrameFunctionalGroupsSequence
        for source in frame.DerivationImageSequence[0].SourceImageSequence
    }


def test_the_fast_call_gives_the_same_seg_as_the_plain_one(
    phantom: tuple[PhantomManifest, LoadedStudy], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, study = phantom
    fast, plain = fast_and_plain(study, tmp_path, monkeypatch)
    assert fast == plain, "the same dataset apart from when this copy was made"
    assert fast.file_meta == plain.file_meta
    # the case the fast form exists for: images beyond the run of slices with frames
    assert len(frame_sources(fast)) < len(fast.SourceImageSequence) == len(study.images.files)


def test_an_orientation_off_by_rounding_outside_the_frames_falls_back_to_the_plain_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NETRT accepts orientations that differ by up to 1e-4; highdicom wants source images with the
    very same one. An image without frames that differs keeps being referenced, as before."""
    manifest = write_phantom(SMALL, tmp_path / "phantom")
    bottom = manifest.image_files[0]
    edit(bottom, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 1e-7, 0, 0, 1, 0]))
    study = load_study(dicom_files(manifest))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in study.images.files]
    assert not seg_module._one_geometry(headers)
    fast, plain = fast_and_plain(study, tmp_path, monkeypatch)
    assert fast == plain
    bottom_uid = pydicom.dcmread(bottom, stop_before_pixels=True).SOPInstanceUID
    assert bottom_uid in {item.ReferencedSOPInstanceUID for item in fast.SourceImageSequence}
    assert bottom_uid not in frame_sources(fast)


# --------------------------------------------------------------------------------------------
# Codes, content description, bad input
# --------------------------------------------------------------------------------------------


def test_every_mapped_code_is_in_pydicoms_snomed_dictionary() -> None:
    for category, kind in [*TYPE_CODES.values(), GENERIC_CODES]:
        assert getattr(codes.SCT, category).scheme_designator == "SCT"
        assert getattr(codes.SCT, kind).scheme_designator == "SCT"
    assert set(TYPE_CODES) >= {"ORGAN", "GTV", "CTV", "PTV", "EXTERNAL", "AVOIDANCE", "BOLUS", "CAVITY"}


def test_unknown_and_empty_types_get_the_generic_code_and_others_theirs(
    phantom: tuple[PhantomManifest, LoadedStudy], tmp_path: Path
) -> None:
    _, study = phantom
    rois, masks = build_roi_masks(
        study.rtstruct_file, study.images.geometry, ["sphere", "box", "torus", "hollow_sphere"], [], tmp_path / "m.npz"
    )
    typed = [
        replace(roi, interpreted_type=t) for roi, t in zip(rois, ["", "NOT_A_TYPE", "EXTERNAL", "CTV"], strict=True)
    ]
    seg = hd.seg.segread(write_seg(study, typed, masks, tmp_path / "seg", "k")[0])
    expected = [
        GENERIC_CODES,
        GENERIC_CODES,
        ("AnatomicalStructure", "EntireBody"),
        ("SpatialAndRelationalConcept", "ClinicalTargetVolume"),
    ]
    for number, (category, kind) in enumerate(expected, 1):
        description = seg.get_segment_description(number)
        assert description.segmented_property_category.value == getattr(codes.SCT, category).value
        assert description.segmented_property_type.value == getattr(codes.SCT, kind).value


def test_content_description_is_cut_safely_to_64_characters() -> None:
    ds = Dataset()
    ds.StructureSetLabel = "L" * 16
    ds.Manufacturer = "A very long manufacturer name, Inc. \\ Division of Radiotherapy Planning Systems"
    text = content_description(ds)
    assert len(text) <= LO_MAX and text.endswith("...") and text.startswith("RTSTRUCT " + "L" * 16)
    assert "\\" not in text
    assert content_description(Dataset()) == "RTSTRUCT (no StructureSetLabel) by unknown manufacturer"


def test_a_mask_that_does_not_fit_the_grid_is_refused_naming_roi_and_file(
    phantom: tuple[PhantomManifest, LoadedStudy], tmp_path: Path
) -> None:
    _, study = phantom
    rois, _ = build_roi_masks(study.rtstruct_file, study.images.geometry, ["sphere"], [], tmp_path / "good.npz")
    slices, rows, columns = study.images.geometry.shape
    wrong = save_roi_masks({rois[0].number: np.ones((slices, rows, columns - 1), dtype=bool)}, tmp_path / "bad.npz")
    with pytest.raises(RoiError, match=r"ROI 'sphere'.*bad\.npz.*shape"):
        write_seg(study, rois, wrong, tmp_path / "seg", "k")
    absent = replace(rois[0], number=99, name="ghost")
    with pytest.raises(RoiError, match=r"ROI 'ghost'.*good\.npz.*99"):
        write_seg(study, [absent], tmp_path / "good.npz", tmp_path / "seg", "k")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(NetrtError, match=r"garbage\.npz"):
        write_seg(study, rois, tmp_path / "garbage.npz", tmp_path / "seg", "k")
    empty = save_roi_masks({rois[0].number: np.zeros((slices, rows, columns), dtype=bool)}, tmp_path / "empty.npz")
    with pytest.raises(RoiError, match="empty on the received slices"):
        write_seg(study, rois, empty, tmp_path / "seg", "k")
    assert not (tmp_path / "seg").exists() or not any((tmp_path / "seg").iterdir()), "nothing half-written"


def test_build_roi_masks_keeps_by_the_patterns_and_rasterises_each_roi(
    phantom: tuple[PhantomManifest, LoadedStudy], tmp_path: Path
) -> None:
    _, study = phantom
    rois, path = build_roi_masks(
        study.rtstruct_file, study.images.geometry, [], DEFAULTS.ignore_rois, tmp_path / "roi-masks.npz"
    )
    assert [roi.name for roi in rois] == kept_names(study)
    structures = {roi.number: roi for roi in read_structure_set(study.rtstruct_file)}
    for roi in rois:
        assert np.array_equal(
            load_roi_mask(path, roi.number), roi_mask(structures[roi.number], study.images.geometry)[0]
        )
    with pytest.raises(RoiError, match="no ROI is kept"):
        build_roi_masks(study.rtstruct_file, study.images.geometry, ["nothing-matches"], [], tmp_path / "none.npz")


def test_overlapping_seg_writes_leave_the_garbage_collector_as_they_found_it() -> None:
    """The collector pause is process-wide: two overlapping pauses (threads) end with it back on."""
    import gc
    import threading

    from netrt.outputs.seg import _collection_paused

    assert gc.isenabled()
    inside, release = threading.Event(), threading.Event()

    def first() -> None:
        with _collection_paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(10)
    with _collection_paused():  # overlaps the first: entered while off, leaves before it
        assert not gc.isenabled()
    assert not gc.isenabled()  # the first is still inside
    release.set()
    thread.join(10)
    assert gc.isenabled()
