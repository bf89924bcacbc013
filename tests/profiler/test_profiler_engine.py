"""The real profiler on the real vLLM CPU engine and the tiny model (grid=smoke).

One run of `none` is killed mid-grid and resumed; the other optimizations run
once each on a reduced grid. Each engine run takes 20-40 s on 2 cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from profiler.grid import GridSpec, build_points
from profiler.tiny_model import ensure_tiny_model, weight_dtype
from simulator.records.model_arch import ModelArchitecture, dtype_bytes
from simulator.records.performance import keeps_shape_cache
from simulator.records.profile import Profile

from .engine_runs import REPO, needs_engine, profiler_command, profiler_env, run_profiler

pytestmark = [needs_engine, pytest.mark.engine]

SMOKE = ["model=tiny-llama", "grid=smoke", "progress=false", "serving.enabled=false"]  # the serving phase: tests/profiler/test_serving.py
#: only the phase an optimization adds, plus one prefill and one decode point
REDUCED = ["grid.prefill_chunks=[64]", "grid.prefill_contexts=[256]", "grid.decode_batches=[2]",
           "grid.decode_contexts=[128]", "grid.mixed.requests=0"]


def smoke_grid(**changes) -> GridSpec:
    import yaml

    data = yaml.safe_load((REPO / "conf/profiler/grid/smoke.yaml").read_text())
    data.update(changes)
    return GridSpec.from_dict(data)


def finished_points(partial: Path) -> list[dict]:
    path = partial / "points.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """Profile `none` (each decode point in two windows), SIGKILL it once 3 grid points are done,
    then run the same command again."""
    out = tmp_path_factory.mktemp("none") / "profile"
    args = [*SMOKE, "grid.decode_windows=2", "optimization=none", f"output_dir={out}", "verbose=true"]
    proc = subprocess.Popen(profiler_command(*args), cwd=REPO, env=profiler_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while len(finished_points(out / ".partial")) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    first_log = proc.communicate()[0]
    before_kill = finished_points(out / ".partial")
    kept = pd.concat([pd.read_parquet(out / ".partial" / p["file"]) for p in before_kill if p.get("file")])
    second = run_profiler(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    return {"out": out, "args": args, "before_kill": before_kill, "kept_rows": kept, "first_log": first_log,
            "log": second.stdout + second.stderr, "profile": Profile.load(out)}


def test_kill_keeps_finished_points_and_resume_completes(resumed_run):
    profile, before = resumed_run["profile"], resumed_run["before_kill"]
    assert 3 <= len(before) < len(profile.meta["points"]), "the kill should land mid-grid"
    assert profile.meta["run"]["resumed_points"] == len(before)
    assert f"resuming: {len(before)} grid points already measured" in resumed_run["log"]
    kept = resumed_run["kept_rows"].set_index("step").sort_index()
    final = profile.steps.set_index("step").loc[kept.index]
    # the points measured before the kill are kept as they were, not measured again
    assert final["wall_s"].tolist() == kept["wall_s"].tolist()
    assert final["point_id"].tolist() == kept["point_id"].tolist()
    assert profile.steps["step"].is_unique
    assert not (resumed_run["out"] / ".partial").exists()


def test_step_table_covers_the_grid(resumed_run):
    profile = resumed_run["profile"]
    grid = smoke_grid(decode_windows=2)
    oneDNN = keeps_shape_cache(profile.meta["engine"]["linear_dispatch"])
    points, left_out = build_points(grid, (), profile.meta["engine"]["resolved"]["max_model_len"],
                                    profile.meta["engine"]["resolved"]["max_num_batched_tokens"], oneDNN)
    assert bool(left_out) is not oneDNN and all(p["phase"] == "shapes" for p in left_out)
    assert oneDNN or left_out == profile.meta["grid"]["left_out"]
    statuses = {p["point_id"]: p["status"] for p in profile.meta["points"]}
    assert statuses == {p.point_id: "ok" for p in points}
    steps = profile.steps
    for point in points:
        rows = steps[(steps["point_id"] == point.point_id) & (steps["rep"] >= 0)]
        # a measurement another process disturbed is repeated (up to twice the repeats in all)
        assert grid.repeats <= len(rows) <= 2 * grid.repeats or point.phase == "mixed"
        if point.phase == "prefill":
            assert rows["prefill_tokens"].tolist() == [[point.param("chunk")]] * len(rows)
            assert rows["prefill_context"].tolist() == [[point.param("context")]] * len(rows)
            assert (rows["num_decode_seqs"] == 0).all()
        elif point.phase == "decode":
            assert (rows["num_decode_seqs"] == point.param("batch")).all()
            assert (rows["num_prefill_tokens"] == 0).all()
            for contexts in rows["decode_context"]:
                assert all(point.param("context") < c <= point.param("context") + 12 for c in contexts)
        elif point.phase == "shapes":  # one cold step (unless the count was met before) and warm repeats
            assert rows["prefill_tokens"].tolist() == [[point.param("tokens")]] * len(rows)
            assert rows["prefill_context"].tolist() == [[0]] * len(rows) and (rows["num_decode_seqs"] == 0).all()
            assert rows["phase"].tolist()[1:] == ["shape_warm"] * grid.shapes.warm_repeats
        else:  # mixed: the scheduler put prefill chunks and decodes into the same steps
            assert len(rows) >= grid.mixed.requests
            assert ((rows["num_prefill_tokens"] > 0) & (rows["num_decode_seqs"] > 0)).any()
    assert (steps["wall_s"] > 0).all() and (steps["rss_bytes"] > 0).all()
    # a decode point's second window: the same batch and context, measured after the other phases
    second_window = [p for p in points if p.point_id.endswith("/window1")]
    again = steps[steps["point_id"].str.endswith("/window1") & (steps["rep"] >= 0)]
    assert second_window and len(again) >= grid.repeats * len(second_window)
    assert set(again["phase"]) == {"decode"} and again["step"].min() > steps.loc[steps["phase"] == "mixed", "step"].max()


def test_the_linear_layers_dispatch_is_read_off_the_engine(resumed_run):
    """vLLM warns when it cannot build oneDNN linear layers and falls back to torch's: the
    profile's reading of the layers agrees with that warning."""
    dispatch = resumed_run["profile"].meta["engine"]["linear_dispatch"]
    kinds = dispatch.split("+")
    assert set(kinds) <= {"onednn", "torch", "sgl", "zentorch"}
    fell_back = "Failed to create oneDNN linear" in resumed_run["log"]
    assert ("onednn" not in kinds) == fell_back, dispatch


