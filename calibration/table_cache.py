"""An on-disk cache of tables derived from data files, rebuilt when a source changes.

Reading and indexing the measured kernel tables (17 MB of CSV) takes ~0.15 s,
a tenth of a light simulation's whole process; their pickle loads in ~1 ms.
A cache entry is named by what it was built from: the size and modification
time of every source file (the code that builds it among them) and the numpy
version. The cache lives in ``$RLLM_SIM_CACHE_DIR``, else
``$XDG_CACHE_HOME/rllm-sim``, else ``~/.cache/rllm-sim``;
``RLLM_SIM_CACHE_DIR=off`` turns it off. Where it cannot be read or written,
the tables are simply built.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def cache_dir() -> Path | None:
    """Where cached tables go, or None when caching is off."""
    explicit = os.environ.get("RLLM_SIM_CACHE_DIR")
    if explicit:
        return None if explicit.lower() == "off" else Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = Path.home() / ".cache"
        except RuntimeError:  # no home directory to be found
            return None
    return Path(base) / "rllm-sim"


def cache_key(sources: Iterable[Path]) -> str:
    """A name for what ``sources`` hold now (path, size and modification time of each)."""
    import numpy as np

    digest = hashlib.sha256(f"numpy {np.__version__}".encode())
    for source in sources:
        stat = Path(source).stat()
        digest.update(f"\n{Path(source).resolve()} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def cached(name: str, sources: Iterable[Path], build: Callable[[], T]) -> T:
    """``build()``, or the value it gave last time the ``sources`` were as they are now."""
    folder = cache_dir()
    if folder is None:
        return build()
    path = folder / f"{name}-{cache_key(sources)}.pickle"
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception:  # absent, unreadable or from an incompatible build: rebuild it
        pass
    value = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(f.name, path)  # whole or not at all, even with runs in parallel
    except OSError:
        pass
    return value
