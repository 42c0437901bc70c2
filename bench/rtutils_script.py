"""What users write without NETRT: rt-utils for the masks, pydicom for axial overlay series.

A plain script, written the way a competent user would, as the comparison for the processing
figure (issue 9) and the mask-accuracy figure:

1. ``RTStructBuilder.create_from(ct_folder, rtstruct)`` (rt-utils reads every CT slice, sorts
   them along the slice normal and reads the structure set);
2. ``get_roi_mask_by_name`` for every ROI not ignored, OR-ed into one mask;
3. for every CT slice already in memory (``rtstruct.series_data``), add an Overlay Plane (group
   6000) holding that slice of the mask (``pydicom.pixels.pack_bits``), give it a new SOP Instance
   UID and one new Series Instance UID, and ``dcmwrite`` it. Axial only: one plane, no reformat.

Nothing is fsync'd, nothing is checked beyond what rt-utils and pydicom check themselves.
Run alone: ``python -m bench.rtutils_script CT_AND_RTSTRUCT_FOLDER OUT_FOLDER``.
"""

from __future__ import annotations

import argparse
import fnmatch
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.pixels.utils import pack_bits
from pydicom.uid import generate_uid
from rt_utils import RTStructBuilder

IGNORE = ("*skull*", "*patient_outline*")  # what NETRT's default processing.ignore_rois drops


def find_rtstruct(folder: Path) -> Path:
    """The one RTSTRUCT file in ``folder`` (by Modality)."""
    found = [
        path
        for path in sorted(folder.iterdir())
        if pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality") == "RTSTRUCT"
    ]
    if len(found) != 1:
        raise RuntimeError(f"{folder}: expected one RTSTRUCT, found {len(found)}")
    return found[0]


def load(folder: Path) -> RTStructBuilder:
    return RTStructBuilder.create_from(dicom_series_path=str(folder), rt_struct_path=str(find_rtstruct(folder)))


def roi_masks(rtstruct: RTStructBuilder, names: list[str] | None = None) -> dict[str, npt.NDArray[np.bool_]]:
    """Each ROI's mask as rt-utils gives it: (rows, columns, slices), slices sorted along the normal."""
    wanted = rtstruct.get_roi_names() if names is None else names
    return {name: np.asarray(rtstruct.get_roi_mask_by_name(name), dtype=bool) for name in wanted}


def merged_mask(rtstruct: RTStructBuilder) -> tuple[npt.NDArray[np.bool_], list[str]]:
    kept = [name for name in rtstruct.get_roi_names() if not any(fnmatch.fnmatch(name.lower(), p) for p in IGNORE)]
    masks = roi_masks(rtstruct, kept)
    merged = np.zeros_like(next(iter(masks.values())))
    for mask in masks.values():
        merged |= mask
    return merged, kept


def write_axial_overlays(rtstruct: RTStructBuilder, mask: npt.NDArray[np.bool_], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    written = []
    for index, ds in enumerate(rtstruct.series_data):
        plane = mask[:, :, index]
        ds.add_new(0x60000010, "US", int(ds.Rows))
        ds.add_new(0x60000011, "US", int(ds.Columns))
        ds.add_new(0x60000022, "LO", "ROI mask")
        ds.add_new(0x60000040, "CS", "R")
        ds.add_new(0x60000050, "SS", [1, 1])
        ds.add_new(0x60000100, "US", 1)
        ds.add_new(0x60000102, "US", 0)
        ds.add_new(0x60003000, "OW", pack_bits(plane))
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = "ROI overlay (rt-utils script)"
        ds.SeriesNumber = 901
        path = out / f"{uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rtutils_script", description=__doc__)
    parser.add_argument("folder", type=Path, help="folder holding the CT series and its RTSTRUCT")
    parser.add_argument("out", type=Path, help="folder for the overlay series")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rtstruct = load(args.folder)
    mask, kept = merged_mask(rtstruct)
    files = write_axial_overlays(rtstruct, mask, args.out)
    print(f"{len(files)} files, ROIs {', '.join(kept)}, {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