def test_shapes_phase_measures_cold_steps_and_the_fit_prices_a_miss(resumed_run):
    """The mechanism, not a number: new token counts come cold, and the fit charges them > 0
    (where the engine's linear layers keep per-shape set-up; elsewhere the phase is left out
    and the fit has no shape cost)."""
    from calibration.fit import fit_profile
    from simulator.records.performance import ShapeCacheCost

    profile = resumed_run["profile"]
    steps = profile.steps
    if not keeps_shape_cache(profile.meta["engine"]["linear_dispatch"]):
        assert not steps["phase"].isin(["shape_cold", "shape_warm"]).any()
        assert {p["phase"] for p in profile.meta["grid"]["left_out"]} == {"shapes"}
        assert fit_profile(profile).shape_cache is None
        return
    shapes = steps[steps["phase"].isin(["shape_cold", "shape_warm"])]
    cold = shapes[shapes["phase"] == "shape_cold"]
    assert len(cold) >= 5 and (shapes["point_id"].str.startswith("shapes/")).all()
    assert (shapes["prefill_cached"].map(sum) == 0).all()  # fresh tokens: no prefix-cache hit
    assert not profile.measured_steps()["phase"].isin(["shape_cold", "shape_warm"]).any()
    cost = fit_profile(profile).shape_cache
    assert isinstance(cost, ShapeCacheCost) and cost.capacity == 32
    assert all(cost.miss_s(t) >= 0 for t in cold["num_tokens"])
    if weight_dtype() == "bfloat16":  # oneDNN's bf16 primitives take 15-170 ms to set up; its fp32
        # ones on an AVX2 CPU (the tiny model's dtype there) cost too little to see past the noise
        assert all(cost.per_miss_s + cost.per_miss_token_s * t > 0 for t in cold["num_tokens"])


def test_kv_capacity_is_the_engines_own_count(resumed_run):
    kv = resumed_run["profile"].meta["kv"]
    logged = re.findall(r"CPU KV cache size: ([\d,]+) tokens", resumed_run["log"])
    assert logged, "vLLM did not log its KV cache size"
    assert kv["num_gpu_blocks"] * kv["block_size"] == int(logged[-1].replace(",", ""))
    # 2 GiB of KV space (conf/profiler.yaml) as vLLM sizes it: bytes / (block_size x bytes per token)
    assert kv["num_gpu_blocks"] == 2 * 1024**3 // (kv["block_size"] * kv["bytes_per_token"])
    assert kv["block_size"] == 128  # the CPU default


