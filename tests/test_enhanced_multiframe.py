"""Issue 18 item 3: Enhanced multi-frame images read as a slice stack; derived outputs classic single-frame.

The phantom writes its CT as one Legacy Converted Enhanced CT file (``PhantomSpec.multiframe``,
highdicom's legacy converter) beside a classic twin with the same pixels and positions; the
RTSTRUCT references frames (ReferencedSOPInstanceUID + ReferencedFrameNumber). Every output is
checked against the analytic truth (as tests/test_process.py does), against the twin bit for bit
where that is the claim, and against dciodvfy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from netrt.config import ProcessingConfig
from netrt.errors import StudyValidationError
from netrt.masks import load_mask
from netrt.outputs.rois import load_roi_mask
from netrt.phantom import PhantomManifest, PhantomSpec, write_phantom
from netrt.pipeline import compute_mask, write_output
from netrt.study import (
    LoadedStudy,
    load_found_study,
    load_study,
    read_cross_sections,
    read_image_volume,
    read_source_image,
)

from .conftest import dciodvfy_errors, free_port, require_shared
from .overlay_check import score_series

SHAPES = ["sphere", "box", "hollow_sphere", "torus"]
SPEC = PhantomSpec(rows=96, columns=80, pixel_spacing=(2.0, 2.0), slice_spacing=2.0, reverse_order=True)
LEGACY_CT = "1.2.840.10008.5.1.4.1.1.2.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomManifest, PhantomManifest]:
    root = tmp_path_factory.mktemp("twins")
    multiframe = write_phantom(replace(SPEC, multiframe="legacy"), root / "multiframe")
    classic = write_phantom(SPEC, root / "classic")
    return multiframe, classic


@pytest.fixture(scope="module")
def outputs(twins: tuple[PhantomManifest, PhantomManifest], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every output kind and plane written for the multi-frame phantom (and its masks for the twin)."""
    multiframe, classic = twins
    processing = ProcessingConfig(outputs=["overlay", "burn_in", "color", "seg"])
    work = tmp_path_factory.mktemp("work")
    study = load_found_study(multiframe.out_dir / "dicom")
    twin = load_found_study(classic.out_dir / "dicom")
    masks = compute_mask(study, processing, work / "multiframe")
    twin_masks = compute_mask(twin, processing, work / "classic")
    written: dict[tuple[str, str], list[Path]] = {}
    for kind in ("overlay", "burn_in", "color"):
        for plane in ("axial", "coronal", "sagittal"):
            for series in write_output(study, masks, kind, plane, processing, work / "multiframe"):
                written[(kind, plane)] = list(series.files)
    (seg,) = write_output(study, masks, "seg", "study", processing, work / "multiframe")
    written[("seg", "study")] = list(seg.files)
    return {"study": study, "twin": twin, "masks": masks, "twin_masks": twin_masks, "written": written}


# --- loading ------------------------------------------------------------------------------------


def test_the_multiframe_file_loads_as_the_same_stack_as_its_classic_twin(
    twins: tuple[PhantomManifest, PhantomManifest],
) -> None:
    multiframe, classic = twins
    study = load_found_study(multiframe.out_dir / "dicom")
    twin = load_found_study(classic.out_dir / "dicom")
    assert study.images.sop_class_uid == LEGACY_CT
    assert study.images.files == (multiframe.out_dir / "dicom" / "CT_MF.dcm",)
    assert study.images.is_multiframe and sorted(study.images.frame_numbers) == list(range(1, SPEC.slice_count + 1))
    assert study.images.geometry.is_close(twin.images.geometry, atol_mm=1e-6)
    assert study.images.positions == pytest.approx(twin.images.positions)
    assert study.warnings == twin.warnings == ()
    assert np.array_equal(read_image_volume(study.images), read_image_volume(twin.images))  # HU, every frame's rescale
    source, source_twin = read_source_image(study.images), read_source_image(twin.images)
    assert np.array_equal(sitk.GetArrayFromImage(source), sitk.GetArrayFromImage(source_twin))
    assert source.GetOrigin() == pytest.approx(source_twin.GetOrigin())
    cuts, cuts_twin = read_cross_sections(study.images, 7, 40, 30), read_cross_sections(twin.images, 7, 40, 30)
    for plane in ("axial", "coronal", "sagittal"):
        assert np.array_equal(getattr(cuts, plane), getattr(cuts_twin, plane)), plane


