"""The per-shape set-up cost fitted from a profile's shape_cold / shape_warm steps."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from calibration import cmd_fit
from calibration.fit import (
    FIT_FILE,
    ONEDNN_PRIMITIVE_CACHE,
    FittedPerformanceModel,
    fit_profile,
    load_fitted_model,
    save_fitted_model,
    shape_cache_cost,
)
from calibration.registry import _fitted
from calibration.serving import ServedModel, ServingOverheads
from simulator.records.errors import ConfigError
from simulator.records.performance import ShapeCacheCost
from simulator.records.profile import Profile, steps_frame

from .test_fit import synthetic_profile

#: the planted miss: 4 ms + 2 us per token
A, B = 0.004, 2e-6
SIZES = (103, 105, 307, 309, 615, 617, 1127, 1129, 1741, 1743)


def shape_rows(first_step: int, seed: int = 3, miss=lambda t: A + B * t, warm_noise: float = 0.01) -> list[dict]:
    """Per size: one cold step (warm time + miss) and two warm ones; warm time 1 ms + 5 us per token."""
    rng = np.random.default_rng(seed)
    rows, step = [], first_step
    for tokens in SIZES:
        warm = 1e-3 + 5e-6 * tokens
        for rep in range(3):
            t = warm * (1 + warm_noise * rng.standard_normal()) + (miss(tokens) if rep == 0 else 0.0)
            rows.append({
                "point_id": f"shapes/tokens{tokens}", "phase": "shape_cold" if rep == 0 else "shape_warm",
                "rep": rep, "step": step, "wall_s": float(t), "cpu_s": float(t),
                "prefill_tokens": [tokens], "prefill_context": [0], "prefill_cached": [0],
                "decode_context": [], "decode_spec_tokens": [], "decode_accepted_tokens": [],
                "num_prefill_tokens": tokens, "num_decode_seqs": 0, "num_spec_tokens": 0, "num_tokens": tokens,
                "kv_blocks_used": 1, "kv_usage": 0.0, "num_preempted": 0, "draft_s": 0.0, "rss_bytes": 1,
                "disturbed": False,
            })
            step += 1
    return rows


def with_shapes(profile: Profile, **kwargs) -> Profile:
    extra = steps_frame(shape_rows(int(profile.steps["step"].max()) + 1, **kwargs))
    steps = pd.concat([profile.steps, extra], ignore_index=True)
    return Profile(meta={**profile.meta.to_dict(), "summary": {"steps": len(steps)}}, steps=steps)


def test_planted_miss_cost_is_recovered():
    cost = fit_profile(with_shapes(synthetic_profile())).shape_cache
    assert isinstance(cost, ShapeCacheCost)
    assert cost.capacity == ONEDNN_PRIMITIVE_CACHE == 32
    assert cost.per_miss_s == pytest.approx(A, rel=0.25)
    assert cost.per_miss_token_s == pytest.approx(B, rel=0.25)
    assert "primitive_cache_size" in cost.source and "10 misses at 10 token counts" in cost.source and "shapes phase" in cost.source


def test_server_shape_probes_are_preferred_to_the_in_process_steps():
    """perf=profile simulates the server: its misses (cold minus warm probe) set the cost when measured."""
    server = [{"shape_probe": [{"tokens": n, "cold_s": 0.005 + 3 * (0.002 + 2e-5 * n), "warm_s": 0.005 + 2e-5 * n * 2}
                               for n in (101, 301, 601)]},
              {"shape_probe": None}]
    steps = steps_frame(shape_rows(0))
    cost = shape_cache_cost(steps, server)
    expected = [0.005 + 3 * (0.002 + 2e-5 * n) - (0.005 + 4e-5 * n) for n in (101, 301, 601)]  # 0.006 + 2e-5 n
    assert cost.per_miss_s == pytest.approx(0.006, rel=1e-6)
    assert cost.per_miss_token_s == pytest.approx(2e-5, rel=1e-6)
    assert np.allclose([cost.per_miss_s + cost.per_miss_token_s * n for n in (101, 301, 601)], expected)
    assert "3 shape probes on `vllm serve`" in cost.source
    # without server probes the steps' own cold/warm rows give the planted cost
    assert shape_cache_cost(steps, [{"shape_probe": None}]).per_miss_s == pytest.approx(A, rel=0.25)
    profile = with_shapes(synthetic_profile())
    profile = Profile(meta={**profile.meta.to_dict(), "serving": {"probes": server}}, steps=profile.steps)
    assert fit_profile(profile).shape_cache == cost


def test_shape_steps_stay_out_of_the_step_law():
    plain = fit_profile(synthetic_profile())
    shaped = fit_profile(with_shapes(synthetic_profile()))
    assert shaped.coefficients == plain.coefficients  # same machine, same rows: the same fit
    assert shaped.report["held_out"] == plain.report["held_out"]
    assert not any(p.startswith("shape") for p in shaped.report["held_out_by_phase"])


@pytest.mark.parametrize("dispatch, priced", [("onednn", True), (None, True), ("onednn+torch", True),
                                               ("torch", False), ("sgl", False)])
def test_only_onednn_linear_layers_have_a_shape_cost(dispatch, priced):
    """The profile says how vLLM ran the linear layers; only oneDNN's handlers keep per-shape set-up
    (a profile without the reading is taken as oneDNN's)."""
    profile = with_shapes(synthetic_profile())
    meta = profile.meta.to_dict()
    if dispatch is not None:
        meta["engine"] = {**meta["engine"], "linear_dispatch": dispatch}
    cost = fit_profile(Profile(meta=meta, steps=profile.steps)).shape_cache
    assert (cost is not None and cost.per_miss_s > 0) if priced else cost is None


def test_no_shape_rows_and_gpu_profiles_give_none():
    assert fit_profile(synthetic_profile()).shape_cache is None
    assert shape_cache_cost(synthetic_profile().steps) is None
    assert fit_profile(with_shapes(synthetic_profile(kind="gpu"))).shape_cache is None


def test_a_negative_slope_is_clamped_to_zero_and_the_constant_refitted():
    rows = steps_frame(shape_rows(0, miss=lambda t: 0.010 - 4e-6 * t, warm_noise=0.0))
    cost = shape_cache_cost(rows)
    assert cost.per_miss_token_s == 0.0
    cold = np.array([0.010 - 4e-6 * t for t in SIZES])
    assert cost.per_miss_s == pytest.approx(cold.mean(), rel=1e-6)
    # no miss at all: both terms 0, never negative
    flat = shape_cache_cost(steps_frame(shape_rows(0, miss=lambda t: -1e-3, warm_noise=0.0)))
    assert flat.per_miss_s == 0.0 and flat.per_miss_token_s == 0.0


def test_saved_loaded_printed_and_carried_by_the_served_model(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "prof"
    with_shapes(synthetic_profile()).save(folder)
    model = fit_profile(Profile.load(folder))
    save_fitted_model(model, folder / FIT_FILE)
    assert json.loads((folder / FIT_FILE).read_text())["shape_cache"] == model.shape_cache.to_dict()
    loaded = load_fitted_model(folder / FIT_FILE)
    assert isinstance(loaded, FittedPerformanceModel) and loaded.shape_cache == model.shape_cache
    assert _fitted({"profile": str(folder)}).shape_cache == model.shape_cache  # perf=profile
    served = ServedModel(loaded, ServingOverheads(per_step_s=1e-3, probe_sets=1, source="test"))
    assert served.shape_cache == model.shape_cache
    monkeypatch.chdir(tmp_path)
    assert cmd_fit.main([f"profile={folder}", f"out={tmp_path / 'fit.json'}"]) == 0
    assert "shape cache (vLLM CPU oneDNN primitives, 32 token counts kept)" in capsys.readouterr().out
    # an older fit.json without the key loads with none
    data = model.to_dict()
    del data["shape_cache"]
    assert FittedPerformanceModel.from_dict(data).shape_cache is None


def test_the_measured_misses_are_a_table_the_simulator_interpolates():
    """Misses far from a line in the token count (cheap up to ~600 tokens, dear beyond): the medians per
    size are kept and interpolated, not the straight line through them."""
    misses_ms = {101: 1.0, 301: 2.0, 801: 26.0, 1001: 32.0}
    rounds = [{"shape_probe": [{"tokens": n + 2 * r, "cold_s": 0.01 + (m + noise) / 1e3, "warm_s": 0.01}
                               for (n, m), noise in zip(misses_ms.items(), (0.0, 0.5 * r, -1.0 * r, 0.2), strict=True)]}
              for r in range(3)]
    cost = shape_cache_cost(steps_frame(shape_rows(0)), rounds)
    assert cost.measured_tokens == (103, 303, 803, 1003)  # the median count of each size
    assert cost.measured_miss_s == pytest.approx((0.001, 0.0025, 0.025, 0.0322), abs=1e-9)
    assert cost.miss_s(553) == pytest.approx(0.0025 + (0.025 - 0.0025) * 250 / 500)
    assert cost.miss_s(50) == cost.measured_miss_s[0] and cost.miss_s(2000) == cost.measured_miss_s[-1]
    assert cost.miss_s(603) < cost.per_miss_s + cost.per_miss_token_s * 603  # where a line overcharges
    again = ShapeCacheCost.from_dict(json.loads(json.dumps(cost.to_dict())))
    assert again == cost
    with pytest.raises(ConfigError, match="shape_cache"):
        ShapeCacheCost(measured_tokens=(300, 100), measured_miss_s=(0.001, 0.002))
