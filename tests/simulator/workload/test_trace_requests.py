"""What real traces hold: two-level prompt sharing, client timeouts (aborts), 0-token outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulator.engine.loop import Engine, simulate
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.workload import Workload
from simulator.workload.builder import build_workload
from tests.simulator.conftest import LinearModel


def _workload(n: int, gap_s: float, prompt, output, **extra) -> Workload:
    return Workload(arrival_s=np.arange(n) * gap_s, prompt_tokens=np.broadcast_to(prompt, n),
                    output_tokens=np.broadcast_to(output, n), reasoning_tokens=np.zeros(n, np.int64),
                    domain=np.full(n, "chat", object), **extra)


# --- nested prefix groups ----------------------------------------------------------------------
GROUPS = [1, 1, 2, 2, 3, 4]      # the question each request shares with a few others
OUTER = [0, 0, 0, 0, 0, -1]      # the system prompt the first five share
PREFIX, SYSTEM, PROMPT = 128, 64, 200  # tokens: question prefix (system prompt included), system prompt, prompt


def _prefix_hits(outer_group) -> int:
    """Requests one at a time (each done before the next comes): the prefix-cache hits."""
    n = len(GROUPS)
    w = _workload(n, 10.0, PROMPT, 2, prefix_group=np.array(GROUPS), prefix_tokens=np.full(n, PREFIX),
                  outer_group=np.array(outer_group), outer_tokens=np.full(n, SYSTEM))
    result = simulate(w, EngineConfig(block_size=16), LinearModel())
    assert (result.requests["status"] == "completed").all()
    return result.summary["prefix_cache"]["hit_tokens"]


def test_nested_prefix_groups_hit_both_levels():
    # r0 nothing; r1 its question (128); r2 a new question: only the system prompt (64);
    # r3 its question (128); r4 a new question: the system prompt (64); r5 no outer group: nothing
    assert _prefix_hits(OUTER) == 128 + 64 + 128 + 64
    # one level only (the old model): a new question shares nothing
    assert _prefix_hits([-1] * len(GROUPS)) == 128 + 128


def test_outer_tokens_must_lie_inside_the_groups_prefix():
    with pytest.raises(ConfigError) as err:
        _workload(2, 1.0, 100, 5, prefix_group=np.array([0, 0]), prefix_tokens=np.array([32, 32]),
                  outer_group=np.array([0, 0]), outer_tokens=np.array([64, 64]))
    assert err.value.field == "workload.outer_tokens"
    with pytest.raises(ConfigError) as err:
        _workload(1, 1.0, 100, 5, outer_group=np.array([0]), outer_tokens=np.array([16]))
    assert err.value.field == "workload.outer_group"


def test_nested_groups_survive_a_saved_workload(tmp_path):
    path = tmp_path / "nested.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens,prefix_group,prefix_tokens,outer_group,outer_tokens,"
                    "timeout_s\n0.0,200,4,1,128,0,64,30\n1.0,200,4,2,128,0,64,30\n")
    w = build_workload({"kind": "file", "path": str(path), "duration_s": float("inf")})
    assert w.outer_group.tolist() == [0, 0] and w.outer_tokens.tolist() == [64, 64]
    assert w.timeout_s.tolist() == [30.0, 30.0]
    again = Workload.from_frame(w.to_frame())
    assert again.outer_group.tolist() == [0, 0] and again.timeout_s.tolist() == [30.0, 30.0]


# --- client timeouts and aborts ------------------------------------------------------------------
# A (long) holds the small cache; B's prompt fits only once A's blocks are free.
BLOCKS = 80                      # 79 usable blocks of 16 tokens
A_PROMPT, A_OUTPUT, B_PROMPT, B_ARRIVAL = 160, 1000, 1000, 0.5
TIMEOUT = 1.0


def _ab(timeout: float | None, async_scheduling: bool):
    w = Workload(arrival_s=np.array([0.0, B_ARRIVAL]), prompt_tokens=np.array([A_PROMPT, B_PROMPT]),
                 output_tokens=np.array([A_OUTPUT, 10]), reasoning_tokens=np.zeros(2, np.int64),
                 domain=np.full(2, "chat", object),
                 timeout_s=None if timeout is None else np.array([timeout, np.inf]))
    config = EngineConfig(block_size=16, num_gpu_blocks_override=BLOCKS, enable_prefix_caching=False)
    return simulate(w, config, LinearModel(), async_scheduling=async_scheduling)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_abort_frees_the_blocks_and_is_counted(async_scheduling):
    step = LinearModel().overhead * 3  # a step here takes ~4 ms; allow a few
    kept = _ab(None, async_scheduling)
    a_done = kept.requests["finish_s"][0]
    assert kept.summary["aborted"] == 0 and kept.requests["queue_s"][1] + B_ARRIVAL >= a_done - step  # B waited for A

    cut = _ab(TIMEOUT, async_scheduling)
    r, s = cut.requests, cut.summary
    assert r["status"].tolist() == ["aborted", "completed"]
    assert s["aborted"] == 1 and s["completed"] == 1 and s["requests"] == 2
    assert TIMEOUT <= r["finish_s"][0] <= TIMEOUT + step and np.isnan(r["e2e_s"][0])
    assert 0 < r["output_tokens"][0] < A_OUTPUT  # it was cut short
    b_start = r["queue_s"][1] + B_ARRIVAL
    assert TIMEOUT <= b_start <= TIMEOUT + step < a_done  # B got A's blocks at the abort
    tl = cut.timeline
    after = np.flatnonzero(tl["time_s"] > b_start)[0]
    assert tl["kv_blocks_used"][after] <= -(-(B_PROMPT + 1) // 16) + 1  # only B's blocks are held
    assert tl["kv_blocks_used"][-1] == 0
    assert s["e2e_s"]["p50"] == pytest.approx(r["e2e_s"][1])  # latencies count completed requests


def test_timeouts_run_step_by_step():
    """The fast path (runs of decode steps in closed form) does not take aborts: it steps instead."""
    from calibration.registry import build_performance_model

    pm = build_performance_model("h100", "llama-3.1-8b", None, 1, {"source": "aiconfigurator"})
    kv = pm.kv_capacity(16)
    plain = _workload(40, 0.05, 300, 400)
    timed = _workload(40, 0.05, 300, 20 + 20 * np.arange(40), timeout_s=np.full(40, 3.0))
    assert Engine(plain, EngineConfig(), pm, kv, fast=True).fast
    assert not Engine(timed, EngineConfig(), pm, kv, fast=True).fast
    a, b = simulate(timed, EngineConfig(), pm, fast=True), simulate(timed, EngineConfig(), pm, fast=False)
    assert a.requests["status"].tolist() == b.requests["status"].tolist()
    assert 0 < a.summary["aborted"] < 40


def test_workload_timeout_from_the_config():
    w = build_workload({"kind": "gamma", "rate": 2.0, "num_requests": 5, "timeout_s": 12.5})
    assert w.timeout_s.tolist() == [12.5] * 5
    assert not build_workload({"kind": "gamma", "rate": 2.0, "num_requests": 5}).has_timeouts
    with pytest.raises(ConfigError) as err:
        build_workload({"kind": "gamma", "rate": 2.0, "num_requests": 5, "timeout_s": 0})
    assert err.value.field == "workload.timeout_s"


# --- recorded 0-token outputs ----------------------------------------------------------------------
def test_zero_token_outputs_in_a_mooncake_trace_run_with_one_and_warn(tmp_path, capsys):
    path = tmp_path / "trace.jsonl"
    rows = [{"timestamp": 100 * i, "input_length": 40, "output_length": out, "hash_ids": [i]}
            for i, out in enumerate([0, 5, 0])]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    w = build_workload({"kind": "mooncake", "path": str(path), "duration_s": float("inf")})
    assert w.output_tokens.tolist() == [1, 5, 1]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "2 request(s) with 0 output tokens" in err[0]


def test_zero_token_outputs_in_a_saved_workload_run_with_one_and_warn(tmp_path, capsys):
    path = tmp_path / "saved.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,5,0\n1.0,5,3\n")
    w = build_workload({"kind": "file", "path": str(path), "duration_s": float("inf")})
    assert w.output_tokens.tolist() == [1, 3]
    assert "1 request(s) with 0 output tokens" in capsys.readouterr().err


# --- against vLLM's own scheduler and prefix cache (engine env only) -------------------------------
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_nested_groups_and_aborts_agree_with_vllm(async_scheduling):
    """vLLM's real scheduler and block hashing (prompts built from the groups' tokens) on a workload
    with two-level sharing and client timeouts: the same requests abort, the same prefix hits."""
    from dataclasses import replace

    from simulator.engine.vllm_oracle import require_vllm

    try:
        require_vllm()
    except Exception as err:  # noqa: BLE001 - any import failure: not the engine env
        pytest.skip(f"vLLM is not importable here: {err}")
    rng = np.random.default_rng(5)
    n = 60
    group = rng.integers(0, 6, n)
    w = Workload(arrival_s=np.cumsum(rng.exponential(0.05, n)), prompt_tokens=rng.integers(300, 700, n),
                 output_tokens=rng.integers(5, 400, n), reasoning_tokens=np.zeros(n, np.int64),
                 domain=np.full(n, "chat", object), prefix_group=group, prefix_tokens=np.full(n, 256),
                 outer_group=np.where(group < 4, 0, 1), outer_tokens=np.full(n, 100),
                 timeout_s=np.full(n, 1.5))
    config = EngineConfig(block_size=16, num_gpu_blocks_override=400, max_num_seqs=16)
    native = simulate(w, config, LinearModel(), async_scheduling=async_scheduling, fast=False)
    vllm = simulate(w, replace(config, scheduler="vllm"), LinearModel(), async_scheduling=async_scheduling)
    assert native.requests["status"].tolist() == vllm.requests["status"].tolist()
    assert 0 < native.summary["aborted"] < n
    assert native.summary["prefix_cache"] == vllm.summary["prefix_cache"]
    assert native.summary["prefix_cache"]["hit_tokens"] > 0


def test_cli_reports_aborted_requests(tmp_path):
    """``workload.timeout_s`` on the command line: aborted requests in summary.json, the terminal
    and requests.parquet (status ``aborted``), the rest completed."""
    import pandas as pd

    from tests.simulator.test_cli import run_cli, summary

    proc = run_cli(tmp_path, "workload=gamma", "workload.num_requests=60", "workload.rate=20",
                   "workload.timeout_s=20", "plots=false")
    s = summary(tmp_path)
    status = pd.read_parquet(tmp_path / "requests.parquet")["status"]
    assert s["aborted"] == int((status == "aborted").sum()) > 0
    assert s["completed"] + s["aborted"] + s["rejected"] == 60
    assert "aborted (client timeout)" in proc.stdout


# --- two levels in a real trace (Mooncake's hash-id trie) ----------------------------------------
def test_mooncake_branches_keep_their_head_as_an_outer_group():
    from simulator.workload.traces import mooncake_prefix_levels

    hashes = [[0, 1, 2], [0, 1, 2, 3], [0, 1, 5, 6], [0, 1, 5, 6, 7], [9], [0, 1, 2, 3, 4]]
    group, shared, outer, outer_blocks = mooncake_prefix_levels(hashes)
    # requests 2 and 3 branch from the [0, 1, 2, ...] chain after 2 blocks and go on together
    assert group.tolist() == [0, 0, 1, 1, -1, 0] and shared.tolist() == [3, 4, 4, 4, 0, 4]
    assert outer.tolist() == [-1, -1, 0, 0, -1, -1] and outer_blocks.tolist() == [0, 0, 2, 2, 0, 0]


def _kept(hashes, group, shared, outer, outer_blocks) -> tuple[int, int]:
    """(blocks an unbounded cache of the trace's own ids hits, blocks the named levels hit)."""
    seen, exact = set(), 0
    for ids in hashes:
        run = 0
        while run < len(ids) and ids[run] in seen:
            run += 1
        exact += run
        seen.update(ids)
    names, kept = set(), 0
    for i in np.flatnonzero(group >= 0):
        named = [(outer[i] if j < outer_blocks[i] else group[i], j) for j in range(shared[i])]
        run = 0
        while run < len(named) and named[run] in names:
            run += 1
        kept += run
        names.update(named)
    return exact, kept


@pytest.mark.parametrize("name", ["conversation_trace.jsonl", "synthetic_trace.jsonl"])
def test_two_levels_keep_more_of_a_real_traces_sharing_and_never_overstate(name):
    from simulator.workload.traces import REPO_ROOT, mooncake_prefix_levels

    rows = [json.loads(line) for line in (REPO_ROOT / "data" / "traces" / "mooncake" / name).read_text().splitlines()]
    rows.sort(key=lambda r: r["timestamp"])
    hashes = [r["hash_ids"] for r in rows]
    group, shared, outer, outer_blocks = mooncake_prefix_levels(hashes)
    exact, two = _kept(hashes, group, shared, outer, outer_blocks)
    _, one = _kept(hashes, group, shared, np.full(len(group), -1), np.zeros(len(group), np.int64))
    assert (outer >= 0).sum() > 100
    assert one < two <= exact and two >= 0.98 * exact
