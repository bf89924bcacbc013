"""The study behind rllm-sim (Li et al., arXiv 2510.18672), reproduced in one command.

    python -m examples.paper_findings [out=DIR] [seed=0] [quick=true]
    python -m examples.paper_findings model=qwen3-8b hardware=h200 workload=servegen [tp=1]

Writes ``report.md`` (with PNG figures) and ``findings.json`` (every number, plus the
settings, seed and versions) into ``out`` (default outputs/paper_findings/<UTC time>).
The default run puts the simulator (shipped H100 calibration) beside the study's numbers,
quoted with their sources in examples/paper_study.yaml: 1 pilot (batch of 16, 7B pair),
2 Gamma load (14B pair), 3 running time against difficulty and prompt length,
4 optimizations, 5 token budgets. Giving model=, hardware=, workload=, tp= or perf= (or a
dotted workload.*/engine.* override) reruns sections 2, 4 and 5 for that deployment.
Same arguments and seed give the same findings.json bytes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python examples/paper_findings.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulator.records.errors import ConfigError, require  # noqa: E402

STUDY_PATH = Path(__file__).with_name("paper_study.yaml")
PILOT_DATASETS = ("GSM8K", "MATH-500", "AIME-2024", "GPQA")
GAMMA_DATASETS = ("MATH-500", "ShareGPT")
BUDGETS = (4096, 8192, 12288, 16384, 20480, None)
OPTIMIZATIONS = ("fp8_weights", "int8_weights", "gptq_int4", "awq_int4", "fp8_kv", "fp8_kv_e5m2",
                 "prefix_off", "spec_ngram")
LENGTH_SCALES = (1.0, 1.1, 1.2, 1.3)  # what-if output length scales for int4 weights (section 4)
SPEC_ACCEPTANCE = (0.2, 0.5, 0.8)  # what-if constant per-position acceptance (section 4)
PRESSURE_FRACTIONS = {False: (0.1, 0.2, 0.35, 0.5, 0.75), True: (0.15, 0.35, 0.75)}
DIFFICULTY_RANK = {"easy": 0, "medium": 1, "hard": 2}
USER_KEYS = ("model", "hardware", "workload", "tp", "perf", "engine")
GAMMA_RATE, GAMMA_CV = 2.0, 2.0  # the bursty load of sections 2 and 5 (an assumption)
# requests per run (full, quick): gamma per dataset, difficulty / budgets per dataset, benchmark
SIZES = {"gamma": (2000, 60), "difficulty": (150, 6), "budgets": (300, 15), "benchmark": (128, 8)}


@dataclass(frozen=True)
class Settings:
    """What the command line asks for."""

    out: Path
    seed: int = 0
    quick: bool = False
    overrides: tuple[str, ...] = ()  # Hydra overrides of a user's deployment (sections 2, 4, 5)
    max_requests: int = 2000

    @property
    def user(self) -> bool:
        return bool(self.overrides)

    def size(self, name: str) -> int:
        return SIZES[name][1 if self.quick else 0]


@dataclass
class Batch:
    """A workload plus the dataset and difficulty label of each request."""

    workload: Any
    dataset: np.ndarray
    difficulty: np.ndarray


@dataclass
class Report:
    """Markdown lines and the findings they quote."""

    lines: list[str] = field(default_factory=list)
    findings: dict[str, Any] = field(default_factory=dict)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> Settings:
    """key=value arguments (and --quick) as Settings; ConfigError names a bad one."""
    out, seed, quick, max_requests, overrides = None, 0, False, None, []
    for arg in argv:
        if arg in ("--quick", "-q"):
            quick = True
            continue
        require("=" in arg, "argument", f"expected key=value (e.g. quick=true), got {arg!r}")
        key, value = arg.split("=", 1)
        if key == "out":
            require(value != "", "out", "must be a directory path, got ''")
            out = Path(value)
        elif key == "seed":
            require(value.isdigit(), "seed", f"must be an integer >= 0, got {value!r}")
            seed = int(value)
        elif key == "quick":
            require(value.lower() in ("true", "false", "1", "0"), "quick",
                    f"must be true or false, got {value!r}")
            quick = value.lower() in ("true", "1")
        elif key == "max_requests":
            require(value.isdigit() and int(value) >= 1, "max_requests",
                    f"must be an integer >= 1, got {value!r}")
            max_requests = int(value)
        elif key == "tp":
            require(value.isdigit() and int(value) >= 1, "tp", f"must be an integer >= 1, got {value!r}")
            overrides.append(arg)
        elif key in USER_KEYS or key.split(".", 1)[0] in ("workload", "engine", "perf", "slo"):
            overrides.append(arg)
        else:
            allowed = ["out", "seed", "quick", "max_requests", *USER_KEYS, "workload.*", "engine.*"]
            raise ConfigError(key, f"unknown argument; allowed: {', '.join(allowed)}")
    from simulator.configure import check_group_choices

    check_group_choices(overrides)
    if out is None:
        out = Path("outputs/paper_findings") / time.strftime("%Y-%m-%d_%H-%M-%S", time.gmtime())
    if max_requests is None:
        max_requests = 150 if quick else 2000
    return Settings(out, seed, quick, tuple(overrides), max_requests)


# --------------------------------------------------------------------------- building runs

_SPECS: dict[tuple[str, ...], Any] = {}


def run_spec(overrides: list[str] | tuple[str, ...]):
    """The RunSpec of conf/ composed with overrides (cached: the perf model takes ~0.1-1 s)."""
    key = tuple(overrides)
    if key not in _SPECS:
        from hydra import compose, initialize_config_dir
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from simulator.configure import CONF_DIR, build_run

        try:
            with initialize_config_dir(str(CONF_DIR), version_base=None):
                cfg = compose("config", overrides=list(key))
        except (HydraException, OmegaConfBaseException) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(_override_field(key, first),
                              f"not a key or value conf/ accepts ({first})") from None
        _SPECS[key] = build_run(cfg)
    return _SPECS[key]


def _override_field(overrides: tuple[str, ...], message: str) -> str:
    """The override key a Hydra message is about: named in it, or the one that fails to parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in overrides:
        name = arg.split("=", 1)[0].lstrip("+~")
        if name and name in message:
            return name
        try:
            parser.parse_overrides([arg])
        except HydraException:
            return name
    return "overrides"


def simulate(spec, workload, seed: int):
    """Run a workload on a spec's engine and performance model, with the output lengths its
    optimization writes (``output_length_scale``, simulator.workload.output_scale)."""
    from simulator.engine.loop import simulate as run
    from simulator.workload.output_scale import output_length_scale, scale_outputs

    workload = scale_outputs(workload, output_length_scale(spec.optimization), spec.engine.max_model_len)
    return run(workload, spec.engine, spec.perf, slo=spec.slo, seed=seed)


def model_spec(model: str, tp: int, optimization: str = "none", perf: str | None = None):
    """The spec of a model on the shipped H100 calibration."""
    overrides = [f"model={model}", f"tp={tp}", f"optimization={optimization}", "hardware=h100"]
    if perf:
        overrides.append(f"perf.source={perf}")
    return run_spec(overrides)


# --------------------------------------------------------------------------- workloads


def load_study() -> dict:
    import yaml

    return yaml.safe_load(STUDY_PATH.read_text())


