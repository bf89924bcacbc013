"""The serving path: what a `vllm serve` process adds to the profiled engine steps.

The profiler times ``LLMEngine.step()`` in-process. A server also spends time
per step and per request outside that (IPC between its API, engine-core and
worker processes, streaming every token out, HTTP). Probes measure it: known
decode batches and lone requests sent to a server whose iteration log times
every step (``profiler.live.runner``). A *probe set* is one round of them, as
the live runner stores it in ``summary["live"]`` (keys ``decode_probe``,
``decode_probe_after``, ``prefill_probe``, ``request_overhead_s``,
``loaded_probe``); the profiler's serving phase stores its rounds in
``profile.json["serving"]["probes"]`` in the same shape.

This module turns probe sets into ``ServingOverheads`` against a fitted step
model and applies them (``ServedModel``): ``perf=profile`` and
``calibration validate`` both go through ``overheads_from_probes`` and
``ServedModel``, so they predict the same thing. The per-request time outside
the steps is counted once, by the simulator's front-end term
(``simulator.records.frontend``: client-observed TTFT and E2E).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from calibration.live_model import StepGapModel
from calibration.load_steps import replayed_batches
from simulator.records.errors import require
from simulator.records.performance import PerformanceModel, StepBatch


@dataclass(frozen=True)
class ServingOverheads:
    """Per step, per request in a step, per KV token attended and per prefill token (added to
    step times), per request outside the steps, idle and busy server (added to TTFT/E2E), and
    the factor a served load's steps take over those (``step_scale``, from ``load_scale``)."""

    per_step_s: float = 0.0
    per_request_s: float = 0.0
    per_context_token_s: float = 0.0
    per_prefill_token_s: float = 0.0
    request_overhead_s: float = 0.0
    busy_overhead_s: float = 0.0
    probe_sets: int = 0
    source: str = ""
    step_scale: float = 1.0
    load_requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingOverheads:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def decode_offsets(model: PerformanceModel, probe_sets: list[dict],
                   per_context: float | None = None) -> tuple[float, float, float] | None:
    """(per step, per request in the step, per KV token attended) the server spends beyond the
    model, from the decode probes (before and after a run).

    Per probe batch, the server's wall time per step minus the model's step time
    for the same steps (median over probe sets); a plane through those offsets
    against the batch size and the KV tokens attended gives the three terms (a
    line against the batch size when no long-context batch was probed). Terms
    may be negative (work the in-process step pays and a server overlaps on
    another core). ``per_context`` given: that per-KV-token term, and the other two fitted
    to what it leaves. None without probes.
    """
    groups: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for probes in probe_sets:
        for probe in (probes.get("decode_probe") or []) + (probes.get("decode_probe_after") or []):
            batch = int(probe["batch"])
            contexts = np.arange(int(probe["context_first"]), int(probe["context_last"]) + 1)
            predicted = np.mean([model.step_time(StepBatch(decode_context=[int(c)] * batch)) for c in contexts])
            key = (batch, int(probe.get("prompt_tokens", probe["context_first"] - 2)))
            groups.setdefault(key, []).append((float(probe["wall_per_step_s"]) - float(predicted),
                                               float(batch * contexts.mean())))
    if not groups:
        return None
    keys = sorted(groups)
    offsets = np.array([np.median([o for o, _ in groups[k]]) for k in keys])
    batches = np.array([k[0] for k in keys], dtype=float)
    kv_tokens = np.array([np.mean([c for _, c in groups[k]]) for k in keys])
    if per_context is not None:
        offsets = offsets - per_context * kv_tokens
        if len(set(batches)) == 1:
            return float(np.median(offsets)), 0.0, float(per_context)
        per_request, per_step = np.polyfit(batches, offsets, 1)
        return float(per_step), float(per_request), float(per_context)
    if len(set(batches)) == 1:
        return float(np.median(offsets)), 0.0, 0.0
    design = np.column_stack((np.ones_like(batches), batches, kv_tokens))
    if np.linalg.matrix_rank(design) < 3:
        per_request, per_step = np.polyfit(batches, offsets, 1)
        return float(per_step), float(per_request), 0.0
    per_step, per_request, per_context = np.linalg.lstsq(design, offsets, rcond=None)[0]
    return float(per_step), float(per_request), float(per_context)


