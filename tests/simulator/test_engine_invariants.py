"""Simulator invariants on many random small configurations (BLIS-style property tests).

- request conservation: every arrival ends completed or rejected;
- KV conservation: blocks in use never exceed capacity and return to zero;
- the clock never goes back;
- determinism: the same seed gives identical outputs.
"""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulator.engine import simulate
from simulator.engine_config import EngineConfig, SpeculativeConfig
from simulator.metrics import SLO
from tests.simulator.conftest import LinearModel, make_workload

configs = st.fixed_dictionaries(
    {
        "n": st.integers(1, 40),
        "seed": st.integers(0, 10_000),
        "rate": st.floats(0.5, 50),
        "num_blocks": st.integers(40, 400),
        "block_size": st.sampled_from([16, 32]),
        "max_num_seqs": st.integers(1, 64),
        "max_num_batched_tokens": st.sampled_from([64, 256, 2048]),
        "chunked": st.booleans(),
        "prefix": st.booleans(),
        "async_scheduling": st.booleans(),
        "spec": st.sampled_from([0, 0, 3]),
        "prefix_groups": st.sampled_from([0, 2]),
    }
)


def run(c, seed=None):
    max_model_len = 2048
    engine = EngineConfig(
        block_size=c["block_size"],
        max_num_seqs=c["max_num_seqs"],
        max_num_batched_tokens=c["max_num_batched_tokens"] if c["chunked"] else max_model_len,
        max_model_len=max_model_len,
        enable_chunked_prefill=c["chunked"],
        enable_prefix_caching=c["prefix"],
        num_gpu_blocks_override=c["num_blocks"],
        speculative=SpeculativeConfig(num_speculative_tokens=c["spec"], acceptance_rate=(0.7, 0.5, 0.3)[: c["spec"]] or (0.5,)),
    )
    w = make_workload(n=c["n"], seed=c["seed"], rate=c["rate"], prompt=(1, 900), output=(1, 700),
                      prefix_groups=c["prefix_groups"], prefix_tokens=64 if c["prefix_groups"] else 0)
    async_mode = c["async_scheduling"] and not c["spec"]
    return w, simulate(w, engine, LinearModel(), seed=c["seed"] if seed is None else seed,
                       async_scheduling=async_mode, keep_decisions=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_invariants(c):
    w, r = run(c)
    req, tl = r.requests, r.timeline
    # request conservation
    assert len(req["status"]) == len(w)
    assert set(req["status"]) <= {"completed", "rejected"}
    done = req["status"] == "completed"
    assert np.all(req["output_tokens"][done] == w.output_tokens[req["request_id"][done]])
    rejected = req["status"] == "rejected"
    assert np.all(w.prompt_tokens[rejected] + w.output_tokens[rejected] > min(2048, (c["num_blocks"] - 1) * c["block_size"]))
    # KV conservation
    assert np.all(tl["kv_blocks_used"] <= c["num_blocks"] - 1)
    if len(tl["kv_blocks_used"]):
        assert tl["kv_blocks_used"][-1] == 0
    # monotonic clock; steps start no earlier than the previous one ended
    assert np.all(np.diff(tl["time_s"]) >= 0)
    assert np.all(tl["step_time_s"] > 0)
    # latencies are causal
    assert np.all(req["ttft_s"][done] > 0)
    assert np.all(req["ttfvt_s"][done] >= req["ttft_s"][done] - 1e-12)
    assert np.all(req["e2e_s"][done] >= req["ttft_s"][done] - 1e-12)
    # scheduler limits
    for out in r.decisions:
        assert out.total_tokens <= (c["max_num_batched_tokens"] if c["chunked"] else 2048)
        assert len(out.num_scheduled) <= c["max_num_seqs"]


@settings(max_examples=15, deadline=None)
@given(configs)
def test_same_seed_same_outputs(c):
    _, a = run(c)
    _, b = run(c)
    for key in a.requests:
        np.testing.assert_array_equal(a.requests[key], b.requests[key])
    for key in a.timeline:
        np.testing.assert_array_equal(a.timeline[key], b.timeline[key])


def test_a_stopped_run_is_the_prefix_of_the_full_run():
    """request_stop ends a run at a step boundary; what finished by then is what the full run says."""
    from simulator.engine import Engine
    from simulator.results import tabulate

    w = make_workload(150, seed=9, rate=20.0, output=(50, 600))
    config = EngineConfig(num_gpu_blocks_override=300, max_num_seqs=32)
    full = simulate(w, config, LinearModel(), seed=1)
    perf = LinearModel()
    kv = perf.kv_capacity(config.block_size, config.gpu_memory_utilization, config.num_gpu_blocks_override)
    finished = []

    def on_progress(n):
        finished.append(n)
        if sum(finished) >= 40:
            engine.request_stop()

    engine = Engine(w, config, perf, kv, seed=1, on_progress=on_progress)
    run = engine.run()
    assert engine.interrupted
    partial = tabulate(run, w, SLO())
    done = partial.requests["status"] == "completed"
    assert 40 <= done.sum() < 150 and (partial.requests["status"] == "unfinished").any()
    ids = partial.requests["request_id"][done]
    for column in ("ttft_s", "e2e_s", "tpot_s", "preemptions", "output_tokens"):
        np.testing.assert_array_equal(partial.requests[column][done], full.requests[column][ids], column)
    steps = len(partial.timeline["time_s"])
    np.testing.assert_array_equal(partial.timeline["kv_blocks_used"], full.timeline["kv_blocks_used"][:steps])