def test_masks_equal_the_classic_twins_bit_for_bit(outputs: dict[str, Any]) -> None:
    masks, twin_masks = outputs["masks"], outputs["twin_masks"]
    assert masks.voxel_count > 0
    assert np.array_equal(load_mask(masks.mask_path), load_mask(twin_masks.mask_path))
    assert [r.name for r in masks.roi_infos] == [r.name for r in twin_masks.roi_infos] == SHAPES
    for roi in masks.roi_infos:
        mine = load_roi_mask(masks.roi_masks, roi.number)
        theirs = load_roi_mask(twin_masks.roi_masks, roi.number)
        assert mine.any() and np.array_equal(mine, theirs), roi.name


# --- derived outputs ------------------------------------------------------------------------


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_overlays_match_the_analytic_shapes(
    outputs: dict[str, Any], twins: tuple[PhantomManifest, PhantomManifest], plane: str
) -> None:
    manifest = twins[0]
    files = outputs["written"][("overlay", plane)]
    for score in score_series(manifest, files, SHAPES):
        assert score.dice >= (0.98 if plane == "axial" else 0.95), f"{plane} {score}"


def test_derived_series_are_classic_single_frame_images_naming_their_source_frames(
    outputs: dict[str, Any], twins: tuple[PhantomManifest, PhantomManifest]
) -> None:
    multiframe, _ = twins
    source = pydicom.dcmread(multiframe.image_files[0])
    frames = {n: source.PerFrameFunctionalGroupsSequence[n - 1] for n in range(1, int(source.NumberOfFrames) + 1)}
    axial = outputs["written"][("overlay", "axial")]
    assert len(axial) == SPEC.slice_count
    for path in axial:
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == CT_IMAGE
        assert "NumberOfFrames" not in ds and "PerFrameFunctionalGroupsSequence" not in ds
        (item,) = ds.SourceImageSequence
        assert item.ReferencedSOPClassUID == LEGACY_CT and item.ReferencedSOPInstanceUID == source.SOPInstanceUID
        frame = frames[int(item.ReferencedFrameNumber)]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(position)
        assert float(ds.RescaleIntercept) == -1024.0 and str(ds.PatientID) == str(source.PatientID)
        index = int(item.ReferencedFrameNumber) - 1
        assert np.array_equal(ds.pixel_array, source.pixel_array[index])  # the stored values untouched
    for kind, plane in [("overlay", "coronal"), ("burn_in", "axial"), ("color", "axial"), ("color", "sagittal")]:
        ds = pydicom.dcmread(outputs["written"][(kind, plane)][0])
        assert "NumberOfFrames" not in ds or int(ds.NumberOfFrames) == 1, (kind, plane)
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.FrameOfReferenceUID == source.FrameOfReferenceUID


def test_dciodvfy_reports_no_error_on_the_derived_files(outputs: dict[str, Any]) -> None:
    written = outputs["written"]
    failures = []
    checked = 0
    for (kind, plane), files in sorted(written.items()):
        for path in [files[0], files[len(files) // 2], files[-1]]:
            checked += 1
            errors = dciodvfy_errors(path)
            if errors:
                failures.append(f"{kind} {plane} {path.name}: {errors[:3]}")
    assert checked >= 10 and not failures, failures


def test_the_seg_references_the_source_frames(
    outputs: dict[str, Any], twins: tuple[PhantomManifest, PhantomManifest]
) -> None:
    import highdicom as hd

    multiframe, _ = twins
    source = pydicom.dcmread(multiframe.image_files[0])
    (path,) = outputs["written"][("seg", "study")]
    seg = hd.seg.segread(path)
    study: LoadedStudy = outputs["study"]
    masks = outputs["masks"]
    frame_of_slice = dict(zip(study.images.slice_indices, study.images.frame_numbers, strict=True))
    checked = 0
    for number, roi in enumerate(masks.roi_infos, 1):
        mask = load_roi_mask(masks.roi_masks, roi.number)
        for k in np.flatnonzero(mask.any(axis=(1, 2))):
            frame = frame_of_slice[int(k)]
            pixels = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=source.SOPInstanceUID,
                source_frame_numbers=[frame],
                segment_numbers=[number],
            )
            assert np.array_equal(pixels[0, :, :, 0].astype(bool), mask[k]), (roi.name, frame)
            checked += 1
    assert checked > 20
    for item in seg.PerFrameFunctionalGroupsSequence:
        (reference,) = item.DerivationImageSequence[0].SourceImageSequence
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID and int(reference.ReferencedFrameNumber) >= 1
    assert not dciodvfy_errors(path)


# --- refusals -------------------------------------------------------------------------------


def copy_study(manifest: PhantomManifest, target: Path) -> Path:
    shutil.copytree(manifest.out_dir / "dicom", target)
    return target / "CT_MF.dcm"


def edited(path: Path, change: Any) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path, enforce_file_format=True)


