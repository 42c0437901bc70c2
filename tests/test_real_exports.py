"""Real exports from planning and contouring systems, each against an independent rasteriser (issue 18).

No third-party export is kept in the repository. The exports run are:

- the MIM export in ``../shared/data/rtutils-mim-ge-phantom`` (skipped with the reason when
  ``../shared`` is absent, failed in CI);
- each subfolder of ``REAL_EXPORTS_DIR`` (one export per subfolder, its DICOM files in it), given
  by a developer beside the tests. Nothing is downloaded at test time.

``EXPECTED`` is the table of known exports, keyed by the RTSTRUCT's SOPInstanceUID (what is in the
files, whatever the folder is called) and checked against the RTSTRUCT's sha256: the outcome each
must give (processed, or refused naming the absent images), the ROIs compared, the tolerances, how
many files are bare data sets. An export the table does not know must be processed and match
plastimatch. A known export not given here is skipped with the reason. Provenance (source
repository, commit, path, license, writer, sha256 of every file) and the results are in
``tests/data/real/README.md``.

A bare data set (no preamble and File Meta Information, as the Monaco export keeps them) gets, in
the temporary copy, the preamble and File Meta Information NETRT's listener writes for a data set
received by C-STORE: what NETRT would have stored had the export been sent to it.

For each export:

- NETRT loads the study (``load_found_study``: grouping, reference resolution, stack checks) and
  every ROI is rasterised by the mask step's own rasteriser (``roi_mask``);
- plastimatch (Debian ``plastimatch``) converts the same RTSTRUCT on the same CT
  (``plastimatch convert --input RS --referenced-ct CTDIR --output-prefix OUT --prefix-format nii.gz``);
- per ROI the two masks lie on the same grid and agree voxel for voxel, or with Dice >= 0.99 where
  every voxel they disagree on is explained by one of two known differences of rule:

  - its centre is exactly on the contour (within 1 micrometre of an edge of a polygon on that
    slice): a pixel centre on the boundary is inside by one implementation's tie rule and outside
    by the other's, which no rule makes "right";
  - plastimatch has it and NETRT not, and its centre lies inside an even number (>= 2) of the ROI's
    polygons on that slice: a contour nested in another is a hole by NETRT's even-odd rule
    (``netrt.rasterize``, the rule CLOSED_PLANAR_XOR makes explicit), while plastimatch 1.9.4 fills
    it (seen on an Eclipse 16.1 export whose CTV has a 66 mm2 inner contour of opposite winding:
    all 191 voxels plastimatch adds lie inside both polygons);
- the study also goes through the process-study steps (validate, mask, axial overlay series) and
  its mask is the union of those per-ROI masks.

The exports of the table are a few CT slices each, so each test takes well under a few seconds
(a larger export takes what its size takes).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from listener.store import file_meta_prefix
from netrt.config import ProcessingConfig
from netrt.errors import StudyValidationError
from netrt.geometry import ImageGeometry
from netrt.masks import RoiContours, read_structure_set, roi_mask
from netrt.rasterize import geometric_type_skip_reason
from netrt.study import LoadedStudy, load_found_study
from tests.conftest import SHARED_DATA, require_shared, require_tool
from tests.test_hardening_corpus import run_folder

README = Path(__file__).resolve().parent / "data" / "real" / "README.md"
ON_CONTOUR_MM = 1e-3  # a disagreeing voxel's centre must be this close to an edge of the slice's polygons
MIN_DICE = 0.99

# Exports are not kept in the repository: REAL_EXPORTS_DIR=/path/to/exports (one export per
# subfolder, DICOM files in it) adds each. Not a NETRT_ variable: conftest clears those for every run.
EXTRA = os.environ.get("REAL_EXPORTS_DIR", "")


@dataclass(frozen=True)
class Expected:
    """What one export must give; documented, with its provenance, in tests/data/real/README.md."""

    name: str  # the case id (the folder name it is documented under; a folder may be named anything)
    outcomes: tuple[str, ...]  # the process-study outcome kinds accepted ("processed", "warning", "quarantined")
    rtstruct_sha256: str | None = None  # the RTSTRUCT file the expectation was measured on
    rois: tuple[str, ...] | None = None  # the ROIs with an inside, compared with plastimatch, in file order
    bare_files: int | None = None  # files that are bare data sets (no File Meta Information)
    absent: int | None = None  # a refusal: how many referenced images are absent from the export
    min_dice: float = MIN_DICE
    on_contour_mm: float = ON_CONTOUR_MM
    shared: bool = False  # kept in ../shared/data/<name> (run in CI)

    @property
    def refused(self) -> bool:
        return self.absent is not None


# Known exports, keyed by what is in the files (the RTSTRUCT's SOPInstanceUID), not by a folder
# name: wherever one is given, it must give this outcome. A change of outcome fails the test.
EXPECTED: dict[str, Expected] = {
    "2.16.840.1.114362.1.11940992.23790159890.563423606.667.93": Expected(
        "rtutils-mim-ge-phantom",
        ("processed",),
        "d2389ed9574e70835fb2fd6fa65812948a8ed59ccd70a0d6284e0f2661abde66",
        ("ROI-1", "ROI-2", "ROI-3", "ROI-4"),
        bare_files=0,
        shared=True,
    ),
    "1.2.246.352.221.5295756759917696191.17297108549342758074": Expected(
        "dicomrttool-varian-aria-16",
        ("processed",),
        "5bb70c8928aaa732c2efa54044141166957751d4eb8766f7ba8c900d131e817d",
        ("BODY", "SpinalCord"),
        bare_files=0,
    ),
    "1.2.840.10008.5.1.4.1.1.481.3.1535997926": Expected(
        "proknow-elekta-monaco-5.11",
        ("processed",),
        "c46a96596ff7969f96251991bf0c69d2d65f2c79650db5a30744698ebf5b2bb4",
        ("BODY", "PAROTID_LT", "PTV"),
        bare_files=8,  # every file: the test copy gets the listener's File Meta Information
    ),
    "1.2.752.243.1.1.20220722130644567.1980.53284": Expected(
        "radtools-raystation-9.2-one-slice",
        ("quarantined",),
        "def6eed468dfe7e561a33898718675b74cdb295dcb9a5ba72ad7991374259d86",
        bare_files=0,
        absent=164,  # 1 of the 165 CT slices the RTSTRUCT references was published
    ),
}
# An export the table does not know: processed (a warning allowed) and every ROI matching plastimatch.
DEFAULT = Expected("", ("processed", "warning"))


def rtstruct_in(folder: Path) -> tuple[Path, str] | None:
    """The folder's RTSTRUCT file and its SOPInstanceUID, when it holds exactly one; else None."""
    found = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, force=True, specific_tags=["Modality", "SOPInstanceUID"]
            )
        except Exception:  # not DICOM (a PROVENANCE.txt, a README)
            continue
        if ds.get("Modality") == "RTSTRUCT" and "SOPInstanceUID" in ds:
            found.append((path, str(ds.SOPInstanceUID)))
    return found[0] if len(found) == 1 else None


