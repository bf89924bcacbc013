"""Timing one kernel, and the kernels a step is made of at given shapes.

On a GPU a kernel is captured in a CUDA graph and the graph's replays are timed
with CUDA events: the median of ``repeats`` after ``warmup`` replays. A step of a
real model runs every layer on its own weights and activations, so nothing small
stays in the L2 cache from one kernel to the next; here, likewise, a kernel whose
operands total less than ``ROTATE_BYTES`` is built over several copies of them,
and the graph runs one call on each copy in turn (the time is divided by the
calls): no call finds its operands in L2, and the replay's own launch is spread
over the calls. Where capture fails the calls are timed eagerly with events, and
the row says so. On a CPU (tests, tiny shapes) ``time.perf_counter`` takes the
median of single calls.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

#: operands of one graph replay at least this large (several times a GPU's L2 cache)
ROTATE_BYTES = 256 * 2**20
MAX_COPIES = 64
Kernel = Callable[[], object]


def copies(device: str, nbytes: float) -> int:
    """How many copies of operands of ``nbytes`` a measurement cycles through (1 on a CPU)."""
    if device != "cuda":
        return 1
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(nbytes, 1.0))))


def time_ms(fns: list[Kernel], device: str, warmup: int, repeats: int) -> tuple[float, str]:
    """(median milliseconds of one call, how it was timed); ``fns`` are one kernel over copies of its operands."""
    if device == "cpu":
        fn = fns[0]
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times), "perf_counter"
    import torch

    def all_calls():
        for fn in fns:
            fn()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 1)):
            all_calls()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            all_calls()
        run, how = graph.replay, "cuda_graph"
    except Exception:  # noqa: BLE001 (capture fails for kernel-specific reasons)
        torch.cuda.synchronize()
        graph, run, how = None, all_calls, "cuda_events_eager"
    ms = _events_ms(run, warmup, repeats) / len(fns)
    del graph, run
    return ms, how


def _events_ms(run: Callable[[], object], warmup: int, repeats: int) -> float:
    import torch

    for _ in range(warmup):
        run()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in pairs:
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


# --- the kernels: each returns (calls over copies of the operands, kernel name[, bytes]) --------
def gemm(m: int, n: int, k: int, dtype: str, device: str) -> tuple[list[Kernel], str]:
    """An ``m x k`` by ``k x n`` GEMM as vLLM's linear layers run it (weights ``n x k``)."""
    import torch

    fp8 = dtype == "fp8"
    rows = -(-m // 16) * 16 if fp8 else m  # torch._scaled_mm wants m a multiple of 16
    count = copies(device, (rows * k + n * k) * (1 if fp8 else 2) + rows * n * 2)
    fns = []
    for _ in range(count):
        a = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5
        if not fp8:
            fns.append(lambda a=a, w=w: torch.nn.functional.linear(a, w))
            continue
        # per-tensor scaled fp8, as vLLM's fp8 linear layers; w8.t() is column-major as _scaled_mm wants
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.ones((), device=device, dtype=torch.float32)
        fns.append(lambda a8=a8, w8=w8, one=one: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one,
                                                                  out_dtype=torch.bfloat16))
    name = "torch_linear" if not fp8 else f"torch_scaled_mm{'' if rows == m else '_m_padded_to_16'}"
    return fns, name


def _attention(calls: list[Callable], device: str) -> tuple[list[Kernel], str]:
    """``call(sdpa)`` for each call as kernels: SDPA held to its flash backend on a GPU, else PyTorch's choice.

    The row's name says which ran: ``torch_sdpa_flash``, ``torch_sdpa_default`` (flash
    refused the shape) or ``torch_sdpa_cpu``.
    """
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    if device != "cuda":
        return [lambda call=call: call(sdpa) for call in calls], "torch_sdpa_cpu"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def flash(call):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return call(sdpa)

    try:
        flash(calls[0])
        return [lambda call=call: flash(call) for call in calls], "torch_sdpa_flash"
    except Exception:  # noqa: BLE001 (flash refuses shapes and masks with several error types)
        return [lambda call=call: call(sdpa) for call in calls], "torch_sdpa_default"


