"""Bad input on the command line or in input files: one line naming the field, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulator.configure import resolve_size
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.workload.arrivals import MAX_RATE, MIN_RATE
from simulator.workload.builder import build_workload
from simulator.workload.lengths import LengthModel

REPO = Path(__file__).resolve().parents[2]
SMALL = ("workload.num_requests=20",)


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "simulator", f"hydra.run.dir={tmp_path / 'run'}",
           "progress=false", "plots=false", *overrides]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, field: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {field}:"), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        (("engine.block_size=abc",), "engine.block_size", "integer"),
        (("engine.num_gpu_blocks_override=1",), "engine.num_gpu_blocks_override", ">= 2 blocks"),
        (("engine.max_num_seqs=4", "engine.max_num_batched_tokens=8"), "engine.max_num_batched_tokens",
         "block_size=16"),
        (("engine.max_model_len=100",), "engine.max_model_len", "multiple of block_size"),
        (("workload.rate=1e-300",), "workload.rate", f"[{MIN_RATE:g}, {MAX_RATE:g}]"),
        (("workload.num_requests=1000000000000",), "workload.num_requests", "GiB"),
        (("plots=maybe",), "plots", "true or false"),
        (("progress=1",), "progress", "true or false"),
        (("compiled=sometimes",), "compiled", "auto, true or false"),
        (("tp=abc",), "tp", "positive integer"),
        (("hardware.memory_gib=abc",), "hardware.memory_gib", "a number"),
        (("model.tie_word_embeddings=maybe",), "model.tie_word_embeddings", "true or false"),
    ],
)
def test_cli_refuses_in_one_line(tmp_path, overrides, field, words):
    line = assert_one_line_error(run_cli(tmp_path, "workload=gamma", *SMALL, *overrides), field)
    assert words in line


def test_cli_refuses_random_bytes_as_azure_trace(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    line = assert_one_line_error(run_cli(tmp_path, "workload=azure_conv", f"workload.path={path}"),
                                 "workload.path")
    assert "not UTF-8" in line and "CSV" in line


def test_cli_refuses_corrupt_parquet(tmp_path):
    path = tmp_path / "saved.parquet"
    path.write_bytes(b"PAR1" + np.random.default_rng(1).bytes(2048))
    line = assert_one_line_error(run_cli(tmp_path, "workload=file", f"workload.path={path}"), "workload.path")
    assert "Parquet" in line


def test_cli_num_requests_replaces_a_trace_default_duration(tmp_path):
    path = tmp_path / "mooncake.jsonl"
    rows = [{"timestamp": 100 * i, "input_length": 50 + i, "output_length": 5, "hash_ids": [i]} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = run_cli(tmp_path, "workload=mooncake", f"workload.path={path}", "workload.num_requests=12")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] + summary["rejected"] == 12


def test_cli_duration_replaces_the_default_num_requests(tmp_path):
    proc = run_cli(tmp_path, "workload=gamma", "workload.duration_s=3", "workload.rate=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["completed"] + summary["rejected"] == 12  # exact_rate: rate * duration_s


def test_resolve_size_keeps_both_when_both_given():
    workload = {"num_requests": 5, "duration_s": 9.0}
    assert resolve_size(workload, ["workload.num_requests=5", "workload.duration_s=9"]) == workload
    assert resolve_size(workload, ["workload.duration_s=9"]) == {"num_requests": None, "duration_s": 9.0}
    assert resolve_size(workload, []) == workload


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_num_seqs", "8"), ("enable_chunked_prefill", "maybe"), ("gpu_memory_utilization", "high"),
     ("enable_prefix_caching", 1), ("block_size", 16.5), ("kv_cache_dtype", 8)],
)
def test_engine_fields_of_the_wrong_type_are_named(name, value):
    with pytest.raises(ConfigError) as err:
        EngineConfig.from_dict({name: value})
    assert err.value.field == f"engine.{name}"


@pytest.mark.parametrize("rate", [1e-300, 1e-12, 1e308, float("inf")])
def test_rates_outside_the_sound_range_are_refused(rate):
    with pytest.raises(ConfigError) as err:
        build_workload({"kind": "gamma", "rate": rate, "num_requests": 10})
    assert err.value.field == "workload.rate"


def test_a_span_beyond_float_resolution_is_refused():
    with pytest.raises(ConfigError) as err:
        build_workload({"kind": "gamma", "rate": MIN_RATE, "num_requests": 10_000})
    assert err.value.field == "workload.rate" and "span" in str(err.value)


def test_zero_token_prompts_in_a_lengths_file_are_refused(tmp_path):
    path = tmp_path / "lengths.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n10,5\n0,5\n")
    with pytest.raises(ConfigError) as err:
        build_workload({"kind": "gamma", "rate": 1.0, "num_requests": 4, "lengths_file": str(path)})
    assert err.value.field == "workload.lengths_file" and "num_prefill_tokens" in str(err.value)


def test_zero_token_outputs_in_a_lengths_file_run_with_one_and_warn(tmp_path, capsys):
    path = tmp_path / "lengths0.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n10,0\n20,0\n30,7\n")
    workload = build_workload({"kind": "gamma", "rate": 1.0, "num_requests": 3, "lengths_file": str(path)})
    assert workload.output_tokens.tolist() == [1, 1, 7]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning:") and "2 request(s) with 0 output tokens" in err[0]


def test_zero_token_prompts_in_a_saved_workload_are_refused(tmp_path):
    path = tmp_path / "saved.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0.0,0,3\n1.0,5,3\n")
    with pytest.raises(ConfigError) as err:
        build_workload({"kind": "file", "path": str(path), "duration_s": float("inf")})
    assert err.value.field == "workload.path" and "prompt_tokens" in str(err.value)


def test_unsorted_azure_trace_is_sorted_with_a_warning(tmp_path, capsys):
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.0,10,3\n2023-11-16 18:15:44.0,11,3\n"
        "2023-11-16 18:15:48.0,12,3\n2023-11-16 18:15:47.0,13,3\n"
    )
    workload = build_workload({"kind": "azure", "path": str(path), "duration_s": float("inf")})
    assert np.all(np.diff(workload.arrival_s) >= 0)
    assert workload.prompt_tokens.tolist() == [11, 10, 13, 12]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 TIMESTAMP(s)" in err[0] and err[0].startswith("warning:")


def test_random_bytes_as_mooncake_trace_name_the_path(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_bytes(b"\xff\xfe" + np.random.default_rng(2).bytes(512))
    with pytest.raises(ConfigError) as err:
        build_workload({"kind": "mooncake", "path": str(path), "duration_s": float("inf")})
    assert err.value.field == "workload.path" and "JSONL" in str(err.value)


def test_default_length_laws_fit_the_default_context():
    model = LengthModel.default()
    lengths = model.sample(np.random.default_rng(0), 200_000)
    total = lengths.prompt_tokens + lengths.output_tokens
    assert total.max() <= EngineConfig().max_model_len
    assert np.all(lengths.output_tokens >= 1)
    assert np.any(total == EngineConfig().max_model_len)  # the clip is reached, so it is what holds


def test_the_default_run_has_no_request_its_engine_must_reject():
    from hydra import compose, initialize_config_dir

    from simulator.configure import CONF_DIR, build_run
    from simulator.engine.rules import admission_error

    with initialize_config_dir(str(CONF_DIR), version_base=None):
        spec = build_run(compose("config"), overrides=[])
    engine, workload = spec.engine, spec.workload
    kv = spec.perf.kv_capacity(engine.block_size, engine.gpu_memory_utilization, engine.num_gpu_blocks_override)
    reasons = [admission_error(int(p), int(o), engine, kv)
               for p, o in zip(workload.prompt_tokens, workload.output_tokens, strict=True)]
    assert len(workload) == 1000 and [r for r in reasons if r] == []


def test_cli_refuses_progress_that_is_not_a_boolean(tmp_path):
    cmd = [sys.executable, "-m", "simulator", f"hydra.run.dir={tmp_path / 'run'}", "plots=false",
           "progress=maybe", "workload=gamma", *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "true or false" in assert_one_line_error(proc, "progress")


def test_a_null_size_on_the_command_line_keeps_the_default_one():
    workload = {"num_requests": None, "duration_s": float("inf")}
    assert resolve_size(workload, ["workload.num_requests=null"]) == workload


def test_a_budget_below_one_speculative_decode_is_refused():
    """A decode with k draft tokens schedules 1 + k tokens: a smaller budget would stall the engine."""
    from simulator.records.engine_config import EngineConfig
    from simulator.records.errors import ConfigError

    with pytest.raises(ConfigError, match=r"engine.max_num_batched_tokens: must be >= 1 \+ num_speculative"):
        EngineConfig(block_size=1, max_model_len=64, max_num_seqs=1, max_num_batched_tokens=1,
                     speculative={"num_speculative_tokens": 1, "acceptance_rate": [0.5]})
    EngineConfig(block_size=1, max_model_len=64, max_num_seqs=1, max_num_batched_tokens=2,
                 speculative={"num_speculative_tokens": 1, "acceptance_rate": [0.5]})
