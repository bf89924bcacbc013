"""How each kind of grid point is driven through the engine, step by step.

Every function adds requests, steps the engine until the point is measured and
returns the steps' rows labelled with phase and repeat. A measured step that
another process disturbed (see EngineSession.step) is measured again, up to
RETRY_FACTOR times the repeats in all; disturbed rows stay in the table, flagged.
Steps that only build up context ("fill") are kept too: they are real steps
with a known batch.
Long contexts come cheap through the prefix cache: prompts are prefixes of
seeded token streams (profiler.prompts), so a context computed for one point is
found in the cache by the next one that needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from profiler.engine import EngineSession
from profiler.grid import GridPoint, GridSpec
from profiler.prompts import TokenStreams

CONTEXT_STREAM = "ctx"
#: a measurement disturbed by another process is repeated, up to this many times the repeats in all
RETRY_FACTOR = 2


class PhaseRunner:
    """Runs grid points on one engine session."""

    def __init__(self, session: EngineSession, streams: TokenStreams, grid: GridSpec, first_step: int = 0):
        self.session = session
        self.streams = streams
        self.grid = grid
        self.step_no = first_step
        #: stream key -> tokens of it computed (hence in the prefix cache, unless evicted)
        self.primed: dict[str, int] = {}
        #: token counts of the steps this process ran (its engine has set up their shapes)
        self.seen_tokens: set[int] = set()
        self.num_spec = 0
        spec = session.vllm_config.speculative_config
        if spec is not None:
            self.num_spec = int(getattr(spec, "num_speculative_tokens", 0) or 0)

    # --- helpers ---------------------------------------------------------------
    def _step(self, phase: str, rep: int, point_id: str) -> dict[str, Any] | None:
        row = self.session.step()
        if row is None:
            return None
        self.seen_tokens.add(int(row["num_tokens"]))
        row.update(point_id=point_id, phase=phase, rep=rep, step=self.step_no)
        self.step_no += 1
        return row

    def _finish(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for row in rows:
            row.pop("_prefill_ids", None)
            row.pop("_decode_ids", None)
        return rows

    def _expected_hit(self, key: str, wanted: int) -> int:
        if not self.session.prefix_caching:
            return 0
        block = self.session.block_size
        return (min(self.primed.get(key, 0), wanted) // block) * block

    def _prime(self, key: str, tokens: int) -> None:
        self.primed[key] = max(self.primed.get(key, 0), tokens)

    def _fill_steps(self, prompts: list[list[int]]) -> int:
        """Steps the engine may need to prefill prompts (early finishers decode meanwhile)."""
        return -(-sum(len(p) for p in prompts) // max(1, self.session.default_budget)) + 1

    def _drain(self, point_id: str, rows: list[dict[str, Any]], phase: str = "fill") -> None:
        while self.session.has_unfinished():
            row = self._step(phase, -1, point_id)
            if row is not None:
                rows.append(row)

    def _unrecorded_step(self) -> None:
        row = self.session.step()
        if row is not None:
            self.seen_tokens.add(int(row["num_tokens"]))

    # --- warm-up -----------------------------------------------------------------
    def warm_up(self, max_chunk: int, max_batch: int) -> None:
        """Run the largest prefill and decode batch once (allocations, kernel set-up); not recorded."""
        session = self.session
        chunk = max(1, min(max_chunk, session.default_budget, session.vllm_config.model_config.max_model_len - 8))
        session.add(self.streams.tokens("warmup/prefill", chunk), max_tokens=2, tag="w")
        while session.has_unfinished():
            self._unrecorded_step()
        ids = [session.add(self.streams.tokens(f"warmup/{i}", 16), max_tokens=4, tag="w")
               for i in range(max(1, min(max_batch, session.vllm_config.scheduler_config.max_num_seqs)))]
        while session.has_unfinished():
            self._unrecorded_step()
        del ids
        for i in range(max_batch):
            self.streams.forget(f"warmup/{i}")

    # --- phases ------------------------------------------------------------------
    def run(self, point: GridPoint) -> list[dict[str, Any]]:
        handler = getattr(self, f"_run_{point.phase}")
        try:
            rows = handler(point)
        finally:
            self.session.set_token_budget(None)
            self.session.forget_finished()
        return self._finish(rows)

    def _run_prefill(self, point: GridPoint) -> list[dict[str, Any]]:
        """One request per repeat: ``chunk`` new tokens on top of ``context`` cached ones."""
        chunk, context = point.param("chunk"), point.param("context")
        session, rows = self.session, []
        clean, rep = 0, 0
        while clean < self.grid.repeats and rep < RETRY_FACTOR * self.grid.repeats:
            key = f"suffix/{point.point_id}/{rep}"
            prompt = self.streams.tokens(CONTEXT_STREAM + "0", context) + self.streams.tokens(key, chunk)
            self.streams.forget(key)
            req_id = session.add(prompt, max_tokens=1, tag="p")
            first = True
            while session.has_unfinished():
                request = session.request(req_id)
                done = self._expected_hit(CONTEXT_STREAM + "0", context) if first else (
                    request.num_computed_tokens if request is not None else context)
                session.set_token_budget(context - done if done < context else chunk)
                first = False
                row = self._step("fill", -1, point.point_id)
                if row is None:
                    continue
                if req_id in row["_prefill_ids"]:
                    i = row["_prefill_ids"].index(req_id)
                    if row["prefill_context"][i] == context and row["prefill_tokens"][i] == chunk:
                        row.update(phase="prefill", rep=rep)
                        clean += not row["disturbed"]
                rows.append(row)
            self._prime(CONTEXT_STREAM + "0", context)
            rep += 1
        return rows

    def _decode_batch(self, point: GridPoint, phase: str, prompts: list[list[int]], steps: int,
                      max_tokens: int) -> list[dict[str, Any]]:
        session, rows = self.session, []
        ids = [session.add(p, max_tokens=max_tokens, tag="d") for p in prompts]
        wanted = set(ids)
        # fill: until every request of the point decodes in the same step
        while session.has_unfinished():
            row = self._step("fill", -1, point.point_id)
            if row is None:
                continue
            rows.append(row)
            if set(row["_decode_ids"]) >= wanted and not row["_prefill_ids"]:
                row.update(phase="warmup", rep=-1)  # first decode step of the batch
                break
        measured = clean = 0
        while session.has_unfinished() and clean < steps and measured < RETRY_FACTOR * steps:
            row = self._step(phase, measured, point.point_id)
            if row is None:
                continue
            if not (set(row["_decode_ids"]) >= wanted and not row["_prefill_ids"]):
                row.update(phase="fill", rep=-1)
            else:
                measured += 1
                clean += not row["disturbed"]
            rows.append(row)
        session.abort(ids)
        self._drain(point.point_id, rows)
        return rows

    def _run_decode(self, point: GridPoint) -> list[dict[str, Any]]:
        """``batch`` requests each with ``context`` prompt tokens, decoding together."""
        batch, context = point.param("batch"), point.param("context")
        prompts = [self.streams.tokens(f"{CONTEXT_STREAM}{i}", context) for i in range(batch)]
        rows = self._decode_batch(point, "decode", prompts, self.grid.repeats,
                                  RETRY_FACTOR * self.grid.repeats + 3 + self._fill_steps(prompts))
        for i in range(batch):
            self._prime(f"{CONTEXT_STREAM}{i}", context)
        return rows

    def _run_spec(self, point: GridPoint) -> list[dict[str, Any]]:
        """Decoding with speculative drafts: repetitive prompts give the n-gram drafter matches."""
        batch, context = point.param("batch"), point.param("context")
        spec = self.grid.spec
        prompts = [self.streams.repetitive(f"spec/{i}", context, spec.pattern_tokens) for i in range(batch)]
        max_tokens = (RETRY_FACTOR * spec.steps + self._fill_steps(prompts)) * (self.num_spec + 1) + 8
        return self._decode_batch(point, "spec", prompts, spec.steps, max_tokens)

    def _run_prefix(self, point: GridPoint) -> list[dict[str, Any]]:
        """A shared prefix: the first request computes it (rep 0), the others find it cached."""
        prefix, suffix = point.param("prefix"), point.param("suffix")
        session, rows = self.session, []
        key = f"prefix/{point.point_id}"
        for rep in range(1 + self.grid.prefix.requests_per_prefix):
            skey = f"{key}/suffix{rep}"
            prompt = self.streams.tokens(key, prefix) + self.streams.tokens(skey, suffix)
            self.streams.forget(skey)
            session.add(prompt, max_tokens=1, tag="x")
            while session.has_unfinished():
                row = self._step("prefix", rep, point.point_id)
                if row is not None:
                    rows.append(row)
        self.streams.forget(key)
        return rows

    def _run_mixed(self, point: GridPoint) -> list[dict[str, Any]]:
        """A small workload arriving in waves; the scheduler builds mixed batches as it likes."""
        spec = self.grid.mixed
        rng = np.random.default_rng([self.streams.seed, 7])
        n = point.param("requests")
        prompts = rng.integers(spec.prompt_tokens[0], spec.prompt_tokens[1] + 1, size=n)
        outputs = rng.integers(spec.output_tokens[0], spec.output_tokens[1] + 1, size=n)
        session, rows, added, steps = self.session, [], 0, 0
        while added < n or session.has_unfinished():
            if added < n and steps % max(1, spec.wave_every_steps) == 0:
                for _ in range(min(spec.wave_size, n - added)):
                    key = f"mixed/{added}"
                    session.add(self.streams.tokens(key, int(prompts[added])), int(outputs[added]), tag="m")
                    self.streams.forget(key)
                    added += 1
            row = self._step("mixed", 0, point.point_id)
            steps += 1
            if row is not None:
                rows.append(row)
        return rows

    def _run_shapes(self, point: GridPoint) -> list[dict[str, Any]]:
        """A prefill of ``tokens`` fresh tokens (no cache hit), then ``warm_repeats`` more of the same
        count: the first is ``shape_cold`` unless this process already ran a step of that count."""
        tokens = point.param("tokens")
        session, rows = self.session, []
        cold = tokens not in self.seen_tokens
        for rep in range(1 + self.grid.shapes.warm_repeats):
            key = f"{point.point_id}/{rep}"
            req_id = session.add(self.streams.tokens(key, tokens), max_tokens=1, tag="s")
            self.streams.forget(key)
            while session.has_unfinished():
                row = self._step("warmup", -1, point.point_id)  # a step other than the measured one
                if row is None:
                    continue
                if row["_prefill_ids"] == [req_id] and row["num_tokens"] == tokens and not row["_decode_ids"]:
                    row.update(phase="shape_cold" if rep == 0 and cold else "shape_warm", rep=rep)
                rows.append(row)
        return rows
