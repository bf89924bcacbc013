"""The combined table of a multirun sweep (simulator/sweep.py): sweep.csv at the sweep's root."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

from simulator.sweep import FIGURES, write_sweep_table

REPO = Path(__file__).resolve().parents[2]
LIGHT = ("plots=false", "progress=false", "workload.num_requests=20")


def simulator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simulator", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_a_sweep_writes_one_row_per_run_with_its_overrides_and_figures(tmp_path):
    proc = simulator("-m", "workload.rate=1,4", "engine.max_num_seqs=2,8", *LIGHT, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"sweep      {tmp_path / 'sweep.csv'}" in proc.stdout
    rows = read_table(tmp_path / "sweep.csv")
    assert [r["run"] for r in rows] == ["0", "1", "2", "3"]
    assert {(r["workload.rate"], r["engine.max_num_seqs"]) for r in rows} == {("1", "2"), ("1", "8"),
                                                                            ("4", "2"), ("4", "8")}
    for row in rows:
        summary = json.loads((tmp_path / row["run"] / "summary.json").read_text())
        assert row["status"] == "complete"
        assert int(row["completed"]) + int(row["rejected"]) == 20
        assert float(row["e2e_p99_s"]) == summary["e2e_s"]["p99"]  # written exactly (same machine)
        assert float(row["kv_usage_peak"]) == summary["kv_usage"]["peak"]
        assert int(row["preemptions"]) == summary["preemptions"]
        assert float(row["goodput_requests_per_s"]) == summary["goodput"]["requests_per_s"]
        assert all(row[c] != "" for c in FIGURES)
    # the runs differ, and the table says how: a faster arrival rate, shorter span
    by = {(r["workload.rate"], r["engine.max_num_seqs"]): r for r in rows}
    assert float(by["4", "8"]["requests_per_s"]) > float(by["1", "8"]["requests_per_s"])


def test_a_sweep_stopped_by_bad_input_keeps_the_table_of_the_runs_before(tmp_path):
    # the second run's rate is refused (exit 2): the first run's row is already at the root
    proc = simulator("-m", "workload.rate=2,1e-300", *LIGHT, f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    rows = read_table(tmp_path / "sweep.csv")
    assert [(r["run"], r["workload.rate"], r["status"]) for r in rows][0] == ("0", "2", "complete")
    assert all(r["status"] != "complete" for r in rows[1:])


def test_a_single_run_writes_no_sweep_table(tmp_path):
    proc = simulator(*LIGHT, f"hydra.run.dir={tmp_path}/r")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(tmp_path.rglob("sweep.csv"))
    assert "sweep " not in proc.stdout


def test_the_table_orders_runs_naturally_and_marks_runs_without_results(tmp_path):
    for run, rate in (("10", "3"), ("2", "1")):
        (tmp_path / run / ".hydra").mkdir(parents=True)
        (tmp_path / run / ".hydra" / "overrides.yaml").write_text(f"- workload.rate={rate}\n- hydra.verbose=true\n")
    (tmp_path / "2" / "summary.json").write_text(json.dumps(
        {"completed": 5, "rejected": 1, "e2e_s": {"p50": 1.5, "p99": 2.5}, "partial": {"unfinished": 3}}))
    path = write_sweep_table(tmp_path)
    rows = read_table(path)
    assert [(r["run"], r["workload.rate"], r["status"]) for r in rows] == [("2", "1", "partial"),
                                                                           ("10", "3", "missing")]
    assert "hydra.verbose" not in rows[0]
    assert (rows[0]["completed"], rows[0]["e2e_p50_s"], rows[0]["ttft_p50_s"]) == ("5", "1.5", "")
    assert write_sweep_table(tmp_path / "10" / ".hydra") is None  # no run there
    assert write_sweep_table(tmp_path / "10") is None  # no run with results there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "2", "sweep.csv"]  # no temporary file left
