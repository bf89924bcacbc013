"""build_workload: every shipped config, the command-line overrides, sizes, budgets and errors."""

import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from simulator.records.errors import ConfigError
from simulator.records.workload import Workload
from simulator.workload.builder import KINDS, Draft, build_workload, register_kind
from simulator.workload.traces import REPO_ROOT, read_lengths_csv, read_servegen_client

CONF = REPO_ROOT / "conf"
BENCH = "data/bench/reasoning_lengths_20k.csv"
WORKLOAD_CONFIGS = sorted(p.stem for p in (CONF / "workload").glob("*.yaml") if p.stem != "file")


def composed(*overrides: str) -> dict:
    """The workload group as the simulator's Hydra app composes it."""
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg.workload, resolve=True)


def gamma(**changes) -> dict:
    cfg = {"kind": "gamma", "rate": 2.0, "cv": 2.0, "num_requests": 500, "seed": 0}
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("name", WORKLOAD_CONFIGS)
def test_every_shipped_config_builds(name):
    overrides = [f"workload={name}"]
    if name == "servegen":
        overrides += ["workload.duration_s=600"]  # one window keeps the test fast
    cfg = composed(*overrides)
    workload = build_workload(cfg)
    assert isinstance(workload, Workload)
    assert len(workload) > 100
    assert workload.arrival_s[0] >= 0 and np.all(np.diff(workload.arrival_s) >= 0)
    assert workload.output_tokens.max() <= cfg["max_tokens"]
    assert workload.name == cfg["name"]


def test_the_documented_command_line_maps_onto_the_config():
    cfg = composed(
        "workload=gamma",
        "workload.rate=4",
        "workload.cv=2",
        "workload.num_requests=1000",
        "workload.seed=7",
    )
    workload = build_workload(cfg)
    assert len(workload) == 1000
    assert workload.seed == 7
    assert workload.arrival_s[-1] == pytest.approx(1000 / 4)  # vLLM's exact-rate convention
    gaps = np.diff(workload.arrival_s)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.15)


def test_lengths_file_override_takes_rows_in_order():
    cfg = composed(
        "workload=gamma",
        "workload.rate=0.08",
        "workload.num_requests=1000",
        f"workload.lengths_file={BENCH}",
    )
    workload = build_workload(cfg)
    prompt, output = read_lengths_csv(BENCH)
    assert np.array_equal(workload.prompt_tokens, prompt[:1000])
    assert np.array_equal(workload.output_tokens, np.minimum(output[:1000], 32768))
    share = workload.reasoning_tokens.sum() / workload.output_tokens.sum()
    assert share == pytest.approx(cfg["lengths"]["reason_ratio_mean"], abs=0.005)
    assert set(workload.domain) == {"file"}


def test_lengths_file_starts_over_when_it_runs_out(tmp_path):
    path = tmp_path / "three.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n10,100\n20,200\n30,300\n")
    workload = build_workload(gamma(num_requests=7, lengths_file=str(path), reason_ratio=0.5))
    assert workload.prompt_tokens.tolist() == [10, 20, 30, 10, 20, 30, 10]
    assert workload.reasoning_tokens.tolist() == [50, 100, 150, 50, 100, 150, 50]


def test_same_seed_same_workload_and_a_new_seed_changes_it():
    a, b, c = (
        build_workload(gamma(seed=3)),
        build_workload(gamma(seed=3)),
        build_workload(gamma(seed=4)),
    )
    for column in ("arrival_s", "prompt_tokens", "output_tokens", "reasoning_tokens", "domain"):
        assert np.array_equal(getattr(a, column), getattr(b, column))
    assert not np.array_equal(a.arrival_s, c.arrival_s)
    assert not np.array_equal(a.output_tokens, c.output_tokens)


def test_changing_the_rate_keeps_every_requests_lengths():
    slow, fast = build_workload(gamma(rate=1.0)), build_workload(gamma(rate=8.0))
    assert np.array_equal(slow.output_tokens, fast.output_tokens)
    assert np.array_equal(slow.prompt_tokens, fast.prompt_tokens)
    assert fast.arrival_s[-1] == pytest.approx(slow.arrival_s[-1] / 8)


def test_duration_sizing():
    workload = build_workload(gamma(num_requests=None, duration_s=120.0, rate=3.0))
    assert len(workload) == 360  # exact rate: rate x duration
    assert workload.arrival_s[-1] < 120.0
    plain = build_workload(gamma(num_requests=None, duration_s=2000.0, rate=3.0, exact_rate=False))
    assert len(plain) / 2000 == pytest.approx(3.0, rel=0.1)


