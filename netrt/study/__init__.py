"""Find the studies in a folder of DICOM files, then load and validate one of them.

Everything downstream (masks, overlays, reformats) trusts two things: the image series is one
regular grid, and the RTSTRUCT's contours belong to that series. A study that breaks either is
refused *here*, before any pixel is computed, with an error naming the file, the DICOM tag and the
reason, so that a quarantine reason tells the physicist what to fix without a traceback.

One irregularity is repaired instead of refused, because it is common (a slice lost in transfer or
deleted at the console) and safe to repair: slices *missing* from an otherwise regular stack. When
every received slice sits on the regular grid and no gap lacks more than
:data:`MAX_MISSING_SLICES_PER_GAP` slices, the series is described on the full grid, the missing
slices are listed (:attr:`ImageSeries.missing_slices`), interpolated by :func:`read_image_volume`,
and each gap is reported in :attr:`LoadedStudy.warnings`. Anything else (duplicated positions,
uneven spacing, bigger holes, sheared stacks) is still refused.

This module only reads. Whatever it finds (non-DICOM files, truncated files, a second RTSTRUCT),
nothing is moved, rewritten or deleted: "nothing lost" is the first promise NETRT makes.

Reading strategy, chosen for speed on 200-500 slice series:

* grouping (:func:`scan_files`, :func:`find_studies`) reads only a handful of top-level tags
  and stops before the pixel data;
* validation (:func:`load_study`) reads each slice header in full but *defers* large values, so
  pixel data is never loaded; only the first and last slices are decoded, to prove the transfer
  syntax can be decoded at all;
* :func:`read_image_volume` decodes every slice (pydicom with the pylibjpeg plugins: JPEG
  lossless, JPEG-LS, JPEG 2000, RLE) straight into one float32 array.

pydicom reads a truncated file without complaint (a short value is simply short), so every file
read here is also checked against its size: see :func:`_check_complete`.

The package has one module per job; every public name is importable from ``netrt.study``:

* :mod:`netrt.study.discovery`: discovery by header scan (:func:`find_studies`, :func:`scan_files`);
* :mod:`netrt.study.structure_set`: reading RTSTRUCTs, choosing the one to process and the image
  series it is drawn on;
* :mod:`netrt.study.references`: the chosen RTSTRUCT's image and frame references against the
  received images;
* :mod:`netrt.study.stack`: slice headers and stack geometry (one regular grid, missing slices);
* :mod:`netrt.study.pixels`: pixel data checks and decoding (:func:`read_image_volume`);
* :mod:`netrt.study.multiframe`: enhanced multi-frame images (Enhanced CT/MR, Legacy Converted
  Enhanced CT/MR), each frame one slice, read from the functional groups;
* :mod:`netrt.study.classic`: classic single-frame CT/MR datasets of those frames, for the outputs;
* :mod:`netrt.study.loader`: :func:`load_study` and the other entry points;
* :mod:`netrt.study.model`: the public data classes; :mod:`netrt.study._common`: constants and helpers.
"""

from netrt.study._common import (
    HEADER_DEFER_SIZE,
    IMAGE_MODALITIES,
    IMAGE_SOP_CLASSES,
    MAX_LISTED,
    MAX_MISSING_SLICES_PER_GAP,
    MEDIA_STORAGE_DIRECTORY_STORAGE,
    ORIENTATION_MATCH_TOLERANCE,
    PIXEL_SPACING_MATCH_TOLERANCE_MM,
    RT_STRUCTURE_SET_STORAGE,
    TAG_CONTOUR_IMAGES,
    TAG_FRAME,
    TAG_IOP,
    TAG_IPP,
    TAG_PIXEL_DATA,
    TAG_REFERENCED_FRAME,
    TAG_REFERENCED_SERIES,
    FloatArray32,
    FloatArray64,
)
from netrt.study.discovery import find_studies, find_study, scan_files
from netrt.study.loader import find_images_only, load_found_study, load_images_only, load_study
from netrt.study.model import (
    ImageSeries,
    ImagesOnlyStudy,
    LoadedStudy,
    NoStructureSetError,
    StructureSetInfo,
    StudyFiles,
)
from netrt.study.pixels import CrossSections, read_cross_sections, read_image_volume, read_source_image

__all__ = [
    "HEADER_DEFER_SIZE",
    "IMAGE_MODALITIES",
    "IMAGE_SOP_CLASSES",
    "MAX_LISTED",
    "MAX_MISSING_SLICES_PER_GAP",
    "MEDIA_STORAGE_DIRECTORY_STORAGE",
    "ORIENTATION_MATCH_TOLERANCE",
    "PIXEL_SPACING_MATCH_TOLERANCE_MM",
    "RT_STRUCTURE_SET_STORAGE",
    "TAG_CONTOUR_IMAGES",
    "TAG_FRAME",
    "TAG_IOP",
    "TAG_IPP",
    "TAG_PIXEL_DATA",
    "TAG_REFERENCED_FRAME",
    "TAG_REFERENCED_SERIES",
    "CrossSections",
    "FloatArray32",
    "FloatArray64",
    "ImageSeries",
    "ImagesOnlyStudy",
    "LoadedStudy",
    "NoStructureSetError",
    "StructureSetInfo",
    "StudyFiles",
    "find_images_only",
    "find_studies",
    "find_study",
    "load_found_study",
    "load_images_only",
    "load_study",
    "read_cross_sections",
    "read_image_volume",
    "read_source_image",
    "scan_files",
]
