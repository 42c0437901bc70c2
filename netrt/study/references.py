"""Reference matching: the chosen RTSTRUCT's image and frame references against the received images."""

from __future__ import annotations

from pathlib import Path

from netrt.errors import StudyValidationError
from netrt.study._common import TAG_CONTOUR_IMAGES, TAG_REFERENCED_FRAME, _listed, _unique
from netrt.study.structure_set import _StructureSet


def _check_references(rs: _StructureSet, series_uid: str, image_sops: set[str], owner: dict[str, str]) -> None:
    """Every image the RTSTRUCT references for this series must be in it; else list what is absent."""
    referenced = _unique([*rs.series_images.get(series_uid, ()), *rs.contour_images])
    missing = [sop for sop in referenced if sop not in image_sops]
    if not missing:
        return
    elsewhere = [sop for sop in missing if sop in owner]
    other_series = _listed(_unique(owner[sop] for sop in elsewhere))
    note = f"; {len(elsewhere)} of them belong to other series of the study ({other_series})" if elsewhere else ""
    raise StudyValidationError(
        f"references {len(missing)} image(s) absent from image series {series_uid} "
        f"({len(image_sops)} present): {_listed(missing)}{note}",
        path=rs.path,
        tag=TAG_CONTOUR_IMAGES,
    )


def _check_frames(rs: _StructureSet, series_uid: str, frame: str, first_image: Path) -> list[str]:
    """The RTSTRUCT must be in the images' frame of reference; odd ROI frames are warnings."""
    rs_frame = rs.series_frames.get(series_uid) or (rs.frames[0] if rs.frames else "")
    if rs_frame and rs_frame != frame:
        raise StudyValidationError(
            f"RTSTRUCT frame of reference {rs_frame} differs from {frame} of its image series {series_uid} "
            f"(e.g. {first_image.name}); its contours would not line up with the images",
            path=rs.path,
            tag=TAG_REFERENCED_FRAME,
        )
    odd = [name or "(unnamed)" for name, roi_frame in rs.roi_frames if roi_frame and roi_frame != frame]
    if odd:
        return [
            f"ROI(s) {_listed(odd)} of {rs.path.name} name a frame of reference other than the images' {frame}; "
            "their contours may not line up"
        ]
    return []
