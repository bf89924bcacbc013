"""All-reduce over message sizes with torch.distributed, one process per GPU.

On GPUs (NCCL) each rank captures one bf16 ``all_reduce`` in a CUDA graph and
times its replays with CUDA events (median after warm-up); rank 0 writes the
rows. ``device="cpu"`` runs the same code over gloo with ``time.perf_counter``:
the tests use it to check the processes, the rendezvous and the rows; its
timings say nothing about a GPU.
"""

from __future__ import annotations

import os
import tempfile

from profiler.kernels.settings import Grid
from profiler.kernels.tables import TableFolder

TABLE = "custom_allreduce_perf.csv"


def _backend(device: str, how: str) -> str:
    if device != "cuda":
        return "torch_gloo_cpu"
    return "torch_nccl_graph" if how == "cuda_graph" else "torch_nccl_eager"


def _worker(rank: int, world: int, init_file: str, sizes: list[int], warmup: int, repeats: int, device: str,
            out) -> None:
    import torch
    import torch.distributed as dist

    from profiler.kernels.measure import time_ms

    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    rows = []
    for size in sizes:
        x = torch.ones(size, device=device, dtype=torch.bfloat16)
        dist.barrier()
        ms, how = time_ms([lambda x=x: dist.all_reduce(x)], device, warmup, repeats)
        rows.append((size, ms, how))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        out.put(rows)


def measure_allreduce(folder: TableFolder, tp: int, grid: Grid, device: str = "cuda") -> int:
    """Measure the all-reduce rows of ``tp`` processes not in ``folder`` yet; how many were added."""
    import torch.multiprocessing as mp

    sizes = [e for e in grid.allreduce_elements
             if not folder.has(TABLE, {"num_gpus": tp, "message_size": e, "backend": _backend(device, "cuda_graph")})]
    if not sizes:
        return 0
    out = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(_worker, args=(tp, init_file, sizes, grid.warmup, grid.repeats, device, out),
                           nprocs=tp, join=True, start_method="spawn")
    rows = out.get()
    for size, ms, how in rows:
        folder.add(TABLE, {"kernel_source": f"torch_distributed_{'nccl' if device == 'cuda' else 'gloo'}",
                           "allreduce_dtype": "bfloat16", "num_gpus": tp, "message_size": size, "latency": ms,
                           "backend": _backend(device, how)})
    return len(rows)
