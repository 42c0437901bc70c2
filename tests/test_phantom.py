"""The analytic phantom: truth volumes, geometry, contours vs truth, files, DICOM validity.

Every later accuracy test trusts this phantom, so each property is checked against something
computed independently here: volumes against closed formulas, geometry against the DICOM
attributes read back from disk, contours against a brute-force crossing-number rasteriser written
in this file, NIfTI truth against SimpleITK's own index -> physical mapping.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk

from netrt.errors import NetrtError
from netrt.phantom import (
    PhantomManifest,
    PhantomSpec,
    load_manifest,
    phantom_geometry,
    roi_contains,
    roi_definitions,
    roi_names,
    slice_contours,
    truth_mask,
    truth_masks,
    write_phantom,
)

from .conftest import require_tool

BASE_ROIS = ["sphere", "box", "hollow_sphere", "torus", "Skull", "Patient_Outline"]
INNER_ROIS = ["sphere", "box", "hollow_sphere", "torus"]

# Small grids keep the file fast; the body and skull are cut by them, the inner solids are not.
SMALL_AXIAL = PhantomSpec(rows=72, columns=80, pixel_spacing=(2.5, 2.5), slice_spacing=3.0, extra_spheres=2)
SMALL_OBLIQUE = PhantomSpec(
    rows=96,
    columns=128,
    pixel_spacing=(2.0, 1.5),  # non-square pixels: a row/column mix-up cannot cancel out
    slice_spacing=3.0,
    orientation="oblique",
    oblique_degrees=(20.0, 10.0, 15.0),
)
SMALL_REVERSED = PhantomSpec(rows=48, columns=48, pixel_spacing=(4.0, 4.0), slice_spacing=5.0, reverse_order=True)


# --------------------------------------------------------------------------------------------
# Independent helpers
# --------------------------------------------------------------------------------------------


def read_series(manifest: PhantomManifest) -> list[pydicom.Dataset]:
    """All CT slices of the manifest's dicom/ folder, sorted by position along their normal."""
    datasets = [pydicom.dcmread(p) for p in sorted(manifest.image_files[0].parent.glob("CT_*.dcm"))]
    normal = np.cross(*np.reshape(np.asarray(datasets[0].ImageOrientationPatient, dtype=float), (2, 3)))
    return sorted(datasets, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))))


