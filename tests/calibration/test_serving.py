"""The serving path a profile carries: overheads stored in the profile, applied by perf=profile,
and the same terms in `calibration validate`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from calibration.fit import FIT_FILE, fit_profile, load_fitted_model, save_fitted_model
from calibration.registry import build_performance_model
from calibration.serving import ServedModel, ServingOverheads, decode_offsets, overheads_from_probes
from simulator.engine.loop import simulate
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import StepBatch
from simulator.records.workload import Workload
from tests.calibration.test_fit import synthetic_profile

ENGINE = EngineConfig(block_size=128, max_num_seqs=128, max_num_batched_tokens=2048, max_model_len=8192)


def decode_probe(model, batch: int, prompt: int, extra_s: float) -> dict:
    """A decode probe whose server step is the model's plus ``extra_s`` (per step)."""
    first, last = prompt + 2, prompt + 1 + 100
    contexts = np.arange(first, last + 1)
    wall = np.mean([model.step_time(StepBatch(decode_context=[int(c)] * batch)) for c in contexts]) + extra_s
    return {"batch": batch, "prompt_tokens": prompt, "steps": 99, "wall_per_step_s": float(wall),
            "context_first": first, "context_last": last}


def probe_sets(model, per_step: float, per_request: float, rounds: int = 3) -> list[dict]:
    return [{"decode_probe": [decode_probe(model, b, p, per_step + per_request * b)
                              for b, p in ((1, 32), (8, 32), (1, 384), (8, 384))],
             "request_overhead_s": 0.004 + 0.001 * i, "prefill_probe": None, "loaded_probe": []}
            for i in range(rounds)]


def test_probe_sets_give_back_a_known_per_step_and_per_request_cost():
    bare = fit_profile(synthetic_profile())
    sets = probe_sets(bare, 0.0015, 0.0002)
    per_step, per_request, per_context = decode_offsets(bare, sets)
    assert per_step == pytest.approx(0.0015, abs=1e-9) and per_request == pytest.approx(0.0002, abs=1e-9)
    assert per_context == pytest.approx(0.0, abs=1e-12)
    overheads = overheads_from_probes(bare, sets, ENGINE, False, "test")
    assert overheads.request_overhead_s == pytest.approx(0.005)  # the median round
    assert "prefill probes" in overheads.source and overheads.per_prefill_token_s == 0.0  # said, not guessed


def test_a_profile_with_a_known_per_step_overhead_shifts_step_times_by_exactly_that(tmp_path):
    profile = synthetic_profile()
    profile.meta["serving"] = {"probes": probe_sets(fit_profile(profile), 0.002, 0.0), "servers": 1,
                               "async_scheduling": False}
    profile.save(tmp_path / "prof")
    save_fitted_model(fit_profile(profile), tmp_path / "prof" / FIT_FILE)
    stored = json.loads((tmp_path / "prof" / FIT_FILE).read_text())["serving"]
    assert stored["per_step_s"] == pytest.approx(0.002, abs=1e-9)

    served = build_performance_model("h100", "r1-distill-qwen-7b", "none", 1,
                                     {"source": "profile", "profile": str(tmp_path / "prof")})
    bare = build_performance_model("h100", "r1-distill-qwen-7b", "none", 1,
                                   {"source": "profile", "profile": str(tmp_path / "prof"), "serving": False})
    assert isinstance(served, ServedModel) and not isinstance(bare, ServedModel)
    for batch in (StepBatch(prefill_tokens=[300], prefill_context=[0]), StepBatch(decode_context=[500] * 4)):
        assert served.step_time(batch) - bare.step_time(batch) == pytest.approx(0.002, abs=1e-9)
    # one request alone, sync: every simulated step is longer by exactly the overhead
    workload = Workload(arrival_s=[0.0], prompt_tokens=[300], output_tokens=[20], reasoning_tokens=[0],
                        domain=np.array(["x"], object))
    runs = [simulate(workload, ENGINE, m, async_scheduling=False) for m in (served, bare)]
    steps = [np.asarray(r.timeline["step_time_s"], float) for r in runs]
    assert len(steps[0]) == len(steps[1]) == 20
    assert np.allclose(steps[0] - steps[1], 0.002, atol=1e-9)
    assert served.describe()["request_overhead_s"] == pytest.approx(0.005)  # for the front-end term


