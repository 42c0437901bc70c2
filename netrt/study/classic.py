"""Classic single-frame CT/MR Image datasets built from the frames of an enhanced multi-frame image.

NETRT's derived outputs (overlay and burn-in series in every plane, colour series) are classic
single-frame images even when the source is one Enhanced or Legacy Converted Enhanced file: viewers
and PACS draw Overlay Plane groups (60xx) on single-frame images far more reliably than on frames
of a multi-frame image, and a per-slice file is what every output writer copies its header from.

For frame ``n``, :class:`ClassicFrames` gives the dataset a scanner would have written for that
slice: the enhanced file's top-level Patient, Study, Series, Frame of Reference, Equipment and
Image Pixel attributes; the frame's functional groups moved to the top level (Plane Position,
Plane Orientation, Pixel Measures, Pixel Value Transformation, Frame VOI LUT, and the attributes a
legacy converter kept in the Unassigned Shared/Per-Frame Converted Attributes); the classic SOP
class (CT Image Storage or MR Image Storage) with the type 1 and 2 attributes of its IOD that the
enhanced IOD does not carry; and, when asked for, the frame's stored pixel values (native,
uncompressed). The SOP instance of the source frame is kept in :attr:`ClassicFrames.reference`
for SourceImageSequence items (ReferencedSOPInstanceUID + ReferencedFrameNumber).

The file's header is read once per :class:`ClassicFrames` and each frame's pixels are decoded
alone, so writing every frame of a 500-frame file reads its header once, not 500 times.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian

from netrt.errors import DicomInputError
from netrt.study._common import TAG_PIXEL_DATA, _tag, _text
from netrt.study.model import ImageSeries
from netrt.study.multiframe import CLASSIC_SOP_CLASS, MR_IMAGE_STORAGE, PER_FRAME, SHARED, frame_count

#: Top-level attributes of the enhanced IODs that a classic CT/MR image does not have (multi-frame
#: and dimension bookkeeping, enhanced-only image-level flags).
_ENHANCED_ONLY = (
    PER_FRAME,
    SHARED,
    "NumberOfFrames",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "DimensionOrganizationType",
    "ConcatenationUID",
    "ConcatenationFrameOffsetNumber",
    "InConcatenationNumber",
    "InConcatenationTotalNumber",
    "RepresentativeFrameNumber",
    "ContentQualification",
    "PixelPresentation",
    "VolumetricProperties",
    "VolumeBasedCalculationTechnique",
    "ComplexImageComponent",
    "AcquisitionContrast",
    "PresentationLUTShape",
    "SourceImageEvidenceSequence",
    "ReferencedSeriesSequence",  # Common Instance Reference: it names the converter's source instances
    "StudiesContainingOtherReferencedInstancesSequence",
    "ReferencedImageEvidenceSequence",
    "AcquisitionDateTime",
    "AcquisitionDuration",
    "IsocenterPosition",
    "ImageComments",
    # Supplemental Palette Color LUT (an Enhanced CT/MR may map its MONOCHROME2 values to colour, as
    # Clunie's eCT_Supplemental does): a classic CT/MR image has no such module, and in its Image
    # Pixel module the palette is allowed only for PALETTE COLOR, which an enhanced CT/MR never is.
    *(f"{c}PaletteColorLookupTable{p}" for c in ("Red", "Green", "Blue") for p in ("Descriptor", "Data")),
    *(f"Segmented{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue")),
)

#: Functional-group macros whose contents become top-level attributes of the classic image (all
#: of them are classic attributes: geometry, rescale, window, and what a legacy converter kept).
_PROMOTED_GROUPS = (
    "UnassignedSharedConvertedAttributesSequence",
    "UnassignedPerFrameConvertedAttributesSequence",
    "PlanePositionSequence",
    "PlaneOrientationSequence",
    "PixelMeasuresSequence",
    "PixelValueTransformationSequence",
    "FrameVOILUTSequence",
)
#: Classic CT attributes an Enhanced CT keeps in its CT-specific functional groups.
_CT_GROUP_KEYWORDS = {
    "CTAcquisitionDetailsSequence": (
        "DataCollectionDiameter",
        "GantryDetectorTilt",
        "TableHeight",
        "RotationDirection",
    ),
    "CTReconstructionSequence": ("ReconstructionDiameter", "ConvolutionKernel"),
    "CTExposureSequence": ("ExposureTime", "XRayTubeCurrent"),
    "CTXRayDetailsSequence": ("KVP", "FilterType", "FocalSpots"),
}


def _items_of(ds: Dataset, index: int) -> list[Dataset]:
    """Shared then per-frame functional-group items of frame ``index`` (0-based): later ones win."""
    items = []
    shared = ds.get(SHARED)
    if shared:
        items.append(shared[0])
    per_frame = ds.get(PER_FRAME)
    if per_frame is not None and index < len(per_frame):
        items.append(per_frame[index])
    return items


class ClassicFrames:
    """Classic single-frame datasets of the frames of one enhanced image file (see module docstring).

    Raises (on construction):
        DicomInputError: the file cannot be read, or is not an enhanced CT/MR image.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._header = dcmread(self.path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several unrelated types on damaged files
            raise DicomInputError(f"cannot read DICOM file: {type(exc).__name__}: {exc}", path=self.path) from exc
        self.source_class = _text(self._header, "SOPClassUID")
        if self.source_class not in CLASSIC_SOP_CLASS:
            raise DicomInputError(
                f"SOP class {self.source_class or '(none)'} is not an enhanced CT/MR image class",
                path=self.path,
                tag=_tag("SOPClassUID"),
            )
        self.classic_class = CLASSIC_SOP_CLASS[self.source_class]
        self.source_instance = _text(self._header, "SOPInstanceUID")
        self.frames = frame_count(self._header, self.path)

    def reference(self, frame_number: int) -> Dataset:
        """A SourceImageSequence item naming the source frame (SOP class, instance, frame number)."""
        item = Dataset()
        item.ReferencedSOPClassUID = self.source_class
        item.ReferencedSOPInstanceUID = self.source_instance
        item.ReferencedFrameNumber = frame_number
        return item

    def frame(self, frame_number: int, *, pixels: bool) -> Dataset:
        """The classic CT/MR Image dataset of frame ``frame_number`` (1-based), with file meta.

        With ``pixels`` its PixelData holds the frame's stored values, native little endian.

        Raises:
            DicomInputError: no such frame, or its pixels cannot be decoded (named, with the frame).
        """
        if not 1 <= frame_number <= self.frames:
            raise DicomInputError(
                f"has no frame {frame_number} (NumberOfFrames {self.frames})",
                path=self.path,
                tag=_tag("NumberOfFrames"),
            )
        header = self._header
        ds = Dataset()
        for element in header:
            if element.keyword not in _ENHANCED_ONLY:
                ds.add(copy.deepcopy(element))
        items = _items_of(header, frame_number - 1)
        for item in items:
            for keyword in _PROMOTED_GROUPS:
                for group in item.get(keyword, []):
                    for element in group:
                        ds.add(copy.deepcopy(element))
            for keyword, wanted in _CT_GROUP_KEYWORDS.items():
                for group in item.get(keyword, []):
                    for name in wanted:
                        if name in group:
                            ds.add(copy.deepcopy(group[name]))
        ds.SOPClassUID = self.classic_class
        self._classic_attributes(ds, items)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = UID(self.classic_class)
        ds.file_meta.MediaStorageSOPInstanceUID = UID(self.source_instance)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if pixels:
            self._add_pixels(ds, frame_number)
        return ds

    def _classic_attributes(self, ds: Dataset, items: list[Dataset]) -> None:
        """Type 1 and 2 attributes of the classic CT/MR Image IOD that an enhanced image lacks."""
        frame_type: list[str] = []
        for item in items:
            for keyword in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence"):
                for group in item.get(keyword, []):
                    frame_type = [str(v) for v in group.get("FrameType", [])] or frame_type
        image_type = frame_type or [str(v) for v in ds.get("ImageType", ["ORIGINAL", "PRIMARY"])]
        image_type = [*[*image_type, "ORIGINAL", "PRIMARY"][:2], "AXIAL"]
        if frame_type[2:3] == ["LOCALIZER"]:
            image_type[2] = "LOCALIZER"
        ds.ImageType = image_type
        for keyword in ("InstanceNumber", "PatientOrientation", "AcquisitionNumber", "Laterality", "SeriesNumber"):
            if keyword not in ds:
                setattr(ds, keyword, None)
        if "ContentDate" not in ds or "ContentTime" not in ds:
            ds.ContentDate = _text(ds, "ContentDate") or _text(ds, "SeriesDate") or _text(ds, "StudyDate")
            ds.ContentTime = _text(ds, "ContentTime") or _text(ds, "SeriesTime") or _text(ds, "StudyTime")
        if self.classic_class == MR_IMAGE_STORAGE:
            for item in items:
                for group in item.get("MRTimingAndRelatedParametersSequence", []):
                    if "RepetitionTime" in group and "RepetitionTime" not in ds:
                        ds.RepetitionTime = group.RepetitionTime
                for group in item.get("MREchoSequence", []):
                    if "EffectiveEchoTime" in group and "EchoTime" not in ds:
                        ds.EchoTime = group.EffectiveEchoTime
            pulse = _text(ds, "EchoPulseSequence")
            if "ScanningSequence" not in ds:
                ds.ScanningSequence = {"SPIN": "SE", "GRADIENT": "GR", "BOTH": ["SE", "GR"]}.get(pulse, "RM")
            if "SequenceVariant" not in ds:
                ds.SequenceVariant = "NONE"
            for keyword in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength", "RepetitionTime"):
                if keyword not in ds:
                    setattr(ds, keyword, None)
            for keyword in ("EchoPulseSequence", "MultipleSpinEcho", "PhaseContrast", "TimeOfFlightContrast"):
                if keyword in ds:
                    del ds[keyword]
        else:
            if "RescaleIntercept" not in ds or "RescaleSlope" not in ds:
                ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
            if "KVP" not in ds:
                ds.KVP = None

    def _add_pixels(self, ds: Dataset, frame_number: int) -> None:
        try:
            stored = pixel_array(self.path, index=frame_number - 1)
        except Exception as exc:  # decoder errors come in many types
            raise DicomInputError(
                f"frame {frame_number}: pixel data cannot be read or decoded: {type(exc).__name__}: {exc}",
                path=self.path,
                tag=TAG_PIXEL_DATA,
            ) from exc
        bits = int(ds.BitsAllocated)
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        dtype = np.dtype(f"<{'i' if signed else 'u'}{max(bits, 8) // 8}")
        ds.PixelData = np.ascontiguousarray(stored, dtype=dtype).tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"


class SourceHeaders:
    """Headers (no pixels) of a series' received slices as classic single-frame images, and the
    SourceImageSequence item naming each: what an output writer copies per slice.

    A classic slice's header is its own file's; a frame's is built by :class:`ClassicFrames` (each
    multi-frame file's header read once). ``index`` is the position in
    :meth:`ImageSeries.received_slices` (spatial order).
    """

    def __init__(self, series: ImageSeries) -> None:
        self.series = series
        self.slices = series.received_slices()
        self._frames: dict[Path, ClassicFrames] = {}

    def _source(self, path: Path) -> ClassicFrames:
        if path not in self._frames:
            self._frames[path] = ClassicFrames(path)
        return self._frames[path]

    def header(self, index: int) -> Dataset:
        """Raises DicomInputError: the file is unreadable (named)."""
        received = self.slices[index]
        if received.frame_number:
            return self._source(received.path).frame(received.frame_number, pixels=False)
        try:
            return dcmread(received.path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several unrelated types on damaged files
            raise DicomInputError(f"cannot read DICOM file: {exc}", path=received.path) from exc

    def reference(self, index: int) -> Dataset:
        """ReferencedSOPClassUID, ReferencedSOPInstanceUID and, for a frame, ReferencedFrameNumber."""
        received = self.slices[index]
        item = Dataset()
        item.ReferencedSOPClassUID = self.series.sop_class_uid
        item.ReferencedSOPInstanceUID = received.sop_instance_uid
        if received.frame_number:
            item.ReferencedFrameNumber = received.frame_number
        return item
