"""Fitting step-time models to profiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from calibration import cmd_fit
from calibration.fit import (
    FIT_FILE,
    TERMS,
    FittedPerformanceModel,
    features,
    fit_profile,
    fit_steps,
    load_fitted_model,
    save_fitted_model,
)
from simulator.records.errors import ConfigError
from simulator.records.performance import PerformanceModel, StepBatch
from simulator.records.profile import Profile, steps_frame

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "calibration" / "profiles").glob("cpu-*/tiny-llama/*/profile.json"))
ARCH = {"name": "tiny", "num_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
        "num_key_value_heads": 2, "intermediate_size": 1536, "vocab_size": 8192}
TRUE = dict(zip(TERMS, [4e-3, 2e-4, 3e-8, 0.0, 5e-4, 2e-7, 1.5e-4], strict=True))


def synthetic_rows(n: int, noise: float, seed: int = 1, knee: int = 0, decode_step: float = 0.0) -> list[dict]:
    """Steps of random compositions timed by the fit's law (TRUE; a decode knee and decode-step
    cost when given) with multiplicative noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = rng.integers(3)
        prefill = [int(rng.integers(16, 2048))] if kind != 1 else []
        context = [int(rng.integers(0, 8192))] if prefill else []
        decode = rng.integers(16, 8192, size=int(rng.integers(1, 64))).tolist() if kind != 0 else []
        spec = rng.integers(0, 4, size=len(decode)).tolist() if decode and i % 2 else [0] * len(decode)
        q, c = np.array(prefill, float), np.array(context, float)
        t = (TRUE["overhead"] + TRUE["per_prefill_token"] * q.sum()
             + TRUE["per_attention_pair"] * np.sum(q * (c + (q + 1) / 2))
             + (decode_step if decode else 0.0) + TRUE["per_decode_seq"] * max(0, len(decode) - knee)
             + TRUE["per_decode_kv_token"] * sum(decode)
             + TRUE["per_spec_token"] * sum(spec))
        rows.append(step_row(f"p{i // 3}", ["prefill", "decode", "mixed"][kind], i % 3, i,
                             float(t * (1 + noise * rng.standard_normal())), float(t), prefill, context, decode, spec))
    return rows


def step_row(point_id: str, phase: str, rep: int, step: int, wall_s: float, cpu_s: float,
             prefill: list[int], context: list[int], decode: list[int], spec: list[int]) -> dict:
    """One row of a profile's steps table (simulator.records.profile.steps_frame)."""
    return {
        "point_id": point_id, "phase": phase, "rep": rep, "step": step, "wall_s": wall_s, "cpu_s": cpu_s,
        "prefill_tokens": prefill, "prefill_context": context, "prefill_cached": [0] * len(prefill),
        "decode_context": decode, "decode_spec_tokens": spec, "decode_accepted_tokens": [0] * len(decode),
        "num_prefill_tokens": sum(prefill), "num_decode_seqs": len(decode), "num_spec_tokens": sum(spec),
        "num_tokens": sum(prefill) + len(decode) + sum(spec), "kv_blocks_used": 1, "kv_usage": 0.0,
        "num_preempted": 0, "draft_s": 0.0, "rss_bytes": 1, "disturbed": False,
    }


def synthetic_profile(n=400, noise=0.03, kind="cpu") -> Profile:
    meta = {
        "format": "rllm-sim-profile", "format_version": 1, "created": "2026-11-24T00:00:00+00:00",
        "hardware": {"kind": kind, "slug": f"{kind}-test"}, "versions": {}, "model": {"name": "tiny", "architecture": ARCH},
        "optimization": {"name": "none"}, "engine": {},
        "kv": {"block_size": 128, "num_gpu_blocks": 8192, "bytes_per_token": 2048},
        "memory": {"weights_bytes": 21_000_000, "activation_peak_bytes": 9_000_000,
                   "kv_cache_bytes": 2 * 1024**3, "rss_after_engine": 3 * 1024**3,
                   "device_total_bytes": 24 * 1024**3},
        "grid": {}, "points": [], "summary": {"steps": n},
    }
    return Profile(meta=meta, steps=steps_frame(synthetic_rows(n, noise)))


