"""A cluster's tables and summary: the single-replica ones with a ``replica`` column.

``requests`` has one row per request of the workload (by request id): the
replica that generated it (``replica``); disaggregated, also the prefill
replica and the KV transfer time, and the latencies counted from the arrival at
the cluster (simulator.cluster.disagg). ``timeline`` is every replica's step
log, replica after replica. The summary is a single run's, over all requests,
with KV usage per replica folded (mean of the replicas' time-weighted means,
the peak of any, seconds above 95% summed), plus ``cluster`` (the layout) and
``replicas`` (each replica's own summary).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from simulator.engine.request import Status
from simulator.engine.run_log import EngineRun, StepLog
from simulator.engine.tabulate import kv_usage, tabulate, timeline_columns
from simulator.records.metrics import SLO, summarize
from simulator.records.run_result import RunResult

if TYPE_CHECKING:
    from simulator.cluster.cluster import Cluster, ClusterSpec

@dataclass
class ClusterResult:
    """The merged run (tables with a ``replica`` column, the cluster summary) and each replica's."""

    result: RunResult
    replicas: list[RunResult]
    #: which path ran the replicas ("compiled", "python"; a single replica: ``simulate``'s path)
    engine_path: str = ""
    #: why the compiled path was not taken, where it was asked for (``compiled=True``)
    not_compiled: str = ""



#: per-request columns a disaggregated run adds after ``replica``
DISAGG_COLUMNS = ("prefill_replica", "kv_transfer_s")


def _requests(results: list[RunResult], replicas: list[int]) -> dict[str, np.ndarray]:
    """The replicas' request tables, one after the other, with the ``replica`` column."""
    out = _stack(results)
    out["replica"] = np.concatenate([np.full(len(r.requests["status"]), i, dtype=np.int32)
                                     for r, i in zip(results, replicas, strict=True)])
    return out


def joined_timeline(runs: list[EngineRun]) -> tuple[dict[str, np.ndarray], list[int]]:
    """The replicas' timeline tables, one after the other (without the ``replica`` column), and
    the first row of each (then the number of rows): the cluster's steps in memory once."""
    steps, starts = StepLog.join([run.steps for run in runs])
    usage = np.empty(starts[-1])
    for i, run in enumerate(runs):
        a, b = starts[i], starts[i + 1]
        kv_usage(steps["kv_blocks_used"][a:b], run.kv.num_blocks, out=usage[a:b])
    return timeline_columns(steps, usage), starts


def merge(cluster: Cluster, per_replica: list[RunResult], slo: SLO, timeline: dict[str, np.ndarray]) -> RunResult:
    """The cluster's RunResult from its replicas' and its timeline (``joined_timeline``, with the
    ``replica`` column)."""
    indices = [r.index for r in cluster.replicas]
    if cluster.decode is None:
        requests = _requests(per_replica, indices)
        order = np.argsort(requests["request_id"], kind="stable")
        requests = {k: v[order] for k, v in requests.items()}
        front = per_replica
    else:
        p = len(cluster.front.replicas)
        requests = _disaggregated(cluster, per_replica[:p], per_replica[p:])
        front = per_replica[:p]
    end_s = max((r.end_s for r in cluster.replicas), default=0.0)
    kv = [r.summary["kv_usage"] for r in per_replica]
    summary = summarize(requests, timeline, slo, end_s, kv={  # folded: the replicas' timelines are not one series
        "mean": float(np.mean([k["mean"] for k in kv])),
        "peak": float(max(k["peak"] for k in kv)),
        "std": float(np.mean([k["std"] for k in kv])),
        "seconds_above_95pct": float(sum(k["seconds_above_95pct"] for k in kv)),
    })
    summary["kv_cache"] = per_replica[0].summary["kv_cache"]
    queried = sum(r.summary["prefix_cache"]["queried_tokens"] for r in front)
    hits = sum(r.summary["prefix_cache"]["hit_tokens"] for r in front)
    summary["prefix_cache"] = {"queried_tokens": queried, "hit_tokens": hits,
                               "hit_rate": hits / queried if queried else 0.0}
    summary["cluster"] = describe(cluster.spec, cluster)
    summary["replicas"] = [r.summary for r in per_replica]
    return RunResult(requests=requests, timeline=timeline, summary=summary)


def describe(spec: ClusterSpec, cluster: Cluster | None = None) -> dict:
    """The layout, as the summary records it (lock-step only where the replicas step together)."""
    out = asdict(spec)
    del out["dp_lockstep"]
    if out.pop("lockstep"):
        out["lockstep"] = True  # (data-parallel lock-step: simulator.cluster.lockstep)
    if cluster is not None:
        out["requests_per_replica"] = [int(r.count) for r in cluster.replicas]
        if cluster.transfer is not None:
            out["link_gbps"] = cluster.transfer.link_gbps
            out["kv_bytes_per_token"] = cluster.transfer.bytes_per_token
            out["ttft_definition"] = ("arrival at the cluster to the first token streamed by the decode replica: "
                                      "prefill queue + prefill + KV transfer + decode queue + first decode step")
    return out


