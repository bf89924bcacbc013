"""Summaries of a steps table: repeat noise, prefix-cache hits, speculative acceptance.

Pure functions over the steps table (pandas), written into profile.json.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def repeat_spread(steps: pd.DataFrame) -> dict[str, Any]:
    """How much repeats of the same grid point differ: (max - min) / median per point."""
    measured = steps[steps["phase"].isin(["prefill", "decode"]) & (steps["rep"] >= 0)]
    spreads = []
    for _, group in measured.groupby("point_id"):
        if len(group) >= 2:
            wall = group["wall_s"].to_numpy()
            spreads.append(float((wall.max() - wall.min()) / np.median(wall)))
    if not spreads:
        return {"points": 0}
    arr = np.array(spreads)
    return {"points": len(arr), "median": float(np.median(arr)), "p90": float(np.quantile(arr, 0.9))}


def cpu_share(steps: pd.DataFrame) -> float | None:
    """CPU time over wall time of all steps: well below the bound thread count means the
    profiler shared its cores with something else (noisy numbers)."""
    wall = float(steps["wall_s"].sum())
    return float(steps["cpu_s"].sum()) / wall if wall > 0 else None


def disturbed_share(steps: pd.DataFrame) -> float:
    """Share of steps during which another process took the engine's core."""
    return float(steps["disturbed"].mean()) if len(steps) else 0.0


def prefix_summary(steps: pd.DataFrame) -> dict[str, Any] | None:
    """Hit rate of the prefix phase and the time of cached vs uncached prompts per point."""
    rows = steps[steps["phase"] == "prefix"]
    if rows.empty:
        return None
    cached = int(rows["prefill_cached"].map(sum).sum())
    computed = int(rows["num_prefill_tokens"].sum())
    points = []
    for point_id, group in rows.groupby("point_id", sort=False):
        miss = group[group["rep"] == 0]
        hits = group[group["rep"] > 0]
        per_hit = hits.groupby("rep")["wall_s"].sum()
        hit_cached = int(hits["prefill_cached"].map(sum).sum())
        hit_prompt = hit_cached + int(hits["num_prefill_tokens"].sum())
        points.append({
            "point_id": point_id,
            "miss_prefill_s": float(miss["wall_s"].sum()),
            "miss_tokens": int(miss["num_prefill_tokens"].sum()),
            "hit_prefill_s_median": float(per_hit.median()) if len(per_hit) else None,
            "hit_cached_tokens_per_request": hit_cached / max(1, len(per_hit)),
            "hit_rate_of_hits": hit_cached / hit_prompt if hit_prompt else 0.0,
            "speedup": float(miss["wall_s"].sum() / per_hit.median()) if len(per_hit) else None,
        })
    return {
        "hit_rate": cached / (cached + computed) if cached + computed else 0.0,
        "cached_tokens": cached,
        "computed_tokens": computed,
        "points": points,
    }


def spec_summary(steps: pd.DataFrame, num_speculative_tokens: int) -> dict[str, Any] | None:
    """Draft proposal rate, acceptance per draft position, drafting time and verify step times."""
    if num_speculative_tokens <= 0:
        return None
    decoding = steps[(steps["num_decode_seqs"] > 0) & (steps["phase"] != "warmup")]
    drafted = np.concatenate([np.asarray(v, dtype=np.int64) for v in decoding["decode_spec_tokens"]] or [np.zeros(0, np.int64)])
    accepted = np.concatenate([np.asarray(v, dtype=np.int64) for v in decoding["decode_accepted_tokens"]] or [np.zeros(0, np.int64)])
    per_position = []
    for pos in range(num_speculative_tokens):
        offered = drafted > pos
        per_position.append(float(np.mean(accepted[offered] > pos)) if offered.any() else None)
    conditional = []
    for pos in range(num_speculative_tokens):
        reached = (drafted > pos) & (accepted >= pos)
        conditional.append(float(np.mean(accepted[reached] > pos)) if reached.any() else None)
    spec_rows = steps[steps["phase"] == "spec"]
    with_drafts = spec_rows[spec_rows["num_spec_tokens"] > 0]
    without = spec_rows[(spec_rows["num_spec_tokens"] == 0) & (spec_rows["num_decode_seqs"] > 0)]
    offered = drafted > 0  # vLLM's SpecDecodingStats.observe_draft, once per request step with a draft
    counters = {"num_drafts": int(offered.sum()), "num_draft_tokens": int(drafted.sum()),
                "num_accepted_tokens": int(accepted[offered].sum()),
                "accepted_per_pos": [int(np.sum(accepted[offered] > p)) for p in range(num_speculative_tokens)]}
    return {
        "num_speculative_tokens": num_speculative_tokens,
        "vllm_counters": counters,
        "decode_entries": int(len(drafted)),
        "proposal_rate": float(np.mean(drafted > 0)) if len(drafted) else 0.0,
        "draft_tokens": int(drafted.sum()),
        "accepted_tokens": int(accepted.sum()),
        "acceptance_rate": float(accepted.sum() / drafted.sum()) if drafted.sum() else 0.0,
        "acceptance_per_position": per_position,
        "acceptance_per_position_given_previous": conditional,
        "mean_accepted_per_draft": float(accepted[drafted > 0].mean()) if (drafted > 0).any() else 0.0,
        "draft_s_per_step_median": float(spec_rows["draft_s"].median()) if len(spec_rows) else 0.0,
        "verify_step_s_median": float(with_drafts["wall_s"].median()) if len(with_drafts) else None,
        "plain_decode_step_s_median": float(without["wall_s"].median()) if len(without) else None,
    }


def kv_usage_summary(steps: pd.DataFrame) -> dict[str, Any]:
    return {
        "max_usage": float(steps["kv_usage"].max()) if len(steps) else 0.0,
        "max_blocks_used": int(steps["kv_blocks_used"].max()) if len(steps) else 0,
        "preemptions": int(steps["num_preempted"].sum()) if len(steps) else 0,
    }
