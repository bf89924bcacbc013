"""One live run: replay a Workload on a vLLM server and write the simulator's schema.

``run_live`` starts a server (or uses one already running, or attaches to a
URL), warms it up, replays the workload with the streaming client while it
scrapes /metrics and collects the per-iteration log, and writes into the run
directory:

- ``requests.parquet``, ``timeline.parquet``, ``summary.json``: the same
  schema as a simulated run (see profiler.live.tables for what is estimated);
- ``steps.parquet``: the server's iteration log, one row per engine step;
- ``metrics.parquet``: the /metrics samples;
- ``tokens.parquet``: every token's arrival time;
- ``workload.parquet``, ``server.log``, ``machine.json`` (machine state before
  and after: load average and other busy processes).

Faults: a server that dies ends the run (what finished is kept, the rest is
marked failed with the reason); a request past its timeout fails alone;
SIGINT/SIGTERM stop the run and the partial results are written. The exit
code says which (0 ok, 1 some requests failed, 3 server died, 130 interrupted).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from profiler.live import client as live_client
from profiler.live.iteration_log import IterationRecord, parse_line, steps_table
from profiler.live.loopback import check_loopback_url
from profiler.live.machine import CpuWatch, machine_state
from profiler.live.metrics import MetricsScraper, parse_labels
from profiler.live.server import LogLine, ServerError, ServerSpec, VllmServer, descendants
from profiler.live.spec_counters import counters_between
from profiler.live.tables import live_result, token_columns
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.metrics import SLO
from simulator.records.run_result import RunResult
from simulator.records.workload import Workload

EXIT_OK, EXIT_FAILED_REQUESTS, EXIT_SERVER_DIED, EXIT_INTERRUPTED = 0, 1, 3, 130


@dataclass(frozen=True)
class LiveRunConfig:
    """Client-side settings of one live run."""

    request_timeout_s: float = 600.0
    scrape_interval_s: float = 0.5
    token_seed: int = 0
    warmup_requests: int = 2
    overhead_probes: int = 5
    prefill_probes: int = 3
    lead_s: float = 1.0
    settle_s: float = 1.0
    idle_timeout_s: float = 120.0
    slo: SLO = field(default_factory=SLO)


@dataclass
class LiveOutcome:
    """What a live run produced and how it ended."""

    result: RunResult
    out_dir: Path
    exit_code: int
    message: str


class IterationCollector:
    """Thread-safe sink for the server's iteration-log lines, time-stamped on arrival."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.records: list[tuple[float, IterationRecord]] = []
        self.lines_seen = 0

    def feed(self, line: LogLine) -> None:
        rec = parse_line(line.text)
        if rec is not None:
            with self._lock:
                self.records.append((line.t, rec))

    def between(self, start: float, end: float) -> list[tuple[float, IterationRecord]]:
        with self._lock:
            return [(t, r) for t, r in self.records if start <= t <= end]


class LogTailer:
    """Follows a server log file written by someone else (attach mode)."""

    def __init__(self, path: Path, sink: IterationCollector) -> None:
        self.path, self.sink = path, sink
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-tail", daemon=True)

    def start(self) -> LogTailer:
        self._thread.start()
        return self

    def _run(self) -> None:
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            handle.seek(0, 2)
            while not self._stop.is_set():
                line = handle.readline()
                if line:
                    self.sink.feed(LogLine(time.monotonic(), line.rstrip("\n")))
                else:
                    time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def async_scheduling_of(log_text: str, command: list[str]) -> bool:
    """Whether the server runs vLLM's async scheduling, from its log and command.

    vLLM 0.32's CPU platform always turns it off (vllm/platforms/cpu.py); on
    GPUs it is on unless disabled or an n-gram drafter is used
    (vllm/config/vllm.py).
    """
    if "device_config=cpu" in log_text:
        return False
    if "--no-async-scheduling" in command:
        return False
    if "--async-scheduling" in command:
        return True
    if "--speculative-config" in command:
        spec = command[command.index("--speculative-config") + 1]
        with contextlib.suppress(ValueError, TypeError):
            if json.loads(spec).get("method") in ("ngram", "suffix"):
                return False
    return True