def test_a_frame_without_plane_position_is_refused_naming_file_tag_and_frame(
    twins: tuple[PhantomManifest, PhantomManifest], tmp_path: Path
) -> None:
    path = copy_study(twins[0], tmp_path / "dicom")
    edited(path, lambda ds: delattr(ds.PerFrameFunctionalGroupsSequence[4], "PlanePositionSequence"))
    with pytest.raises(StudyValidationError) as caught:
        load_found_study(tmp_path / "dicom")
    error = caught.value
    assert error.path == path and "frame 5" in error.reason
    assert error.tag == (
        "(5200,9230) PerFrameFunctionalGroupsSequence > (0020,9113) PlanePositionSequence (nor (5200,9229) "
        "SharedFunctionalGroupsSequence > (0020,9113) PlanePositionSequence) > (0020,0032) ImagePositionPatient"
    )


def test_frames_not_parallel_are_refused_naming_the_frame(
    twins: tuple[PhantomManifest, PhantomManifest], tmp_path: Path
) -> None:
    path = copy_study(twins[0], tmp_path / "dicom")

    def tilt(ds: Dataset) -> None:
        orientation = Dataset()
        orientation.ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
        ds.PerFrameFunctionalGroupsSequence[7].PlaneOrientationSequence = [orientation]

    edited(path, tilt)
    with pytest.raises(StudyValidationError) as caught:
        load_found_study(tmp_path / "dicom")
    assert caught.value.path == path and caught.value.tag == "(0020,0037) ImageOrientationPatient"
    assert caught.value.reason.startswith("frame 8: orientation")


def _spacing(ds: Dataset) -> None:
    measures = Dataset()
    measures.PixelSpacing = [2.5, 2.0]
    measures.SliceThickness = 2.0
    ds.PerFrameFunctionalGroupsSequence[3].PixelMeasuresSequence = [measures]


def _one_item_fewer(ds: Dataset) -> None:
    del ds.PerFrameFunctionalGroupsSequence[-1]


@pytest.mark.parametrize(
    ("change", "tag", "reason"),
    [
        (_spacing, "(0028,0030) PixelSpacing", "frame 4: pixel spacing [2.5, 2.0] mm differs from CT_MF.dcm frame"),
        (_one_item_fewer, "(5200,9230) PerFrameFunctionalGroupsSequence", "frames (NumberOfFrames) but 59 per-frame"),
    ],
    ids=["pixel-spacing-differs", "per-frame-items-missing"],
)
def test_inconsistent_functional_groups_are_refused_naming_file_tag_and_frame(
    twins: tuple[PhantomManifest, PhantomManifest], tmp_path: Path, change: Any, tag: str, reason: str
) -> None:
    path = copy_study(twins[0], tmp_path / "dicom")
    edited(path, change)
    with pytest.raises(StudyValidationError) as caught:
        load_found_study(tmp_path / "dicom")
    assert caught.value.path == path and caught.value.tag == tag
    assert reason in caught.value.reason


def test_uneven_frame_spacing_is_refused_naming_the_frames(
    twins: tuple[PhantomManifest, PhantomManifest], tmp_path: Path
) -> None:
    path = copy_study(twins[0], tmp_path / "dicom")

    def shift(ds: Dataset) -> None:
        position = ds.PerFrameFunctionalGroupsSequence[10].PlanePositionSequence[0]
        x, y, z = (float(v) for v in position.ImagePositionPatient)
        position.ImagePositionPatient = [x, y, z + 0.7]

    edited(path, shift)
    with pytest.raises(StudyValidationError) as caught:
        load_found_study(tmp_path / "dicom")
    assert caught.value.tag == "(0020,0032) ImagePositionPatient"
    assert "spacing" in caught.value.reason and "CT_MF.dcm frame" in caught.value.reason