def _given_folders() -> list[Path]:
    root = Path(EXTRA) if EXTRA else None
    return sorted(p for p in root.iterdir() if p.is_dir()) if root and root.is_dir() else []


@dataclass(frozen=True)
class Case:
    """One export to run: where it was found (None: not given here) and what it must give."""

    id: str
    folder: Path | None
    expected: Expected
    uid: str | None  # the RTSTRUCT's SOPInstanceUID (the table's key)


def _cases() -> list[Case]:
    keyed = []
    for folder in _given_folders():
        found = rtstruct_in(folder)
        keyed.append((folder, found[1] if found else None))
    cases = []
    for uid, expected in EXPECTED.items():
        matches = [folder for folder, key in keyed if key == uid]
        if expected.shared and (SHARED_DATA / expected.name).is_dir():
            matches.insert(0, SHARED_DATA / expected.name)
        if not matches:
            cases.append(Case(expected.name, None, expected, uid))
        for n, folder in enumerate(matches):
            cases.append(Case(expected.name if n == 0 else f"{expected.name}@{folder.name}", folder, expected, uid))
    cases += [Case(f"extra-{folder.name}", folder, DEFAULT, key) for folder, key in keyed if key not in EXPECTED]
    return cases


CASES = _cases()
PROCESSED = [pytest.param(c, id=c.id) for c in CASES if not c.expected.refused]
REFUSED = [pytest.param(c, id=c.id) for c in CASES if c.expected.refused]


def located(case: Case) -> Path:
    """The export's folder; a known export not given here is skipped with the reason (the shared
    MIM export through require_shared: skipped when ../shared is absent, failed in CI)."""
    if case.folder is not None:
        return case.folder
    if case.expected.shared:
        return require_shared(case.expected.name)
    where = f"REAL_EXPORTS_DIR={EXTRA} has no subfolder" if EXTRA else "REAL_EXPORTS_DIR is unset, so no subfolder"
    pytest.skip(
        f"{case.id} not given: {where} with the RTSTRUCT SOPInstanceUID {case.uid} "
        "(place the export as a subfolder of REAL_EXPORTS_DIR; see tests/data/real/README.md)"
    )


