"""Paths as a profile records them: relative to the checkout or the home directory, never the
absolute path of the machine that wrote them (profiles are shared between machines)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def _roots() -> list[tuple[str, str]]:
    """(absolute prefix, replacement), longest first: the checkout -> '.', home -> '~'."""
    roots = [(str(REPO_ROOT), ".")]
    home = os.path.expanduser("~")
    if home not in ("", "/", "~"):
        roots.append((home.rstrip("/"), "~"))
    return sorted(roots, key=lambda r: -len(r[0]))


def portable_path(path: str | Path) -> str:
    """'<repo>/x/y' -> 'x/y', '<home>/m' -> '~/m', any other absolute path -> its last part."""
    text = str(path)
    for root, short in _roots():
        if text == root:
            return short
        if text.startswith(root + "/"):
            rest = text[len(root) + 1:]
            return rest if short == "." else f"{short}/{rest}"
    return Path(text).name if text.startswith("/") else text


def portable_text(text: str) -> str:
    """A string with the checkout's and the home directory's absolute paths made relative
    (whole strings that are other absolute paths keep only their last part)."""
    if text.startswith("/"):
        return portable_path(text)
    for root, short in _roots():
        inside = "" if short == "." else short + "/"
        text = re.sub(re.escape(root) + "/", inside, text)
        text = re.sub(re.escape(root) + r"(?![\w.-])", short, text)
    return text


def portable(value: Any, replace: dict[str, str] | None = None) -> Any:
    """value (JSON-like) with every string made portable; ``replace`` maps exact strings first
    (e.g. the model's local folder -> the model's name)."""
    replace = replace or {}
    if isinstance(value, str):
        return replace[value] if value in replace else portable_text(value)
    if isinstance(value, dict):
        return {k: portable(v, replace) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v, replace) for v in value]
    return value
