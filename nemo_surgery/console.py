"""Human output: one rich console on stderr, silenced by --quiet.

On a terminal rich fits tables to the window. In a log (stderr not a terminal,
no COLUMNS set) rich would assume 80 columns and cut long cells such as layer
ids; there the console is wide (LOG_WIDTH) and tables fold rather than cut.
Progress bars show counts, elapsed time and an ETA, plus an optional live text
(e.g. UNet calls so far) refreshed while one item is still running.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

#: Width used when stderr is not a terminal (logs, CI), so tables are not cut at 80 columns.
LOG_WIDTH = 200


def _make_console() -> Console:
    interactive = sys.stderr.isatty()
    width = None if interactive or os.environ.get("COLUMNS") else LOG_WIDTH
    return Console(stderr=True, highlight=False, width=width)


console = _make_console()


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) all human output."""
    console.quiet = quiet


def info(message: str) -> None:
    """Print one human-readable line on stderr."""
    console.print(message)


def warn(message: str) -> None:
    """Print a warning line on stderr."""
    console.print(f"[yellow]warning:[/yellow] {message}")


class _LiveColumn(ProgressColumn):
    """Text computed at every refresh (shows work inside an item that has not finished yet)."""

    def __init__(self, text: Callable[[], str]):
        super().__init__()
        self._text = text

    def render(self, task: Task) -> Text:
        try:
            return Text(self._text(), style="dim")
        except Exception:  # a display helper must never break the work it displays
            return Text("")


def progress_columns(live: Callable[[], str] | None = None) -> list[ProgressColumn]:
    """Columns of every progress bar: what, bar, done/total, elapsed, ETA (and the live text)."""
    columns: list[ProgressColumn] = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    if live is not None:
        columns.append(_LiveColumn(live))
    return columns


@contextlib.contextmanager
def progress(description: str, total: int | None, live: Callable[[], str] | None = None) -> Iterator[Callable[..., None]]:
    """Show a progress bar on stderr; yield a function that advances it by n.

    ``live()`` (optional) is shown after the ETA and re-read about 4 times a second,
    so a long item shows activity (e.g. "37 UNet calls") before it completes.
    """
    bar = Progress(*progress_columns(live), console=console, transient=True, disable=console.quiet, refresh_per_second=4)
    with bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance


class StageStatus:
    """A spinner line for work of unknown length: stage text, elapsed time and a live count.

    Drop-in for rich's ``console.status(...)`` as the commands use it (``update``,
    ``start``, ``stop``, context manager), but with elapsed time and ``live()``
    (e.g. "1234 UNet calls") so the user sees the work advance.
    """

    def __init__(self, description: str, live: Callable[[], str] | None = None):
        from rich.progress import SpinnerColumn

        columns: list[ProgressColumn] = [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
        if live is not None:
            columns.append(_LiveColumn(live))
        self._bar = Progress(*columns, console=console, transient=True, disable=console.quiet, refresh_per_second=4)
        self._task = self._bar.add_task(description, total=None)
        self._started = False

    def update(self, description: str) -> None:
        """Show another stage text."""
        self._bar.update(self._task, description=description)

    def start(self) -> None:
        """Start showing (idempotent)."""
        if not self._started:
            self._bar.start()
            self._started = True

    def stop(self) -> None:
        """Stop showing (idempotent)."""
        if self._started:
            self._bar.stop()
            self._started = False

    def __enter__(self) -> StageStatus:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stage_status(description: str, live: Callable[[], str] | None = None) -> StageStatus:
    """A :class:`StageStatus` on the shared console."""
    return StageStatus(description, live)