#: decode steps of served loads that the per-step terms need (below: the probes')
MIN_LOAD_STEPS = 200


def _load_decode_steps(loads: list[dict], minimum: int = MIN_LOAD_STEPS
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(requests, KV tokens attended, wall time) of the served loads' logged decode-only steps
    (no prefill, no recompute): wall = the logged elapsed time plus the load's inter-step gap;
    KV tokens replayed from the load's requests (``replayed_batches``), else from the logged
    KV usage (rounded to a thousandth of the cache), less half a block per request (a request's
    last block is half full on average). None under ``minimum`` steps."""
    batch, kv_tokens, wall = [], [], []
    for load in loads:
        steps, gap = load.get("steps"), load.get("inter_step_gap_s")
        if not steps or gap is None or not load.get("num_blocks"):
            continue
        n = np.asarray(steps["gen_requests"], float)
        keep = (np.asarray(steps["ctx_requests"]) == 0) & (np.asarray(steps["gen_tokens"]) == n) & (n > 0)
        size = float(load["block_size"])
        replayed = replayed_batches(load)
        if replayed is not None:
            tokens = np.array([sum(b.decode_context) for b in replayed], float)
        else:
            tokens = np.asarray(steps["kv_usage"], float) * float(load["num_blocks"]) * size - n * size / 2
        batch.append(n[keep])
        kv_tokens.append(np.maximum(tokens[keep], n[keep]))
        wall.append(np.asarray(steps["elapsed_s"], float)[keep] + float(gap))
    if not batch or sum(b.size for b in batch) < minimum:
        return None
    return np.concatenate(batch), np.concatenate(kv_tokens), np.concatenate(wall)


def served_speed(model: PerformanceModel, loads: list[dict], most: int = 8) -> float | None:
    """The served loads' decode steps of at most ``most`` requests, their logged wall time over
    ``model``'s for the same batches (1: as predicted). Fresh servers of one shape differ by
    10% and more at small batches on a shared CPU: this says by how much a server was faster or
    slower than the fit. None without such steps."""
    logged = _load_decode_steps(loads, minimum=1)
    if logged is None:
        return None
    batch, kv_tokens, wall = logged
    small = batch <= most
    if not small.any():
        return None
    predicted = sum(model.step_time(StepBatch(decode_context=[max(int(t / n), 1)] * int(n)))
                    for n, t in zip(batch[small], kv_tokens[small], strict=True))
    return float(wall[small].sum() / predicted)


def load_step_offsets(model: PerformanceModel, loads: list[dict],
                      per_context: float | None = None) -> tuple[float, float, float] | None:
    """(per step, per request in the step, per KV token attended) the server spends beyond the
    model, from the served loads' logged decode steps: the least-squares plane through each
    step's wall time minus the model's for its batch (mean context per request), against the
    batch size and the KV tokens. Thousands of steps of every batch size the load met, where
    the probes have four batches. ``per_context`` given: that term, the other two fitted to
    what it leaves. None with fewer than MIN_LOAD_STEPS decode steps."""
    logged = _load_decode_steps(loads)
    if logged is None:
        return None
    batch, kv_tokens, wall = logged
    predicted = np.array([model.step_time(StepBatch(decode_context=[max(int(t / n), 1)] * int(n)))
                          for n, t in zip(batch, kv_tokens, strict=True)])
    residual = wall - predicted
    if per_context is not None:
        residual = residual - per_context * kv_tokens
        design = np.column_stack((np.ones_like(batch), batch))
        per_step, per_request = np.linalg.lstsq(design, residual, rcond=None)[0]
        return float(per_step), float(per_request), float(per_context)
    design = np.column_stack((np.ones_like(batch), batch, kv_tokens))
    if np.linalg.matrix_rank(design) < 3:
        return None
    per_step, per_request, per_context = np.linalg.lstsq(design, residual, rcond=None)[0]
    return float(per_step), float(per_request), float(per_context)


#: a per-KV-token term needs the served loads' KV tokens to vary apart from their batch sizes: their
#: variance inflation (1 / (1 - r^2), r their correlation over the logged decode steps) at most
#: this. The serving phase's loads (short prompts, a nearly empty cache) reach 13-31 on the CPU
#: profiles, and their plane then swings the term from -2x to +1.5x the fit's own from one profile
#: to the next; without it the in-process fit's context cost stands alone.
MAX_KV_INFLATION = 10.0


def context_separable(loads: list[dict]) -> bool:
    """Whether the served loads' logged decode steps tell a per-KV-token cost from a per-request
    one (MAX_KV_INFLATION)."""
    logged = _load_decode_steps(loads)
    if logged is None:
        return False
    batch, kv_tokens, _ = logged
    if np.ptp(batch) == 0 or np.ptp(kv_tokens) == 0:
        return False
    r = float(np.corrcoef(batch, kv_tokens)[0, 1])
    return MAX_KV_INFLATION * max(1.0 - r * r, 0.0) >= 1.0


#: steps with a prefill that the served loads' per-prefill-token term needs (below: the probes')
MIN_LOAD_PREFILL_STEPS = 30


def load_prefill_per_token(stepped: PerformanceModel, loads: list[dict]) -> float | None:
    """Extra time per prefill token on the server, from the served loads' logged steps that
    prefill (replayed, ``replayed_batches``): the least-squares slope through the origin of
    each step's wall time (elapsed plus the inter-step gap) minus ``stepped``'s (the model with
    the decode terms) against its prefill tokens. Those steps carry the decodes of every
    running request and prompts of every length the load sent, where the isolated probes
    prefill one prompt on an idle server. None with fewer than MIN_LOAD_PREFILL_STEPS."""
    tokens, residual = [], []
    for load in loads:
        replayed = replayed_batches(load)
        gap = load.get("inter_step_gap_s")
        if replayed is None or gap is None:
            continue
        for batch, elapsed in zip(replayed, load["steps"]["elapsed_s"], strict=True):
            if batch.prefill_tokens:
                tokens.append(batch.num_prefill_tokens)
                residual.append(float(elapsed) + float(gap) - stepped.step_time(batch))
    if len(tokens) < MIN_LOAD_PREFILL_STEPS:
        return None
    x, y = np.asarray(tokens, float), np.asarray(residual)
    return float(x @ y / (x @ x))


def prefill_per_token(model: PerformanceModel, probe_sets: list[dict]) -> float | None:
    """Extra time per prefill token on the server: the slope, against the prompt length, of the
    isolated prefill probes' logged step times minus the model's (median per length). None
    without probes at two lengths."""
    by_length: dict[int, list[float]] = {}
    for probes in probe_sets:
        for probe in probes.get("prefill_probe") or []:
            n = int(probe["tokens"])
            predicted = model.step_time(StepBatch(prefill_tokens=[n], prefill_context=[0]))
            by_length.setdefault(n, []).append(float(probe["elapsed_s"]) - float(predicted))
    if len(by_length) < 2:
        return None
    lengths = np.array(sorted(by_length), dtype=float)
    residuals = np.array([np.median(by_length[int(n)]) for n in lengths])
    slope, _ = np.polyfit(lengths, residuals, 1)
    return float(slope)


def idle_overhead(probe_sets: list[dict]) -> float | None:
    """Median per-request time outside the steps on an idle server (isolated short probes)."""
    measured = [p.get("request_overhead_s") for p in probe_sets]
    measured = [float(m) for m in measured if m is not None]
    return max(float(np.median(measured)), 0.0) if measured else None


def busy_overhead(model: PerformanceModel, probe_sets: list[dict], engine, idle_s: float,
                  async_scheduling: bool) -> float | None:
    """Extra per-request time when a request arrives at a busy server: lone short requests sent
    while a decode batch streams (``loaded_probe``), live TTFT minus the same requests simulated
    with ``model`` minus the idle overhead (median). None without loaded probes."""
    from simulator.engine.loop import simulate
    from simulator.records.workload import Workload

    extras = []
    for probes in probe_sets:
        for probe in probes.get("loaded_probe") or []:
            batch, lone = len(probe["batch_send_s"]), probe["lone"]
            arrivals = np.array(list(probe["batch_send_s"]) + [p["send_s"] for p in lone])
            if np.any(np.diff(arrivals) < 0):
                continue
            n = len(arrivals)
            workload = Workload(
                arrival_s=arrivals - arrivals[0], prompt_tokens=np.full(n, probe["prompt_tokens"]),
                output_tokens=[probe["batch_output_tokens"]] * batch + [probe["lone_output_tokens"]] * len(lone),
                reasoning_tokens=np.zeros(n), domain=np.full(n, "probe", object), name="loaded-probe")
            sim = simulate(workload, engine, model, async_scheduling=async_scheduling)
            for p, sim_ttft in zip(lone, sim.requests["ttft_s"][batch:], strict=True):
                extras.append(float(p["ttft_s"]) - float(sim_ttft) - idle_s)
    return float(np.median(extras)) if extras else None


#: a server process runs the profiled kernels, 10-30% faster or slower (../shared/vllm-cpu.md):
#: a per-token difference beyond this share of the fit's own per-token cost is probe noise
#: (4 probe batches extrapolated to long contexts), so it is clamped to it
DRIFT_BOUND = 0.5


def _within_drift(model: PerformanceModel, value: float, coefficient: str) -> tuple[float, bool]:
    """``value`` within DRIFT_BOUND of the fit's own ``coefficient`` (a per-token cost), and
    whether it was clamped."""
    cost = (getattr(model, "coefficients", None) or {}).get(coefficient)
    if cost is None or abs(value) <= DRIFT_BOUND * cost:
        return value, False
    return float(np.clip(value, -DRIFT_BOUND * cost, DRIFT_BOUND * cost)), True


def _clamp_note(name: str) -> str:
    return f"; {name} clamped to {DRIFT_BOUND:.0%} of the fit's own"


def decode_terms(model: PerformanceModel, probe_sets: list[dict], loads: list[dict],
                 speculative: bool) -> tuple[tuple[float, float, float] | None, str]:
    """(per step, per request, per KV token) a server adds to decode steps, and a note on their
    source: the served loads' logged steps (``load_step_offsets``; no per-KV-token term where
    their KV tokens follow their batch sizes, ``context_separable``), else the decode probes'
    plane (``decode_offsets``); a per-KV-token term beyond DRIFT_BOUND is clamped and the
    other two refitted around it. ``speculative``: the logged steps are not the batches
    verified, so the per-step term is the probes' median inter-step gap. None without data."""
    if speculative:
        gaps = [float(p["inter_step_gap_s"]) for p in probe_sets if p.get("inter_step_gap_s")]
        return ((float(np.median(gaps)), 0.0, 0.0) if gaps else None), "; speculative: per step = the inter-step gap"
    terms, note = load_step_offsets(model, loads), "; decode terms from the served loads' logged steps"
    refit = functools.partial(load_step_offsets, model, loads)
    if terms is not None and not context_separable(loads):
        return refit(0.0), note + "; no per-KV-token term (their KV tokens follow their batch sizes)"
    if terms is None:
        terms, note = decode_offsets(model, probe_sets), ""
        refit = functools.partial(decode_offsets, model, probe_sets)
    if terms is None:
        return None, note
    per_context, clamped = _within_drift(model, terms[2], "per_decode_kv_token")
    if not clamped:
        return terms, note
    return refit(per_context), note + _clamp_note("per KV token")