def slice_frame(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float, float]:
    """(IPP, row cosine, column cosine, normal, column spacing dx, row spacing dy) from a slice."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    dy, dx = (float(x) for x in ds.PixelSpacing)
    return np.asarray(ds.ImagePositionPatient, dtype=float), row, col, np.cross(row, col), dx, dy


def rasterise_even_odd(polygons: list[np.ndarray], rows: int, columns: int) -> npt.NDArray[np.bool_]:
    """Brute-force crossing-number fill of (x=column, y=row) polygons at pixel centres."""
    yy = np.arange(rows, dtype=float)[:, None]
    xx = np.arange(columns, dtype=float)[None, :]
    inside = np.zeros((rows, columns), dtype=bool)
    for poly in polygons:
        x0, y0 = poly[:, 0], poly[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        for a, b, c, d in zip(x0, y0, x1, y1, strict=True):
            if b == d:
                continue
            spans = (b > yy) != (d > yy)  # (rows, 1)
            x_cross = a + (yy - b) * (c - a) / (d - b)
            inside ^= spans & (xx < x_cross)
    return inside


def contours_by_slice(rs: pydicom.Dataset, roi_name: str) -> dict[str, list[np.ndarray]]:
    """ContourData (N, 3) arrays of one ROI grouped by referenced SOPInstanceUID."""
    number = next(int(r.ROINumber) for r in rs.StructureSetROISequence if r.ROIName == roi_name)
    roi = next(r for r in rs.ROIContourSequence if int(r.ReferencedROINumber) == number)
    out: dict[str, list[np.ndarray]] = {}
    for contour in roi.ContourSequence:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        assert len(points) == int(contour.NumberOfContourPoints)
        out.setdefault(contour.ContourImageSequence[0].ReferencedSOPInstanceUID, []).append(points)
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def dciodvfy_errors(path: Path) -> list[str]:
    exe = require_tool("dciodvfy")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    if proc.returncode != 0:
        errors.append(f"dciodvfy exit status {proc.returncode}")
    return errors


@pytest.fixture(scope="module")
def axial(tmp_path_factory: pytest.TempPathFactory) -> PhantomManifest:
    return write_phantom(SMALL_AXIAL, tmp_path_factory.mktemp("axial"))


@pytest.fixture(scope="module")
def oblique(tmp_path_factory: pytest.TempPathFactory) -> PhantomManifest:
    return write_phantom(SMALL_OBLIQUE, tmp_path_factory.mktemp("oblique"))


@pytest.fixture(scope="module")
def reversed_series(tmp_path_factory: pytest.TempPathFactory) -> PhantomManifest:
    return write_phantom(SMALL_REVERSED, tmp_path_factory.mktemp("reversed"))


# --------------------------------------------------------------------------------------------
# Ground truth volumes
# --------------------------------------------------------------------------------------------

VOLUME_GEOMETRIES = {
    "1mm": PhantomSpec(rows=160, columns=160, pixel_spacing=(1.0, 1.0), slice_spacing=1.0),
    "0.98x2.5mm": PhantomSpec(rows=176, columns=176, pixel_spacing=(0.98, 0.98), slice_spacing=2.5),
    "2mm": PhantomSpec(rows=96, columns=96, pixel_spacing=(2.0, 2.0), slice_spacing=2.0),
}


def _voxel_volume(spec: PhantomSpec) -> float:
    return spec.pixel_spacing[0] * spec.pixel_spacing[1] * spec.slice_spacing


@pytest.mark.parametrize("label", list(VOLUME_GEOMETRIES))
def test_sphere_truth_volume_within_one_percent(label: str) -> None:
    spec = VOLUME_GEOMETRIES[label]
    expected = 4.0 / 3.0 * math.pi * 20.0**3 / _voxel_volume(spec)
    count = np.count_nonzero(truth_mask(spec, "sphere"))
    assert abs(count / expected - 1.0) < 0.01, (label, count, expected)


@pytest.mark.parametrize("label", list(VOLUME_GEOMETRIES))
def test_hollow_sphere_truth_volume_within_one_percent(label: str) -> None:
    spec = VOLUME_GEOMETRIES[label]
    expected = 4.0 / 3.0 * math.pi * (22.0**3 - 12.0**3) / _voxel_volume(spec)
    count = np.count_nonzero(truth_mask(spec, "hollow_sphere"))
    assert abs(count / expected - 1.0) < 0.01, (label, count, expected)


def _lattice_count(centre: float, half: float, count: int, spacing: float) -> int:
    """Voxel centres (x_n = (n - (count-1)/2) * spacing) strictly inside centre +- half."""
    coords = (np.arange(count) - (count - 1) / 2.0) * spacing
    return int(np.count_nonzero(np.abs(coords - centre) < half))


@pytest.mark.parametrize("label", list(VOLUME_GEOMETRIES))
def test_box_truth_is_the_lattice_count_of_its_extent(label: str) -> None:
    spec = VOLUME_GEOMETRIES[label]
    mask = truth_mask(spec, "box")
    roi = next(r for r in roi_definitions(spec) if r.name == "box")
    cu, cv, cw = roi.shape.centre
    nx, ny, nz = phantom_geometry(spec).size
    dx, dy, dz = phantom_geometry(spec).spacing
    expected = _lattice_count(cu, 20.0, nx, dx) * _lattice_count(cv, 15.0, ny, dy) * _lattice_count(cw, 12.0, nz, dz)
    assert np.count_nonzero(mask) == expected
    # A box's volume is quantised by whole slices; where 40 x 30 x 24 mm is a whole number of
    # voxels the count must be exact to the 1 % standard of the sphere.
    if label != "0.98x2.5mm":
        assert abs(np.count_nonzero(mask) * _voxel_volume(spec) / (40 * 30 * 24) - 1.0) < 0.01
    ks, is_, js = np.nonzero(mask)
    assert (ks.max() - ks.min() + 1) * (is_.max() - is_.min() + 1) * (js.max() - js.min() + 1) == expected


def test_hollow_sphere_has_its_hole() -> None:
    spec = VOLUME_GEOMETRIES["1mm"]
    mask = truth_mask(spec, "hollow_sphere")
    geometry = phantom_geometry(spec)
    roi = next(r for r in roi_definitions(spec) if r.name == "hollow_sphere")
    k, i, j = np.indices(mask.shape)
    uvw = geometry.to_image_frame(geometry.voxel_to_patient(k, i, j))
    dist = np.linalg.norm(uvw - np.asarray(roi.shape.centre), axis=-1)
    centre_voxel = np.unravel_index(np.argmin(dist), mask.shape)
    assert not mask[centre_voxel]
    assert not mask[dist < 11.5].any(), "hole (r < 12 mm) must be empty"
    assert mask[(dist > 12.5) & (dist < 21.5)].all(), "shell (12..22 mm) must be full"
    assert not mask[dist > 22.5].any()


def test_truth_is_the_implicit_function_at_voxel_centres(oblique: PhantomManifest) -> None:
    """Voxel centres from the DICOM files themselves, pushed through the analytic solid."""
    spec = oblique.spec
    datasets = read_series(oblique)
    masks = truth_masks(spec)
    for k in (0, len(datasets) // 2 - 1, len(datasets) // 2 + 3, len(datasets) - 1):
        ipp, row, col, _, dx, dy = slice_frame(datasets[k])
        i, j = np.mgrid[0 : int(datasets[k].Rows), 0 : int(datasets[k].Columns)]
        points = ipp + j[..., None] * dx * row + i[..., None] * dy * col
        for name in ("sphere", "torus", "Skull", "Patient_Outline"):
            np.testing.assert_array_equal(masks[name][k], roi_contains(spec, name, points), err_msg=f"{name} k={k}")


def test_rois_do_not_overlap_and_nest_in_skull_and_body() -> None:
    spec = PhantomSpec(extra_spheres=8)  # the default 256 x 256 x 120 mm field
    masks = truth_masks(spec)
    inner = [n for n in masks if n not in ("Skull", "Patient_Outline")]
    assert len(inner) == 12
    union = np.zeros_like(masks["Skull"])
    for name in inner:
        assert np.count_nonzero(masks[name]) > 0, name
        assert not (union & masks[name]).any(), f"{name} overlaps another ROI"
        union |= masks[name]
    assert not (union & masks["Skull"]).any(), "inner ROIs must sit in the skull cavity"
    assert not ((union | masks["Skull"]) & ~masks["Patient_Outline"]).any()
    for name, mask in masks.items():  # nothing touches the field's faces (the body may run out in z)
        faces = [mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
        if name != "Patient_Outline":
            faces += [mask[0], mask[-1]]
        assert not any(face.any() for face in faces), f"{name} is cut by the default field"


# --------------------------------------------------------------------------------------------
# Series geometry read back from disk
# --------------------------------------------------------------------------------------------


def _assert_series_geometry(manifest: PhantomManifest) -> list[pydicom.Dataset]:
    spec = manifest.spec
    datasets = read_series(manifest)
    assert len(datasets) == spec.slice_count == len(manifest.image_files)
    ipp0, row, col, normal, dx, dy = slice_frame(datasets[0])
    assert abs(np.dot(row, row) - 1) < 1e-9 and abs(np.dot(col, col) - 1) < 1e-9 and abs(np.dot(row, col)) < 1e-9
    assert (dy, dx) == spec.pixel_spacing
    np.testing.assert_allclose(ipp0, manifest.geometry.origin, atol=1e-6)
    np.testing.assert_allclose(normal, manifest.geometry.slice_normal, atol=1e-9)
    for k, ds in enumerate(datasets):
        assert (int(ds.Rows), int(ds.Columns)) == (spec.rows, spec.columns)
        assert ds.pixel_array.shape == (spec.rows, spec.columns)
        np.testing.assert_allclose(ds.ImageOrientationPatient, list(row) + list(col), atol=1e-12)
        offset = np.asarray(ds.ImagePositionPatient, dtype=float) - ipp0
        np.testing.assert_allclose(offset, k * spec.slice_spacing * normal, atol=1e-6)
        assert float(ds.SliceThickness) == spec.slice_spacing
        assert ds.SOPInstanceUID == manifest.image_sop_instance_uids[k]
        assert Path(ds.filename) == manifest.image_files[k]
    return datasets


def _assert_hu_follow_truth(manifest: PhantomManifest, datasets: list[pydicom.Dataset]) -> None:
    """Pixel HU read from disk match each ROI's HU where the truth says the ROI is."""
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    masks = truth_masks(manifest.spec)
    layer = {"Patient_Outline": 0, "Skull": 1}  # the body holds the skull, the skull the rest
    for roi in manifest.rois:
        inner = [m for n, m in masks.items() if layer.get(n, 2) > layer.get(roi.name, 2)]
        values = hu[masks[roi.name] & ~np.logical_or.reduce([np.zeros_like(masks[roi.name]), *inner])]
        if values.size:
            assert abs(values.mean() - roi.hu) < 3.0, roi.name
    anything = np.logical_or.reduce(list(masks.values()))
    assert abs(hu[~anything].mean() + 1000) < 3.0