def test_a_profile_without_a_serving_phase_is_the_bare_engine(tmp_path):
    synthetic_profile().save(tmp_path / "prof")
    model = build_performance_model("h100", "r1-distill-qwen-7b", "none", 1,
                                    {"source": "profile", "profile": str(tmp_path / "prof")})
    assert not isinstance(model, ServedModel) and load_fitted_model(tmp_path / "prof").serving is None


def test_validate_takes_the_profile_overheads_the_simulator_applies():
    from calibration.cmd_validate import profile_overheads

    bare = fit_profile(synthetic_profile())
    assert profile_overheads(bare) is None
    bare.serving = ServingOverheads(per_step_s=0.001, request_overhead_s=0.004, source="p").to_dict()
    assert profile_overheads(bare) == ServingOverheads.from_dict(bare.serving)


def test_perf_serving_must_be_a_boolean(tmp_path):
    from simulator.records.errors import ConfigError

    synthetic_profile().save(tmp_path / "prof")
    with pytest.raises(ConfigError, match="perf.serving: must be true or false"):
        build_performance_model("h100", "r1-distill-qwen-7b", "none", 1,
                                {"source": "profile", "profile": str(tmp_path / "prof"), "serving": "yes"})


def test_a_speculative_server_is_priced_by_its_inter_step_gap():
    """Drafting servers' decode steps are not the logged batches: per step = the median gap."""
    bare = fit_profile(synthetic_profile())
    sets = [{**s, "inter_step_gap_s": gap} for s, gap in zip(probe_sets(bare, 0.01, 0.001), (0.001, 0.002, 0.004),
                                                              strict=True)]
    overheads = overheads_from_probes(bare, sets, ENGINE, False, "test", speculative=True)
    assert (overheads.per_step_s, overheads.per_request_s, overheads.per_context_token_s) == (0.002, 0.0, 0.0)
    assert "inter-step gap" in overheads.source


def test_a_per_kv_token_term_beyond_process_drift_is_clamped():
    """Four probe batches extrapolated to long contexts: a per-KV-token difference of 3x the fit's
    own is noise, bounded to DRIFT_BOUND of it (and said so)."""
    from calibration.serving import DRIFT_BOUND

    bare = fit_profile(synthetic_profile())
    kv_cost = bare.coefficients["per_decode_kv_token"]
    sets = [{"decode_probe": [decode_probe(bare, b, p, 0.001 + 3 * kv_cost * b * (p + 51))
                              for b, p in ((1, 32), (8, 32), (1, 384), (8, 384))]}]
    assert decode_offsets(bare, sets)[2] == pytest.approx(3 * kv_cost, rel=1e-6)
    overheads = overheads_from_probes(bare, sets, ENGINE, False, "test")
    assert overheads.per_context_token_s == pytest.approx(DRIFT_BOUND * kv_cost)
    assert "per KV token clamped" in overheads.source


def served_load_record(model, terms: ServingOverheads, scale: float, seed: int = 3, n: int = 40,
                       engine: EngineConfig = ENGINE) -> dict:
    """A served load whose requests took exactly what ``ServedModel(model, terms)`` scaled by
    ``scale`` simulates on ``engine``, client-observed (the idle per-request overhead added)."""
    rng = np.random.default_rng(seed)
    workload = Workload(arrival_s=np.cumsum(rng.gamma(0.25, 0.4, n)), prompt_tokens=rng.integers(32, 700, n),
                        output_tokens=rng.integers(16, 400, n), reasoning_tokens=np.zeros(n, int),
                        domain=np.full(n, "load", object))
    served = ServedModel(model, dataclasses.replace(terms, step_scale=scale))
    e2e = simulate(workload, engine, served, async_scheduling=False).requests["e2e_s"] + terms.request_overhead_s
    completed = [True] * n
    completed[5] = False  # a failed request is left out of both sides
    e2e = np.where(completed, e2e, 1e6)
    return {"arrival_s": workload.arrival_s.tolist(), "prompt_tokens": workload.prompt_tokens.tolist(),
            "output_tokens": workload.output_tokens.tolist(), "completed": completed, "e2e_s": e2e.tolist(),
            "ttft_s": [0.0] * n}


