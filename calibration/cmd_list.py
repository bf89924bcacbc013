"""`python -m calibration list`: which (hardware, model, tp) selections work, and from what.

One row per (hardware, model, tp) that fits: the source ``perf.source`` picks,
whether it is calibrated on measurements, the optimizations it supports, the
KV blocks vLLM would get (bf16, block 16, vLLM's default engine settings),
the attention tables the model's KV heads lie beyond (priced by KV bytes, see
``kernel_tables.AttentionTable``) and what the step-time model is built from. Filters narrow the table; ``--all``
also lists the selections that fail, with the reason.
"""

from __future__ import annotations

import csv
import sys

from calibration import catalog
from calibration.cli_args import OneLineParser, arg_type, positive_int_arg
from calibration.registry import SOURCES, TP_CHOICES, USER_SOURCES, check_selection
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError

COLUMNS = ("hardware", "model", "tp", "source", "calibrated", "optimizations", "kv_blocks", "extrapolated",
           "built_from")


def rows(hardware: list[str], models: list[str], optimizations: list[str], tps: list[int],
         source: str, engine: EngineConfig, include_failures: bool) -> list[dict]:
    """The listing as dictionaries (one per hardware x model x tp)."""
    out = []
    opts = {name: catalog.load_optimization(name) for name in optimizations}
    for hw_name in hardware:
        hw = catalog.load_hardware(hw_name)
        for model_name in models:
            arch = catalog.load_model(model_name)
            for tp in tps:
                ok, base, reason = [], None, ""
                for name, opt in opts.items():
                    try:
                        choice, mem, per_token = check_selection(hw, arch, opt, tp, {"source": source}, engine)
                    except ConfigError as err:
                        reason = reason or str(err)
                        continue
                    ok.append(name)
                    if base is None or name == "none":
                        blocks = mem.kv_cache // (per_token * engine.block_size)
                        base = (choice, blocks if name == "none" else f"{blocks} ({name})")
                if base is None:
                    if include_failures:
                        out.append({"hardware": hw_name, "model": model_name, "tp": tp, "source": "-",
                                    "calibrated": "-", "optimizations": "", "kv_blocks": 0, "extrapolated": "-",
                                    "built_from": f"unavailable: {reason}"})
                    continue
                choice, blocks = base
                via = f" (measured on {choice.via_model})" if choice.via_model else ""
                out.append({"hardware": hw_name, "model": model_name, "tp": tp, "source": choice.source,
                            "calibrated": "yes" if choice.calibrated else "NO",
                            "optimizations": ",".join(ok), "kv_blocks": blocks,
                            "extrapolated": _extrapolated(hw, arch, tp, choice.source),
                            "built_from": choice.built_from + via})
    return out


def _extrapolated(hw, arch, tp: int, source: str) -> str:
    """KV-head extrapolation of the shipped tables for one selection ("-" when none or not table-based)."""
    if source != "aiconfigurator" or not hw.kernel_tables:
        return "-"
    from calibration.composed import LayerShapes
    from calibration.kernel_tables import kv_heads_extrapolation, load_tables

    return kv_heads_extrapolation(load_tables(hw.kernel_tables), LayerShapes.of(arch, tp).kv_heads) or "-"


def _print_table(table: list[dict]) -> None:
    if not table:
        print("nothing available for that selection (--all says why)")
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in table)) for c in COLUMNS[:-1]}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS[:-1]) + "  built_from")
    for r in table:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS[:-1]) + "  " + str(r["built_from"]))


def main(argv: list[str]) -> int:
    parser = OneLineParser(prog="python -m calibration list", description=__doc__.splitlines()[0])
    parser.add_argument("--hardware", nargs="*", default=None, help="hardware names (conf/hardware)")
    parser.add_argument("--model", nargs="*", default=None, help="model names (conf/model)")
    parser.add_argument("--optimization", nargs="*", default=None, help="optimization names (conf/optimization)")
    parser.add_argument("--tp", nargs="+", type=arg_type(positive_int_arg, "--tp"), default=list(TP_CHOICES),
                        help=f"tensor-parallel sizes (positive integers; default {' '.join(map(str, TP_CHOICES))})")
    parser.add_argument("--source", default="auto", choices=[s for s in SOURCES if s not in USER_SOURCES])
    parser.add_argument("--all", action="store_true", help="also list failing selections and why")
    parser.add_argument("--csv", action="store_true", help="write CSV to stdout")
    args = parser.parse_args(argv)
    for group, chosen in (("hardware", args.hardware), ("model", args.model), ("optimization", args.optimization)):
        for name in chosen or []:
            if name not in catalog.names(group):
                raise ConfigError(group, f"unknown {group} {name!r}; allowed: {', '.join(catalog.names(group))}")
    table = rows(args.hardware or catalog.names("hardware"), args.model or catalog.names("model"),
                 args.optimization or catalog.names("optimization"), args.tp, args.source, EngineConfig(),
                 args.all)
    if args.csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    else:
        _print_table(table)
        print(f"\n{len(table)} rows; KV blocks for bf16 weights and KV at gpu_memory_utilization=0.9, "
              f"block_size=16, max_num_batched_tokens=8192, max_num_seqs=1024, max_model_len=32768 "
              f"(capped at each model's max_position_embeddings),\n"
              f"as vLLM sizes the cache (source blis itself uses BLIS's own total_kv_blocks / tp).\n"
              f"extrapolated: attention tables the model's KV heads lie beyond; a run also counts every "
              f"step priced beyond a table's batch, context or token range\n(summary.json: "
              f"metadata.performance_model.extrapolated_queries).")
    return 0