def test_axial_series_geometry_and_pixels(axial: PhantomManifest) -> None:
    datasets = _assert_series_geometry(axial)
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, len(datasets) + 1))
    assert [float(ds.SliceLocation) for ds in datasets] == sorted(float(ds.SliceLocation) for ds in datasets)
    np.testing.assert_allclose(datasets[0].ImageOrientationPatient, [1, 0, 0, 0, 1, 0])
    _assert_hu_follow_truth(axial, datasets)


def test_non_square_512x400(tmp_path: Path) -> None:
    spec = PhantomSpec(rows=512, columns=400, pixel_spacing=(0.5, 0.7), slice_spacing=8.0, slices=5)
    manifest = write_phantom(spec, tmp_path)
    datasets = _assert_series_geometry(manifest)
    assert datasets[0].pixel_array.shape == (512, 400)
    assert manifest.geometry.size == (400, 512, 5)
    assert manifest.geometry.spacing == (0.7, 0.5, 8.0)
    _assert_hu_follow_truth(manifest, datasets)


def _expected_rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def test_oblique_series_geometry(oblique: PhantomManifest) -> None:
    datasets = _assert_series_geometry(oblique)
    rotation = _expected_rotation(oblique.spec.oblique_degrees)
    np.testing.assert_allclose(datasets[0].ImageOrientationPatient, list(rotation[:, 0]) + list(rotation[:, 1]))
    assert abs(rotation[2, 2]) < 0.99, "the plane must really be tilted"
    # The volume centre is where the spec put it.
    geometry = oblique.geometry
    centre = geometry.voxel_to_patient(*(np.array([(n - 1) / 2 for n in reversed(geometry.size)])))
    np.testing.assert_allclose(centre, oblique.spec.volume_centre, atol=1e-9)
    _assert_hu_follow_truth(oblique, datasets)