def test_max_tokens_truncates_output_and_reasoning():
    full = build_workload(gamma(max_tokens=None, num_requests=5000))
    cut = build_workload(gamma(max_tokens=4096, num_requests=5000))
    assert cut.output_tokens.max() == 4096
    assert np.array_equal(cut.output_tokens, np.minimum(full.output_tokens, 4096))
    assert np.array_equal(
        cut.reasoning_tokens, np.minimum(full.reasoning_tokens, cut.output_tokens)
    )
    assert np.mean(full.output_tokens > 4096) > 0.05


def test_domain_and_difficulty_overrides_from_the_command_line():
    cfg = composed(
        "workload=gamma",
        "workload.domains=math",
        "workload.difficulty.math=hard",
        "workload.max_tokens=null",
    )
    workload = build_workload({**cfg, "num_requests": 4000})
    assert set(workload.domain) == {"math"}
    assert workload.output_tokens.mean() == pytest.approx(13260, rel=0.05)  # AIME-like
    mixed = build_workload(
        {**composed("workload=gamma", "workload.domains={math:1,chat:3}"), "num_requests": 4000}
    )
    assert np.mean(mixed.domain == "math") == pytest.approx(0.25, abs=0.03)


def test_piecewise_from_a_servegen_client_trace():
    trace = "data/workloads/servegen-deepseek-r1/chunk-35-trace.csv"
    cfg = composed(
        "workload=piecewise",
        "workload.windows=null",
        f"workload.windows_from={trace}",
        "workload.start_s=72000",
        "workload.duration_s=1800",
    )
    workload = build_workload(cfg)
    rates = [
        w.rate
        for w in read_servegen_client("data/workloads/servegen-deepseek-r1", 35).windows[120:123]
    ]
    counts = np.histogram(workload.arrival_s, bins=[0, 600, 1200, 1800])[0]
    assert counts.tolist() == pytest.approx([r * 600 for r in rates], abs=1)


def test_servegen_replay_follows_client_rates_and_data():
    cfg = composed(
        "workload=servegen",
        "workload.clients=[35,48]",
        "workload.start_s=3600",
        "workload.duration_s=1200",
    )
    workload = build_workload(cfg)
    clients = [read_servegen_client(cfg["path"], c) for c in (35, 48)]
    expected = sum(w.rate * 600 for c in clients for w in c.windows[6:8])
    assert len(workload) == pytest.approx(expected, abs=4)
    supports = [set(c.dataset(0)["output_tokens"].values.tolist()) for c in clients]
    assert set(workload.output_tokens.tolist()) <= supports[0] | supports[1]
    scaled = build_workload({**cfg, "rate_scale": 2.0})
    assert len(scaled) == pytest.approx(2 * expected, abs=4)


def test_azure_and_mooncake_replay():
    azure = build_workload(composed("workload=azure_conv", "workload.duration_s=600"))
    assert azure.arrival_s[-1] < 600 and np.all(azure.reasoning_tokens == 0)
    faster = build_workload(
        composed("workload=azure_conv", "workload.duration_s=600", "workload.rate_scale=2")
    )
    assert len(faster) == pytest.approx(2 * len(azure), rel=0.1)
    reasoned = build_workload(
        composed(
            "workload=azure_conv",
            "workload.num_requests=100",
            "workload.duration_s=null",
            "workload.reason_ratio=0.5",
        )
    )
    assert np.array_equal(
        reasoned.reasoning_tokens, np.rint(0.5 * reasoned.output_tokens).astype(int)
    )
    mooncake = build_workload(
        composed("workload=mooncake", "workload.num_requests=2000", "workload.duration_s=null")
    )
    assert len(mooncake) == 2000
    assert np.all(mooncake.prefix_tokens <= mooncake.prompt_tokens)
    assert np.mean(mooncake.prefix_group >= 0) > 0.5


def test_file_kind_replays_a_saved_workload(tmp_path):
    original = build_workload(gamma(num_requests=300))
    path = tmp_path / "saved.parquet"
    original.save(path)
    replayed = build_workload(
        {"kind": "file", "path": str(path), "duration_s": float("inf"), "max_tokens": None}
    )
    for column in ("arrival_s", "prompt_tokens", "output_tokens", "reasoning_tokens", "domain"):
        assert np.array_equal(getattr(replayed, column), getattr(original, column))