def test_a_referenced_frame_the_image_lacks_is_refused(
    twins: tuple[PhantomManifest, PhantomManifest], tmp_path: Path
) -> None:
    copy_study(twins[0], tmp_path / "dicom")
    rtstruct = tmp_path / "dicom" / "RS.dcm"

    def beyond(ds: Dataset) -> None:
        ds.ROIContourSequence[0].ContourSequence[0].ContourImageSequence[0].ReferencedFrameNumber = 999

    edited(rtstruct, beyond)
    with pytest.raises(StudyValidationError) as caught:
        load_found_study(tmp_path / "dicom")
    assert caught.value.path == rtstruct and "frame(s) 999" in caught.value.reason
    assert caught.value.tag.endswith("(0008,1160) ReferencedFrameNumber")


def test_contours_naming_only_the_sop_instance_load_the_same(
    twins: tuple[PhantomManifest, PhantomManifest], tmp_path: Path
) -> None:
    copy_study(twins[0], tmp_path / "dicom")

    def drop_frames(ds: Dataset) -> None:
        for roi in ds.ROIContourSequence:
            for contour in roi.ContourSequence:
                del contour.ContourImageSequence[0].ReferencedFrameNumber

    edited(tmp_path / "dicom" / "RS.dcm", drop_frames)
    study = load_found_study(tmp_path / "dicom")
    assert study.images.geometry.is_close(load_found_study(twins[0].out_dir / "dicom").images.geometry)
    assert study.warnings == ()


def test_stale_references_to_a_multiframe_image_are_matched_by_position(tmp_path: Path) -> None:
    manifest = write_phantom(replace(SPEC, multiframe="legacy", stale_references="instances"), tmp_path / "p")
    study = load_found_study(manifest.out_dir / "dicom")
    assert study.images.is_multiframe
    assert any(w.startswith("references matched by position") for w in study.warnings)


def test_an_enhanced_ct_label_reads_the_same_functional_groups(
    twins: tuple[PhantomManifest, PhantomManifest], tmp_path: Path
) -> None:
    """The SOP class decides only that the functional groups are read: Enhanced CT Image Storage
    (the converted file relabelled; not a complete Enhanced CT IOD) loads onto the same grid."""
    path = copy_study(twins[0], tmp_path / "dicom")

    def relabel(ds: Dataset) -> None:
        ds.SOPClassUID = ENHANCED_CT
        ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT

    edited(path, relabel)
    study = load_found_study(tmp_path / "dicom")
    assert study.images.sop_class_uid == ENHANCED_CT
    assert study.images.geometry.is_close(load_found_study(twins[0].out_dir / "dicom").images.geometry)


# --- the whole flow, and a real export converted -----------------------------------------------