def test_reverse_order_numbers_instances_against_the_normal(reversed_series: PhantomManifest) -> None:
    datasets = _assert_series_geometry(reversed_series)
    numbers = [int(ds.InstanceNumber) for ds in datasets]  # in increasing position
    assert numbers == list(range(len(datasets), 0, -1))
    assert all("SliceLocation" not in ds for ds in datasets)
    highest = pydicom.dcmread(reversed_series.out_dir / "dicom" / "CT_0001.dcm")
    assert highest.SOPInstanceUID == datasets[-1].SOPInstanceUID
    assert reversed_series.instance_numbers == numbers


# --------------------------------------------------------------------------------------------
# Contours
# --------------------------------------------------------------------------------------------


def test_sphere_contours_lie_in_their_planes_on_the_sphere(oblique: PhantomManifest) -> None:
    rs = pydicom.dcmread(oblique.rtstruct_file)
    by_uid = {ds.SOPInstanceUID: ds for ds in read_series(oblique)}
    sphere = oblique.roi("sphere")
    centre = np.asarray(sphere.centre_patient)
    contours = contours_by_slice(rs, "sphere")
    assert len(contours) >= 2 * 20 // 3 - 1  # a 40 mm sphere spans ~13 slices of 3 mm
    for uid, polygons in contours.items():
        ipp, _, _, normal, _, _ = slice_frame(by_uid[uid])
        assert len(polygons) == 1
        points = polygons[0]
        assert np.abs((points - ipp) @ normal).max() < 1e-3, "contour off its slice plane"
        height = float(np.dot(centre - ipp, normal))
        rho = math.sqrt(20.0**2 - height**2)
        in_plane = centre - height * normal
        radii = np.linalg.norm(points - in_plane, axis=1)
        mids = np.linalg.norm((points + np.roll(points, -1, axis=0)) / 2 - in_plane, axis=1)
        assert np.abs(radii - rho).max() < 0.05 and np.abs(mids - rho).max() < 0.05
        # Equal area: the polygon's area is the true circle's (shoelace in plane coordinates).
        rel = points - in_plane
        a, b = (
            rel @ np.asarray(by_uid[uid].ImageOrientationPatient[:3], dtype=float),
            rel @ np.asarray(by_uid[uid].ImageOrientationPatient[3:], dtype=float),
        )
        area = 0.5 * abs(np.dot(a, np.roll(b, -1)) - np.dot(b, np.roll(a, -1)))
        assert abs(area / (math.pi * rho**2) - 1) < 1e-4


