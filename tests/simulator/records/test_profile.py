"""The Profile record: round trip, schema validation, StepBatch views."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from simulator.records.errors import ConfigError
from simulator.records.profile import (
    FORMAT_NAME,
    FORMAT_VERSION,
    META_FILE,
    STEP_COLUMNS,
    STEPS_FILE,
    Profile,
    batch_of,
    steps_frame,
    write_steps,
)

ARCH = {"name": "tiny", "num_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
        "num_key_value_heads": 2, "intermediate_size": 1536, "vocab_size": 8192}


def row(step: int, phase: str = "decode", prefill=(), context=(), decode=(), spec=None, **extra):
    spec = list(spec) if spec is not None else [0] * len(decode)
    base = {
        "point_id": f"{phase}/x", "phase": phase, "rep": 0, "step": step, "wall_s": 0.01 + step * 1e-3,
        "cpu_s": 0.01, "prefill_tokens": list(prefill), "prefill_context": list(context),
        "prefill_cached": [0] * len(prefill), "decode_context": list(decode), "decode_spec_tokens": spec,
        "decode_accepted_tokens": [0] * len(decode), "num_prefill_tokens": sum(prefill),
        "num_decode_seqs": len(decode), "num_spec_tokens": sum(spec),
        "num_tokens": sum(prefill) + len(decode) + sum(spec), "kv_blocks_used": 3, "kv_usage": 0.01,
        "num_preempted": 0, "draft_s": 0.0, "rss_bytes": 10**9, "disturbed": False,
    }
    base.update(extra)
    return base


def meta(**changes):
    data = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "created": "2026-11-24T07:00:00+00:00",
        "hardware": {"kind": "cpu", "slug": "cpu-test-2c"}, "versions": {"vllm": "0.32.0"},
        "model": {"name": "tiny", "architecture": ARCH}, "optimization": {"name": "none"},
        "engine": {}, "kv": {"block_size": 128, "num_gpu_blocks": 100, "bytes_per_token": 2048},
        "memory": {}, "grid": {}, "points": [], "summary": {"steps": 3},
    }
    data.update(changes)
    return data


@pytest.fixture
def steps():
    return steps_frame([
        row(0, "prefill", prefill=[512], context=[1024]),
        row(1, "decode", decode=[130, 131, 140]),
        row(2, "mixed", prefill=[64, 32], context=[0, 128], decode=[200], spec=[3]),
    ])


def test_round_trip_keeps_every_column_and_list(tmp_path, steps):
    Profile(meta=meta(), steps=steps).save(tmp_path)
    loaded = Profile.load(tmp_path)
    assert list(loaded.steps.columns) == list(STEP_COLUMNS)
    assert loaded.steps["prefill_context"].tolist() == [[1024], [], [0, 128]]
    assert loaded.steps["decode_spec_tokens"].tolist() == [[], [0, 0, 0], [3]]
    assert loaded.steps["wall_s"].tolist() == pytest.approx(steps["wall_s"].tolist())
    assert loaded.name == "cpu-test-2c/tiny/none"
    assert loaded.kv_capacity.num_tokens == 100 * 128
    assert loaded.architecture.kv_bytes_per_token() == 2048


def test_batches_follow_the_rows(steps):
    profile = Profile(meta=meta(), steps=steps)
    batches = profile.batches()
    assert batches[0].prefill_tokens == [512] and batches[0].prefill_context == [1024]
    assert batches[1].decode_context == [130, 131, 140]
    assert batches[1].decode_spec_tokens == []  # zeros mean no speculation
    assert batches[2].decode_spec_tokens == [3]
    assert batches[2].num_tokens == 64 + 32 + 1 + 3


def test_measured_steps_leave_out_warmup(steps):
    steps.loc[1, "phase"] = "warmup"
    profile = Profile(meta=meta(), steps=steps)
    assert profile.measured_steps()["step"].tolist() == [0, 2]


def test_missing_columns_are_named(tmp_path, steps):
    Profile(meta=meta(), steps=steps).save(tmp_path)
    pd.read_parquet(tmp_path / STEPS_FILE).drop(columns=["wall_s", "decode_context"]).to_parquet(
        tmp_path / STEPS_FILE)
    with pytest.raises(ConfigError) as err:
        Profile.load(tmp_path)
    assert "lacks columns ['wall_s', 'decode_context']" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"prefill_context": [[1024, 5], [], [0, 128]]}, "'prefill_tokens' and 'prefill_context' differ"),
    ({"num_decode_seqs": [0, 2, 1]}, "num_decode_seqs != len(decode_context)"),
    ({"phase": ["prefill", "bogus", "mixed"]}, "unknown phases ['bogus']"),
    ({"wall_s": [0.1, 0.0, 0.1]}, "'wall_s' must be finite and > 0"),
])
def test_bad_rows_are_refused(steps, change, message):
    for column, values in change.items():
        steps[column] = pd.Series(values, dtype=object if isinstance(values[0], list | str) else None)
    with pytest.raises(ConfigError, match="profile") as err:
        Profile(meta=meta(), steps=steps)
    assert message in str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "not an rllm-sim profile"),
    ({"format_version": FORMAT_VERSION + 1}, "reads up to"),
    ({"kv": {"block_size": 128}}, "kv lacks ['num_gpu_blocks', 'bytes_per_token']"),
])
def test_bad_metadata_is_refused(tmp_path, steps, change, message):
    write_steps(steps, tmp_path / STEPS_FILE)
    (tmp_path / META_FILE).write_text(json.dumps(meta(**change)))
    with pytest.raises(ConfigError) as err:
        Profile.load(tmp_path)
    assert message in str(err.value)


def test_missing_metadata_keys_are_listed(tmp_path, steps):
    data = meta()
    del data["kv"], data["points"]
    write_steps(steps, tmp_path / STEPS_FILE)
    (tmp_path / META_FILE).write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"lacks keys \['kv', 'points'\]"):
        Profile.load(tmp_path)


def test_no_profile_directory_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="missing profile.json"):
        Profile.load(tmp_path / "nothing")


def test_batch_of_dict_row():
    batch = batch_of(row(0, "mixed", prefill=[10], context=[5], decode=[7], spec=[2]))
    assert (batch.num_prefill_tokens, batch.num_decode_seqs, batch.num_spec_tokens) == (10, 1, 2)


@pytest.mark.parametrize("name", ["none", "spec_ngram", "prefix_cache"])
def test_a_shipped_profile_saved_again_has_the_same_profile_json(tmp_path, name):
    from pathlib import Path

    from simulator.records.profile import ProfileMeta

    folder = Path(__file__).resolve().parents[3] / "calibration/profiles/cpu-amd-2c/tiny-llama" / name
    profile = Profile.load(folder)
    assert isinstance(profile.meta, ProfileMeta)
    assert profile.meta.kv["num_gpu_blocks"] == profile.kv_capacity.num_blocks
    profile.save(tmp_path)
    assert (tmp_path / "profile.json").read_bytes() == (folder / "profile.json").read_bytes()
