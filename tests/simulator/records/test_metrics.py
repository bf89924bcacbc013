"""The time-weighted KV summary, computed in pieces, is the whole-array formula."""

import numpy as np
import pytest

import simulator.records.metrics as metrics


@pytest.mark.parametrize("n", [1, 2, 6, 7, 8, 50])
def test_time_weighted_kv_in_pieces_equals_the_direct_formula(n, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK", 7)  # many pieces, boundaries everywhere
    rng = np.random.default_rng(n)
    t = np.sort(rng.uniform(1, 100, n))
    u = rng.uniform(0.8, 1.0, n)
    end = 120.0
    dt = np.diff(np.append(t, end))  # each sample holds until the next, the last until the end
    mean = (u * dt).sum() / end  # empty before the first sample
    got = metrics.time_weighted_kv(t, u, end)
    assert got["mean"] == pytest.approx(mean, rel=1e-12)
    assert got["std"] == pytest.approx((((u - mean) ** 2 * dt).sum() / end) ** 0.5, rel=1e-9)
    assert got["seconds_above_95pct"] == pytest.approx(dt[u > 0.95].sum(), rel=1e-12)
    assert got["peak"] == u.max()
