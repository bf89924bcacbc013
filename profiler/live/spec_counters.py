"""vLLM's speculative-decoding counters, and the simulator's draft rates derived from them.

vLLM V1 counts, over all requests (vllm/v1/spec_decode/metrics.py, SpecDecodingStats):
``num_drafts`` (decode steps of a request that carried draft tokens), ``num_draft_tokens``,
``num_accepted_tokens`` and ``num_accepted_tokens_per_pos[i]`` (drafts whose position i was
accepted). The server exports them on ``/metrics`` as ``vllm:spec_decode_num_drafts_total``,
``..._num_draft_tokens_total``, ``..._num_accepted_tokens_total`` and
``vllm:spec_decode_num_accepted_tokens_per_pos_total{position="i"}``.

The simulator wants (simulator.records.engine_config.SpeculativeConfig): ``acceptance_rate[i]``, the
chance position i is accepted given positions before it were, which is
``accepted_per_pos[i] / accepted_per_pos[i-1]`` (``/ num_drafts`` for i = 0); and
``proposal_rate``, the share of a request's decode steps that carry a draft (an n-gram drafter
finds no match on the others): ``num_drafts / decode steps``. A request's decode steps are its
generated tokens less its accepted drafts (each step yields one token plus those accepted)
less its first token (which its prefill yields).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from profiler.live.metrics import samples

PREFIX = "vllm:spec_decode_"


@dataclass(frozen=True)
class SpecCounters:
    """vLLM's spec-decode counters, summed over engines (and label sets)."""

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    accepted_per_pos: list[int] = field(default_factory=list)

    def acceptance_given_previous(self) -> list[float]:
        """Per draft position, the share accepted among drafts whose earlier positions were."""
        out, reached = [], self.num_drafts
        for accepted in self.accepted_per_pos:
            out.append(accepted / reached if reached else 0.0)
            reached = accepted
        return out

    def proposal_rate(self, generated_tokens: int, requests: int) -> float:
        """Share of decode steps that carried a draft, given the run's generated tokens and
        finished requests (vllm:generation_tokens_total, request_success_total)."""
        decode_steps = generated_tokens - self.num_accepted_tokens - requests
        return min(1.0, self.num_drafts / decode_steps) if decode_steps > 0 else 0.0

    def minus(self, before: SpecCounters) -> SpecCounters:
        """The counts since ``before`` (two scrapes of the same server)."""
        pos = [a - b for a, b in zip(self.accepted_per_pos,
                                     before.accepted_per_pos or [0] * len(self.accepted_per_pos), strict=False)]
        return SpecCounters(self.num_drafts - before.num_drafts,
                            self.num_draft_tokens - before.num_draft_tokens,
                            self.num_accepted_tokens - before.num_accepted_tokens, pos)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_spec_counters(text: str) -> SpecCounters | None:
    """The counters in a Prometheus ``/metrics`` text (None when the server does no speculation)."""
    totals: dict[str, float] = {}
    per_pos: dict[int, float] = {}
    for metric, labels, value in samples(text):
        if not metric.startswith(PREFIX):
            continue
        name = metric[len(PREFIX):].removesuffix("_total")
        if name == "num_accepted_tokens_per_pos":
            pos = labels.get("position", "")
            if pos.isdigit():
                per_pos[int(pos)] = per_pos.get(int(pos), 0.0) + value
        elif name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            totals[name] = totals.get(name, 0.0) + value
    if "num_drafts" not in totals:
        return None
    positions = [int(per_pos.get(i, 0)) for i in range(max(per_pos) + 1)] if per_pos else []
    return SpecCounters(int(totals["num_drafts"]), int(totals.get("num_draft_tokens", 0)),
                        int(totals.get("num_accepted_tokens", 0)), positions)


def counters_between(first_text: str, last_text: str) -> SpecCounters | None:
    """The counters' increase between two ``/metrics`` pages of one server (None without speculation)."""
    last = parse_spec_counters(last_text)
    if last is None:
        return None
    first = parse_spec_counters(first_text) if first_text else None
    return last.minus(first) if first is not None else last


def counters_from_stats(stats: list[Any]) -> SpecCounters | None:
    """Sum of vLLM SpecDecodingStats objects (the engine core's per-step scheduler stats)."""
    stats = [s for s in stats if s is not None]
    if not stats:
        return None
    width = max(len(s.num_accepted_tokens_per_pos) for s in stats)
    pos = [sum(s.num_accepted_tokens_per_pos[i] for s in stats if i < len(s.num_accepted_tokens_per_pos))
           for i in range(width)]
    return SpecCounters(sum(s.num_drafts for s in stats), sum(s.num_draft_tokens for s in stats),
                        sum(s.num_accepted_tokens for s in stats), pos)
