"""vLLM's scheduling rules, written once.

The step-by-step scheduler (simulator.engine.native), the steady decoders
(simulator.engine.steady) and the runs of steps (simulator.engine.fast_forward) all call
these; they differ only in how many steps one call covers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from simulator.engine.request import SimRequest
from simulator.records.engine_config import EngineConfig
from simulator.records.performance import KVCapacity


def running_tokens(req: SimRequest, threshold: int, max_model_len: int) -> int:
    """Tokens vLLM schedules for a running request, before the step's budget (0: none).

    All its uncomputed tokens (drafts and async placeholders included), at most
    ``threshold`` (long_prefill_token_threshold, 0: none) and never the last slot
    of max_model_len; none when the step in flight already reaches max_tokens.
    """
    computed, placeholders = req.num_computed, req.placeholders
    if placeholders > 0 and computed + 2 - placeholders >= req.num_prompt + req.max_tokens:
        return 0
    n = req.num_prompt + req.num_output + req.spec_tokens + placeholders - computed
    if 0 < threshold < n:
        n = threshold
    room = max_model_len - computed - 1
    if room < n:
        n = room
    return n if n > 0 else 0


def decodes_one_token(req: SimRequest, lag: int) -> bool:
    """Whether a running request's next step is a plain one-token decode: every token computed
    but the last (with a step in flight, ``lag`` 1: every one, the step's sampled token a
    placeholder), no draft tokens, no output of a preempted step pending."""
    return (req.placeholders == lag and not req.stale_tokens and not req.spec_tokens
            and req.num_computed == req.num_prompt + req.num_output - 1 + lag)


def draft_tokens(req: SimRequest, num_speculative_tokens: int, max_model_len: int,
                 proposes: Callable[[], bool]) -> int:
    """Draft tokens the drafter gives a running request for its next step: up to
    ``num_speculative_tokens``, never past the last slot of max_model_len; none where it finds
    no proposal (``proposes()`` False: n-gram may find none; asked only where a draft fits)."""
    room = max_model_len - req.num_tokens - 1
    return min(num_speculative_tokens, room) if room > 0 and proposes() else 0


def slots_needed(computed: int, num_new: int, lookahead: int, max_model_len: int) -> int:
    """Token slots a request must hold to run ``num_new`` tokens after ``computed`` (vLLM's
    allocate_slots: computed + new + lookahead, at most max_model_len)."""
    n = computed + num_new + lookahead
    return n if n < max_model_len else max_model_len


# vLLM's admission gate for a waiting request is both of the next two: a seat, and the KV
# blocks of its whole sequence.


def has_seat(num_running: int, max_num_seqs: int) -> bool:
    """Whether one more request may run (max_num_seqs)."""
    return num_running < max_num_seqs


def fits_whole(blocks_needed: int, free_blocks: int) -> bool:
    """Whether the blocks of a request's whole sequence are free (scheduler_reserve_full_isl)."""
    return blocks_needed <= free_blocks


def deliver_tokens(req: SimRequest, count: int, times: Sequence[float], start: int = 0) -> None:
    """``count`` output tokens reach ``req``, token i at ``times[start + i]`` (a sequence or
    a numpy array): its first token, first visible token (after its reasoning) and last
    token times follow."""
    num_output = req.num_output
    if num_output == 0:
        req.first_token_s = float(times[start])
    if req.first_visible_s < 0:
        j = req.reasoning_tokens - num_output  # the first visible token's index
        if 0 <= j < count:
            req.first_visible_s = float(times[start + j])
    req.num_output = num_output + count
    req.last_token_s = float(times[start + count - 1])


def admission_error(prompt: int, max_tokens: int, config: EngineConfig, kv: KVCapacity) -> str:
    """Why a request can never run, or '' if it can."""
    if prompt + max_tokens > config.max_model_len:
        return f"prompt+max_tokens={prompt + max_tokens} exceeds max_model_len={config.max_model_len}"
    capacity = (kv.num_blocks - 1) * kv.block_size
    if prompt + max_tokens > capacity:
        return f"prompt+max_tokens={prompt + max_tokens} exceeds the KV cache ({capacity} tokens)"
    return ""