def vllm_version_of(log_text: str) -> str | None:
    for line in log_text.splitlines():
        if "version " in line and "█" in line:
            return line.rsplit("version", 1)[1].split()[0]
    return None


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in ("rllm-sim", "httpx", "numpy", "pandas"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


async def _wait_idle(client, url: str, timeout_s: float) -> None:
    """Wait until the server reports no running or waiting request."""
    from profiler.live.metrics import sample

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            row = sample((await client.get(f"{url}/metrics", timeout=5.0)).text)
            if row["running"] == 0 and row["waiting"] == 0:
                return
        await asyncio.sleep(0.5)


async def _warm_up(client, url: str, model: str, count: int) -> None:
    """A few short requests so that one-time costs stay out of the measurement."""
    for i in range(count):
        body = {"model": model, "prompt": list(range(300 + i, 332 + i)), "max_tokens": 4,
                "min_tokens": 4, "ignore_eos": True, "temperature": 0.0}
        response = await client.post(f"{url}/v1/completions", json=body, timeout=120.0)
        response.raise_for_status()


PROBE_PROMPT_TOKENS = 32
#: prompt length of the long prefill probes (short ones are PROBE_PROMPT_TOKENS long)
PREFILL_PROBE_TOKENS = 384


def _probe_body(model: str, rng: np.random.Generator, prompt_tokens: int, output_tokens: int) -> dict:
    """A probe request: random prompt ids (no prefix-cache hit), exactly ``output_tokens`` out."""
    low, high = live_client.DEFAULT_TOKEN_RANGE
    return {"model": model, "prompt": rng.integers(low, high, prompt_tokens).tolist(),
            "max_tokens": output_tokens, "min_tokens": output_tokens, "ignore_eos": True, "temperature": 0.0}


async def _stream_to_end(client, url: str, body: dict) -> float | None:
    """One streaming request read to its end, parsed as the replay client parses it; returns
    when its first token arrived (time.monotonic), None if none did."""
    first = None
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True,
                                                                   "return_token_ids": True},
                             timeout=120.0) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            parsed = live_client.parse_sse_line(line)
            if isinstance(parsed, dict) and live_client.chunk_tokens(parsed)[0] and first is None:
                first = time.monotonic()
    return first


def _refused(err: BaseException) -> bool:
    """True for an HTTP 400 (e.g. a probe longer than the server's max_model_len)."""
    return getattr(getattr(err, "response", None), "status_code", None) == 400


async def _probe_isolated_requests(client, url: str, model: str, lengths: list[int]) -> list[dict]:
    """Send one isolated streaming request per prompt length; record send and first-token times.

    Matched afterwards with the iteration log, each request's prefill is a
    step of its own: its TTFT minus that step is the per-request cost outside
    the engine steps (HTTP, the API server's input and output processing,
    transport; ``request_overhead``), and the steps' elapsed times at two
    prompt lengths say what a prefill token costs on this server
    (``prefill_probe_result``).
    """
    probes = []
    rng = np.random.default_rng()  # fresh ids each time: no prefix-cache hit from earlier probes
    for tokens in lengths:
        send = time.monotonic()
        try:
            first = await _stream_to_end(client, url, _probe_body(model, rng, tokens, 2))
        except Exception as err:
            if not _refused(err):
                raise
            continue  # e.g. longer than the server's max_model_len: skip it
        if first is not None:
            probes.append({"send": send, "first_token": first, "end": time.monotonic(), "tokens": tokens})
        await asyncio.sleep(0.3)  # keeps each probe's prefill step alone in its matching window
    return probes


def _probe_prefill_step(probe: dict, collector: IterationCollector):
    """The iteration-log record of a probe's prefill step, or None if not told apart."""
    tokens = int(probe.get("tokens", PROBE_PROMPT_TOKENS))
    steps = [r for _, r in collector.between(probe["send"], probe["end"] + 0.2)
             if r.ctx_requests == 1 and r.ctx_tokens == tokens and r.gen_requests == 0]
    return steps[0] if len(steps) == 1 else None