def prefill_term(model: PerformanceModel, stepped: PerformanceModel, probe_sets: list[dict], loads: list[dict],
                 speculative: bool) -> tuple[float | None, str]:
    """Extra time per prefill token on the server, and a note on its source: the served loads'
    steps that prefill against ``stepped`` (the model with the decode terms;
    ``load_prefill_per_token``), else the isolated prefill probes' slope; clamped within
    DRIFT_BOUND. None without data."""
    value = None if speculative else load_prefill_per_token(stepped, loads)
    note = "; prefill term from the served loads' logged steps"
    if value is None:
        value, note = prefill_per_token(model, probe_sets), ""
    if value is None:
        return None, note
    value, clamped = _within_drift(model, value, "per_prefill_token")
    return value, note + (_clamp_note("per prefill token") if clamped else "")


def overheads_from_probes(model: PerformanceModel, probe_sets: list[dict], engine, async_scheduling: bool,
                          source: str, speculative: bool = False,
                          loads: list[dict] | None = None) -> ServingOverheads:
    """Every overhead term from probe sets and served loads, against the bare step model
    ``model``; terms nothing measured are 0 (``source`` says which were measured).
    ``speculative``: the server drafted (``decode_terms``). ``loads`` (the serving phase's
    served loads): the decode and prefill terms from their logged steps, and the step scale
    that makes the served model's requests as long as the served load's (``load_scale``)."""
    loads = loads or []
    steps, said = decode_terms(model, probe_sets, loads, speculative)
    per_step, per_request, per_context = steps or (0.0, 0.0, 0.0)
    prefill, prefill_said = prefill_term(model, StepGapModel(model, per_step, per_request, 0.0, per_context),
                                         probe_sets, loads, speculative)
    idle = idle_overhead(probe_sets)
    stepped = StepGapModel(model, per_step, per_request, prefill or 0.0, per_context)
    busy = busy_overhead(stepped, probe_sets, engine, idle or 0.0, async_scheduling)
    missing = [name for name, value in (("decode probes", steps), ("prefill probes", prefill),
                                        ("idle request probes", idle), ("loaded probes", busy))
               if value is None]
    note = f" (none: {', '.join(missing)}; their terms are 0)" if missing else ""
    terms = ServingOverheads(per_step, per_request, per_context, prefill or 0.0, idle or 0.0, busy or 0.0,
                             len(probe_sets), source + said + prefill_said + note)
    scaled = load_scale(model, terms, loads, engine, async_scheduling)
    if scaled is None:
        return terms
    scale, requests, said = scaled
    return dataclasses.replace(terms, step_scale=scale, load_requests=requests, source=terms.source + "; " + said)


