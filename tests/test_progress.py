from __future__ import annotations

import io

from conceptsvc.client.progress import Progress, ProgressMode, format_duration


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_format_duration() -> None:
    assert format_duration(0) == "0:00:00"
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(None) == "--:--"
    assert format_duration(float("inf")) == "--:--"


def test_progress_log_lines_when_not_a_tty() -> None:
    clock, out = Clock(), io.StringIO()
    p = Progress(1000, stream=out, interval=10, clock=clock)
    assert p.mode is ProgressMode.LOG
    p.update(0)  # first draw happens at once
    for _ in range(9):
        clock.t += 1
        p.update(50)
    assert out.getvalue().count("\n") == 1  # throttled to one line per 10 s
    clock.t += 1
    p.update(50, errors=2)
    lines = out.getvalue().splitlines()
    assert lines[-1] == (
        "annotate: 500/1000 captions (50.0%), 50.0 captions/s, ETA 0:00:10, 2 errors"
    )
    p.close()
    assert out.getvalue().splitlines()[-1] == (
        "annotate: 500/1000 captions (50.0%) in 0:00:10, 50.0 captions/s, 2 errors"
    )


def test_progress_rate_uses_a_window_and_ignores_resumed_items() -> None:
    clock = Clock()
    p = Progress(10_000, done=4000, stream=io.StringIO(), mode="log", window=5, clock=clock)
    assert p.rate == 0.0 and p.eta is None
    for _ in range(10):
        clock.t += 1
        p.update(100)
    assert p.done == 5000
    assert p.rate == 100.0  # the 4000 resumed items do not count as speed
    for _ in range(5):
        clock.t += 1
        p.update(10)
    # the window now only sees the slow last seconds
    assert 10.0 <= p.rate < 30.0
    assert p.eta is not None and p.eta > 100


def test_progress_bar_on_a_tty() -> None:
    clock, out = Clock(), Tty()
    p = Progress(200, stream=out, clock=clock)
    assert p.mode is ProgressMode.BAR
    clock.t += 2
    p.update(100, errors=1)
    drawn = out.getvalue()
    assert drawn.startswith("\r") and "\n" not in drawn
    bar = p.bar(width=80)
    assert bar.startswith("annotate  50% |") and bar.endswith(
        " 100/200 captions  50.0/s  ETA 0:00:02  errors 1"
    )
    assert len(bar) <= 80
    p.close()
    assert out.getvalue().endswith("\n")


def test_progress_quiet_writes_nothing() -> None:
    out = io.StringIO()
    p = Progress(10, stream=out, mode="quiet")
    p.update(10)
    p.close()
    assert out.getvalue() == ""
