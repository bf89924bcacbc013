"""With ``perf=profile`` the profiled engine's settings are the run's defaults.

A profile records the engine it measured (``simulator.records.profile.engine_settings``:
block size, max_num_seqs, max_num_batched_tokens, max_model_len, chunked
prefill, prefix caching, async scheduling; its KV capacity comes with the fit).
A simulation of it runs those settings unless the command line sets one
(``engine.max_num_seqs=64``); each such difference is stated in one line, in
the run's metadata and on stderr, because the profile did not measure it.
"""

from __future__ import annotations

from typing import Any


def given_engine_keys(overrides: list[str]) -> set[str]:
    """Engine settings the command line sets (``engine.KEY=value``)."""
    keys = set()
    for item in overrides:
        key = item.lstrip("+~").split("=", 1)[0]
        if key.startswith("engine.") and "=" in item:
            keys.add(key.split(".", 2)[1])
    return keys


def profiled_engine(engine: dict[str, Any], settings: dict[str, Any], overrides: list[str],
                    kv_blocks: int | None = None) -> tuple[dict[str, Any], str]:
    """(the engine group with the profile's settings as defaults, one line saying what differs).

    ``kv_blocks``: the profile's KV capacity, for the line when the command line changes it.
    """
    given = given_engine_keys(overrides)
    merged = dict(engine)
    differs = []
    for key, value in settings.items():
        if key in given:
            if merged.get(key) != value:
                differs.append(f"engine.{key}={_text(merged.get(key))} (the profile ran {_text(value)})")
        else:
            merged[key] = value
    if "num_gpu_blocks_override" in given and merged.get("num_gpu_blocks_override") and kv_blocks:
        differs.append(f"engine.num_gpu_blocks_override={merged['num_gpu_blocks_override']} "
                       f"(the profile ran {kv_blocks} KV blocks)")
    if not differs:
        return merged, "engine settings: the profile's"
    return merged, "engine settings: the profile's, except " + "; ".join(differs)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)