def sample_dataset(study: dict, name: str, n: int, rng: np.random.Generator,
                   ordinary: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """prompt, output, reasoning tokens and difficulty of n requests of a dataset.

    The reasoning twin draws from the project's length laws; the ordinary model keeps the
    same prompts and draws a short answer (examples/paper_study.yaml, ordinary_output).
    """
    from simulator.workload.lengths import LengthModel

    where = study["datasets"][name]
    model = LengthModel.default()
    if where["difficulty"] is not None:
        model = model.with_difficulty(where["domain"], where["difficulty"])
    lengths, difficulty = _sample_with_difficulty(model, where["domain"], n, rng)
    law = study["ordinary_output"][name]
    short = np.exp(math.log(law["median"]) + law["sigma"] * rng.standard_normal(n))
    short = np.clip(np.rint(short), 1, model.max_output_tokens).astype(np.int64)
    if ordinary:
        return lengths.prompt_tokens, short, np.zeros(n, np.int64), difficulty
    return lengths.prompt_tokens, lengths.output_tokens, lengths.reasoning_tokens, difficulty


def _sample_with_difficulty(model, domain: str, n: int, rng: np.random.Generator):
    """Lengths of n requests of a domain and the difficulty each was drawn at."""
    mix = model.domains[domain].difficulty
    levels = sorted(mix, key=lambda k: DIFFICULTY_RANK.get(k, 3))
    counts = rng.multinomial(n, [mix[k] for k in levels])
    parts, labels = [], []
    for level, count in zip(levels, counts, strict=True):
        if count:
            parts.append(model.with_difficulty(domain, level).sample(rng, int(count), {domain: 1.0}))
            labels += [level] * int(count)
    order = rng.permutation(n)
    cat = {k: np.concatenate([getattr(p, k) for p in parts])[order]
           for k in ("prompt_tokens", "output_tokens", "reasoning_tokens")}
    from simulator.workload.lengths import SampledLengths

    lengths = SampledLengths(np.full(n, domain, object), cat["prompt_tokens"],
                             cat["output_tokens"], cat["reasoning_tokens"])
    return lengths, np.array(labels, dtype=object)[order]


def make_batch(study: dict, names: tuple[str, ...] | list[str], n_each: int, arrivals_of,
               seed: int, ordinary: bool, max_tokens: int | None = None) -> Batch:
    """Requests from several datasets (n_each each, in arrival order), same draws for both twins."""
    from simulator.records.workload import Workload
    from simulator.workload.lengths import apply_max_tokens

    prompt, output, reasoning, dataset, difficulty = [], [], [], [], []
    for i, name in enumerate(names):
        rng = np.random.default_rng([seed, i])  # same stream for both twins: same prompts
        p, o, r, d = sample_dataset(study, name, n_each, rng, ordinary)
        prompt.append(p)
        output.append(o)
        reasoning.append(r)
        dataset += [name] * n_each
        difficulty.append(d)
    n = n_each * len(names)
    order = np.random.default_rng([seed, 99]).permutation(n)
    out, rea = apply_max_tokens(np.concatenate(output)[order], np.concatenate(reasoning)[order],
                                max_tokens)
    arrivals = arrivals_of(n, np.random.default_rng([seed, 100]))
    workload = Workload(arrival_s=arrivals, prompt_tokens=np.concatenate(prompt)[order],
                        output_tokens=out, reasoning_tokens=rea,
                        domain=np.array(dataset, dtype=object)[order],
                        name="+".join(names), seed=seed)
    return Batch(workload, np.array(dataset, dtype=object)[order],
                 np.concatenate(difficulty)[order])


def at_once(n: int, _: np.random.Generator) -> np.ndarray:
    """n requests at t = 0 (a batch, or a benchmark at request rate inf)."""
    return np.zeros(n)


def bursty(n: int, rng: np.random.Generator) -> np.ndarray:
    from simulator.workload.arrivals import gamma_arrivals

    return gamma_arrivals(rng, GAMMA_RATE, GAMMA_CV, n)


def poisson(rate: float):
    def arrivals(n: int, rng: np.random.Generator) -> np.ndarray:
        from simulator.workload.arrivals import gamma_arrivals

        return gamma_arrivals(rng, rate, 1.0, n)

    return arrivals


# --------------------------------------------------------------------------- metrics


def run_metrics(result) -> dict[str, Any]:
    """The numbers the report compares, from one RunResult."""
    s, r = result.summary, result.requests
    done = r["status"] == "completed"
    makespan = float(np.nanmax(r["finish_s"][done]) - np.min(r["arrival_s"])) if done.any() else 0.0
    duration = max(float(s["duration_s"]), 1e-9)
    return {
        "requests": int(s["requests"]),
        "completed": int(s["completed"]),
        "makespan_s": makespan,
        "e2e_mean_s": float(np.mean(r["e2e_s"][done])) if done.any() else None,
        "e2e_p50_s": s["e2e_s"]["p50"],
        "e2e_p99_s": s["e2e_s"]["p99"],
        "ttfvt_p50_s": s["ttfvt_s"]["p50"],
        "queue_p50_s": s["queue_s"]["p50"],
        "queue_p99_s": s["queue_s"]["p99"],
        "output_tokens_per_s": s["throughput"]["output_tokens_per_s"],
        "kv_mean": s["kv_usage"]["mean"],
        "kv_peak": s["kv_usage"]["peak"],
        "kv_std": s["kv_usage"]["std"],
        "share_of_time_kv_above_95pct": s["kv_usage"]["seconds_above_95pct"] / duration,
        "running_peak": int(s["running_peak"]),
        "waiting_peak": int(s["waiting_peak"]),
        "preemptions": int(s["preemptions"]),
        "kv_blocks": int(s["kv_cache"]["num_blocks"]),
        "prefill_tokens": int(np.sum(result.timeline["prefill_tokens"])),
        "prefix_hit_rate": s["prefix_cache"]["hit_rate"],
    }


def straggler_tail(result, batch: int, left: int) -> dict[str, float]:
    """How long a batch runs with at most ``left`` of its ``batch`` requests still running."""
    t, running = result.timeline["time_s"], result.timeline["running"]
    few = np.flatnonzero((running <= left) & (running > 0))
    end = float(t[-1]) if len(t) else 0.0
    start = float(t[few[0]]) if len(few) else end
    return {"batch": batch, "at_most_running": left, "from_s": start, "seconds": end - start,
            "end_s": end}


def relative(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return new / old - 1.0


def pct(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.1%}" if signed else f"{x:.1%}"


def sec(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f} s"


# --------------------------------------------------------------------------- figures


def figure(path: Path, draw) -> str:
    """Draw with matplotlib (Agg) into path; the file name for the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw(plt)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    return path.name


def timeline_series(result, key: str) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(result.timeline["time_s"]), np.asarray(result.timeline[key], dtype=float)


# --------------------------------------------------------------------------- sections


def section_pilot(rep: Report, study: dict, s: Settings) -> None:
    """1: a batch of 16, ordinary model vs reasoning twin, per dataset; stragglers."""
    pilot = study["pilot"]
    tp, n = pilot["tp"], pilot["batch"]
    llm_spec, rllm_spec = model_spec("qwen2.5-7b", tp), model_spec("r1-distill-qwen-7b", tp)
    rep.add("## 1. Pilot: a batch of 16, ordinary model vs reasoning twin (7B, TP 2)", "",
            f"Study: {pilot['llm']} vs {pilot['rllm']} ({pilot['source']}). Here: "
            "`qwen2.5-7b` (Qwen2.5-7B-Instruct; conf/model has no Qwen2.5-Math-7B, whose shapes "
            "are the same) with the ordinary answer lengths of examples/paper_study.yaml (an "
            "assumption: the study quotes no token counts), vs `r1-distill-qwen-7b` with the "
            "project's length laws; 16 requests at t = 0, H100 x2.", "",
            "| dataset | study LLM time | study RLLM time | sim LLM mean E2E | sim RLLM mean E2E "
            "| sim RLLM batch time | sim RLLM mean output | sim RLLM KV peak | study acc LLM / RLLM |",
            "|---|---|---|---|---|---|---|---|---|")
    found, series = {}, {}
    for name in PILOT_DATASETS:
        row = {}
        for twin, spec in (("llm", llm_spec), ("rllm", rllm_spec)):
            batch = make_batch(study, [name], n, at_once, s.seed, ordinary=twin == "llm")
            result = simulate(spec, batch.workload, s.seed)
            row[twin] = run_metrics(result)
            row[twin]["output_tokens_mean"] = float(np.mean(batch.workload.output_tokens))
            series[(name, twin)] = timeline_series(result, "kv_usage")
        quoted = pilot["datasets"][name]
        row["study"] = quoted
        found[name] = row
        rep.add(f"| {name} | {quoted['llm_time_s']} s | {quoted['rllm_time_s']} s "
                f"| {sec(row['llm']['e2e_mean_s'])} | {sec(row['rllm']['e2e_mean_s'])} "
                f"| {sec(row['rllm']['makespan_s'])} | {row['rllm']['output_tokens_mean']:.0f} tok "
                f"| {pct(row['rllm']['kv_peak'])} | {quoted['llm_acc']:.0%} / {quoted['rllm_acc']:.0%} |")

    mixed = make_batch(study, PILOT_DATASETS, n // len(PILOT_DATASETS), at_once, s.seed, False)
    mixed_result = simulate(rllm_spec, mixed.workload, s.seed)
    quoted = pilot["stragglers"]
    tail = straggler_tail(mixed_result, n, quoted["running_to"])
    found["mixed_batch"] = {**run_metrics(mixed_result), "straggler_tail": tail}
    rep.findings["pilot"] = found

    def draw_kv(plt):
        fig, axes = plt.subplots(1, len(PILOT_DATASETS), figsize=(14, 3.2), sharey=True)
        for ax, name in zip(axes, PILOT_DATASETS, strict=True):
            for twin, style in (("rllm", "-"), ("llm", "--")):
                t, u = series[(name, twin)]
                ax.step(t, 100 * u, style, where="post", label=twin.upper())
            ax.set_title(name)
            ax.set_xlabel("time (s)")
        axes[0].set_ylabel("KV cache usage (%)")
        axes[0].legend()
        return fig

    def draw_running(plt):
        fig, ax = plt.subplots(figsize=(7, 3.2))
        t, running = timeline_series(mixed_result, "running")
        ax.step(t, running, where="post")
        ax.axhline(quoted["running_to"], color="grey", linestyle=":", label="11 running")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("running requests")
        ax.set_title("R1-Distill-Qwen-7B, a batch of 16 of mixed difficulty")
        ax.legend()
        return fig

    kv_png = figure(s.out / "pilot_kv.png", draw_kv)
    run_png = figure(s.out / "pilot_running.png", draw_running)
    llm_peak = max(found[d]["llm"]["kv_peak"] for d in PILOT_DATASETS)
    for d in PILOT_DATASETS:
        q = found[d]["study"]
        found[d]["time_ratio"] = {"sim": found[d]["rllm"]["e2e_mean_s"] / found[d]["llm"]["e2e_mean_s"],
                                  "study": q["rllm_time_s"] / q["llm_time_s"]}
    ratios = ", ".join(f"{d} {found[d]['time_ratio']['sim']:.1f}x vs {found[d]['time_ratio']['study']:.1f}x"
                       for d in PILOT_DATASETS)
    peaks = ", ".join(f"{d} {pct(found[d]['rllm']['kv_peak'])}" for d in PILOT_DATASETS)
    rep.add("", f"![KV usage over time]({kv_png})", "",
            f"KV usage (figure): the reasoning twin's usage climbs as its requests think and drops "
            f"as they finish (peaks {peaks}); "
            f"the ordinary model stays under {pct(llm_peak)}. Study: peaks ~12.7% (AIME) and "
            "~18.7% (GPQA), LLMs under ~4%. The simulated peaks are lower because two H100s "
            f"hold {found['GSM8K']['rllm']['kv_blocks'] * 16:,} KV tokens (the study's GPUs and "
            "memory split are not in the summary), so the same 16 requests fill less of it.", "",
            f"![Running requests]({run_png})", "",
            f"Stragglers: in a batch of 16 mixed from the four datasets (4 each), the running "
            f"count falls to {quoted['running_to']} at {tail['from_s']:.0f} s and the last "
            f"{quoted['running_to']} or fewer run for another {tail['seconds']:.0f} s "
            f"(batch ends at {tail['end_s']:.0f} s). Study: 16 → ~11 for over "
            f"{quoted['for_over_s']} s.", "",
            f"RLLM/LLM time ratio, simulator vs study: {ratios}.", "",
            "Where the numbers differ: the study's table times are far below what its own "
            "published output lengths imply (R1-Distill-Qwen-7B writes ~2,460 tokens on GSM8K: "
            "1.47 s would need ~1,700 tokens/s for one request), so they are likely normalised "
            "differently (per request of a larger run, or with early stops); the simulator's "
            "columns are plain per-request E2E and the batch's wall time, from the project's "
            "length laws (fitted to the study's published R1 output means), so its GSM8K ratio "
            "is far above the study's 1.4x. The ordinary model's times rest on the assumed answer "
            "lengths; the study's 0.5 s on AIME (shorter than on GSM8K) suggests early stops or "
            "truncation the assumption does not have.", "")


def section_gamma(rep: Report, study: dict, s: Settings) -> None:
    """2: the same bursty load on the 14B pair."""
    g = study["gamma"]
    spec = model_spec("r1-distill-qwen-14b", g["tp"])
    n = s.size("gamma")
    rep.add("## 2. Gamma (bursty) load at 14B (TP 4)", "",
            f"Study: {g['rllm']} vs {g['llm']} ({g['source']}). Here: conf/model has no "
            "qwen2.5-14b, so both run on `r1-distill-qwen-14b`'s architecture (the same "
            "Qwen2.5-14B base and shapes); the ordinary model differs only by its short, "
            f"non-reasoning answers. {n} requests per dataset, Gamma arrivals at "
            f"{GAMMA_RATE:g} req/s with CV {GAMMA_CV:g} (the study's rate is not in its summary: "
            "an assumption), the same arrivals and prompts for both.", "",
            "| dataset | model | mean KV (sim) | mean KV (study) | time KV > 95% | running peak "
            "| waiting peak | queue p99 | preemptions | E2E p50 |", "|---|---|---|---|---|---|---|---|---|---|")
    found, series = {}, {}
    for name in GAMMA_DATASETS:
        found[name] = {}
        for twin in ("rllm", "llm"):
            batch = make_batch(study, [name], n, bursty, s.seed, ordinary=twin == "llm")
            result = simulate(spec, batch.workload, s.seed)
            m = run_metrics(result)
            m["study_kv_mean"] = g["kv_mean"][name][twin]
            m["output_tokens_mean"] = float(np.mean(batch.workload.output_tokens))
            found[name][twin] = m
            series[(name, twin)] = (timeline_series(result, "kv_usage"),
                                    timeline_series(result, "running"))
            rep.add(f"| {name} | {twin.upper()} | {pct(m['kv_mean'])} | {pct(m['study_kv_mean'])} "
                    f"| {pct(m['share_of_time_kv_above_95pct'])} | {m['running_peak']} "
                    f"| {m['waiting_peak']} | {sec(m['queue_p99_s'])} | {m['preemptions']} "
                    f"| {sec(m['e2e_p50_s'])} |")
    found["study_running_peak"] = g["running_peak"]
    rep.findings["gamma"] = found

    def draw(plt):
        fig, axes = plt.subplots(2, len(GAMMA_DATASETS), figsize=(12, 5.5), sharex="col")
        for j, name in enumerate(GAMMA_DATASETS):
            for twin, style in (("rllm", "-"), ("llm", "--")):
                (t, u), (t2, r) = series[(name, twin)]
                axes[0, j].step(t, 100 * u, style, where="post", label=twin.upper())
                axes[1, j].step(t2, r, style, where="post", label=twin.upper())
            axes[0, j].set_title(name)
            axes[0, j].set_ylabel("KV usage (%)")
            axes[1, j].set_ylabel("running requests")
            axes[1, j].set_xlabel("time (s)")
            axes[0, j].legend()
        return fig

    png = figure(s.out / "gamma.png", draw)
    ratio = {d: found[d]["rllm"]["kv_mean"] / max(found[d]["llm"]["kv_mean"], 1e-12)
             for d in GAMMA_DATASETS}
    study_ratio = ", ".join(f"{g['kv_mean'][d]['rllm'] / g['kv_mean'][d]['llm']:.1f}x"
                            for d in GAMMA_DATASETS)
    rep.add("", f"![Gamma load]({png})", "",
            f"The twin holds {', '.join(f'{ratio[d]:.1f}x' for d in GAMMA_DATASETS)} the ordinary "
            f"model's mean KV ({', '.join(GAMMA_DATASETS)}); study: {study_ratio}. Running "
            f"peaks {found['MATH-500']['rllm']['running_peak']} vs "
            f"{found['MATH-500']['llm']['running_peak']} on MATH-500 (study ~170 vs ~50). Why the "
            "levels differ: they depend on the request rate and the KV capacity (four H100s "
            f"here, {found['MATH-500']['rllm']['kv_blocks'] * 16:,} tokens), which the study's "
            "summary does not give; at one rate for both, the ordinary model's short answers "
            "(assumed lengths) finish in seconds and hold almost no KV, so the study's 13.2% and "
            "18.1% point to a higher rate or a smaller cache than assumed here. ShareGPT-like "
            "requests use the project's chat laws, fitted to production DeepSeek-R1 traffic "
            f"(mean output {found['ShareGPT']['rllm']['output_tokens_mean']:,.0f} tokens here), "
            "far shorter than what the study's R1 wrote on ShareGPT prompts, hence the low "
            "simulated ShareGPT usage.", "")


def section_difficulty(rep: Report, study: dict, s: Settings) -> None:
    """3: E2E against prompt length and against difficulty at light load."""
    from scipy import stats

    spec = model_spec("r1-distill-qwen-7b", study["pilot"]["tp"])
    n_each = s.size("difficulty")
    batch = make_batch(study, PILOT_DATASETS, n_each, poisson(0.25), s.seed, ordinary=False)
    result = simulate(spec, batch.workload, s.seed)
    r = result.requests
    rid = np.asarray(r["request_id"])
    done = r["status"] == "completed"
    e2e = np.asarray(r["e2e_s"])[done]
    prompt = np.asarray(r["prompt_tokens"])[done]
    output = np.asarray(r["output_tokens"])[done]
    rank = np.array([DIFFICULTY_RANK[d] for d in batch.difficulty[rid[done]]])
    rho = {"prompt_tokens": float(stats.spearmanr(prompt, e2e).statistic),
           "difficulty": float(stats.spearmanr(rank, e2e).statistic),
           "output_tokens": float(stats.spearmanr(output, e2e).statistic)}
    design = np.column_stack([np.ones(len(e2e)), prompt / 1000, output / 1000])
    coef = np.linalg.lstsq(design, e2e, rcond=None)[0]
    by_level = {k: float(np.median(e2e[rank == v])) for k, v in DIFFICULTY_RANK.items()
                if np.any(rank == v)}
    rep.findings["difficulty"] = {
        "requests": int(done.sum()), "spearman_e2e_vs": rho,
        "e2e_seconds_per_1k_prompt_tokens": float(coef[1]),
        "e2e_seconds_per_1k_output_tokens": float(coef[2]),
        "e2e_median_by_difficulty_s": by_level}

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
        axes[0].scatter(prompt, e2e, s=8)
        axes[0].set_xlabel("prompt tokens")
        axes[0].set_ylabel("E2E (s)")
        axes[0].set_title(f"against prompt length (Spearman {rho['prompt_tokens']:.2f})")
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(rank))
        axes[1].scatter(rank + jitter, e2e, s=8)
        axes[1].set_xticks([0, 1, 2], ["easy", "medium", "hard"])
        axes[1].set_title(f"against difficulty (Spearman {rho['difficulty']:.2f})")
        return fig

    png = figure(s.out / "difficulty.png", draw)
    if abs(rho["difficulty"]) > abs(rho["prompt_tokens"]):
        verdict = "As in the study, time tracks difficulty, not prompt length."
    else:
        verdict = "Unlike the study, prompt length ties to time as strongly as difficulty here."
    rep.add("## 3. Running time follows difficulty, not prompt length", "",
            f"R1-Distill-Qwen-7B (TP 2), {int(done.sum())} requests from the four datasets at a "
            "light Poisson load (0.25 req/s).", "", f"![E2E against prompt and difficulty]({png})", "",
            f"Spearman correlation of E2E with prompt length {rho['prompt_tokens']:.2f}, with "
            f"difficulty {rho['difficulty']:.2f}, with output length {rho['output_tokens']:.2f}; "
            f"median E2E {', '.join(f'{k} {v:.0f} s' for k, v in by_level.items())}. A least-squares "
            f"fit gives {coef[1]:.2f} s per 1,000 prompt tokens against {coef[2]:.2f} s per 1,000 "
            f"output tokens. {verdict} Caveat: the project's length laws draw prompt "
            "and output lengths independently, so the weak tie to prompt length is partly built in; "
            "what the simulator adds is the cost side: a prompt token (prefill) costs a small "
            "fraction of an output token (decode).", "")


def section_optimizations(rep: Report, study: dict, s: Settings) -> None:
    """4: each optimization against its baseline, on the study's model and datasets."""
    from simulator.configure import CONF_DIR

    n = s.size("benchmark")
    opts = study["optimizations"]
    rep.add("## 4. Optimizations", "",
            f"Each dataset is run as a benchmark of {n} requests sent at once, on the model and TP "
            "the study used for that optimization, with and without it. Changes are relative to "
            "the baseline (bf16 weights and KV, prefix caching on, no speculation). Accuracy is "
            "quoted from the study: the simulator predicts no accuracy.", "",
            "| optimization | model | sim: time | sim: TPS | sim: TTFVT p50 | sim: E2E mean "
            "| sim: mean KV | sim: preemptions | study: time | study: TPS | study: direction | study: accuracy |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|")
    found: dict[str, Any] = {}
    for name in OPTIMIZATIONS:
        o = opts[name]
        if not (CONF_DIR / "optimization" / f"{name}.yaml").exists():
            found[name] = {"modelled": False, "study": o}
            rep.add(f"| {name} | - | not modelled: conf/optimization has no {name} | | | | | | | "
                    f"| {o['direction']} | {o['accuracy']} |")
            continue
        perf = "roofline" if name == "int8_weights" else None
        try:
            base_spec = model_spec(o["model"], o["tp"], "none", perf)
            var_spec = model_spec(o["model"], o["tp"], name, perf)
        except ConfigError as err:
            found[name] = {"modelled": False, "error": str(err), "study": o}
            rep.add(f"| {name} | {o['model']} | not available: {err} | | | | | | | "
                    f"| {o['direction']} | {o['accuracy']} |")
            continue
        per_dataset = {}
        for d in PILOT_DATASETS:
            batch = make_batch(study, [d], n, at_once, s.seed, False, o.get("max_tokens"))
            base = run_metrics(simulate(base_spec, batch.workload, s.seed))
            var = run_metrics(simulate(var_spec, batch.workload, s.seed))
            per_dataset[d] = {"baseline": base, "variant": var,
                              "time_change": relative(var["makespan_s"], base["makespan_s"]),
                              "tps_change": relative(var["output_tokens_per_s"], base["output_tokens_per_s"])}
            if "time_s" in o:
                a, b = o["time_s"][d]
                c, e = o["tps"][d]
                per_dataset[d]["study_time_change"] = b / a - 1
                per_dataset[d]["study_tps_change"] = e / c - 1
        found[name] = {"modelled": True, "calibrated": bool(var_spec.perf.calibrated),
                       "kv_blocks": [base["kv_blocks"], var["kv_blocks"]],
                       "datasets": per_dataset, "study": o, **variant_inputs(var_spec)}

        def mean(key, group="", data=per_dataset):
            vals = [v[group][key] if group else v.get(key) for v in data.values()]
            vals = [x for x in vals if x is not None]
            return float(np.mean(vals)) if vals else None

        summary = {
            "time_change": mean("time_change"), "tps_change": mean("tps_change"),
            "ttfvt_change": relative(mean("ttfvt_p50_s", "variant"), mean("ttfvt_p50_s", "baseline")),
            "e2e_change": relative(mean("e2e_mean_s", "variant"), mean("e2e_mean_s", "baseline")),
            "kv_mean": [mean("kv_mean", "baseline"), mean("kv_mean", "variant")],
            "preemptions": [sum(v["baseline"]["preemptions"] for v in per_dataset.values()),
                            sum(v["variant"]["preemptions"] for v in per_dataset.values())],
            "study_time_change": mean("study_time_change"), "study_tps_change": mean("study_tps_change")}
        found[name]["mean_over_datasets"] = summary
        agree = direction_agreement(summary, o.get("signs", {}))
        found[name]["direction_agrees"] = agree
        label = name + ("" if var_spec.perf.calibrated else " (roofline, uncalibrated)")
        rep.add(f"| {label} | {o['model']} x{o['tp']} | {pct(summary['time_change'], True)} "
                f"| {pct(summary['tps_change'], True)} | {pct(summary['ttfvt_change'], True)} "
                f"| {pct(summary['e2e_change'], True)} | {pct(summary['kv_mean'][0])} → "
                f"{pct(summary['kv_mean'][1])} | {summary['preemptions'][0]} → {summary['preemptions'][1]} "
                f"| {pct(summary['study_time_change'], True)} | {pct(summary['study_tps_change'], True)} "
                f"| {o['direction']}{agreement_text(agree)} | {o['accuracy']} |")
    rep.findings["optimizations"] = found
    rep.add("", "Sources of the study's columns: " + "; ".join(
        f"{k}: {v['source']}" for k, v in opts.items()) + ".", "", *optimization_notes(found), "")

    def draw(plt):
        names = [k for k in OPTIMIZATIONS if found[k].get("modelled")]
        fig, ax = plt.subplots(figsize=(9, 3.6))
        x = np.arange(len(names))
        for i, (key, label) in enumerate((("time_change", "sim time"), ("tps_change", "sim TPS"),
                                          ("study_time_change", "study time"),
                                          ("study_tps_change", "study TPS"))):
            vals = [100 * (found[k]["mean_over_datasets"][key] or 0.0) for k in names]
            ax.bar(x + (i - 1.5) * 0.2, vals, 0.2, label=label)
        ax.set_xticks(x, names, rotation=20)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_ylabel("change vs baseline (%)")
        ax.legend(fontsize=8)
        return fig

    png = figure(s.out / "optimizations.png", draw)
    rep.add(f"![Optimizations]({png})", "")
    section_output_length(rep, study, s, found)
    section_spec_acceptance(rep, study, s, found)
    section_spec_pressure(rep, study, s)


def variant_inputs(spec) -> dict[str, Any]:
    """What a variant's numbers rest on: its output length scale, draft rates and their source,
    and the performance model's description (int4 GEMMs say they are bounded, not measured)."""
    from simulator.speculation import speculative_rates
    from simulator.workload.output_scale import output_length_scale

    return {"output_length_scale": output_length_scale(spec.optimization),
            "speculative_rates": speculative_rates(spec.engine, spec.optimization, []),
            "performance_model": spec.perf.describe().get("built_from", spec.perf.describe()["name"])}


def section_output_length(rep: Report, study: dict, s: Settings, found: dict) -> None:
    """4a: int4 weights when the quantized model thinks longer (a what-if on the scale)."""
    o = study["optimizations"]["gptq_int4"]
    n = s.size("benchmark")
    batch = make_batch(study, ["MATH-500"], n, at_once, s.seed, False)
    base = run_metrics(simulate(model_spec(o["model"], o["tp"]), batch.workload, s.seed))
    rows = []
    for scale in LENGTH_SCALES:
        spec = run_spec([f"model={o['model']}", f"tp={o['tp']}", "optimization=gptq_int4", "hardware=h100",
                         f"optimization.output_length_scale={scale}"])
        m = run_metrics(simulate(spec, batch.workload, s.seed))
        rows.append({"output_length_scale": scale, "time_change": relative(m["makespan_s"], base["makespan_s"]),
                     "e2e_change": relative(m["e2e_mean_s"], base["e2e_mean_s"]),
                     "tps_change": relative(m["output_tokens_per_s"], base["output_tokens_per_s"]),
                     "kv_mean": m["kv_mean"], "preemptions": m["preemptions"]})
    rep.findings["output_length"] = {"model": o["model"], "tp": o["tp"], "dataset": "MATH-500",
                                     "requests": n, "baseline": base, "gptq_int4": rows}
    rep.add("### 4a. Output length per optimization", "",
            "Each optimization in conf/optimization sets `output_length_scale` (default 1), with the "
            "study's observation quoted beside it. The study's summary quotes no token counts per "
            "optimization, so every shipped scale is 1 (AWQ's halved throughput points at slower "
            "kernels, not longer outputs; conf/optimization/awq_int4.yaml). What it would take: GPTQ "
            f"int4 against bf16 on MATH-500 ({n} requests at once, {o['model']} x{o['tp']}) if the "
            "quantized model wrote that much longer (an assumption, not a measurement):", "",
            "| output length scale | time | E2E mean | TPS | mean KV | preemptions |", "|---|---|---|---|---|---|")
    for r in rows:
        rep.add(f"| {r['output_length_scale']:g} | {pct(r['time_change'], True)} | {pct(r['e2e_change'], True)} "
                f"| {pct(r['tps_change'], True)} | {pct(r['kv_mean'])} | {r['preemptions']} |")
    rep.add("", "Set `optimization.output_length_scale=<measured ratio>` for your own quantized model.", "")


def section_spec_acceptance(rep: Report, study: dict, s: Settings, found: dict) -> None:
    """4b: where the speculative rates come from, and how the effect moves with acceptance."""
    o = study["optimizations"]["spec_ngram"]
    n = s.size("benchmark")
    batch = make_batch(study, ["MATH-500"], n, at_once, s.seed, False, o.get("max_tokens"))
    base = run_metrics(simulate(model_spec(o["model"], o["tp"]), batch.workload, s.seed))
    rows = []
    for a in SPEC_ACCEPTANCE:
        spec = run_spec([f"model={o['model']}", f"tp={o['tp']}", "optimization=spec_ngram", "hardware=h100",
                         f"optimization.speculative.acceptance_rate=[{a}]",
                         "optimization.speculative.proposal_rate=0.5"])
        m = run_metrics(simulate(spec, batch.workload, s.seed))
        rows.append({"acceptance": a, "time_change": relative(m["makespan_s"], base["makespan_s"]),
                     "e2e_change": relative(m["e2e_mean_s"], base["e2e_mean_s"]),
                     "tps_change": relative(m["output_tokens_per_s"], base["output_tokens_per_s"]),
                     "ttfvt_change": relative(m["ttfvt_p50_s"], base["ttfvt_p50_s"])})
    rates = (found.get("spec_ngram") or {}).get("speculative_rates") or {}
    rep.findings["spec_acceptance"] = {"shipped_rates": rates, "dataset": "MATH-500", "requests": n,
                                       "proposal_rate": 0.5, "rows": rows}
    rep.add("### 4b. Speculative decoding: where the draft rates come from", "",
            f"The table above used the rates of conf/optimization/spec_ngram.yaml (source: "
            f"`{rates.get('source', '-')}`, acceptance per position {rates.get('acceptance_rate')}, "
            f"proposal rate {rates.get('proposal_rate')}). Under `perf.source=profile` the profiled run's "
            "own rates replace them (vLLM's spec-decode counters, profile.json "
            "`summary.spec_decode.vllm_counters`), and a live server's `/metrics` gives them too "
            "(profiler/live/spec_counters.py). How the effect moves with the acceptance (the same at every "
            f"position, drafts on half the steps), MATH-500, {n} requests at once, budget "
            f"{o.get('max_tokens')}:", "",
            "| acceptance | time | E2E mean | TPS | TTFVT p50 |", "|---|---|---|---|---|")
    for r in rows:
        rep.add(f"| {r['acceptance']:g} | {pct(r['time_change'], True)} | {pct(r['e2e_change'], True)} "
                f"| {pct(r['tps_change'], True)} | {pct(r['ttfvt_change'], True)} |")
    rep.add("")


def section_spec_pressure(rep: Report, study: dict, s: Settings) -> None:
    """4c: preemptions with and without speculation as the KV cache shrinks."""
    o = study["optimizations"]["spec_ngram"]
    n = s.size("benchmark")
    batch = make_batch(study, ["MATH-500"], n, at_once, s.seed, False, o.get("max_tokens"))
    w = batch.workload
    demand = int(np.sum(-(-(w.prompt_tokens + w.output_tokens) // 16)))  # blocks of the whole batch
    max_len = 8192
    variants = {"no speculation": ("none", []),
                "n-gram, 4 drafts (vLLM: no lookahead slots)": ("spec_ngram", []),
                "n-gram + 4 lookahead slots (what an EAGLE drafter reserves)":
                    ("spec_ngram", ["optimization.speculative.num_lookahead_tokens=4"])}
    # caches from a share of the batch's demand, never below one max_model_len request (vLLM's floor)
    sizes = sorted({max(int(f * demand), max_len // 16 + 1) for f in PRESSURE_FRACTIONS[s.quick]})
    curves: dict[str, list[dict]] = {}
    for label, (opt, extra) in variants.items():
        curves[label] = []
        for blocks in sizes:
            spec = run_spec([f"model={o['model']}", f"tp={o['tp']}", f"optimization={opt}", "hardware=h100",
                             f"engine.max_model_len={max_len}", f"engine.num_gpu_blocks_override={blocks}",
                             *extra])
            m = run_metrics(simulate(spec, w, s.seed))
            curves[label].append({"share_of_demand": blocks / demand, "kv_blocks": blocks, "preemptions": m["preemptions"],
                                  "makespan_s": m["makespan_s"], "e2e_mean_s": m["e2e_mean_s"]})
    rep.findings["spec_under_kv_pressure"] = {"model": o["model"], "tp": o["tp"], "dataset": "MATH-500",
                                              "requests": n, "demand_blocks": demand, "curves": curves}

    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for label, rows in curves.items():
            x = [r["kv_blocks"] for r in rows]
            axes[0].plot(x, [r["preemptions"] for r in rows], "o-", label=label)
            axes[1].plot(x, [r["makespan_s"] for r in rows], "o-", label=label)
        axes[0].set_ylabel("preemptions")
        axes[1].set_ylabel("batch time (s)")
        for ax in axes:
            ax.set_xlabel("KV cache (blocks of 16 tokens)")
        axes[0].legend(fontsize=7)
        return fig

    png = figure(s.out / "spec_pressure.png", draw)
    last = {k: v[0]["preemptions"] for k, v in curves.items()}
    rep.add("### 4c. Speculation under KV pressure", "",
            f"The spec_ngram benchmark batch (MATH-500, {n} requests at once, budget {o.get('max_tokens')}, "
            f"{o['model']} x{o['tp']}, max_model_len {max_len}) on KV caches of {sizes[0]:,} to "
            f"{sizes[-1]:,} blocks ({sizes[0] / demand:.0%} to {sizes[-1] / demand:.0%} of the {demand:,} "
            "blocks the whole batch would hold). vLLM "
            "reserves KV slots past a request's scheduled tokens for drafters that write KV of their own "
            "(`num_lookahead_tokens` = k for EAGLE, MTP and draft models; 0 for n-gram, whose draft "
            "tokens get slots as scheduled tokens: simulator/engine/rules.py). Preemptions at the smallest "
            "cache: " + ", ".join(f"{k}: {v}" for k, v in last.items()) + ".", "",
            f"![Speculation under KV pressure]({png})", "",
            "Speculation finishes requests in fewer steps, so they hold their blocks for less time, "
            "while each step holds up to k more slots (and k lookahead slots with a KV-writing "
            "drafter): which wins depends on the acceptance and on how tight the cache is.", "")


def direction_agreement(summary: dict, signs: dict) -> dict[str, bool]:
    """Per metric the study gives a sign for: does the simulated change go the same way?

    Changes within +-0.5% count as no change, which agrees with no study sign."""
    agree = {}
    for metric, sign in signs.items():
        change = summary.get(f"{metric}_change")
        if change is None:
            continue
        sim = 0 if abs(change) < 0.005 else int(np.sign(change))
        agree[metric] = sim == int(sign)
    return agree


def agreement_text(agree: dict[str, bool]) -> str:
    if not agree:
        return ""
    parts = [f"{k} {'agrees' if v else 'DISAGREES'}" for k, v in agree.items()]
    return " (simulator: " + ", ".join(parts) + ")"


def optimization_notes(found: dict) -> list[str]:
    """Where the simulator and the study part ways on the optimizations, and why."""
    notes = ["Where they differ, and why:"]
    for name in ("gptq_int4", "awq_int4"):
        if not found.get(name, {}).get("modelled"):
            notes.append(f"- {name}: not modelled (no conf/optimization/{name}.yaml); the study's "
                         "accuracy loss on AIME is outside any simulator.")
    if found.get("awq_int4", {}).get("modelled"):
        m = found["awq_int4"]["mean_over_datasets"]
        notes.append(f"- int4 weights (GPTQ, AWQ): no table measures W4A16 GEMMs, so they are bounded from "
                     "the measured bf16 ones (4-bit weights plus group scales read at the memory "
                     "bandwidth, dequantization hidden: calibration/weight_only.py), as vLLM's Marlin "
                     f"kernels run them; the simulator therefore shows int4 faster (time "
                     f"{pct(m['time_change'], True)} for AWQ) where the study saw AWQ nearly double E2E "
                     "in its setup (slower, non-Marlin AWQ kernels in vLLM 0.8.1 is the likely reason; a "
                     "lower bound cannot show it). GPTQ and AWQ get the same numbers here.")
    if found.get("fp8_kv", {}).get("modelled"):
        blocks = found["fp8_kv"]["kv_blocks"]
        m = found["fp8_kv"]["mean_over_datasets"]
        notes.append(f"- FP8 KV doubles the KV blocks ({blocks[0]:,} → {blocks[1]:,} at 14B x4); "
                     f"preemptions {m['preemptions'][0]} → {m['preemptions'][1]}, so the simulated "
                     f"TPS change ({pct(m['tps_change'], True)}, study {pct(m['study_tps_change'], True)}) "
                     "comes mostly from cheaper attention reads (measured fp8 attention kernels, vLLM "
                     "0.19; the study ran 0.8.1 on its own GPUs). The simulator prices E4M3 and E5M2 "
                     "with the same kernel tables, so it cannot show the study's E4M3/E5M2 gap, and "
                     "predicts nothing of the accuracy collapse at 7B.")
    if found.get("prefix_off", {}).get("modelled"):
        hit = found["prefix_off"]["datasets"]["MATH-500"]["baseline"]["prefix_hit_rate"]
        m = found["prefix_off"]["mean_over_datasets"]
        notes.append(f"- Prefix caching: benchmark questions share no prefix beyond the chat "
                     f"template (prefix hit rate {hit:.1%} here), so caching buys nothing, as in the "
                     "study; what it costs is hashing every full block and the cache's bookkeeping "
                     "for every scheduled request (measured on vLLM 0.32's own scheduler: ~1 us per "
                     "16-token block and ~1.8 us per request per step, calibration/prefix_caching_cost.py), "
                     "which turning caching off saves: time "
                     f"{(m['time_change'] or 0.0):+.2%} here against the study's ~1-4%. The rest of the study's "
                     "gap (vLLM 0.8.1's own costs, measurement noise) is not modelled.")
    if found.get("spec_ngram", {}).get("modelled"):
        agree = found["spec_ngram"]["direction_agrees"]
        wrong = [k for k, v in agree.items() if not v]
        lead = (f"the simulator disagrees with the study on {', '.join(wrong)}: "
                if wrong else "the directions agree with the study; ")
        notes.append(f"- n-gram speculation: {lead}it charges a verify step for the draft tokens "
                     "but no proposer (n-gram matching) time and none of vLLM 0.8.1's spec-decode "
                     "overheads, which is the likely source of the study's lower TPS and later first "
                     "visible token; and the acceptance and proposal rates in "
                     "conf/optimization/spec_ngram.yaml are placeholders, not measured on these "
                     "datasets, so the size of the effect is not a prediction (4b shows how it moves "
                     "with the acceptance; a profile or a live server's counters supply measured rates). "
                     "KV slots are reserved as vLLM does (none past the drafts for n-gram; 4c).")
    if found.get("int8_weights", {}).get("modelled"):
        notes.append("- int8 weights run on the uncalibrated roofline (no int8 GEMM tables); the study "
                     "did not measure int8.")
    notes.append("- Output length per optimization: every shipped `output_length_scale` is 1 (the "
                 "study's summary quotes no token counts per optimization), so every variant here "
                 "generates the tokens its baseline does; 4a shows what longer thinking would cost.")
    return notes


def section_budgets(rep: Report, study: dict, s: Settings) -> None:
    """5: max_tokens budgets on the reasoning twin under the Gamma load."""
    spec = model_spec("r1-distill-qwen-14b", study["gamma"]["tp"])
    n_each = s.size("budgets")

    def batch_at(budget):
        return make_batch(study, PILOT_DATASETS, n_each, bursty, s.seed, False, budget)

    reference = batch_at(None).workload
    rows = []
    for budget in BUDGETS:
        w = batch_at(budget).workload
        rows.append(budget_row(budget, reference, w, simulate(spec, w, s.seed)))
    rep.findings["budgets"] = {"model": "r1-distill-qwen-14b", "tp": study["gamma"]["tp"],
                               "requests": len(reference), "rows": rows,
                               "study": study["budgets"]}
    budget_section(rep, s, rows, "R1-Distill-Qwen-14B (TP 4), the four datasets mixed "
                   f"({len(reference)} requests) at the Gamma load of section 2",
                   study["budgets"]["finding"])


def budget_row(budget, reference, workload, result) -> dict[str, Any]:
    m = run_metrics(result)
    cut = workload.output_tokens < reference.output_tokens
    thinking = cut & (workload.reasoning_tokens >= workload.output_tokens)
    return {"max_tokens": budget, "share_cut": float(cut.mean()),
            "share_cut_while_thinking": float(thinking.mean()), **m}


def budget_section(rep: Report, s: Settings, rows: list[dict], what: str, finding: str) -> None:
    rep.add("## 5. Token budgets (max_tokens)", "", f"{what}.", "",
            "| max_tokens | cut | cut while thinking (no answer) | E2E p50 | E2E p99 | mean KV "
            "| preemptions | output tok/s |", "|---|---|---|---|---|---|---|---|")
    for r in rows:
        rep.add(f"| {r['max_tokens'] or 'none (32,768)'} | {pct(r['share_cut'])} "
                f"| {pct(r['share_cut_while_thinking'])} | {sec(r['e2e_p50_s'])} "
                f"| {sec(r['e2e_p99_s'])} | {pct(r['kv_mean'])} | {r['preemptions']} "
                f"| {r['output_tokens_per_s']:.0f} |")

    def draw(plt):
        fig, ax = plt.subplots(figsize=(7, 3.4))
        x = [r["max_tokens"] or 32768 for r in rows]
        ax.plot(x, [r["e2e_p99_s"] for r in rows], "o-", label="E2E p99 (s)")
        ax.plot(x, [r["e2e_p50_s"] for r in rows], "s-", label="E2E p50 (s)")
        ax2 = ax.twinx()
        ax2.plot(x, [100 * r["kv_mean"] for r in rows], "^--", color="tab:red", label="mean KV (%)")
        ax.set_xlabel("max_tokens")
        ax.set_ylabel("seconds")
        ax2.set_ylabel("mean KV usage (%)")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="lower right", fontsize=8)
        return fig

    png = figure(s.out / "budgets.png", draw)
    rep.add("", f"![Token budgets]({png})", "",
            f"Study: {finding}. The simulator shows the cost side: a tighter budget cuts the tail "
            "latency and KV held by the longest thinkers, at the price of the requests cut while "
            "still thinking (they return no answer; their accuracy is lost, which the simulator "
            "cannot score).", "")


# --------------------------------------------------------------------------- user's deployment


def user_sections(rep: Report, s: Settings) -> None:
    """Sections 2, 4 and 5 for the user's model, card and traffic."""
    from simulator.configure import CONF_DIR
    from simulator.workload.lengths import apply_max_tokens

    base = run_spec(s.overrides)
    workload = base.workload
    if len(workload) > s.max_requests:
        workload = workload.select(np.arange(s.max_requests))
    where = (f"{base.model.name} on {base.hardware.name} x{base.tp}, workload {workload.name} "
             f"({len(workload)} requests{'' if len(workload) == len(base.workload) else f' of {len(base.workload)}, the first (max_requests)'})")
    rep.findings["deployment"] = {"overrides": list(s.overrides), "model": base.model.name,
                                  "hardware": base.hardware.name, "tp": base.tp,
                                  "workload": workload.name, "requests": len(workload),
                                  "calibrated": bool(base.perf.calibrated)}
    rep.add(f"Deployment: {where}; performance model `{base.perf.describe()['name']}`.", "")

    # 2: the same traffic with and without the hidden reasoning
    visible = np.maximum(workload.output_tokens - workload.reasoning_tokens, 1)
    no_reasoning = replace_lengths(workload, visible, np.zeros(len(workload), np.int64))
    twins = {"rllm": run_metrics(simulate(base, workload, s.seed)),
             "without_reasoning": run_metrics(simulate(base, no_reasoning, s.seed))}
    rep.findings["gamma"] = twins
    rep.add("## 2. Your traffic, with and without the hidden reasoning", "",
            "The ordinary twin is your traffic with the reasoning tokens removed (only the visible "
            "answer is generated).", "",
            "| model | mean KV | time KV > 95% | running peak | waiting peak | queue p99 | preemptions | E2E p50 |",
            "|---|---|---|---|---|---|---|---|")
    for twin, m in twins.items():
        rep.add(f"| {twin} | {pct(m['kv_mean'])} | {pct(m['share_of_time_kv_above_95pct'])} "
                f"| {m['running_peak']} | {m['waiting_peak']} | {sec(m['queue_p99_s'])} "
                f"| {m['preemptions']} | {sec(m['e2e_p50_s'])} |")
    rep.add("")

    # 4: each optimization conf/ has, on the same traffic
    rep.add("## 4. Optimizations on your deployment", "",
            "| optimization | time | TPS | TTFVT p50 | E2E mean | mean KV | preemptions | KV blocks |",
            "|---|---|---|---|---|---|---|---|")
    plain = [o for o in s.overrides if not o.startswith("optimization=")]
    found = {}
    for name in OPTIMIZATIONS:
        if not (CONF_DIR / "optimization" / f"{name}.yaml").exists():
            found[name] = {"modelled": False}
            rep.add(f"| {name} | not modelled | | | | | | |")
            continue
        try:
            spec = run_spec([*plain, f"optimization={name}"])
        except ConfigError as err:
            found[name] = {"modelled": False, "error": str(err)}
            rep.add(f"| {name} | not available: {err} | | | | | | |")
            continue
        m = run_metrics(simulate(spec, workload, s.seed))
        b = twins["rllm"]
        found[name] = {"modelled": True, "metrics": m, **variant_inputs(spec),
                       "time_change": relative(m["makespan_s"], b["makespan_s"]),
                       "tps_change": relative(m["output_tokens_per_s"], b["output_tokens_per_s"])}
        rep.add(f"| {name} | {pct(found[name]['time_change'], True)} | {pct(found[name]['tps_change'], True)} "
                f"| {pct(relative(m['ttfvt_p50_s'], b['ttfvt_p50_s']), True)} "
                f"| {pct(relative(m['e2e_mean_s'], b['e2e_mean_s']), True)} "
                f"| {pct(b['kv_mean'])} → {pct(m['kv_mean'])} | {b['preemptions']} → {m['preemptions']} "
                f"| {b['kv_blocks']:,} → {m['kv_blocks']:,} |")
    rep.findings["optimizations"] = found
    derived = [f"{k} ({v['performance_model'].rsplit('; ', 1)[-1]})" for k, v in found.items()
               if v.get("modelled") and "not measured" in v["performance_model"]]
    placeholder = [k for k, v in found.items() if (v.get("speculative_rates") or {}).get("warning")]
    if derived or placeholder:
        rep.add("", "Not measured: " + "; ".join(
            [*derived, *(f"{k}: placeholder draft rates (conf/optimization/{k}.yaml; a profile or a "
                         "live server's counters give measured ones)" for k in placeholder)]) + ".")
    rep.add("")

    # 5: budgets on the same traffic
    rows = []
    for budget in BUDGETS:
        out, rea = apply_max_tokens(workload.output_tokens, workload.reasoning_tokens, budget)
        w = replace_lengths(workload, out, rea)
        rows.append(budget_row(budget, workload, w, simulate(base, w, s.seed)))
    rep.findings["budgets"] = {"rows": rows}
    budget_section(rep, s, rows, where, load_study()["budgets"]["finding"])


def replace_lengths(workload, output: np.ndarray, reasoning: np.ndarray):
    """The workload with other output and reasoning lengths."""
    from simulator.records.workload import Workload

    return Workload(arrival_s=workload.arrival_s, prompt_tokens=workload.prompt_tokens,
                    output_tokens=output, reasoning_tokens=np.minimum(reasoning, output),
                    domain=workload.domain, prefix_group=workload.prefix_group,
                    prefix_tokens=workload.prefix_tokens, name=workload.name, seed=workload.seed)


# --------------------------------------------------------------------------- main


def build_report(s: Settings) -> Report:
    """All sections for the settings; figures are written into s.out on the way."""
    from simulator.configure import versions

    rep = Report()
    rep.findings["run"] = {"seed": s.seed, "quick": s.quick, "overrides": list(s.overrides),
                           "max_requests": s.max_requests, "versions": versions(),
                           "study": str(STUDY_PATH.name)}
    study = load_study()
    title = "the study's setup" if not s.user else "your deployment"
    rep.add(f"# {study['study']}: findings reproduced by rllm-sim ({title})", "",
            "Simulated with rllm-sim's shipped calibration (aiconfigurator H100 SXM kernel tables, "
            "vLLM 0.19) unless noted; the study ran vLLM 0.8.1 on its own GPUs. Study numbers are "
            "quoted from examples/paper_study.yaml with their sources. Every number is in "
            f"findings.json. Seed {s.seed}{', quick mode (small request counts)' if s.quick else ''}.", "")
    if s.user:
        user_sections(rep, s)
    else:
        section_pilot(rep, study, s)
        section_gamma(rep, study, s)
        section_difficulty(rep, study, s)
        section_optimizations(rep, study, s)
        section_budgets(rep, study, s)
    return rep


def write(rep: Report, out: Path) -> None:
    (out / "report.md").write_text("\n".join(rep.lines) + "\n")
    text = json.dumps(_clean(rep.findings), indent=2, sort_keys=True)
    (out / "findings.json").write_text(text + "\n")


def _clean(value):
    """JSON-ready: numpy scalars as Python numbers, NaN as null."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        s = parse_args(sys.argv[1:] if argv is None else argv)
        s.out.mkdir(parents=True, exist_ok=True)
        rep = build_report(s)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write(rep, s.out)
    print(f"report {s.out / 'report.md'} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
