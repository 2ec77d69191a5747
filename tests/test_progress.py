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
        "distill dsa: 3/9 iterations (33 %)",
        "distill dsa: 6/9 iterations (67 %)",
        "distill dsa: 9/9 iterations (100 %)",
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


def test_a_long_step_shows_where_it_is_in_plain_lines():
    clock, stream = Clock(), io.StringIO()
    with Progress("distill dsa", 2, unit="iteration", stream=stream, every=30.0, clock=clock) as bar:
        for outer in range(4):
            clock.now += 20.0
            bar.within(f"outer step {outer + 1}/4")
        bar.advance(loss=0.5)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("distill dsa: 0/2 iterations (0 %), at outer step 2/4")
    assert lines[1].startswith("distill dsa: 0/2 iterations (0 %), at outer step 4/4")
    assert "at outer" not in lines[-1] and "loss 0.5" in lines[-1]


def test_a_dsa_iteration_reports_its_steps():
    from fastdd.data import load_dataset
    from fastdd.distill import get_distiller

    cls = get_distiller("dsa")
    distiller = cls(cls.config_class.from_options(dict(ipc=2, width=8, batch_real=8, iterations=1), method="dsa"),
                    load_dataset("digits"))
    seen = []
    distiller.on_substep = seen.append
    distiller.step(0)
    assert seen[0] == "outer step 1/2, group 1/10" and seen[-1] == "outer step 2/2, group 10/10"  # IPC 2: 2 steps