def test_bytes_per_token_match_the_architecture(resumed_run):
    profile = resumed_run["profile"]
    config = json.loads((ensure_tiny_model() / "config.json").read_text())
    arch = ModelArchitecture.from_hf_config(config)
    kv = profile.meta["kv"]
    # K and V x 4 layers x 2 KV heads x head size 64 x the model's dtype (bf16; fp32 on CPUs without AVX-512)
    assert kv["bytes_per_token"] == arch.kv_bytes_per_token() == 2 * 4 * 2 * 64 * dtype_bytes(weight_dtype())
    assert kv["kv_tensor_bytes"] == kv["num_gpu_blocks"] * kv["block_size"] * kv["bytes_per_token"]


def test_metadata_records_versions_hardware_and_settings(resumed_run):
    meta = resumed_run["profile"].meta
    assert meta["versions"]["vllm"].startswith("0.32")
    assert meta["hardware"]["kind"] == "cpu" and meta["hardware"]["count"] >= 1
    assert meta["engine"]["resolved"]["enforce_eager"] is True
    assert meta["engine"]["env"]["HF_HUB_OFFLINE"] == "1"
    assert meta["memory"]["source"] == "process_rss"
    # the CPU build repacks weights (vLLM measures nothing), so bytes come from the architecture
    assert meta["memory"]["weights_bytes"] == dtype_bytes(weight_dtype()) * resumed_run["profile"].architecture.num_params
    assert meta["memory"]["weights_source"].startswith("architecture")
    assert meta["memory"]["rss_after_engine"] > meta["memory"]["rss_before_engine"]


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_metadata_records_no_absolute_path_and_the_models_identity(resumed_run):
    meta = resumed_run["profile"].meta
    home = os.path.expanduser("~")
    leaks = [s for s in _strings(meta) if s.startswith("/") or home in s or str(REPO) in s]
    assert not leaks
    assert meta["model"]["source"] == "tiny-llama" == meta["engine"]["llm_kwargs"]["model"]
    assert meta["model"]["identity"]["recipe"] == json.loads(
        (ensure_tiny_model() / "rllm_sim_model.json").read_text())["recipe"]


def test_a_complete_profile_is_reused_with_a_line_naming_the_machine(resumed_run):
    meta = resumed_run["profile"].meta
    again = run_profiler(*resumed_run["args"], timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    line = next(ln for ln in again.stdout.splitlines() if "already holds this profile" in ln)
    assert meta["machine"]["key"] in line and meta["machine"]["fingerprint"]["name"] in line
    assert "nothing to do" in line


def test_another_machines_profile_is_left_alone_and_this_machine_gets_its_own(tmp_path):
    theirs = tmp_path / "profile"
    shutil.copytree(REPO / "calibration/profiles/cpu-amd-2c/tiny-llama/none", theirs)
    meta = json.loads((theirs / "profile.json").read_text())
    meta["machine"]["fingerprint"]["name"] = "Some Other CPU"
    (theirs / "profile.json").write_text(json.dumps(meta))
    before = (theirs / "profile.json").read_bytes()
    result = run_profiler(*SMOKE, *REDUCED, "optimization=none", f"output_dir={theirs}")
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [ln for ln in result.stderr.splitlines() if "not reusing" in ln]
    assert len(notes) == 1 and "name: 'Some Other CPU' there" in notes[0]
    assert (theirs / "profile.json").read_bytes() == before
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("profile-")]
    assert len(moved) == 1
    ours = Profile.load(moved[0])
    assert moved[0].name == f"profile-{ours.meta['machine']['key']}"
    assert ours.meta["machine"]["fingerprint"]["name"] != "Some Other CPU"


