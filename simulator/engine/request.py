"""The simulator's per-request state, as vLLM's Request tracks it."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED = 3
    REJECTED = 4
    ABORTED = 5  # the client gave up (its timeout): left the engine unfinished, blocks freed


class SimRequest:
    """One request inside the engine.

    ``num_computed`` counts tokens whose KV is (or is being) computed;
    ``num_output`` counts output tokens delivered. Under async scheduling
    ``placeholders`` counts tokens sampled by steps still in flight.
    """

    __slots__ = (
        "rid", "arrival_s", "num_prompt", "max_tokens", "reasoning_tokens",
        "prefix_group", "prefix_tokens", "block_size", "num_shared_blocks", "outer_group", "num_outer_blocks",
        "status", "num_output", "num_computed", "placeholders", "spec_tokens",
        "in_flight_tokens", "stale_tokens", "num_preemptions", "num_cached_tokens",
        "first_scheduled_s", "first_token_s", "first_visible_s", "last_token_s",
        "finish_s", "reject_reason",
    )

    @classmethod
    def from_workload(cls, workload, rid: int, arrival_s: float, block_size: int) -> SimRequest:
        """Request ``rid`` of a workload's columns (simulator.records.workload.Workload), arriving at ``arrival_s``."""
        w = workload
        return cls(rid, arrival_s, int(w.prompt_tokens[rid]), int(w.output_tokens[rid]), int(w.reasoning_tokens[rid]),
                   int(w.prefix_group[rid]), int(w.prefix_tokens[rid]), block_size, int(w.outer_group[rid]),
                   int(w.outer_tokens[rid]))

    def __init__(
        self,
        rid: int,
        arrival_s: float,
        num_prompt: int,
        max_tokens: int,
        reasoning_tokens: int = 0,
        prefix_group: int = -1,
        prefix_tokens: int = 0,
        block_size: int = 16,
        outer_group: int = -1,
        outer_tokens: int = 0,
    ):
        self.rid = rid
        self.arrival_s = arrival_s
        self.num_prompt = num_prompt
        self.max_tokens = max_tokens
        self.reasoning_tokens = reasoning_tokens
        self.prefix_group = prefix_group
        self.prefix_tokens = prefix_tokens if prefix_group >= 0 else 0
        self.block_size = block_size
        # Content names of the request's KV blocks (the prefix cache's hashes): block i
        # is ("prefix", prefix_group, i), shared with the group, while it lies wholly in
        # the shared prefix (i < num_shared_blocks), else (rid, i), private.
        self.num_shared_blocks = self.prefix_tokens // block_size
        # Two-level sharing: the first outer_tokens of the prefix are those of another group's
        # prefix (a system prompt many groups start with); those blocks carry that group's names.
        self.outer_group = outer_group if self.prefix_group >= 0 else -1
        self.num_outer_blocks = min(outer_tokens, self.prefix_tokens) // block_size if self.outer_group >= 0 else 0
        self.status = Status.WAITING
        self.num_output = 0
        self.num_computed = 0
        self.placeholders = 0
        self.spec_tokens = 0
        self.in_flight_tokens = 0
        self.stale_tokens = 0
        self.num_preemptions = 0
        self.num_cached_tokens = -1
        self.first_scheduled_s = -1.0
        self.first_token_s = -1.0
        self.first_visible_s = -1.0
        self.last_token_s = -1.0
        self.finish_s = -1.0
        self.reject_reason = ""

    def shared_name(self, i: int) -> tuple[int, int]:
        """Content name of shared block i (< num_shared_blocks): the outer group's below
        num_outer_blocks, else the request's own group's."""
        if i < self.num_outer_blocks:
            return (self.outer_group, i)
        return (self.prefix_group, i)

    @property
    def num_tokens(self) -> int:
        """Prompt plus delivered output tokens."""
        return self.num_prompt + self.num_output

    def __repr__(self) -> str:
        return (
            f"SimRequest(rid={self.rid}, status={self.status.name}, prompt={self.num_prompt}, "
            f"out={self.num_output}/{self.max_tokens}, computed={self.num_computed})"
        )
