"""Capacity planning beyond one rate: the rate search against a layout whose capacity is known,
the Pareto front, the capacity and day plans on a real local Ray, and their one-line errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from simulator.configure import CONF_DIR, to_plain
from simulator.planning.layout import BuiltLayout
from simulator.planning.pareto import pareto_front
from simulator.planning.rate_search import (
    Probe,
    SearchSettings,
    find_capacity,
    mean_rate,
    scale_rate,
)
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError
from simulator.records.metrics import SLO
from simulator.records.workload import Workload
from tests.simulator.conftest import LinearModel

REPO = Path(__file__).resolve().parents[3]
STEP_S = 0.01  # every engine step takes exactly this long
OUTPUT = 4     # tokens per request: one prefill step and three decode steps


def fixed_step_layout(replicas: int = 1) -> BuiltLayout:
    """One request at a time (max_num_seqs=1), each taking OUTPUT steps of STEP_S: a replica
    serves exactly 1 / (OUTPUT * STEP_S) = 25 requests per second."""
    perf = LinearModel(overhead=STEP_S, prefill=0.0, decode=0.0, kv_read=0.0)
    return BuiltLayout(EngineConfig.from_dict({"max_num_seqs": 1}), perf, replicas, "round_robin", 0, 10**6)


def evenly_spaced(n: int = 600, rate: float = 5.0) -> Workload:
    return Workload(np.arange(1, n + 1) / rate, np.full(n, 16), np.full(n, OUTPUT), np.zeros(n, int),
                    np.full(n, "math", object))


def test_scale_rate_keeps_the_span_lengths_and_order():
    w = evenly_spaced(200, 5.0)
    for rate in (1.0, 5.0, 12.5, 40.0):
        s = scale_rate(w, rate)
        assert mean_rate(s) == pytest.approx(rate, rel=0.01)
        assert np.all(np.diff(s.arrival_s) >= 0)
        assert s.duration_s == pytest.approx(w.duration_s if rate >= 5 else w.duration_s * 5 / rate)
        assert set(s.output_tokens) == {OUTPUT}


@pytest.mark.parametrize("replicas", [1, 2])
def test_rate_search_brackets_a_known_capacity(replicas):
    from simulator.planning.capacity import layout_capacity

    capacity = replicas / (OUTPUT * STEP_S)  # 25 req/s a replica
    slo = SLO(ttft_s=5 * STEP_S, attainment=0.9)
    settings = SearchSettings(rel_tol=0.02)
    first, found = layout_capacity(fixed_step_layout(replicas), evenly_spaced(), slo, settings)
    assert first.rate == pytest.approx(5.0) and first.sustains  # the workload's own rate
    assert found.rate <= capacity * 1.005 and found.upper >= capacity * 0.995  # brackets it
    assert found.rate >= capacity / (1 + settings.rel_tol) ** 2
    assert found.upper <= found.rate * (1 + settings.rel_tol)
    assert found.at_capacity.metrics["attainment"] >= 0.9
    assert "attainment" in found.limit or "queue grows" in found.limit


def test_same_inputs_same_search():
    from simulator.planning.capacity import layout_capacity

    slo = SLO(ttft_s=5 * STEP_S)
    runs = [layout_capacity(fixed_step_layout(2), evenly_spaced(300), slo, SearchSettings()) for _ in range(2)]
    (first_a, a), (first_b, b) = runs
    assert [(p.rate, p.sustains, p.metrics) for p in a.probes] == [(p.rate, p.sustains, p.metrics) for p in b.probes]
    assert first_a.metrics == first_b.metrics and a.rate == b.rate


def test_without_a_ttft_limit_the_growing_queue_bounds_the_capacity():
    """TPOT alone is met at any load here (each token takes one step), so only the queue rule
    stops the search: overloaded by x, about 1 - 1/x of the requests wait at the end."""
    from simulator.planning.capacity import layout_capacity

    capacity = 1 / (OUTPUT * STEP_S)
    settings = SearchSettings(rel_tol=0.02, max_backlog=0.05)
    _, found = layout_capacity(fixed_step_layout(), evenly_spaced(), SLO(tpot_s=1.0), settings)
    assert found.at_capacity.metrics["attainment"] == 1.0
    assert "queue grows" in found.limit
    assert capacity * 0.98 <= found.rate <= capacity / 0.95 * 1.01 < found.upper * 1.03


def test_bisection_against_a_threshold_and_its_limits():
    settings = SearchSettings(rel_tol=0.05, max_probes=20)
    for edge in (0.3, 7.7, 123.0):
        found = find_capacity(lambda r, e=edge: Probe(r, r <= e, ""), 4.0, settings)
        assert found.rate <= edge < found.upper <= found.rate * 1.05
    nothing = find_capacity(lambda r: Probe(r, False, "no"), 4.0, settings)
    assert nothing.rate == 0 and nothing.at_capacity is None and nothing.limit == "no"
    endless = find_capacity(lambda r: Probe(r, True, ""), 4.0, SearchSettings(max_probes=5))
    assert endless.upper == math.inf and len(endless.probes) == 5 and endless.rate == 4.0 * 2**4
    # a hint near the edge takes fewer probes than a search from far away
    far = find_capacity(lambda r: Probe(r, r <= 7.7, ""), 0.1, settings)
    near = find_capacity(lambda r: Probe(r, r <= 7.7, ""), 7.0, settings, step=1.25)
    assert len(near.probes) < len(far.probes) and near.rate <= 7.7 < near.upper


def test_search_settings_name_the_bad_field():
    with pytest.raises(ConfigError) as err:
        SearchSettings.from_dict({"max_backlog": 1.5})
    assert err.value.field == "plan.search.max_backlog"
    with pytest.raises(ConfigError) as err:
        SearchSettings.from_dict({"rel_tol": -1})
    assert err.value.field == "plan.search.rel_tol"


def _row(i, cost, latency):
    return {"index": i, "label": f"p{i}", "cost_per_hour_usd": cost, "ttft_p99_s": latency}


def test_pareto_front_keeps_exactly_the_undominated_rows():
    rows = [_row(0, 1.0, 9.0), _row(1, 2.0, 5.0), _row(2, 2.0, 6.0), _row(3, 3.0, 5.0),
            _row(4, 4.0, 1.0), _row(5, 0.5, math.nan), _row(6, 5.0, 1.0), _row(7, 1.0, 9.0)]
    front = pareto_front(rows, "cost_per_hour_usd", "ttft_p99_s")
    assert [r["index"] for r in front] == [0, 1, 4]
    rng = np.random.default_rng(3)
    rows = [_row(i, float(c), float(t)) for i, (c, t) in enumerate(rng.integers(1, 20, (60, 2)))]
    front = pareto_front(rows, "cost_per_hour_usd", "ttft_p99_s")
    on = {r["index"] for r in front}

    def beats(a, b):
        return (a["cost_per_hour_usd"] <= b["cost_per_hour_usd"] and a["ttft_p99_s"] <= b["ttft_p99_s"]
                and (a["cost_per_hour_usd"], a["ttft_p99_s"]) != (b["cost_per_hour_usd"], b["ttft_p99_s"]))

    for r in rows:
        dominated = any(beats(o, r) for o in rows)
        assert (r["index"] in on) == (not dominated and not any(
            o["index"] in on and o["index"] < r["index"] and not beats(o, r) and not beats(r, o)
            and (o["cost_per_hour_usd"], o["ttft_p99_s"]) == (r["cost_per_hour_usd"], r["ttft_p99_s"])
            for o in rows))


def test_prune_drops_layouts_another_beats_on_cost_and_capacity():
    from simulator.planning.capacity import prune

    class J:
        def __init__(self, key):
            self.key = key
            self.point = type("P", (), {"label": lambda self, k=key: k})()

    a, b, c, d = J("a"), J("b"), J("c"), J("d")
    dominated = prune([(a, 2.0, 10.0), (b, 2.0, 8.0), (c, 3.0, 11.0), (d, 1.0, 5.0)], margin=0.2)
    assert dominated == {"b": "a"}  # c costs more but is faster: kept; d is cheaper: kept


def test_router_is_a_candidate_axis():
    """Each router of the list is its own layout (key, label, family); a load-aware router runs
    through the cluster simulation."""
    pytest.importorskip("simulator.cluster")
    from simulator.planning.capacity import family
    from simulator.planning.planner import PlanSpace, evaluate_point, resolve_jobs
    from simulator.workload.builder import build_workload

    cfg = plan_config("plan.hardware=[a100]", "plan.replicas=[2]", "plan.optimization=[none]",
                      "plan.engine.max_num_seqs=null", "plan.router=[round_robin,least_outstanding]",
                      "workload.num_requests=60", "workload.max_tokens=2048")
    workload, slo = build_workload(cfg["workload"]), SLO.from_dict(cfg["slo"])
    jobs = resolve_jobs(PlanSpace.from_config(cfg), cfg, workload, slo, 0)
    assert [j.point.router for j in jobs] == ["round_robin", "least_outstanding"]
    assert len({j.key for j in jobs}) == 2 and len({family(j.point) for j in jobs}) == 2
    assert jobs[0].point.label() == "a100 x2 tp1 r1-distill-qwen-7b none"  # labels of old plans kept
    rows = [evaluate_point(j, workload, slo) for j in jobs]
    assert all(r["status"] == "ok" and r["requests"] == 60 for r in rows)
    assert rows[1]["router"] == "least_outstanding" and rows[1]["label"].endswith("least_outstanding")


def test_optuna_is_optional_and_its_absence_is_one_line(monkeypatch):
    from simulator.planning.capacity import PlannerSearch

    monkeypatch.setitem(sys.modules, "optuna", None)  # as if not installed
    with pytest.raises(ConfigError) as err:
        PlannerSearch.from_dict({"optuna_trials": 20})
    assert err.value.field == "plan.search.optuna_trials" and "pip install optuna" in str(err.value)
    assert PlannerSearch.from_dict({"optuna_trials": None}).optuna_trials is None


# ---------------------------------------------------------------- plans on Ray


def plan_config(*overrides: str) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return to_plain(compose("planner", overrides=list(overrides)))


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_capacity_plan_searches_prunes_and_recommends(ray_local, tmp_path):
    from simulator.planning.dispatch import run_plan

    cfg = plan_config("plan=capacity", "plan.hardware=[h100,a100]", "plan.tp=[1,2]",
                      "plan.replicas=[1,2]", "plan.optimization=[none]", "workload.num_requests=150",
                      "workload.max_tokens=4096", "plan.search.rel_tol=0.1", "progress=false")
    outcome = run_plan(cfg, tmp_path, progress=False)
    table = pd.read_parquet(tmp_path / "capacity.parquet")
    assert len(table) == 8 and set(table["status"]) <= {"ok", "pruned"}
    searched = table[table["status"] == "ok"]
    assert (searched["capacity_rps"] > 0).all()
    assert (searched["capacity_upper_rps"] <= searched["capacity_rps"] * 1.1 + 1e-9).all()
    assert (searched["cap_attainment"] >= 0.9).all()
    for _, group in searched.groupby(["hardware", "tp"]):  # more replicas sustain more
        caps = group.sort_values("replicas")["capacity_rps"].to_numpy()
        assert np.all(np.diff(caps) > 0)
    for r in table[table["status"] == "pruned"].to_dict("records"):
        assert r["reason"].startswith("dominated by") and r["capacity_estimated"]
    meeting = searched[searched["meets_slo"]]
    assert outcome.chosen["cost_per_hour_usd"] == meeting["cost_per_hour_usd"].min()
    assert (meeting["capacity_rps"] >= meeting["rate_rps"]).all()
    summary = json.loads((tmp_path / "plan.json").read_text())
    assert summary["mode"] == "capacity" and summary["pareto_front"]
    assert outcome.chosen["label"] in (tmp_path / "recommendation.md").read_text()
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    again = run_plan(cfg, tmp_path, progress=False)  # resumes: nothing recomputed
    assert again.computed == 0 and again.chosen["key"] == outcome.chosen["key"]


def test_day_plan_uses_fewer_replicas_in_a_quiet_window(ray_local, tmp_path):
    from simulator.planning.dispatch import run_plan

    cfg = plan_config("plan=day", "workload=piecewise",
                      "workload.windows=[{duration_s:600,rate:1.0,cv:1.0},{duration_s:600,rate:40.0,cv:1.0}]",
                      "workload.max_tokens=4096", "plan.day.window_s=30", "plan.search.rel_tol=0.1",
                      "progress=false")
    outcome = run_plan(cfg, tmp_path, progress=False)
    rows = pd.read_parquet(tmp_path / "day_plan.parquet").sort_values("window")
    quiet, peak = rows["replicas"].tolist()
    assert quiet < peak and rows["sustains"].all()
    summary = json.loads((tmp_path / "plan.json").read_text())
    best = summary["best"]
    assert best["peak_replicas"] == peak
    assert best["planned_usd"] < best["fixed_fleet_usd"]
    assert best["fixed_fleet_usd"] == pytest.approx(peak * 2.99 * 20 / 60)
    assert (tmp_path / "day_plan.png").stat().st_size > 10_000
    assert outcome.chosen["family"] in (tmp_path / "recommendation.md").read_text()
    assert summary["failed_windows"] == []

    # a window whose simulation failed: the family is not costed, and the error says why
    from simulator.planning.day_plan import (
        DaySettings,
        day_windows,
        family_summary,
        window_workload,
    )
    from simulator.planning.planner import PlanSpace, resolve_jobs
    from simulator.records.metrics import SLO

    settings = DaySettings.from_dict(cfg["plan"]["day"])
    windows = day_windows(cfg["workload"], settings.duration_s)
    reference = window_workload(cfg["workload"], windows[1], settings)
    job = min(resolve_jobs(PlanSpace.from_config(cfg), cfg, reference, SLO.from_dict(cfg["slo"]), 0),
              key=lambda j: j.point.replicas)
    cap = {"status": "ok", "capacity_rps": best["capacity_per_replica_rps"] * job.point.replicas}
    window_rows = rows.to_dict("records")
    costed = family_summary(best["family"], job, cap, window_rows, [], len(windows))
    assert costed["planned_usd"] == pytest.approx(best["planned_usd"])
    error = {"family": best["family"], "window": 1, "error": "IndexError: index 11 is out of bounds"}
    failed = family_summary(best["family"], job, cap, window_rows[:1], [error], len(windows))
    assert failed["status"] == "error" and "planned_usd" not in failed
    assert failed["reason"] == "1 window(s) failed, e.g. window 1: IndexError: index 11 is out of bounds"


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize(("args", "line"), [
    (["plan=capacity", "plan.hardware=[]"], "error: plan.hardware: the candidate space is empty"),
    (["plan=capacity", "plan.replicas=[]"], "error: plan.replicas: the candidate space is empty"),
    (["plan=capacity", "plan.search.max_backlog=2"], "error: plan.search.max_backlog: must lie in (0, 1)"),
    (["plan=day", "workload=gamma"], "error: workload.kind: a day plan needs a rate profile"),
    (["plan.mode=hourly"], "error: plan.mode: allowed: points, capacity, day"),
    (["plan=capacity", "plan.router=[round_robin,random]"], "error: plan.router: unknown router 'random'"),
])
def test_cli_bad_plan_is_one_line_exit_2(tmp_path, args, line):
    proc = subprocess.run([sys.executable, "-m", "simulator.plan", f"hydra.run.dir={tmp_path / 'run'}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), lines
    assert not (tmp_path / "run").exists()


def test_a_faster_probe_repeats_each_request_with_all_its_fields():
    """scale_rate: the requests arrive faster and repeat; nested prefixes and timeouts come along."""
    import numpy as np

    from simulator.planning.rate_search import scale_rate
    from simulator.records.workload import Workload

    w = Workload(arrival_s=[0.0, 1.0, 2.0], prompt_tokens=[10, 20, 30], output_tokens=[5, 6, 7],
                 reasoning_tokens=[0, 0, 0], domain=["a", "b", "c"], prefix_group=[0, 1, 1], prefix_tokens=[8, 16, 16],
                 outer_group=[-1, 0, 0], outer_tokens=[0, 8, 8], timeout_s=[np.inf, 3.0, 4.0])
    fast = scale_rate(w, 3.0)  # twice the workload's own rate (3 requests over 2 s = 1.5/s)
    assert len(fast) > len(w)
    prompts = {10: (-1, 0, np.inf), 20: (0, 8, 3.0), 30: (0, 8, 4.0)}
    for p, g, t, to in zip(fast.prompt_tokens, fast.outer_group, fast.outer_tokens, fast.timeout_s, strict=True):
        assert (g, t, to) == prompts[int(p)]
