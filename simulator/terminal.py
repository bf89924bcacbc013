"""The run's summary as the terminal shows it (a single run's and a cluster's)."""

from __future__ import annotations

from pathlib import Path

from simulator.records.summary import Summary


def print_summary(summary: Summary, out_dir: Path) -> None:
    """A short text summary for the terminal."""

    def ms(stat: dict, key: str) -> str:
        v = stat.get(key)
        return "-" if v is None else (f"{v * 1000:.0f} ms" if v < 1 else f"{v:.2f} s")

    s = summary
    kv = s.kv_usage
    lines = [
        f"requests   {summary['completed']} completed, {summary['rejected']} rejected"
        + (f", {summary['aborted']} aborted (client timeout)" if summary.get("aborted") else "")
        + f" over {summary['duration_s']:.0f} s",
        *(f"  rejected {n}: {reason}" for reason, n in summary.get("rejected_by_reason", {}).items()),
        f"TTFT       p50 {ms(summary['ttft_s'], 'p50')}  p99 {ms(summary['ttft_s'], 'p99')}",
        f"TTFVT      p50 {ms(summary['ttfvt_s'], 'p50')}  p99 {ms(summary['ttfvt_s'], 'p99')}",
        f"TPOT       p50 {ms(summary['tpot_s'], 'p50')}  p99 {ms(summary['tpot_s'], 'p99')}",
        f"E2E        p50 {ms(summary['e2e_s'], 'p50')}  p99 {ms(summary['e2e_s'], 'p99')}",
        *client_lines(summary, ms),
        f"KV cache   mean {kv['mean']:.1%}  peak {kv['peak']:.1%}  "
        f"{kv['seconds_above_95pct']:.0f} s above 95%",
        f"preempted  {s.preemptions} preemptions of {s.requests_preempted} requests",
        f"throughput {s.throughput['output_tokens_per_s']:.0f} output tok/s, "
        f"{s.throughput['requests_per_s']:.3f} req/s",
        f"goodput    {s.goodput['requests_per_s']:.3f} req/s ({s.goodput['attainment']:.1%} meet the SLO)",
        f"stragglers slowest 5% hold {s.stragglers['kv_block_seconds_share']:.1%} of "
        f"KV block-seconds, E2E {s.stragglers['e2e_over_median']:.1f}x the median",
        f"results    {out_dir}",
    ]
    print("\n".join(lines))


def client_lines(summary: dict, ms) -> list[str]:
    """TTFT as a client sees it (engine + front end), when the summary has it."""
    client = summary.get("client_observed")
    if not client:
        return []
    return [f"client TTFT p50 {ms(client['ttft_s'], 'p50')}  p99 {ms(client['ttft_s'], 'p99')}  "
            f"(engine + front end {1e3 * client['frontend_s']:.1f} ms)"]