def test_recovers_known_coefficients_from_noisy_steps():
    result = fit_steps(synthetic_profile(noise=0.03).measured_steps())
    for term, value in TRUE.items():
        if term not in ("decode_step", "per_decode_seq"):  # these two trade against the knee
            assert result.coefficients[term] == pytest.approx(value, rel=0.15), term
    model = FittedPerformanceModel(result.coefficients, {}, {}, ARCH, "t", decode_knee=result.decode_knee)
    for n in (1, 8, 32):  # the decode law the knee and the two terms make together
        true = TRUE["overhead"] + TRUE["per_decode_seq"] * n + TRUE["per_decode_kv_token"] * 1000 * n
        assert model.step_time(StepBatch(decode_context=[1000] * n)) == pytest.approx(true, rel=0.05)
    assert result.report["held_out"]["median_ape"] < 0.04
    assert result.report["held_out"]["n"] > 50


def test_a_decode_knee_is_found_and_improves_on_the_linear_law():
    """Decode batches up to 8 cost as much as one (weights read once): the fit finds the knee."""
    steps = Profile(meta=synthetic_profile().meta,
                    steps=steps_frame(synthetic_rows(400, 0.02, knee=8, decode_step=1e-3))).measured_steps()
    result = fit_steps(steps)
    assert result.decode_knee == 8
    assert result.coefficients["decode_step"] == pytest.approx(1e-3, rel=0.2)
    assert result.coefficients["per_decode_seq"] == pytest.approx(TRUE["per_decode_seq"], rel=0.15)
    assert result.report["held_out"]["median_ape"] < 0.03 and result.report["decode_knee"] == 8


def test_coefficients_are_never_negative():
    profile = synthetic_profile(noise=0.2)
    steps = profile.measured_steps()
    steps["decode_spec_tokens"] = [[0] * len(d) for d in steps["decode_context"]]  # spec term unidentifiable
    result = fit_steps(steps)
    assert all(v >= 0 for v in result.coefficients.values())


def test_held_out_rows_are_whole_points():
    steps = synthetic_profile().measured_steps()
    from calibration.fit import split_groups

    held = split_groups(steps, 0.25, seed=0)
    grid = steps["phase"] != "mixed"
    for _, group in steps[grid].assign(held=held[grid.to_numpy()]).groupby("point_id"):
        assert group["held"].nunique() == 1
    assert 0.15 < held.mean() < 0.35


def test_a_decode_points_later_rounds_are_held_out_with_it():
    from calibration.fit import split_groups

    steps = synthetic_profile().measured_steps()
    decode = steps[steps["phase"] == "decode"]
    rounds = decode.assign(point_id=decode["point_id"] + "/window1")
    both = pd.concat([steps, rounds], ignore_index=True)
    rounds_held = 0
    for seed in range(4):
        held = split_groups(both, 0.25, seed=seed)
        first = held[: len(steps)][steps["phase"].to_numpy() == "decode"]
        assert (held[len(steps):] == first).all()  # each round goes where its point goes
        rounds_held += int(held[len(steps):].sum())
    assert rounds_held > 0