def check_identity(case: Case, source: Path) -> None:
    """The export is the one the expectation was measured on: the RTSTRUCT's bytes (sha256) and
    how many of its files are bare data sets (given the listener's File Meta Information in the copy)."""
    expected = case.expected
    if expected.rtstruct_sha256 is not None:
        found = rtstruct_in(source)
        assert found is not None, f"{case.id}: {source} holds no single RTSTRUCT"
        digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
        assert digest == expected.rtstruct_sha256, (
            f"{case.id}: {found[0]} has the table's SOPInstanceUID but sha256 {digest}, "
            f"not {expected.rtstruct_sha256} (the file the expectation was measured on)"
        )
    if expected.bare_files is not None:
        bare = [p.name for p in sorted(source.iterdir()) if raw_dataset(p) is not None]
        assert len(bare) == expected.bare_files, f"{case.id}: bare data sets {bare}"


@dataclass(frozen=True)
class Converted:
    """One export, loaded by NETRT and converted by plastimatch (cached per test module)."""

    folder: Path  # the copy NETRT loaded (DICOM files only)
    study: LoadedStudy
    rois: tuple[RoiContours, ...]
    plastimatch_dir: Path


_CACHE: dict[str, Converted] = {}


def raw_dataset(path: Path) -> pydicom.Dataset | None:
    """The file's data set when it is a bare one (no preamble, ``DICM`` or group 0002, as some
    planning systems export: Monaco 5.11 through ProKnow) with SOP class and instance; else None."""
    if not path.is_file() or pydicom.misc.is_dicom(path):
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception:  # anything pydicom cannot parse is not a data set
        return None
    bare = not len(ds.file_meta)  # a group 0002 without the preamble is not bare
    return ds if bare and "SOPClassUID" in ds and "SOPInstanceUID" in ds else None


def as_received(path: Path, target: Path) -> None:
    """A bare data set as NETRT's listener stores it when it arrives by C-STORE: the listener's own
    preamble and File Meta Information (``listener.store.file_meta_prefix``, transfer syntax the
    data set's encoding), then the data set's bytes unchanged."""
    ds = raw_dataset(path)
    assert ds is not None, path
    implicit, little = ds.original_encoding
    assert little, f"{path}: big endian data set"
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    prefix = file_meta_prefix(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax)
    assert prefix is not None, path
    target.write_bytes(prefix + path.read_bytes())


def dicom_copy(source: Path, target: Path) -> Path:
    """The export's DICOM files in a folder of their own (no PROVENANCE.txt, no reference masks);
    bare data sets (no File Meta Information) as the listener would have stored them."""
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        if path.is_file() and pydicom.misc.is_dicom(path):
            shutil.copy2(path, target / path.name)
        elif raw_dataset(path) is not None:
            as_received(path, target / path.name)
    return target