def request_overhead(probes: list[dict], collector: IterationCollector, gap_s: float) -> float | None:
    """Median of short-probe TTFT minus its prefill step (logged elapsed + inter-step gap); None if unmatched."""
    values = []
    for probe in probes:
        if int(probe.get("tokens", PROBE_PROMPT_TOKENS)) != PROBE_PROMPT_TOKENS:
            continue
        step = _probe_prefill_step(probe, collector)
        if step is not None:
            values.append(probe["first_token"] - probe["send"] - step.elapsed_s - gap_s)
    return float(np.median(values)) if values else None


def prefill_probe_result(probes: list[dict], collector: IterationCollector) -> list[dict] | None:
    """Per probe whose prefill step was told apart: its prompt length and the step's logged elapsed time."""
    out = []
    for probe in probes:
        step = _probe_prefill_step(probe, collector)
        if step is not None:
            out.append({"tokens": int(step.ctx_tokens), "elapsed_s": float(step.elapsed_s)})
    return out or None


#: shape probes: odd prompt lengths no other probe or warm-up uses (shares of the engine's token
#: budget), each sent twice in a row; the first request of a count pays vLLM CPU's per-token-count
#: kernel set-up (oneDNN primitives), the second not (calibration.fit.shape_cache_cost). Round r
#: shifts them by 2 r: new counts each round. The cost is far from linear in the count (on a
#: 2-layer tiny Llama: 1-3 ms up to 600 tokens, 16-32 ms at 800-1,000) and varies from one miss
#: to the next, hence eight sizes up to nearly the whole budget.
SHAPE_PROBE_SHARES = (0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.7, 0.9)


def shape_probe_lengths(round_no: int, budget: int = 2048) -> list[int]:
    """The prompt lengths of round ``round_no``'s shape probes for a ``budget``-token engine
    (max_num_batched_tokens: each prefill one step), each twice (cold, then warm)."""
    odd = sorted({max(3, int(share * budget)) | 1 for share in SHAPE_PROBE_SHARES})
    return [n + 2 * round_no for n in odd if n + 2 * round_no <= budget for _ in range(2)]


def shape_probe_result(probes: list[dict], collector: IterationCollector) -> list[dict] | None:
    """Per shape-probe length sent twice: the first (cold) and second (warm) request's TTFT, and,
    where the iteration log told them apart, their logged prefill steps. The set-up shows in the
    TTFTs in full; the logged step holds only part of it (vLLM times a step from after it was launched)."""
    sent: dict[int, list[dict]] = {}
    for probe in probes:
        sent.setdefault(int(probe["tokens"]), []).append(probe)
    out = []
    for tokens, (cold, warm, *_) in ((n, p) for n, p in sorted(sent.items()) if len(p) >= 2):
        row = {"tokens": tokens, "cold_s": cold["first_token"] - cold["send"], "warm_s": warm["first_token"] - warm["send"]}
        steps = [_probe_prefill_step(p, collector) for p in (cold, warm)]
        if all(step is not None for step in steps):
            row.update(cold_step_s=float(steps[0].elapsed_s), warm_step_s=float(steps[1].elapsed_s))
        out.append(row)
    return out or None


#: decode probes: (requests, prompt tokens) batches that generate STEP_PROBE_TOKENS tokens together;
#: two sizes at short contexts and two at long contexts separate per-step, per-request and
#: per-context-token costs, with one point more than the three terms so that one noisy batch
#: does not set them all
STEP_PROBE_BATCHES = ((1, PROBE_PROMPT_TOKENS), (8, PROBE_PROMPT_TOKENS), (1, PREFILL_PROBE_TOKENS),
                      (8, PREFILL_PROBE_TOKENS))
STEP_PROBE_TOKENS = 128
#: the probes use at most this share of the KV cache, so that none of them is preempted
PROBE_KV_SHARE = 0.8


def _short_probes_that_fit(kv_tokens: int) -> int:
    """How many requests of PROBE_PROMPT_TOKENS-token prompts generating STEP_PROBE_TOKENS
    tokens fit PROBE_KV_SHARE of a ``kv_tokens``-token cache together."""
    return int(PROBE_KV_SHARE * kv_tokens) // (PROBE_PROMPT_TOKENS + STEP_PROBE_TOKENS + 2)


