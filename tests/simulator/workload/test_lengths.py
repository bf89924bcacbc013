"""Reasoning-length laws: the fitted defaults, sampling, budgets and mixes."""

import math

import numpy as np
import pytest
import yaml

from simulator.records.errors import ConfigError
from simulator.workload import length_fit
from simulator.workload.lengths import (
    DEFAULT_LENGTHS_PATH,
    LengthModel,
    apply_max_tokens,
    parse_mix,
    reasoning_from_ratio,
)


@pytest.fixture(scope="module")
def model() -> LengthModel:
    return LengthModel.default()


@pytest.fixture(scope="module")
def servegen_output():
    return length_fit.servegen_aggregate("output_tokens")


def test_shipped_defaults_are_what_the_fit_derives_from_the_shared_data():
    with open(DEFAULT_LENGTHS_PATH) as handle:
        shipped = yaml.safe_load(handle)

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    # the YAML rounds to 3-4 digits; another machine's EM and least squares may round across one
    # unit in the last digit (at most 0.8% of any shipped value): 1% relative
    fitted, expected = flat(length_fit.fit()), flat(shipped)
    assert fitted.keys() == expected.keys()
    assert fitted == pytest.approx(expected, rel=0.01)


def test_servegen_pooling_reproduces_the_published_summary(servegen_output):
    # the study quotes mean ~1,690, median ~807, p90 ~4,165, p99 ~13,500
    assert servegen_output.mean == pytest.approx(1690, rel=0.01)
    assert length_fit.quantile(servegen_output, 0.5) == pytest.approx(807, rel=0.01)
    assert length_fit.quantile(servegen_output, 0.9) == pytest.approx(4165, rel=0.01)
    assert length_fit.quantile(servegen_output, 0.99) == pytest.approx(13500, rel=0.01)
    assert length_fit.quantile(servegen_output, 1.0) == 32768


def test_fitted_defaults_reproduce_servegen_output_lengths(model, servegen_output):
    sampled = model.sample(np.random.default_rng(0), 200_000).output_tokens
    assert sampled.mean() == pytest.approx(servegen_output.mean, rel=0.05)
    for q, tolerance in ((0.25, 0.05), (0.5, 0.05), (0.75, 0.05), (0.9, 0.10), (0.99, 0.15)):
        expected = length_fit.quantile(servegen_output, q)
        assert np.quantile(sampled, q) == pytest.approx(expected, rel=tolerance), q


def test_fitted_reasoning_share_matches_servegen(model):
    ratio = length_fit.servegen_aggregate("reason_ratio")
    assert ratio.mean == pytest.approx(0.72, abs=0.01)
    lengths = model.sample(np.random.default_rng(1), 100_000)
    share = lengths.reasoning_tokens / lengths.output_tokens
    assert share.mean() == pytest.approx(ratio.mean, abs=0.01)
    assert model.reason_ratio_mean == pytest.approx(ratio.mean, abs=0.001)


@pytest.mark.parametrize(("level", "published_mean"), [("easy", 2460), ("hard", 13260)])
def test_math_levels_match_the_published_r1_distill_7b_means(model, level, published_mean):
    only = model.with_difficulty("math", level)
    lengths = only.sample(np.random.default_rng(2), 100_000, {"math": 1.0})
    assert lengths.output_tokens.mean() == pytest.approx(published_mean, rel=0.03)


def test_difficulty_orders_the_lengths_of_every_domain(model):
    for domain in model.domains:
        means = [
            model.with_difficulty(domain, level)
            .sample(np.random.default_rng(3), 20_000, {domain: 1.0})
            .output_tokens.mean()
            for level in ("easy", "medium", "hard")
        ]
        assert means[0] < means[1] < means[2], domain


def test_samples_are_clipped_and_consistent(model):
    lengths = model.sample(np.random.default_rng(4), 100_000)
    assert lengths.output_tokens.min() >= 1
    assert lengths.output_tokens.max() <= model.max_output_tokens
    assert lengths.prompt_tokens.min() >= 1
    assert lengths.prompt_tokens.max() <= model.max_prompt_tokens
    assert np.all(
        (lengths.reasoning_tokens >= 0) & (lengths.reasoning_tokens <= lengths.output_tokens)
    )
    total = lengths.prompt_tokens + lengths.output_tokens
    assert total.max() <= model.max_model_len  # prompt + output fit the context window
    assert np.any(total == model.max_model_len)  # the long tail hits the cap