def converted(case: Case, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    name = case.id
    if name in _CACHE:
        return _CACHE[name]
    source = located(case)
    plastimatch = require_tool("plastimatch")
    check_identity(case, source)
    work = tmp_path_factory.mktemp(name)
    folder = dicom_copy(source, work / "study")
    study = load_found_study(folder)
    # plastimatch gets the processed series alone, as its --referenced-ct wants one CT folder
    ct = work / "ct"
    ct.mkdir()
    for path in study.images.files:
        shutil.copy2(path, ct / path.name)
    out = work / "plastimatch"
    done = subprocess.run(
        [
            plastimatch,
            "convert",
            "--input",
            str(study.rtstruct_file),
            "--referenced-ct",
            str(ct),
            "--output-prefix",
            str(out),
            "--prefix-format",
            "nii.gz",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"plastimatch failed on {name}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    result = Converted(folder, study, tuple(read_structure_set(study.rtstruct_file)), out)
    _CACHE[name] = result
    return result


def voxel_centres(geometry: ImageGeometry, index: npt.NDArray[np.intp]) -> npt.NDArray[np.float64]:
    """Patient coordinates of voxels given as (slice, row, column) index rows."""
    k, i, j = (index[:, n].astype(float)[:, None] for n in range(3))
    sx, sy, sz = geometry.spacing
    return np.asarray(
        geometry.origin
        + j * sx * geometry.row_direction
        + i * sy * geometry.column_direction
        + k * sz * geometry.normal,
        dtype=float,
    )


def distance_to_contours(point: npt.NDArray[np.float64], polygons: list[npt.NDArray[np.float64]]) -> float:
    """Shortest distance (mm) from a point to the closed polygons' edges (all in one plane)."""
    best = np.inf
    for polygon in polygons:
        a = polygon
        b = np.roll(polygon, -1, axis=0)
        ab = b - a
        t = np.clip(((point - a) * ab).sum(axis=1) / np.maximum((ab * ab).sum(axis=1), 1e-12), 0.0, 1.0)
        best = min(best, float(np.linalg.norm(a + t[:, None] * ab - point, axis=1).min()))
    return best


def inside_count(point: npt.NDArray[np.float64], polygons: list[npt.NDArray[np.float64]]) -> int:
    """How many of the polygons (in the plane given by their first two coordinates) hold the point
    (crossing test; a point on an edge may count either way, which callers exclude first)."""
    count = 0
    x, y = point[0], point[1]
    for polygon in polygons:
        a = polygon[:, :2]
        b = np.roll(a, -1, axis=0)
        straddles = (a[:, 1] > y) != (b[:, 1] > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            crossing_x = a[:, 0] + (y - a[:, 1]) * (b[:, 0] - a[:, 0]) / (b[:, 1] - a[:, 1])
        count += int(np.count_nonzero(straddles & (x < crossing_x)) % 2)
    return count


def unexplained_disagreements(
    ours: npt.NDArray[np.bool_],
    theirs: npt.NDArray[np.bool_],
    roi: RoiContours,
    geometry: ImageGeometry,
    on_contour_mm: float = ON_CONTOUR_MM,
) -> tuple[list[str], dict[str, int]]:
    """Voxels the two masks disagree on that neither known rule difference explains (see the
    module docstring), and how many each rule explained (``"on contour"``, ``"nested hole"``)."""
    explained = {"on contour": 0, "nested hole": 0}
    index = np.argwhere(ours ^ theirs)
    if not len(index):
        return [], explained
    centres = voxel_centres(geometry, index)
    half_slice = geometry.spacing[2] / 2
    heights = [float(np.mean((c - geometry.origin) @ geometry.normal)) for c in roi.contours]
    basis = np.stack([geometry.row_direction, geometry.column_direction])
    problems = []
    for (k, i, j), centre in zip(index, centres, strict=True):
        height = float((centre - geometry.origin) @ geometry.normal)
        polygons = [c for c, h in zip(roi.contours, heights, strict=True) if abs(h - height) < half_slice]
        side = "NETRT only" if ours[k, i, j] else "plastimatch only"
        if not polygons:
            problems.append(f"[{k}, {i}, {j}] ({side}) on a slice without contours")
            continue
        # in-plane coordinates, so that oblique stacks are measured in their own plane
        flat = [(c - geometry.origin) @ basis.T for c in polygons]
        point = (centre - geometry.origin) @ basis.T
        distance = distance_to_contours(point, flat)
        if distance <= on_contour_mm:
            explained["on contour"] += 1
            continue
        holding = inside_count(point, flat)
        if not ours[k, i, j] and holding >= 2 and holding % 2 == 0:
            explained["nested hole"] += 1
            continue
        problems.append(
            f"[{k}, {i}, {j}] ({side}) centre {distance:.4f} mm from the contour, inside {holding} polygon(s)"
        )
    return problems, explained


def dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else 1.0


def test_no_third_party_dicom_is_kept_in_the_repository() -> None:
    """Exports are given beside the tests (../shared/data, REAL_EXPORTS_DIR), never committed:
    tests/data/real holds only the document of their provenance and expected outcomes, which names
    every export of the table by its RTSTRUCT's SOPInstanceUID and sha256."""
    folder = README.parent
    assert sorted(p.name for p in folder.rglob("*")) == ["README.md"], sorted(folder.rglob("*"))
    text = README.read_text(encoding="utf-8")
    for uid, expected in EXPECTED.items():
        for needle in (expected.name, uid, expected.rtstruct_sha256):
            assert needle and needle in text, f"{README} does not document {expected.name}: {needle!r}"


def test_real_exports_dir_is_a_folder_of_exports() -> None:
    """REAL_EXPORTS_DIR, when set, is a folder whose every subfolder is one export (one RTSTRUCT and
    its images); a wrong path is an error, not an empty run."""
    if not EXTRA:
        pytest.skip("REAL_EXPORTS_DIR is unset: only the MIM export in ../shared/data is run")
    root = Path(EXTRA)
    assert root.is_dir(), f"REAL_EXPORTS_DIR={EXTRA} is not a folder"
    folders = _given_folders()
    assert folders, f"REAL_EXPORTS_DIR={EXTRA} has no subfolder"
    for folder in folders:
        found = rtstruct_in(folder)
        assert found is not None, f"{folder}: not one RTSTRUCT"
        files = [p for p in folder.iterdir() if p.is_file() and p.name != "PROVENANCE.txt"]
        assert all(pydicom.misc.is_dicom(p) or raw_dataset(p) is not None for p in files), folder
        modalities = {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).Modality) for p in files}
        assert modalities & {"CT", "MR", "PT"}, (folder, modalities)


@pytest.mark.parametrize("case", PROCESSED)
def test_real_export_is_loaded_and_matches_plastimatch(case: Case, tmp_path_factory: pytest.TempPathFactory) -> None:
    got = converted(case, tmp_path_factory)
    name, expected = case.id, case.expected
    geometry = got.study.images.geometry
    rows = []
    compared = []
    for roi in got.rois:
        ours, used, skipped = roi_mask(roi, geometry)
        fillable = [geometric_type_skip_reason(kind) is None for kind in roi.geometric_types]
        # only contours without an inside (POINT, OPEN_*) are set aside, each with its sentence
        assert len(skipped) == fillable.count(False), f"{name} {roi.name}: NETRT skipped contours: {skipped}"
        path = got.plastimatch_dir / f"{roi.name}.nii.gz"
        if not any(fillable):
            # a marker or a line: no mask from NETRT, and none (or an empty one) from plastimatch
            assert not ours.any(), (name, roi.name)
            assert not path.exists() or not sitk.GetArrayFromImage(sitk.ReadImage(str(path))).any(), (name, roi.name)
            continue
        assert path.exists(), f"{name} {roi.name}: plastimatch wrote no mask ({sorted(got.plastimatch_dir.iterdir())})"
        image = sitk.ReadImage(str(path))
        # the same grid: plastimatch writes its masks on the referenced CT's grid
        np.testing.assert_allclose(image.GetOrigin(), geometry.origin, atol=1e-3, err_msg=f"{name} {roi.name}")
        np.testing.assert_allclose(image.GetSpacing(), geometry.spacing, atol=1e-4, err_msg=f"{name} {roi.name}")
        np.testing.assert_allclose(
            np.asarray(image.GetDirection()).reshape(3, 3).T,
            np.stack([geometry.row_direction, geometry.column_direction, geometry.normal]),
            atol=1e-6,
            err_msg=f"{name} {roi.name}",
        )
        theirs = sitk.GetArrayFromImage(image).astype(bool)
        assert theirs.shape == ours.shape, (name, roi.name)
        differing = int((ours ^ theirs).sum())
        score = dice(ours, theirs)
        rows.append(f"{roi.name}: {int(ours.sum())} voxels, {differing} differ, Dice {score:.5f}")
        assert int(ours.sum()) > 0, f"{name} {roi.name}: empty mask from {used} contours"
        assert score >= expected.min_dice, f"{name} {roi.name}: Dice {score:.4f} against plastimatch"
        problems, explained = unexplained_disagreements(ours, theirs, roi, geometry, expected.on_contour_mm)
        assert problems == [], f"{name} {roi.name}: disagreements no known rule explains: {problems[:10]}"
        if differing:
            rows[-1] += f" ({explained['on contour']} on the contour, {explained['nested hole']} in nested holes)"
        compared.append(roi.name)
    print(f"{name}: {'; '.join(rows)}")
    assert compared, f"{name}: no ROI with contours"
    if expected.rois is not None:
        assert tuple(compared) == expected.rois, name


@pytest.mark.parametrize("case", REFUSED)
def test_an_incomplete_real_export_is_refused_naming_the_absent_images(case: Case, tmp_path: Path) -> None:
    """The RTSTRUCT names images the export does not hold: refused (never processed on what is
    there), the message naming the file, the tag path, how many images are absent, the series and
    the first absent UIDs; through the process-study steps the study is quarantined with it."""
    source = located(case)
    check_identity(case, source)
    absent = case.expected.absent
    folder = dicom_copy(source, tmp_path / "study")
    (rtstruct,) = [p for p in folder.iterdir() if pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTSTRUCT"]
    with pytest.raises(StudyValidationError) as refused:
        load_found_study(folder)
    message = str(refused.value)
    assert message.startswith(f"{rtstruct}: (3006,0039) ROIContourSequence > (3006,0040) ContourSequence > ")
    assert f"references {absent} image(s) absent from image series " in message
    referenced = {
        item.ReferencedSOPInstanceUID
        for item in pydicom.dcmread(rtstruct)
        .ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
        .ContourImageSequence
    }
    present = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in folder.iterdir()}
    assert len(referenced - present) == absent
    (outcome,) = run_folder(folder, ProcessingConfig(planes=["axial"]), tmp_path / "work")
    assert outcome.kind in case.expected.outcomes and outcome.reason == message


@pytest.mark.parametrize("case", PROCESSED)
def test_real_export_is_processed(case: Case, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """Validate -> mask -> axial overlay series, as the process-study flow runs them; the study's
    mask is the union of the per-ROI masks compared with plastimatch above."""
    got = converted(case, tmp_path_factory)
    folder = dicom_copy(got.folder, tmp_path / "study")
    processing = ProcessingConfig(planes=["axial"], include_rois=[], ignore_rois=[])
    outcomes = run_folder(folder, processing, tmp_path / "work")
    assert len(outcomes) == 1 and outcomes[0].kind in case.expected.outcomes, [(o.kind, o.reason) for o in outcomes]
    (outcome,) = outcomes
    slices = len(got.study.images.files)
    assert outcome.mask is not None
    union = np.zeros_like(outcome.mask)
    for roi in got.rois:
        union |= roi_mask(roi, got.study.images.geometry)[0]
    np.testing.assert_array_equal(outcome.mask, union)
    assert outcome.written["axial"] == slices


def test_the_on_contour_rule_flags_a_disagreement_inside_the_roi(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The check above is not vacuous: a voxel deep inside an ROI that one mask lacks is reported,
    the tie voxels on the contour are not (on the MIM export of ../shared/data)."""
    (case,) = [c for c in CASES if c.expected.shared and c.id == c.expected.name]
    got = converted(case, tmp_path_factory)
    geometry = got.study.images.geometry
    roi = max(got.rois, key=lambda r: len(r.contours))
    ours = roi_mask(roi, geometry)[0]
    inside = np.argwhere(ours)
    centre = inside[len(inside) // 2]
    theirs = ours.copy()
    theirs[tuple(centre)] = False
    (problem,), _ = unexplained_disagreements(ours, theirs, roi, geometry)
    assert problem.startswith(f"[{centre[0]}, {centre[1]}, {centre[2]}] (NETRT only)")


def test_only_plastimatch_filling_a_nested_hole_is_excused() -> None:
    """An outer and an inner square on one slice: NETRT's even-odd rule leaves the inner one empty.
    A mask that fills it (plastimatch's way) differs only by the nested-hole rule; a mask that
    keeps NETRT's hole but adds a voxel outside both squares is reported."""
    # the Varian ARIA export's grid: 512 x 512 x 4, 1 mm pixels with centres at whole millimetres
    z = 1000.0
    geometry = ImageGeometry(
        np.array([0.0, 0.0, z]),
        np.array([1.0, 0, 0]),
        np.array([0, 1.0, 0]),
        np.array([0, 0, 1.0]),
        (1, 1, 1),
        (512, 512, 4),
    )

    def square(lo: float, hi: float) -> npt.NDArray[np.float64]:
        lo, hi = lo + 100.2, hi + 100.2  # edges between pixel centres
        return np.array([[lo, lo, z], [hi, lo, z], [hi, hi, z], [lo, hi, z]])

    roi = RoiContours(1, "ring", (square(0, 40), square(10, 30)), ("CLOSED_PLANAR", "CLOSED_PLANAR"))
    ours = roi_mask(roi, geometry)[0]
    filled = roi_mask(RoiContours(1, "solid", (square(0, 40),), ("CLOSED_PLANAR",)), geometry)[0]
    assert int(filled.sum()) - int(ours.sum()) == 20 * 20  # 1 mm pixels: the 20 x 20 mm hole
    problems, explained = unexplained_disagreements(ours, filled, roi, geometry)
    assert problems == [] and explained == {"on contour": 0, "nested hole": 400}
    # the same hole, the other way round (NETRT filled, plastimatch empty), is not excused
    problems, _ = unexplained_disagreements(filled, ours, roi, geometry)
    assert len(problems) == 400 and all("(NETRT only)" in p for p in problems)
