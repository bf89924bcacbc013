"""Composed step times of R1-Distill-Qwen-7B on an H200 against the steps measured on a real one.

    python benchmarks/compare_h200_steps.py                      # the shipped aiconfigurator H200 tables
    python benchmarks/compare_h200_steps.py --tables <folder>    # tables of python -m profiler.kernels

The measurements (``../shared/data/gpu-measurements/h200-r1-distill-qwen-7b/h200_steps.jsonl``,
see its README) are a plain PyTorch decoder of the model's shape run as CUDA graphs: no
host-side work, so they are compared with the predicted GPU time (the step minus the
model's fixed per-step overhead). Per step: the whole step, its GEMMs (the four
projections of every layer plus the LM head), its attention and the rest (norms, rotary,
activation, KV write, sampler: an upper bound here, PyTorch's element-wise kernels are
unfused), measured, predicted, and predicted / measured. Runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_STEPS = REPO.parent / "shared" / "data" / "gpu-measurements" / "h200-r1-distill-qwen-7b" / "h200_steps.jsonl"


def measured_steps(path: Path) -> list[dict]:
    """The prefill and decode (CUDA graph) records of the measurement file."""
    out = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") in ("prefill", "decode") and "full_graph" in record:
            out.append(record)
    return out


def predicted_gemm_ms(pm, m: int, rows: int) -> float:
    """All layers' projection GEMMs for m tokens plus the LM head for ``rows`` rows, as the model prices them."""
    k, sh = pm.kernels, pm.shapes
    q, kv = sh.heads * sh.head_dim, sh.kv_heads * sh.head_dim
    per_layer = sum(float(k.gemm_ms(np.array([m]), n, kk, pm.weight_dtype)[0]) for n, kk in (
        (q + 2 * kv, sh.hidden), (sh.hidden, q), (2 * sh.inter, sh.hidden), (sh.hidden, sh.inter)))
    return pm.arch.num_layers * per_layer + float(k.gemm_ms(np.array([rows]), sh.vocab, sh.hidden, "bf16")[0])


def _median(value) -> float | None:
    """A timing field: ``{median_ms, ...}`` or a plain number of milliseconds."""
    if isinstance(value, dict):
        return value.get("median_ms")
    return value


def compare(pm, steps: list[dict]) -> list[dict]:
    from simulator.records.performance import StepBatch

    rows = []
    for s in steps:
        if s["kind"] == "prefill":
            name, batch, m, r = f"prefill {s['N']}", StepBatch([s["N"]], [0], []), s["N"], 1
        else:
            name, batch, m, r = f"decode B={s['B']} C={s['C']}", StepBatch([], [], [s["C"]] * s["B"]), s["B"], s["B"]
        parts = pm.components(batch)
        gpu = 1e3 * (sum(parts.values()) - parts["overhead"])
        attention = 1e3 * (parts["context_attention"] + parts["generation_attention"])
        rows.append({"step": name, "measured_ms": _median(s["full_graph"]), "predicted_ms": gpu,
                     "measured_gemm_ms": _median(s.get("gemm_graph")),
                     "predicted_gemm_ms": predicted_gemm_ms(pm, m, r),
                     "measured_attention_ms": _median(s.get("attn_graph")), "predicted_attention_ms": attention})
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", help="a folder written by python -m profiler.kernels (default: the shipped "
                                         "aiconfigurator H200 tables)")
    parser.add_argument("--steps", default=str(DEFAULT_STEPS), help="h200_steps.jsonl")
    parser.add_argument("--hardware", default="h200")
    parser.add_argument("--model", default="r1-distill-qwen-7b")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    from calibration.non_kernel import non_kernel_ms
    from calibration.registry import build_performance_model

    perf = {"source": "kernels", "tables": args.tables} if args.tables else {"source": "aiconfigurator"}
    pm = build_performance_model(args.hardware, args.model, None, 1, perf)
    rows = compare(pm, measured_steps(Path(args.steps)))
    print(f"{pm.describe()['built_from']}")
    print(f"{'step':<22}{'whole ms':>10}{'pred':>9}{'ratio':>7}{'GEMM ms':>10}{'pred':>9}{'ratio':>7}"
          f"{'attn ms':>10}{'pred':>9}{'ratio':>7}{'rest ms':>10}{'pred':>9}")
    for r in rows:
        cells = []
        for key in ("", "gemm_", "attention_"):
            meas, pred = r[f"measured_{key}ms"], r[f"predicted_{key}ms"]
            cells.append(f"{meas:>10.2f}{pred:>9.2f}{pred / meas:>7.2f}" if meas else f"{'-':>10}{pred:>9.2f}{'':>7}")
        if r["measured_gemm_ms"] and r["measured_attention_ms"]:  # the work between the kernels
            cells.append(f"{non_kernel_ms(r, 'measured'):>10.2f}{non_kernel_ms(r, 'predicted'):>9.2f}")
        print(f"{r['step']:<22}" + "".join(cells))
    ratios = np.array([r["predicted_ms"] / r["measured_ms"] for r in rows])
    print(f"whole step predicted / measured: median {np.median(ratios):.2f}, range {ratios.min():.2f}-"
          f"{ratios.max():.2f} over {len(rows)} steps")
    if args.json:
        Path(args.json).write_text(json.dumps({"built_from": pm.describe()["built_from"], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