@pytest.mark.parametrize("scale", [0.8, 1.0, 1.27])
def test_a_served_load_gives_back_the_step_scale_its_requests_took(scale):
    bare = fit_profile(synthetic_profile())
    terms = overheads_from_probes(bare, probe_sets(bare, 0.0015, 0.0002), ENGINE, False, "test")
    assert terms.step_scale == 1.0 and terms.load_requests == 0  # no load: no scale
    load = served_load_record(bare, terms, scale)
    found = overheads_from_probes(bare, probe_sets(bare, 0.0015, 0.0002), ENGINE, False, "test", loads=[load])
    assert found.step_scale == pytest.approx(scale, rel=1e-4) and found.load_requests == 39
    assert "step scale from 1 served load(s) of 39 requests" in found.source
    # the other terms are the probes', untouched
    assert (found.per_step_s, found.per_request_s) == (terms.per_step_s, terms.per_request_s)


def test_a_speculative_load_is_simulated_with_the_drafting_its_counters_measured():
    """A server that drafted: its load's step scale comes back only when the load is simulated
    with the acceptance it met (without it, each request needs more steps than it took)."""
    from calibration.serving import load_scale
    from simulator.records.engine_config import SpeculativeConfig

    bare = fit_profile(synthetic_profile())
    terms = ServingOverheads(per_step_s=0.001, request_overhead_s=0.004)
    drafting = {"method": "ngram", "num_speculative_tokens": 3, "acceptance_rate": [0.9, 0.7, 0.5],
                "proposal_rate": 0.8}
    engine = dataclasses.replace(ENGINE, speculative=SpeculativeConfig(**drafting))
    load = served_load_record(bare, terms, 1.15, engine=engine)
    # (the fit's engine settings carry no drafting: the load's record does)
    scale, _, _ = load_scale(bare, terms, [{**load, "speculative": drafting}], ENGINE, False)
    assert scale == pytest.approx(1.15, rel=1e-4)
    unaware, _, _ = load_scale(bare, terms, [load], ENGINE, False)  # as if it had not drafted
    assert unaware < 0.9 * 1.15


def test_a_served_load_beyond_the_bounds_is_clamped_and_said():
    from calibration.serving import SCALE_BOUNDS, load_scale

    bare = fit_profile(synthetic_profile())
    terms = ServingOverheads(per_step_s=0.001, request_overhead_s=0.004)
    load = served_load_record(bare, terms, 3.0)
    scale, _, said = load_scale(bare, terms, [load], ENGINE, False)
    assert scale == SCALE_BOUNDS[1] and "clamped" in said
    assert load_scale(bare, terms, [{**load, "completed": [False] * len(load["completed"])}], ENGINE, False) is None


def test_the_step_scale_multiplies_every_step_of_the_served_model():
    bare = fit_profile(synthetic_profile())
    terms = ServingOverheads(per_step_s=0.001, per_request_s=0.0001)
    plain, scaled = ServedModel(bare, terms), ServedModel(bare, dataclasses.replace(terms, step_scale=1.25))
    for batch in (StepBatch(prefill_tokens=[300], prefill_context=[0]), StepBatch(decode_context=[500] * 4)):
        assert scaled.step_time(batch) == pytest.approx(1.25 * plain.step_time(batch), rel=1e-12)
    context = np.array([400.0, 404.0, 408.0])
    assert np.allclose(scaled.decode_times(4, context), 1.25 * plain.decode_times(4, context), rtol=1e-12)
    by_count = scaled.decode_times_by_count([4, 3], [2, 1], context)
    assert np.allclose(by_count, 1.25 * plain.decode_times_by_count([4, 3], [2, 1], context), rtol=1e-12)
    from simulator.records.errors import ConfigError

    with pytest.raises(ConfigError, match="serving.step_scale"):
        ServedModel(bare, dataclasses.replace(terms, step_scale=0.0))


def test_a_profile_with_a_served_load_is_simulated_with_its_scale(tmp_path):
    profile = synthetic_profile()
    bare = fit_profile(profile)
    sets = probe_sets(bare, 0.002, 0.0)
    terms = overheads_from_probes(bare, sets, ENGINE, False, "test")
    profile.meta["serving"] = {"probes": sets, "servers": 1, "async_scheduling": False,
                               "loads": [served_load_record(bare, terms, 1.15)]}
    profile.save(tmp_path / "prof")
    served = build_performance_model("h100", "r1-distill-qwen-7b", "none", 1,
                                     {"source": "profile", "profile": str(tmp_path / "prof")})
    assert isinstance(served, ServedModel) and served.overheads.step_scale == pytest.approx(1.15, rel=1e-3)
    unscaled = ServedModel(load_fitted_model(tmp_path / "prof"), dataclasses.replace(served.overheads, step_scale=1.0))
    batch = StepBatch(decode_context=[500] * 4)
    assert served.step_time(batch) == pytest.approx(served.overheads.step_scale * unscaled.step_time(batch))


