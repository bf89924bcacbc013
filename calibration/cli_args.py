"""Command-line arguments of ``python -m calibration``: typed, range-checked, one-line errors.

``OneLineParser`` is argparse with the project's bad-input form (``error: --tp: a positive
integer, got '0'``, exit 2). The ``*_arg`` functions check one value each and raise
ConfigError naming the field; ``arg_type`` turns one into an argparse ``type=``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from simulator.errors import ConfigError


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


def arg_type(check: Callable[[str, str], object], field: str) -> Callable[[str], object]:
    """An argparse ``type=`` from a checker: its ConfigError becomes argparse's one-line error."""

    def convert(text: str) -> object:
        try:
            return check(field, text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{field}: ")) from None

    convert.__name__ = field
    return convert


def int_arg(field: str, text: str, minimum: int | None = None) -> int:
    """An integer (>= minimum)."""
    allowed = "an integer" if minimum is None else ("a positive integer" if minimum == 1
                                                    else f"an integer >= {minimum}")
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(field, f"{allowed}, got {text!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(field, f"{allowed}, got {text!r}")
    return value


def positive_int_arg(field: str, text: str) -> int:
    return int_arg(field, text, minimum=1)


def seed_arg(field: str, text: str) -> int:
    return int_arg(field, text, minimum=0)


def number_arg(field: str, text: str, low: float | None = None, high: float | None = None,
               open_low: bool = False, open_high: bool = False) -> float:
    """A finite number within [low, high] (an end left open where asked)."""
    lo = "" if low is None else ("(" if open_low else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if open_high else "]")
    allowed = "a number" + (f" in {lo}, {hi}" if lo and hi else
                            f" {'>' if open_low else '>='} {low:g}" if lo else
                            f" {'<' if open_high else '<='} {high:g}" if hi else "")
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ConfigError(field, f"{allowed}, got {text!r}") from None
    if not math.isfinite(value) or (low is not None and (value < low or (open_low and value == low))) \
            or (high is not None and (value > high or (open_high and value == high))):
        raise ConfigError(field, f"{allowed}, got {text!r}")
    return value


def fraction_arg(field: str, text: str) -> float:
    """A number in (0, 1)."""
    return number_arg(field, text, 0.0, 1.0, open_low=True, open_high=True)


def nonnegative_arg(field: str, text: str) -> float:
    return number_arg(field, text, low=0.0)


def existing_dir_arg(field: str, text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise ConfigError(field, f"an existing directory, got {text!r}")
    return path


def existing_file_arg(field: str, text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise ConfigError(field, f"an existing file, got {text!r}")
    return path


def output_file_arg(field: str, text: str) -> Path:
    """A file path whose folder exists or can be made, and can be written (checked before any work)."""
    path = Path(text)
    if not text or text.endswith(os.sep) or path.is_dir():
        raise ConfigError(field, f"a file path to write, got {text!r}")
    _writable_folder(field, path.parent, text)
    return path


def output_dir_arg(field: str, text: str) -> Path:
    """A directory that exists or can be made, and can be written (checked before any work)."""
    if not text:
        raise ConfigError(field, f"a directory to write into, got {text!r}")
    _writable_folder(field, Path(text), text)
    return Path(text)


def _writable_folder(field: str, folder: Path, text: str) -> None:
    """The folder exists and is writable, or its nearest existing ancestor is (nothing is made)."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(field, f"a path that can be written, got {text!r} ({existing} is not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(field, f"a path that can be written, got {text!r} ({existing} is not writable)")


def new_run_dir(kind: str, root: Path | str = "outputs") -> Path:
    """``outputs/<kind>/<date>/<time>`` under the working directory, a new folder for every run."""
    now = dt.datetime.now()
    base = Path(root) / kind / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
    candidate, n = base, 0
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


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
