"""What glmkit tells a person while it works: one line per stage and progress bars, on stderr (rich).

Silent by default, so that the Python API prints nothing; the CLI turns it on (``enable``).  Without
``--verbose`` the CLI also quiets other libraries' progress bars and warnings (``quiet_other_libraries``):
what shows is glmkit's own account of what it does.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# libraries whose INFO/WARNING chatter is not the user's business unless --verbose
_NOISY_LOGGERS = ("transformers", "huggingface_hub", "httpx", "httpcore", "urllib3", "filelock", "torch")


class Reporter:
    """Stage lines and bars on ``console``; with no console, nothing is shown."""

    def __init__(self, console: Any | None = None) -> None:
        self.console = console
        self._showing = False  # rich shows one live display at a time: an inner task shows nothing

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False)

    @contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "") -> Iterator[Callable[[float], None]]:
        """A bar for ``description``; yields ``advance(amount)``.  ``unit="B"`` shows sizes and speed;
        no ``total`` shows a spinner with the time spent."""
        if self.console is None or self._showing:
            yield lambda _amount: None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        if total is None:
            columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
        elif unit == "B":
            columns = [
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeElapsedColumn(),
            ]
        else:
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        self._showing = True
        try:
            with Progress(*columns, console=self.console, transient=False) as progress:
                task = progress.add_task(description, total=total)
                yield lambda amount: progress.advance(task, amount)
                if total is not None:
                    progress.update(task, completed=total)
        finally:
            self._showing = False


_reporter = Reporter()
_STARTED = time.monotonic()


def reporter() -> Reporter:
    """The reporter the layers below the CLI tell their progress to."""
    return _reporter


def enable(console: Any | None = None) -> Reporter:
    """Show progress on ``console`` (default: a rich console on stderr) from now on."""
    global _reporter
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    _reporter = Reporter(console)
    return _reporter


def quiet_other_libraries() -> None:
    """Hide other libraries' progress bars (tqdm: transformers, huggingface_hub) and their warnings."""
    import tqdm

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # tqdm reads TQDM_DISABLE when it is imported, which torch has done already: change the default instead
    tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)  # type: ignore[method-assign]
    warnings.simplefilter("ignore")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def elapsed() -> float:
    """Seconds since glmkit was imported (the command started), for "Ready in N s"."""
    return time.monotonic() - _STARTED