def logged_load(model, per_step: float, per_request: float, per_kv: float, seed: int = 2, steps: int = 600,
                contexts: tuple[int, int] = (100, 3000)) -> dict:
    """A served load's iteration log whose decode steps took the model's time plus the three terms
    (KV usage as the server logs it: blocks, a request's last block half full on average);
    ``contexts``: the range of a step's tokens per request."""
    rng = np.random.default_rng(seed)
    blocks, size, gap = 4000, 128, 0.0013
    n = rng.integers(1, 33, steps)
    per_seq = rng.integers(*contexts, steps)
    kv_tokens = n * per_seq
    usage = (kv_tokens + n * size / 2) / (blocks * size)
    wall = np.array([model.step_time(StepBatch(decode_context=[int(c)] * int(k))) for k, c in zip(n, per_seq, strict=True)])
    elapsed = wall + per_step + per_request * n + per_kv * kv_tokens - gap
    prefill = np.arange(steps) % 10 == 0  # every tenth step a prefill: left out of the decode terms
    return {"steps": {"ctx_requests": prefill.astype(int).tolist(), "ctx_tokens": (prefill * 300).tolist(),
                      "gen_requests": n.tolist(), "gen_tokens": n.tolist(),
                      "elapsed_s": np.where(prefill, 1.0, elapsed).tolist(), "kv_usage": usage.tolist()},
            "inter_step_gap_s": gap, "num_blocks": blocks, "block_size": size}


def test_a_served_loads_logged_steps_give_back_known_decode_terms():
    from calibration.serving import load_step_offsets

    bare = fit_profile(synthetic_profile())
    kv_cost = bare.coefficients["per_decode_kv_token"]
    load = logged_load(bare, 0.0021, -0.00004, 0.2 * kv_cost)
    per_step, per_request, per_context = load_step_offsets(bare, [load])
    assert per_step == pytest.approx(0.0021, abs=2e-5) and per_request == pytest.approx(-0.00004, abs=2e-6)
    assert per_context == pytest.approx(0.2 * kv_cost, rel=0.02)
    # the profile's terms come from them (not the probes, which say otherwise), and say so
    found = overheads_from_probes(bare, probe_sets(bare, 0.009, 0.0), ENGINE, False, "test", loads=[load])
    assert found.per_step_s == pytest.approx(0.0021, abs=2e-5) and "served loads' logged steps" in found.source
    # too few logged decode steps: the probes' terms
    short = {**load, "steps": {k: v[:100] for k, v in load["steps"].items()}}
    assert load_step_offsets(bare, [short]) is None
    probed = overheads_from_probes(bare, probe_sets(bare, 0.009, 0.0), ENGINE, False, "test", loads=[short])
    assert probed.per_step_s == pytest.approx(0.009, abs=1e-9) and "logged steps" not in probed.source


def test_a_per_kv_token_term_the_served_loads_cannot_tell_apart_is_left_out():
    """Requests of about one context: KV tokens follow the batch size, so the plane cannot split
    a per-KV-token cost from a per-request one; the in-process fit's context cost stands alone."""
    from calibration.serving import context_separable, decode_terms

    bare = fit_profile(synthetic_profile())
    kv_cost = bare.coefficients["per_decode_kv_token"]
    apart = logged_load(bare, 0.0021, -0.00004, 0.2 * kv_cost)
    assert context_separable([apart])
    terms, note = decode_terms(bare, [], [apart], speculative=False)
    assert terms[2] == pytest.approx(0.2 * kv_cost, rel=0.02) and "no per-KV-token term" not in note
    tied = logged_load(bare, 0.0021, -0.00004, 0.2 * kv_cost, contexts=(500, 560))
    assert not context_separable([tied])
    (per_step, per_request, per_context), note = decode_terms(bare, [], [tied], speculative=False)
    assert per_context == 0.0 and "no per-KV-token term" in note
    # the per-request term takes the KV cost of a typical request (about 530 tokens)
    assert per_request == pytest.approx(-0.00004 + 0.2 * kv_cost * 530, rel=0.1)
    found = overheads_from_probes(bare, probe_sets(bare, 0.009, 0.0), ENGINE, False, "test", loads=[tied])
    assert found.per_context_token_s == 0.0 and "no per-KV-token term" in found.source


