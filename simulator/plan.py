"""`python -m simulator.plan ...`: what-if capacity planning on Ray (see simulator/planning/planner.py).

Every Hydra override of the simulator works here too (workload, slo, engine, perf, ...), plus
the plan's lists, e.g. ``plan.hardware=[h100,a100] plan.replicas=[1,2,4]``. Rerunning with the
same ``hydra.run.dir`` resumes: finished points are kept, the rest run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from simulator.cli_errors import start_command_line
from simulator.configure import CONF_DIR
from simulator.records.errors import ConfigError


def print_outcome(outcome, mode: str = "points") -> None:
    """The verdict, the cheapest few meeting points and where the files are."""
    if mode == "capacity":
        print_capacity(outcome)
        return
    if mode == "day":
        print(f"{outcome.verdict}\nresults    {outcome.out_dir} (day_plan.csv, day_plan.png, recommendation.md)")
        return
    rows = outcome.rows
    from simulator.planning.planner import preference

    meeting = sorted((r for r in rows if r["status"] == "ok" and r["meets_slo"]), key=preference)
    infeasible = [r for r in rows if r["status"] == "infeasible"]
    failed = [r for r in rows if r["status"] == "error"]
    ran = len(rows) - len(infeasible) - len(failed)
    lines = [f"points     {len(rows)} ({outcome.computed} evaluated now, {outcome.reused} reused): "
             f"{ran} ran, {len(infeasible)} cannot run, {len(failed)} failed"]
    for r in meeting[:5]:
        lines.append(f"  ${r['cost_per_hour_usd']:7.2f}/h  {r['attainment']:6.1%}  "
                     f"TTFT p99 {r['ttft_p99_s']:.2f} s  TPOT p99 {r['tpot_p99_s'] * 1000:.0f} ms  "
                     f"{r['label']}")
    lines.append(outcome.verdict)
    lines.append(f"results    {outcome.out_dir}")
    print("\n".join(lines))


def print_capacity(outcome) -> None:
    """Counts, the cheapest few layouts meeting the SLO with their capacity, the verdict."""
    from simulator.planning.planner import preference

    rows = outcome.rows
    count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "pruned", "skipped", "infeasible", "error")}
    meeting = sorted((r for r in rows if r["status"] == "ok" and r["meets_slo"]), key=preference)
    lines = [f"layouts    {len(rows)} ({outcome.computed} evaluated now, {outcome.reused} reused): "
             f"{count['ok']} searched, {count['pruned']} pruned, "
             + (f"{count['skipped']} not proposed by Optuna, " if count["skipped"] else "")
             + f"{count['infeasible']} cannot run, "
             f"{count['error']} failed"]
    for r in meeting[:5]:
        lines.append(f"  ${r['cost_per_hour_usd']:7.2f}/h  capacity {r['capacity_rps']:7.3g} req/s  "
                     f"${r['cap_cost_per_1m_output_tokens_usd']:.3g}/1M tok  TTFT p99 {r['ttft_p99_s']:.2f} s  "
                     f"{r['label']}")
    lines += [outcome.verdict, f"results    {outcome.out_dir} (capacity.csv, pareto.png, recommendation.md)"]
    print("\n".join(lines))


#: what Hydra writes into a run directory before the plan starts
HYDRA_FILES = {".hydra", "plan.log"}


def remove_if_new(out_dir: Path, was_new: bool) -> None:
    """Remove a run directory this plan made and computed no point in (it stopped on bad
    input), and the empty folders above it up to the working directory."""
    from simulator.planning.runner import POINTS

    tables = (POINTS, "capacity.parquet", "day_plan.parquet")
    if not was_new or not out_dir.is_dir() or any((out_dir / t).exists() for t in tables):
        return
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    here = Path.cwd().resolve()
    for parent in out_dir.resolve().parents:
        if parent == here or here not in parent.parents:
            break
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break


def main() -> int:
    import hydra

    if not start_command_line(sys.argv[1:], "planner"):
        return 2

    @hydra.main(config_path=str(CONF_DIR), config_name="planner", version_base=None)
    def _task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from simulator.planning.dispatch import run_plan

        out_dir = Path(HydraConfig.get().runtime.output_dir)
        was_new = not out_dir.is_dir() or not {p.name for p in out_dir.iterdir()} - HYDRA_FILES  # else a resume
        try:
            outcome = run_plan(cfg, out_dir, progress=bool(cfg.get("progress", True)))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            remove_if_new(out_dir, was_new)
            sys.exit(2)
        except KeyboardInterrupt:
            print(f"interrupted: finished points are in {out_dir}/points.parquet; rerun with "
                  f"hydra.run.dir={out_dir} to resume", file=sys.stderr)
            sys.exit(130)
        print_outcome(outcome, str((cfg.get("plan") or {}).get("mode") or "points"))
        failed = [r for r in outcome.rows if r.get("status") == "error"]
        if failed:
            print(f"error: {len(failed)} points failed (first: {failed[0]['label']}: "
                  f"{failed[0]['reason']}); rerun the same command to retry them", file=sys.stderr)
            sys.exit(1)

    _task()
    return 0


if __name__ == "__main__":
    sys.exit(main())
