"""Capacity planning: the search space, the merged per-point metrics, the choice, and the
runs on real Ray (local mode) with resume; the CLI's outputs and one-line errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from calibration import catalog
from simulator.configure import CONF_DIR, to_plain
from simulator.planning.layout import route
from simulator.planning.planner import (
    PlanSpace,
    choose,
    cost_per_hour,
    cost_per_million_tokens,
    evaluate_point,
    resolve_jobs,
    verdict,
)
from simulator.records.errors import ConfigError
from simulator.records.metrics import SLO
from simulator.workload.builder import build_workload

REPO = Path(__file__).resolve().parents[3]
# 150 reasoning requests in under 4 s: one A100 is overloaded (TTFT), two are not
SMALL = ("workload.rate=40", "workload.num_requests=150", "workload.max_tokens=4096",
         "workload.lengths.max_prompt_tokens=8192",  # no 32k prompt among 150 requests
         "plan.hardware=[h100,a100]", "plan.tp=[1,3]", "plan.replicas=[1,2,4]",
         "plan.optimization=[none]", "plan.engine.max_num_seqs=null", "progress=false")
VOLATILE = ["wall_s"]  # the only column allowed to differ between identical runs


def plan_config(*overrides: str) -> dict:
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return to_plain(compose("planner", overrides=list(overrides)))


def jobs_for(cfg: dict):
    workload = build_workload(cfg["workload"])
    slo = SLO.from_dict(cfg["slo"])
    space = PlanSpace.from_config(cfg)
    return resolve_jobs(space, cfg, workload, slo, workload.seed), workload, slo


# ---------------------------------------------------------------- pure planner logic


@pytest.mark.parametrize(
    ("override", "field", "allowed"),
    [
        ("plan.hardware=[h100,tpu9]", "plan.hardware", "a100, b200, h100"),
        ("plan.optimization=[none,fp4]", "plan.optimization", "fp8_kv"),
        ("plan.model=[gpt-9]", "plan.model", "r1-distill-qwen-7b"),
        ("plan.replicas=[1,0]", "plan.replicas", "integers >= 1"),
        ("plan.router=random", "plan.router", "round_robin"),
        ("+plan.engine.max_num_sqs=[8]", "plan.engine", "max_num_seqs"),
        ("plan.engine.block_size=[16,48]", "plan.engine.block_size", "divisor of max_model_len"),
    ],
)
def test_bad_plan_input_is_one_line_naming_field_and_allowed(override, field, allowed):
    with pytest.raises(ConfigError) as err:
        PlanSpace.from_config(plan_config(override))
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ") and allowed in str(err.value)
    assert "\n" not in str(err.value)


def test_space_has_every_combination_once_and_falls_back_to_the_run_choices():
    cfg = plan_config("plan.hardware=[h100,a100,h100]", "plan.replicas=[1,2,4]",
                      "plan.optimization=[none,fp8_kv]", "plan.engine.max_num_seqs=[64,256]",
                      "plan.tp=null", "plan.model=null", "model=qwen2.5-7b", "tp=2")
    points = PlanSpace.from_config(cfg).points()
    assert len(points) == 2 * 3 * 2 * 2  # duplicates in a list count once
    assert len({p.label() for p in points}) == len(points)
    assert [p.index for p in points] == list(range(len(points)))
    assert {p.model for p in points} == {"qwen2.5-7b"} and {p.tp for p in points} == {2}
    assert [p.replicas for p in points[:3]] == [1, 2, 4]  # replicas vary fastest
    assert {dict(p.engine)["max_num_seqs"] for p in points} == {64, 256}


def test_round_robin_gives_each_request_to_exactly_one_replica_in_turn():
    cfg = plan_config(*SMALL)
    workload = build_workload(cfg["workload"])
    for n in (1, 2, 3, 4, 7):
        parts = route(workload, n)
        assert len(parts) == n
        merged = np.sort(np.concatenate(parts))
        assert np.array_equal(merged, np.arange(len(workload)))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        for r, part in enumerate(parts):
            assert np.all(part % n == r) and np.all(np.diff(part) > 0)


def test_cost_arithmetic():
    assert cost_per_hour(3, 2, 2.99) == pytest.approx(6 * 2.99)
    assert cost_per_hour(1, 1, 0.0) == 0.0
    # one million tokens at 1000 tok/s take 1000 s, i.e. 1/3.6 of an hour
    assert cost_per_million_tokens(36.0, 1000.0) == pytest.approx(10.0)
    assert cost_per_million_tokens(5.0, 0.0) == math.inf


def _row(index, cost, attainment, meets, status="ok", per_token=1.0, calibrated=True):
    return {"index": index, "label": f"p{index}", "status": status, "cost_per_hour_usd": cost,
            "attainment": attainment, "meets_slo": meets, "cost_per_1m_output_tokens_usd": per_token,
            "calibrated": calibrated}


def test_choose_takes_the_cheapest_meeting_point_and_otherwise_the_closest():
    rows = [_row(0, 5.0, 0.99, True), _row(1, 2.0, 0.95, True), _row(2, 2.0, 0.97, True),
            _row(3, 1.0, 0.50, False), _row(4, 0.5, math.nan, False, status="infeasible")]
    chosen, closest = choose(rows)
    assert chosen["index"] == 2 and closest is chosen  # same cost: the higher attainment wins
    missing = [_row(0, 5.0, 0.80, False), _row(1, 2.0, 0.85, False), _row(2, 9.0, 0.85, False)]
    chosen, closest = choose(missing)
    assert chosen is None and closest["index"] == 1  # highest attainment, then cheapest
    assert choose([_row(0, 1.0, math.nan, False, status="infeasible")]) == (None, None)


def test_verdict_names_the_choice_or_the_closest_and_flags_uncalibrated_models():
    slo = SLO(ttft_s=2.0, attainment=0.9)
    chosen, _ = choose([_row(0, 2.0, 0.95, True), _row(1, 1.0, 0.5, False)])
    assert verdict(chosen, chosen, slo, 2).startswith("cheapest point meeting the SLO (90%")
    assert "p0 at $2.00/h" in verdict(chosen, chosen, slo, 2)
    rough = _row(0, 1.0, 0.95, True, calibrated=False)
    assert "UNCALIBRATED" in verdict(rough, rough, slo, 1)
    assert "UNCALIBRATED" not in verdict(chosen, chosen, slo, 2)
    none, closest = choose([_row(0, 2.0, 0.7, False), _row(1, 3.0, 0.8, False)])
    assert verdict(none, closest, slo, 2).startswith("no point meets the SLO")
    assert "closest: p1" in verdict(none, closest, slo, 2)


def test_one_replica_point_equals_a_plain_simulation():
    from calibration.registry import build_performance_model
    from simulator.configure import engine_config
    from simulator.engine.loop import simulate

    cfg = plan_config(*SMALL, "plan.hardware=[a100]", "plan.replicas=[1]", "plan.tp=[1]")
    (job,), workload, slo = jobs_for(cfg)
    row = evaluate_point(job, workload, slo)
    engine = engine_config(cfg["engine"], cfg["optimization"])
    perf = build_performance_model("a100", cfg["model"]["name"], cfg["optimization"], 1, engine=engine)
    s = simulate(workload, engine, perf, slo=slo, seed=workload.seed).summary
    assert row["status"] == "ok" and row["requests"] == len(workload)
    assert row["attainment"] == pytest.approx(s["goodput"]["attainment"])
    assert row["meets_slo"] == s["goodput"]["meets_slo"]
    assert row["ttft_p99_s"] == pytest.approx(s["ttft_s"]["p99"])
    assert row["e2e_p50_s"] == pytest.approx(s["e2e_s"]["p50"])
    assert row["kv_peak"] == pytest.approx(s["kv_usage"]["peak"])
    assert row["kv_mean"] == pytest.approx(s["kv_usage"]["mean"])
    assert row["preemptions"] == s["preemptions"]
    assert row["output_tokens_per_s"] == pytest.approx(s["throughput"]["output_tokens_per_s"])


def test_same_seed_same_row_and_another_seed_another_row():
    def rows(seed):
        cfg = plan_config(*SMALL, "plan.hardware=[a100]", "plan.replicas=[2]", "plan.tp=[1]",
                          f"workload.seed={seed}")
        (job,), workload, slo = jobs_for(cfg)
        row = evaluate_point(job, workload, slo)
        return job.key, {k: v for k, v in row.items() if k not in VOLATILE}

    key_a, a = rows(5)
    key_b, b = rows(5)
    key_c, c = rows(6)
    assert key_a == key_b and a == b
    assert key_c != key_a and c["e2e_p99_s"] != a["e2e_p99_s"]


def test_infeasible_points_carry_the_reason():
    cfg = plan_config(*SMALL, "plan.hardware=[h100]", "plan.replicas=[1]", "plan.tp=[1,3]",
                      "plan.model=[r1-distill-llama-70b,r1-distill-qwen-7b]")
    jobs, workload, slo = jobs_for(cfg)
    rows = {job.point.label(): evaluate_point(job, workload, slo) for job in jobs}
    big = rows["h100 x1 tp1 r1-distill-llama-70b none"]
    assert big["status"] == "infeasible" and "does not fit" in big["reason"]
    odd = rows["h100 x1 tp3 r1-distill-qwen-7b none"]
    assert odd["status"] == "infeasible" and "tp=3 does not divide" in odd["reason"]
    assert rows["h100 x1 tp1 r1-distill-qwen-7b none"]["status"] == "ok"
    assert not big["meets_slo"] and big["cost_per_hour_usd"] == pytest.approx(2.99 * 1)


def test_a_data_parallel_replica_counts_and_simulates_its_ranks():
    """engine.data_parallel_size=2: one replica is two engine ranks behind vLLM's DP coordinator
    (least outstanding), so it uses tp x 2 GPUs, costs as much as two replicas, and (a dense model:
    each rank the dp=1 engine) gives the row of two replicas behind least_outstanding."""
    cfg = plan_config(*SMALL, "plan.hardware=[a100]", "plan.replicas=[1,2]", "plan.tp=[1]",
                      "+plan.engine.data_parallel_size=[1,2]", "plan.router=[round_robin,least_outstanding]")
    jobs, workload, slo = jobs_for(cfg)
    by_label = {job.point.label(): job for job in jobs}
    base = "a100 x{} tp1 r1-distill-qwen-7b none data_parallel_size={}"
    one = evaluate_point(by_label[base.format(1, 1)], workload, slo)
    dp2 = evaluate_point(by_label[base.format(1, 2)], workload, slo)
    two = evaluate_point(by_label[base.format(2, 1) + " least_outstanding"], workload, slo)
    assert (one["gpus"], dp2["gpus"], two["gpus"]) == (1, 2, 2)
    assert dp2["cost_per_hour_usd"] == pytest.approx(2 * one["cost_per_hour_usd"]) == two["cost_per_hour_usd"]
    assert dp2["status"] == two["status"] == "ok"
    for column in ("completed", "attainment", "ttft_p99_s", "e2e_p50_s", "kv_mean", "kv_peak", "preemptions",
                   "output_tokens_per_s", "cost_per_1m_output_tokens_usd"):
        assert dp2[column] == pytest.approx(two[column]), column
    assert dp2["ttft_p99_s"] < one["ttft_p99_s"]  # (one A100 is overloaded by SMALL, two are not)
    # two such replicas behind a router reading their state: not modelled, said in the row
    nested = evaluate_point(by_label[base.format(2, 2) + " least_outstanding"], workload, slo)
    assert nested["status"] == "infeasible" and "engine.data_parallel_size" in nested["reason"]
    assert nested["gpus"] == 4


def test_keys_follow_every_setting_that_changes_a_row():
    def keys(*extra):
        cfg = plan_config(*SMALL, "plan.hardware=[h100]", "plan.replicas=[1,2]", "plan.tp=[1]", *extra)
        return [j.key for j in jobs_for(cfg)[0]]

    base = keys()
    assert base == keys() and len(set(base)) == 2
    assert not set(base) & set(keys("hardware.price_per_gpu_hour_usd=2.5"))  # price of h100
    assert not set(base) & set(keys("slo.ttft_s=1.0"))
    assert not set(base) & set(keys("workload.seed=1"))
    assert not set(base) & set(keys("engine.max_num_seqs=64"))
    assert base == keys("plan.num_cpus=1", "progress=true")  # how it runs is not what it computes


def test_store_keeps_finished_rows_retries_failed_ones_and_sets_other_plans_aside(tmp_path):
    from simulator.planning.runner import PointStore, _error_row

    cfg = plan_config(*SMALL, "plan.hardware=[h100]", "plan.replicas=[1]")
    jobs, workload, slo = jobs_for(cfg)  # tp 1 (runs) and tp 3 (cannot run)
    infeasible = evaluate_point(jobs[1], workload, slo)
    failed = _error_row(jobs[0], RuntimeError("worker died\nMemoryError: out of memory"))
    assert failed["status"] == "error" and failed["reason"] == "RuntimeError: MemoryError: out of memory"
    stranger = {**infeasible, "key": "0123456789abcdef", "index": 7}
    store = PointStore(tmp_path)
    store.write([failed, infeasible, stranger])
    assert len(pd.read_csv(tmp_path / "points.csv")) == 3
    done = store.load({j.key for j in jobs})
    assert list(done) == [jobs[1].key]  # the failed point will run again
    assert done[jobs[1].key]["reason"] == infeasible["reason"]
    assert len(pd.read_parquet(tmp_path / "points.previous-1.parquet")) == 3


# ---------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def planned(ray_local, tmp_path_factory):
    from simulator.planning.dispatch import run_plan

    out = tmp_path_factory.mktemp("plan")
    outcome = run_plan(plan_config(*SMALL), out, progress=False)
    return outcome, out


def test_plan_writes_points_summary_and_plot(planned):
    outcome, out = planned
    table = pd.read_parquet(out / "points.parquet")
    assert len(table) == 2 * 2 * 3 and outcome.computed == 12 and outcome.reused == 0
    csv = pd.read_csv(out / "points.csv")
    assert list(csv["key"]) == list(table["key"]) and list(csv["label"]) == list(table["label"])
    assert (out / "cost_vs_attainment.png").stat().st_size > 10_000
    assert len(pd.read_parquet(out / "workload.parquet")) == 150
    summary = json.loads((out / "plan.json").read_text())
    assert summary["seed"] == 0 and summary["versions"]["ray"] not in ("", "not installed")
    assert summary["config"]["plan"]["hardware"] == ["h100", "a100"]
    assert summary["config"]["workload"]["rate"] == 40
    assert summary["points"]["infeasible"] == 6 and summary["points"]["ran"] == 6
    assert summary["chosen"]["key"] == outcome.chosen["key"]
    assert outcome.chosen["label"] in summary["verdict"]


def test_plan_records_points_that_cannot_run(planned):
    table = pd.read_parquet(planned[1] / "points.parquet")
    bad = table[table["tp"] == 3]
    assert (bad["status"] == "infeasible").all() and bad["reason"].str.contains("tp=3").all()
    assert bad["attainment"].isna().all() and not bad["meets_slo"].any()
    assert (table[table["tp"] == 1]["status"] == "ok").all()


def test_more_replicas_never_lower_attainment(planned):
    table = pd.read_parquet(planned[1] / "points.parquet")
    ok = table[table["status"] == "ok"]
    for hw, group in ok.groupby("hardware"):
        att = group.sort_values("replicas")["attainment"].to_numpy()
        assert np.all(np.diff(att) >= 0), (hw, att)
        ttft = group.sort_values("replicas")["ttft_p99_s"].to_numpy()
        assert np.all(np.diff(ttft) <= 0), (hw, ttft)
    a100 = ok[ok["hardware"] == "a100"].set_index("replicas")["attainment"]
    assert a100[1] < 0.9 <= a100[2]  # the workload does overload one A100


def test_costs_follow_replicas_tp_and_price(planned):
    table = pd.read_parquet(planned[1] / "points.parquet")
    for row in table.to_dict("records"):
        price = catalog.load_hardware(row["hardware"]).price_per_gpu_hour_usd
        assert row["cost_per_hour_usd"] == pytest.approx(row["replicas"] * row["tp"] * price)
        assert row["gpus"] == row["replicas"] * row["tp"]
        if row["status"] == "ok":
            expected = row["cost_per_hour_usd"] / (row["output_tokens_per_s"] * 3600) * 1e6
            assert row["cost_per_1m_output_tokens_usd"] == pytest.approx(expected)


def test_chosen_point_is_the_cheapest_meeting_the_slo(planned):
    outcome, out = planned
    table = pd.read_parquet(out / "points.parquet")
    ok = table[table["status"] == "ok"]
    assert (ok["meets_slo"] == (ok["attainment"] >= 0.9)).all()
    meeting = ok[ok["meets_slo"]]
    assert len(meeting) < len(ok)  # some point misses, so the choice is not trivial
    assert outcome.chosen["cost_per_hour_usd"] == meeting["cost_per_hour_usd"].min()
    assert outcome.chosen["meets_slo"] and outcome.chosen["status"] == "ok"
    cheaper = ok[ok["cost_per_hour_usd"] < outcome.chosen["cost_per_hour_usd"]]
    assert len(cheaper) and not cheaper["meets_slo"].any()  # a cheaper point exists and misses


def test_rerun_resumes_skipping_finished_points_with_identical_rows(planned, ray_local, tmp_path):
    from simulator.planning.dispatch import run_plan

    first = pd.read_parquet(planned[1] / "points.parquet")
    shutil.copytree(planned[1], tmp_path, dirs_exist_ok=True)
    kept = first[first["index"] % 3 != 1]  # as if the run had stopped with some points undone
    kept.to_parquet(tmp_path / "points.parquet", index=False)
    outcome = run_plan(plan_config(*SMALL), tmp_path, progress=False)
    assert outcome.computed == len(first) - len(kept) and outcome.reused == len(kept)
    again = pd.read_parquet(tmp_path / "points.parquet")
    pd.testing.assert_frame_equal(again.drop(columns=VOLATILE), first.drop(columns=VOLATILE))
    reused = again[again["key"].isin(kept["key"])]
    assert list(reused["wall_s"]) == list(kept["wall_s"])  # reused, not recomputed
    assert run_plan(plan_config(*SMALL), tmp_path, progress=False).computed == 0
    # another SLO is another plan: every point reruns and the old table is kept aside
    other = run_plan(plan_config(*SMALL, "slo.ttft_s=0.5"), tmp_path, progress=False)
    assert other.computed == len(first)
    assert len(pd.read_parquet(tmp_path / "points.previous-1.parquet")) == len(first)


# ---------------------------------------------------------------- the CLI


def run_cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "simulator.plan", *args] if code is None else [sys.executable, "-c", code, *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli_bad_name_exits_2_with_one_line(tmp_path):
    proc = run_cli(f"hydra.run.dir={tmp_path}", "plan.optimization=[none,turbo]")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: plan.optimization: unknown choice 'turbo'; allowed: " + ", ".join(catalog.names("optimization"))]
    assert not (tmp_path / "points.parquet").exists()


def test_cli_without_ray_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['ray'] = None; sys.argv[0] = 'plan'; "
            "from simulator.plan import main; sys.exit(main())")
    proc = run_cli(f"hydra.run.dir={tmp_path / 'run'}", *SMALL, code=code)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("pip install -e '.[plan]'")
    assert not (tmp_path / "run").exists()  # nothing computed: the run folder is gone too


def plan_in(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The planner CLI run in ``cwd`` (default run folders land there), Ray's auth mode unset."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    return subprocess.run([sys.executable, "-m", "simulator.plan", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bad", ["plan.replicas=[0]", "workload.rate=-1", "plan.engine.block_size=[16,48]"])
def test_cli_bad_input_leaves_no_run_folder(tmp_path, bad):
    proc = plan_in(tmp_path, *SMALL, bad)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert list(tmp_path.iterdir()) == []  # no outputs/plan/<date>/<time> left behind


def test_cli_on_a_local_ray_prints_no_token_warning(tmp_path):
    """The planner starts its own local Ray with token authentication chosen, so Ray has
    nothing to warn about; the plan runs as before."""
    proc = plan_in(tmp_path, *SMALL, "plan.hardware=[h100]", "plan.tp=[1]", "plan.replicas=[1]",
                   "plan.num_cpus=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Token authentication" not in proc.stderr and "RAY_AUTH_MODE" not in proc.stderr
    assert "cheapest point meeting the SLO" in proc.stdout
    (run,) = (tmp_path / "outputs" / "plan").glob("*/*")
    assert json.loads((run / "plan.json").read_text())["points"]["total"] == 1


def test_cli_attaches_to_a_ray_cluster_and_writes_the_plan(ray_local, tmp_path):
    address = ray_local.get_runtime_context().gcs_address
    proc = run_cli(f"hydra.run.dir={tmp_path}", *SMALL, "plan.hardware=[a100]", "plan.tp=[1]",
                   "plan.replicas=[1,2]", f"plan.ray_address={address}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cheapest point meeting the SLO" in proc.stdout and "a100 x2 tp1" in proc.stdout
    summary = json.loads((tmp_path / "plan.json").read_text())
    assert summary["chosen"]["replicas"] == 2 and summary["points"]["total"] == 2
    assert (tmp_path / "resolved_config.yaml").exists() and (tmp_path / ".hydra").is_dir()


def test_a_plan_compares_tensor_and_expert_parallel_layouts_of_a_moe_model(tmp_path):
    """`plan.engine.enable_expert_parallel=[false,true]` makes EP one more axis for an MoE model."""
    proc = subprocess.run(
        [sys.executable, "-m", "simulator.plan", "model=qwen3-30b-a3b", "plan.hardware=[h100]", "plan.tp=[2]",
         "plan.replicas=[1]", "plan.optimization=[none]", "plan.engine.max_num_seqs=[256]",
         "plan.engine.enable_expert_parallel=[false,true]", "workload.num_requests=40", "progress=false",
         f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    points = pd.read_csv(tmp_path / "points.csv")
    assert len(points) == 2
    assert sorted(points["label"].str.contains("enable_expert_parallel=True")) == [False, True]