def grouped_load(model, per_step: float, per_prefill_token: float, per_request: float = 0.0, per_kv: float = 0.0,
                 groups: int = 40, outputs: int = 4, most: int = 1) -> dict:
    """A served load of groups of 1 to ``most`` requests arriving together (prompts 100-1,500
    /``most``, ``outputs`` tokens each), one group after another, logged with each step's time
    the model's plus the given terms. The log's KV usage is 0, as a large cache rounds it."""
    rng = np.random.default_rng(5)
    gap, rows, elapsed, prompts, arrivals = 0.001, [], [], [], []
    for g in range(groups):
        group = [int(p) for p in rng.integers(100 // most, 1500 // most, rng.integers(1, most + 1))]
        prompts += group
        arrivals += [10.0 * g] * len(group)
        for i in range(outputs):
            batch = (StepBatch(prefill_tokens=group, prefill_context=[0] * len(group)) if i == 0
                     else StepBatch(decode_context=[p + i for p in group]))
            rows.append((len(group), sum(group), 0) if i == 0 else (0, 0, len(group)))
            elapsed.append(model.step_time(batch) + per_step + per_prefill_token * batch.num_prefill_tokens
                           + per_request * len(batch.decode_context) + per_kv * sum(batch.decode_context) - gap)
    return {"arrival_s": arrivals, "prompt_tokens": prompts, "output_tokens": [outputs] * len(prompts),
            "completed": [True] * len(prompts),
            "steps": {"ctx_requests": [r[0] for r in rows], "ctx_tokens": [r[1] for r in rows],
                      "gen_requests": [r[2] for r in rows], "gen_tokens": [r[2] for r in rows],
                      "elapsed_s": elapsed, "kv_usage": [0.0] * len(rows)},
            "inter_step_gap_s": gap, "num_blocks": 4000, "block_size": 128}


def test_a_served_loads_decode_terms_use_the_kv_lengths_replayed_from_its_requests():
    from calibration.serving import load_step_offsets

    bare = fit_profile(synthetic_profile())
    kv_cost = bare.coefficients["per_decode_kv_token"]
    load = grouped_load(bare, 0.0021, 0.0, per_request=-0.00004, per_kv=0.2 * kv_cost, groups=60, outputs=8,
                        most=12)
    per_step, per_request, per_context = load_step_offsets(bare, [load])
    assert per_step == pytest.approx(0.0021, abs=2e-5) and per_request == pytest.approx(-0.00004, abs=2e-6)
    assert per_context == pytest.approx(0.2 * kv_cost, rel=0.02)


def test_a_served_loads_prefill_steps_give_back_a_known_per_prefill_token_cost():
    bare = fit_profile(synthetic_profile())
    extra = 0.1 * bare.coefficients["per_prefill_token"]
    load = grouped_load(bare, 0.002, extra)
    # the probes say the server prefills no slower; the load's steps say otherwise, and win
    found = overheads_from_probes(bare, probe_sets(bare, 0.002, 0.0), ENGINE, False, "test", loads=[load])
    assert found.per_step_s == pytest.approx(0.002, abs=1e-6)
    assert found.per_prefill_token_s == pytest.approx(extra, rel=0.01)
    assert "prefill term from the served loads" in found.source
    # decode steps that say 3x the fit's own per-KV cost: clamped, and said beside the prefill's source
    from calibration.serving import DRIFT_BOUND

    kv_cost = bare.coefficients["per_decode_kv_token"]
    steep = grouped_load(bare, 0.002, extra, per_kv=3 * kv_cost, groups=60, outputs=8, most=12)
    clamped = overheads_from_probes(bare, probe_sets(bare, 0.002, 0.0), ENGINE, False, "test", loads=[steep])
    assert clamped.per_context_token_s == pytest.approx(DRIFT_BOUND * kv_cost)
    assert "per KV token clamped" in clamped.source and "prefill term from the served loads" in clamped.source
    # a load too short to say: no prefill term from it
    short = {**load, "arrival_s": load["arrival_s"][:5], "prompt_tokens": load["prompt_tokens"][:5],
             "output_tokens": load["output_tokens"][:5], "completed": load["completed"][:5],
             "steps": {k: v[:20] for k, v in load["steps"].items()}}
    probed = overheads_from_probes(bare, probe_sets(bare, 0.002, 0.0), ENGINE, False, "test", loads=[short])
    assert probed.per_prefill_token_s == 0.0 and "prefill term" not in probed.source
