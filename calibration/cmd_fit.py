"""`python -m calibration fit profile=<dir> [out=<file>] [test_fraction=0.25] [seed=0]`

Fits the step-time model (calibration/fit.py) to a profiler profile,
prints the held-out error, and saves the model with its fit report to a new run
directory, ``outputs/fit/<date>/<time>/fit.json`` under the working directory
(or to out=<file>). The profile directory is only read: a shipped profile's
fit.json is never overwritten.
"""

from __future__ import annotations

from calibration.cli_args import fraction_arg, new_run_dir, output_file_arg, seed_arg
from calibration.fit import FIT_FILE, TERMS, fit_profile, save_fitted_model
from simulator.records.errors import ConfigError
from simulator.records.profile import Profile

ARGS = {"profile", "out", "test_fraction", "seed"}


def parse_args(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ARGS:
            raise ConfigError("arguments", f"expected one of {sorted(ARGS)} as key=value, got {arg!r}")
        args[key] = value
    if not args.get("profile"):
        raise ConfigError("profile", "missing: python -m calibration fit profile=<profile dir>")
    return args


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def format_report(model) -> str:
    report = model.report
    held, train = report["held_out"], report["train"]
    lines = [
        f"fitted {model.name}",
        f"  held-out steps: {held['n']:>5}  median APE {_pct(held['median_ape'])}  p90 APE {_pct(held['p90_ape'])}",
        f"  training steps: {train['n']:>5}  median APE {_pct(train['median_ape'])}  p90 APE {_pct(train['p90_ape'])}"
        f"  ({report['train_outliers_dropped']} outliers left out of the fit)",
        f"  disturbed steps (core taken by another process): {report['disturbed_steps']}; held-out median APE "
        f"with them {_pct(report['held_out_including_disturbed']['median_ape'])}",
        "  held out, by phase:",
    ]
    for phase, stats in report["held_out_by_phase"].items():
        lines.append(f"    {phase:<8} n={stats['n']:<5} median {_pct(stats['median_ape'])}  p90 {_pct(stats['p90_ape'])}")
    points = report.get("held_out_points_by_phase") or {}  # (a fit saved before it was reported: none)
    if points:
        lines.append("  held out, each grid point's median step (the moments its steps ran in averaged):")
        for phase, stats in points.items():
            lines.append(f"    {phase:<8} n={stats['n']:<5} median {_pct(stats['median_ape'])}  "
                         f"p90 {_pct(stats['p90_ape'])}")
    lines.append("  coefficients:")
    for term in TERMS:
        lines.append(f"    {term:<20} {model.coefficients[term]:.4e}  ({report['terms'][term]})")
    lines.append(f"    decode_knee          {model.decode_knee}  (decode requests a step holds at the cost of one)")
    if model.serving:
        o = model.serving
        lines.append(f"  serving (vllm serve, {o['probe_sets']} probe rounds): per step {o['per_step_s'] * 1e3:+.2f} ms, "
                     f"per request in a step {o['per_request_s'] * 1e6:+.0f} us, per KV token "
                     f"{o['per_context_token_s'] * 1e9:+.1f} ns, per prefill token {o['per_prefill_token_s'] * 1e6:+.2f} us, "
                     f"per request {o['request_overhead_s'] * 1e3:.1f} ms idle / {o['busy_overhead_s'] * 1e3:+.1f} ms busy")
    else:
        lines.append("  serving: not measured (the profile has no serving phase): perf=profile simulates the bare engine")
    shapes = model.shape_cache
    if shapes is not None:
        table = ", ".join(f"{m * 1e3:.1f} ms at {t}" for t, m in zip(shapes.measured_tokens, shapes.measured_miss_s,
                                                                       strict=True))
        lines.append(f"  shape cache (vLLM CPU oneDNN primitives, {shapes.capacity} token counts kept): a step with a "
                     f"new token count T adds {table or 'nothing measured'} (interpolated; as a line: "
                     f"{shapes.per_miss_s * 1e3:.2f} ms + {shapes.per_miss_token_s * 1e6:.2f} us x T)")
    else:
        lines.append("  shape cache: not measured (no shapes phase in the profile, or a GPU profile): no per-shape cost")
    kv = model.kv
    lines.append(f"  KV: {kv['num_gpu_blocks']} blocks x {kv['block_size']} tokens, {kv['bytes_per_token']} bytes/token")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    test_fraction = fraction_arg("test_fraction", args.get("test_fraction", "0.25"))
    seed = seed_arg("seed", args.get("seed", "0"))
    out = output_file_arg("out", args["out"]) if "out" in args else new_run_dir("fit") / FIT_FILE
    profile = Profile.load(args["profile"])
    model = fit_profile(profile, test_fraction=test_fraction, seed=seed)
    print(format_report(model))
    try:
        save_fitted_model(model, out)
    except OSError as err:
        raise ConfigError("out", f"a path that can be written, got {str(out)!r} ({err.strerror or err})") from None
    print(f"  saved to {out}")
    return 0
