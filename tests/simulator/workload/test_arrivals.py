"""Arrival processes: Gamma gaps (vLLM's convention), piecewise windows, superposition."""

import math

import numpy as np
import pytest
from scipy import stats

from simulator.records.errors import ConfigError
from simulator.workload.arrivals import (
    RateWindow,
    check_size,
    gamma_arrivals,
    gamma_gaps,
    piecewise_arrivals,
    superposed_arrivals,
    windows_from_config,
)


def gap_cv(gaps: np.ndarray) -> float:
    return float(gaps.std() / gaps.mean())


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0, 4.0])
def test_gamma_gaps_have_the_requested_rate_and_cv(cv):
    rate = 3.0
    gaps = gamma_gaps(np.random.default_rng(11), 50_000, rate, cv)
    assert 1.0 / gaps.mean() == pytest.approx(rate, rel=0.05)
    assert gap_cv(gaps) == pytest.approx(cv, rel=0.10)


def test_cv_one_is_poisson():
    gaps = gamma_gaps(np.random.default_rng(3), 20_000, 2.0, 1.0)
    assert stats.kstest(gaps, "expon", args=(0, 0.5)).pvalue > 0.01
    # and a bursty process is clearly not exponential
    bursty = gamma_gaps(np.random.default_rng(3), 20_000, 2.0, 2.0)
    assert stats.kstest(bursty, "expon", args=(0, 0.5)).pvalue < 1e-6


def test_gamma_arrivals_plain_renewal_process():
    arrivals = gamma_arrivals(np.random.default_rng(5), 4.0, 2.0, 20_000, exact_rate=False)
    gaps = np.diff(np.concatenate([[0.0], arrivals]))
    assert np.all(gaps >= 0)
    assert len(arrivals) / arrivals[-1] == pytest.approx(4.0, rel=0.05)
    assert gap_cv(gaps) == pytest.approx(2.0, rel=0.10)


def test_exact_rate_rescales_like_vllm_without_changing_the_gap_shape():
    plain = gamma_arrivals(np.random.default_rng(9), 0.5, 3.0, 500, exact_rate=False)
    exact = gamma_arrivals(np.random.default_rng(9), 0.5, 3.0, 500, exact_rate=True)
    assert exact[-1] == pytest.approx(500 / 0.5)
    ratio = exact / plain
    assert np.allclose(ratio, ratio[0])  # one common factor: the CV of the gaps is untouched
    assert exact[0] > 0  # the first request waits one gap, as vllm bench serve sends it


def test_same_seed_same_arrivals_and_different_seed_differs():
    a = gamma_arrivals(np.random.default_rng(1), 2.0, 2.0, 1000)
    b = gamma_arrivals(np.random.default_rng(1), 2.0, 2.0, 1000)
    c = gamma_arrivals(np.random.default_rng(2), 2.0, 2.0, 1000)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_piecewise_exact_windows_hold_rate_times_duration():
    windows = [RateWindow(100.0, 2.0, 1.0), RateWindow(50.0, 0.0), RateWindow(100.0, 5.5, 3.0)]
    arrivals = piecewise_arrivals(np.random.default_rng(4), windows, duration_s=250.0)
    counts = np.histogram(arrivals, bins=[0, 100, 150, 250])[0]
    assert counts[0] == 200
    assert counts[1] == 0
    assert counts[2] == 550
    assert np.all(np.diff(arrivals) >= 0)


def test_piecewise_renewal_windows_follow_their_rates_and_cvs():
    windows = [RateWindow(2000.0, 2.0, 1.0), RateWindow(2000.0, 8.0, 2.0)]
    arrivals = piecewise_arrivals(
        np.random.default_rng(8), windows, duration_s=4000.0, exact_rate=False
    )
    first, second = arrivals[arrivals < 2000], arrivals[arrivals >= 2000]
    assert len(first) / 2000 == pytest.approx(2.0, rel=0.05)
    assert len(second) / 2000 == pytest.approx(8.0, rel=0.10)
    assert gap_cv(np.diff(first)) == pytest.approx(1.0, rel=0.10)
    assert gap_cv(np.diff(second)) == pytest.approx(2.0, rel=0.10)


