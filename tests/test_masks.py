"""ROI reading, selection and merging; the real MIM export against plastimatch's reference masks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from netrt.errors import DicomInputError, RoiError
from netrt.geometry import ImageGeometry, geometry_from_slices, spatial_order
from netrt.masks import build_merged_mask, matches_any, read_structure_set, selection_reason
from netrt.phantom import PhantomSpec, truth_masks, write_phantom

from .conftest import require_shared

MIM = "rtutils-mim-ge-phantom"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def geometry_of(files: list[Path]) -> ImageGeometry:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = [float(v) for v in headers[0].ImageOrientationPatient]
    order = spatial_order([h.ImagePositionPatient for h in headers], iop)
    first = headers[0]
    return geometry_from_slices(
        [headers[i].ImagePositionPatient for i in order], iop, first.PixelSpacing, first.Rows, first.Columns
    )


def test_mim_export_matches_plastimatch_reference_masks() -> None:
    folder = require_shared(MIM)
    ct_files = [p for p in folder.glob("*.dcm") if p.name != "rt.dcm"]
    geometry = geometry_of(ct_files)
    rois = read_structure_set(folder / "rt.dcm")
    assert [r.name for r in rois] == ["ROI-1", "ROI-2", "ROI-3", "ROI-4"]
    for roi in rois:
        merged = build_merged_mask(folder / "rt.dcm", geometry, [roi.name], [])
        reference_image = sitk.ReadImage(str(folder / "reference_masks" / f"{roi.name}.nii.gz"))
        # the reference lies on the CT grid: same origin and spacing as ours
        assert np.allclose(reference_image.GetOrigin(), geometry.origin, atol=1e-3)
        assert np.allclose(reference_image.GetSpacing(), geometry.spacing, atol=1e-4)
        reference = sitk.GetArrayFromImage(reference_image).astype(bool)
        assert reference.shape == merged.mask.shape
        score = dice(merged.mask, reference)
        assert score >= 0.99, f"{roi.name}: Dice {score:.4f} against plastimatch"
        (report,) = [r for r in merged.rois if r.kept]
        assert report.voxel_count == int(merged.mask.sum()) > 4000


@pytest.mark.parametrize(
    ("name", "include", "ignore", "kept"),
    [
        ("Skull", [], ["*skull*"], False),
        ("SKULL_bone", [], ["*skull*"], False),
        ("Patient_Outline", [], ["*patient_outline*"], False),
        ("PTV_70", [], ["*skull*"], True),
        ("PTV_70", ["ptv*"], [], True),
        ("CTV", ["ptv*"], [], False),
        ("PTV_skull", ["ptv*"], ["*skull*"], False),
        ("Läsion_1", ["läsion*"], [], True),
    ],
)
def test_selection_by_case_insensitive_globs(name: str, include: list[str], ignore: list[str], kept: bool) -> None:
    assert selection_reason(name, include, ignore)[0] is kept


def test_selection_reason_names_the_pattern() -> None:
    assert matches_any("Skull", ["*outline*", "*SKULL*"]) == "*SKULL*"
    assert "'*skull*'" in selection_reason("Skull", [], ["*skull*"])[1]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[PhantomSpec, Path]:
    spec = PhantomSpec(rows=96, columns=80, pixel_spacing=(3.0, 3.0), slice_spacing=3.0)
    out = tmp_path_factory.mktemp("phantom")
    write_phantom(spec, out)
    return spec, out


def test_default_patterns_merge_the_four_shapes(phantom: tuple[PhantomSpec, Path]) -> None:
    spec, out = phantom
    files = sorted((out / "dicom").glob("CT_*.dcm"))
    merged = build_merged_mask(out / "dicom" / "RS.dcm", geometry_of(files), [], ["*skull*", "*patient_outline*"])
    assert merged.kept == ["sphere", "box", "hollow_sphere", "torus"]
    assert merged.ignored == ["Skull", "Patient_Outline"]
    truth = truth_masks(spec)
    expected = truth["sphere"] | truth["box"] | truth["hollow_sphere"] | truth["torus"]
    assert dice(merged.mask, expected) >= 0.98
    assert not merged.warnings


def test_nothing_kept_is_an_error_naming_the_rois(phantom: tuple[PhantomSpec, Path]) -> None:
    _, out = phantom
    files = sorted((out / "dicom").glob("CT_*.dcm"))
    with pytest.raises(RoiError, match=r"no ROI is left.*'sphere'"):
        build_merged_mask(out / "dicom" / "RS.dcm", geometry_of(files), ["nothing*"], [])


def test_point_empty_and_between_slice_contours_are_reported(phantom: tuple[PhantomSpec, Path], tmp_path: Path) -> None:
    _, out = phantom
    rs = pydicom.dcmread(out / "dicom" / "RS.dcm")
    sphere = rs.ROIContourSequence[0]
    sphere.ContourSequence[0].ContourGeometricType = "POINT"
    shifted = sphere.ContourSequence[1]
    points = [float(v) for v in shifted.ContourData]
    normal = np.cross(
        *np.reshape(
            [float(v) for v in pydicom.dcmread(next((out / "dicom").glob("CT_*.dcm"))).ImageOrientationPatient], (2, 3)
        )
    )
    moved = (np.reshape(points, (-1, 3)) + 1.5 * normal).ravel()  # half a slice off its plane
    shifted.ContourData = [f"{v:.4f}" for v in moved]
    del rs.ROIContourSequence[1].ContourSequence  # box: listed, but no contours
    path = tmp_path / "RS.dcm"
    rs.save_as(path)
    files = sorted((out / "dicom").glob("CT_*.dcm"))
    merged = build_merged_mask(path, geometry_of(files), ["sphere", "box"], [])
    text = "\n".join(merged.warnings)
    assert "ROI 'sphere': contour 0 skipped: POINT" in text
    assert "ROI 'sphere': contour 1 skipped:" in text and "between slices" in text
    assert "ROI 'box': kept but its mask is empty" in text
    assert merged.mask.any()


def test_unreadable_structure_set_names_the_file(tmp_path: Path, phantom: tuple[PhantomSpec, Path]) -> None:
    _, out = phantom
    broken = tmp_path / "RS.dcm"
    shutil.copy(out / "dicom" / "CT_0001.dcm", broken)
    with pytest.raises(DicomInputError, match=r"RS\.dcm.*StructureSetROISequence"):
        read_structure_set(broken)