@pytest.mark.parametrize("name", ["sphere", "box", "hollow_sphere", "torus", "Skull", "Patient_Outline"])
def test_contours_rasterise_to_the_truth(oblique: PhantomManifest, name: str) -> None:
    """A pixel-centre even-odd fill of the written contours reproduces the analytic truth."""
    rs = pydicom.dcmread(oblique.rtstruct_file)
    datasets = read_series(oblique)
    truth = truth_mask(oblique.spec, name)
    contours = contours_by_slice(rs, name)
    filled = np.zeros_like(truth)
    for k, ds in enumerate(datasets):
        ipp, row, col, _, dx, dy = slice_frame(ds)
        polygons = [
            np.stack([(p - ipp) @ row / dx, (p - ipp) @ col / dy], axis=1) for p in contours.get(ds.SOPInstanceUID, [])
        ]
        filled[k] = rasterise_even_odd(polygons, int(ds.Rows), int(ds.Columns))
        if not truth[k].any():
            assert not filled[k].any(), f"{name}: contour on slice {k} where the truth is empty"
    assert set(contours) <= {ds.SOPInstanceUID for ds in datasets}
    assert dice(filled, truth) >= 0.995, name
    # Every disagreeing voxel has its centre within the 0.05 mm polygon tolerance of the surface:
    # some point 0.05 mm away in the slice plane lies on the other side of the analytic surface.
    for k, i, j in zip(*np.nonzero(filled ^ truth), strict=True):
        ipp, row, col, _, dx, dy = slice_frame(datasets[k])
        centre = ipp + j * dx * row + i * dy * col
        angles = np.linspace(0.0, 2 * np.pi, 32, endpoint=False)[:, None]
        ring = centre + 0.05 * (np.cos(angles) * row + np.sin(angles) * col)
        assert (roi_contains(oblique.spec, name, ring) != truth[k, i, j]).any(), (name, k, i, j)


def test_hollow_sphere_slices_have_outer_and_inner_contours(axial: PhantomManifest) -> None:
    rs = pydicom.dcmread(axial.rtstruct_file)
    per_slice = contours_by_slice(rs, "hollow_sphere")
    counts = sorted(len(v) for v in per_slice.values())
    assert counts[0] == 1 and counts[-1] == 2  # caps show one circle, the middle two
    torus = contours_by_slice(rs, "torus")
    assert all(len(v) == 2 for v in torus.values()), "every torus slice is an annulus"
    # The public per-slice polygons are what the RTSTRUCT holds.
    public = slice_contours(axial.spec, "torus")
    assert {axial.image_sop_instance_uids[k] for k in public} == set(torus)
    for k, loops in public.items():
        written = torus[axial.image_sop_instance_uids[k]]
        for mine, theirs in zip(loops, written, strict=True):
            np.testing.assert_allclose(mine, theirs, atol=1e-5)


def test_structure_set_references(axial: PhantomManifest) -> None:
    rs = pydicom.dcmread(axial.rtstruct_file)
    assert rs.Modality == "RTSTRUCT" and rs.SOPInstanceUID == axial.rtstruct_sop_instance_uid
    frame = rs.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == axial.frame_of_reference_uid
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == axial.study_instance_uid
    series = study.RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == axial.image_series_uid
    assert {i.ReferencedSOPInstanceUID for i in series.ContourImageSequence} == set(axial.image_sop_instance_uids)
    assert [r.ROIName for r in rs.StructureSetROISequence] == roi_names(axial.spec)
    kinds = {o.ReferencedROINumber: o.RTROIInterpretedType for o in rs.RTROIObservationsSequence}
    outline = axial.roi("Patient_Outline")
    assert kinds[outline.number] == "EXTERNAL"
    assert all(len(r.ROIDisplayColor) == 3 for r in rs.ROIContourSequence)
    ct = pydicom.dcmread(axial.image_files[0])
    assert ct.StudyInstanceUID == rs.StudyInstanceUID == axial.study_instance_uid
    assert ct.FrameOfReferenceUID == axial.frame_of_reference_uid
    assert ct.Manufacturer == "NETRT phantom"