@pytest.mark.slow
def test_netrt_process_on_a_multiframe_study_with_full_anonymization_and_source_routing(tmp_path: Path) -> None:
    manifest = write_phantom(replace(SPEC, multiframe="legacy", rows=64, columns=56), tmp_path / "phantom")
    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {tmp_path / 'data'}}}\n"
        f"prefect: {{server_port: {free_port()}}}\n"
        "anonymization: {mode: full}\n"
        "processing: {outputs: [overlay, seg, color]}\n"
        "destinations:\n"
        f"  - {{name: out, type: folder, path: {tmp_path / 'out'}, outputs: [overlay, seg, color, source]}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "netrt", "process", str(manifest.out_dir / "dicom"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert ": ok: " in done.stdout and "ok: 1 of 1 studies" in done.stdout
    files = sorted((tmp_path / "out").rglob("*.dcm"))
    by_class: dict[str, list[Dataset]] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
        assert "PHANTOM" not in str(ds.PatientName) and ds.PatientID != manifest.spec.patient_id
    # source routing forwards the anonymized multi-frame file as it is: one file, every frame
    (forwarded,) = by_class[LEGACY_CT]
    original = pydicom.dcmread(manifest.image_files[0])
    assert (
        forwarded.SOPInstanceUID != original.SOPInstanceUID
        and forwarded.StudyInstanceUID != manifest.study_instance_uid
    )
    assert int(forwarded.NumberOfFrames) == SPEC.slice_count and forwarded.PixelData == original.PixelData
    # derived: classic CT overlays (axial, coronal, sagittal), colour SC, one SEG on the forwarded frames
    kinds = [str(ds.ImageType[2]) for ds in by_class[CT_IMAGE]]
    assert kinds.count("AXIAL") == SPEC.slice_count and kinds.count("REFORMATTED") >= 2 * 56
    assert all("NumberOfFrames" not in ds for ds in by_class[CT_IMAGE])
    (seg,) = by_class["1.2.840.10008.5.1.4.1.1.66.4"]
    references = {
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for item in seg.PerFrameFunctionalGroupsSequence
    }
    assert references == {forwarded.SOPInstanceUID}
    for ds in by_class[CT_IMAGE]:
        (item,) = ds.SourceImageSequence if "SourceImageSequence" in ds else [None]
        if item is not None and ds.ImageType[2] == "AXIAL":
            assert item.ReferencedSOPInstanceUID == forwarded.SOPInstanceUID and int(item.ReferencedFrameNumber) >= 1
    # nothing of the received identity in the nested functional groups of the forwarded file
    text = repr(forwarded)
    assert manifest.spec.patient_name not in text and manifest.spec.patient_id not in text
    assert original.SOPInstanceUID not in text and manifest.study_instance_uid not in text
    for item in forwarded.PerFrameFunctionalGroupsSequence:
        for source in item.get("ConversionSourceAttributesSequence", []):
            assert source.ReferencedSOPInstanceUID not in manifest.image_sop_instance_uids


def convert_to_legacy(classic: LoadedStudy, folder: Path, modality: str) -> Path:
    """``classic``'s image series as one Legacy Converted Enhanced CT/MR file (highdicom's legacy
    converter) in ``folder``, beside its RTSTRUCT whose image references are rewritten to that
    file's frames (ReferencedSOPInstanceUID + ReferencedFrameNumber); returns ``folder``."""
    import highdicom as hd

    folder.mkdir()
    slices = [pydicom.dcmread(p) for p in classic.images.files]
    instance = pydicom.uid.generate_uid()
    converter = (
        hd.legacy.LegacyConvertedEnhancedCTImage if modality == "CT" else hd.legacy.LegacyConvertedEnhancedMRImage
    )
    multiframe = converter(
        slices, series_instance_uid=classic.images.series_instance_uid, series_number=1,
        sop_instance_uid=instance, instance_number=1,
    )  # fmt: skip
    multiframe.save_as(folder / "MF.dcm", enforce_file_format=True)
    frame_of = {
        str(item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID): number
        for number, item in enumerate(multiframe.PerFrameFunctionalGroupsSequence, 1)
    }
    rs = pydicom.dcmread(classic.rtstruct_file)
    rewritten = 0
    for item in [
        *[i for f in rs.ReferencedFrameOfReferenceSequence for s in f.RTReferencedStudySequence
          for r in s.RTReferencedSeriesSequence for i in r.ContourImageSequence],
        *[i for roi in rs.ROIContourSequence for c in roi.get("ContourSequence", []) for i in c.ContourImageSequence],
    ]:  # fmt: skip
        frame = frame_of[str(item.ReferencedSOPInstanceUID)]
        item.ReferencedSOPClassUID = multiframe.SOPClassUID
        item.ReferencedSOPInstanceUID = instance
        item.ReferencedFrameNumber = frame
        rewritten += 1
    assert rewritten > len(slices)
    rs.save_as(folder / "RS.dcm", enforce_file_format=True)
    return folder


