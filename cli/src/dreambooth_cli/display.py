"""Show training progress: a live rich bar on a terminal, throttled plain lines otherwise (logs, CI, tests)."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from dreambooth_cli.events import Progress as TrainingProgress

PLAIN_INTERVAL_SECONDS = 2.0


class ProgressDisplay:
    """A context manager: `update()` with the latest progress, `note()` for a line above the bar."""

    def __init__(self, console: Console, description: str = "training") -> None:
        self.console = console
        self.description = description
        self._live = console.is_terminal
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._last_plain = 0.0
        self._last_step = -1

    def __enter__(self) -> ProgressDisplay:
        if self._live:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}", markup=False),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(escape(self.description), total=None, stats="starting")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, progress: TrainingProgress, *, force: bool = False) -> None:
        stats = progress.describe().partition(" ")[2].partition(" ")[2]  # without "step N/M"
        if self._bar is not None and self._task is not None:
            self._bar.update(
                self._task,
                completed=progress.step,
                total=progress.total_steps,
                stats=stats,
                description=escape(progress.phase or self.description),
            )
            return
        now = time.monotonic()
        finished = progress.total_steps is not None and progress.step >= progress.total_steps
        first = self._last_step < 0
        if progress.step == self._last_step:
            return
        if force or first or finished or now - self._last_plain >= PLAIN_INTERVAL_SECONDS:
            self.console.print(progress.describe(), highlight=False, markup=False, soft_wrap=True)
            self._last_plain = now
            self._last_step = progress.step

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)
