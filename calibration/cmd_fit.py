"""`python -m calibration fit profile=<dir> [out=<file>] [test_fraction=0.25] [seed=0]`

Fits the six-term step-time model (calibration/fit.py) to a profiler profile,
prints the held-out error, and saves the model with its fit report to
<dir>/fit.json (or out=<file>).
"""

from __future__ import annotations

from pathlib import Path

from calibration.fit import FIT_FILE, TERMS, fit_profile, save_fitted_model
from calibration.profile import Profile
from simulator.errors import ConfigError

ARGS = {"profile", "out", "test_fraction", "seed"}


def parse_args(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in ARGS:
            raise ConfigError("arguments", f"expected one of {sorted(ARGS)} as key=value, got {arg!r}")
        args[key] = value
    if "profile" not in args:
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
    lines.append("  coefficients:")
    for term in TERMS:
        lines.append(f"    {term:<20} {model.coefficients[term]:.4e}  ({report['terms'][term]})")
    kv = model.kv
    lines.append(f"  KV: {kv['num_gpu_blocks']} blocks x {kv['block_size']} tokens, {kv['bytes_per_token']} bytes/token")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        test_fraction = float(args.get("test_fraction", 0.25))
        seed = int(args.get("seed", 0))
    except ValueError as err:
        raise ConfigError("arguments", str(err)) from None
    profile = Profile.load(args["profile"])
    model = fit_profile(profile, test_fraction=test_fraction, seed=seed)
    out = Path(args.get("out") or Path(args["profile"]) / FIT_FILE)
    save_fitted_model(model, out)
    print(format_report(model))
    print(f"  saved to {out}")
    return 0