def test_piecewise_cycles_its_windows_for_more_requests():
    windows = [RateWindow(10.0, 1.0), RateWindow(10.0, 3.0)]  # 40 requests per cycle
    arrivals = piecewise_arrivals(np.random.default_rng(0), windows, num_requests=100)
    assert len(arrivals) == 100
    # two full cycles (80), the third cycle's slow window (10), then 10 of its fast window
    assert 50 <= arrivals[-1] < 60
    assert np.sum((arrivals % 20.0) < 10.0) == 30


def test_weibull_window_keeps_mean_gap_and_its_shape():
    k = 0.6
    window = RateWindow(40_000.0, 1.0, family="weibull", shape=k)
    arrivals = piecewise_arrivals(
        np.random.default_rng(6), [window], duration_s=40_000.0, exact_rate=False
    )
    gaps = np.diff(arrivals)
    expected_cv = math.sqrt(math.gamma(1 + 2 / k) / math.gamma(1 + 1 / k) ** 2 - 1)
    assert len(arrivals) / 40_000 == pytest.approx(1.0, rel=0.05)
    assert gap_cv(gaps) == pytest.approx(expected_cv, rel=0.10)


def test_superposed_sources_are_merged_and_labelled():
    sources = [[RateWindow(600.0, 1.0)], [RateWindow(600.0, 3.0, 2.0)]]
    arrivals, source = superposed_arrivals(np.random.default_rng(2), sources, duration_s=1200.0)
    assert np.all(np.diff(arrivals) >= 0)
    assert np.sum(source == 0) == 1200
    assert np.sum(source == 1) == 3600
    first_n, _ = superposed_arrivals(np.random.default_rng(2), sources, num_requests=777)
    assert len(first_n) == 777


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"duration_s": 0.0, "rate": 1.0}, "workload.windows.duration_s"),
        ({"duration_s": 10.0, "rate": -1.0}, "workload.windows.rate"),
        ({"duration_s": 10.0, "rate": 1.0, "cv": 0.0}, "workload.windows.cv"),
        ({"duration_s": 10.0, "rate": 1.0, "family": "pareto"}, "workload.windows.family"),
        ({"duration_s": 10.0, "rate": 1.0, "family": "weibull"}, "workload.windows.shape"),
    ],
)
def test_bad_windows_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as error:
        RateWindow(**kwargs)
    assert error.value.field == field


def test_windows_from_config_names_the_window():
    with pytest.raises(ConfigError, match=r"workload\.windows\[1\]\.rate: must be >= 0"):
        windows_from_config([{"duration_s": 5, "rate": 1}, {"duration_s": 5, "rate": -2}])
    with pytest.raises(ConfigError, match=r"workload\.windows\[0\]: unknown keys \['rat'\]"):
        windows_from_config([{"duration_s": 5, "rat": 1}])
    with pytest.raises(ConfigError, match="every window has rate 0"):
        piecewise_arrivals(
            np.random.default_rng(0),
            windows_from_config([{"duration_s": 5, "rate": 0}]),
            num_requests=3,
        )


@pytest.mark.parametrize(
    ("num_requests", "duration_s", "field"),
    [
        (None, None, "workload.num_requests"),
        (10, 60.0, "workload.num_requests"),
        (0, None, "workload.num_requests"),
        (None, -5.0, "workload.duration_s"),
    ],
)
def test_size_needs_exactly_one_positive_value(num_requests, duration_s, field):
    with pytest.raises(ConfigError) as error:
        check_size(num_requests, duration_s)
    assert error.value.field == field
    assert "\n" not in str(error.value)
