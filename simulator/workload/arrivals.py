"""Arrival times: Gamma renewal processes and piecewise-rate schedules.

Gaps follow vLLM's benchmark convention (``vllm bench serve --burstiness``):
Gamma(shape = 1/cv², scale = 1/(rate · shape)), so the mean gap is 1/rate and
the coefficient of variation of the gaps is ``cv``; cv = 1 is a Poisson process.

``exact_rate`` (on by default) removes the sampling noise of the request count
without touching the shape of the gaps, as vLLM 0.32 does: a fixed number of
requests is rescaled to span exactly ``num_requests / rate`` seconds, and a
window of a schedule holds exactly ``rate · duration`` requests (rounded
without bias), their gaps rescaled to fit the window, as ServeGen does.
With ``exact_rate=False`` every source is a plain renewal process, restarted at
each window boundary.

All functions are pure: they draw from the numpy Generator they are given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simulator.records.errors import ConfigError, require

FAMILIES = ("gamma", "weibull")
# Times are float64 seconds: up to 2**32 s (~136 years) they keep a resolution of 2**-20 s (~1 us).
MAX_SPAN_S = float(2**32)
# Rates (requests/s) whose gaps stay representable and distinct: 1 request a ~11.6 days .. 1 a ns.
MIN_RATE, MAX_RATE = 1e-6, 1e9
# Memory one request takes through a simulation (workload arrays, engine state, per-request results).
BYTES_PER_REQUEST = 2048


def max_num_requests() -> int:
    """The most requests a workload may hold: what available memory fits at BYTES_PER_REQUEST."""
    import os

    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        available = 16 * 2**30
    return max(1_000_000, int(available // BYTES_PER_REQUEST))


def check_request_count(n: float, field: str) -> None:
    """Refuse a workload of n requests that memory cannot hold, up front."""
    cap = max_num_requests()
    require(
        n <= cap,
        field,
        f"{n:.4g} requests would need ~{n * BYTES_PER_REQUEST / 2**30:.3g} GiB "
        f"({BYTES_PER_REQUEST} bytes each); allowed: at most {cap} on this machine",
    )


def check_span(n: float, rate: float, field: str = "workload.rate") -> None:
    """Refuse a trace whose span n / rate exceeds MAX_SPAN_S (float64 times would lose microseconds)."""
    require(
        n / rate <= MAX_SPAN_S,
        field,
        f"{n:.4g} requests at {rate:g} req/s span {n / rate:.3g} s; allowed: a span of at most "
        f"{MAX_SPAN_S:.4g} s (float64 times keep ~1 us resolution), so rate >= {n / MAX_SPAN_S:.3g}",
    )


@dataclass(frozen=True)
class RateWindow:
    """A stretch of time with a constant arrival rate.

    ``family`` is the law of the gaps: ``gamma`` (shape 1/cv² unless
    ``shape`` is given) or ``weibull`` (``shape`` required, as ServeGen fits
    it). The scale is always set so that the mean gap is 1/rate. A window with
    rate 0 is silent.
    """

    duration_s: float
    rate: float
    cv: float = 1.0
    family: str = "gamma"
    shape: float | None = None

    def __post_init__(self) -> None:
        require(
            math.isfinite(self.duration_s) and self.duration_s > 0,
            "workload.windows.duration_s",
            f"must be a positive number of seconds, got {self.duration_s}",
        )
        require(
            math.isfinite(self.rate) and self.rate >= 0,
            "workload.windows.rate",
            f"must be >= 0 requests/s, got {self.rate}",
        )
        require(self.family in FAMILIES, "workload.windows.family", f"must be one of {FAMILIES}")
        if self.rate > 0:
            check_cv(self.cv, "workload.windows.cv")
        if self.shape is not None:
            require(self.shape > 0, "workload.windows.shape", f"must be > 0, got {self.shape}")
        require(
            self.family != "weibull" or self.shape is not None,
            "workload.windows.shape",
            "is required for weibull windows",
        )

    @property
    def expected_requests(self) -> float:
        return self.rate * self.duration_s


def check_rate(rate: float, field: str = "workload.rate") -> None:
    """Raise ConfigError unless rate is a positive finite number."""
    require(
        isinstance(rate, int | float)
        and not isinstance(rate, bool)
        and math.isfinite(rate)
        and MIN_RATE <= rate <= MAX_RATE,
        field,
        f"must be a positive number of requests/s in [{MIN_RATE:g}, {MAX_RATE:g}] (slower: times lose precision; "
        f"faster: gaps under 1 ns), got {rate!r}",
    )


def check_cv(cv: float, field: str = "workload.cv") -> None:
    """Raise ConfigError unless cv is a positive finite number."""
    require(
        isinstance(cv, int | float) and math.isfinite(cv) and cv > 0,
        field,
        f"must be > 0 (1 = Poisson, > 1 bursty, < 1 regular), got {cv!r}",
    )


def check_size(num_requests: int | None, duration_s: float | None) -> None:
    """Raise ConfigError unless exactly one of num_requests / duration_s is a positive number."""
    require(
        (num_requests is None) != (duration_s is None),
        "workload.num_requests",
        "set exactly one of workload.num_requests and workload.duration_s (the other null), "
        f"got num_requests={num_requests}, duration_s={duration_s}",
    )
    if num_requests is not None:
        require(
            isinstance(num_requests, int)
            and not isinstance(num_requests, bool)
            and num_requests > 0,
            "workload.num_requests",
            f"must be a positive integer, got {num_requests!r}",
        )
        check_request_count(num_requests, "workload.num_requests")
    else:
        require(
            isinstance(duration_s, int | float) and not math.isnan(duration_s) and duration_s > 0,
            "workload.duration_s",
            f"must be a positive number of seconds (.inf: a whole trace), got {duration_s!r}",
        )


def gamma_gaps(rng: np.random.Generator, n: int, rate: float, cv: float) -> np.ndarray:
    """n gaps with mean 1/rate and coefficient of variation cv (vLLM's convention)."""
    shape = 1.0 / cv**2
    return rng.gamma(shape, 1.0 / (rate * shape), size=n)


def window_gaps(rng: np.random.Generator, window: RateWindow, n: int) -> np.ndarray:
    """n gaps drawn from a window's law, with mean 1/rate."""
    if window.family == "weibull":
        k = float(window.shape)  # type: ignore[arg-type]
        return rng.weibull(k, size=n) / (window.rate * math.gamma(1.0 + 1.0 / k))
    shape = window.shape if window.shape is not None else 1.0 / window.cv**2
    return rng.gamma(shape, 1.0 / (window.rate * shape), size=n)


def gamma_arrivals(
    rng: np.random.Generator, rate: float, cv: float, n: int, exact_rate: bool = True
) -> np.ndarray:
    """Arrival times of n requests, as ``vllm bench serve`` sends them.

    The first request arrives after one gap. With exact_rate the cumulative
    gaps are rescaled so that the last request arrives at n / rate.
    """
    check_rate(rate)
    check_cv(cv)
    arrivals = np.cumsum(gamma_gaps(rng, n, rate, cv))
    if exact_rate and n > 0 and arrivals[-1] > 0:
        arrivals *= (n / rate) / arrivals[-1]
    return arrivals


def _count_in_window(rng: np.random.Generator, expected: float) -> int:
    """Round an expected count to an integer without bias."""
    whole = math.floor(expected)
    return whole + int(rng.random() < expected - whole)


def _arrivals_in_window(
    rng: np.random.Generator, window: RateWindow, start: float, exact_rate: bool
) -> np.ndarray:
    """Arrivals in [start, start + duration) of one window."""
    if window.rate <= 0:
        return np.empty(0)
    duration = window.duration_s
    if exact_rate:
        n = _count_in_window(rng, window.expected_requests)
        if n == 0:
            return np.empty(0)
        ends = np.cumsum(window_gaps(rng, window, n + 1))
        return start + ends[:n] * (duration / ends[-1])
    # a renewal process started at the window's start, cut at its end
    spread = 6.0 * math.sqrt(window.expected_requests) * max(window.cv, 1.0)
    draw = int(window.expected_requests + spread) + 16
    ends = np.cumsum(window_gaps(rng, window, draw))
    while ends[-1] < duration:
        ends = np.concatenate([ends, ends[-1] + np.cumsum(window_gaps(rng, window, draw))])
    return start + ends[ends < duration]


def _source_arrivals(
    rng: np.random.Generator, windows: Sequence[RateWindow], horizon_s: float, exact_rate: bool
) -> np.ndarray:
    """Arrivals of one source before horizon_s, its windows repeating in a cycle."""
    chunks = []
    t = 0.0
    i = 0
    while t < horizon_s:
        window = windows[i % len(windows)]
        arrivals = _arrivals_in_window(rng, window, t, exact_rate)
        chunks.append(arrivals[arrivals < horizon_s])
        t += window.duration_s
        i += 1
    return np.concatenate(chunks) if chunks else np.empty(0)


def _expected_count(windows: Sequence[RateWindow], t: float) -> float:
    """Requests a cycle of windows expects before time t."""
    cycle_s = sum(w.duration_s for w in windows)
    cycles, rest = divmod(t, cycle_s)
    expected = cycles * sum(w.expected_requests for w in windows)
    for w in windows:
        expected += w.rate * min(rest, w.duration_s)
        rest -= w.duration_s
        if rest <= 0:
            break
    return expected


def _horizon_for(sources: Sequence[Sequence[RateWindow]], num_requests: int) -> float:
    """A time by which the sources expect num_requests arrivals, plus one window."""
    mean_rate = sum(
        sum(w.expected_requests for w in s) / sum(w.duration_s for w in s) for s in sources
    )
    horizon = num_requests / mean_rate
    while sum(_expected_count(s, horizon) for s in sources) < num_requests:
        horizon *= 1.1
    return horizon + max(w.duration_s for s in sources for w in s)


def superposed_arrivals(
    rng: np.random.Generator,
    sources: Sequence[Sequence[RateWindow]],
    *,
    num_requests: int | None = None,
    duration_s: float | None = None,
    exact_rate: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Merged arrivals of independent sources, each a cycle of windows.

    Give exactly one of num_requests (the first n arrivals) or duration_s
    (arrivals before it). Returns (sorted arrival times, index of the source
    of each arrival).
    """
    check_size(num_requests, duration_s)
    require(
        duration_s is None or math.isfinite(duration_s),
        "workload.duration_s",
        "must be finite for generated arrivals (.inf only replays a whole trace)",
    )
    require(len(sources) > 0 and all(len(s) > 0 for s in sources), "workload.windows", "is empty")
    require(
        any(w.rate > 0 for s in sources for w in s),
        "workload.windows",
        "every window has rate 0, so no request would arrive",
    )
    horizon = float(duration_s) if duration_s is not None else _horizon_for(sources, num_requests)
    while True:
        parts = [_source_arrivals(rng, s, horizon, exact_rate) for s in sources]
        arrivals = np.concatenate(parts)
        if duration_s is not None or len(arrivals) >= num_requests:
            break
        horizon *= 2.0
    source = np.repeat(np.arange(len(sources)), [len(p) for p in parts])
    order = np.argsort(arrivals, kind="stable")
    if num_requests is not None:
        order = order[:num_requests]
    return arrivals[order], source[order]


def piecewise_arrivals(
    rng: np.random.Generator,
    windows: Sequence[RateWindow],
    *,
    num_requests: int | None = None,
    duration_s: float | None = None,
    exact_rate: bool = True,
) -> np.ndarray:
    """Arrivals of one source whose rate changes window by window (windows repeat)."""
    arrivals, _ = superposed_arrivals(
        rng, [windows], num_requests=num_requests, duration_s=duration_s, exact_rate=exact_rate
    )
    return arrivals


def windows_from_config(items: Sequence) -> list[RateWindow]:
    """RateWindows from a list of mappings {duration_s, rate, cv[, family, shape]}."""
    require(
        isinstance(items, Sequence) and not isinstance(items, str) and len(items) > 0,
        "workload.windows",
        "must be a non-empty list of {duration_s, rate, cv}",
    )
    allowed = ("duration_s", "rate", "cv", "family", "shape")
    windows = []
    for i, item in enumerate(items):
        field = f"workload.windows[{i}]"
        require(hasattr(item, "keys"), field, "must be a mapping {duration_s, rate, cv}")
        unknown = sorted(set(item.keys()) - set(allowed))
        require(not unknown, field, f"unknown keys {unknown}; allowed {list(allowed)}")
        require("duration_s" in item and "rate" in item, field, "needs duration_s and rate")
        try:
            values = {
                "duration_s": float(item["duration_s"]),
                "rate": float(item["rate"]),
                "cv": float(item.get("cv", 1.0)),
                "family": str(item.get("family", "gamma")),
                "shape": None if item.get("shape") is None else float(item["shape"]),
            }
        except (TypeError, ValueError):
            raise ConfigError(field, "duration_s, rate, cv and shape must be numbers") from None
        try:
            windows.append(RateWindow(**values))
        except ConfigError as error:
            key = error.field.rsplit(".", 1)[-1]
            raise ConfigError(f"{field}.{key}", str(error).split(": ", 1)[1]) from None
    return windows
