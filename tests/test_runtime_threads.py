"""Threads from the free cores: the command line uses fewer torch threads when other processes keep cores busy."""

import pytest

from fastdd import runtime


@pytest.mark.parametrize("busy,expected", [(0.1, None), (0.9, (1, 2)), (1.6, (1, 2)), (2.0, (1, 2))])
def test_one_thread_per_free_core(monkeypatch, busy, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runtime, "cores_busy_elsewhere", lambda seconds=0.25: busy)
    assert runtime.threads_for_free_cores() == expected


def test_an_explicit_thread_count_is_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(runtime, "cores_busy_elsewhere", lambda seconds=0.25: 2.0)
    assert runtime.threads_for_free_cores() is None


def test_busy_cores_are_measured_from_proc_stat(monkeypatch):
    samples = iter([(100, 1000), (150, 1100)])  # 50 of 100 jiffies busy over 2 cores: 1 core
    monkeypatch.setattr(runtime, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    assert runtime.cores_busy_elsewhere(seconds=0) == pytest.approx(1.0)
