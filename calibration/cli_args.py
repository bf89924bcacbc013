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
from collections.abc import Callable
from pathlib import Path

from simulator.cli_errors import OneLineParser, hydra_error  # noqa: F401 - re-exported
from simulator.cli_errors import writable_folder as _writable_folder
from simulator.records.errors import ConfigError


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


def new_run_dir(kind: str, root: Path | str = "outputs") -> Path:
    """``outputs/<kind>/<date>/<time>`` under the working directory, a new folder for every run."""
    now = dt.datetime.now()
    base = Path(root) / kind / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
    candidate, n = base, 0
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
