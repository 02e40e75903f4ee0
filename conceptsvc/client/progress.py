"""Progress of a long batch run: a live bar on a terminal, plain log lines everywhere else.

A bar redrawn with ``\\r`` is what a person at a terminal wants; in a CI log, a ``nohup`` file or
a Kubernetes pod log it is noise, so when the stream is not a TTY the same figures go out as one
plain line every ``interval`` seconds. The rate is measured over a sliding window (the last
``window`` seconds), so the ETA follows the service's current speed rather than the average since
a resume; captions found already done in the journal count as done but not towards the rate.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import TextIO

__all__ = ["Progress", "ProgressMode", "format_duration"]


class ProgressMode(StrEnum):
    AUTO = "auto"  # BAR on a TTY, LOG otherwise
    BAR = "bar"
    LOG = "log"
    QUIET = "quiet"


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


class Progress:
    """Counts finished and failed items and shows them at a bounded refresh rate."""

    def __init__(
        self,
        total: int,
        *,
        done: int = 0,
        stream: TextIO | None = None,
        mode: ProgressMode | str = ProgressMode.AUTO,
        interval: float = 10.0,
        window: float = 10.0,
        label: str = "annotate",
        unit: str = "captions",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.done = done
        self.errors = 0
        self.stream = stream if stream is not None else sys.stderr
        mode = ProgressMode(mode)
        if mode is ProgressMode.AUTO:
            isatty = getattr(self.stream, "isatty", None)
            mode = ProgressMode.BAR if isatty is not None and isatty() else ProgressMode.LOG
        self.mode = mode
        self.interval = interval if mode is ProgressMode.LOG else 0.1
        self.window = window
        self.label = label
        self.unit = unit
        self._clock = clock
        self._start = clock()
        self._samples: deque[tuple[float, int]] = deque([(self._start, done)])
        self._last_draw = float("-inf")
        self._closed = False

    # -- figures -------------------------------------------------------------------------------
    @property
    def rate(self) -> float:
        """Items per second over the last ``window`` seconds (0 until there is a span)."""
        t0, d0 = self._samples[0]
        t1, d1 = self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    @property
    def eta(self) -> float | None:
        remaining = max(self.total - self.done, 0)
        if remaining == 0:
            return 0.0
        rate = self.rate
        return remaining / rate if rate > 0 else None

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    # -- updates -------------------------------------------------------------------------------
    def update(self, done: int = 0, errors: int = 0) -> None:
        self.done += done
        self.errors += errors
        now = self._clock()
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        if now - self._last_draw >= self.interval:
            self._draw(now)

    def close(self) -> None:
        """Final figures: the bar is completed and ended with a newline; a last log line."""
        if self._closed:
            return
        self._closed = True
        if self.mode is ProgressMode.QUIET:
            return
        self._draw(self._clock(), final=True)
        if self.mode is ProgressMode.BAR:
            self.stream.write("\n")
            self.stream.flush()

    # -- rendering -------------------------------------------------------------------------------
    def line(self, *, final: bool = False) -> str:
        """The plain log line (also used for tests and the final summary)."""
        pct = f" ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        if final:
            avg = self.done / self.elapsed if self.elapsed > 0 else 0.0
            return (
                f"{self.label}: {self.done}/{self.total} {self.unit}{pct} in "
                f"{format_duration(self.elapsed)}, {avg:.1f} {self.unit}/s, {self.errors} errors"
            )
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit}{pct}, {self.rate:.1f} "
            f"{self.unit}/s, ETA {format_duration(self.eta)}, {self.errors} errors"
        )

    def bar(self, width: int | None = None) -> str:
        cols = width if width is not None else shutil.get_terminal_size((100, 20)).columns
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        tail = (
            f" {self.done}/{self.total} {self.unit}  {self.rate:.1f}/s  "
            f"ETA {format_duration(self.eta)}  errors {self.errors}"
        )
        head = f"{self.label} {100 * frac:3.0f}% "
        room = max(cols - len(head) - len(tail) - 3, 10)
        full = int(frac * room)
        return f"{head}|{'#' * full}{'.' * (room - full)}|{tail}"

    def _draw(self, now: float, *, final: bool = False) -> None:
        self._last_draw = now
        if self.mode is ProgressMode.QUIET:
            return
        if self.mode is ProgressMode.BAR:
            text = self.bar()
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(self.line(final=final) + "\n")
        self.stream.flush()
