"""Per-ROI masks (netrt.outputs.rois): stored cut to their bounding boxes, read back exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from netrt.outputs.rois import FALLBACK_PALETTE, load_roi_box, load_roi_mask, read_roi_infos, save_roi_masks
from netrt.phantom import PhantomSpec, write_phantom


def test_roi_masks_round_trip_exactly_and_are_stored_as_boxes(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    shape = (20, 64, 48)
    small = np.zeros(shape, dtype=bool)
    small[5:9, 10:30, 4:20] = rng.random((4, 20, 16)) > 0.4
    masks = {1: small, 2: np.zeros(shape, dtype=bool), 7: np.ones(shape, dtype=bool)}
    path = save_roi_masks(masks, tmp_path / "rois.npz")
    for number, mask in masks.items():
        assert np.array_equal(load_roi_mask(path, number), mask), number
    box = load_roi_box(path, 1)
    assert box.mask.shape[0] <= 4 and box.mask.size < small.size // 10, "only the bounding box is kept"
    for k in range(shape[0]):
        assert np.array_equal(box.slice_at(k), small[k]), k
    assert not load_roi_box(path, 2).full().any()
    with pytest.raises(KeyError):
        load_roi_box(path, 3)


def test_roi_colours_come_from_the_rtstruct_else_from_a_palette_unused_by_it(tmp_path: Path) -> None:
    write_phantom(PhantomSpec(rows=32, columns=32, slices=8), tmp_path / "p")
    rtstruct = tmp_path / "p" / "dicom" / "RS.dcm"
    ds = pydicom.dcmread(rtstruct)
    expected = {int(i.ReferencedROINumber): tuple(int(v) for v in i.ROIDisplayColor) for i in ds.ROIContourSequence}
    types = {int(o.ReferencedROINumber): o.RTROIInterpretedType for o in ds.RTROIObservationsSequence}
    names = {int(r.ROINumber): str(r.ROIName) for r in ds.StructureSetROISequence}
    kept = sorted(names.items())
    infos = read_roi_infos(rtstruct, kept)
    assert [(i.number, i.name) for i in infos] == kept
    for info in infos:
        assert info.color == expected[info.number] and info.color_from_rtstruct
        assert info.interpreted_type == types[info.number]
    # Without ROIDisplayColor: distinct palette colours, none equal to a colour the RTSTRUCT uses.
    first = ds.ROIContourSequence[0]
    del first.ROIDisplayColor
    ds.ROIContourSequence[1].ROIDisplayColor = [1, 2]  # malformed: not three values
    ds.save_as(tmp_path / "RS-nocolour.dcm")
    infos = read_roi_infos(tmp_path / "RS-nocolour.dcm", kept)
    fallback = [i for i in infos if not i.color_from_rtstruct]
    assert len(fallback) == 2
    assert all(i.color in FALLBACK_PALETTE for i in fallback)
    assert len({i.color for i in infos}) == len(infos)