#: the step scale a served load may give: beyond it the load was disturbed, not the server slower
SCALE_BOUNDS = (0.5, 2.0)


def load_engine(engine, load: dict):
    """``engine`` as the served load met it: with the drafting its counters measured (a
    speculative server: acceptance per position, proposal rate; ``load["speculative"]``)."""
    from simulator.records.engine_config import SpeculativeConfig

    drafting = load.get("speculative")
    return dataclasses.replace(engine, speculative=SpeculativeConfig(**drafting)) if drafting else engine


def _load_workload(load: dict):
    """The served load as a Workload (every request sent, as the server met them), which of its
    requests completed, and their client-observed E2E."""
    from simulator.records.workload import Workload

    arrival = np.asarray(load["arrival_s"], float)
    n = arrival.size
    workload = Workload(arrival_s=arrival - (arrival.min() if n else 0.0),
                        prompt_tokens=np.asarray(load["prompt_tokens"], np.int64),
                        output_tokens=np.asarray(load["output_tokens"], np.int64),
                        reasoning_tokens=np.zeros(n, np.int64), domain=np.full(n, "load", object),
                        name="served-load")
    done = np.asarray(load["completed"], bool)
    return workload, done, np.asarray(load["e2e_s"], float)[done]


def load_scale(model: PerformanceModel, terms: ServingOverheads, loads: list[dict], engine,
               async_scheduling: bool) -> tuple[float, int, str] | None:
    """(scale, requests, a note): the factor on every step of ``ServedModel(model, terms)`` that
    makes the served loads' requests, simulated, as long in all as they were live.

    Probes time a few known batches on a quiet server; a served load (bursty arrivals,
    mixed lengths) also pays what they miss: steps slowed by the server's other processes
    sharing the cores, a tail of slow steps, prefills of prompt lengths the server meets for
    the first time. Matched on the sum of the requests' engine E2E (client-observed E2E less
    the idle per-request overhead), by bisection on the scale within ``SCALE_BOUNDS`` (the
    total grows with the scale). None without a served load.
    """
    from simulator.engine.loop import simulate

    loaded = [(*_load_workload(load), load_engine(engine, load)) for load in loads if load.get("e2e_s")]
    loaded = [(w, done, e2e, e) for w, done, e2e, e in loaded if done.any()]
    if not loaded:
        return None
    live = sum(float(np.sum(e2e)) - terms.request_overhead_s * len(e2e) for _, _, e2e, _ in loaded)

    def simulated(scale: float) -> float:
        served = ServedModel(model, dataclasses.replace(terms, step_scale=scale))
        return sum(float(np.sum(simulate(w, e, served, async_scheduling=async_scheduling).requests["e2e_s"][done]))
                   for w, done, _, e in loaded)

    lo, hi = SCALE_BOUNDS
    requests = sum(len(e2e) for _, _, e2e, _ in loaded)
    said = f"step scale from {len(loaded)} served load(s) of {requests} requests"
    if simulated(lo) >= live:
        return lo, requests, said + f" (clamped to {lo})"
    if simulated(hi) <= live:
        return hi, requests, said + f" (clamped to {hi})"
    for _ in range(30):  # to ~1e-9 of the scale in log space
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if simulated(mid) < live else (lo, mid)
    return round(math.sqrt(lo * hi), 6), requests, said


