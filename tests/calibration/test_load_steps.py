"""A served load's logged steps replayed from its requests: each step's batch, worked out by hand
from vLLM's order (prefill in arrival order, a budget-cut prompt goes on next step, decode from the
step after the prefill ends, leave with the last token)."""

from __future__ import annotations

from calibration.load_steps import replayed_batches


def load(requests: list[tuple[float, int, int]], log: list[tuple[int, int, int]], completed=None) -> dict:
    """requests: (arrival, prompt, output); log rows: (ctx_requests, ctx_tokens, gen_requests)."""
    return {"arrival_s": [r[0] for r in requests], "prompt_tokens": [r[1] for r in requests],
            "output_tokens": [r[2] for r in requests],
            "completed": completed or [True] * len(requests),
            "steps": {"ctx_requests": [s[0] for s in log], "ctx_tokens": [s[1] for s in log],
                      "gen_requests": [s[2] for s in log], "gen_tokens": [s[2] for s in log],
                      "elapsed_s": [0.01] * len(log), "kv_usage": [0.0] * len(log)}}


def test_each_step_gets_the_prompt_chunks_and_kv_lengths_vllm_would_run():
    # A (prompt 4, 3 tokens), B (prompt 10, cut 6 + 4 by the budget, 2 tokens), C (prompt 5, 1 token),
    # listed out of arrival order: the replay follows the arrivals
    requests = [(0.5, 10, 2), (0.0, 4, 3), (0.9, 5, 1)]
    log = [(1, 4, 0),   # A prefilled, its first token
           (1, 6, 1),   # A decodes (KV 4 + 1); B's first chunk
           (2, 9, 1),   # A decodes (KV 6) and leaves; B's last chunk (on 6 cached), then C whole
           (0, 0, 1)]   # B decodes (KV 10 + 1) and leaves; C left with its only token
    batches = replayed_batches(load(requests, log))
    assert [b.prefill_tokens for b in batches] == [[4], [6], [4, 5], []]
    assert [b.prefill_context for b in batches] == [[0], [0], [6, 0], []]
    assert [b.decode_context for b in batches] == [[], [5], [6], [11]]


def test_a_log_the_requests_cannot_have_made_is_not_replayed():
    requests = [(0.0, 4, 3), (0.5, 10, 2)]
    good = [(1, 4, 0), (1, 10, 1), (0, 0, 2)]
    assert replayed_batches(load(requests, good)) is not None
    assert replayed_batches(load(requests, [(1, 4, 0), (1, 10, 1), (0, 0, 1)])) is None  # a decoder missing
    assert replayed_batches(load(requests, [(1, 4, 0), (1, 9, 1), (0, 0, 2)])) is None  # prefill tokens off
    assert replayed_batches(load(requests, good, completed=[True, False])) is None  # a request timed out
    assert replayed_batches({"steps": load(requests, good)["steps"]}) is None  # no request records
