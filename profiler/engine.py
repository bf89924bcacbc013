"""EngineSession: one in-process vLLM V1 engine, stepped by hand and observed step by step.

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Each
``step()`` times one ``LLMEngine.step()`` (schedule, forward, sample, output
processing) and reads the batch it ran from the scheduler's own output
(``SchedulerOutput``): per request, the tokens scheduled, the tokens already
computed (context) and the speculative draft tokens; and, from the model
runner's output, how many drafts were accepted. vLLM is imported lazily: call
``profiler.engine_env.prepare_process`` first.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profiler.device_memory import process_rss_bytes
from simulator.records.errors import ConfigError


class EngineOutOfMemory(Exception):
    """The engine ran out of device (or host) memory in a step."""


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    name = type(err).__name__
    return name == "OutOfMemoryError" or "out of memory" in str(err).lower()


def one_line(text: str, limit: int = 400) -> str:
    """An exception message as one line (vLLM's validation errors span several)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(("For further information", "[type=", "Traceback"))]
    line = re.sub(r"\s+", " ", " | ".join(useful or lines))
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass
class StepComposition:
    """The batch of one step, read from a SchedulerOutput (pre-step token counts)."""

    prefill_tokens: list[int]
    prefill_context: list[int]
    prefill_cached: list[int]
    decode_ids: list[str]
    decode_context: list[int]
    decode_spec_tokens: list[int]
    prefill_ids: list[str]
    num_tokens: int
    num_preempted: int


def read_composition(scheduler_output: Any, prompt_lens: dict[str, int]) -> StepComposition:
    """Split a SchedulerOutput into prefill chunks and decodes.

    A request decodes when its prompt is computed and it gets exactly one new
    token (plus drafts); anything else (a prompt chunk, a recompute after
    preemption) is prefill. Context is the request's ``num_computed_tokens``
    before the step; a decode's context also counts the token it computes.
    """
    computed: dict[str, int] = {}
    cached: dict[str, int] = {}
    for new in scheduler_output.scheduled_new_reqs:
        computed[new.req_id] = int(new.num_computed_tokens)
        cached[new.req_id] = int(new.num_computed_tokens)
    old = scheduler_output.scheduled_cached_reqs
    for req_id, num in zip(old.req_ids, old.num_computed_tokens, strict=False):
        computed[req_id] = int(num)
    spec_tokens = scheduler_output.scheduled_spec_decode_tokens or {}
    comp = StepComposition([], [], [], [], [], [], [], int(scheduler_output.total_num_scheduled_tokens),
                           len(scheduler_output.preempted_req_ids or ()))
    for req_id, scheduled in scheduler_output.num_scheduled_tokens.items():
        drafts = len(spec_tokens.get(req_id, ()))
        main = int(scheduled) - drafts
        done = computed.get(req_id, 0)
        if main == 1 and done >= prompt_lens.get(req_id, 0):
            comp.decode_ids.append(req_id)
            comp.decode_context.append(done + 1)
            comp.decode_spec_tokens.append(drafts)
        else:
            comp.prefill_ids.append(req_id)
            comp.prefill_tokens.append(int(scheduled))
            comp.prefill_context.append(done)
            comp.prefill_cached.append(cached.get(req_id, 0))
    return comp


class EngineSession:
    """A vLLM engine in this process, with hooks that record what each step ran."""

    #: a step on one bound CPU thread is "disturbed" when its wall time exceeds its CPU time by this
    DISTURBED_RATIO = 1.25
    DISTURBED_SLACK_S = 0.001

    def __init__(self, llm_kwargs: dict[str, Any], optimization: str, has_engine_args: bool,
                 single_cpu_thread: bool = False):
        from vllm import LLM

        self.llm_kwargs = dict(llm_kwargs)
        self.single_cpu_thread = single_cpu_thread
        self.rss_before_engine = process_rss_bytes()
        try:
            self.llm = LLM(**llm_kwargs)
        except Exception as err:  # vLLM refuses the configuration: say why, in one line
            if is_out_of_memory(err):
                raise ConfigError("engine", f"the model does not fit: {one_line(err)}") from None
            field = "optimization" if has_engine_args else "engine"
            raise ConfigError(field, f"vLLM cannot run {optimization!r} here: {one_line(err)}") from None
        self.rss_after_engine = process_rss_bytes()
        self.engine = self.llm.llm_engine
        self.core = self.engine.engine_core.engine_core
        self.scheduler = self.core.scheduler
        self.vllm_config = self.core.vllm_config
        self.model_runner = self._find_model_runner()
        self.default_budget = int(self.scheduler.max_num_scheduled_tokens)
        self.prompt_lens: dict[str, int] = {}
        self._next_id = 0
        self._captured: list[Any] = []
        self._kv_used_at_schedule = 0
        self._accepted: dict[str, int] = {}
        self._draft_s = 0.0
        self._install_hooks()

    # --- hooks ---------------------------------------------------------------
    def _find_model_runner(self) -> Any | None:
        executor = self.core.model_executor
        worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
        return getattr(worker, "model_runner", None)

    def _install_hooks(self) -> None:
        scheduler = self.scheduler
        schedule = scheduler.schedule
        update = scheduler.update_from_output
        pool = scheduler.kv_cache_manager.block_pool

        def schedule_hook(*args: Any, **kwargs: Any) -> Any:
            out = schedule(*args, **kwargs)
            self._captured.append(out)
            self._kv_used_at_schedule = pool.num_gpu_blocks - pool.get_num_free_blocks()
            return out

        def update_hook(scheduler_output: Any, model_output: Any) -> Any:
            if scheduler_output.scheduled_spec_decode_tokens and model_output is not None:
                index = model_output.req_id_to_index
                sampled = model_output.sampled_token_ids
                for req_id in scheduler_output.scheduled_spec_decode_tokens:
                    if req_id in index and index[req_id] < len(sampled):
                        self._accepted[req_id] = max(0, len(sampled[index[req_id]]) - 1)
            return update(scheduler_output, model_output)

        scheduler.schedule = schedule_hook
        scheduler.update_from_output = update_hook
        runner = self.model_runner
        if runner is not None and hasattr(runner, "propose_draft_token_ids"):
            propose = runner.propose_draft_token_ids

            def propose_hook(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return propose(*args, **kwargs)
                finally:
                    self._draft_s += time.perf_counter() - start

            runner.propose_draft_token_ids = propose_hook

    # --- requests ------------------------------------------------------------
    def add(self, prompt: list[int], max_tokens: int, tag: str = "r") -> str:
        """Queue a request that generates exactly max_tokens tokens (greedy, EOS ignored)."""
        from vllm import SamplingParams

        self._next_id += 1
        params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                                temperature=0.0, detokenize=False)
        internal = self.engine.add_request(f"{tag}{self._next_id}", {"prompt_token_ids": list(prompt)}, params)
        req_id = internal if isinstance(internal, str) else f"{tag}{self._next_id}"
        self.prompt_lens[req_id] = len(prompt)
        return req_id

    def abort(self, req_ids: list[str]) -> None:
        """Remove requests (by the ids ``add`` returned) from the engine."""
        if not req_ids:
            return
        self.engine.abort_request(list(req_ids), internal=True)
        for req_id in req_ids:
            self.prompt_lens.pop(req_id, None)

    def forget_finished(self) -> None:
        """Drop bookkeeping of requests the engine no longer holds."""
        live = self.scheduler.requests
        self.prompt_lens = {r: n for r, n in self.prompt_lens.items() if r in live}

    def abort_all(self) -> None:
        self.abort(list(self.scheduler.requests))
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def request(self, req_id: str) -> Any | None:
        return self.scheduler.requests.get(req_id)

    def has_unfinished(self) -> bool:
        return bool(self.engine.has_unfinished_requests())

    def set_token_budget(self, tokens: int | None) -> None:
        """Cap the tokens the scheduler may schedule next step (None: the engine's setting)."""
        budget = self.default_budget if tokens is None else max(1, min(int(tokens), self.default_budget))
        self.scheduler.max_num_scheduled_tokens = budget

    # --- stepping ------------------------------------------------------------
    def step(self) -> dict[str, Any] | None:
        """Run one engine step; return its row (without point labels), or None if nothing ran."""
        self._captured.clear()
        self._accepted.clear()
        self._draft_s = 0.0
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        try:
            self.engine.step()
        except Exception as err:
            if is_out_of_memory(err):
                raise EngineOutOfMemory(one_line(err)) from err
            raise
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        if not self._captured:
            return None
        comp = read_composition(self._captured[-1], self.prompt_lens)
        if comp.num_tokens == 0:
            return None
        num_blocks = self.num_gpu_blocks
        accepted = [self._accepted.get(r, 0) for r in comp.decode_ids]
        return {
            "wall_s": wall,
            "cpu_s": cpu,
            "prefill_tokens": comp.prefill_tokens,
            "prefill_context": comp.prefill_context,
            "prefill_cached": comp.prefill_cached,
            "decode_context": comp.decode_context,
            "decode_spec_tokens": comp.decode_spec_tokens,
            "decode_accepted_tokens": accepted,
            "num_prefill_tokens": sum(comp.prefill_tokens),
            "num_decode_seqs": len(comp.decode_context),
            "num_spec_tokens": sum(comp.decode_spec_tokens),
            "num_tokens": comp.num_tokens,
            "kv_blocks_used": int(self._kv_used_at_schedule),
            "kv_usage": self._kv_used_at_schedule / num_blocks if num_blocks else 0.0,
            "num_preempted": comp.num_preempted,
            "draft_s": self._draft_s,
            "rss_bytes": process_rss_bytes(),
            "disturbed": bool(self.single_cpu_thread
                              and wall > self.DISTURBED_RATIO * cpu + self.DISTURBED_SLACK_S),
            "_prefill_ids": comp.prefill_ids,
            "_decode_ids": comp.decode_ids,
        }

    # --- what the engine allocated ---------------------------------------------
    @property
    def block_size(self) -> int:
        return int(self.scheduler.block_size)

    @property
    def num_gpu_blocks(self) -> int:
        return int(self.scheduler.kv_cache_manager.block_pool.num_gpu_blocks)

    @property
    def prefix_caching(self) -> bool:
        return bool(self.vllm_config.cache_config.enable_prefix_caching)

    def kv_cache_bytes(self) -> int:
        """Bytes of KV cache the engine allocated (its own accounting, all layers)."""
        config = getattr(self.scheduler, "kv_cache_config", None)
        if config is not None and getattr(config, "kv_cache_tensors", None):
            return int(sum(t.size for t in config.kv_cache_tensors))
        runner = self.model_runner
        caches = getattr(runner, "kv_caches", None) or []
        return int(sum(t.numel() * t.element_size() for t in caches))

    def kv_tensor_bytes(self) -> int | None:
        """Bytes of the KV tensors the model runner holds (None when it runs in another process)."""
        caches = getattr(self.model_runner, "kv_caches", None)
        if not caches:
            return None
        return int(sum(t.numel() * t.element_size() for t in caches))

    def weights_bytes(self) -> int | None:
        """Weight bytes as vLLM measured them at load (GPU model runners), else None.

        The CPU build repacks linear layers into oneDNN kernels and leaves their
        parameters empty, so their bytes cannot be read off the model there."""
        measured = getattr(self.model_runner, "model_memory_usage", None)
        return int(measured) if measured else None

    def linear_dispatch(self) -> str | None:
        """How vLLM's CPU build runs the model's linear layers: ``onednn`` (oneDNN matmul handlers,
        whose per-row-count primitives are the shape cache calibration.fit prices), ``torch`` (its
        fallback where oneDNN cannot be used, e.g. AVX2 without AVX-512), ``sgl`` or ``zentorch``;
        several joined by ``+``. None where the model is not in this process or has no such layers
        (GPU engines). Read off each layer's ``cpu_linear`` (vllm/model_executor/layers/utils.py)."""
        model = getattr(self.model_runner, "model", None)
        if model is None or not hasattr(model, "modules"):
            return None
        kinds = {linear_kind(layer.cpu_linear) for layer in model.modules() if hasattr(layer, "cpu_linear")}
        return "+".join(sorted(kinds)) or None

    def hf_config(self) -> dict[str, Any]:
        return self.vllm_config.model_config.hf_config.to_dict()

    def resolved_settings(self) -> dict[str, Any]:
        """The engine settings vLLM actually used (after its defaults and platform fixes)."""
        cfg = self.vllm_config
        spec = cfg.speculative_config
        return {
            "model": cfg.model_config.model,
            "dtype": str(cfg.model_config.dtype).replace("torch.", ""),
            "max_model_len": int(cfg.model_config.max_model_len),
            "quantization": cfg.model_config.quantization,
            "block_size": self.block_size,
            "kv_cache_dtype": str(cfg.cache_config.cache_dtype),
            "enable_prefix_caching": self.prefix_caching,
            "gpu_memory_utilization": float(cfg.cache_config.gpu_memory_utilization),
            "num_gpu_blocks_override": cfg.cache_config.num_gpu_blocks_override,
            "kv_cache_memory_bytes": getattr(cfg.cache_config, "kv_cache_memory_bytes", None),
            "max_num_batched_tokens": int(cfg.scheduler_config.max_num_batched_tokens),
            "max_num_seqs": int(cfg.scheduler_config.max_num_seqs),
            "enable_chunked_prefill": bool(cfg.scheduler_config.enable_chunked_prefill),
            "long_prefill_token_threshold": int(cfg.scheduler_config.long_prefill_token_threshold or 0),
            "async_scheduling": bool(getattr(cfg.scheduler_config, "async_scheduling", False)),
            "enforce_eager": bool(cfg.model_config.enforce_eager),
            "compilation_mode": str(cfg.compilation_config.mode),
            "tensor_parallel_size": int(cfg.parallel_config.tensor_parallel_size),
            "device": str(cfg.device_config.device_type),
            "speculative_config": None if spec is None else {
                "method": getattr(spec, "method", None),
                "num_speculative_tokens": getattr(spec, "num_speculative_tokens", None),
                "prompt_lookup_max": getattr(spec, "prompt_lookup_max", None),
                "prompt_lookup_min": getattr(spec, "prompt_lookup_min", None),
                "model": getattr(spec, "model", None),
            },
            "seed": cfg.model_config.seed,
        }


def linear_kind(cpu_linear: Any) -> str:
    """The kind of one layer's ``cpu_linear`` (see EngineSession.linear_dispatch), by the names
    its code calls: vLLM sets a lambda over ``onednn_mm``, ``weight_packed_linear_cpu`` or
    ``zentorch_linear_unary``, or torch's own linear."""
    code = getattr(cpu_linear, "__code__", None)
    names = set(code.co_names) if code is not None else set()
    if "onednn_mm" in names:
        return "onednn"
    if "weight_packed_linear_cpu" in names:
        return "sgl"
    if "zentorch_linear_unary" in names:
        return "zentorch"
    return "torch"


def model_folder_config(model: str | Path) -> dict[str, Any] | None:
    """config.json of a local model folder, if there is one."""
    import json

    path = Path(model) / "config.json"
    return json.loads(path.read_text()) if path.exists() else None