def test_real_mim_export_converted_to_legacy_enhanced_gives_the_same_masks(tmp_path: Path) -> None:
    """The real GE CT + MIM RTSTRUCT (../shared/data, copied, never modified): its CT converted to one
    Legacy Converted Enhanced CT file and the RTSTRUCT's image references rewritten to that file's
    frames; loaded and masked exactly as the classic original."""
    source = require_shared("rtutils-mim-ge-phantom")
    original = tmp_path / "original"
    shutil.copytree(source, original, ignore=shutil.ignore_patterns("*.txt", "*.md"))
    classic = load_found_study(original)
    converted = convert_to_legacy(classic, tmp_path / "converted", "CT")
    slices = classic.images.files

    study = load_found_study(converted)
    assert study.images.is_multiframe and study.images.sop_class_uid == LEGACY_CT
    assert study.images.geometry.is_close(classic.images.geometry, atol_mm=1e-6)
    assert not any("matched by position" in w for w in study.warnings)
    assert np.array_equal(read_image_volume(study.images), read_image_volume(classic.images))
    processing = ProcessingConfig(reformat_spacing_mm=2.0)
    masks = compute_mask(study, processing, tmp_path / "work-mf")
    twin = compute_mask(classic, processing, tmp_path / "work-classic")
    assert masks.voxel_count > 0 and np.array_equal(load_mask(masks.mask_path), load_mask(twin.mask_path))
    (axial,) = write_output(study, masks, "overlay", "axial", processing, tmp_path / "work-mf")
    assert len(axial.files) == len(slices)
    assert not dciodvfy_errors(axial.files[len(axial.files) // 2])


def test_full_anonymization_leaves_nothing_identifying_in_the_nested_functional_groups(tmp_path: Path) -> None:
    """The sentinel study of tests/test_anonymize.py as one multi-frame file: every identifying
    attribute the IOD defines, in the per-frame and shared functional groups too, holds a sentinel;
    none of them, and no original UID (the converter's ConversionSourceAttributesSequence names the
    classic slices), survives full mode, and the copies still load as the same stack."""
    from netrt.anonymize import anonymize_study

    from .test_anonymize import (
        FULL,
        SECRET,
        SENTINEL,
        SENTINEL_DATE,
        SENTINEL_NUMBERS,
        SENTINEL_TIME,
        make_sentinel_study,
        original_uids,
    )

    files = make_sentinel_study(tmp_path / "phantom", multiframe="legacy")
    (multiframe,) = [p for p in files if p.name == "CT_MF.dcm"]
    planted = pydicom.dcmread(multiframe)
    assert SENTINEL in repr(planted.PerFrameFunctionalGroupsSequence[0])  # the search below can fail
    assert SENTINEL in repr(planted.SharedFunctionalGroupsSequence[0])
    conversion = planted.PerFrameFunctionalGroupsSequence[0].ConversionSourceAttributesSequence[0]
    uids = original_uids(files)
    assert str(conversion.ReferencedSOPInstanceUID) in uids
    result = anonymize_study(files, tmp_path / "anonymized", FULL, SECRET)
    needles = {SENTINEL, SENTINEL_DATE, SENTINEL_TIME, *SENTINEL_NUMBERS.values(), *uids}
    needles.update(("PHANTOM^NETRT", "NETRT-PHANTOM-001", "19700101", "ACC0001"))
    hits = [f"{p.name}: {n}" for p in result.files for n in needles if n.encode() in p.read_bytes()]
    assert len(result.files) == 2 and not hits, hits[:10]
    study = load_study(list(result.files))
    original = load_study(files)
    assert study.images.is_multiframe and study.images.geometry.is_close(original.images.geometry)
    assert study.images.frame_numbers == original.images.frame_numbers


def test_legacy_converted_enhanced_mr_gives_classic_mr_outputs(tmp_path: Path) -> None:
    """The phantom's slices as an MR series (as tests/test_hardening_corpus.py's mr-series case
    makes it), converted to one Legacy Converted Enhanced MR file: the same stack and masks as the
    classic MR twin, and the derived axial and coronal overlays are MR Image Storage files that
    dciodvfy passes."""
    manifest = write_phantom(replace(SPEC, rows=48, columns=40, slices=20), tmp_path / "phantom")
    for path in manifest.image_files:
        ds = pydicom.dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE
        ds.Modality = "MR"
        for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType", "KVP"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "NONE", ""
        ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime, ds.MagneticFieldStrength = "2D", 10, 500, 1.5
        ds.save_as(path, enforce_file_format=True)
    classic = load_found_study(manifest.out_dir / "dicom")
    study = load_found_study(convert_to_legacy(classic, tmp_path / "converted", "MR"))
    assert study.images.sop_class_uid == "1.2.840.10008.5.1.4.1.1.4.4" and study.images.modality == "MR"
    assert study.images.geometry.is_close(classic.images.geometry, atol_mm=1e-6)
    assert np.array_equal(read_image_volume(study.images), read_image_volume(classic.images))
    processing = ProcessingConfig()
    masks = compute_mask(study, processing, tmp_path / "work")
    twin = compute_mask(classic, processing, tmp_path / "work-classic")
    assert masks.voxel_count > 0 and np.array_equal(load_mask(masks.mask_path), load_mask(twin.mask_path))
    for plane in ("axial", "coronal"):
        (series,) = write_output(study, masks, "overlay", plane, processing, tmp_path / "work")
        middle = series.files[len(series.files) // 2]
        assert pydicom.dcmread(middle).SOPClassUID == MR_IMAGE
        assert not dciodvfy_errors(middle), plane


def test_phantom_command_writes_the_ct_as_one_multiframe_file(tmp_path: Path) -> None:
    out = tmp_path / "ph"
    result = subprocess.run(
        [sys.executable, "-m", "netrt", "phantom", str(out), "--rows", "32", "--columns", "24", "--slices", "9",
         "--multiframe"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "one Legacy Converted Enhanced CT file of 9 frames" in result.stdout
    assert sorted(p.name for p in (out / "dicom").iterdir()) == ["CT_MF.dcm", "RS.dcm"]
    ds = pydicom.dcmread(out / "dicom" / "CT_MF.dcm", stop_before_pixels=True)
    assert ds.SOPClassUID == LEGACY_CT and int(ds.NumberOfFrames) == 9 and (ds.Rows, ds.Columns) == (32, 24)
    rs = pydicom.dcmread(out / "dicom" / "RS.dcm")
    items = [i for roi in rs.ROIContourSequence for c in roi.ContourSequence for i in c.ContourImageSequence]
    assert items and all(i.ReferencedSOPInstanceUID == ds.SOPInstanceUID for i in items)
    assert {int(i.ReferencedFrameNumber) for i in items} <= set(range(1, 10))


def test_a_series_split_over_two_multiframe_files_is_one_stack_and_gets_no_seg(
    twins: tuple[PhantomManifest, PhantomManifest], tmp_path: Path
) -> None:
    """Legacy converters may split a series into several instances: the frames of both files make
    one stack (and the same masks as the classic twin); the SEG, which highdicom builds on exactly
    one multi-frame source, is refused with the reason."""
    import highdicom as hd

    from netrt.errors import NetrtError

    classic = load_found_study(twins[1].out_dir / "dicom")
    folder = tmp_path / "split"
    folder.mkdir()
    slices = [pydicom.dcmread(p) for p in classic.images.files]
    half = len(slices) // 2
    frame_of: dict[str, tuple[str, int]] = {}
    for name, part in (("MF1.dcm", slices[:half]), ("MF2.dcm", slices[half:])):
        instance = pydicom.uid.generate_uid()
        converted = hd.legacy.LegacyConvertedEnhancedCTImage(
            part, series_instance_uid=classic.images.series_instance_uid, series_number=1,
            sop_instance_uid=instance, instance_number=1 if name == "MF1.dcm" else 2,
        )  # fmt: skip
        converted.save_as(folder / name, enforce_file_format=True)
        for number, item in enumerate(converted.PerFrameFunctionalGroupsSequence, 1):
            frame_of[str(item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)] = (instance, number)
    rs = pydicom.dcmread(classic.rtstruct_file)
    for item in [
        *[i for f in rs.ReferencedFrameOfReferenceSequence for s in f.RTReferencedStudySequence
          for r in s.RTReferencedSeriesSequence for i in r.ContourImageSequence],
        *[i for roi in rs.ROIContourSequence for c in roi.ContourSequence for i in c.ContourImageSequence],
    ]:  # fmt: skip
        item.ReferencedSOPClassUID = LEGACY_CT
        item.ReferencedSOPInstanceUID, item.ReferencedFrameNumber = frame_of[str(item.ReferencedSOPInstanceUID)]
    rs.save_as(folder / "RS.dcm", enforce_file_format=True)

    study = load_found_study(folder)
    assert len(study.images.files) == 2 and set(study.images.slice_files) == {0, 1}
    assert study.images.geometry.is_close(classic.images.geometry, atol_mm=1e-6)
    assert np.array_equal(read_image_volume(study.images), read_image_volume(classic.images))
    processing = ProcessingConfig(outputs=["overlay", "seg"])
    masks = compute_mask(study, processing, tmp_path / "work")
    twin = compute_mask(classic, processing, tmp_path / "work-classic")
    assert np.array_equal(load_mask(masks.mask_path), load_mask(twin.mask_path))
    (axial,) = write_output(study, masks, "overlay", "axial", processing, tmp_path / "work")
    assert len(axial.files) == len(slices)
    with pytest.raises(NetrtError, match="split over 2 multi-frame files"):
        write_output(study, masks, "seg", "study", processing, tmp_path / "work")


def test_an_rle_compressed_multiframe_file_gives_the_same_volume_and_uncompressed_classic_outputs(
    twins: tuple[PhantomManifest, PhantomManifest], tmp_path: Path
) -> None:
    """Frames of an encapsulated (RLE Lossless) multi-frame file are decoded one by one; the axial
    overlay images hold each frame's stored values, uncompressed (Explicit VR Little Endian)."""
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless

    path = copy_study(twins[0], tmp_path / "dicom")
    edited(path, lambda ds: ds.compress(RLELossless))
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == RLELossless
    study = load_found_study(tmp_path / "dicom")
    twin: LoadedStudy = load_found_study(twins[1].out_dir / "dicom")
    assert np.array_equal(read_image_volume(study.images), read_image_volume(twin.images))
    processing = ProcessingConfig()
    masks = compute_mask(study, processing, tmp_path / "work")
    (axial,) = write_output(study, masks, "overlay", "axial", processing, tmp_path / "work")
    frames = pydicom.dcmread(twins[0].image_files[0]).pixel_array
    for output in axial.files[::7]:
        ds = pydicom.dcmread(output)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        frame = int(ds.SourceImageSequence[0].ReferencedFrameNumber)
        assert np.array_equal(ds.pixel_array, frames[frame - 1])
    assert not dciodvfy_errors(axial.files[len(axial.files) // 2])


@pytest.mark.slow
def test_a_broken_multiframe_study_is_quarantined_naming_tag_and_frame_without_patient_data(tmp_path: Path) -> None:
    """Full anonymization: the quarantine reason names the tag path and the frame, and the file by
    its mapped SOP UID (the file is named by its received UID, as the listener names files), never
    the patient or a received UID."""
    from netrt.anonymize import load_or_create_secret, map_uid
    from netrt.config import load_config

    spec = replace(SPEC, multiframe="legacy", rows=48, columns=40, patient_name="SECRET^NAME", patient_id="SECRET-ID")
    manifest = write_phantom(spec, tmp_path / "phantom")
    received = pydicom.dcmread(manifest.image_files[0], stop_before_pixels=True).SOPInstanceUID
    study = tmp_path / "study"
    study.mkdir()
    path = study / f"{received}.dcm"
    shutil.copy(manifest.image_files[0], path)
    shutil.copy(manifest.rtstruct_file, study / "RS.dcm")
    edited(path, lambda ds: delattr(ds.PerFrameFunctionalGroupsSequence[4], "PlanePositionSequence"))
    data = tmp_path / "data"
    config = tmp_path / "netrt.yaml"
    config.write_text(
        f"paths: {{data_dir: {data}}}\nprefect: {{server_port: {free_port()}}}\nanonymization: {{mode: full}}\n"
        f"destinations:\n  - {{name: out, type: folder, path: {tmp_path / 'out'}}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "netrt", "process", str(study), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1 and "FAILED" in done.stdout, done.stdout + done.stderr[-3000:]
    (reason_file,) = (data / "quarantine").glob("*/reason.json")
    reason = reason_file.read_text()
    assert "PlanePositionSequence" in reason and "frame 5" in reason
    mapped = map_uid(str(received), load_or_create_secret(load_config(config).anonymization, data))
    assert mapped in reason
    for text in (done.stdout, done.stderr, reason):
        for secret in ("SECRET^NAME", "SECRET-ID", str(received), manifest.study_instance_uid):
            assert secret not in text
