"""`python -m profiler model=tiny-llama optimization=none [grid=smoke] [key=value ...]`

Profiles a real vLLM engine and writes a Profile to
calibration/profiles/<hardware>-<machine key>/<model>/<optimization>/ (or output_dir=...);
the key names this machine's fingerprint (CPU or GPU model, cores, ISA, vLLM and torch
versions), so a profile of another machine is never resumed or reused.
After the grid it serves the model with `vllm serve` on loopback and stores what the server
adds per step and per request (serving.repeats=3; serving.enabled=false skips it).
Settings: conf/profiler.yaml; optimizations: conf/profiler/optimization/;
grids: conf/profiler/grid/. Run from any Python: without vLLM it re-runs itself
in the engine env made by scripts/setup_vllm_cpu.sh.
"""

from __future__ import annotations

import os
import sys

from simulator.records.errors import ConfigError

GROUPS = {"optimization": "profiler/optimization@optimization", "grid": "profiler/grid@grid"}


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra group overrides, key=value settings), checking group choices with one-line errors.

    ``optimization=x`` and ``grid=x`` choose files of conf/profiler/<group>/; every
    other ``key=value`` (dotted keys allowed) sets a value on the composed config.
    """
    from profiler.settings import GRID_DIR, OPTIMIZATION_DIR, check_choice

    folders = {"optimization": OPTIMIZATION_DIR, "grid": GRID_DIR}
    groups, values = [], []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError("arguments", f"expected key=value, got {arg!r} (e.g. model=tiny-llama optimization=none)")
        if key.split(".")[0] in ("hydra", "+hydra", "++hydra"):
            raise ConfigError(key, f"Hydra's own settings do not apply to the profiler; it writes where "
                              f"output_dir says, got {arg!r}")
        if key in GROUPS:
            check_choice(key, value, folders[key])
            groups.append(f"{GROUPS[key]}={value}")
        else:
            values.append(arg)
    return groups, values


def compose(groups: list[str], values: list[str]):
    """conf/profiler.yaml with the chosen group files, then the key=value settings on top."""
    import yaml
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from profiler.settings import CONF_DIR

    def first_line(err: Exception) -> str:
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose(config_name="profiler", overrides=groups)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError("arguments", first_line(err)) from None
    OmegaConf.set_struct(cfg, False)
    if any(arg.partition("=")[0].startswith("model.") for arg in values):  # the tiny model's shape
        cfg.model = {"name": cfg.model}
        values = [f"model.name={arg.partition('=')[2]}" if arg.partition("=")[0] == "model" else arg
                  for arg in values]
    for arg in values:
        key, _, value = arg.partition("=")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([arg]))
        except (OmegaConfBaseException, yaml.YAMLError, ValueError) as err:
            raise ConfigError(key, f"must be a YAML value ({first_line(err)}), got {value!r}") from None
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(str(getattr(err, "full_key", None) or "arguments"), first_line(err)) from None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    try:
        groups, values = split_overrides(argv)
        from profiler.engine_env import ensure_engine_python, prepare_process

        ensure_engine_python(argv)  # may re-exec this command in the engine env
        from profiler.settings import settings_from_config

        settings = settings_from_config(compose(groups, values))
        if not settings.verbose:
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        process_info = prepare_process(settings.engine.cpu_threads)
        from profiler.run import run

        run(settings, process_info, command="python -m profiler " + " ".join(argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