def context_attention(batch: int, q_len: int, prior: int, heads: int, kv_heads: int, head_dim: int,
                      device: str) -> tuple[list[Kernel], str]:
    """Causal attention of ``batch`` chunks of ``q_len`` new tokens over ``prior`` cached ones."""
    import torch

    gqa = heads != kv_heads
    nbytes = 2 * batch * head_dim * (2 * heads * q_len + 2 * kv_heads * (prior + q_len))
    mask = None
    if prior:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, prior + q_len)
    calls = []
    for _ in range(copies(device, nbytes)):
        q = torch.randn(batch, heads, q_len, head_dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(batch, kv_heads, prior + q_len, head_dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        if mask is None:
            calls.append(lambda sdpa, q=q, k=k, v=v: sdpa(q, k, v, is_causal=True, enable_gqa=gqa))
        else:
            calls.append(lambda sdpa, q=q, k=k, v=v: sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa))
    return _attention(calls, device)


def generation_attention(batch: int, kv_len: int, heads: int, kv_heads: int, head_dim: int,
                         device: str) -> tuple[list[Kernel], str]:
    """One new token for each of ``batch`` sequences over ``kv_len`` cached tokens (contiguous KV)."""
    import torch

    gqa = heads != kv_heads
    calls = []
    for _ in range(copies(device, 2 * batch * head_dim * 2 * kv_heads * kv_len)):
        q = torch.randn(batch, heads, 1, head_dim, device=device, dtype=torch.bfloat16)
        k = torch.randn(batch, kv_heads, kv_len, head_dim, device=device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        calls.append(lambda sdpa, q=q, k=k, v=v: sdpa(q, k, v, enable_gqa=gqa))
    return _attention(calls, device)


#: the fewest bytes each element-wise op moves per element of its width (bf16)
ELEMENTWISE_BYTES = {"residual_add": 3 * 2, "rmsnorm": 2 * 2, "rotary": 2 * 2, "silu_mul": 3 * 2, "sampler": 2}


def elementwise(op: str, tokens: int, width: int, head_dim: int, device: str) -> tuple[list[Kernel], str, int]:
    """(calls, name, the fewest bytes one call moves) of one element-wise op over ``tokens`` rows."""
    if op not in ELEMENTWISE_BYTES:
        raise ValueError(f"unknown element-wise op {op!r}")
    nbytes = ELEMENTWISE_BYTES[op] * tokens * width
    fns, name = [], ""
    for _ in range(copies(device, nbytes)):
        fn, name = _elementwise_call(op, tokens, width, head_dim, device)
        fns.append(fn)
    return fns, name, nbytes


def _elementwise_call(op: str, tokens: int, width: int, head_dim: int, device: str) -> tuple[Kernel, str]:
    import torch
    import torch.nn.functional as F  # noqa: N812

    bf16 = torch.bfloat16
    if op == "silu_mul":  # width = intermediate size per GPU; the input is gate and up side by side
        gate_up = torch.randn(tokens, 2 * width, device=device, dtype=bf16)
        return (lambda: F.silu(gate_up[:, :width]) * gate_up[:, width:]), "torch_silu_mul"
    x = torch.randn(tokens, width, device=device, dtype=bf16)
    if op == "residual_add":
        r = torch.randn_like(x)
        return (lambda: x + r), "torch_add"
    if op == "rmsnorm":
        weight = torch.ones(width, device=device, dtype=bf16)
        if hasattr(F, "rms_norm"):
            return (lambda: F.rms_norm(x, (width,), weight, 1e-6)), "torch_rms_norm"
        return (lambda: (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(bf16)
                * weight), "torch_rms_norm_unfused"
    if op == "rotary":  # neox-style rotation of the q and k heads: width = (heads + kv_heads) * head_dim
        qk = x.view(tokens, width // head_dim, head_dim)
        cos = torch.randn(tokens, 1, head_dim // 2, device=device, dtype=bf16)
        sin = torch.randn_like(cos)

        def rotate():
            x1, x2 = qk.chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

        return rotate, "torch_rotary_neox"
    # sampler: width = vocabulary; bf16 logits as the LM head writes them, softmax then argmax in fp32
    return (lambda: torch.softmax(x.float(), dim=-1).argmax(dim=-1)), "torch_softmax_argmax"
