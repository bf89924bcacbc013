"""The batch each logged step of a served load ran, replayed from its requests.

A server's iteration log gives every step's batch (requests and tokens prefilled,
requests decoded), its elapsed time and the KV usage, but the usage is rounded to a
thousandth of the cache: on a large cache that is hundreds to thousands of tokens, as
much as a light load's whole context. The load's requests (arrival order, prompt and
output lengths) and the log's counts say which requests each step ran: requests are
prefilled in arrival order (a prompt the token budget cuts goes on in the next steps),
decode once a step from the step after their prefill ends, and leave with their last
token. Replaying that gives each step's batch: its exact KV lengths, and the prompt chunks
of the steps that prefill (the log gives only their sum). The replay is checked
against the log (decoders in every step, prefill tokens of every step); a load it does
not fit (preemptions, timed-out requests) gives None and the caller keeps the usage.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from simulator.records.performance import StepBatch

#: steps whose logged counts may disagree with the replay before it is not trusted
MAX_MISMATCH_SHARE = 0.01


@dataclass
class _Running:
    """A request in the replay: its prompt, the prompt tokens prefilled, tokens generated."""

    prompt: int
    output: int
    prefilled: int = 0
    generated: int = 0


def replayed_batches(load: dict) -> list[StepBatch] | None:
    """Per logged step, the batch it ran: the prompt chunks it prefilled (on the chunks
    before them) and the KV length of each request it decoded (prompt plus tokens generated).
    None when the load has no request records, a request did not complete, or over
    MAX_MISMATCH_SHARE of the steps' logged counts disagree with the replay."""
    steps = load.get("steps")
    if not steps or not load.get("arrival_s") or not all(load.get("completed") or [False]):
        return None
    order = np.argsort(np.asarray(load["arrival_s"], float), kind="stable")
    queue = deque(_Running(int(load["prompt_tokens"][i]), int(load["output_tokens"][i])) for i in order)
    ctx_requests = np.asarray(steps["ctx_requests"], int)
    ctx_tokens = np.asarray(steps["ctx_tokens"], int)
    gen_requests = np.asarray(steps["gen_requests"], int)
    batches: list[StepBatch] = []
    prefilling: list[_Running] = []
    decoding: list[_Running] = []
    mismatches = 0
    for wanted, tokens, decoders in zip(ctx_requests, ctx_tokens, gen_requests, strict=True):
        while len(prefilling) < wanted and queue:
            prefilling.append(queue.popleft())
        batch = StepBatch(decode_context=[r.prompt + r.generated for r in decoding])
        budget = int(tokens)
        chunked = prefilling[:wanted]
        for r in chunked:
            take = min(r.prompt - r.prefilled, budget)
            batch.prefill_tokens.append(take)
            batch.prefill_context.append(r.prefilled)
            r.prefilled += take
            budget -= take
        batches.append(batch)
        mismatches += int(len(decoding) != decoders or budget != 0 or len(chunked) != wanted)
        for r in decoding:
            r.generated += 1
        done = [r for r in chunked if r.prefilled >= r.prompt]
        for r in done:
            r.generated = 1
        prefilling = [r for r in prefilling if r.prefilled < r.prompt]
        decoding = [r for r in decoding + done if r.generated < r.output]
    if mismatches > MAX_MISMATCH_SHARE * len(batches):
        return None
    return batches