def _disaggregated(cluster: Cluster, prefill: list[RunResult], decode: list[RunResult]) -> dict[str, np.ndarray]:
    """One row per request: the decode replica's, with the latencies counted from the arrival at
    the cluster; a request that never reached a decode replica keeps its prefill row."""
    n = len(cluster.workload)
    p_rows = _by_request(prefill, n)
    ids = np.flatnonzero(p_rows >= 0)  # every request, but those not arrived in a stopped run
    p_rows = p_rows[ids]
    d_rows = _by_request(decode, n)[ids]
    p_cols = _stack(prefill)
    d_cols = _stack(decode)
    handed = d_rows >= 0
    out = {}
    for name in p_cols:
        column = p_cols[name][p_rows].copy()
        if name not in ("arrival_s", "queue_s", "prompt_tokens", "request_id", "domain"):
            column[handed] = d_cols[name][d_rows[handed]]
        out[name] = column
    arrival = out["arrival_s"]
    d_arrival = d_cols["arrival_s"][d_rows[handed]]
    for name in ("ttft_s", "ttfvt_s", "e2e_s"):
        out[name][handed] = d_cols[name][d_rows[handed]] + (d_arrival - arrival[handed])
    for name in ("preemptions", "kv_block_seconds"):
        out[name][handed] += p_cols[name][p_rows[handed]]
    # a stopped run: prefills done, their KV still in transfer, are unfinished requests
    moving = ~handed & (out["status"] == "completed")
    out["status"][moving] = "unfinished"
    for name in ("ttft_s", "ttfvt_s", "tpot_s", "e2e_s"):
        out[name][moving] = np.nan
    mine = np.zeros(n, dtype=bool)
    mine[ids] = True
    out["replica"] = cluster.replica_of[ids].astype(np.int32)
    out["replica"][~handed] = _prefill_index(cluster, mine)[~handed]  # never reached a decode replica
    out["prefill_replica"] = _prefill_index(cluster, mine)
    out["kv_transfer_s"] = cluster.transfer_s[ids].copy()
    return out


def _prefill_index(cluster: Cluster, mask: np.ndarray) -> np.ndarray:
    """The prefill replica of each request in ``mask``."""
    index = np.full(len(mask), -1, dtype=np.int32)
    for replica in cluster.front.replicas:
        gids = replica.column("gid")
        index[gids] = replica.index
    return index[mask]


def _stack(results: list[RunResult]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([r.requests[name] for r in results]) for name in results[0].requests}


def _by_request(results: list[RunResult], n: int) -> np.ndarray:
    """Row of each request id in the stacked tables of ``results`` (-1: none)."""
    rows = np.full(n, -1, dtype=np.int64)
    ids = np.concatenate([r.requests["request_id"] for r in results]).astype(np.int64)
    rows[ids] = np.arange(len(ids))
    return rows


def single(workload, engine, perf, spec: ClusterSpec, *, slo: SLO, seed: int, fast: bool,
           async_scheduling: bool | None, progress: bool = False, stop_on_interrupt: bool = False,
           compiled: bool | str = "auto") -> ClusterResult:
    """One plain replica: ``simulator.engine.loop.simulate``'s result, with a ``replica`` column."""
    from simulator.engine.loop import simulate

    result = simulate(workload, engine, perf, slo=slo, seed=seed, fast=fast, async_scheduling=async_scheduling,
                      progress=progress, stop_on_interrupt=stop_on_interrupt, compiled=compiled)
    merged = RunResult(requests={**result.requests, "replica": np.zeros(len(result.requests["request_id"]), np.int32)},
                       timeline={**result.timeline, "replica": np.zeros(len(result.timeline["time_s"]), np.int32)},
                       summary={**result.summary, "cluster": describe(spec), "replicas": [result.summary]})
    return ClusterResult(merged, [result], result.engine_path, result.not_compiled)


def results(cluster: Cluster, slo: SLO) -> ClusterResult:
    """A cluster's result (``Cluster``'s or ``CompiledCluster``'s) once its replicas have run: each
    replica's tables and summary, and the merged ones."""
    per_replica = []
    runs = [replica.collect() for replica in cluster.replicas]
    timeline, starts = joined_timeline(runs)  # each replica's table: a view of it
    for i, (replica, run) in enumerate(zip(cluster.replicas, runs, strict=True)):
        rows = slice(starts[i], starts[i + 1])
        unfinished = [r for r in run.requests if r.status < Status.FINISHED]
        if unfinished and not cluster.stopped:
            raise RuntimeError(f"replica {replica.index}: {len(unfinished)} requests never finished")
        gids = replica.column("gid").copy()
        result = tabulate(run, SimpleNamespace(domain=cluster.workload.domain[gids]), slo,
                          timeline={name: column[rows] for name, column in timeline.items()})
        result.requests["request_id"] = gids[result.requests["request_id"]]
        result.summary["replica"] = replica.index
        result.summary["role"] = replica.role
        result.summary["async_scheduling"] = replica.async_scheduling
        if cluster.lockstep is not None:
            result.summary["dummy_steps"] = cluster.lockstep.dummy_steps[replica.index]
        if replica.shapes is not None:  # as a single run's summary (simulator.engine.loop.simulate)
            result.summary["shape_cache"] = replica.shapes.report()
        per_replica.append(result)
    timeline["replica"] = np.repeat(np.array([r.index for r in cluster.replicas], dtype=np.int32), np.diff(starts))
    merged = merge(cluster, per_replica, slo, timeline)
    if cluster.stopped:
        merged.summary["partial"] = {
            "interrupted_at_s": cluster.env.now,
            "unfinished": int((merged.requests["status"] == "unfinished").sum()),
            "not_arrived": len(cluster.workload) - len(merged.requests["request_id"]),
        }
    return ClusterResult(merged, per_replica)
