"""Scrape vLLM's Prometheus ``/metrics`` during a live run.

Every sample keeps the gauges (KV usage, running, waiting) and the counters
(preemptions, prefix-cache queries and hits, speculative draft and accepted
tokens, prompt and generation tokens) summed over label sets. The text format
is parsed here without a Prometheus client library.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

#: column name -> vLLM metric (prefix ``vllm:``)
SCRAPED = {
    "kv_usage": "kv_cache_usage_perc",
    "running": "num_requests_running",
    "waiting": "num_requests_waiting",
    "preemptions_total": "num_preemptions_total",
    "prefix_cache_queries_total": "prefix_cache_queries_total",
    "prefix_cache_hits_total": "prefix_cache_hits_total",
    "spec_drafts_total": "spec_decode_num_drafts_total",
    "spec_draft_tokens_total": "spec_decode_num_draft_tokens_total",
    "spec_accepted_tokens_total": "spec_decode_num_accepted_tokens_total",
    "prompt_tokens_total": "prompt_tokens_total",
    "generation_tokens_total": "generation_tokens_total",
    "requests_finished_total": "request_success_total",
}
METRIC_COLUMNS = ("time_s", *SCRAPED)

_SAMPLE_RE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """Each sample of a ``/metrics`` page as (name, labels, value); comments, bad lines and NaN skipped."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if m is None:
            continue
        try:
            value = float(m["value"])
        except ValueError:
            continue
        if math.isnan(value):
            continue
        yield m["name"], dict(_LABEL_RE.findall(m["labels"] or "")), value


def parse_prometheus(text: str) -> dict[str, float]:
    """Metric name -> value summed over its label sets (comments and bad lines skipped)."""
    out: dict[str, float] = {}
    for name, _, value in samples(text):
        out[name] = out.get(name, 0.0) + value
    return out


def parse_labels(text: str, metric: str) -> dict[str, str]:
    """The labels of the first sample of ``metric`` (e.g. ``vllm:cache_config_info``)."""
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            m = _SAMPLE_RE.match(line)
            if m and m["labels"]:
                return dict(_LABEL_RE.findall(m["labels"]))
    return {}


def histogram_buckets(text: str, metric: str) -> dict[float, float]:
    """Cumulative bucket counts ``le -> count`` of a Prometheus histogram, summed over labels."""
    out: dict[float, float] = {}
    for line in text.splitlines():
        if not line.startswith(metric + "_bucket{"):
            continue
        m = _SAMPLE_RE.match(line)
        if m is None or not m["labels"]:
            continue
        labels = dict(_LABEL_RE.findall(m["labels"]))
        le = labels.get("le")
        if le is None:
            continue
        edge = math.inf if le == "+Inf" else float(le)
        with contextlib.suppress(ValueError):
            out[edge] = out.get(edge, 0.0) + float(m["value"])
    return dict(sorted(out.items()))


def sample(text: str) -> dict[str, float]:
    """One row of METRIC_COLUMNS (without time) from a /metrics page; NaN where absent."""
    values = parse_prometheus(text)
    return {col: values.get("vllm:" + name, math.nan) for col, name in SCRAPED.items()}


@dataclass
class MetricsScraper:
    """Polls ``{url}/metrics`` every ``interval_s`` until stopped; times relative to ``t0``."""

    url: str
    t0: float
    interval_s: float = 0.5
    rows: list[dict[str, float]] = field(default_factory=list)
    errors: int = 0
    last_text: str = ""
    first_text: str = ""

    async def scrape_once(self, client) -> None:
        try:
            response = await client.get(f"{self.url}/metrics", timeout=5.0)
            response.raise_for_status()
        except Exception:
            self.errors += 1
            return
        text = response.text
        row = {"time_s": time.monotonic() - self.t0, **sample(text)}
        self.rows.append(row)
        if not self.first_text:
            self.first_text = text
        self.last_text = text

    async def run(self, client, stop: asyncio.Event) -> None:
        """Scrape until ``stop`` is set, then once more."""
        while not stop.is_set():
            started = time.monotonic()
            await self.scrape_once(client)
            delay = max(0.05, self.interval_s - (time.monotonic() - started))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
        await self.scrape_once(client)

    def table(self) -> dict[str, np.ndarray]:
        """The samples as columns (METRIC_COLUMNS)."""
        return {c: np.array([r.get(c, math.nan) for r in self.rows], dtype=float) for c in METRIC_COLUMNS}

    def delta(self, column: str) -> float | None:
        """Increase of a counter over the scraped period (None if never seen)."""
        v = self.table()[column]
        v = v[np.isfinite(v)]
        return float(v[-1] - v[0]) if v.size else None