def test_another_tiny_shape_is_profiled_as_its_own_model(tmp_path):
    shape = ["model.layers=2", "model.hidden=256", "model.heads=4", "model.kv_heads=1"]
    out = tmp_path / "shape"
    result = run_profiler(*SMOKE, *REDUCED, *shape, "optimization=none", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    profile = Profile.load(out)
    assert profile.meta["model"]["name"] == profile.meta["model"]["source"] == \
        "tiny-llama-layers2-hidden256-heads4-kv_heads1"
    arch = profile.architecture
    assert (arch.num_layers, arch.hidden_size, arch.num_key_value_heads) == (2, 256, 1)
    # vLLM's own KV cache: 2 (K and V) x 2 layers x 1 KV head x 64 head size x 2 bytes
    assert profile.meta["kv"]["bytes_per_token"] == 2 * 2 * 1 * 64 * dtype_bytes(weight_dtype())
    assert profile.meta["model"]["identity"]["config"]["num_hidden_layers"] == 2


def test_fp8_kv_halves_bytes_per_token_and_out_of_memory_points_are_skipped(tmp_path):
    """fp8 KV: 1 byte per element. A KV cache cut to 24 blocks cannot hold 4 x 1024 tokens:
    that point is recorded as out of memory and the larger one after it is skipped. (vLLM's CPU
    build runs an fp8 KV cache only with AVX-512 or AMX: elsewhere the profiler refuses it in one
    line, as ``test_platform_refusal_quotes_vllm`` checks, and there is nothing to measure.)"""
    out = tmp_path / "fp8"
    result = run_profiler(*SMOKE, "optimization=fp8_kv", f"output_dir={out}", "engine.max_model_len=2048",
                          "engine.num_gpu_blocks_override=24", "grid.decode_contexts=[128,1024,1536]",
                          "grid.decode_max_batch_tokens=8192", "grid.mixed.requests=0")
    refusal = "error: optimization: vLLM cannot run 'fp8_kv' here: "
    if result.returncode == 2 and refusal in result.stderr:
        pytest.skip(result.stderr[result.stderr.index(refusal):].splitlines()[0])
    assert result.returncode == 0, result.stderr[-3000:]
    profile = Profile.load(out)
    kv = profile.meta["kv"]
    assert kv["bytes_per_token"] == kv["bytes_per_token_expected"] == 2 * 4 * 2 * 64
    assert kv["num_gpu_blocks"] == 24
    status = {p["point_id"]: p for p in profile.meta["points"]}
    assert status["decode/batch4/context1024"]["status"] == "oom"
    assert "needs" in status["decode/batch4/context1024"]["reason"]
    assert status["decode/batch4/context1536"]["status"] == "skipped"
    assert status["decode/batch1/context1536"]["status"] == "ok"
    measured = set(profile.steps["point_id"])
    assert "decode/batch4/context1024" not in measured and "decode/batch1/context1536" in measured


def test_spec_ngram_records_drafts_and_acceptance(tmp_path):
    out = tmp_path / "spec"
    result = run_profiler(*SMOKE, *REDUCED, "optimization=spec_ngram", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    profile = Profile.load(out)
    spec_rows = profile.steps[profile.steps["phase"] == "spec"]
    assert spec_rows.groupby("point_id").size().between(4, 8).all()  # 4 steps each, disturbed ones redone
    assert len(spec_rows.groupby("point_id")) == 2  # grid.spec: batches [1, 4] at context 256
    drafted = spec_rows[spec_rows["num_spec_tokens"] > 0]
    assert len(drafted) > 0, "repetitive prompts should give the n-gram drafter matches"
    for _, row in drafted.iterrows():
        assert all(0 <= a <= s <= 4 for a, s in zip(row["decode_accepted_tokens"], row["decode_spec_tokens"],
                                                     strict=True))
        assert row["num_tokens"] == row["num_decode_seqs"] + row["num_spec_tokens"]
    summary = profile.meta["summary"]["spec_decode"]
    assert summary["num_speculative_tokens"] == 4 and len(summary["acceptance_per_position"]) == 4
    assert summary["draft_tokens"] == int(profile.steps[profile.steps["phase"] != "warmup"]["num_spec_tokens"].sum())
    assert (spec_rows["draft_s"] > 0).all()


def test_prefix_cache_measures_hits(tmp_path):
    out = tmp_path / "prefix"
    result = run_profiler(*SMOKE, *REDUCED, "optimization=prefix_cache", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    profile = Profile.load(out)
    rows = profile.steps[profile.steps["phase"] == "prefix"]
    misses, hits = rows[rows["rep"] == 0], rows[rows["rep"] > 0]
    assert (misses["prefill_cached"].map(sum) == 0).all()
    # prefixes of 256 and 500 tokens: hits are whole 128-token blocks
    for _, row in hits.iterrows():
        prefix = int(row["point_id"].split("/prefix")[1].split("/")[0])
        assert row["prefill_cached"] == [prefix // 128 * 128]
    summary = profile.meta["summary"]["prefix_cache"]
    assert 0 < summary["hit_rate"] < 1
    assert summary["cached_tokens"] == int(hits["prefill_cached"].map(sum).sum())


def test_unknown_optimization_is_a_one_line_error():
    result = run_profiler("model=tiny-llama", "optimization=warp_drive", timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: optimization: unknown 'warp_drive'; allowed: " + ", ".join(
        sorted(p.stem for p in (REPO / "conf/profiler/optimization").glob("*.yaml")))]


def test_platform_refusal_quotes_vllm(tmp_path):
    """fp8 weights need a GPU: the CPU build refuses, and the profiler says so in one line."""
    result = run_profiler(*SMOKE, "optimization=fp8_weights", f"output_dir={tmp_path}", timeout=300)
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert errors[0].startswith("error: optimization: vLLM cannot run 'fp8_weights' here: ")
    assert not (tmp_path / "profile.json").exists()
