"""The run summary of one study, as the markdown shown in the Prefect UI and kept under the data dir.

The summary is built from plain data (a :class:`StudyReport`), so the same text can be rendered
for a run that failed half-way: whatever stages ran are listed, the failing one with its error.
It names ROIs, series, destinations and UIDs that may be shown (public ones when anonymization
is on), never patient data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StageTiming:
    stage: str
    seconds: float
    cached: bool = False


@dataclass
class StudyReport:
    """What one flow run did, filled in as it goes."""

    study: str
    flow_run_id: str | None = None
    anonymization: str = "off"
    rois: list[dict[str, Any]] = field(default_factory=list)
    series: list[dict[str, Any]] = field(default_factory=list)
    destinations: list[dict[str, Any]] = field(default_factory=list)
    stages: list[StageTiming] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # one sentence per RTSTRUCT processed (processing.structure_sets: several with each / merge)
    structure_sets: list[str] = field(default_factory=list)
    preview_path: str | None = None  # the first of ``previews`` (the newest structure set's)
    # (structure set name, PNG path) of each preview: one per structure set with `each`; name "" otherwise
    previews: list[tuple[str, str]] = field(default_factory=list)
    failed_stage: str | None = None
    error: str | None = None
    quarantine_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "flow_run_id": self.flow_run_id,
            "anonymization": self.anonymization,
            "rois": self.rois,
            "series": self.series,
            "destinations": self.destinations,
            "stages": [{"stage": s.stage, "seconds": round(s.seconds, 3), "cached": s.cached} for s in self.stages],
            "warnings": self.warnings,
            "structure_sets": self.structure_sets,
            "preview_path": self.preview_path,
            "previews": [{"structure_set": name, "path": path} for name, path in self.previews],
            "failed_stage": self.failed_stage,
            "error": self.error,
            "quarantine_id": self.quarantine_id,
        }


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def delivery_line(destinations: list[dict[str, Any]]) -> str:
    """Per destination, what this run stored and what earlier runs of the same delivery had, e.g.
    ``pacs 120 (80 stored in this run, 40 earlier)``: the CLI's words, true of this run only."""
    parts = []
    for dest in destinations:
        if not dest["ok"]:
            parts.append(f"{dest['name']} FAILED ({dest['stored']} of {dest['instances']} stored in this run)")
        elif dest["stored"] == dest["instances"]:
            parts.append(f"{dest['name']} {dest['instances']} (all stored in this run)")
        else:
            parts.append(
                f"{dest['name']} {dest['instances']} ({dest['stored']} stored in this run, "
                f"{dest['earlier']} by earlier runs of this delivery)"
            )
        if dest["ok"] and dest.get("committed") is not None:
            parts[-1] += f" [{_commitment_words(dest)}]"
    return ", ".join(parts)


def _commitment_words(dest: dict[str, Any]) -> str:
    """``storage commitment: all N committed`` (or ``committed N of M``) for a destination that asked."""
    committed, instances = dest["committed"], dest["instances"]
    if committed == instances:
        return f"storage commitment: all {committed} committed"
    return f"storage commitment: committed {committed} of {instances}"


def roi_rows(rois: Sequence[Any], colors: dict[int, tuple[int, int, int]], voxel_mm3: float) -> list[dict[str, Any]]:
    """One row per ROI of the structure set for the summary and the ROI table artifact: name,
    whether it was kept (and why), its voxels on the image grid, their volume in cm³ and, for kept
    ROIs, the colour it is drawn in (``#rrggbb``). ``rois`` are :class:`netrt.masks.RoiReport`."""
    rows = []
    for roi in rois:
        color = colors.get(int(roi.number))
        rows.append(
            {
                "name": roi.name,
                "kept": bool(roi.kept),
                "voxels": int(roi.voxel_count),
                "volume_cm3": round(int(roi.voxel_count) * voxel_mm3 / 1000.0, 3),
                "color": "#{:02x}{:02x}{:02x}".format(*color) if color is not None else "",
                "reason": roi.reason,
            }
        )
    return rows


def _swatch(color: str) -> str:
    """A colour swatch for markdown (the Prefect UI renders the span; plain viewers show the code)."""
    return f'<span style="color:{color}">&#9632;</span> `{color}`' if color else ""


def render_markdown(report: StudyReport) -> str:
    """The summary as GitHub-flavoured markdown (what Prefect's artifact page renders)."""
    status = "failed" if report.failed_stage else "processed"
    lines = [f"# Study {report.study}: {status}", ""]
    if report.failed_stage:
        lines += [f"**Failed at `{report.failed_stage}`:** {_cell(report.error or '')}", ""]
        if report.quarantine_id:
            lines += [f"Quarantined as `{report.quarantine_id}`: `netrt quarantine show {report.quarantine_id}`.", ""]
    lines += [f"Anonymization: {report.anonymization}.", ""]
    if report.structure_sets:
        lines += ["## Structure sets processed", ""] + [f"- {_cell(s)}" for s in report.structure_sets] + [""]
    if report.rois:
        lines += [
            "## ROIs",
            "",
            "| ROI | colour | kept | voxels | volume cm³ | why |",
            "| --- | --- | --- | ---: | ---: | --- |",
        ]
        for roi in report.rois:
            kept = "yes" if roi["kept"] else "no"
            volume = f"{roi['volume_cm3']:.2f}" if "volume_cm3" in roi else ""
            lines.append(
                f"| {_cell(roi['name'])} | {_swatch(roi.get('color', ''))} | {kept} | {roi['voxels']} | {volume} "
                f"| {_cell(roi['reason'])} |"
            )
        lines.append("")
    if report.series:
        lines += [
            "## Series written",
            "",
            "| output | plane | step | instances | SeriesInstanceUID |",
            "| --- | --- | --- | ---: | --- |",
        ]
        for series in report.series:
            kind = series.get("kind", "burn_in" if series["burn_in"] else "overlay")
            lines.append(
                f"| {kind} | {series['plane']} | {_cell(series.get('label', ''))} | {series['instances']} "
                f"| `{series['series_instance_uid']}` |"
            )
        lines.append("")
    if report.destinations:
        lines += [
            "## Destinations",
            "",
            "| destination | outcome | instances | stored in this run | stored by earlier runs | detail |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for dest in report.destinations:
            outcome = "delivered" if dest["ok"] else "FAILED"
            lines.append(
                f"| {_cell(dest['name'])} | {outcome} | {dest['instances']} | {dest['stored']} | {dest['earlier']} "
                f"| {_cell(dest['detail'])} |"
            )
        lines.append("")
        committing = [d for d in report.destinations if d["ok"] and d.get("committed") is not None]
        lines += [f"- {_cell(d['name'])}: {_commitment_words(d)}" for d in committing]
        if committing:
            lines.append("")
    if report.stages:
        lines += ["## Time per stage", "", "| stage | seconds | from cache |", "| --- | ---: | --- |"]
        for stage in report.stages:
            lines.append(f"| {stage.stage} | {stage.seconds:.2f} | {'yes' if stage.cached else 'no'} |")
        lines.append("")
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {_cell(w)}" for w in report.warnings] + [""]
    if len(report.previews) > 1:
        lines += [f"Preview of {_cell(name)} (axial, coronal, sagittal): `{path}`" for name, path in report.previews]
        lines.append("")
    elif report.preview_path:
        lines += [f"Preview (axial, coronal, sagittal): `{report.preview_path}`", ""]
    return "\n".join(lines)
