"""What a one-off command shows on the terminal while it runs: a progress bar over studies and over
the stages of the current study (rich), only when stdout is a terminal.

Captured output (a pipe, a file, a test) never gets a bar: it gets the command's plain lines only.
The bars are drawn on stdout by rich's live display, which also carries every line the
command prints (``print``) above the bars.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any


def progress_wanted(*, verbose: bool) -> bool:
    """Bars only for a person at a terminal, and not when the log lines are shown (``--verbose``)."""
    return sys.stdout.isatty() and not verbose


class StudyProgress:
    """Two bars: studies done of all, and stages done of the current study's expected stages.

    With ``enabled`` False every method does nothing, so callers need no branches.
    """

    def __init__(self, studies: int, stages_per_study: int, *, enabled: bool) -> None:
        self.enabled = enabled
        self.stages_per_study = max(1, stages_per_study)
        self._progress: Any = None
        self._studies_bar: Any = None
        self._stages_bar: Any = None
        self._studies = studies

    def __enter__(self) -> StudyProgress:
        if not self.enabled:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,  # the bars go when the command ends; its lines stay
        )
        self._progress.__enter__()
        self._studies_bar = self._progress.add_task("studies", total=self._studies)
        self._stages_bar = self._progress.add_task("stages", total=self.stages_per_study, visible=False)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(kind, error, trace)
            self._progress = None

    def start_study(self, label: str) -> None:
        if self._progress is not None:
            self._progress.reset(
                self._stages_bar, total=self.stages_per_study, description=f"  {label}"[:28], visible=True
            )

    def stage_done(self, stage: str) -> None:
        if self._progress is not None:
            task = self._progress.tasks[self._stages_bar]
            # The expected count is an estimate from the config; never show more done than in total.
            total = max(task.total or 0, task.completed + 1)
            self._progress.update(self._stages_bar, advance=1, total=total, description=f"  {stage}"[:28])

    def study_done(self) -> None:
        if self._progress is not None:
            self._progress.update(self._stages_bar, visible=False)
            self._progress.advance(self._studies_bar)
