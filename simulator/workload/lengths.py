"""Request lengths of reasoning workloads: prompt, output and its hidden reasoning part.

Each domain (math, code, science, chat, or any name the config gives) has a
difficulty mix over easy / medium / hard. A request draws its domain from the
workload's domain mix, its difficulty from the domain's mix, then:

- output tokens ~ LogNormal(median, sigma) of its (domain, difficulty),
  rounded and clipped to [1, max_output_tokens];
- prompt tokens ~ LogNormal(median, sigma) of its domain, clipped to
  [1, max_prompt_tokens];
- both then fit the context window ``max_model_len`` as vLLM serves them:
  prompt <= max_model_len - 1, output <= max_model_len - prompt (vLLM's
  default max_tokens), so the default engine never has to reject one;
- reasoning tokens = round(reason_ratio · output), the ratio drawn per request
  from the domain's Beta(alpha, beta) law (or fixed by the caller).

The default parameters live in conf/workload/lengths/reasoning.yaml and are
re-derived by ``python -m simulator.workload.length_fit`` (see that module for how).
Sampling is vectorised: one numpy call per quantity, whatever the size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from simulator.records.errors import ConfigError, require

DIFFICULTIES = ("easy", "medium", "hard")
DEFAULT_LENGTHS_PATH = Path(__file__).resolve().parents[2] / "conf/workload/lengths/reasoning.yaml"


@dataclass(frozen=True)
class LogNormal:
    """A log-normal law given by its median and the sigma of its logarithm."""

    median: float
    sigma: float

    def __post_init__(self) -> None:
        require(
            self.median > 0, "workload.lengths", f"lognormal median must be > 0, got {self.median}"
        )
        require(
            self.sigma >= 0, "workload.lengths", f"lognormal sigma must be >= 0, got {self.sigma}"
        )

    @property
    def mean(self) -> float:
        """Mean of the unclipped law."""
        return self.median * math.exp(self.sigma**2 / 2)


@dataclass(frozen=True)
class BetaLaw:
    """A Beta(alpha, beta) law on [0, 1]."""

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        require(
            self.alpha > 0 and self.beta > 0,
            "workload.lengths",
            f"reason_ratio alpha and beta must be > 0, got {self.alpha}, {self.beta}",
        )

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


@dataclass(frozen=True)
class DomainLengths:
    """The length laws of one domain."""

    difficulty: Mapping[str, float]
    output: Mapping[str, LogNormal]
    prompt: LogNormal
    reason_ratio: BetaLaw


@dataclass(frozen=True)
class SampledLengths:
    """Per-request lengths (numpy columns of equal length)."""

    domain: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    reasoning_tokens: np.ndarray


def parse_mix(value, field: str, allowed: tuple[str, ...]) -> dict[str, float]:
    """A normalised mix from a mapping {name: weight} or a string.

    Strings: ``"math"`` (all math) or ``"math:0.7,chat:0.3"``, which is how a
    mix is replaced from the command line (Hydra merges mappings key by key).
    Names must be in ``allowed``; weights must be >= 0 and sum to > 0.
    """
    if isinstance(value, str):
        mix: dict[str, float] = {}
        for part in value.split(","):
            name, _, weight = part.strip().partition(":")
            try:
                mix[name.strip()] = float(weight) if weight else 1.0
            except ValueError:
                raise ConfigError(
                    field, f"bad weight in {value!r}; use 'name' or 'a:0.7,b:0.3'"
                ) from None
    elif isinstance(value, Mapping) or hasattr(value, "items"):
        mix = {}
        for name, weight in value.items():
            try:
                mix[str(name)] = 0.0 if weight is None else float(weight)
            except (TypeError, ValueError):
                raise ConfigError(
                    f"{field}.{name}", f"weight must be a number, got {weight!r}"
                ) from None
    else:
        raise ConfigError(
            field, f"must be a mapping {{name: weight}} or a string like 'math', got {value!r}"
        )
    unknown = sorted(set(mix) - set(allowed))
    require(not unknown, field, f"unknown names {unknown}; allowed {list(allowed)}")
    weights = np.array(list(mix.values()), dtype=float)
    require(
        bool(np.all(np.isfinite(weights)) and np.all(weights >= 0)),
        field,
        f"weights must be finite and >= 0, got {mix}",
    )
    total = float(weights.sum())
    require(total > 0, field, f"weights must sum to > 0, got {mix}")
    return {name: weight / total for name, weight in mix.items() if weight > 0}


@dataclass(frozen=True)
class LengthModel:
    """Length laws per domain and difficulty (see the module docstring)."""

    domains: Mapping[str, DomainLengths]
    mix: Mapping[str, float]
    max_output_tokens: int = 32768
    max_prompt_tokens: int = 32768
    reason_ratio_mean: float = 0.72
    max_model_len: int = 32768

    @classmethod
    def from_config(cls, cfg: Mapping) -> LengthModel:
        """Build from the ``workload.lengths`` mapping (reasoning.yaml's layout)."""
        field = "workload.lengths"
        require(hasattr(cfg, "get") and "domains" in cfg, field, "needs a 'domains' mapping")
        domains = {}
        for name, spec in cfg["domains"].items():
            where = f"{field}.domains.{name}"
            try:
                output = {
                    k: LogNormal(float(v["median"]), float(v["sigma"]))
                    for k, v in spec["output"].items()
                }
                domains[str(name)] = DomainLengths(
                    difficulty=parse_mix(spec["difficulty"], f"{where}.difficulty", tuple(output)),
                    output=output,
                    prompt=LogNormal(
                        float(spec["prompt"]["median"]), float(spec["prompt"]["sigma"])
                    ),
                    reason_ratio=BetaLaw(
                        float(spec["reason_ratio"]["alpha"]), float(spec["reason_ratio"]["beta"])
                    ),
                )
            except ConfigError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise ConfigError(
                    where,
                    "needs difficulty, output.<difficulty>.{median,sigma}, prompt.{median,sigma} "
                    f"and reason_ratio.{{alpha,beta}} ({type(error).__name__}: {error})",
                ) from None
        require(len(domains) > 0, f"{field}.domains", "is empty")
        max_output = int(cfg.get("max_output_tokens", 32768))
        max_prompt = int(cfg.get("max_prompt_tokens", 32768))
        require(max_output >= 1, f"{field}.max_output_tokens", f"must be >= 1, got {max_output}")
        require(max_prompt >= 1, f"{field}.max_prompt_tokens", f"must be >= 1, got {max_prompt}")
        names = tuple(domains)
        mix = parse_mix(cfg.get("mix") or dict.fromkeys(names, 1.0), f"{field}.mix", names)
        ratio = float(cfg.get("reason_ratio_mean", 0.72))
        require(0 <= ratio <= 1, f"{field}.reason_ratio_mean", f"must lie in [0, 1], got {ratio}")
        context = cfg.get("max_model_len", 32768)
        require(
            isinstance(context, int) and not isinstance(context, bool) and context >= 2,
            f"{field}.max_model_len",
            f"must be an integer >= 2 (prompt + output tokens), got {context!r}",
        )
        return cls(domains, mix, max_output, max_prompt, ratio, context)

    @classmethod
    def default(cls) -> LengthModel:
        """The fitted defaults shipped in conf/workload/lengths/reasoning.yaml."""
        import yaml

        with open(DEFAULT_LENGTHS_PATH) as handle:
            return cls.from_config(yaml.safe_load(handle))

    def with_difficulty(self, domain: str, mix) -> LengthModel:
        """A copy whose ``domain`` uses another difficulty mix (mapping or 'hard' / 'easy:0.5,hard:0.5')."""
        require(
            domain in self.domains,
            "workload.difficulty",
            f"unknown domain {domain!r}; allowed {list(self.domains)}",
        )
        spec = self.domains[domain]
        new = replace(
            spec, difficulty=parse_mix(mix, f"workload.difficulty.{domain}", tuple(spec.output))
        )
        return replace(self, domains={**self.domains, domain: new})

    def sample(
        self,
        rng: np.random.Generator,
        n: int,
        mix: Mapping[str, float] | None = None,
        reason_ratio: float | None = None,
    ) -> SampledLengths:
        """Lengths of n requests whose domains follow ``mix`` (default: the fitted mix).

        ``reason_ratio`` fixes the reasoning share of every request instead of
        drawing it from the domain's law.
        """
        mix = dict(self.mix if mix is None else mix)
        names = list(mix)
        require(
            all(name in self.domains for name in names),
            "workload.domains",
            f"unknown domains {sorted(set(names) - set(self.domains))}; allowed {list(self.domains)}",
        )
        domain_index = rng.choice(len(names), size=n, p=np.array([mix[k] for k in names]))

        # difficulty: per-domain cumulative mixes over the union of difficulty names
        levels = sorted(
            {k for name in names for k in self.domains[name].output}, key=_difficulty_order
        )
        weights = np.array(
            [[self.domains[d].difficulty.get(k, 0.0) for k in levels] for d in names]
        )
        cumulative = np.cumsum(weights, axis=1)
        cumulative[:, -1] = 1.0
        level_index = (rng.random(n)[:, None] > cumulative[domain_index]).sum(axis=1)

        log_median = np.zeros((len(names), len(levels)))
        sigma = np.zeros((len(names), len(levels)))
        for i, d in enumerate(names):
            for j, k in enumerate(levels):
                law = self.domains[d].output.get(k)
                if law is not None:
                    log_median[i, j], sigma[i, j] = math.log(law.median), law.sigma
        output = _lognormal(
            rng,
            log_median[domain_index, level_index],
            sigma[domain_index, level_index],
            self.max_output_tokens,
        )
        prompt_median = np.log([self.domains[d].prompt.median for d in names])
        prompt_sigma = np.array([self.domains[d].prompt.sigma for d in names])
        prompt = _lognormal(
            rng,
            prompt_median[domain_index],
            prompt_sigma[domain_index],
            min(self.max_prompt_tokens, self.max_model_len - 1),
        )
        output = np.minimum(output, self.max_model_len - prompt)
        if reason_ratio is None:
            alpha = np.array([self.domains[d].reason_ratio.alpha for d in names])
            beta = np.array([self.domains[d].reason_ratio.beta for d in names])
            ratio = rng.beta(alpha[domain_index], beta[domain_index])
        else:
            ratio = np.full(n, check_reason_ratio(reason_ratio))
        return SampledLengths(
            domain=np.array(names, dtype=object)[domain_index],
            prompt_tokens=prompt,
            output_tokens=output,
            reasoning_tokens=reasoning_from_ratio(output, ratio),
        )


def _difficulty_order(name: str) -> tuple[int, str]:
    return (DIFFICULTIES.index(name) if name in DIFFICULTIES else len(DIFFICULTIES), name)


def _lognormal(
    rng: np.random.Generator, log_median: np.ndarray, sigma: np.ndarray, upper: int
) -> np.ndarray:
    """Rounded log-normal draws clipped to [1, upper]."""
    values = np.exp(log_median + sigma * rng.standard_normal(len(log_median)))
    return np.clip(np.rint(values), 1, upper).astype(np.int64)


def check_reason_ratio(ratio: float, field: str = "workload.reason_ratio") -> float:
    """The ratio as a float, or ConfigError unless it lies in [0, 1]."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(field, f"must be a number in [0, 1] or null, got {ratio!r}") from None
    require(0.0 <= value <= 1.0, field, f"must lie in [0, 1] (or be null), got {ratio!r}")
    return value


def reasoning_from_ratio(output_tokens: np.ndarray, ratio) -> np.ndarray:
    """round(ratio · output), kept within [0, output]."""
    reasoning = np.rint(np.asarray(ratio, dtype=float) * output_tokens).astype(np.int64)
    return np.clip(reasoning, 0, output_tokens)


def apply_max_tokens(
    output_tokens: np.ndarray, reasoning_tokens: np.ndarray, max_tokens: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Cut outputs at a token budget; the reasoning part is cut within it.

    A request whose reasoning alone reaches the budget ends while still
    thinking: all its output is reasoning and it shows no visible token.
    """
    if check_max_tokens(max_tokens) is None:
        return output_tokens, reasoning_tokens
    output = np.minimum(output_tokens, max_tokens)
    return output, np.minimum(reasoning_tokens, output)


def check_max_tokens(max_tokens: int | None) -> int | None:
    """The budget, or ConfigError unless it is null or a positive integer."""
    require(
        max_tokens is None
        or (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1),
        "workload.max_tokens",
        f"must be a positive integer or null (no budget), got {max_tokens!r}",
    )
    return max_tokens
