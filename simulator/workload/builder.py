"""Build a Workload from the ``workload`` config group: ``build_workload(cfg)``.

``cfg["kind"]`` picks a builder from a registry (``register_kind`` adds one):

- ``gamma`` / ``poisson``: Gamma gaps at ``rate`` req/s with ``cv`` (poisson: cv 1).
- ``piecewise``: the rate changes over ``windows`` [{duration_s, rate, cv}, ...],
  or over the 10-minute windows of a ServeGen client trace (``windows_from``).
- ``servegen``: ServeGen DeepSeek-R1 clients replayed from their per-window
  rates and gap laws, with lengths from their own distributions.
- ``azure`` / ``mooncake``: trace replay (Mooncake also gives shared prefixes).
- ``file``: a Workload saved by ``Workload.save`` (Parquet) or its CSV.

Keys shared by every kind:

- size: exactly one of ``num_requests`` and ``duration_s``; ``seed``.
- ``max_tokens``: output budget; longer outputs (and reasoning) are cut.
- ``lengths_file``: CSV (num_prefill_tokens, num_decode_tokens) whose rows
  give the request lengths in order, starting over from the top when there
  are more requests than rows; the reasoning share is then ``reason_ratio``
  or, if null, the fitted production mean (lengths.reason_ratio_mean).
- ``reason_ratio``: null = the source's own law (domain Beta laws, ServeGen's
  distribution; 0 for the non-reasoning Azure and Mooncake traces) or a fixed share.
- synthetic lengths (gamma, poisson, piecewise): ``domains`` (mix; null = the
  fitted production mix), ``difficulty`` (per-domain overrides) and
  ``lengths`` (the laws, conf/workload/lengths/reasoning.yaml).

Arrivals and lengths use separate random streams spawned from ``seed``, so
with num_requests fixed, changing the rate keeps every request's lengths.
Relative paths are looked up in the current directory, then in the repo root.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from simulator.records.errors import ConfigError, require
from simulator.records.workload import Workload
from simulator.workload.arrivals import (
    MAX_SPAN_S,
    RateWindow,
    check_cv,
    check_rate,
    check_request_count,
    check_size,
    check_span,
    gamma_arrivals,
    piecewise_arrivals,
    superposed_arrivals,
    windows_from_config,
)
from simulator.workload.lengths import (
    LengthModel,
    SampledLengths,
    apply_max_tokens,
    check_max_tokens,
    check_reason_ratio,
    parse_mix,
    reasoning_from_ratio,
)
from simulator.workload.traces import (
    TraceRequests,
    read_azure_csv,
    read_lengths_csv,
    read_mooncake_jsonl,
    read_servegen_client,
    read_servegen_trace,
    resolve_path,
    servegen_client_ids,
)

COMMON_KEYS = frozenset(
    {
        "kind",
        "name",
        "seed",
        "num_requests",
        "duration_s",
        "max_tokens",
        "lengths_file",
        "reason_ratio",
        "timeout_s",
    }
)
LENGTH_MODEL_KEYS = frozenset({"domains", "difficulty", "lengths"})
SERVEGEN_DAY_S = 86400.0


@dataclass(frozen=True)
class Size:
    """How many requests: the first ``num_requests``, or those arriving before ``duration_s``."""

    num_requests: int | None
    duration_s: float | None


@dataclass(frozen=True, eq=False)
class Draft:
    """What a kind produces: arrivals, and lengths unless the length model should draw them."""

    arrival_s: np.ndarray
    lengths: SampledLengths | None = None
    prefix_group: np.ndarray | None = None
    prefix_tokens: np.ndarray | None = None
    outer_group: np.ndarray | None = None
    outer_tokens: np.ndarray | None = None
    timeout_s: np.ndarray | None = None


KindBuilder = Callable[[Mapping, Size, np.random.Generator, np.random.Generator], Draft]


@dataclass(frozen=True)
class WorkloadKind:
    """A registered workload kind: its builder and the config keys it reads beyond COMMON_KEYS."""

    build: KindBuilder
    keys: frozenset[str]


KINDS: dict[str, WorkloadKind] = {}


def register_kind(name: str, keys: tuple[str, ...] = ()) -> Callable[[KindBuilder], KindBuilder]:
    """Decorator: register ``builder(cfg, size, arrival_rng, length_rng) -> Draft`` as ``kind: name``."""

    def decorate(builder: KindBuilder) -> KindBuilder:
        KINDS[name] = WorkloadKind(builder, frozenset(keys))
        return builder

    return decorate


def build_workload(cfg: Mapping) -> Workload:
    """The Workload described by a ``workload`` config (a dict or Hydra's DictConfig)."""
    cfg = _plain(cfg)
    cfg.pop("defaults", None)  # Hydra's directive, present when a YAML file is read directly
    spec = _kind_of(cfg)
    size = Size(
        cfg.get("num_requests"), _optional_float(cfg.get("duration_s"), "workload.duration_s")
    )
    check_size(size.num_requests, size.duration_s)
    seed = cfg.get("seed", 0)
    require(
        isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
        "workload.seed",
        f"must be an integer >= 0, got {seed!r}",
    )
    max_tokens = check_max_tokens(cfg.get("max_tokens"))
    reason_ratio = cfg.get("reason_ratio")
    if reason_ratio is not None:
        reason_ratio = check_reason_ratio(reason_ratio)

    arrival_rng, length_rng = np.random.default_rng(seed).spawn(2)
    draft = spec.build(cfg, size, arrival_rng, length_rng)
    n = len(draft.arrival_s)
    require(
        n > 0, "workload.duration_s", f"no request arrives within {size.duration_s} s; raise it"
    )
    lengths = _lengths(cfg, draft, n, reason_ratio, length_rng)
    output, reasoning = apply_max_tokens(
        lengths.output_tokens, lengths.reasoning_tokens, max_tokens
    )
    prefix_tokens = draft.prefix_tokens
    if prefix_tokens is not None:
        prefix_tokens = np.minimum(prefix_tokens, lengths.prompt_tokens)
    return Workload(
        arrival_s=draft.arrival_s,
        prompt_tokens=lengths.prompt_tokens,
        output_tokens=output,
        reasoning_tokens=reasoning,
        domain=lengths.domain,
        prefix_group=draft.prefix_group,
        prefix_tokens=prefix_tokens,
        name=str(cfg.get("name") or cfg["kind"]),
        seed=seed,
        outer_group=draft.outer_group,
        outer_tokens=None if draft.outer_tokens is None else np.minimum(draft.outer_tokens, prefix_tokens),
        timeout_s=_timeouts(cfg.get("timeout_s"), draft.timeout_s, n),
    )


def _timeouts(value, saved: np.ndarray | None, n: int) -> np.ndarray | None:
    """``workload.timeout_s`` (seconds > 0 for every request; null: none, or a saved file's own)."""
    if value is None:
        return saved
    seconds = _number(value, "workload.timeout_s")
    require(seconds > 0, "workload.timeout_s", f"must be > 0 seconds or null, got {value!r}")
    return np.full(n, seconds)


def _kind_of(cfg: Mapping) -> WorkloadKind:
    """The registered kind of cfg, after checking that it only uses keys that kind reads."""
    kind = cfg.get("kind")
    require(
        kind in KINDS,
        "workload.kind",
        f"unknown kind {kind!r}; allowed: {', '.join(sorted(KINDS))}",
    )
    spec = KINDS[kind]
    unknown = sorted(set(cfg) - COMMON_KEYS - spec.keys)
    if unknown:
        allowed = sorted(COMMON_KEYS | spec.keys)
        raise ConfigError(
            f"workload.{unknown[0]}", f"unknown key for kind {kind}; allowed: {allowed}"
        )
    return spec


def _lengths(
    cfg: Mapping, draft: Draft, n: int, reason_ratio: float | None, rng: np.random.Generator
) -> SampledLengths:
    """Lengths from lengths_file, else the kind's own, else the reasoning-length laws."""
    if cfg.get("lengths_file") is not None:
        return _lengths_from_file(cfg["lengths_file"], n, reason_ratio, cfg)
    if draft.lengths is not None:
        if reason_ratio is None:
            return draft.lengths
        reasoning = reasoning_from_ratio(draft.lengths.output_tokens, reason_ratio)
        return replace(draft.lengths, reasoning_tokens=reasoning)
    model = _length_model(cfg)
    domains = cfg.get("domains")
    mix = (
        model.mix
        if domains is None
        else parse_mix(domains, "workload.domains", tuple(model.domains))
    )
    return model.sample(rng, n, mix, reason_ratio)


# --------------------------------------------------------------------------- synthetic kinds


@register_kind("gamma", keys=("rate", "cv", "exact_rate", *LENGTH_MODEL_KEYS))
def _gamma(
    cfg: Mapping, size: Size, arrival_rng: np.random.Generator, _: np.random.Generator
) -> Draft:
    rate = _number(cfg.get("rate"), "workload.rate")
    cv = _number(cfg.get("cv", 1.0), "workload.cv")
    check_rate(rate)
    check_cv(cv)
    exact = bool(cfg.get("exact_rate", True))
    if size.num_requests is not None:
        check_span(size.num_requests, rate)
        return Draft(gamma_arrivals(arrival_rng, rate, cv, size.num_requests, exact))
    require(
        math.isfinite(size.duration_s) and size.duration_s <= MAX_SPAN_S,
        "workload.duration_s",
        f"must be finite for generated arrivals and at most {MAX_SPAN_S:.4g} s (float64 times keep "
        f"~1 us resolution; .inf only replays a whole trace), got {size.duration_s}",
    )
    check_request_count(rate * size.duration_s, "workload.duration_s")
    window = RateWindow(size.duration_s, rate, cv)
    return Draft(
        piecewise_arrivals(arrival_rng, [window], duration_s=size.duration_s, exact_rate=exact)
    )


@register_kind("poisson", keys=("rate", "cv", "exact_rate", *LENGTH_MODEL_KEYS))
def _poisson(
    cfg: Mapping, size: Size, arrival_rng: np.random.Generator, length_rng: np.random.Generator
) -> Draft:
    cv = cfg.get("cv", 1.0)
    require(
        cv in (None, 1, 1.0),
        "workload.cv",
        f"a poisson workload has cv 1, got {cv}; use kind gamma",
    )
    return _gamma({**cfg, "cv": 1.0}, size, arrival_rng, length_rng)


@register_kind(
    "piecewise",
    keys=("windows", "windows_from", "start_s", "rate_scale", "exact_rate", *LENGTH_MODEL_KEYS),
)
def _piecewise(
    cfg: Mapping, size: Size, arrival_rng: np.random.Generator, _: np.random.Generator
) -> Draft:
    has_list, has_file = cfg.get("windows") is not None, cfg.get("windows_from") is not None
    require(
        has_list != has_file,
        "workload.windows",
        "give either windows (a list of {duration_s, rate, cv}) or windows_from "
        "(a ServeGen chunk-<client>-trace.csv), not both or neither",
    )
    if has_list:
        windows = windows_from_config(cfg["windows"])
    else:
        windows = list(
            read_servegen_trace(resolve_path(cfg["windows_from"], "workload.windows_from"))[1]
        )
    windows = _rotate(windows, _number(cfg.get("start_s", 0.0), "workload.start_s"))
    windows = _scale_rates(windows, cfg.get("rate_scale", 1.0))
    arrivals = piecewise_arrivals(
        arrival_rng,
        windows,
        num_requests=size.num_requests,
        duration_s=size.duration_s,
        exact_rate=bool(cfg.get("exact_rate", True)),
    )
    return Draft(arrivals)


# --------------------------------------------------------------------------- ServeGen


@register_kind(
    "servegen", keys=("path", "clients", "start_s", "rate_scale", "exact_rate", "domain")
)
def _servegen(
    cfg: Mapping, size: Size, arrival_rng: np.random.Generator, length_rng: np.random.Generator
) -> Draft:
    directory = cfg.get("path")
    resolve_path(directory, "workload.path", directory=True)
    known = servegen_client_ids(directory)
    clients = _servegen_clients(cfg.get("clients", "all"), known)
    start_s = _number(cfg.get("start_s", 0.0), "workload.start_s")
    data = [read_servegen_client(directory, c) for c in clients]
    sources = [
        _scale_rates(_rotate(list(d.windows), start_s), cfg.get("rate_scale", 1.0)) for d in data
    ]
    arrivals, source = superposed_arrivals(
        arrival_rng,
        sources,
        num_requests=size.num_requests,
        duration_s=size.duration_s,
        exact_rate=bool(cfg.get("exact_rate", True)),
    )
    n = len(arrivals)
    prompt = np.zeros(n, np.int64)
    output = np.zeros(n, np.int64)
    ratio = np.zeros(n)
    time_of_day = np.mod(start_s + arrivals, SERVEGEN_DAY_S)
    for s in np.unique(source):
        members = np.flatnonzero(source == s)
        dataset_index = data[s].dataset_at(time_of_day[members])
        for d in np.unique(dataset_index):
            rows = members[dataset_index == d]
            laws = data[s].dataset(d)
            prompt[rows] = laws["input_tokens"].sample(length_rng, len(rows))
            output[rows] = laws["output_tokens"].sample(length_rng, len(rows))
            ratio[rows] = laws["reason_ratio"].sample(length_rng, len(rows))
    prompt, output = np.maximum(prompt, 1), np.maximum(output, 1)
    lengths = SampledLengths(
        domain=np.full(n, str(cfg.get("domain") or "production"), dtype=object),
        prompt_tokens=prompt,
        output_tokens=output,
        reasoning_tokens=reasoning_from_ratio(output, ratio),
    )
    return Draft(arrivals, lengths)


def _servegen_clients(value, known: list[int]) -> list[int]:
    if value is None or value == "all":
        return known
    values = [value] if isinstance(value, int | str) else list(value)
    try:
        clients = [int(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(
            "workload.clients", f"must be 'all' or client numbers, got {value!r}"
        ) from None
    missing = sorted(set(clients) - set(known))
    require(
        not missing,
        "workload.clients",
        f"no such ServeGen clients {missing}; allowed: 'all' or {known[0]}..{known[-1]}",
    )
    require(len(clients) > 0, "workload.clients", "is empty; use 'all' or client numbers")
    return clients


# --------------------------------------------------------------------------- trace replay


@register_kind("azure", keys=("path", "start_s", "rate_scale", "domain"))
def _azure(cfg: Mapping, size: Size, _: np.random.Generator, __: np.random.Generator) -> Draft:
    return _replay(cfg, size, read_azure_csv(cfg.get("path")))


@register_kind("mooncake", keys=("path", "start_s", "rate_scale", "domain"))
def _mooncake(cfg: Mapping, size: Size, _: np.random.Generator, __: np.random.Generator) -> Draft:
    return _replay(cfg, size, _read_mooncake(str(resolve_path(cfg.get("path")))))


@functools.lru_cache(maxsize=4)
def _read_mooncake(path: str) -> TraceRequests:
    return read_mooncake_jsonl(path)


@register_kind("file", keys=("path",))
def _file(cfg: Mapping, size: Size, _: np.random.Generator, __: np.random.Generator) -> Draft:
    path = resolve_path(cfg.get("path"))
    if path.suffix == ".csv":
        import pandas as pd

        try:
            frame = pd.read_csv(path)
        except (UnicodeDecodeError, ValueError) as error:  # pandas' ParserError is a ValueError
            raise ConfigError(
                "workload.path",
                f"{path.name} is not a readable CSV ({type(error).__name__}); expected the CSV of a "
                "saved workload (arrival_s, prompt_tokens, output_tokens, ...)",
            ) from None
        saved = Workload.from_frame(frame, name=path.stem)
    else:
        saved = Workload.load(path)
    keep = _select(saved.arrival_s, size, len(saved))
    saved = saved.select(keep)
    lengths = SampledLengths(
        saved.domain, saved.prompt_tokens, saved.output_tokens, saved.reasoning_tokens
    )
    return Draft(saved.arrival_s, lengths, saved.prefix_group, saved.prefix_tokens,
                 saved.outer_group, saved.outer_tokens, saved.timeout_s)


def _replay(cfg: Mapping, size: Size, trace: TraceRequests) -> Draft:
    start_s = _number(cfg.get("start_s", 0.0), "workload.start_s")
    rate_scale = _number(cfg.get("rate_scale", 1.0), "workload.rate_scale")
    check_rate(rate_scale, "workload.rate_scale")
    after = np.flatnonzero(trace.arrival_s >= start_s)
    shifted = (trace.arrival_s[after] - start_s) / rate_scale
    chosen = _select(shifted, size, len(after))
    keep = after[chosen]
    lengths = SampledLengths(
        domain=np.full(len(keep), str(cfg.get("domain") or "chat"), dtype=object),
        prompt_tokens=trace.prompt_tokens[keep],
        output_tokens=trace.output_tokens[keep],
        reasoning_tokens=np.zeros(
            len(keep), np.int64
        ),  # these traces come from non-reasoning models
    )
    group = None if trace.prefix_group is None else trace.prefix_group[keep]
    shared = None if trace.prefix_tokens is None else trace.prefix_tokens[keep]
    outer = None if trace.outer_group is None else trace.outer_group[keep]
    outer_tokens = None if trace.outer_tokens is None else trace.outer_tokens[keep]
    return Draft(shifted[chosen], lengths, group, shared, outer, outer_tokens)


def _select(arrivals: np.ndarray, size: Size, available: int) -> np.ndarray:
    """Indices of the requests a size keeps from sorted arrivals."""
    if size.num_requests is not None:
        require(
            size.num_requests <= available,
            "workload.num_requests",
            f"the trace holds only {available} requests from start_s on; ask for at most that, "
            "use duration_s, or raise rate_scale",
        )
        return np.arange(size.num_requests)
    return np.flatnonzero(arrivals < size.duration_s)


# --------------------------------------------------------------------------- shared helpers


def _lengths_from_file(path, n: int, reason_ratio: float | None, cfg: Mapping) -> SampledLengths:
    """Lengths from a CSV, row i for request i, starting over from the top when rows run out."""
    prompt, output = _read_lengths(str(resolve_path(path, "workload.lengths_file")))
    rows = np.arange(n) % len(prompt)
    if reason_ratio is None:
        reason_ratio = _length_model(cfg).reason_ratio_mean
    output = output[rows]
    return SampledLengths(
        domain=np.full(n, "file", dtype=object),
        prompt_tokens=prompt[rows],
        output_tokens=output,
        reasoning_tokens=reasoning_from_ratio(output, reason_ratio),
    )


@functools.lru_cache(maxsize=8)
def _read_lengths(path: str) -> tuple[np.ndarray, np.ndarray]:
    return read_lengths_csv(path)


@functools.lru_cache(maxsize=1)
def _default_model() -> LengthModel:
    return LengthModel.default()


def _length_model(cfg: Mapping) -> LengthModel:
    """The length laws of cfg (``lengths``, else the shipped defaults) with its difficulty overrides."""
    model = (
        _default_model() if cfg.get("lengths") is None else LengthModel.from_config(cfg["lengths"])
    )
    overrides = cfg.get("difficulty") or {}
    require(
        hasattr(overrides, "items"), "workload.difficulty", "must map a domain to a difficulty mix"
    )
    for domain, mix in overrides.items():
        if mix is not None:
            model = model.with_difficulty(str(domain), mix)
    return model


def _rotate(windows: list[RateWindow], start_s: float) -> list[RateWindow]:
    """The cycle of windows starting at time start_s (a window boundary) of the first cycle."""
    require(start_s >= 0, "workload.start_s", f"must be >= 0, got {start_s}")
    cycle = sum(w.duration_s for w in windows)
    offset = math.fmod(start_s, cycle)
    t = 0.0
    for i, window in enumerate(windows):
        if math.isclose(t, offset, abs_tol=1e-6):
            return windows[i:] + windows[:i]
        t += window.duration_s
    boundaries = np.cumsum([0.0] + [w.duration_s for w in windows[:-1]])
    raise ConfigError(
        "workload.start_s",
        f"must fall on a window boundary, e.g. {boundaries[:4].tolist()} ..., got {start_s}",
    )


def _scale_rates(windows: list[RateWindow], rate_scale) -> list[RateWindow]:
    scale = _number(rate_scale, "workload.rate_scale")
    check_rate(scale, "workload.rate_scale")
    return windows if scale == 1.0 else [replace(w, rate=w.rate * scale) for w in windows]


def _number(value, field: str) -> float:
    require(
        isinstance(value, int | float) and not isinstance(value, bool),
        field,
        f"must be a number, got {value!r}",
    )
    return float(value)


def _optional_float(value, field: str) -> float | None:
    return None if value is None else _number(value, field)


def _plain(cfg) -> dict:
    """A plain dict from a Mapping or an OmegaConf DictConfig (interpolations resolved)."""
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    require(isinstance(cfg, Mapping), "workload", f"must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)
