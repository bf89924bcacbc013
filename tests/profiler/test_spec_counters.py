"""vLLM's spec-decode counters: parsed from a /metrics text recorded on the real CPU engine
(tiny-llama, n-gram, 4 draft tokens), derived from a profile's steps, and handed to the
simulator as its draft rates under perf.source=profile."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from profiler.live.metrics import parse_prometheus
from profiler.live.spec_counters import SpecCounters, counters_between, parse_spec_counters
from profiler.summary import spec_summary
from simulator.records.engine_config import EngineConfig, SpeculativeConfig
from simulator.records.errors import ConfigError
from simulator.speculation import profile_rates, speculative_rates, with_profile_rates
from tests.profiler.engine_runs import REPO, needs_engine, profiler_env

DATA = Path(__file__).parent / "data"


def test_counters_parsed_from_a_recorded_metrics_text():
    text = (DATA / "vllm_metrics_spec_ngram.txt").read_text()
    c = parse_spec_counters(text)
    assert c is not None and len(c.accepted_per_pos) == 4
    assert sum(c.accepted_per_pos) == c.num_accepted_tokens  # each accepted token has a position
    assert c.num_accepted_tokens <= c.num_draft_tokens <= 4 * c.num_drafts
    assert all(a >= b for a, b in zip(c.accepted_per_pos, c.accepted_per_pos[1:], strict=False))
    rates = c.acceptance_given_previous()
    assert all(0 <= r <= 1 for r in rates)
    assert rates[0] == pytest.approx(c.accepted_per_pos[0] / c.num_drafts)
    # the simulator takes them as they are
    SpeculativeConfig(num_speculative_tokens=4, acceptance_rate=tuple(rates),
                      proposal_rate=c.proposal_rate(generated_tokens=384, requests=4))


def test_counters_agree_with_the_scraper_and_sum_engines_by_position():
    text = (DATA / "vllm_metrics_spec_ngram.txt").read_text()
    c = parse_spec_counters(text)
    values = parse_prometheus(text)  # the live scraper's reading of the same page
    assert c.num_drafts == int(values["vllm:spec_decode_num_drafts_total"])
    assert c.num_accepted_tokens == int(values["vllm:spec_decode_num_accepted_tokens_total"])
    two = "\n".join(['vllm:spec_decode_num_drafts_total{engine="0"} 10', 'vllm:spec_decode_num_drafts_total{engine="1"} 5',
                     'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="1"} 3',
                     'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",position="1"} 2',
                     'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="x"} 9',
                     "vllm:spec_decode_num_draft_tokens_total NaN"])
    assert parse_spec_counters(two) == SpecCounters(15, 0, 0, [0, 5])


def test_a_server_without_speculation_has_no_counters():
    assert parse_spec_counters((DATA / "vllm_metrics_sample.txt").read_text()) is None


def test_proposal_rate_counts_decode_steps():
    c = SpecCounters(num_drafts=30, num_draft_tokens=120, num_accepted_tokens=40, accepted_per_pos=[20, 10, 6, 4])
    # 2 requests, 102 tokens: 2 from prefill, 100 from 60 decode steps (40 accepted drafts on top)
    assert c.proposal_rate(generated_tokens=102, requests=2) == pytest.approx(30 / 60)
    assert c.acceptance_given_previous() == pytest.approx([20 / 30, 10 / 20, 6 / 10, 4 / 6])
    assert c.minus(SpecCounters(10, 40, 10, [5, 3, 1, 1])) == SpecCounters(20, 80, 30, [15, 7, 5, 3])


def write_profile(folder: Path, drafted: list[int], accepted: list[int], k: int = 4) -> Path:
    steps = pd.DataFrame({"num_decode_seqs": [1] * len(drafted), "phase": ["spec"] * len(drafted),
                          "decode_spec_tokens": [[d] for d in drafted],
                          "decode_accepted_tokens": [[a] for a in accepted],
                          "num_spec_tokens": drafted, "draft_s": [1e-4] * len(drafted),
                          "wall_s": [1e-2] * len(drafted)})
    folder.mkdir()
    (folder / "profile.json").write_text(json.dumps({"summary": {"spec_decode": spec_summary(steps, k)}}))
    return folder


def test_a_profile_gives_the_run_its_measured_rates(tmp_path):
    # 8 decode steps: 4 with drafts of 4 tokens, accepting 4, 2, 1, 0
    profile = write_profile(tmp_path / "p", [4, 4, 4, 4, 0, 0, 0, 0], [4, 2, 1, 0, 0, 0, 0, 0])
    counters = json.loads((profile / "profile.json").read_text())["summary"]["spec_decode"]["vllm_counters"]
    assert counters == {"num_drafts": 4, "num_draft_tokens": 16, "num_accepted_tokens": 7,
                        "accepted_per_pos": [3, 2, 1, 1]}
    measured = profile_rates({"source": "profile", "profile": str(profile)})
    assert measured["acceptance_rate"] == pytest.approx([3 / 4, 2 / 3, 1 / 2, 1.0])
    assert measured["proposal_rate"] == pytest.approx(0.5)

    placeholder = SpeculativeConfig(num_speculative_tokens=4, acceptance_rate=(0.6, 0.5, 0.4, 0.3), proposal_rate=0.5)
    engine = EngineConfig(speculative=placeholder)
    optimization = {"name": "spec_ngram", "speculative_rates": "placeholder", "speculative": {"method": "ngram"}}
    perf = {"source": "profile", "profile": str(profile)}
    got = with_profile_rates(engine, optimization, perf, [])
    assert got.speculative.acceptance_rate == pytest.approx((3 / 4, 2 / 3, 1 / 2, 1.0))
    meta = speculative_rates(got, optimization, [])
    assert meta["source"] == f"profile {profile}" and "warning" not in meta
    # the command line still wins, and another perf source keeps the group's rates
    both = ["optimization.speculative.acceptance_rate=[0.9]", "optimization.speculative.proposal_rate=0.4"]
    assert with_profile_rates(engine, dict(optimization), perf, both) is engine
    assert with_profile_rates(engine, dict(optimization), {"source": "auto"}, []) is engine


def test_a_profile_of_another_draft_length_is_refused(tmp_path):
    profile = write_profile(tmp_path / "p", [3, 3], [1, 2], k=3)
    engine = EngineConfig(speculative=SpeculativeConfig(num_speculative_tokens=4, acceptance_rate=(0.5,)))
    with pytest.raises(ConfigError, match="num_speculative_tokens: the profile measured 3 draft tokens"):
        with_profile_rates(engine, {"speculative": {}}, {"source": "profile", "profile": str(profile)}, [])


def test_a_run_on_the_shipped_spec_profile_takes_its_measured_rates(tmp_path):
    """The simulator's command line with perf.source=profile: the placeholder warning goes, and
    the run's metadata names the profile and carries the rates it measured."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    profile = repo / "calibration/profiles/cpu-amd-2c/tiny-llama/spec_ngram"
    proc = subprocess.run([sys.executable, "-m", "simulator", "optimization=spec_ngram", "perf.source=profile",
                           f"perf.profile={profile}", "engine.max_model_len=1024", "engine.block_size=32",
                           "workload.num_requests=20", "plots=false", "progress=false",
                           f"hydra.run.dir={tmp_path}"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "placeholders" not in proc.stderr
    rates = json.loads((tmp_path / "summary.json").read_text())["metadata"]["speculative_rates"]
    measured = profile_rates({"profile": str(profile)})
    assert rates["source"] == f"profile {profile}"
    assert rates["acceptance_rate"] == pytest.approx(measured["acceptance_rate"])
    assert rates["acceptance_rate"] != [0.6, 0.5, 0.4, 0.3]


def test_measured_rates_reproduce_the_mean_accepted_tokens_per_draft():
    """The simulator always drafts k tokens; n-gram drafts are often shorter. Rates from vLLM's
    counters (recomputed from the steps of a profile written before they were kept) give the
    simulator the mean accepted tokens per draft the engine had."""
    import numpy as np

    profile = REPO / "calibration/profiles/cpu-amd-2c/tiny-llama/spec_ngram"
    spec = json.loads((profile / "profile.json").read_text())["summary"]["spec_decode"]
    measured = profile_rates({"profile": str(profile)})
    assert measured["vllm_counters"]["num_accepted_tokens"] == spec["accepted_tokens"]
    expected_per_draft = float(np.sum(np.cumprod(measured["acceptance_rate"])))
    assert expected_per_draft == pytest.approx(spec["mean_accepted_per_draft"], rel=1e-9)


@pytest.mark.engine
@needs_engine
def test_the_profiles_counters_are_vllms_own_on_the_real_engine():
    """The profiler reads each request's drafted and accepted tokens from the scheduler's
    output; summed as profiler.summary does, they equal vLLM's own spec-decode counters."""
    import subprocess
    import sys

    from profiler.engine_env import engine_python

    python = str(engine_python() or sys.executable)
    proc = subprocess.run([python, "tests/profiler/spec_counters_run.py"], cwd=REPO, env=profiler_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    drafted, accepted = zip(*out["seen"], strict=True)
    steps = pd.DataFrame({"num_decode_seqs": 1, "phase": "spec", "decode_spec_tokens": [[d] for d in drafted],
                          "decode_accepted_tokens": [[a] for a in accepted], "num_spec_tokens": list(drafted),
                          "draft_s": 0.0, "wall_s": 0.0})
    ours = spec_summary(steps, 4)["vllm_counters"]
    vllm = out["vllm"]
    assert ours["num_drafts"] == vllm["vllm:spec_decode_num_drafts"] > 0
    assert ours["num_draft_tokens"] == vllm["vllm:spec_decode_num_draft_tokens"]
    assert ours["num_accepted_tokens"] == vllm["vllm:spec_decode_num_accepted_tokens"]
    assert ours["accepted_per_pos"] == vllm["vllm:spec_decode_num_accepted_tokens_per_pos"]


def test_counters_between_two_pages_of_one_server():
    page = ('vllm:spec_decode_num_drafts_total{{engine="0"}} {d}\n'
            'vllm:spec_decode_num_draft_tokens_total{{engine="0"}} {t}\n'
            'vllm:spec_decode_num_accepted_tokens_total{{engine="0"}} {a}\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",position="0"}} {p0}\n'
            'vllm:spec_decode_num_accepted_tokens_per_pos_total{{engine="0",position="1"}} {p1}\n')
    before = page.format(d=10, t=20, a=8, p0=6, p1=2)
    after = page.format(d=30, t=60, a=20, p0=15, p1=5)
    assert counters_between(before, after) == SpecCounters(20, 40, 12, [9, 3])
    assert counters_between("", after) == SpecCounters(30, 60, 20, [15, 5])  # no first page: since start
    assert counters_between(before, "vllm:num_requests_running 0\n") is None  # no speculation