def decode_probe_batches(kv_tokens: int | None) -> list[tuple[int, int]]:
    """STEP_PROBE_BATCHES that fit a KV cache of ``kv_tokens`` tokens (80% of it) without preemption.

    A short-prompt batch shrinks to what fits. A long-context batch keeps its
    requests and shortens their prompts, down to 192 tokens; below that it
    takes half as many requests with longer prompts (a small cache, as in the
    CI scenario's 64 blocks, is exactly where long contexts dominate); it is
    dropped when even those do not fit. The batches run one after the other,
    so each has the cache to itself. Unknown capacity: all of them.
    """
    if kv_tokens is None:
        return list(STEP_PROBE_BATCHES)
    room = int(PROBE_KV_SHARE * kv_tokens)
    out = []
    for batch, prompt in STEP_PROBE_BATCHES:
        if prompt <= PROBE_PROMPT_TOKENS:
            batch = min(batch, _short_probes_that_fit(kv_tokens))
            if batch >= 1:
                out.append((batch, prompt))
            continue
        for size in sorted({batch, max(batch // 2, 1)}, reverse=True):
            fitting = min(prompt, room // size - STEP_PROBE_TOKENS - 2)
            if fitting >= 192:
                out.append((size, fitting))
                break
    return out


async def _probe_decode_steps(client, url: str, model: str, kv_tokens: int | None = None) -> list[dict]:
    """Run known decode batches, one after the other: for each (requests, prompt tokens) in
    STEP_PROBE_BATCHES (as many as fit ``kv_tokens``, ``decode_probe_batches``), that many
    streaming requests generating STEP_PROBE_TOKENS tokens
    together (~4 s in all). Their steps in the iteration log tell what an engine step of a
    known composition costs on this server, with the time between steps and the streaming of
    the tokens to a client included (``decode_probe_result``). A batch the server refuses
    (e.g. prompts beyond its max_model_len) is skipped."""
    rng = np.random.default_rng()
    windows = []
    for batch, prompt_tokens in decode_probe_batches(kv_tokens):
        bodies = [_probe_body(model, rng, prompt_tokens, STEP_PROBE_TOKENS) for _ in range(batch)]
        start = time.monotonic()
        try:
            await asyncio.gather(*(_stream_to_end(client, url, body) for body in bodies))
        except Exception as err:
            if not _refused(err):
                raise
        else:
            windows.append({"batch": batch, "prompt_tokens": prompt_tokens, "start": start,
                            "end": time.monotonic()})
        await asyncio.sleep(0.3)
    return windows


def decode_probe_result(windows: list[dict] | None, collector: IterationCollector) -> list[dict] | None:
    """Per probe batch: wall time per step of its pure-decode steps at full batch, and their KV lengths.

    Measured over the span of consecutive steps (first line to last), so the
    time between steps counts and read jitter cancels. A batch whose steps
    cannot be told apart (fewer than 10 full-batch decode steps) is left out.
    """
    out = []
    for window in windows or []:
        batch = window["batch"]
        recs = collector.between(window["start"], window["end"] + 0.2)
        full = [(t, r) for t, r in recs if r.ctx_requests == 0 and r.gen_requests == batch
                and r.gen_tokens == batch]
        if len(full) < 10:
            continue
        steps = len(full) - 1
        # the prefill samples token 1; decode step i (from 1) attends over the prompt plus i tokens
        prompt = int(window.get("prompt_tokens", PROBE_PROMPT_TOKENS))
        out.append({"batch": batch, "prompt_tokens": prompt, "steps": steps,
                    "wall_per_step_s": (full[-1][0] - full[0][0]) / steps,
                    "elapsed_median_s": float(np.median([r.elapsed_s for _, r in full])),
                    "context_first": prompt + 2, "context_last": prompt + 1 + len(full)})
    return out or None


#: loaded TTFT probes: lone requests sent this long after a decode batch of LOADED_PROBE_BATCH starts
LOADED_PROBE_OFFSETS_S = (0.25, 0.45, 0.65)
LOADED_PROBE_BATCH = 8


async def _probe_loaded_ttft(client, url: str, model: str, kv_tokens: int | None = None) -> dict | None:
    """TTFT of lone short requests sent while a decode batch runs (~1 s).

    LOADED_PROBE_BATCH requests of PROBE_PROMPT_TOKENS-token prompts generate
    STEP_PROBE_TOKENS tokens together; at LOADED_PROBE_OFFSETS_S after their
    start a lone request of the same prompt length asks for 2 tokens. Its
    TTFT on a busy server includes what the isolated probes cannot see: the
    API server and the client are busy streaming the batch's tokens, on a core
    they share. Validation simulates the same requests and takes the
    difference (``calibration.cmd_validate.busy_overhead``). Send times are
    relative to the batch's first send.
    """
    batch = LOADED_PROBE_BATCH
    if kv_tokens is not None:
        batch = min(batch, _short_probes_that_fit(kv_tokens) - 1)  # room for the lone request
        if batch < 1:
            return None
    rng = np.random.default_rng()
    start = time.monotonic()
    batch_sends: list[dict] = []
    lone: list[dict] = []

    async def one(body: dict, delay: float, record: list) -> None:
        if delay > 0:
            await asyncio.sleep(delay - (time.monotonic() - start))
        send = time.monotonic()
        first = await _stream_to_end(client, url, body)
        record.append({"send_s": send - start, "ttft_s": None if first is None else first - send})

    tasks = [one(_probe_body(model, rng, PROBE_PROMPT_TOKENS, STEP_PROBE_TOKENS), 0.0, batch_sends)
             for _ in range(batch)]
    tasks += [one(_probe_body(model, rng, PROBE_PROMPT_TOKENS, 2), offset, lone)
              for offset in LOADED_PROBE_OFFSETS_S]
    await asyncio.gather(*tasks)
    await asyncio.sleep(0.3)
    lone = [p for p in lone if p["ttft_s"] is not None]
    if not lone:
        return None
    return {"batch": batch, "prompt_tokens": PROBE_PROMPT_TOKENS, "batch_output_tokens": STEP_PROBE_TOKENS,
            "batch_send_s": sorted(p["send_s"] for p in batch_sends), "lone_output_tokens": 2,
            "lone": sorted(lone, key=lambda p: p["send_s"])}


async def _watch_server(server: VllmServer | None, url: str, replay: live_client.Replay, client
                        ) -> None:
    """Stop the replay when the server process exits (or, attached, stops answering)."""
    failures = 0
    while not replay.stop.is_set():
        if server is not None:
            code = server.exit_code()
            if code is not None:
                await asyncio.sleep(0.3)  # let the log reader catch the last lines
                replay.request_stop(f"server exited with code {code} mid-run "
                                    f"({server.failure_reason()})")
                return
            await asyncio.sleep(0.2)
            continue
        try:
            (await client.get(f"{url}/health", timeout=3.0)).raise_for_status()
            failures = 0
        except Exception as err:
            failures += 1
            if failures >= 3:
                replay.request_stop(f"server at {url} stopped answering ({type(err).__name__})")
                return
        await asyncio.sleep(1.0)


async def _replay(workload: Workload, url: str, config: LiveRunConfig, server: VllmServer | None,
                  progress: bool) -> tuple[live_client.Replay, MetricsScraper, float, float, bool, tuple]:
    """Warm up, probe, then replay with scraping and watching.

    Returns (replay, scraper, t0, end, interrupted, probes): probes is a dict of
    the isolated-request probes, the decode-probe windows and the loaded TTFT
    probes before the run, and the decode and loaded probes after it.
    """
    interrupted = False
    async with live_client.http_client(config.request_timeout_s) as client:
        try:
            model = await live_client.served_model(client, url)
        except Exception as err:
            raise ServerError(f"no vLLM server answers at {url}: {type(err).__name__}: {err}") from None
        try:
            await _warm_up(client, url, model, config.warmup_requests)
        except Exception as err:
            raise ServerError(f"warm-up request to {url} failed: {type(err).__name__}: {err}") from None
        await _wait_idle(client, url, config.idle_timeout_s)
        kv_tokens = None
        probes: dict = {"isolated": []}
        try:
            # no overhead probes means no probes at all (as for the decode batches)
            lengths = ([PROBE_PROMPT_TOKENS] * config.overhead_probes
                       + [PREFILL_PROBE_TOKENS] * (config.prefill_probes if config.overhead_probes else 0))
            probes["isolated"] = await _probe_isolated_requests(client, url, model, lengths)
            kv_tokens = await _kv_capacity_tokens(client, url)
            if config.overhead_probes:
                probes["decode"] = await _probe_decode_steps(client, url, model, kv_tokens)
                probes["loaded"] = await _probe_loaded_ttft(client, url, model, kv_tokens)
            await _wait_idle(client, url, config.idle_timeout_s)
        except Exception as err:  # a probe is a measurement aid, never a reason to stop
            print(f"warning: probes failed: {type(err).__name__}: {err}", file=sys.stderr)
            probes = {"isolated": probes.get("isolated", [])}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(workload), unit="req", desc="live run", mininterval=0.5)
        replay = live_client.Replay(
            workload,
            live_client.ReplayConfig(url=url, model=model, request_timeout_s=config.request_timeout_s,
                                     token_seed=config.token_seed),
            on_finish=(lambda _rec: bar.update(1)) if bar is not None else None,
        )
        loop = asyncio.get_running_loop()

        def on_signal(name: str) -> None:
            nonlocal interrupted
            interrupted = True
            replay.request_stop(f"interrupted by {name}")

        installed = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig.name)
                installed.append(sig)
        t0 = time.monotonic() + config.lead_s
        scraper = MetricsScraper(url, t0, config.scrape_interval_s)
        scrape_stop = asyncio.Event()
        await scraper.scrape_once(client)  # baseline for the counters
        scraping = asyncio.create_task(scraper.run(client, scrape_stop))
        watcher = asyncio.create_task(_watch_server(server, url, replay, client))
        try:
            await replay.run(client, t0)
            if not replay.stop.is_set():
                await asyncio.sleep(config.settle_s)
        finally:
            end = time.monotonic()
            watcher.cancel()
            scrape_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(scraping, timeout=10)
            await asyncio.gather(watcher, return_exceptions=True)
            for sig in installed:
                loop.remove_signal_handler(sig)
            if bar is not None:
                bar.close()
        if config.overhead_probes and not replay.stop.is_set():
            # the same decode batches once more after the run: the two sets bracket it, so that
            # a server still warming up when the first set ran does not bias the step offset.
            # A Ctrl-C now skips them; the run itself is complete.
            try:
                await _wait_idle(client, url, config.idle_timeout_s)
                probes["decode_after"] = await _probe_decode_steps(client, url, model, kv_tokens)
                probes["loaded_after"] = await _probe_loaded_ttft(client, url, model, kv_tokens)
            except (Exception, asyncio.CancelledError) as err:
                print(f"warning: probes after the run skipped: {type(err).__name__}: {err}", file=sys.stderr)
    return replay, scraper, t0, end, interrupted, probes


async def _kv_capacity_tokens(client, url: str) -> int | None:
    """Tokens the server's KV cache holds (usable blocks x block size), or None if /metrics does not say."""
    try:
        text = (await client.get(f"{url}/metrics", timeout=10.0)).text
        blocks, size = _num_blocks(None, text)
    except Exception:
        return None
    return (blocks - 1) * size


def _num_blocks(engine: EngineConfig | None, metrics_text: str) -> tuple[int, int]:
    labels = parse_labels(metrics_text, "vllm:cache_config_info")
    blocks = int(labels["num_gpu_blocks"]) if labels.get("num_gpu_blocks", "None").isdigit() else None
    size = int(labels["block_size"]) if labels.get("block_size", "").isdigit() else None
    if blocks is None and engine is not None and engine.num_gpu_blocks_override:
        blocks = engine.num_gpu_blocks_override
    if size is None and engine is not None:
        size = engine.block_size
    if blocks is None or size is None:
        raise ConfigError("live", "could not learn the KV cache size from /metrics (cache_config_info)")
    return blocks, size


def run_live(
    workload: Workload,
    out_dir: str | Path,
    *,
    spec: ServerSpec | None = None,
    server: VllmServer | None = None,
    url: str | None = None,
    server_log: str | Path | None = None,
    engine: EngineConfig | None = None,
    config: LiveRunConfig | None = None,
    collector: IterationCollector | None = None,
    progress: bool = True,
) -> LiveOutcome:
    """Replay ``workload`` live and write the run directory.

    Give exactly one of ``spec`` (start a server, stop it after), ``server``
    (a VllmServer already started with ``collector.feed`` as its line sink;
    left running) or ``url`` (attach; pass ``server_log`` to follow its
    iteration log).
    """
    if sum(x is not None for x in (spec, server, url)) != 1:
        raise ConfigError("live", "give exactly one of a server spec, a running server or a URL")
    if url is not None:
        url = check_loopback_url(url)
    config = config or LiveRunConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    collector = collector or IterationCollector()
    own_server = spec is not None
    tailer = None
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    message, code = "", EXIT_OK
    if own_server:
        server = VllmServer(spec, out / "server.log", on_line=collector.feed)
    try:
        if own_server:
            print(f"starting vLLM server ({spec.model}) ...", file=sys.stderr, flush=True)
            server.start()
        if server is not None:
            url = server.url
            engine = engine or server.spec.engine
        elif server_log is not None:
            tailer = LogTailer(Path(server_log), collector).start()
        server_pids = set()
        if server is not None and server.process is not None:
            server_pids = {server.process.pid} | {p for p, _ in descendants(server.process.pid)}
        before = machine_state(exclude=server_pids)
        watch = CpuWatch()
        replay, scraper, t0, end, interrupted, probes = asyncio.run(
            _replay(workload, url, config, server, progress))
        if server is not None and server.process is not None:
            server_pids |= {server.process.pid} | {p for p, _ in descendants(server.process.pid)}
        during = watch.stop(exclude=server_pids)
        after = machine_state(exclude=server_pids, window_s=0.3)
        server_exit = server.exit_code() if server is not None else None
        if interrupted:
            code, message = EXIT_INTERRUPTED, f"interrupted: partial results written to {out}"
        elif server_exit is not None or ("stopped answering" in replay.stop_reason):
            code = EXIT_SERVER_DIED
            message = f"the server died mid-run: {replay.stop_reason}"
        steps = steps_table(collector.between(t0, end), t0)
        blocks, block_size = _num_blocks(engine, scraper.first_text or scraper.last_text)
        spec_decode = bool(engine is not None and engine.speculative.enabled)
        result = live_result(replay.records, workload, steps, scraper.table(), num_blocks=blocks,
                             block_size=block_size, slo=config.slo, spec_decode=spec_decode)
        if spec_decode and result.summary.get("spec_decode"):  # per draft position, over the replay
            counters = counters_between(scraper.first_text, scraper.last_text)
            if counters is not None and counters.accepted_per_pos:
                result.summary["spec_decode"]["accepted_per_pos"] = counters.accepted_per_pos
        gap = result.summary["live"]["step_time_gap_used_s"]
        live_summary = result.summary["live"]
        live_summary["request_overhead_s"] = request_overhead(probes["isolated"], collector, gap)
        live_summary["prefill_probe"] = prefill_probe_result(probes["isolated"], collector)
        live_summary["decode_probe"] = decode_probe_result(probes.get("decode"), collector)
        live_summary["decode_probe_after"] = decode_probe_result(probes.get("decode_after"), collector)
        live_summary["loaded_probe"] = [p for p in (probes.get("loaded"), probes.get("loaded_after")) if p]
        failed = int((result.requests["status"] == "failed").sum())
        if code == EXIT_OK and failed:
            reasons = result.summary["live"]["failure_reasons"]
            code, message = EXIT_FAILED_REQUESTS, f"{failed} of {len(workload)} requests failed: {reasons}"
        if code == EXIT_SERVER_DIED:
            done = result.summary.completed
            message += f"; kept {done} completed requests, {failed} marked failed"
        log_text = server.log_path.read_text(errors="replace") if server is not None else (
            Path(server_log).read_text(errors="replace") if server_log else "")
        command = server.command if server is not None else []
        result.summary["async_scheduling"] = async_scheduling_of(log_text, command)
        result.summary["source"] = "live"
        result.metadata = {
            "kind": "live",
            "started_at_utc": started_at,
            "workload": {"name": workload.name, "requests": len(workload), "seed": workload.seed},
            "token_seed": config.token_seed,
            "live_config": {k: v for k, v in asdict(config).items() if k != "slo"},
            "slo": asdict(config.slo),
            "engine": engine.to_dict() if engine is not None else None,
            "server": {"url": url, "command": command, "owned": own_server,
                       "vllm_version": vllm_version_of(log_text),
                       "kv_cache_space_gib": server.spec.kv_cache_space_gib if server else None,
                       "exit_code": server_exit,
                       "log": str(server.log_path) if server is not None else server_log},
            "cache_config": parse_labels(scraper.first_text, "vllm:cache_config_info"),
            "versions": _versions(),
            "machine": {"before": before, "during": during, "after": after},
            "exit_code": code,
            "message": message,
        }
        _write(out, result, workload, steps, scraper, replay.records)
        return LiveOutcome(result, out, code, message or f"{result.summary.completed} requests "
                           f"completed; results in {out}")
    finally:
        if tailer is not None:
            tailer.stop()
        if own_server and server is not None:
            server.stop()


def _write(out: Path, result: RunResult, workload: Workload, steps, scraper: MetricsScraper,
           records) -> None:
    import pandas as pd

    result.write(out)
    pd.DataFrame(steps).to_parquet(out / "steps.parquet", index=False)
    pd.DataFrame(scraper.table()).to_parquet(out / "metrics.parquet", index=False)
    pd.DataFrame(token_columns(records)).to_parquet(out / "tokens.parquet", index=False)
    workload.save(out / "workload.parquet")
    (out / "machine.json").write_text(json.dumps(result.metadata["machine"], indent=2))


def run_series(workload: Workload, out_root: str | Path, runs: int, spec: ServerSpec, *,
               fresh_server: bool = False, config: LiveRunConfig | None = None,
               progress: bool = True, pause_s: float = 2.0) -> list[LiveOutcome]:
    """``runs`` live runs of the same workload into ``out_root/run-<i>``.

    On one server back to back (default: saves a start-up per run; each run's
    prompts use a new token seed so no run hits the prefix cache of another),
    or on a fresh server each (``fresh_server``), which also samples the
    start-to-start drift. Stops at the first run whose server died or that was
    interrupted.
    """
    config = config or LiveRunConfig()
    root = Path(out_root)
    outcomes: list[LiveOutcome] = []
    if fresh_server:
        for i in range(runs):
            run_config = _with_seed(config, config.token_seed + i)
            outcome = run_live(workload, root / f"run-{i}", spec=spec, config=run_config,
                               progress=progress)
            outcomes.append(outcome)
            if outcome.exit_code in (EXIT_SERVER_DIED, EXIT_INTERRUPTED):
                break
        return outcomes
    collector = IterationCollector()
    root.mkdir(parents=True, exist_ok=True)
    server = VllmServer(spec, root / "server.log", on_line=collector.feed)
    try:
        print(f"starting vLLM server ({spec.model}) ...", file=sys.stderr, flush=True)
        server.start()
        for i in range(runs):
            run_config = _with_seed(config, config.token_seed + i)
            outcome = run_live(workload, root / f"run-{i}", server=server, config=run_config,
                               collector=collector, progress=progress)
            outcomes.append(outcome)
            if outcome.exit_code in (EXIT_SERVER_DIED, EXIT_INTERRUPTED):
                break
            time.sleep(pause_s)
    finally:
        server.stop()
    return outcomes


def _with_seed(config: LiveRunConfig, seed: int) -> LiveRunConfig:
    from dataclasses import replace

    return replace(config, token_seed=seed)


def summary_line(result: RunResult) -> str:
    """One line for the terminal."""
    s = result.summary

    def p(key: str, q: str) -> str:
        v = getattr(s, key).get(q)
        return "-" if v is None else f"{v * 1000:.0f}ms"

    kv = s.kv_usage
    kv_text = "KV -" if kv.get("mean") is None else f"KV mean {kv['mean']:.1%} peak {kv['peak']:.1%}"
    return (f"{s.completed}/{s.requests} completed, TTFT p50 {p('ttft_s', 'p50')} "
            f"p99 {p('ttft_s', 'p99')}, E2E p50 {p('e2e_s', 'p50')} p99 {p('e2e_s', 'p99')}, "
            f"{kv_text}, preemptions {s.preemptions}, "
            f"{s.throughput['output_tokens_per_s']:.0f} tok/s")
