"""Reading and interpolating the aiconfigurator kernel tables."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from calibration.kernel_tables import (
    DATA_DIR,
    Grid2D,
    available_systems,
    interp_loglog,
    load_tables,
)
from simulator.records.errors import ConfigError


def test_shipped_systems_and_versions():
    systems = available_systems()
    assert set(systems) == {"h100_sxm", "h200_sxm", "a100_sxm"}
    assert systems["h100_sxm"][-1] == "0.19.0"
    assert load_tables("h100_sxm").version == "0.19.0"
    assert load_tables("h100_sxm", "0.14.0").version == "0.14.0"
    with pytest.raises(ConfigError, match="allowed"):
        load_tables("h100_sxm", "0.1.0")
    with pytest.raises(ConfigError, match="h100_sxm"):
        load_tables("tpu_v5")


def test_gemm_reproduces_measured_points(h100_tables):
    path = DATA_DIR / "data" / "h100_sxm" / "gemm" / "vllm" / "0.19.0" / "gemm_perf.csv"
    with path.open() as fh:
        rows = [r for i, r in enumerate(csv.DictReader(fh)) if i % 997 == 0]
    for r in rows:
        table = h100_tables.gemm_table("bf16" if r["gemm_dtype"] == "bfloat16" else r["gemm_dtype"])
        got = table.latency_ms(np.array([int(r["m"])]), int(r["n"]), int(r["k"]))[0]
        assert got == pytest.approx(float(r["latency"]), rel=1e-9)


def test_gemm_between_and_beyond_points(h100_tables):
    g = h100_tables.gemm_table("bf16")
    lo, hi = g.latency_ms(np.array([1, 8192]), 4096, 4096)
    mid = g.latency_ms(np.array([1, 8192]), 4608, 4096)  # n between 4096 and 5120
    top = g.latency_ms(np.array([1, 8192]), 5120, 4096)
    assert np.all((mid >= np.minimum([lo, hi], top)) & (mid <= np.maximum([lo, hi], top)))
    # beyond the largest m (32768) time grows linearly in m
    last, double = g.latency_ms(np.array([32768, 65536]), 4096, 4096)
    assert double == pytest.approx(2 * last)
    # beyond the largest n (65536), e.g. a 152k vocabulary, linear in n
    a, b = g.latency_ms(np.array([64]), 65536, 4096)[0], g.latency_ms(np.array([64]), 131072, 4096)[0]
    assert b == pytest.approx(2 * a)
    assert g.latency_ms(np.array([0]), 4096, 4096)[0] == 0.0


def test_fp8_gemms_only_where_measured(h100_tables):
    assert h100_tables.gemm_dtypes == ["bf16", "fp8"]
    assert load_tables("h200_sxm").gemm_dtypes == ["bf16"]
    with pytest.raises(ConfigError, match="optimization.weight_dtype"):
        load_tables("a100_sxm").gemm_table("fp8")
    # memory-bound small-m fp8 GEMMs read half the weight bytes: clearly faster
    bf16 = h100_tables.gemm_table("bf16").latency_ms(np.array([1]), 16384, 4096)[0]
    fp8 = h100_tables.gemm_table("fp8").latency_ms(np.array([1]), 16384, 4096)[0]
    assert fp8 < 0.75 * bf16


def test_loglog_interpolation_is_exact_on_power_laws():
    xp = np.array([1.0, 16.0, 256.0])
    fp = 3.0 * xp**1.5
    x = np.array([2.0, 5.0, 100.0])
    assert np.allclose(interp_loglog(x, xp, fp), 3.0 * x**1.5)
    assert interp_loglog(np.array([512.0]), xp, fp, power=2.0)[0] == pytest.approx(fp[-1] * 4)
    assert interp_loglog(np.array([0.5]), xp, fp)[0] == pytest.approx(fp[0])


def test_grid2d_extrapolates_by_the_given_powers():
    x = np.array([1.0, 2.0, 4.0])
    y = np.array([1.0, 10.0, 100.0])
    grid = Grid2D(x, y, np.outer(x, y**2))
    assert grid(np.array([3.0]), np.array([50.0]), 2.0)[0] == pytest.approx(3.0 * 2500.0)
    assert grid(np.array([8.0]), np.array([200.0]), 2.0)[0] == pytest.approx(8.0 * 40000.0)


def test_attention_grids_are_complete_and_ordered(h100_tables):
    for table in (h100_tables.context, h100_tables.generation):
        for value in table.slices.values():
            assert np.isfinite(value).all() and (value > 0).all()
    gen = h100_tables.generation
    # 28 query heads (R1-Distill-Qwen-7B) lie between the measured 24 and 32 at 4 KV heads
    b, kv = np.array([64.0]), np.array([4096.0])
    t24 = gen.grid(24, 4, "bf16")(b, kv, 1.0)[0]
    t28 = gen.grid(28, 4, "bf16")(b, kv, 1.0)[0]
    t32 = gen.grid(32, 4, "bf16")(b, kv, 1.0)[0]
    assert min(t24, t32) <= t28 <= max(t24, t32)
    # multi-head attention (Llama-2, 32 KV heads) is beyond the table: it must cost more than GQA-8
    assert gen.grid(32, 32, "bf16")(b, kv, 1.0)[0] > 2 * gen.grid(32, 8, "bf16")(b, kv, 1.0)[0]
    # decode attention grows with the KV read
    long = gen.grid(32, 8, "bf16")(np.array([64.0, 64.0]), np.array([1024.0, 16384.0]), 1.0)
    assert long[1] > 5 * long[0]
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        gen.grid(32, 8, "int4")


def test_allreduce(h100_tables):
    ar = h100_tables.allreduce
    small, large = ar.latency_ms(2, np.array([4096, 64 * 1024 * 1024]))
    assert 0 < small < large
    assert ar.latency_ms(1, np.array([4096]))[0] == 0.0
    with pytest.raises(ConfigError, match="tp"):
        ar.latency_ms(3, np.array([4096]))


def test_csv_columns_are_read_with_their_types_and_values():
    from calibration.kernel_tables import read_columns

    path = DATA_DIR / "data" / "h100_sxm" / "comm" / "vllm" / "0.19.0" / "custom_allreduce_perf.csv"
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    cols = read_columns(path, text=("backend",))
    assert set(cols) == set(rows[0])
    assert cols["num_gpus"].dtype == np.int64 and cols["latency"].dtype == np.float64
    assert cols["num_gpus"].tolist() == [int(r["num_gpus"]) for r in rows]
    assert cols["latency"].tolist() == [float(r["latency"]) for r in rows]  # parsed exactly
    assert cols["backend"].tolist() == [r["backend"] for r in rows]  # dictionary-coded text
    assert cols["kernel_source"].tolist() == [r["kernel_source"] for r in rows]  # plain text
    some = read_columns(path, ["message_size", "backend"], text=("backend",))
    assert list(some) == ["message_size", "backend"]


def test_attention_grids_are_completed_on_first_use(h100_tables):
    from calibration.kernel_tables import _complete

    grids = h100_tables.generation.slices
    key = (28, 4, "bfloat16") if (28, 4, "bfloat16") in grids else next(iter(grids))
    raw = grids._measured[key]
    assert np.isnan(raw).any()  # the measured table has holes ...
    first = grids[key]
    np.testing.assert_array_equal(first, _complete(raw, h100_tables.generation.batch,
                                                   h100_tables.generation.length, 1.0))
    assert grids[key] is first  # ... completed once, then kept


def test_reading_the_tables_does_not_import_pandas():
    import subprocess
    import sys

    code = ("import sys; from calibration.kernel_tables import load_tables; "
            "t = load_tables('h100_sxm'); t.generation.grid(28, 4, 'bf16'); "
            "assert 'pandas' not in sys.modules, 'pandas imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
