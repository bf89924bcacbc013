"""Live observations -> the simulator's RunResult schema; `vllm bench serve` result files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from profiler.live.bench_import import read_bench_result
from profiler.live.client import RequestRecord
from profiler.live.iteration_log import IterationRecord, steps_table
from profiler.live.metrics import METRIC_COLUMNS
from profiler.live.tables import REQUEST_EXTRAS, live_result, token_columns
from simulator.records.errors import ConfigError
from simulator.records.metrics import REQUEST_COLUMNS, SLO, TIMELINE_COLUMNS, summarize
from simulator.records.run_result import RunResult
from simulator.records.workload import Workload

DATA = Path(__file__).parent / "data"


def _record(rid, send, first, gap, n, prompt=40, status="completed", error=""):
    times = [first + i * gap for i in range(n)]
    return RequestRecord(rid, scheduled_s=send - 0.001, prompt_tokens=prompt, expected_tokens=n,
                         send_s=send, first_token_s=first if n else np.nan,
                         last_token_s=times[-1] if n else np.nan,
                         end_s=times[-1] + 0.001 if n else send + 0.1,
                         token_times=times, output_tokens=n, status=status, error=error)


def _metrics(times, waiting, preemptions):
    cols = {c: np.full(len(times), np.nan) for c in METRIC_COLUMNS}
    cols["time_s"] = np.array(times, float)
    cols["waiting"] = np.array(waiting, float)
    cols["preemptions_total"] = np.array(preemptions, float)
    cols["kv_usage"] = np.full(len(times), 0.5)
    return cols


@pytest.fixture
def observed():
    records = [_record(0, 0.0, 0.05, 0.01, 11), _record(1, 0.5, 0.60, 0.02, 6),
               _record(2, 1.0, np.nan, 0.0, 0, status="failed", error="timeout after 1 s (0 of 9 tokens)")]
    records[2].expected_tokens = 9
    w = Workload(np.array([0.0, 0.5, 1.0]), np.array([40, 40, 40]), np.array([11, 6, 9]),
                 np.array([5, 0, 3]), np.array(["math", "chat", "code"], object))
    steps = steps_table([
        (0.05, IterationRecord(0, 0, 1, 40, 0, 0, 0.010, 0.03)),
        (0.06, IterationRecord(1, 0, 0, 0, 1, 1, 0.008, 0.03)),
        (0.60, IterationRecord(2, 0, 1, 40, 1, 1, 0.012, 0.06)),
        (0.61, IterationRecord(3, 0, 0, 0, 2, 90, 0.030, 0.09)),  # one request recomputes 89 tokens
        (0.70, IterationRecord(4, 0, 0, 0, 2, 2, 0.008, 0.0)),
    ])
    metrics = _metrics([0.0, 0.5, 0.65], waiting=[0, 3, 1], preemptions=[4, 4, 6])
    result = live_result(records, w, steps, metrics, num_blocks=64, block_size=32, slo=SLO(ttft_s=0.08),
                         gap_s=0.001)
    return records, w, result


def test_request_columns_follow_the_schema_and_the_token_times(observed):
    _, _, result = observed
    req = result.requests
    assert tuple(req) == REQUEST_COLUMNS + REQUEST_EXTRAS
    assert req["status"].tolist() == ["completed", "completed", "failed"]
    np.testing.assert_allclose(req["ttft_s"][:2], [0.05, 0.10])
    np.testing.assert_allclose(req["tpot_s"][:2], [0.01, 0.02])
    np.testing.assert_allclose(req["e2e_s"][:2], [0.15, 0.20])
    assert np.isnan(req["e2e_s"][2])
    # first visible token: output token number reasoning+1 (request 0 thinks for 5 tokens)
    np.testing.assert_allclose(req["ttfvt_s"][:2], [0.10, 0.10])
    np.testing.assert_allclose(req["send_lag_s"], [0.001] * 3)
    assert req["error"][2].startswith("timeout")
    # prompt 40 + k tokens over 32-token blocks: 2 blocks from the first token on
    assert req["kv_block_seconds"][0] == pytest.approx(2 * 0.10)


def test_summary_is_the_simulators_summary_plus_server_counters(observed):
    _, _, result = observed
    schema = {c: result.requests[c] for c in REQUEST_COLUMNS}
    expected = summarize(schema, result.timeline, SLO(ttft_s=0.08), float(np.nanmax(result.requests["finish_s"])))
    for key in ("completed", "failed", "ttft_s", "e2e_s", "tpot_s", "throughput", "kv_usage", "goodput"):
        assert result.summary[key] == expected[key], key
    assert result.summary["preemptions"] == 2  # the server's counter went from 4 to 6
    assert result.summary["requests_preempted"] is None
    assert result.summary["goodput"]["good_requests"] == 1  # TTFT 0.10 s misses the 0.08 s limit
    assert result.summary["live"]["failure_reasons"] == {"timeout after 1 s (0 of 9 tokens)": 1}


def test_timeline_from_iteration_log_counts_recompute_as_prefill(observed):
    _, _, result = observed
    tl = result.timeline
    assert tuple(tl) == TIMELINE_COLUMNS
    assert tl["prefill_tokens"].tolist() == [40, 0, 40, 88, 0]
    assert tl["decode_tokens"].tolist() == [0, 1, 1, 2, 2]
    assert tl["running"].tolist() == [1, 1, 2, 2, 2]
    assert tl["waiting"].tolist() == [0, 0, 3, 3, 1]
    assert tl["preempted"].tolist() == [0, 0, 0, 2, 0]
    np.testing.assert_allclose(tl["step_time_s"], np.array([0.010, 0.008, 0.012, 0.030, 0.008]) + 0.001)
    np.testing.assert_array_equal(tl["kv_blocks_used"], np.rint(np.array([0.03, 0.03, 0.06, 0.09, 0.0]) * 63))


def test_without_iteration_log_the_timeline_comes_from_metrics():
    metrics = _metrics([0.0, 0.5, 1.0], waiting=[0, 2, 0], preemptions=[1, 3, 3])
    metrics["running"] = np.array([0.0, 4.0, 1.0])
    metrics["kv_usage"] = np.array([0.0, 0.8, 0.2])
    w = Workload(np.array([0.0]), np.array([8]), np.array([2]), np.array([0]), np.array(["chat"], object))
    empty = steps_table([])
    result = live_result([_record(0, 0.0, 0.1, 0.1, 2)], w, empty, metrics, num_blocks=11, block_size=32,
                         slo=SLO())
    tl = result.timeline
    assert tl["running"].tolist() == [0, 4, 1] and tl["waiting"].tolist() == [0, 2, 0]
    assert tl["kv_blocks_used"].tolist() == [0, 8, 2] and tl["preempted"].tolist() == [0, 2, 0]
    assert result.summary["live"]["timeline_source"].startswith("/metrics")


def test_token_table_and_round_trip_through_files(observed, tmp_path):
    records, _, result = observed
    tokens = token_columns(records)
    assert len(tokens["time_s"]) == 17 and tokens["index"][:3].tolist() == [0, 1, 2]
    result.write(tmp_path)
    back = RunResult.read(tmp_path)
    assert back.summary["preemptions"] == 2
    np.testing.assert_allclose(back.requests["ttft_s"][:2], result.requests["ttft_s"][:2])


def test_bench_serve_result_reads_into_requests_and_a_workload():
    path = DATA / "vllm_bench_serve_tiny.json"
    raw = json.loads(path.read_text())
    result, workload = read_bench_result(path)
    assert result.summary["completed"] == raw["completed"] == 12
    np.testing.assert_allclose(np.sort(result.requests["ttft_s"]), np.sort(raw["ttfts"]))
    np.testing.assert_allclose(np.sort(result.requests["e2e_s"]), np.sort(raw["latencies"]))
    assert result.summary["ttft_s"]["p50"] == pytest.approx(raw["median_ttft_ms"] / 1000, rel=1e-6)
    assert result.summary["tpot_s"]["mean"] == pytest.approx(raw["mean_tpot_ms"] / 1000, rel=1e-6)
    starts = np.sort(np.array(raw["start_times"]) - min(raw["start_times"]))
    np.testing.assert_allclose(workload.arrival_s, starts)
    assert workload.prompt_tokens.tolist() == raw["input_lens"]
    assert workload.output_tokens.tolist() == raw["output_lens"]
    assert result.summary["kv_usage"]["mean"] is None and result.summary["preemptions"] is None


def test_bench_result_with_failures_and_without_details(tmp_path):
    raw = json.loads((DATA / "vllm_bench_serve_tiny.json").read_text())
    raw["errors"][3] = "ClientConnectorError"
    raw["output_lens"][3] = 0
    failing = tmp_path / "failing.json"
    failing.write_text(json.dumps(raw))
    result, _ = read_bench_result(failing)
    assert result.summary["completed"] == 11 and result.summary["failed"] == 1
    for key in ("ttfts", "itls"):
        del raw[key]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="save-detailed"):
        read_bench_result(bare)
    with pytest.raises(ConfigError, match="no such file"):
        read_bench_result(tmp_path / "missing.json")


def test_import_bench_cli_writes_a_run_dir(tmp_path):
    from profiler.live.__main__ import main

    shutil.copy(DATA / "vllm_bench_serve_tiny.json", tmp_path / "r.json")
    assert main(["import-bench", str(tmp_path / "r.json"), "--out", str(tmp_path / "run")]) == 0
    back = RunResult.read(tmp_path / "run")
    assert back.summary["completed"] == 12
    assert Workload.load(tmp_path / "run" / "workload.parquet").prompt_tokens.tolist() == [48] * 12


def test_request_overhead_is_probe_ttft_minus_its_prefill_step():
    from profiler.live.runner import PROBE_PROMPT_TOKENS, IterationCollector, request_overhead
    from profiler.live.server import LogLine

    collector = IterationCollector()
    line = ("Engine 000: Iteration({i}): 1 context requests, {n} context tokens, 0 generation requests, "
            "0 generation tokens, iteration elapsed time: {ms} ms, CPU KV cache usage: 1.6%")
    probes = []
    for i, (ttft, ms) in enumerate([(0.020, 9.0), (0.021, 10.0), (0.019, 8.0)]):
        send = 10.0 + i
        collector.feed(LogLine(send + ttft - 0.001, line.format(i=2 * i, n=PROBE_PROMPT_TOKENS, ms=ms)))
        collector.feed(LogLine(send + ttft + 0.006, line.format(i=2 * i + 1, n=7, ms=5.0)))  # not the probe
        probes.append({"send": send, "first_token": send + ttft, "end": send + ttft + 0.01})
    assert request_overhead(probes, collector, gap_s=0.001) == pytest.approx(0.010)
    assert request_overhead([{"send": 50.0, "first_token": 50.02, "end": 50.03}], collector, 0.0) is None


def test_prefill_probes_give_each_prompt_length_its_own_prefill_step():
    from profiler.live.runner import (
        PREFILL_PROBE_TOKENS,
        PROBE_PROMPT_TOKENS,
        IterationCollector,
        prefill_probe_result,
        request_overhead,
    )
    from profiler.live.server import LogLine

    collector = IterationCollector()
    line = ("Engine 000: Iteration({i}): 1 context requests, {n} context tokens, {g} generation requests, "
            "{g} generation tokens, iteration elapsed time: {ms} ms, CPU KV cache usage: 1.6%")
    probes = []
    for i, (tokens, ms) in enumerate([(PROBE_PROMPT_TOKENS, 9.0), (PREFILL_PROBE_TOKENS, 60.0),
                                      (PREFILL_PROBE_TOKENS, 62.0)]):
        send = 10.0 + i
        collector.feed(LogLine(send + 0.02, line.format(i=2 * i, n=tokens, g=0, ms=ms)))
        collector.feed(LogLine(send + 0.03, line.format(i=2 * i + 1, n=0, g=1, ms=5.0)))  # its decode
        probes.append({"send": send, "first_token": send + 0.021, "end": send + 0.031, "tokens": tokens})
    # a probe whose prefill shared its step with another request is left out
    collector.feed(LogLine(20.02, line.format(i=9, n=PREFILL_PROBE_TOKENS, g=3, ms=70.0)))
    probes.append({"send": 20.0, "first_token": 20.021, "end": 20.031, "tokens": PREFILL_PROBE_TOKENS})
    result = prefill_probe_result(probes, collector)
    assert [(p["tokens"], p["elapsed_s"]) for p in result] == [
        (PROBE_PROMPT_TOKENS, pytest.approx(0.009)), (PREFILL_PROBE_TOKENS, pytest.approx(0.060)),
        (PREFILL_PROBE_TOKENS, pytest.approx(0.062))]
    # only the short probes measure the per-request overhead
    assert request_overhead(probes, collector, gap_s=0.0) == pytest.approx(0.021 - 0.009)
    assert prefill_probe_result([], collector) is None


def test_shape_probes_pair_each_new_length_cold_then_warm():
    from profiler.live.runner import IterationCollector, shape_probe_lengths, shape_probe_result
    from profiler.live.server import LogLine

    first, second = shape_probe_lengths(0), shape_probe_lengths(1)
    assert all(n % 2 for n in first) and not set(first) & set(second)  # odd, new each round
    assert max(shape_probe_lengths(3, 512)) <= 512 < max(first)  # shares of the engine's budget
    assert first[0] == first[1] and len(set(first)) == len(first) // 2  # each length twice in a row
    collector = IterationCollector()
    line = ("Engine 000: Iteration({i}): 1 context requests, {n} context tokens, 0 generation requests, "
            "0 generation tokens, iteration elapsed time: {ms} ms, CPU KV cache usage: 1.6%")
    probes = []
    steps = {first[0]: (12.0, 4.0), first[2]: (20.0, 7.0), first[4]: (30.0, 11.0)}  # logged, ms
    ttfts = {first[0]: (30.0, 9.0), first[2]: (41.0, 12.0), first[4]: (60.0, 17.0)}  # client-side, ms
    for i, tokens in enumerate(first[:6]):  # three lengths, each twice
        send = 10.0 + i
        if tokens != first[4] or i % 2:  # the cold step of the longest one is not told apart
            collector.feed(LogLine(send + 0.005, line.format(i=i, n=tokens, ms=steps[tokens][i % 2])))
        probes.append({"send": send, "first_token": send + ttfts[tokens][i % 2] / 1e3, "end": send + 0.1,
                       "tokens": tokens})
    probes.append({"send": 30.0, "first_token": 30.02, "end": 30.03, "tokens": 999})  # sent once: no pair
    result = shape_probe_result(probes, collector)
    assert [(p["tokens"], p["cold_s"], p["warm_s"]) for p in result] == [
        (n, pytest.approx(ttfts[n][0] / 1e3), pytest.approx(ttfts[n][1] / 1e3)) for n in sorted(ttfts)]
    assert [(p.get("cold_step_s"), p.get("warm_step_s")) for p in result] == [
        (pytest.approx(0.012), pytest.approx(0.004)), (pytest.approx(0.020), pytest.approx(0.007)), (None, None)]
    assert shape_probe_result(probes[:1], collector) is None  # a length sent once has no pair


def test_decode_probe_batches_fit_the_kv_cache():
    from profiler.live.runner import STEP_PROBE_BATCHES, decode_probe_batches

    assert decode_probe_batches(None) == list(STEP_PROBE_BATCHES)
    assert decode_probe_batches(1_000_000) == list(STEP_PROBE_BATCHES)
    # 64 blocks of 32 tokens (the CI scenario): 4 long requests that fill 80% of the cache
    batches = decode_probe_batches(63 * 32)
    assert batches[:3] == [(1, 32), (8, 32), (1, 384)] and batches[3] == (4, 1612 // 4 - 130)
    assert all(b * (p + 130) <= 0.8 * 63 * 32 for b, p in batches)  # each batch runs alone
    # a cache a little short of 8 x 514 tokens: 8 requests with shorter prompts
    assert decode_probe_batches(4000) == [(1, 32), (8, 32), (1, 384), (8, 3200 // 8 - 130)]
    # not even 4 x 322 tokens: one long request, no long batch
    assert decode_probe_batches(700) == [(1, 32), (3, 32), (1, 384)]
    assert decode_probe_batches(100) == []


def test_simulated_latencies_get_the_request_overhead():
    from calibration.live_model import add_request_overhead

    w = Workload(np.array([0.0, 0.1]), np.array([40, 40]), np.array([5, 5]), np.array([2, 0]),
                 np.array(["math", "chat"], object))
    from profiler.live.iteration_log import steps_table as _steps

    base = live_result([_record(0, 0.0, 0.05, 0.01, 5), _record(1, 0.1, 0.2, 0.01, 5)], w, _steps([]),
                       _metrics([0.0], [0], [0]), num_blocks=8, block_size=32, slo=SLO())
    shifted = add_request_overhead(base, 0.005)
    for col in ("ttft_s", "ttfvt_s", "e2e_s"):
        np.testing.assert_allclose(shifted.requests[col], base.requests[col] + 0.005)
    np.testing.assert_allclose(shifted.requests["tpot_s"], base.requests["tpot_s"])
    assert shifted.summary["ttft_s"]["p50"] == pytest.approx(base.summary["ttft_s"]["p50"] + 0.005)
    assert shifted.summary["preemptions"] == base.summary["preemptions"]
    with pytest.raises(ConfigError, match="request_overhead_s"):
        add_request_overhead(base, -1.0)
