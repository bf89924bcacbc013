"""The kernel profiler (python -m profiler.kernels): settings, plan, resumable CPU runs, one-line errors.

The CPU path runs a test-sized model (conf model with its shapes overridden) on a test
"card" of its own name: tables measured on a CPU never stand for a GPU.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from simulator.records.errors import ConfigError

torch = pytest.importorskip("torch")

from calibration.kernel_tables import load_table_dir  # noqa: E402
from profiler.kernels import measure  # noqa: E402
from profiler.kernels.run import gemm_shapes, plan, run  # noqa: E402
from profiler.kernels.settings import parse  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
#: a test-sized Qwen2 shape and a test card (generous peaks: a CPU is far below them)
TINY_MODEL = ["model=r1-distill-qwen-1.5b", "model.name=tiny-qwen", "model.num_layers=2", "model.hidden_size=64",
              "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.head_dim=16",
              "model.intermediate_size=128", "model.vocab_size=256", "model.max_position_embeddings=4096"]
TEST_CARD = ["hardware=l40s", "hardware.name=cpu-test", "hardware.gpu=CPU-tests", "hardware.memory_gib=4",
             "hardware.memory_bandwidth_gbps=1000", "hardware.bf16_tflops=100", "hardware.fp8_tflops=0",
             "hardware.kernel_tables="]
TINY = [*TINY_MODEL, *TEST_CARD, "device=cpu"]


def rows(folder: Path, table: str) -> list[dict]:
    with open(folder / table, newline="") as f:
        return list(csv.DictReader(f))


def test_plan_splits_projections_and_heads_by_tp():
    """At tp=2 every GEMM, attention and element-wise row has the per-GPU shapes of R1-Distill-Qwen-7B."""
    s = parse(["model=r1-distill-qwen-7b", "hardware=h200", "tp=2", "dtype=bf16"])
    jobs = plan(s)
    gemms = {(int(j.row["n"]), int(j.row["k"])) for j in jobs if j.table == "gemm_perf.csv"}
    assert gemms == {(14 * 128 + 2 * 2 * 128, 3584), (3584, 14 * 128), (18944, 3584), (3584, 9472),
                     (152064 // 2, 3584)}
    assert set(gemm_shapes.__annotations__)  # the projections are named in one place
    heads = {(j.row["num_heads"], j.row["num_key_value_heads"]) for j in jobs if "attention" in j.table}
    assert heads == {(14, 2)}
    tokens = sorted({j.row["m"] for j in jobs if j.table == "gemm_perf.csv"})
    assert tokens[0] == 1 and tokens[-1] == 16384 and len(tokens) > 20
    widths = {j.row["op"]: j.row["width"] for j in jobs if j.table == "elementwise_perf.csv"}
    assert widths == {"residual_add": 3584, "rmsnorm": 3584, "rotary": (14 + 2) * 128, "silu_mul": 9472,
                      "sampler": 152064}


def test_fp8_only_where_the_card_has_it():
    assert parse(["model=r1-distill-qwen-7b", "hardware=h200"]).dtypes == ("bf16", "fp8")
    assert parse(["model=r1-distill-qwen-7b", "hardware=a100"]).dtypes == ("bf16",)
    with pytest.raises(ConfigError) as err:
        parse(["model=r1-distill-qwen-7b", "hardware=a100", "dtype=fp8"])
    assert err.value.field == "dtype"


@pytest.mark.parametrize("args, field", [
    (["hardware=h200"], "model"),
    (["model=nope", "hardware=h200"], "model"),
    (["model=r1-distill-qwen-7b", "hardware=h200", "tp=0"], "tp"),
    (["model=r1-distill-qwen-7b", "hardware=h200", "tp=3"], "tp"),
    (["model=r1-distill-qwen-7b", "hardware=h200", "dtype=int4"], "dtype"),
    (["model=r1-distill-qwen-7b", "hardware=h200", "grid=huge"], "grid"),
    (["model=r1-distill-qwen-7b", "hardware=h200", "device=tpu"], "device"),
    (["model=r1-distill-qwen-7b", "hardware=h200", "repeats=0"], "repeats"),
    (["model=r1-distill-qwen-7b", "hardware=h200", "colour=red"], "colour"),
    (["model=r1-distill-qwen-7b", "hardware=h200", "device=cpu"], "model"),  # the CPU path: tiny shapes only
    ([*TINY_MODEL, "hardware=h200", "device=cpu"], "hardware"),  # a CPU is not an H200
])
def test_bad_settings_name_their_field(args, field):
    with pytest.raises(ConfigError) as err:
        parse(args)
    assert err.value.field == field


def test_cli_errors_are_one_line_exit_2():
    cmd = [sys.executable, "-m", "profiler.kernels", "model=r1-distill-qwen-7b", "hardware=h200", "tp=0"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: tp: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_refuses_without_cuda_unless_device_cpu(tmp_path):
    cmd = [sys.executable, "-m", "profiler.kernels", *TINY_MODEL, *TEST_CARD, f"out={tmp_path / 't'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: device: ") and "device=cpu" in lines[0]
    assert not (tmp_path / "t").exists()  # nothing measured, nothing written


def test_cpu_run_is_resumable(tmp_path, monkeypatch):
    """A second run measures nothing; rows removed from a table are measured again, and only those."""
    s = parse([*TINY, f"out={tmp_path / 'tables'}"])
    run(s, progress=False)
    folder = tmp_path / "tables"
    first = {t: rows(folder, t) for t in ("gemm_perf.csv", "generation_attention_perf.csv")}
    assert len(first["gemm_perf.csv"]) == 5 * 3 and len(first["generation_attention_perf.csv"]) == 4
    calls = []
    real = measure.time_ms
    monkeypatch.setattr(measure, "time_ms", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(s, progress=False)
    assert calls == []
    gemm = folder / "gemm_perf.csv"
    gemm.write_text("".join(gemm.read_text().splitlines(keepends=True)[:3]))  # the header and two rows
    run(s, progress=False)
    assert len(calls) == 5 * 3 - 2
    assert len(rows(folder, "gemm_perf.csv")) == 5 * 3
    meta = json.loads((folder / "kernels.json").read_text())
    assert meta["hardware"]["name"] == "cpu-test" and meta["device"]["kind"] == "cpu"
    assert meta["model"]["hidden_size"] == 64 and meta["versions"]["torch"] == torch.__version__


def test_folder_of_another_model_is_refused(tmp_path):
    s = parse([*TINY, f"out={tmp_path}"])
    run(s, progress=False)
    other = parse([*TINY, "model.hidden_size=128", f"out={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        run(other, progress=False)
    assert err.value.field == "out"


def test_cpu_tables_drive_the_simulator_end_to_end(tmp_path):
    """profiler.kernels device=cpu, then python -m simulator perf=kernels on its tables: same interface."""
    tables = tmp_path / "tables"
    cmd = [sys.executable, "-m", "profiler.kernels", *TINY, f"out={tables}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = load_table_dir(tables)
    assert loaded.elementwise is not None and loaded.head_dim == 16
    assert sum(loaded.rejections.checked.values()) == sum(
        len(rows(tables, t)) for t in ("gemm_perf.csv", "context_attention_perf.csv",
                                       "generation_attention_perf.csv", "elementwise_perf.csv"))
    out = tmp_path / "run"
    sim = [sys.executable, "-m", "simulator", f"hydra.run.dir={out}", "progress=false", "plots=false",
           "perf=kernels", f"perf.tables={tables}", *TINY_MODEL, *TEST_CARD, "workload.num_requests=20",
           "workload.rate=1000"]
    proc = subprocess.run(sim, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 20
    pm = summary["metadata"]["performance_model"]
    assert "kernel profiler tables" in pm["built_from"] and set(pm["kernel_rows_checked"]) >= {"gemm", "elementwise"}
    wrong_card = [a for a in sim if not a.startswith("hardware")] + ["hardware=h200"]
    proc = subprocess.run(wrong_card, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: hardware: cpu-test" in proc.stderr


def test_small_operands_are_rotated_through_copies_on_a_gpu_only():
    """A kernel smaller than the rotation size cycles through copies (no L2 hits); big ones and CPUs use one."""
    assert measure.copies("cuda", 33e6) == 9 and measure.copies("cuda", 1e9) == 1
    assert measure.copies("cuda", 10) == measure.MAX_COPIES
    assert measure.copies("cpu", 33e6) == 1
    fns, name, nbytes = measure.elementwise("rmsnorm", 4, 64, 16, "cpu")
    assert len(fns) == 1 and name.startswith("torch_rms_norm") and nbytes == 2 * 2 * 4 * 64


def test_allreduce_processes_write_rows_the_tables_read(tmp_path):
    """Two processes over gloo (the CPU stand-in for NCCL): rows for each message size, read back per GPU count."""
    from profiler.kernels.allreduce import measure_allreduce
    from profiler.kernels.tables import TableFolder

    s = parse([*TINY, f"out={tmp_path / 't'}"])
    run(s, progress=False)
    folder = TableFolder(s.out, json.loads((s.out / "kernels.json").read_text()))
    assert measure_allreduce(folder, 2, s.grid, device="cpu") == len(s.grid.allreduce_elements)
    assert measure_allreduce(folder, 2, s.grid, device="cpu") == 0  # resumed: nothing left
    sizes, ms = load_table_dir(s.out).allreduce.by_gpus[2]
    assert sizes.tolist() == sorted(s.grid.allreduce_elements) and (ms > 0).all()


def test_a_kernel_that_fails_is_skipped_recorded_and_retried(tmp_path, monkeypatch):
    """A row whose kernel raises (out of memory, a refused shape) is left out and named in kernels.json;
    the other rows are written, and the next run measures the missing ones."""
    s = parse([*TINY, f"out={tmp_path / 't'}"])
    real = measure.elementwise

    def refuse_sampler(op, *args):
        if op == "sampler":
            raise RuntimeError("CUDA out of memory (planted)")
        return real(op, *args)

    monkeypatch.setattr(measure, "elementwise", refuse_sampler)
    run(s, progress=False)
    meta = json.loads((s.out / "kernels.json").read_text())
    assert len(meta["not_measured"]) == len(s.grid.tokens) and "planted" in meta["not_measured"][0]
    assert not [r for r in rows(s.out, "elementwise_perf.csv") if r["op"] == "sampler"]
    assert len(rows(s.out, "gemm_perf.csv")) == 5 * len(s.grid.tokens)
    monkeypatch.setattr(measure, "elementwise", real)
    run(s, progress=False)
    assert len([r for r in rows(s.out, "elementwise_perf.csv") if r["op"] == "sampler"]) == len(s.grid.tokens)
    assert json.loads((s.out / "kernels.json").read_text())["not_measured"] == []


def test_fp8_gemm_pads_m_to_16_and_says_so():
    fns, name = measure.gemm(5, 64, 32, "fp8", "cpu")
    out = fns[0]()
    assert name == "torch_scaled_mm_m_padded_to_16" and tuple(out.shape) == (16, 64) and out.dtype == torch.bfloat16
    assert measure.gemm(16, 64, 32, "fp8", "cpu")[1] == "torch_scaled_mm"