class ServedModel(StepGapModel):
    """A bare step model plus a server's overheads: the step terms on every step
    (``StepGapModel``); the per-request time outside the steps is ``request_overhead_s`` in
    ``describe()``, which the simulator adds to client-observed TTFT and E2E
    (``simulator.records.frontend``) and ``calibration validate`` to the simulated requests."""

    def __init__(self, base: PerformanceModel, overheads: ServingOverheads):
        super().__init__(base, overheads.per_step_s, overheads.per_request_s, overheads.per_prefill_token_s,
                         overheads.per_context_token_s)
        require(math.isfinite(overheads.step_scale) and overheads.step_scale > 0, "serving.step_scale",
                f"must be a finite number > 0, got {overheads.step_scale!r}")
        self.overheads = overheads
        self.scale = float(overheads.step_scale)
        self.name = f"{base.name}+served" + (f"x{self.scale:.3f}" if self.scale != 1.0 else "")
        for attr in ("architecture", "engine_settings", "hardware_label", "on_gpu", "kv", "shape_cache"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def step_time(self, batch: StepBatch) -> float:
        return self.scale * super().step_time(batch)

    def decode_times(self, num_seqs: int, total_context):
        times = super().decode_times(num_seqs, total_context)
        return times if times is None or self.scale == 1.0 else self.scale * times

    def decode_times_by_count(self, counts: list[int], lengths: list[int], total_context):
        times = super().decode_times_by_count(counts, lengths, total_context)
        return times if times is None or self.scale == 1.0 else self.scale * times

    def describe(self) -> dict:
        return {**super().describe(), "serving": self.overheads.to_dict(),
                "request_overhead_s": self.overheads.request_overhead_s}


def as_served(model: PerformanceModel) -> PerformanceModel:
    """``model`` (a fitted profile) as ``perf=profile`` simulates it: with the serving overheads
    its profile's serving phase measured (``ServedModel``), or bare when it has none."""
    serving = getattr(model, "serving", None)
    return ServedModel(model, ServingOverheads.from_dict(serving)) if serving else model