def test_domain_mix_is_respected(model):
    lengths = model.sample(np.random.default_rng(5), 50_000, {"math": 0.7, "chat": 0.3})
    labels, counts = np.unique(lengths.domain.astype(str), return_counts=True)
    assert labels.tolist() == ["chat", "math"]
    assert counts[1] / counts.sum() == pytest.approx(0.7, abs=0.01)
    # math prompts are short benchmark questions, chat prompts follow ServeGen's inputs
    math_prompts = lengths.prompt_tokens[lengths.domain == "math"]
    chat_prompts = lengths.prompt_tokens[lengths.domain == "chat"]
    assert np.median(math_prompts) == pytest.approx(model.domains["math"].prompt.median, rel=0.05)
    assert np.median(chat_prompts) == pytest.approx(model.domains["chat"].prompt.median, rel=0.05)


def test_fixed_reason_ratio(model):
    lengths = model.sample(np.random.default_rng(6), 1000, reason_ratio=0.25)
    assert np.array_equal(
        lengths.reasoning_tokens, np.rint(0.25 * lengths.output_tokens).astype(int)
    )


def test_same_seed_same_lengths(model):
    a = model.sample(np.random.default_rng(7), 5000)
    b = model.sample(np.random.default_rng(7), 5000)
    c = model.sample(np.random.default_rng(8), 5000)
    for column in ("prompt_tokens", "output_tokens", "reasoning_tokens"):
        assert np.array_equal(getattr(a, column), getattr(b, column))
    assert np.array_equal(a.domain, b.domain)
    assert not np.array_equal(a.output_tokens, c.output_tokens)


def test_max_tokens_cuts_output_and_reasoning_within_it():
    output = np.array([100, 5000, 9000, 20000])
    reasoning = reasoning_from_ratio(output, np.array([0.5, 0.9, 0.5, 0.99]))
    cut_output, cut_reasoning = apply_max_tokens(output, reasoning, 8192)
    assert cut_output.tolist() == [100, 5000, 8192, 8192]
    assert cut_reasoning.tolist() == [
        50,
        4500,
        4500,
        8192,
    ]  # the last one is cut while still thinking
    same_output, same_reasoning = apply_max_tokens(output, reasoning, None)
    assert same_output is output and same_reasoning is reasoning
    with pytest.raises(ConfigError, match="workload.max_tokens: must be a positive integer"):
        apply_max_tokens(output, reasoning, 0)


def test_parse_mix_forms_and_errors():
    names = ("math", "code", "science", "chat")
    assert parse_mix("math", "f", names) == {"math": 1.0}
    assert parse_mix("math:3,chat:1", "f", names) == {"math": 0.75, "chat": 0.25}
    assert parse_mix({"math": 2, "chat": 0, "code": None}, "f", names) == {"math": 1.0}
    with pytest.raises(ConfigError, match=r"workload.domains: weights must sum to > 0"):
        parse_mix({"math": 0, "chat": 0}, "workload.domains", names)
    with pytest.raises(ConfigError, match=r"workload.domains: unknown names \['poetry'\]; allowed"):
        parse_mix({"poetry": 1}, "workload.domains", names)
    with pytest.raises(ConfigError, match="finite and >= 0"):
        parse_mix({"math": -1, "chat": 2}, "workload.domains", names)
    with pytest.raises(ConfigError, match="bad weight"):
        parse_mix("math:lots", "workload.domains", names)


def test_bad_length_config_names_the_domain():
    with open(DEFAULT_LENGTHS_PATH) as handle:
        config = yaml.safe_load(handle)
    del config["domains"]["code"]["prompt"]
    with pytest.raises(ConfigError, match=r"workload.lengths.domains.code: needs difficulty"):
        LengthModel.from_config(config)
    config["domains"]["code"]["prompt"] = {"median": 100, "sigma": 1}
    config["domains"]["code"]["difficulty"] = {"easy": 0, "medium": 0, "hard": 0}
    with pytest.raises(
        ConfigError, match=r"workload.lengths.domains.code.difficulty: weights must sum"
    ):
        LengthModel.from_config(config)


def test_clip_aware_median_for_mean():
    median = length_fit.median_for_mean(13260, 0.6)
    mu = math.log(median)
    assert length_fit.clipped_lognormal_mean(mu, 0.6, 32768) == pytest.approx(13260, rel=1e-6)
    assert median * math.exp(0.6**2 / 2) > 13260  # clipping at 32k needs a longer unclipped law
