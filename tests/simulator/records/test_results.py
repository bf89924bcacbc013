"""Writing results without pandas: Arrow columns from numpy, the workload file, the import itself."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simulator.records.run_result import arrow_array, write_workload
from simulator.records.workload import Workload
from tests.simulator.conftest import make_workload


@pytest.mark.parametrize("values", [
    np.arange(7, dtype=np.int64),
    np.arange(10, dtype=np.int64)[::3],  # not contiguous
    np.array([1.5, np.nan, -0.0, np.inf]),
    np.array([True, False, True, True, False, False, False, False, True]),
    np.array(["completed", "rejected", "", "ü"], dtype=object),
    np.array(["a", None, "bc"], dtype=object),
    np.array(["math", "code"]),
    np.array([], dtype=np.int64),
    np.array([], dtype=object),
    np.array([None, None], dtype=object),
])
def test_arrow_array_is_what_pyarrow_array_gives(values):
    got = arrow_array(values)
    got.validate(full=True)
    expected = pa.array(values.tolist() if values.dtype.kind == "U" else values)
    assert got.type == expected.type
    assert got.null_count == expected.null_count
    assert got.to_pylist() == expected.to_pylist() or np.array_equal(
        got.to_numpy(zero_copy_only=False), expected.to_numpy(zero_copy_only=False), equal_nan=True)


def test_written_workload_loads_back_identical(tmp_path):
    w = make_workload(n=40, seed=2, prefix_groups=3, prefix_tokens=32)
    path = tmp_path / "workload.parquet"
    write_workload(w, path)
    back = Workload.load(path)
    for name in ("arrival_s", "prompt_tokens", "output_tokens", "reasoning_tokens", "domain",
                 "prefix_group", "prefix_tokens"):
        a, b = getattr(w, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    # the same columns and types as Workload.save (which goes through pandas)
    w.save(tmp_path / "saved.parquet")
    assert pq.read_schema(path).equals(pq.read_schema(tmp_path / "saved.parquet"), check_metadata=False)


def test_a_simulation_and_its_files_do_not_import_pandas(tmp_path):
    code = f"""
import sys
from simulator.configure import CONF_DIR, build_run
from simulator.engine.loop import simulate
from simulator.records.run_result import write_workload
from hydra import compose, initialize_config_dir
with initialize_config_dir(str(CONF_DIR), version_base=None):
    cfg = compose("config", overrides=["workload=gamma", "workload.num_requests=30"])
spec = build_run(cfg)
result = simulate(spec.workload, spec.engine, spec.perf, slo=spec.slo, seed=spec.seed)
result.write({str(tmp_path)!r})
write_workload(spec.workload, {str(tmp_path / "workload.parquet")!r})
assert "pandas" not in sys.modules, "pandas imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert pq.read_table(tmp_path / "requests.parquet").num_rows == 30
    assert pq.read_table(tmp_path / "workload.parquet").num_rows == 30