def test_new_kinds_plug_into_the_registry():
    @register_kind("constant", keys=("gap_s",))
    def constant(cfg, size, arrival_rng, length_rng):
        return Draft(np.arange(size.num_requests) * float(cfg["gap_s"]))

    try:
        workload = build_workload({"kind": "constant", "gap_s": 0.5, "num_requests": 10})
        assert workload.arrival_s.tolist() == [0.5 * i for i in range(10)]
        assert len(set(workload.domain)) > 1  # lengths come from the reasoning laws
    finally:
        del KINDS["constant"]


def test_a_large_workload_builds_well_under_a_second():
    build_workload(gamma(num_requests=1000))  # warm the length-law cache
    start = time.perf_counter()
    workload = build_workload(gamma(rate=42.0, num_requests=150_000))
    assert len(workload) == 150_000
    assert time.perf_counter() - start < 1.0  # ~0.05 s on an idle 2-core machine


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (gamma(rate=0), r"^workload.rate: must be a positive number"),
        (gamma(rate=-2.0), r"^workload.rate: must be a positive number"),
        (gamma(rate="fast"), r"^workload.rate: must be a number"),
        (gamma(cv=0), r"^workload.cv: must be > 0"),
        (
            gamma(kind="zipf"),
            r"^workload.kind: unknown kind 'zipf'; allowed: azure, file, gamma, mooncake, piecewise, poisson, servegen",
        ),
        (gamma(num_requests=None), r"^workload.num_requests: set exactly one of"),
        (gamma(duration_s=60.0), r"^workload.num_requests: set exactly one of"),
        (gamma(seed=-1), r"^workload.seed: must be an integer >= 0"),
        (gamma(domains={"math": 0, "chat": 0}), r"^workload.domains: weights must sum to > 0"),
        (gamma(domains={"poetry": 1}), r"^workload.domains: unknown names \['poetry'\]"),
        (
            gamma(difficulty={"math": "impossible"}),
            r"^workload.difficulty.math: unknown names \['impossible'\]",
        ),
        (gamma(max_tokens=0), r"^workload.max_tokens: must be a positive integer"),
        (gamma(reason_ratio=1.5), r"^workload.reason_ratio: must lie in \[0, 1\]"),
        (gamma(rte=3), r"^workload.rte: unknown key for kind gamma; allowed:"),
        (gamma(lengths_file="data/bench/nope.csv"), r"^workload.lengths_file: no such file"),
        (
            {"kind": "poisson", "rate": 1.0, "cv": 3.0, "num_requests": 5},
            r"^workload.cv: a poisson workload has cv 1",
        ),
        (
            {"kind": "azure", "path": "data/traces/missing.csv", "num_requests": 5},
            r"^workload.path: no such file",
        ),
        (
            {
                "kind": "azure",
                "path": "data/traces/azure-llm-2023/AzureLLMInferenceTrace_code.csv",
                "num_requests": 10**6,
            },
            r"^workload.num_requests: the trace holds only 8819",
        ),
        (
            {
                "kind": "piecewise",
                "windows": [{"duration_s": 60, "rate": 1}],
                "start_s": 7,
                "duration_s": 60.0,
            },
            r"^workload.start_s: must fall on a window boundary",
        ),
        ({"kind": "piecewise", "num_requests": 5}, r"^workload.windows: give either windows"),
        (
            {
                "kind": "servegen",
                "path": "data/workloads/servegen-deepseek-r1",
                "clients": [999],
                "duration_s": 60.0,
            },
            r"^workload.clients: no such ServeGen clients \[999\]",
        ),
        (
            {"kind": "gamma", "rate": 1.0, "duration_s": float("inf")},
            r"^workload.duration_s: must be finite for generated arrivals",
        ),
    ],
)
def test_bad_input_gives_one_line_naming_the_field(cfg, message):
    with pytest.raises(ConfigError, match=message) as error:
        build_workload(cfg)
    assert "\n" not in str(error.value)


def test_malformed_trace_rows_surface_through_the_builder(tmp_path: Path):
    path = tmp_path / "trace.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47.68,12,many\n"
    )
    with pytest.raises(
        ConfigError, match=r"^workload.path: trace.csv line 3, column GeneratedTokens: 'many'"
    ):
        build_workload({"kind": "azure", "path": str(path), "num_requests": 1})


def test_a_workload_yaml_read_without_hydra_builds_with_the_default_laws():
    import yaml

    cfg = yaml.safe_load((CONF / "workload" / "gamma.yaml").read_text())
    assert "defaults" in cfg and "lengths" not in cfg
    from_yaml = build_workload(cfg)
    from_hydra = build_workload(composed("workload=gamma"))
    assert np.array_equal(from_yaml.output_tokens, from_hydra.output_tokens)
    assert np.array_equal(from_yaml.arrival_s, from_hydra.arrival_s)
