"""Command-line input checks shared by the simulator's and calibration's commands: Hydra
composition errors and output folders, each reported as one ConfigError line."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import NoReturn

from simulator.records.errors import ConfigError


def writable_folder(field: str, folder: Path, text: str) -> None:
    """The folder exists and is writable, or its nearest existing ancestor is (nothing is made)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(field, f"a path that can be written, got {text!r} ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(field, f"a path that can be written, got {text!r} ({existing} is not writable)")


def hydra_error(err: Exception, overrides: list[str], config_name: str = "config") -> ConfigError:
    """A Hydra composition error as one line naming the setting (and, for a mistyped key,
    the closest valid ones), instead of Hydra's multi-line message."""
    import difflib
    import re

    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(err).__name__]
    wrong = re.match(r"Could not override '([^']+)'", text)
    if wrong:
        key = wrong.group(1)
        parent, _, leaf = key.rpartition(".")
        valid = _keys_under(parent, [o for o in overrides if not o.lstrip("+~").startswith(key + "=")],
                            config_name)
        if valid is None:
            return ConfigError(key, "not a setting of this configuration")
        closest = difflib.get_close_matches(leaf, valid, n=3, cutoff=0.5)
        hint = f"closest: {', '.join(closest)}" if closest else f"allowed: {', '.join(valid)}"
        where = f"{parent} ({_group_choice(parent, overrides)})" if parent else "the configuration"
        return ConfigError(key, f"not a setting of {where}; {hint}")
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        return ConfigError(missing.group(1), f"unknown choice {missing.group(2)!r}")
    bad = _unparsable(overrides)
    field = bad.split("=", 1)[0].lstrip("+~") if bad else "overrides"
    return ConfigError(field, f"cannot be read: {lines[0]}" + (f" (in {bad!r})" if bad else ""))


def _unparsable(overrides: list[str]) -> str | None:
    """The first override Hydra's grammar cannot parse, if any."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_override(override)
        except HydraException:
            return override
    return None


def _group_choice(group: str, overrides: list[str]) -> str:
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == group]
    return f"{group}={chosen[-1]}" if chosen else "its default"


def _keys_under(path: str, overrides: list[str], config_name: str) -> list[str] | None:
    """The keys of the config node at ``path`` (dotted) with these overrides, or None."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig

    from simulator.configure import CONF_DIR

    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            node = compose(config_name, overrides=overrides)
    except Exception:  # noqa: BLE001 - another override is wrong too: no suggestion
        return None
    for part in [p for p in path.split(".") if p]:
        node = node.get(part) if isinstance(node, DictConfig) else None
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else None


def check_run_dir(argv: list[str]) -> None:
    """A ``hydra.run.dir`` given on the command line can be made and written (else one line)."""
    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if run_dirs and "${" not in run_dirs[-1]:
        probe_run_dir(run_dirs[-1])


def one_line_hydra_errors(config_name: str) -> None:
    """Make Hydra's config composition report a bad override (a mistyped key, an unknown
    choice) as one ``error:`` line naming the key and the closest valid ones, exit 2,
    instead of Hydra's multi-line message; it costs nothing on valid input."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.hydra import Hydra

    def one_line(compose, keyword: str):
        def checked(self, *args, **kwargs):
            try:
                return compose(self, *args, **kwargs)
            except Exception as err:  # noqa: BLE001 - any composition error becomes one line
                from hydra.core.global_hydra import GlobalHydra

                GlobalHydra.instance().clear()  # the suggestions compose again; the run stops here
                overrides = list(kwargs.get(keyword, args[1] if len(args) > 1 else []))
                own = _first_values([o for o in overrides if not o.lstrip("+~").startswith("hydra.")])
                print(f"error: {hydra_error(err, own, config_name)}", file=sys.stderr)
                sys.exit(2)

        return checked

    Hydra.compose_config = one_line(Hydra.compose_config, "overrides")
    # a multirun composes each job of the sweep here
    ConfigLoaderImpl.load_sweep_config = one_line(ConfigLoaderImpl.load_sweep_config, "sweep_overrides")


def _first_values(overrides: list[str]) -> list[str]:
    """The overrides with each sweep (``key=a,b``) reduced to its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except Exception:  # noqa: BLE001 - left as written; hydra_error names it
            out.append(text)
            continue
        if override.is_sweep_override():
            text = f"{text.split('=', 1)[0]}={next(iter(override.sweep_string_iterator()))}"
        out.append(text)
    return out


def probe_run_dir(text: str, field: str = "hydra.run.dir") -> None:
    """The run directory can be made and written: make it, write a file in it, then remove
    the file and every folder made here (so nothing is left behind on either outcome)."""
    import tempfile

    folder = Path(text)
    made: list[Path] = []
    try:
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(field, f"a directory that can be written, got {text!r} "
                                 f"({err.strerror or type(err).__name__})") from None
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the option, exit code 2."""

    def error(self, message: str) -> NoReturn:
        field, sep, rest = message.partition(": ")
        if field.startswith("argument "):
            field, message = field.removeprefix("argument ").split("/")[-1], rest
        elif sep and field == "the following arguments are required":
            field, message = rest.split(", ")[0], "is required"
        else:
            field = "arguments"
        print(f"error: {field}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def start_command_line(argv: list[str], config_name: str) -> bool:
    """What ``python -m simulator`` and ``python -m simulator.plan`` do before Hydra starts: no
    transparent huge pages, group choices and the run folder checked (False, after one line on
    stderr, when one is refused), one Hydra composition saved, Hydra's errors made one line."""
    from simulator.configure import check_group_choices, skip_hydra_mode_probe
    from simulator.huge_pages import avoid_huge_pages

    avoid_huge_pages()
    try:
        check_group_choices(argv)
        check_run_dir(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return False
    skip_hydra_mode_probe(argv)
    one_line_hydra_errors(config_name)
    return True