def _decode_point_rows(seed: int = 5, points: int = 40, factors=(0.85, 1.0, 1.15)) -> list[dict]:
    """Decode grid points, each one composition measured in ``len(factors)`` rounds (``window``
    1, 2, ...) of three steps, every step of round ``k`` at ``factors[k]`` times the law (TRUE)."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(points):
        n, ctx = int(rng.integers(1, 64)), int(rng.integers(128, 8192))
        t = TRUE["overhead"] + TRUE["per_decode_seq"] * n + TRUE["per_decode_kv_token"] * n * ctx
        for window, factor in enumerate(factors):
            point_id = f"decode/k{k}" + (f"/window{window}" if window else "")
            rows += [step_row(point_id, "decode", rep, len(rows) + rep, t * factor, t, [], [], [ctx] * n, [0] * n)
                     for rep in range(3)]
    return rows


def test_a_grid_points_median_step_averages_the_moments_it_ran_in():
    """Decode points measured in three rounds at 0.85, 1 and 1.15 of the law (the machine's
    moments): two steps in three miss by about 15%, each point's median step by little."""
    other = [r for r in synthetic_rows(300, 0.0) if r["phase"] != "decode"]
    steps = Profile(meta=synthetic_profile().meta,
                    steps=steps_frame(other + _decode_point_rows())).measured_steps()
    report = fit_steps(steps).report
    assert report["held_out_by_phase"]["decode"]["median_ape"] > 0.1
    points = report["held_out_points_by_phase"]
    # (relative least squares over rounds at 0.85 / 1 / 1.15 lands about 3% below their median)
    assert points["decode"]["median_ape"] < 0.05 and points["decode"]["n"] >= 5
    assert "mixed" not in points  # a mixed step is its own composition: no point to average
    steady = Profile(meta=synthetic_profile().meta,  # the same points without the moments
                     steps=steps_frame(other + _decode_point_rows(factors=(1.0, 1.0, 1.0)))).measured_steps()
    assert fit_steps(steady).report["held_out_by_phase"]["decode"]["median_ape"] < 0.01