# --------------------------------------------------------------------------------------------
# Files: layout, NIfTI truth, manifest, determinism, refusals
# --------------------------------------------------------------------------------------------


def test_output_layout(axial: PhantomManifest) -> None:
    out = axial.out_dir
    files = sorted(p.name for p in (out / "dicom").iterdir())
    expected = [f"CT_{n:04d}.dcm" for n in range(1, axial.spec.slice_count + 1)] + ["RS.dcm"]
    assert files == sorted(expected)
    for path in (out / "dicom").iterdir():
        head = path.read_bytes()[:132]
        assert head[128:132] == b"DICM", f"{path} lacks the preamble"
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert sorted(p.name for p in (out / "truth").iterdir()) == sorted(f"{n}.nii.gz" for n in roi_names(axial.spec))
    assert (out / "phantom.json").is_file()
    assert roi_names(axial.spec) == [*BASE_ROIS[:4], "sphere_2", "sphere_3", "Skull", "Patient_Outline"]


@pytest.mark.parametrize("fixture", ["axial", "oblique"])
def test_nifti_truth_round_trips(fixture: str, request: pytest.FixtureRequest) -> None:
    manifest: PhantomManifest = request.getfixturevalue(fixture)
    datasets = read_series(manifest)
    masks = truth_masks(manifest.spec)
    for name, path in manifest.truth_files.items():
        image = sitk.ReadImage(str(path))
        assert image.GetPixelID() == sitk.sitkUInt8
        array = sitk.GetArrayFromImage(image)
        np.testing.assert_array_equal(array.astype(bool), masks[name], err_msg=name)
        assert int(array.sum()) == manifest.roi(name).truth_voxel_count
    image = sitk.ReadImage(str(manifest.truth_files["sphere"]))
    rng = np.random.default_rng(1)
    for _ in range(20):
        k, i, j = (int(rng.integers(0, n)) for n in (len(datasets), manifest.spec.rows, manifest.spec.columns))
        ipp, row, col, _, dx, dy = slice_frame(datasets[k])
        expected = ipp + j * dx * row + i * dy * col
        np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((j, i, k)), expected, atol=1e-3)


def test_manifest_round_trips(oblique: PhantomManifest) -> None:
    loaded = load_manifest(oblique.out_dir)
    assert loaded == oblique
    assert loaded.spec == SMALL_OBLIQUE
    sphere = loaded.roi("sphere")
    assert sphere.shape == "sphere" and sphere.parameters == {"radius_mm": 20.0}
    assert sphere.analytic_volume_mm3 == pytest.approx(4 / 3 * math.pi * 8000)
    assert all(p.is_file() for p in [*loaded.image_files, loaded.rtstruct_file, *loaded.truth_files.values()])


def test_load_manifest_refuses_missing(tmp_path: Path) -> None:
    with pytest.raises(NetrtError, match=r"phantom\.json"):
        load_manifest(tmp_path)


def test_same_spec_same_uids_and_pixels(axial: PhantomManifest, tmp_path: Path) -> None:
    again = write_phantom(SMALL_AXIAL, tmp_path / "again")
    assert again.study_instance_uid == axial.study_instance_uid
    assert again.image_sop_instance_uids == axial.image_sop_instance_uids
    assert again.image_files[3].read_bytes() == axial.image_files[3].read_bytes()
    other = write_phantom(PhantomSpec(rows=16, columns=16, pixel_spacing=(16.0, 16.0), seed=7), tmp_path / "other")
    assert other.study_instance_uid != axial.study_instance_uid
    uids = [other.study_instance_uid, other.frame_of_reference_uid, other.image_series_uid]
    uids += [other.rtstruct_series_uid, other.rtstruct_sop_instance_uid, *other.image_sop_instance_uids]
    assert len(set(uids)) == len(uids) and all(len(u) <= 64 for u in uids)


def test_later_options_at_their_defaults_keep_the_uids(axial: PhantomManifest, tmp_path: Path) -> None:
    """Options added for issue 18 leave every earlier phantom's UIDs alone; set, they change them."""
    explicit = replace(
        SMALL_AXIAL, stale_references="", contour_type="CLOSED_PLANAR", off_plane_jitter_mm=0.0, registered_series=""
    )
    again = write_phantom(explicit, tmp_path / "again")
    assert again.study_instance_uid == axial.study_instance_uid
    assert again.image_sop_instance_uids == axial.image_sop_instance_uids
    stale = write_phantom(replace(SMALL_AXIAL, stale_references="instances"), tmp_path / "stale")
    assert stale.study_instance_uid != axial.study_instance_uid


