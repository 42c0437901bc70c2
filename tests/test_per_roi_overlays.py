"""Per-ROI overlay groups beyond the 16 an image can hold (issue 17 part 5)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom

from netrt.config import ProcessingConfig
from netrt.outputs.overlay import overlay_layers
from netrt.outputs.rois import RoiInfo, load_roi_mask
from netrt.phantom import PhantomSpec, write_phantom
from netrt.pipeline import compute_mask, write_output
from netrt.study import load_found_study


def test_groups_are_one_per_roi_up_to_sixteen() -> None:
    rois = [RoiInfo(n, f"roi{n}", (1, 2, 3), True, "") for n in range(1, 17)]
    groups, labels, notes = overlay_layers(rois)
    assert [len(g) for g in groups] == [1] * 16 and labels == tuple(r.name for r in rois) and notes == ()
    groups, labels, notes = overlay_layers([*rois, RoiInfo(17, "roi17", (1, 2, 3), True, "")])
    assert len(groups) == 16 and [r.number for r in groups[-1]] == [16, 17]
    assert labels[-1] == "roi16, roi17" and "'roi16', 'roi17' share the last group (601E)" in notes[0]


def test_more_than_sixteen_rois_share_the_last_group_and_the_summary_says_so(tmp_path: Path) -> None:
    write_phantom(PhantomSpec(rows=64, columns=64, pixel_spacing=(3.0, 3.0), slice_spacing=3.0, slices=24), tmp_path)
    rtstruct = tmp_path / "dicom" / "RS.dcm"
    ds = pydicom.dcmread(rtstruct)
    # 16 more copies of 'box' and 'sphere' alternately, each a separately numbered ROI.
    originals = {int(r.ROINumber): r for r in ds.StructureSetROISequence}
    contours = {int(c.ReferencedROINumber): c for c in ds.ROIContourSequence}
    observations = {int(o.ReferencedROINumber): o for o in ds.RTROIObservationsSequence}
    by_name = {str(r.ROIName): int(r.ROINumber) for r in originals.values()}
    for index in range(16):
        source = by_name["box" if index % 2 else "sphere"]
        number = 100 + index
        roi = copy.deepcopy(originals[source])
        roi.ROINumber, roi.ROIName = number, f"copy{index:02d}"
        contour = copy.deepcopy(contours[source])
        contour.ReferencedROINumber = number
        observation = copy.deepcopy(observations[source])
        observation.ReferencedROINumber, observation.ObservationNumber = number, number
        ds.StructureSetROISequence.append(roi)
        ds.ROIContourSequence.append(contour)
        ds.RTROIObservationsSequence.append(observation)
    ds.save_as(rtstruct)

    study = load_found_study(tmp_path / "dicom")
    processing = ProcessingConfig(overlay_groups="per_roi")
    masks = compute_mask(study, processing, tmp_path / "work")
    kept = list(masks.roi_infos)
    assert len(kept) == 20
    (series,) = write_output(study, masks, "overlay", "axial", processing, tmp_path / "work")
    assert series.notes and "share the last group (601E)" in series.notes[0]
    shared = [roi.number for roi in kept[15:]]
    for index, path in enumerate(series.files):
        written = pydicom.dcmread(path)
        groups = [g for g in range(0x6000, 0x6020, 2) if (g, 0x3000) in written]
        assert len(groups) == 16
        k = study.images.slice_indices[index]
        for g, roi in zip(groups[:15], kept[:15], strict=True):
            assert str(written[g, 0x1500].value) == roi.name
            assert np.array_equal(written.overlay_array(g).astype(bool), load_roi_mask(masks.roi_masks, roi.number)[k])
        last = np.zeros_like(written.overlay_array(0x601E), dtype=bool)
        for number in shared:
            last |= load_roi_mask(masks.roi_masks, number)[k]
        assert np.array_equal(written.overlay_array(0x601E).astype(bool), last)


def test_config_check_says_what_happens_beyond_sixteen_rois(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "netrt.yaml"
    config.write_text("processing: {overlay_groups: per_roi}\n")
    done = subprocess.run(
        [sys.executable, "-m", "netrt", "config", "check", str(config)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout and "16th and later share group 601E" in done.stdout
    config.write_text("processing: {overlay_groups: merged}\n")
    done = subprocess.run(
        [sys.executable, "-m", "netrt", "config", "check", str(config)], capture_output=True, text=True, timeout=120
    )
    assert "note:" not in done.stdout
