"""The public data classes of :mod:`netrt.study`: what finding and loading a study return."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from netrt.errors import StudyValidationError
from netrt.geometry import (
    ImageGeometry,
)


class NoStructureSetError(StudyValidationError):
    """The study holds images but no RTSTRUCT (raised by :func:`load_found_study`).

    A case of its own because it need not be a failure: ``processing.images_without_rtstruct``
    says whether such a study is quarantined (the default) or its images are passed on without
    an overlay (:func:`load_images_only`). :func:`load_study` raises a plain
    :class:`StudyValidationError` for it.
    """


@dataclass(frozen=True)
class ImagesOnlyStudy:
    """A study without an RTSTRUCT whose files are all readable, complete DICOM instances.

    ``files`` are every instance of the study (one per SOPInstanceUID, the first by path);
    ``warnings`` are run-summary sentences (files set aside), free of patient data.
    """

    study_instance_uid: str
    files: tuple[Path, ...]
    series: tuple[str, ...]  # "<SeriesInstanceUID> (<modality>, <n> files)"
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class StudyFiles:
    """The files of one study found under a folder.

    ``skipped`` lists the files under the scanned folder that are not usable DICOM instances
    (non-DICOM, unreadable, DICOMDIR, no StudyInstanceUID) with the reason. Such a file cannot
    say which study it belonged to, so every study of one scan carries the same list; callers
    report it once.
    """

    study_instance_uid: str
    files: tuple[Path, ...]
    skipped: tuple[tuple[Path, str], ...] = ()


@dataclass(frozen=True)
class ReceivedSlice:
    """One received slice: its grid slice, its file and SOP instance, and its frame in that file
    (1-based; 0 for a classic single-frame file)."""

    grid_index: int
    path: Path
    sop_instance_uid: str
    frame_number: int

    @property
    def name(self) -> str:
        """How messages name it: the file, and the frame of a multi-frame file."""
        return f"{self.path.name} frame {self.frame_number}" if self.frame_number else self.path.name


@dataclass(frozen=True)
class ImageSeries:
    """The validated image series of a study: one regular grid, slices in spatial order.

    ``files``, ``sop_instance_uids`` and ``positions`` are sorted by increasing position along
    the slice normal (``geometry.normal``), which is the order of the volume's first axis.
    ``positions`` are those positions in mm (of the received files).

    **Enhanced multi-frame series** (:mod:`netrt.study.multiframe`): every frame is one received
    slice. ``files`` and ``sop_instance_uids`` then list each *instance* once (a multi-frame file
    holds many slices), ``slice_files`` gives the index into ``files`` of each received slice and
    ``frame_numbers`` its 1-based frame in that file (both in spatial order, like
    ``slice_indices``). For a classic series both are empty and mean "slice ``i`` is file ``i``,
    no frame" (:meth:`received_slices` gives the same view of either). ``files`` stay one per
    instance so that anonymization, ``source`` forwarding and fingerprints see each file once.

    ``geometry`` is the uniform grid from the first to the last received slice. When slices are
    missing from the stack it has more slices than there are files: ``slice_indices`` gives the
    grid slice of each file (same order as ``files``) and ``missing_slices`` the grid slices no
    file covers, which :func:`read_image_volume` and the mask step fill by interpolation. For a
    complete series ``slice_indices`` is ``0..n-1`` and ``missing_slices`` is empty; both are
    derived that way when not given. The first and last grid slices are always received ones, so
    every missing slice has a received neighbour on each side (:meth:`received_neighbours`).

    Raises:
        ValueError: ``slice_indices`` / ``missing_slices`` do not describe the grid (wrong count,
            not increasing, outside the grid, overlapping, or an end slice missing).
    """

    series_instance_uid: str
    sop_class_uid: str
    modality: str
    frame_of_reference_uid: str
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    geometry: ImageGeometry
    positions: tuple[float, ...] = ()
    slice_indices: tuple[int, ...] = ()
    missing_slices: tuple[int, ...] = ()
    slice_files: tuple[int, ...] = ()
    frame_numbers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        grid_slices = self.geometry.shape[0]
        if len(self.slice_files) != len(self.frame_numbers):
            raise ValueError(
                f"{len(self.slice_files)} slice files and {len(self.frame_numbers)} frame numbers; one of each per "
                "received slice of a multi-frame series (none for a classic one)"
            )
        if any(not 0 <= i < len(self.files) for i in self.slice_files) or any(n < 1 for n in self.frame_numbers):
            raise ValueError("slice files must index files and frame numbers start at 1")
        received = len(self.slice_files) if self.slice_files else len(self.files)
        indices = tuple(int(i) for i in self.slice_indices) or tuple(range(received))
        if len(indices) != received or len(self.sop_instance_uids) != len(self.files):
            raise ValueError(
                f"series lists {len(self.files)} files, {len(self.sop_instance_uids)} SOP instance UIDs and "
                f"{len(indices)} slice indices for {received} received slices; one UID per file and one index per "
                "received slice expected"
            )
        if any(b <= a for a, b in pairwise(indices)):
            raise ValueError(f"slice indices must increase along the normal, got {indices}")
        if not indices or indices[0] != 0 or indices[-1] != grid_slices - 1:
            raise ValueError(
                f"the first and last of the {grid_slices} grid slices must be received slices, got indices {indices}"
            )
        present = set(indices)
        derived = tuple(i for i in range(grid_slices) if i not in present)
        missing = tuple(int(i) for i in self.missing_slices)
        if missing and missing != derived:
            raise ValueError(f"missing slices {missing} are not the grid slices without a file {derived}")
        object.__setattr__(self, "slice_indices", indices)
        object.__setattr__(self, "missing_slices", derived)

    @property
    def is_multiframe(self) -> bool:
        """The slices are frames of enhanced multi-frame instances."""
        return bool(self.frame_numbers)

    def received_slices(self) -> tuple[ReceivedSlice, ...]:
        """Every received slice in spatial order: its grid slice, file, SOP instance and frame (0: classic)."""
        if not self.frame_numbers:
            return tuple(
                ReceivedSlice(k, path, uid, 0)
                for k, path, uid in zip(self.slice_indices, self.files, self.sop_instance_uids, strict=True)
            )
        return tuple(
            ReceivedSlice(k, self.files[f], self.sop_instance_uids[f], n)
            for k, f, n in zip(self.slice_indices, self.slice_files, self.frame_numbers, strict=True)
        )

    def received_neighbours(self, grid_slice: int) -> tuple[int, int]:
        """The nearest received grid slices below and above a missing one (what it is filled from)."""
        position = bisect_left(self.slice_indices, grid_slice)
        if not 0 < position < len(self.slice_indices) or self.slice_indices[position] == grid_slice:
            raise ValueError(f"grid slice {grid_slice} is not a missing slice of this series")
        return self.slice_indices[position - 1], self.slice_indices[position]


@dataclass(frozen=True)
class StructureSetInfo:
    """One RTSTRUCT processed with a study: which file, which instance, its label and its age.

    ``rank`` orders structure sets by age (newest last): StructureSetDate, StructureSetTime, then
    InstanceCreationDate, InstanceCreationTime (times in seconds, -1 when absent); equal ranks
    cannot be told apart. ``age`` says the same in words for the run summary.
    """

    path: Path
    sop_instance_uid: str
    label: str  # StructureSetLabel ("" when absent)
    age: str
    rank: tuple[str, float, str, float]
    file_name: str  # of the received file (anonymized copies keep it: warnings name what was received)

    @property
    def name(self) -> str:
        """How written series name it: its StructureSetLabel, else the end of its SOPInstanceUID.

        Never the file name, which may be a received UID (the listener names files so) that must
        not reach a written header in full anonymization mode.
        """
        return self.label or f"RS {self.sop_instance_uid[-8:]}"


@dataclass(frozen=True)
class LoadedStudy:
    """A study that passed validation: what to process and what merely travels with it.

    ``other_files`` are kept with the study but not processed (RT Plan, RT Dose, other image
    series, superseded RTSTRUCTs, duplicate copies of an instance). ``warnings`` are human
    sentences for the run summary; they name files and UIDs, never patient data.
    ``reference_source`` says which rule tied the RTSTRUCT to the image series (the tag path of
    the referenced series, of the contour images, or of the frame of reference).
    ``registered_files`` are the files of the study's *other* image series in the processed
    series' frame of reference (a registered MR, a CBCT, another CT phase), sorted by path: never
    stacked with ``images`` nor processed, kept so that they can be forwarded with the study
    (``source`` routing). They are also in ``other_files``.
    ``structure_sets`` are the RTSTRUCTs to process on ``images`` (``processing.structure_sets``),
    newest first: the one in ``rtstruct_file`` alone for ``latest``; for ``each`` and ``merge``
    every RTSTRUCT whose references resolve to ``images``, ``rtstruct_file`` being the newest.
    ``structure_set_mode`` is the mode they were chosen by.
    """

    study_instance_uid: str
    images: ImageSeries
    rtstruct_file: Path
    rtstruct_sop_instance_uid: str
    other_files: tuple[Path, ...]
    warnings: tuple[str, ...]
    reference_source: str = ""
    registered_files: tuple[Path, ...] = ()
    structure_sets: tuple[StructureSetInfo, ...] = ()
    structure_set_mode: str = "latest"
