"""The fused MoE layer: expected distinct experts, and the fit to the measured H100 layer."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest

from calibration.moe import (
    BW_CEILING,
    PROFILE,
    busiest_rank_experts,
    expected_experts,
    measured_fit,
    moe_ep_layer_seconds,
    moe_layer_seconds,
)


def test_one_token_touches_its_k_experts_and_many_touch_all():
    assert expected_experts(1, 8, 256) == pytest.approx(8)
    assert expected_experts(0, 8, 256) == 0
    assert expected_experts(100_000, 8, 256) == pytest.approx(256)
    n = np.arange(1, 2000)
    touched = expected_experts(n, 8, 128)
    assert np.all(np.diff(touched) >= 0) and np.all(touched <= np.minimum(8 * n, 128) + 1e-9)


@pytest.mark.parametrize(("num_experts", "k", "n"), [(4, 2, 2), (5, 2, 3), (6, 3, 2)])
def test_expected_experts_equals_brute_force_enumeration(num_experts, k, n):
    choices = list(itertools.combinations(range(num_experts), k))
    counts = [len(set().union(*picks)) for picks in itertools.product(choices, repeat=n)]
    assert expected_experts(n, k, num_experts) == pytest.approx(np.mean(counts), rel=1e-12)


def test_the_fit_reproduces_the_measured_layer_and_stays_physical():
    fit = measured_fit()
    assert fit.bw_eff <= BW_CEILING + 1e-12 and fit.flop_eff <= 1 and fit.fixed_s >= 0
    with open(PROFILE, newline="") as f:
        rows = list(csv.DictReader(f))
    predicted = np.array([fit.seconds(float(r["activated_experts"]) * 3 * 2048 * 512 * 2,
                                      2 * float(r["tokens"]) * 8 * 3 * 2048 * 512, 3350e9, 989e12) for r in rows])
    measured = np.array([float(r["time_us"]) for r in rows]) * 1e-6
    error = np.abs(predicted / measured - 1)
    assert error.max() < 0.4 and np.median(error) < 0.1


def test_the_layer_grows_with_the_experts_touched_then_with_flops():
    kw = dict(hidden=2048, inter=768, num_experts=128, top_k=8, expert_bytes=2, tp=1, bandwidth=3350e9, peak=989e12)
    t = moe_layer_seconds(np.array([0, 1, 16, 256, 4096]), **kw)
    assert t[0] == 0 and np.all(np.diff(t) > 0)
    # a single token reads its 8 experts' weights, not all 128
    all_weights_s = 128 * 3 * 2048 * 768 * 2 / 3350e9
    assert t[1] < all_weights_s / 4 < t[3]
    # tensor parallelism splits the bytes and FLOPs, not the fixed part
    assert moe_layer_seconds(256, **{**kw, "tp": 2}) < t[3]


@pytest.mark.parametrize(("num_experts", "k", "ranks", "n"), [(4, 2, 2, 1), (8, 2, 2, 2), (8, 2, 4, 1), (6, 2, 3, 2)])
def test_busiest_rank_is_close_to_brute_force_and_bounded(num_experts, k, ranks, n):
    local = num_experts // ranks
    choices = list(itertools.combinations(range(num_experts), k))
    maxima = []
    for picks in itertools.product(choices, repeat=n):
        touched = set().union(*picks)
        maxima.append(max(sum(1 for e in touched if e // local == r) for r in range(ranks)))
    estimate = float(busiest_rank_experts(n, k, num_experts, ranks)[0])
    assert estimate == pytest.approx(np.mean(maxima), rel=0.06)
    assert expected_experts(n, k, num_experts) / ranks <= estimate <= local


def test_expert_parallel_waits_for_the_busiest_rank():
    kw = dict(hidden=2048, inter=768, num_experts=128, top_k=8, expert_bytes=2, bandwidth=3350e9, peak=989e12)
    for m in (1, 8, 64):
        assert moe_ep_layer_seconds(m, ranks=4, **kw) > moe_layer_seconds(m, tp=4, **kw)
    assert busiest_rank_experts(np.array([1.0]), 8, 128, 1)[0] == pytest.approx(8)
