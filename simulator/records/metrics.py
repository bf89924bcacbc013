"""Per-request metrics and the run summary, from plain arrays.

The same functions summarise simulated and live runs, so that the two compare
column for column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.records.summary import Goodput, KVUsage, Percentiles, Stragglers, Summary

REQUEST_COLUMNS = (
    "request_id", "arrival_s", "domain", "prompt_tokens", "output_tokens", "reasoning_tokens",
    "status", "queue_s", "ttft_s", "ttfvt_s", "tpot_s", "e2e_s", "finish_s", "preemptions",
    "kv_block_seconds", "reject_reason",
)
TIMELINE_COLUMNS = (
    "time_s", "step_time_s", "running", "waiting", "kv_blocks_used", "kv_usage",
    "prefill_tokens", "decode_tokens", "batch_size", "preempted",
)


@dataclass(frozen=True)
class SLO:
    """Latency limits a request must meet to count towards goodput (None: no limit)."""

    ttft_s: float | None = None
    ttfvt_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    attainment: float = 0.9

    @classmethod
    def from_dict(cls, data) -> SLO:
        data = dict(data or {})
        from simulator.records.errors import ConfigError

        allowed = {"ttft_s", "ttfvt_s", "tpot_s", "e2e_s", "attainment"}
        bad = set(data) - allowed
        if bad:
            raise ConfigError("slo", f"unknown fields {sorted(bad)}; allowed: {sorted(allowed)}")
        for key, value in data.items():
            if value is not None and not float(value) > 0:
                raise ConfigError(f"slo.{key}", "must be > 0 or null")
        return cls(**data)


def percentiles(values: np.ndarray) -> Percentiles:
    """{p50, p90, p99, mean} of the finite values (None when there are none)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(v.mean())}


def time_weighted_kv(time_s: np.ndarray, usage: np.ndarray, end_s: float) -> KVUsage:
    """Mean, peak, std and seconds above 95% of a step-wise KV usage series.

    Usage ``usage[i]`` holds from ``time_s[i]`` until the next sample (the last
    until ``end_s``); before the first sample the cache is empty.
    """
    t = np.asarray(time_s, dtype=float)
    u = np.asarray(usage, dtype=float)
    if t.size == 0:
        return {"mean": 0.0, "peak": 0.0, "std": 0.0, "seconds_above_95pct": 0.0}
    end = max(end_s, float(t[-1]))
    total = end  # from 0: the cache is empty before the first sample
    if total <= 0:
        return {"mean": float(u.mean()), "peak": float(u.max()), "std": float(u.std()),
                "seconds_above_95pct": 0.0}
    # in pieces of CHUNK samples: a million-step timeline needs no timeline-sized temporaries
    weighted = above = 0.0
    for a, dt in _holding_times(t, end):
        ui = u[a : a + len(dt)]
        weighted += float((ui * dt).sum())  # (np.dot would start BLAS threads)
        above += float(dt[ui > 0.95].sum())
    mean = weighted / total
    spread = 0.0
    for a, dt in _holding_times(t, end):
        d = u[a : a + len(dt)] - mean
        d *= d
        d *= dt
        spread += float(d.sum())
    return {
        "mean": mean,
        "peak": float(u.max()),
        "std": (spread / total) ** 0.5,
        "seconds_above_95pct": above,
    }


CHUNK = 1 << 16


def _holding_times(t: np.ndarray, end: float):
    """(first index, how long samples a, a+1, ... hold) for consecutive pieces of ``t``."""
    n = len(t)
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        stop = min(b, n - 1)  # samples a..stop-1 are followed by another
        dt = np.empty(b - a)
        np.subtract(t[a + 1 : stop + 1], t[a:stop], out=dt[: stop - a])
        if b == n:
            dt[-1] = end - t[-1]  # the last sample holds until the end
        yield a, dt


def goodput(requests: dict[str, np.ndarray], slo: SLO, duration_s: float) -> Goodput:
    """Requests per second meeting every SLO limit, and their share."""
    done = requests["status"] == "completed"
    good = done.copy()
    for key in ("ttft_s", "ttfvt_s", "tpot_s", "e2e_s"):
        limit = getattr(slo, key)
        if limit is not None:
            values = np.nan_to_num(requests[key].astype(float), nan=0.0)
            good &= values <= limit
    n = int(good.sum())
    total = len(good)
    return {
        "good_requests": n,
        "requests_per_s": n / duration_s if duration_s > 0 else 0.0,
        "attainment": n / total if total else 0.0,
        "meets_slo": bool(total and n / total >= slo.attainment),
    }


def stragglers(e2e_s: np.ndarray, block_seconds: np.ndarray, share: float = 0.05) -> Stragglers:
    """KV block-seconds held by the slowest ``share`` of requests, and their E2E over the median."""
    e2e = np.asarray(e2e_s, dtype=float)
    bs = np.asarray(block_seconds, dtype=float)
    ok = np.isfinite(e2e)
    e2e, bs = e2e[ok], bs[ok]
    if e2e.size == 0:
        return {"share_of_requests": share, "kv_block_seconds_share": 0.0, "e2e_over_median": 0.0,
                "count": 0}
    k = max(1, int(np.ceil(share * e2e.size)))
    slow = np.argsort(e2e, kind="stable")[-k:]
    total = bs.sum()
    median = float(np.median(e2e))
    return {
        "share_of_requests": share,
        "count": int(k),
        "kv_block_seconds_share": float(bs[slow].sum() / total) if total > 0 else 0.0,
        "e2e_over_median": float(e2e[slow].mean() / median) if median > 0 else 0.0,
    }


def summarize(requests: dict[str, np.ndarray], timeline: dict[str, np.ndarray], slo: SLO,
              end_s: float, kv: KVUsage | None = None) -> Summary:
    """The run's summary (summary.json without config and provenance); ``kv``: its KV usage where
    the caller has it (a cluster's, folded from its replicas'), else from the timeline."""
    status = requests["status"]
    done = status == "completed"
    first = float(np.min(requests["arrival_s"])) if len(status) else 0.0
    duration = max(end_s - first, 1e-9)
    out_tokens = float(requests["output_tokens"][done].sum())
    if kv is None:
        kv = time_weighted_kv(timeline["time_s"], timeline["kv_usage"], end_s)
    return Summary(
        requests=int(len(status)),
        completed=int(done.sum()),
        rejected=int((status == "rejected").sum()),
        aborted=int((status == "aborted").sum()),  # the client's timeout ran out (workload.timeout_s)
        failed=int((status == "failed").sum()),
        duration_s=duration,
        ttft_s=percentiles(requests["ttft_s"][done]),
        ttfvt_s=percentiles(requests["ttfvt_s"][done]),
        tpot_s=percentiles(requests["tpot_s"][done]),
        e2e_s=percentiles(requests["e2e_s"][done]),
        queue_s=percentiles(requests["queue_s"][done]),
        kv_usage=kv,
        preemptions=int(requests["preemptions"].sum()),
        requests_preempted=int((requests["preemptions"] > 0).sum()),
        throughput={
            "output_tokens_per_s": out_tokens / duration,
            "requests_per_s": float(done.sum()) / duration,
        },
        goodput=goodput(requests, slo, duration),
        stragglers=stragglers(requests["e2e_s"][done], requests["kv_block_seconds"][done]),
        running_peak=int(timeline["running"].max()) if len(timeline["running"]) else 0,
        waiting_peak=int(timeline["waiting"].max()) if len(timeline["waiting"]) else 0,
        steps=int(len(timeline["time_s"])),
    )
