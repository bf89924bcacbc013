"""Prefill/decode disaggregation: the KV transfer between the pools.

A prefill replica computes the prompt (the request with max_tokens=1, as vLLM's
disaggregated proxy sends it); its KV then crosses the link to a decode replica,
which the decode pool's router chooses when the transfer ends; the request joins
that replica's queue then, its prompt's KV waiting in the prefix cache (named
for the request alone, so only it hits), and the decode replica computes the
last prompt token (vLLM recomputes at least one) and generates the output.

The transfer takes prompt tokens x KV bytes per token per GPU / the link's
bandwidth (GB/s per GPU: with tensor parallelism each GPU sends its own shard
over its own link, at the same time).

TTFT, as vLLM's benchmark client measures it through the disaggregated proxy:
from the request's arrival to the first output token streamed by the decode
replica, so it holds the prefill replica's queue and prefill, the transfer,
the decode replica's queue and its first step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Transfer:
    """The KV link between the pools."""

    bytes_per_token: int  # KV bytes per prompt token per GPU (the prefill replicas')
    link_gbps: float  # GB/s per GPU
    min_prompt: int  # the shortest prompt of the workload (bounds how soon a transfer can end)
    group_base: int  # prefix-cache groups of transferred prompts: group_base + request id

    def seconds(self, prompt_tokens: int) -> float:
        """How long the KV of a prompt takes over the link."""
        return prompt_tokens * self.bytes_per_token / (self.link_gbps * 1e9)

    @property
    def min_seconds(self) -> float:
        """The shortest transfer of the workload (> 0)."""
        return self.seconds(max(self.min_prompt, 1))
