"""``python -m calibration accuracy``: replay every shipped real GPU run and tabulate the errors.

    python -m calibration accuracy                          # all shipped runs, to runs/accuracy/
    python -m calibration accuracy --runs RTXPRO6000/Llama-3.1-8B --out /tmp/acc
    python -m calibration accuracy --update-docs            # also rewrite the table in docs/accuracy.md

Writes ``accuracy.csv`` (one row per run, view, metric and quantile: live and
simulated seconds and the signed error) and ``accuracy.md`` (the table) to
``--out``, and prints the table. Method: ``calibration/accuracy.py``. Runs on a
CPU in seconds. Exit code 0, 2 on bad input.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from calibration import accuracy
from calibration.cli_args import OneLineParser, arg_type, number_arg, seed_arg
from simulator.records.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "accuracy.md"


def _seconds(field: str, text: str) -> float:
    return number_arg(field, text, low=0)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m calibration accuracy", description=__doc__.split("\n")[0],
                      epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=None, metavar="GPU/MODEL",
                   help="shipped runs to replay (default: all), by GPU/model folder name or path")
    p.add_argument("--out", default=None, help="output folder (default runs/accuracy/<UTC time>)")
    p.add_argument("--frontend-s", type=arg_type(_seconds, "--frontend-s"), default=None,
                   help="front-end seconds for the client view (default: simulator.records.frontend's GPU default)")
    p.add_argument("--seed", type=arg_type(seed_arg, "--seed"), default=0)
    p.add_argument("--update-docs", action="store_true", help=f"rewrite the marked table in {DOCS.name}")
    return p


def pick_runs(names: list[str] | None) -> list[Path]:
    shipped = accuracy.shipped_runs()
    if names is None:
        return shipped
    by_name = {accuracy.run_name(p): p for p in shipped}
    out = []
    for name in names:
        path = Path(name)
        if (path / "vllm" / "requests.jsonl").exists():
            out.append(path)
        elif name.strip("/") in by_name:
            out.append(by_name[name.strip("/")])
        else:
            raise ConfigError("--runs", f"one of {', '.join(by_name)} or a run folder, got {name!r}")
    return out


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    runs = pick_runs(args.runs)
    out = Path(args.out or REPO / "runs" / "accuracy" / dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S"))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("--out", f"a writable folder, got {str(out)!r} ({err.strerror})") from None
    results = accuracy.replay_all(runs, args.frontend_s, args.seed)
    accuracy.write_csv(results, out / "accuracy.csv")
    table = accuracy.markdown(results)
    (out / "accuracy.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {out / 'accuracy.csv'}, {out / 'accuracy.md'}")
    if args.update_docs:
        accuracy.update_docs(DOCS, results)
        print(f"updated: {DOCS}")
    return 0
