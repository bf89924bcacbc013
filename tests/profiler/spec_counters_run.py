"""Run the tiny model with n-gram speculation in vLLM's offline engine and print, as JSON, the
per-request drafted and accepted tokens the profiler's hook sees (profiler/engine.py reads
them the same way) and vLLM's own spec-decode counters (LLM.get_metrics). For
tests/profiler/test_spec_counters.py; run as a script in the engine environment."""

from __future__ import annotations

import json
import os

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["HF_HUB_OFFLINE"] = "1"


def main() -> None:
    from vllm import LLM, SamplingParams

    from profiler.live.server import resolve_model
    from profiler.tiny_model import engine_dtype

    model = resolve_model("tiny-llama")
    llm = LLM(model=model, dtype=engine_dtype(model) or "auto", enforce_eager=True, block_size=32, max_model_len=1024,
              speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
                                  "prompt_lookup_min": 2},
              disable_log_stats=False, seed=0)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    seen: list[tuple[int, int]] = []
    update = scheduler.update_from_output

    def hook(scheduler_output, model_output):
        spec = scheduler_output.scheduled_spec_decode_tokens
        if spec and model_output is not None:
            index, sampled = model_output.req_id_to_index, model_output.sampled_token_ids
            for rid, tokens in spec.items():
                if rid in index and index[rid] < len(sampled):
                    seen.append((len(tokens), max(0, len(sampled[index[rid]]) - 1)))
        return update(scheduler_output, model_output)

    scheduler.update_from_output = hook
    prompts = [{"prompt_token_ids": [5 + (j % (3 + i)) for j in range(60)]} for i in range(6)]
    llm.generate(prompts, SamplingParams(max_tokens=80, min_tokens=80, ignore_eos=True, temperature=0))
    vllm = {m.name: (list(m.values) if hasattr(m, "values") else m.value)
            for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode")}
    print(json.dumps({"seen": seen, "vllm": vllm}))


if __name__ == "__main__":
    main()
