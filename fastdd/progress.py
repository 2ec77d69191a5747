"""The one progress sink of long work (distill iterations, expert epochs, evaluation epochs).

On a terminal it draws a rich bar (description, count, loss, elapsed, ETA). When the output is not a terminal (a
pipe, ``nohup``, a batch scheduler) it writes a plain line every ``every`` seconds instead, so logs show progress.
Both print one line with the projected total time once the first steps are done, when that is long, and one
warning line when steps become much slower than the first ones (usually another process competing for the cores).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, TextIO

# Steps timed before the projection and the slowdown reference.
_FIRST_STEPS = 3
# A projection is printed only for work expected to take at least this long.
_PROJECT_AFTER_SECONDS = 60.0
# Steps this many times slower than the first ones (over a window of several steps) trigger the warning.
_SLOWDOWN_FACTOR = 3.0
_SLOWDOWN_WINDOW = 5
SHARED_CORES_HINT = ("another process may be competing for the cores: start fastdd with fewer threads "
                     "(`fastdd --threads 1 ...`) when the machine is shared")


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class Progress:
    """Progress of ``total`` steps (``unit`` names one), from ``completed`` on.

    Args:
        description: what is running (``distill dsa``, ``experts``, ``evaluate convnet run 1/5``).
        total: steps in all; ``completed``: steps already done (a resumed run).
        enabled: False shows nothing.
        stream: where plain lines go (default stderr); a terminal there gets the rich bar.
        every: seconds between plain lines when ``stream`` is not a terminal.
        hint: appended to the slowdown warning (e.g. what to do about it).
        clock: the time source (tests pass a fake one).
    """

    def __init__(self, description: str, total: int, *, completed: int = 0, unit: str = "step", enabled: bool = True,
                 stream: TextIO | None = None, every: float = 30.0, hint: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.description, self.total, self.completed, self.unit = description, total, completed, unit
        self.enabled = enabled and total > completed
        self.stream = stream if stream is not None else sys.stderr
        self.every, self.hint, self.clock = every, hint, clock
        self.fields: dict[str, str] = {}
        self._durations: list[float] = []
        self._warned = False
        self._bar: Any = None
        self._start = self._last_step = self._last_line = clock()
        self._first_completed = completed
        self._lined_at: int | None = None  # the count of the last plain line

    # -- context -------------------------------------------------------------------------------------------------
    def __enter__(self) -> "Progress":
        if self.enabled and _is_terminal(self.stream):
            self._bar = _rich_bar(self.stream)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.completed, fields="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
        elif self.enabled and self._lined_at not in (None, self.completed) and exc[0] is None:
            self._line()  # a log that had progress lines ends with the last count

    # -- reporting -----------------------------------------------------------------------------------------------
    def advance(self, steps: int = 1, *, description: str | None = None, **fields: float | str) -> None:
        """``steps`` more done; ``description`` replaces the current one; ``fields`` (e.g. ``loss=0.12``) are shown
        beside the count."""
        if not self.enabled:
            return
        now = self.clock()
        self.completed += steps
        self._durations.append((now - self._last_step) / max(steps, 1))
        self._last_step = now
        if description is not None:
            self.description = description
        self.fields.pop("at", None)  # the step it was in is done
        self.fields.update({k: f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in fields.items()})
        if len(self._durations) == _FIRST_STEPS:
            self._project()
        self._check_slowdown()
        if self._bar is not None:
            text = "  ".join(f"{k} {v}" for k, v in self.fields.items())
            self._bar.update(self._task, completed=self.completed, description=self.description, fields=text)
        elif now - self._last_line >= self.every:
            self._line()

    def describe(self, description: str) -> None:
        """Replace the description without advancing."""
        self.description = description
        if self._bar is not None:
            self._bar.update(self._task, description=description)

    def within(self, where: str) -> None:
        """Where the current step is (``outer step 3/10``): beside the bar, and in a plain line every ``every``
        seconds when the output is not a terminal, so a step of minutes shows progress too."""
        if not self.enabled:
            return
        self.fields["at"] = where
        if self._bar is not None:
            text = "  ".join(f"{k} {v}" for k, v in self.fields.items())
            self._bar.update(self._task, fields=text)
        elif self.clock() - self._last_line >= self.every:
            self._line()

    def note(self, text: str) -> None:
        """One line above the bar (or in the log)."""
        if self._bar is not None:
            self._bar.console.print(text, highlight=False, markup=False)
        elif self.enabled:
            print(text, file=self.stream, flush=True)

    # -- internals -----------------------------------------------------------------------------------------------
    def _rate(self) -> float:
        """Seconds per step over the steps done here."""
        done = self.completed - self._first_completed
        return (self.clock() - self._start) / done if done else 0.0

    def _line(self) -> None:
        self._last_line, self._lined_at = self.clock(), self.completed
        done = self.completed - self._first_completed
        rate = self._rate()
        left = rate * (self.total - self.completed)
        share = 100 * self.completed / self.total
        parts = [f"{self.description}: {self.completed}/{self.total} {self.unit}s ({share:.0f} %)"]
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        if done:
            parts.append(f"{format_seconds(rate)}/{self.unit}")
            parts.append(f"elapsed {format_seconds(self.clock() - self._start)}, ETA {format_seconds(left)}")
        print(", ".join(parts), file=self.stream, flush=True)

    def _project(self) -> None:
        per_step = statistics.median(self._durations)
        left = per_step * (self.total - self.completed)
        if left >= _PROJECT_AFTER_SECONDS:
            self.note(f"{self.description}: {format_seconds(per_step)} per {self.unit} so far; the remaining "
                      f"{self.total - self.completed} {self.unit}s need about {format_seconds(left)}")

    def _check_slowdown(self) -> None:
        if self._warned or len(self._durations) < _FIRST_STEPS + _SLOWDOWN_WINDOW:
            return
        first = statistics.median(self._durations[:_FIRST_STEPS])
        recent = statistics.mean(self._durations[-_SLOWDOWN_WINDOW:])
        if first > 0 and recent > _SLOWDOWN_FACTOR * first and recent > 0.05:
            self._warned = True
            self.note(f"warning: {self.unit}s now take {format_seconds(recent)}, {recent / first:.1f}x the first ones"
                      + (f"; {self.hint}" if self.hint else ""))


def announce(text: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
    """One line about long work that is starting or being skipped (e.g. experts trained or reused), on stderr."""
    if enabled:
        print(text, file=stream if stream is not None else sys.stderr, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _rich_bar(stream: TextIO) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    return RichProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[fields]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(file=stream),
    )
