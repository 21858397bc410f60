"""Human output: one rich console on stderr, silenced by --quiet."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True, highlight=False)


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) all human output."""
    console.quiet = quiet


def info(message: str) -> None:
    """Print one human-readable line on stderr."""
    console.print(message)


def warn(message: str) -> None:
    """Print a warning line on stderr."""
    console.print(f"[yellow]warning:[/yellow] {message}")


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[callable]:
    """Show a progress bar on stderr; yield a function that advances it by n."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=console.quiet,
    )
    with bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance
