"""The progress sink: plain lines when the output is not a terminal, the projected time, the slowdown warning."""

import io

from fastdd.progress import Progress, format_seconds


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def run(durations, *, total=None, every=30.0, enabled=True):
    clock, stream = Clock(), io.StringIO()
    total = len(durations) if total is None else total
    with Progress("distill dsa", total, unit="iteration", stream=stream, every=every, clock=clock, enabled=enabled,
                  hint="try --threads 1") as bar:
        for i, seconds in enumerate(durations):
            clock.now += seconds
            bar.advance(loss=1.0 / (i + 1))
    return stream.getvalue().splitlines()


def test_plain_lines_every_period_with_count_loss_rate_and_eta():
    lines = run([10.0] * 9, every=30.0)
    counted = [line for line in lines if "iterations (" in line]
    # After 30, 60 and 90 s; the last is also the closing count, so it is not repeated.
    assert [line.split(",")[0] for line in counted] == [
        "distill dsa: 3/9 iterations (33 %)", "distill dsa: 6/9 iterations (67 %)", "distill dsa: 9/9 iterations (100 %)",
    ]
    assert "loss 0.3333" in counted[0] and "10 s/iteration" in counted[0] and "ETA 1 min 00 s" in counted[0]


def test_fast_work_prints_nothing_and_a_log_ends_with_the_last_count():
    assert run([0.01] * 50) == []
    assert run([10.0] * 4, every=30.0)[-1].startswith("distill dsa: 4/4 iterations (100 %)")


def test_long_work_prints_its_projected_time_once():
    lines = run([20.0] * 3, total=100, every=1e9)
    assert lines == ["distill dsa: 20 s per iteration so far; the remaining 97 iterations need about 32 min 20 s"]


def test_steps_much_slower_than_the_first_ones_warn_once():
    lines = run([1.0] * 3 + [5.0] * 10, every=1e9)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == ["warning: iterations now take 5.0 s, 5.0x the first ones; try --threads 1"]
    assert run([1.0] * 13, every=1e9) == []


def test_disabled_or_empty_progress_shows_nothing():
    assert run([100.0] * 5, enabled=False) == []
    assert run([], total=0) == []


def test_format_seconds():
    assert [format_seconds(s) for s in (3.25, 42, 200, 7500)] == ["3.2 s", "42 s", "3 min 20 s", "2 h 05 min"]
