"""The statistics of the reproduction scripts (examples/repro_common.py) against scipy's paired t-test."""

import math
import sys
from pathlib import Path

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from repro_common import differences_table, mean_std, paired_difference, verdict  # noqa: E402


def test_paired_difference_is_scipys_paired_t_interval():
    a = [81.2, 80.1, 82.4, 79.9, 81.0]
    b = [80.0, 80.3, 81.1, 78.2, 80.1]
    mean, low, high = paired_difference(a, b)
    interval = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert mean == pytest.approx(sum(x - y for x, y in zip(a, b)) / 5)
    assert (low, high) == pytest.approx((interval.low, interval.high), rel=1e-12)


def test_mean_std_is_the_sample_std():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, stats.tstd([1.0, 2.0, 4.0])))
    assert math.isnan(mean_std([3.0])[1])


def test_verdicts_follow_the_interval_and_the_direction():
    assert verdict(0.5, 2.0, 1) == "better" and verdict(0.5, 2.0, -1) == "worse"
    assert verdict(-2.0, -0.1, -1) == "better" and verdict(-1.0, 1.0, 1) == "no detectable difference"
    arms = {"x": {"ece": [1.0, 1.1, 0.9]}, "y": {"ece": [3.0, 3.2, 2.9]}}
    assert "better" in differences_table(arms, [("x", "y")], ["ece"], better={"ece": -1})
    with pytest.raises(ValueError, match="same units"):
        paired_difference([1.0, 2.0], [1.0])
