"""A request that arrives while a step runs waits for it: the engine schedules between steps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from simulator.engine.loop import ExactEnvironment, simulate
from simulator.records.engine_config import EngineConfig
from simulator.records.workload import Workload
from tests.simulator.conftest import LinearModel, VectorLinearModel


@pytest.mark.parametrize("model", [LinearModel(), VectorLinearModel()], ids=["step-by-step", "fast path"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_an_arrival_during_a_long_prefill_waits_for_the_step_to_end(model, async_scheduling):
    # A: a 2,000-token prompt at t=0 (one 44 ms prefill step); B: 10 tokens at t=10 ms, mid-step
    workload = Workload(arrival_s=np.array([0.0, 0.010]), prompt_tokens=np.array([2000, 10]),
                        output_tokens=np.array([3, 2]), reasoning_tokens=np.zeros(2, np.int64),
                        domain=np.full(2, "chat", object))
    requests = simulate(workload, EngineConfig(async_scheduling=async_scheduling), model).requests
    first_step = model.overhead + model.prefill * 2000
    # B is scheduled beside A's decode at the first step boundary after it arrived (sync), or at
    # the one after (async: the step after A's prefill was scheduled while the prefill ran)
    a_decode = model.overhead + model.decode + model.kv_read * 2001
    b_prefill = model.overhead + model.prefill * 10 + model.decode + model.kv_read * (2001 + async_scheduling)
    ttft = np.asarray(requests["ttft_s"], dtype=float)
    assert ttft[0] == pytest.approx(first_step)
    assert ttft[1] == pytest.approx(first_step - 0.010 + async_scheduling * a_decode + b_prefill)



@given(a=st.floats(0, 1e4), b=st.floats(0, 1e4))
@example(a=float.fromhex("0x1.03e12da44d805p-5"), b=float.fromhex("0x1.8ebb95e9738dfp-4"))  # no delay lands there
@settings(max_examples=300, deadline=None)
def test_a_wait_ends_exactly_at_its_time(a: float, b: float):
    """The clock after ``ExactEnvironment.timeout_at(t)`` is ``t`` itself, wherever the wait was
    set from (``now + delay`` may round past ``t`` for every delay): a run's end (or an arrival)
    is the same time whichever step the wait began at."""
    now, t = min(a, b), max(a, b)
    env = ExactEnvironment(initial_time=now)
    env.run(until=env.timeout_at(t))
    assert env.now == t
