"""Re-derive the default reasoning-length laws (conf/workload/lengths/reasoning.yaml).

    python -m simulator.workload.length_fit            # print the fitted YAML and a check
    python -m simulator.workload.length_fit --write    # overwrite conf/workload/lengths/reasoning.yaml

Sources: the ServeGen DeepSeek-R1 client data in data/workloads/servegen-deepseek-r1
(Alibaba production traffic, Apache-2.0) and the study's published means for
R1-Distill-Qwen-7B at a 32k budget (GSM8K ~2,460 output tokens, AIME ~13,260).

1. Aggregate ServeGen's per-client, per-6-hour distributions of output tokens,
   input tokens and reason_ratio, each client weighted by its requests per day
   (the weighting behind the study's summary: mean ~1,690, median ~807,
   p90 ~4,165, p99 ~13,500 output tokens; reason_ratio mean ~0.72).
2. Output: a 3-component log-normal mixture fitted by EM to that histogram
   gives the production length laws of easy / medium / hard requests.
3. Math: its difficulty levels are the study's benchmarks, pinned to the
   published means (clip-aware): easy = GSM8K 2,460, hard = AIME 13,260, and
   medium = MATH-500 at their geometric mean (the study gives no MATH-500
   mean; its pilot-table times do not read as token counts: at the ~1,750
   tokens/s that GSM8K's and AIME's times imply, MATH-500 would need ~30k
   tokens, more than AIME, and GPQA ~42k, beyond the 32k budget). All three take
   the pooled within-component sigma of the production mixture.
4. Chat, code and science use the production components. Under the
   production domain mix (a prior below), with math's part fixed, the
   difficulty weights of the other domains are fitted so that the whole
   mixture reproduces ServeGen's mean and quartiles, p90 and p99 (least
   squares in log); iterative proportional fitting then splits them across
   chat, code and science, starting from prior mixes (chat easier, science
   harder).
5. Prompts: chat and code take the log-normal fitted to ServeGen's input
   tokens; math and science prompts are benchmark questions (an assumption,
   not fitted: no prompt data for them is shipped).
6. reason_ratio: a Beta law fitted by maximum likelihood to ServeGen's
   reason_ratio, for every domain (ServeGen has no domain labels).

Everything is deterministic; tests/simulator/workload/test_lengths.py checks that the
shipped YAML equals this fit and reproduces ServeGen's mean and median.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator.workload.lengths import DEFAULT_LENGTHS_PATH, DIFFICULTIES
from simulator.workload.traces import Distribution, read_servegen_client, servegen_client_ids

SERVEGEN_DIR = "data/workloads/servegen-deepseek-r1"
MAX_OUTPUT_TOKENS = 32768
MAX_PROMPT_TOKENS = 32768
MAX_MODEL_LEN = 32768  # the default engine's context window (conf/engine/vllm_default.yaml)

# Published means for R1-Distill-Qwen-7B (32k budget), from the study.
GSM8K_MEAN_OUTPUT = 2460.0
AIME_MEAN_OUTPUT = 13260.0

# Priors (not identifiable from ServeGen, which has no domain labels).
PRODUCTION_MIX = {"chat": 0.55, "code": 0.25, "math": 0.1, "science": 0.1}
PRIOR_DIFFICULTY = {
    "math": {"easy": 0.5, "medium": 0.35, "hard": 0.15},
    "chat": {"easy": 0.6, "medium": 0.3, "hard": 0.1},
    "code": {"easy": 0.4, "medium": 0.4, "hard": 0.2},
    "science": {"easy": 0.3, "medium": 0.4, "hard": 0.3},
}
BENCHMARK_PROMPTS = {  # median tokens and sigma: short benchmark questions (assumption)
    "math": (120.0, 0.5),
    "science": (250.0, 0.4),
}


def servegen_aggregate(field: str, directory: str | Path = SERVEGEN_DIR) -> Distribution:
    """One ServeGen field pooled over clients and windows, each client weighted by its requests per day."""
    values, probs = [], []
    for client_id in servegen_client_ids(directory):
        client = read_servegen_client(directory, client_id)
        weight = client.requests_per_day
        for index in range(len(client.dataset_starts)):
            window = client.dataset(index) if weight > 0 else None
            if window is not None:
                values.append(window[field].values)
                probs.append(window[field].probs * weight)
    support, where = np.unique(np.concatenate(values), return_inverse=True)
    pooled = np.bincount(where, weights=np.concatenate(probs))
    return Distribution(support, pooled / pooled.sum())


def quantile(law: Distribution, q: float) -> float:
    """The q-quantile of an empirical distribution."""
    cdf = np.cumsum(law.probs)
    return float(law.values[min(np.searchsorted(cdf, q), len(law.values) - 1)])


@dataclass(frozen=True)
class Component:
    """A log-normal component: weight, log-median mu, sigma."""

    weight: float
    mu: float
    sigma: float


def _normal_density(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def fit_lognormal_mixture(law: Distribution, k: int = 3, iterations: int = 500) -> list[Component]:
    """EM on the log of a weighted histogram; components sorted by median.

    Initialised deterministically at quantiles; the 32,768 cap holds ~1e-5 of
    the ServeGen mass, so censoring is ignored.
    """
    x = np.log(law.values)
    w = law.probs
    quantiles = [(i + 0.5) / k for i in range(k)]
    mu = np.array([math.log(quantile(law, q)) for q in quantiles])
    sigma = np.full(k, 0.5)
    weight = np.full(k, 1.0 / k)
    for _ in range(iterations):
        dens = np.stack([weight[j] * _normal_density(x, mu[j], sigma[j]) for j in range(k)])
        resp = dens / dens.sum(axis=0)
        mass = resp @ w
        weight = mass / mass.sum()
        mu = (resp * x) @ w / mass
        sigma = np.sqrt((resp * (x - mu[:, None]) ** 2) @ w / mass)
    order = np.argsort(mu)
    return [Component(float(weight[j]), float(mu[j]), float(sigma[j])) for j in order]


def clipped_lognormal_mean(mu: float, sigma: float, upper: float) -> float:
    """E[min(X, upper)] for X ~ LogNormal(mu, sigma)."""
    from scipy.special import ndtr

    z = (math.log(upper) - mu) / sigma
    return math.exp(mu + sigma**2 / 2) * float(ndtr(z - sigma)) + upper * float(ndtr(-z))


def median_for_mean(mean: float, sigma: float, upper: float = MAX_OUTPUT_TOKENS) -> float:
    """The median whose log-normal, clipped at upper, has the given mean."""
    from scipy.optimize import brentq

    mu = brentq(lambda m: clipped_lognormal_mean(m, sigma, upper) - mean, 0.0, math.log(upper) + 5)
    return math.exp(mu)


SUMMARY_QUANTILES = (0.25, 0.5, 0.75, 0.9, 0.99)


def mixture_summary(
    components: list[Component], upper: float = MAX_OUTPUT_TOKENS
) -> dict[str, float]:
    """Mean (clip-aware) and quantiles of a log-normal mixture."""
    from scipy.optimize import brentq
    from scipy.special import ndtr

    w = np.array([c.weight for c in components])
    mu = np.array([c.mu for c in components])
    sigma = np.array([c.sigma for c in components])
    summary = {
        "mean": sum(c.weight * clipped_lognormal_mean(c.mu, c.sigma, upper) for c in components)
    }
    for q in SUMMARY_QUANTILES:
        cdf_minus_q = lambda x, q=q: float(w @ ndtr((math.log(x) - mu) / sigma)) - q  # noqa: E731
        summary[f"p{round(q * 100)}"] = brentq(cdf_minus_q, 1.0, 1e9)
    return summary


def empirical_summary(law: Distribution) -> dict[str, float]:
    """The same statistics for an empirical distribution."""
    return {"mean": law.mean, **{f"p{round(q * 100)}": quantile(law, q) for q in SUMMARY_QUANTILES}}


def fit_weights_with_fixed_part(
    target: Mapping[str, float],
    components: list[Component],
    fixed: list[Component],
    fixed_share: float,
) -> np.ndarray:
    """Weights of `components` (sharing 1 - fixed_share) that best reproduce `target`.

    `fixed` (weights summing to 1) holds the other part of the mixture. The
    loss is the squared log error of the mean and quantiles.
    """
    from scipy.optimize import minimize

    def mixture(theta: np.ndarray) -> list[Component]:
        t = np.exp(np.r_[0.0, theta])
        t /= t.sum()
        return [Component(fixed_share * c.weight, c.mu, c.sigma) for c in fixed] + [
            Component((1 - fixed_share) * w, c.mu, c.sigma)
            for w, c in zip(t, components, strict=True)
        ]

    def loss(theta: np.ndarray) -> float:
        summary = mixture_summary(mixture(theta))
        return sum((math.log(summary[k]) - math.log(target[k])) ** 2 for k in target)

    result = minimize(
        loss,
        np.zeros(len(components) - 1),
        method="Nelder-Mead",
        options={"xatol": 1e-6, "fatol": 1e-10},
    )
    t = np.exp(np.r_[0.0, result.x])
    return t / t.sum()


def iterative_proportional_fit(
    prior: np.ndarray, row_sums: np.ndarray, column_sums: np.ndarray, iterations: int = 1000
) -> np.ndarray:
    """The matrix closest to `prior` (in KL) with the given row and column sums."""
    m = prior * (row_sums / prior.sum(axis=1))[:, None]
    for _ in range(iterations):
        m *= (column_sums / m.sum(axis=0))[None, :]
        m *= (row_sums / m.sum(axis=1))[:, None]
    return m


def fit_beta(law: Distribution) -> tuple[float, float]:
    """Maximum-likelihood Beta(alpha, beta) for a histogram on [0, 1]."""
    from scipy.optimize import minimize
    from scipy.special import betaln

    x = np.clip(law.values, 1e-3, 1 - 1e-3)
    w = law.probs
    mean_log_x, mean_log_1mx = float(w @ np.log(x)), float(w @ np.log1p(-x))

    def negative_log_likelihood(theta: np.ndarray) -> float:
        a, b = np.exp(theta)
        return -((a - 1) * mean_log_x + (b - 1) * mean_log_1mx - betaln(a, b))

    result = minimize(
        negative_log_likelihood,
        x0=np.zeros(2),
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-12},
    )
    a, b = np.exp(result.x)
    return float(a), float(b)


def fit(directory: str | Path = SERVEGEN_DIR) -> dict:
    """The fitted length config (the layout of conf/workload/lengths/reasoning.yaml)."""
    output = servegen_aggregate("output_tokens", directory)
    prompt = servegen_aggregate("input_tokens", directory)
    ratio = servegen_aggregate("reason_ratio", directory)

    production = fit_lognormal_mixture(output, k=len(DIFFICULTIES))
    pooled_sigma = math.sqrt(sum(c.weight * c.sigma**2 for c in production))
    math_means = {
        "easy": GSM8K_MEAN_OUTPUT,
        "medium": math.sqrt(GSM8K_MEAN_OUTPUT * AIME_MEAN_OUTPUT),
        "hard": AIME_MEAN_OUTPUT,
    }
    math_laws = {
        level: (median_for_mean(mean, pooled_sigma), pooled_sigma)
        for level, mean in math_means.items()
    }
    math_components = [
        Component(PRIOR_DIFFICULTY["math"][level], math.log(m), s)
        for level, (m, s) in math_laws.items()
    ]
    math_share = PRODUCTION_MIX["math"]
    others = [d for d in PRODUCTION_MIX if d != "math"]
    target = fit_weights_with_fixed_part(
        empirical_summary(output), production, math_components, math_share
    )
    row_sums = np.array([PRODUCTION_MIX[d] for d in others]) / (1 - math_share)
    prior = np.array([[PRIOR_DIFFICULTY[d][level] for level in DIFFICULTIES] for d in others])
    joint = iterative_proportional_fit(prior, row_sums, target)
    difficulty = {d: joint[i] / joint[i].sum() for i, d in enumerate(others)}
    difficulty["math"] = np.array([PRIOR_DIFFICULTY["math"][level] for level in DIFFICULTIES])

    log_prompt = np.log(prompt.values)
    prompt_mu = float(prompt.probs @ log_prompt)
    prompt_sigma = float(np.sqrt(prompt.probs @ (log_prompt - prompt_mu) ** 2))
    alpha, beta = fit_beta(ratio)

    domains = {}
    for name in PRODUCTION_MIX:
        if name == "math":
            laws = math_laws
        else:
            laws = {
                level: (math.exp(c.mu), c.sigma)
                for level, c in zip(DIFFICULTIES, production, strict=True)
            }
        prompt_median, sigma = BENCHMARK_PROMPTS.get(name, (math.exp(prompt_mu), prompt_sigma))
        domains[name] = {
            "difficulty": {
                level: round(float(p), 4)
                for level, p in zip(DIFFICULTIES, difficulty[name], strict=True)
            },
            "output": {
                level: {"median": round(m), "sigma": round(s, 3)} for level, (m, s) in laws.items()
            },
            "prompt": {"median": round(prompt_median), "sigma": round(sigma, 3)},
            "reason_ratio": {"alpha": round(alpha, 3), "beta": round(beta, 3)},
        }
    return {
        "max_output_tokens": MAX_OUTPUT_TOKENS,
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
        "max_model_len": MAX_MODEL_LEN,
        "reason_ratio_mean": round(ratio.mean, 3),
        "mix": dict(PRODUCTION_MIX),
        "domains": domains,
    }


def servegen_summary(directory: str | Path = SERVEGEN_DIR) -> dict[str, float]:
    """Mean and quantiles of ServeGen's pooled output tokens (the fit's target)."""
    return empirical_summary(servegen_aggregate("output_tokens", directory))


def sample_summary(values: np.ndarray) -> dict[str, float]:
    """The same statistics for sampled lengths."""
    quantiles = {f"p{round(q * 100)}": float(np.quantile(values, q)) for q in SUMMARY_QUANTILES}
    return {"mean": float(values.mean()), **quantiles}


def to_yaml(config: Mapping, check: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """The fitted config as commented YAML."""
    lines = [
        "# Reasoning-length laws: GENERATED by `python -m simulator.workload.length_fit --write`; do not edit by hand.",
        "# Per domain: a difficulty mix; per difficulty: output tokens ~ LogNormal(median, sigma) clipped",
        "# to [1, max_output_tokens]; prompt tokens ~ LogNormal per domain; reasoning share ~ Beta(alpha, beta).",
        "# chat/code/science output laws and all reason_ratio laws: fitted to ServeGen DeepSeek-R1 (Apache-2.0);",
        "# math output laws: easy = GSM8K, medium = MATH-500, hard = AIME means for R1-Distill-Qwen-7B (the study);",
        "# math/science prompts: assumed benchmark question lengths. `mix` is the production domain mix (a prior)",
        "# under which the laws reproduce ServeGen. See simulator/workload/length_fit.py for the method.",
    ]
    if check:
        for name, stats in check.items():
            lines.append(f"# {name}: " + ", ".join(f"{k} {v:,.0f}" for k, v in stats.items()))
    lines += [
        f"max_output_tokens: {config['max_output_tokens']}",
        f"max_prompt_tokens: {config['max_prompt_tokens']}",
        "# context window: prompt <= max_model_len - 1, output <= max_model_len - prompt (as vLLM serves)",
        f"max_model_len: {config['max_model_len']}",
        "# reasoning share used when lengths come from a file and workload.reason_ratio is null",
        f"reason_ratio_mean: {config['reason_ratio_mean']}",
        "mix: {" + ", ".join(f"{k}: {v}" for k, v in config["mix"].items()) + "}",
        "domains:",
    ]
    for name, spec in config["domains"].items():
        lines.append(f"  {name}:")
        lines.append(
            "    difficulty: {"
            + ", ".join(f"{k}: {v}" for k, v in spec["difficulty"].items())
            + "}"
        )
        lines.append("    output:")
        for level, law in spec["output"].items():
            lines.append(f"      {level}: {{median: {law['median']}, sigma: {law['sigma']}}}")
        lines.append(
            f"    prompt: {{median: {spec['prompt']['median']}, sigma: {spec['prompt']['sigma']}}}"
        )
        lines.append(
            f"    reason_ratio: {{alpha: {spec['reason_ratio']['alpha']}, beta: {spec['reason_ratio']['beta']}}}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.workload.length_fit", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--servegen", default=SERVEGEN_DIR, help="ServeGen DeepSeek-R1 data directory"
    )
    parser.add_argument("--write", action="store_true", help=f"overwrite {DEFAULT_LENGTHS_PATH}")
    args = parser.parse_args(argv)

    from simulator.workload.lengths import LengthModel

    config = fit(args.servegen)
    model = LengthModel.from_config(config)
    sampled = model.sample(np.random.default_rng(0), 400_000)
    check = {
        "ServeGen output tokens": servegen_summary(args.servegen),
        "these laws at `mix` (400k draws)": sample_summary(sampled.output_tokens),
    }
    text = to_yaml(config, check)
    if args.write:
        DEFAULT_LENGTHS_PATH.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_LENGTHS_PATH.write_text(text)
        print(f"wrote {DEFAULT_LENGTHS_PATH}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
