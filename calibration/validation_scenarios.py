"""Validation scenarios on the tiny model and a CPU: a workload plus the engine settings.

Each scenario is small enough for a 2-core machine and built to stress one
thing the simulator must get right. The rates are those of the host of the
shipped tiny-llama CPU profile; ``calibration validate`` spreads a scenario's
arrivals on a host whose server is markedly slower (calibration/scenario_pace.py):

- ``ci-reasoning``: the CI end-to-end test. Outputs long relative to prompts
  (reasoning-like), Gamma arrivals with cv 2, and a KV cache of 64 blocks of
  32 tokens so that preemptions happen. About 20 s per live run.
- ``light``: light load, no KV pressure (150 requests).
- ``saturation``: arrivals faster than service and a small KV cache:
  queueing and many preemptions (120 requests).
- ``prefix``: groups of requests sharing long prompt prefixes, with prefix
  caching on.
- ``spec``: n-gram speculative decoding (4 draft tokens) at moderate load. The
  profile is taken with ``optimization=spec_ngram`` (verify steps priced), and
  the simulator is given the draft acceptance the live runs measured: how often
  drafts are accepted depends on the model and the text, not on the serving
  system; what is validated is latency and memory given it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.workload import Workload
from simulator.workload.arrivals import gamma_arrivals

#: vLLM 0.32 CPU server settings shared by the scenarios (block 32: 16 is refused on CPU)
CPU_ENGINE = {"block_size": 32, "max_num_seqs": 128, "max_num_batched_tokens": 2048,
              "max_model_len": 1024, "enable_prefix_caching": True, "enable_chunked_prefill": True}


@dataclass(frozen=True)
class Scenario:
    """A workload recipe and engine settings for one validation case."""

    name: str
    description: str
    num_requests: int
    rate: float
    cv: float
    prompt_tokens: tuple[int, int]
    output_median: int
    output_sigma: float
    output_range: tuple[int, int]
    reason_ratio: float = 0.8
    prefix_groups: int = 0
    prefix_tokens: int = 0
    engine: dict = field(default_factory=dict)
    seed: int = 1
    optimization: str = "none"  # the profiler's optimization for this scenario's profile

    def workload(self, num_requests: int | None = None, seed: int | None = None) -> Workload:
        """The scenario's workload (deterministic for a seed)."""
        n = int(num_requests or self.num_requests)
        rng = np.random.default_rng(self.seed if seed is None else seed)
        arrival = gamma_arrivals(rng, self.rate, self.cv, n)
        lo, hi = self.prompt_tokens
        prompt = rng.integers(lo, hi + 1, n)
        out_lo, out_hi = self.output_range
        output = np.clip(np.rint(rng.lognormal(np.log(self.output_median), self.output_sigma, n)),
                         out_lo, out_hi).astype(np.int64)
        group = np.full(n, -1, np.int64)
        prefix = np.zeros(n, np.int64)
        if self.prefix_groups:
            group = rng.integers(0, self.prefix_groups, n)
            prefix = np.full(n, self.prefix_tokens, np.int64)
            prompt = prompt + self.prefix_tokens
        return Workload(
            arrival_s=arrival,
            prompt_tokens=prompt,
            output_tokens=output,
            reasoning_tokens=np.floor(output * self.reason_ratio).astype(np.int64),
            domain=np.full(n, "math", object),
            prefix_group=group,
            prefix_tokens=prefix,
            name=self.name,
            seed=self.seed if seed is None else seed,
        )

    def engine_config(self, **overrides) -> EngineConfig:
        """EngineConfig for both the live server and the simulator."""
        return EngineConfig.from_dict({**CPU_ENGINE, **self.engine, **overrides})

    def scaled(self, num_requests: int) -> Scenario:
        return replace(self, num_requests=num_requests)


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("ci-reasoning", "reasoning-like outputs, Gamma cv 2, 64 KV blocks: preemptions",
                 num_requests=60, rate=3.0, cv=2.0, prompt_tokens=(16, 96), output_median=250,
                 output_sigma=0.5, output_range=(64, 700),
                 engine={"num_gpu_blocks_override": 64}, seed=2),
        Scenario("light", "light load, no KV pressure", num_requests=150, rate=2.0, cv=1.0,
                 prompt_tokens=(32, 256), output_median=160, output_sigma=0.5, output_range=(32, 512),
                 engine={"num_gpu_blocks_override": 1024}),
        Scenario("saturation", "arrivals beyond service rate, 64 KV blocks: queueing and preemptions",
                 num_requests=120, rate=8.0, cv=2.0, prompt_tokens=(16, 128), output_median=300,
                 output_sigma=0.5, output_range=(64, 800),
                 engine={"num_gpu_blocks_override": 64}),
        Scenario("prefix", "5 groups sharing 512-token prompt prefixes, prefix caching on",
                 num_requests=100, rate=3.0, cv=1.5, prompt_tokens=(16, 64), output_median=120,
                 output_sigma=0.5, output_range=(32, 300), prefix_groups=5, prefix_tokens=512,
                 engine={"num_gpu_blocks_override": 512}),
        Scenario("spec", "n-gram speculative decoding, 4 draft tokens, moderate load",
                 num_requests=100, rate=2.0, cv=1.5, prompt_tokens=(32, 256), output_median=160,
                 output_sigma=0.5, output_range=(32, 512),
                 engine={"num_gpu_blocks_override": 1024,
                         # acceptance as the shipped spec_ngram CPU profile measured it; validation
                         # replaces it with what the live runs measured (--spec-acceptance)
                         "speculative": {"method": "ngram", "num_speculative_tokens": 4,
                                         "acceptance_rate": [0.93], "proposal_rate": 0.4}},
                 optimization="spec_ngram"),
    )
}


def get_scenario(name: str) -> Scenario:
    """The named scenario, or a ConfigError listing the known ones."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise ConfigError("scenario", f"unknown scenario {name!r}; allowed: {', '.join(SCENARIOS)}") from None