def test_step_time_matches_the_features_and_decode_times_are_identical():
    model = fit_profile(synthetic_profile())
    steps = synthetic_profile(n=30).measured_steps()
    x = features(steps, model.decode_knee)
    coef = np.array([model.coefficients[t] for t in TERMS])
    for (_, row), expected in zip(steps.iterrows(), x @ coef, strict=True):
        batch = StepBatch(list(row["prefill_tokens"]), list(row["prefill_context"]),
                          list(row["decode_context"]), list(row["decode_spec_tokens"]))
        assert model.step_time(batch) == pytest.approx(expected, rel=1e-12)
    contexts = [np.arange(100, 140), np.arange(3000, 3040) * 2]
    for n, totals in zip([1, 2], contexts, strict=True):
        fast = model.decode_times(n, totals.astype(float))
        for total, t in zip(totals, fast, strict=True):
            per = [int(total) // n] * n
            per[0] += int(total) - sum(per)
            assert model.step_time(StepBatch(decode_context=per)) == t  # bit-identical


def test_cpu_profile_memory_and_kv_come_from_the_profile():
    model = fit_profile(synthetic_profile())
    assert isinstance(model, PerformanceModel)
    cap = model.kv_capacity(block_size=128)
    assert (cap.num_blocks, cap.bytes_per_token) == (8192, 2048)
    assert model.kv_capacity(block_size=128, num_gpu_blocks_override=77).num_blocks == 77
    mem = model.memory(0.9)
    assert mem.kv_cache == 2 * 1024**3 and mem.weights == 21_000_000
    assert mem.other == 3 * 1024**3 - 2 * 1024**3 - 21_000_000
    assert model.kv_capacity(block_size=64).num_blocks == 2 * 1024**3 // (2048 * 64)


def test_gpu_profile_kv_grows_with_memory_utilization():
    model = fit_profile(synthetic_profile(kind="gpu"))
    low, high = model.memory(0.5), model.memory(0.9)
    assert high.kv_cache - low.kv_cache == int(24 * 1024**3 * 0.9) - int(24 * 1024**3 * 0.5)
    assert model.kv_capacity(16, 0.9).num_blocks > model.kv_capacity(16, 0.5).num_blocks


def test_save_and_load(tmp_path):
    profile = synthetic_profile()
    profile.save(tmp_path / "prof")
    profile = Profile.load(tmp_path / "prof")
    model = fit_profile(profile)
    save_fitted_model(model, tmp_path / "prof" / FIT_FILE)
    loaded = load_fitted_model(tmp_path / "prof")
    assert isinstance(loaded, FittedPerformanceModel)
    assert loaded.coefficients == model.coefficients
    assert load_fitted_model(tmp_path / "prof" / FIT_FILE).coefficients == model.coefficients
    # a fit.json from another profile is not trusted: the directory is fitted afresh
    data = json.loads((tmp_path / "prof" / FIT_FILE).read_text())
    data["report"]["profile_created"] = "elsewhere"
    data["coefficients"]["overhead"] = 123.0
    (tmp_path / "prof" / FIT_FILE).write_text(json.dumps(data))
    assert load_fitted_model(tmp_path / "prof").coefficients["overhead"] != 123.0


def test_cli_writes_fit_and_reports(tmp_path, capsys, monkeypatch):
    profile = tmp_path / "profile"
    synthetic_profile().save(profile)
    monkeypatch.chdir(tmp_path)
    assert cmd_fit.main([f"profile={profile}"]) == 0
    out = capsys.readouterr().out
    assert "held-out steps" in out and "median APE" in out and "p90 APE" in out
    assert "each grid point's median step" in out  # synthetic points have prefill and decode phases
    assert not (profile / FIT_FILE).exists()  # the profile is only read
    (written,) = (tmp_path / "outputs" / "fit").glob(f"*/*/{FIT_FILE}")  # the run directory
    assert f"saved to {written.relative_to(tmp_path)}" in out
    saved = json.loads(written.read_text())
    assert saved["report"]["held_out"]["median_ape"] < 0.05
    assert set(saved["coefficients"]) == set(TERMS)
    assert {"numpy", "scipy"} <= set(saved["report"]["versions"]) and saved["report"]["seed"] == 0
    assert cmd_fit.main([f"profile={profile}", f"out={tmp_path / 'a' / 'b.json'}"]) == 0
    assert json.loads((tmp_path / "a" / "b.json").read_text())["coefficients"] == saved["coefficients"]
    assert cmd_fit.main([f"profile={profile}"]) == 0  # a second run in the same second: a new folder
    assert len(list((tmp_path / "outputs" / "fit").glob(f"*/*/{FIT_FILE}"))) == 2


@pytest.mark.skipif(not SHIPPED, reason="no shipped CPU profile of tiny-llama")
def test_fitting_a_shipped_profile_leaves_the_checkout_alone(tmp_path):
    """`calibration fit` on a shipped profile writes into its run directory, not over fit.json."""
    import hashlib
    import subprocess
    import sys

    folder = REPO / "calibration" / "profiles"

    def digests() -> dict:
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}

    before = digests()
    proc = subprocess.run([sys.executable, "-m", "calibration", "fit", f"profile={SHIPPED[0].parent}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert digests() == before
    (written,) = (tmp_path / "outputs" / "fit").glob(f"*/*/{FIT_FILE}")
    assert f"saved to {written.relative_to(tmp_path)}" in proc.stdout


@pytest.mark.parametrize("argv, message", [
    ([], "profile: missing"),
    (["profil=x"], "arguments: expected one of"),
    (["profile=/nonexistent/dir"], "missing profile.json"),
    (["profile=x", "test_fraction=abc"], "test_fraction: a number in (0, 1), got 'abc'"),
    (["profile=x", "test_fraction=1"], "test_fraction: a number in (0, 1), got '1'"),
    (["profile=x", "test_fraction=nan"], "test_fraction: a number in (0, 1)"),
    (["profile=x", "seed=abc"], "seed: an integer >= 0, got 'abc'"),
    (["profile=x", "seed=-1"], "seed: an integer >= 0, got '-1'"),
    (["profile=x", "out=/dev/null/fit.json"], "out: a path that can be written"),
    (["profile=x", "out="], "out: a file path to write"),
])
def test_cli_errors_are_one_line(argv, message):
    with pytest.raises(ConfigError) as err:
        cmd_fit.main(argv)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_an_unwritable_out_is_one_line_naming_out_before_any_work(tmp_path, where):
    import os
    import subprocess
    import sys

    profile = tmp_path / "profile"
    synthetic_profile().save(profile)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    out = blocker / "fit.json" if where == "under-a-file" else locked / "sub" / "fit.json"
    if where == "read-only" and os.access(locked, os.W_OK):
        pytest.skip("running as a user who may write anywhere (root)")
    proc = subprocess.run([sys.executable, "-m", "calibration", "fit", f"profile={profile}", f"out={out}"],
                          capture_output=True, text=True, timeout=120)
    locked.chmod(0o700)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: out: a path that can be written") and proc.stderr.count("\n") == 1
    assert proc.stdout == ""  # refused before fitting


def test_too_few_steps_is_an_error():
    with pytest.raises(ConfigError, match="a fit needs at least"):
        fit_steps(synthetic_profile(n=5).measured_steps())


@pytest.mark.skipif(not SHIPPED, reason="no shipped CPU profile of tiny-llama")
@pytest.mark.parametrize("profile_file", SHIPPED, ids=lambda p: f"{p.parts[-4]}-{p.parts[-2]}")
def test_cpu_profile_of_tiny_model_predicts_held_out_steps_within_10_percent(profile_file):
    """Issue 4, check 1: median APE on held-out profiled steps <= 10% (every shipped CPU profile)."""
    profile = Profile.load(profile_file.parent)
    model = fit_profile(profile)
    held = model.report["held_out"]
    assert held["n"] >= 30
    assert held["median_ape"] <= 0.10, model.report
    # the shipped fit is this fit, and the registry's loader returns it. The shipped numbers
    # come from another machine, whose BLAS and CPU kernels round differently: agreement to
    # 1e-6 relative (the NNLS on column-scaled relative errors moves ~1e-12 between machines;
    # a refit on other data or another outlier set moves the coefficients by > 1e-3).
    loaded = load_fitted_model(profile_file.parent)
    assert loaded.coefficients == pytest.approx(model.coefficients, rel=1e-6, abs=1e-15)
    batches = profile.batches(profile.measured_steps())
    assert [loaded.step_time(b) for b in batches] == pytest.approx([model.step_time(b) for b in batches], rel=1e-6)
    assert loaded.kv_capacity(profile.kv_capacity.block_size).num_blocks == profile.kv_capacity.num_blocks


def test_disturbed_steps_are_left_out_of_training_and_the_headline_error():
    profile = synthetic_profile(noise=0.02)
    steps = profile.measured_steps()
    hit = np.arange(len(steps)) % 5 == 0  # every fifth step lost its core to another process
    steps.loc[hit, "wall_s"] *= 2.5
    steps.loc[hit, "disturbed"] = True
    result = fit_steps(steps)
    assert result.report["disturbed_steps"] == int(hit.sum())
    assert result.report["disturbed_steps_used"] is False
    assert result.coefficients["overhead"] == pytest.approx(TRUE["overhead"], rel=0.15)
    assert result.report["held_out"]["median_ape"] < 0.03
    assert result.report["held_out_including_disturbed"]["p90_ape"] > 0.5


def test_a_profile_disturbed_throughout_is_still_fitted():
    steps = synthetic_profile(noise=0.02).measured_steps()
    steps["disturbed"] = True
    result = fit_steps(steps)
    assert result.report["disturbed_steps_used"] is True
    assert result.report["held_out"]["median_ape"] < 0.05


def test_unreadable_files_are_one_line_errors_or_refitted(tmp_path):
    profile = tmp_path / "prof"
    synthetic_profile().save(profile)
    fresh = load_fitted_model(profile).coefficients
    (profile / FIT_FILE).write_bytes(b"\xd4\x00 random bytes")  # a damaged fit.json beside the profile
    assert load_fitted_model(profile).coefficients == fresh  # fitted afresh, the same machine
    for damaged in (b"\xd4\x00 random bytes", b"[1, 2]", b'{"format": "rllm-sim-fitted-step-model"}'):
        (tmp_path / "fit.json").write_bytes(damaged)
        with pytest.raises(ConfigError) as err:
            load_fitted_model(tmp_path / "fit.json")
        assert str(err.value).startswith("fit: ") and "\n" not in str(err.value)
    (profile / "steps.parquet").write_bytes(b"not parquet")
    (profile / FIT_FILE).unlink()
    with pytest.raises(ConfigError, match="profile: .*steps.parquet is not a readable steps table"):
        Profile.load(profile)
    (profile / "profile.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="profile: .*profile.json is not valid JSON"):
        Profile.load(profile)
