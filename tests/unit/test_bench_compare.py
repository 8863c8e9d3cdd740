"""``python -m benchmarks compare``: which figures it reads, and when it calls a change real."""

from __future__ import annotations

import math

import pytest

from benchmarks.compare import change_of, figures

pytestmark = pytest.mark.unit


def test_figures_are_the_medians_and_ratios_of_a_result_named_by_their_path() -> None:
    # Given a benchmark's JSON result with medians, ratios, raw samples and other numbers
    result = {
        "sizes": [
            {
                "events_per_batch": 1000,
                "icefleet": {"events_per_s_median": 50_000.0, "events_per_s_rounds": [1, 2]},
                "ratios": {"icefleet_vs_raw": 0.9, "rounds": [0.8, 1.0]},
            }
        ],
        "rounds": 5,
        "flag_median": True,
    }
    # When its figures are read
    found = figures(result)
    # Then exactly the medians and ratios come back, list elements named by their size
    assert found == {
        "sizes[events_per_batch=1000].icefleet.events_per_s_median": 50_000.0,
        "sizes[events_per_batch=1000].ratios.icefleet_vs_raw": 0.9,
    }


def test_a_consistent_slowdown_beyond_the_threshold_is_a_regression() -> None:
    # Given a rate 10 % lower in every one of 5 interleaved rounds, give or take 1 %
    old = [100.0, 104.0, 98.0, 101.0, 99.0]
    new = [v * f for v, f in zip(old, [0.90, 0.91, 0.89, 0.90, 0.905], strict=True)]
    # When the change is computed
    change = change_of("writer: icefleet.events_per_s_median", old, new)
    # Then it is about -10 %, its interval excludes no change, and it is flagged
    assert change.change == pytest.approx(-0.099, abs=0.005)
    assert change.high < 0
    assert change.verdict(0.05) == "REGRESSION"


def test_a_noisy_slowdown_is_only_suspected_and_lower_times_are_better() -> None:
    # Given a rate 10 % lower on average but all over the place, and a time that fell 20 %
    noisy = change_of("x.events_per_s_median", [100.0, 100.0, 100.0], [60.0, 130.0, 90.0])
    faster = change_of("x.batch_ms_median", [10.0, 10.2, 9.9], [8.0, 8.1, 8.0])
    # Then the noisy one is "worse?" (the interval includes no change), the faster one better
    assert noisy.low < 0 < noisy.high
    assert noisy.verdict(0.05) == "worse?"
    assert not faster.higher_is_better
    assert faster.verdict(0.05) == "better"


def test_one_round_has_an_unbounded_interval() -> None:
    # Given a single round per side
    change = change_of("x.ratios.icefleet_vs_raw", [1.0], [0.5])
    # Then the change is shown but never called a regression
    assert change.change == pytest.approx(-0.5)
    assert math.isinf(change.high)
    assert change.verdict(0.05) == "worse?"