def test_registered_series_shares_the_frame_but_nothing_else(tmp_path: Path) -> None:
    manifest = write_phantom(replace(SMALL_REVERSED, registered_series="shifted"), tmp_path)
    planning = [pydicom.dcmread(p, stop_before_pixels=True) for p in manifest.image_files]
    registered = [pydicom.dcmread(p, stop_before_pixels=True) for p in manifest.registered_files]
    assert len(registered) == len(planning) - 1
    assert {ds.FrameOfReferenceUID for ds in registered} == {manifest.frame_of_reference_uid}
    assert {ds.SeriesInstanceUID for ds in registered}.isdisjoint({manifest.image_series_uid})
    assert {ds.SOPInstanceUID for ds in registered}.isdisjoint(manifest.image_sop_instance_uids)
    normal = np.asarray(manifest.geometry.slice_normal)
    planes = sorted(float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in planning)
    shifted = sorted(float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))) for ds in registered)
    np.testing.assert_allclose(np.asarray(shifted) - planes[:-1], SMALL_REVERSED.slice_spacing / 2, atol=1e-4)
    assert load_manifest(manifest.out_dir).registered_files == manifest.registered_files


def test_refuses_dicom_dir_with_files(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "old.dcm").write_bytes(b"x")
    with pytest.raises(NetrtError, match="already holds files"):
        write_phantom(SMALL_REVERSED, tmp_path)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rows": 4}, "rows"),
        ({"columns": 7}, "columns"),
        ({"pixel_spacing": (0.0, 1.0)}, "pixel_spacing"),
        ({"slice_spacing": -1.0}, "slice_spacing"),
        ({"slices": 0}, "slices"),
        ({"orientation": "sagittal"}, "orientation"),
        ({"extra_spheres": 9}, "extra_spheres"),
        ({"modality": "MR"}, "modality"),
        ({"patient_birth_date": "1970-01-01"}, "patient_birth_date"),
        ({"accession_number": "A" * 17}, "accession_number"),
        ({"stale_references": "yes"}, "stale_references"),
        ({"contour_type": "POINT"}, "contour_type"),
        ({"off_plane_jitter_mm": 0.5}, "off_plane_jitter_mm"),  # a quarter of the 2 mm slices or more
        ({"registered_series": "MR"}, "registered_series"),
    ],
)
def test_bad_spec_is_refused_naming_the_field(changes: dict[str, object], field: str, tmp_path: Path) -> None:
    spec = PhantomSpec(**changes)  # type: ignore[arg-type]
    with pytest.raises(NetrtError, match=rf"PhantomSpec\.{field}\b"):
        write_phantom(spec, tmp_path)
    assert not (tmp_path / "dicom").exists() or not any((tmp_path / "dicom").iterdir())


# --------------------------------------------------------------------------------------------
# External readers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["axial", "oblique"])
def test_dciodvfy_reports_no_errors(fixture: str, request: pytest.FixtureRequest) -> None:
    manifest: PhantomManifest = request.getfixturevalue(fixture)
    for path in (manifest.image_files[len(manifest.image_files) // 2], manifest.rtstruct_file):
        assert dciodvfy_errors(path) == [], path.name


@pytest.mark.parametrize("fixture", ["axial", "reversed_series"])
def test_rt_utils_loads_the_structure_set(fixture: str, request: pytest.FixtureRequest) -> None:
    from rt_utils import RTStructBuilder

    manifest: PhantomManifest = request.getfixturevalue(fixture)
    rtstruct = RTStructBuilder.create_from(
        dicom_series_path=str(manifest.out_dir / "dicom"), rt_struct_path=str(manifest.rtstruct_file)
    )
    assert rtstruct.get_roi_names() == roi_names(manifest.spec)
    if manifest.spec.rows == manifest.spec.columns:
        # rt-utils paints outline-touched pixels (it overshoots) and allocates (columns, rows), so
        # only a square grid is comparable; there its mask must still land on the sphere.
        mask = np.moveaxis(rtstruct.get_roi_mask_by_name("sphere"), 2, 0)  # -> (k, rows, columns)
        assert dice(mask, truth_mask(manifest.spec, "sphere")) > 0.8
