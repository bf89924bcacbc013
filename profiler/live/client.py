"""Asyncio streaming client that replays a Workload against an OpenAI-compatible server.

Each request goes out at its arrival time as a streaming ``/v1/completions``
call whose prompt is a list of token ids of exactly the workload's length (no
tokenizer round trip can change it), with ``max_tokens = min_tokens`` = the
workload's output length and ``ignore_eos`` so that the server generates
exactly that many tokens. ``return_token_ids`` makes every chunk say how many
tokens it carries. Requests of one prefix group share their first
``prefix_tokens`` token ids, so prefix caching sees the workload's sharing.

For every request the client records the send time, the arrival time of every
token, the token counts, the status and the error. A malformed chunk is
counted and skipped; it never ends the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from simulator.records.errors import require
from simulator.records.workload import Workload

#: token ids drawn for prompts: regular tokens of any real vocabulary (the tiny
#: model's special tokens are ids 0-4; real models keep theirs at the ends)
DEFAULT_TOKEN_RANGE = (256, 8000)


def prompt_token_ids(workload: Workload, seed: int, token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE
                     ) -> list[list[int]]:
    """Deterministic prompts of the workload's lengths.

    Requests with the same ``prefix_group`` (>= 0) start with the same
    ``prefix_tokens`` ids; everything else is drawn per request, so unrelated
    requests never share a KV block. Different seeds give disjoint-looking
    prompts (use a new seed per run on a reused server to avoid prefix hits
    across runs).
    """
    low, high = token_range
    require(0 <= low < high, "live.token_range", "must be [low, high) with 0 <= low < high")
    rng = np.random.default_rng(seed)
    prefixes: dict[int, np.ndarray] = {}
    prompts = []
    for group, prefix, length in zip(workload.prefix_group.tolist(), workload.prefix_tokens.tolist(),
                                     workload.prompt_tokens.tolist(), strict=True):
        if group >= 0 and prefix > 0:
            shared = prefixes.get(group)
            if shared is None or len(shared) < prefix:
                extra = rng.integers(low, high, prefix - (0 if shared is None else len(shared)))
                shared = extra if shared is None else np.concatenate([shared, extra])
                prefixes[group] = shared
            ids = np.concatenate([shared[:prefix], rng.integers(low, high, length - prefix)])
        else:
            ids = rng.integers(low, high, length)
        prompts.append(ids.astype(int).tolist())
    return prompts


@dataclass
class RequestRecord:
    """What the client saw of one request (times in seconds from the run's start)."""

    request_id: int
    scheduled_s: float
    prompt_tokens: int
    expected_tokens: int
    send_s: float = float("nan")
    first_token_s: float = float("nan")
    last_token_s: float = float("nan")
    end_s: float = float("nan")
    token_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    usage_prompt_tokens: int = -1
    usage_completion_tokens: int = -1
    status: str = "pending"
    error: str = ""
    finish_reason: str = ""
    http_status: int = 0
    malformed_chunks: int = 0

    def fail(self, reason: str, now: float | None = None) -> None:
        """Mark as failed (keeps a reason already given)."""
        if self.status in ("completed", "rejected", "failed"):
            return
        self.status = "failed"
        self.error = self.error or reason
        if now is not None and not np.isfinite(self.end_s):
            self.end_s = now


def parse_sse_line(line: str):
    """One server-sent-events line -> ``"done"``, a JSON object, ``None`` (not data) or
    ``ValueError`` (malformed data; returned, not raised)."""
    line = line.strip()
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return "done"
    try:
        obj = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return ValueError(f"malformed chunk: {err}")
    if not isinstance(obj, dict):
        return ValueError("malformed chunk: not a JSON object")
    return obj


def chunk_tokens(obj: dict) -> tuple[int, str | None, str]:
    """(tokens carried, finish reason or None, error message or '') of one parsed chunk."""
    if "error" in obj and not obj.get("choices"):
        err = obj["error"]
        message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        return 0, None, f"server error in stream: {message}"[:500]
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices:
        return 0, None, ""
    choice = choices[0]
    if not isinstance(choice, dict):
        raise ValueError("malformed chunk: choice is not an object")
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        n = len(ids)
    else:
        n = 1 if (choice.get("text") or choice.get("finish_reason") is None) else 0
    return n, choice.get("finish_reason"), ""


@dataclass
class ReplayConfig:
    """How to replay: server URL, model name, per-request timeout and pacing."""

    url: str
    model: str
    request_timeout_s: float = 600.0
    token_seed: int = 0
    token_range: tuple[int, int] = DEFAULT_TOKEN_RANGE
    lead_s: float = 0.5


class Replay:
    """Replays a workload; ``records`` stays valid (and partial) whatever happens."""

    def __init__(self, workload: Workload, config: ReplayConfig,
                 on_finish: Callable[[RequestRecord], None] | None = None):
        self.workload = workload
        self.config = config
        self.prompts = prompt_token_ids(workload, config.token_seed, config.token_range)
        self.records = [
            RequestRecord(i, float(a), int(p), int(o)) for i, (a, p, o) in enumerate(
                zip(workload.arrival_s, workload.prompt_tokens, workload.output_tokens, strict=True))
        ]
        self.on_finish = on_finish
        self.t0 = 0.0
        self.stop = asyncio.Event()
        self.stop_reason = ""
        self._tasks: set[asyncio.Task] = set()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def request_stop(self, reason: str) -> None:
        """Stop sending; in-flight requests are cancelled and marked failed with ``reason``."""
        if not self.stop.is_set():
            self.stop_reason = reason
            self.stop.set()

    async def run(self, client, t0: float) -> list[RequestRecord]:
        """Send every request at ``t0 + arrival``; returns when all ended or stop was requested."""
        self.t0 = t0
        dispatcher = asyncio.create_task(self._dispatch(client))
        stopper = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait({dispatcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not self.stop.is_set():
                # every request was dispatched: wait for the in-flight ones (or a stop)
                while self._tasks and not self.stop.is_set():
                    await asyncio.wait(self._tasks | {stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (dispatcher, stopper, *self._tasks):
                task.cancel()
            await asyncio.gather(dispatcher, stopper, *self._tasks, return_exceptions=True)
            reason = self.stop_reason or "run ended before the request finished"
            now = self.now()
            for rec in self.records:
                if rec.status == "pending":
                    rec.fail(reason if np.isfinite(rec.send_s) else f"not sent: {reason}", now)
        return self.records

    async def _dispatch(self, client) -> None:
        for rec in self.records:
            delay = rec.scheduled_s - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.stop.is_set():
                return
            task = asyncio.create_task(self._one(client, rec))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _one(self, client, rec: RequestRecord) -> None:
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                await self._stream(client, rec)
        except TimeoutError:
            rec.fail(f"timeout after {self.config.request_timeout_s:g} s "
                     f"({rec.output_tokens} of {rec.expected_tokens} tokens)", self.now())
        except asyncio.CancelledError:
            rec.fail(self.stop_reason or "cancelled", self.now())
            raise
        except Exception as err:  # connection refused/reset, server gone, protocol errors
            rec.fail(f"{type(err).__name__}: {err}"[:500] or type(err).__name__, self.now())
        if self.on_finish is not None and rec.status != "pending":
            self.on_finish(rec)

    async def _stream(self, client, rec: RequestRecord) -> None:
        body = {
            "model": self.config.model,
            "prompt": self.prompts[rec.request_id],
            "max_tokens": rec.expected_tokens,
            "min_tokens": rec.expected_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        }
        rec.send_s = self.now()
        async with client.stream("POST", f"{self.config.url}/v1/completions", json=body) as response:
            rec.http_status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                rec.end_s = self.now()
                rec.error = f"HTTP {response.status_code}: {text.strip()[:300]}"
                rec.status = "rejected" if response.status_code == 400 else "failed"
                return
            done = False
            async for line in response.aiter_lines():
                parsed = parse_sse_line(line)
                if parsed is None:
                    continue
                if parsed == "done":
                    done = True
                    break
                if isinstance(parsed, ValueError):
                    rec.malformed_chunks += 1
                    continue
                try:
                    n, finish, error = chunk_tokens(parsed)
                except (ValueError, TypeError, AttributeError):
                    rec.malformed_chunks += 1
                    continue
                if error:
                    rec.error = error
                    continue
                usage = parsed.get("usage")
                if isinstance(usage, dict):
                    with contextlib.suppress(TypeError, ValueError):
                        rec.usage_prompt_tokens = int(usage.get("prompt_tokens", -1))
                        rec.usage_completion_tokens = int(usage.get("completion_tokens", -1))
                if n:
                    t = self.now()
                    if rec.output_tokens == 0:
                        rec.first_token_s = t
                    rec.token_times.extend([t] * n)
                    rec.output_tokens += n
                    rec.last_token_s = t
                if finish:
                    rec.finish_reason = str(finish)
        rec.end_s = self.now()
        if rec.error:
            rec.status = "failed"
        elif not done and not rec.finish_reason:
            rec.status = "failed"
            rec.error = f"stream ended early ({rec.output_tokens} of {rec.expected_tokens} tokens)"
        else:
            rec.status = "completed"
            if rec.output_tokens != rec.expected_tokens:
                rec.error = f"got {rec.output_tokens} tokens, expected {rec.expected_tokens}"


def http_client(request_timeout_s: float):
    """An httpx.AsyncClient without a connection cap (one stream per request in flight)."""
    import httpx

    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
        timeout=httpx.Timeout(connect=10.0, read=request_timeout_s, write=30.0, pool=None),
        trust_env=False,
    )


async def served_model(client, url: str) -> str:
    """The model id the server serves (first entry of /v1/models)."""
    response = await client.get(f"{url}/v1/models", timeout=10.0)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])
