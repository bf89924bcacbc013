"""An on-disk cache of tables derived from data files, rebuilt when a source changes.

Reading and indexing the measured kernel tables (17 MB of CSV) takes ~0.2 s,
a tenth of a light simulation's whole process; their cached arrays load in
about a millisecond. An entry holds plain arrays only: a JSON header (names,
dtypes, shapes, offsets, text values) and the raw little-endian bytes of 8-byte
floats and integers, read with ``np.frombuffer``. Nothing in it is executed,
whatever a cache directory holds (no pickle). An entry is named by what it was
built from (the size and modification time of every source file, the code that
builds it among them, and the numpy version), records that key inside, and is
used only when the key matches and ``decode`` accepts its arrays (names, dtypes,
shapes); anything else is rebuilt from the sources, silently. The cache lives in
``$RLLM_SIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/rllm-sim``, else
``~/.cache/rllm-sim``; ``RLLM_SIM_CACHE_DIR=off`` turns it off. Where it cannot
be read or written, the tables are simply built.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")
#: what reading or decoding a malformed entry raises (the entry is then rebuilt)
MALFORMED = (ValueError, KeyError, TypeError, IndexError, AttributeError, SyntaxError, RecursionError,
             MemoryError)
#: a cache entry's layout version: entries of another layout are never read
LAYOUT = "raw-1"


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
    digest = hashlib.sha256(f"{LAYOUT} numpy {np.__version__}".encode())
    for source in sources:
        stat = Path(source).stat()
        digest.update(f"\n{Path(source).resolve()} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:24]


def read_entry(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of the entry at ``path`` when it is a well-formed entry stored under ``key``, else None."""
    try:
        blob = bytearray(path.read_bytes())  # writable arrays, as built ones are
    except OSError:
        return None
    try:
        return _unpack(blob, key)
    except MALFORMED:
        return None


def write_entry(path: Path, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Store ``arrays`` (numbers and text, no objects) at ``path`` under ``key``, whole or not at all."""
    import tempfile

    blob = _pack(arrays, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        try:
            f.write(blob)
        except OSError:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)  # whole or not at all, even with runs in parallel


#: an entry: MAGIC, the header's length (8 bytes, little-endian), the header (JSON), the array bytes
MAGIC = b"rllm-sim table cache 1\n"
#: what numbers are stored as (little-endian 8-byte floats and integers)
NUMBER_TYPES = {"f": "<f8", "i": "<i8"}


def _pack(arrays: Mapping[str, np.ndarray], key: str) -> bytes:
    """One entry's bytes: numbers as raw little-endian arrays, text inside the JSON header."""
    header: dict = {"key": key, "numbers": [], "text": {}}
    chunks, offset = [], 0
    for name, value in arrays.items():
        value = np.asarray(value)
        if value.dtype.kind == "U":
            header["text"][name] = {"shape": list(value.shape), "values": value.ravel().tolist()}
            continue
        dtype = NUMBER_TYPES.get(value.dtype.kind)
        if dtype is None:
            raise TypeError(f"{name}: {value.dtype} arrays cannot be cached")
        raw = np.ascontiguousarray(value, dtype=dtype).tobytes()
        header["numbers"].append({"name": name, "dtype": dtype, "shape": list(value.shape), "offset": offset})
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    return b"".join([MAGIC, len(head).to_bytes(8, "little"), head, *chunks])


def _unpack(blob: bytes | bytearray, key: str) -> dict[str, np.ndarray]:
    """The arrays of an entry's bytes (numbers as views of them); ValueError when malformed."""
    if not blob.startswith(MAGIC):
        raise ValueError("not a cache entry")
    start = len(MAGIC) + 8
    size = int.from_bytes(blob[len(MAGIC):start], "little")
    header = json.loads(blob[start:start + size])
    if not isinstance(header, dict) or header.get("key") != key:
        raise ValueError("stored under another key")
    data = memoryview(blob)[start + size:]
    out: dict[str, np.ndarray] = {}
    for item in header["numbers"]:
        dtype, shape, offset = item["dtype"], tuple(item["shape"]), item["offset"]
        if dtype not in NUMBER_TYPES.values() or not all(isinstance(d, int) and d >= 0 for d in shape) \
                or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"{item.get('name')}: bad layout")
        count = int(np.prod(shape, dtype=np.int64))
        if offset + 8 * count > len(data):
            raise ValueError(f"{item['name']}: outside the data")
        out[str(item["name"])] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    for name, item in header["text"].items():
        values = item["values"]
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"{name}: not text")
        out[name] = np.array(values, dtype=str).reshape(item["shape"])
    return out


def cached(name: str, sources: Iterable[Path], build: Callable[[], T],
           encode: Callable[[T], Mapping[str, np.ndarray]],
           decode: Callable[[Mapping[str, np.ndarray]], T]) -> T:
    """``build()``, or ``decode`` of the arrays ``encode`` gave last time the ``sources`` were as now.

    ``decode`` checks what it is given (names, dtypes, shapes) and raises one of MALFORMED
    (ValueError, KeyError, ...) when it does not hold a valid value: the value is then built again.
    """
    folder = cache_dir()
    if folder is None:
        return build()
    key = cache_key(sources)
    path = folder / f"{name}-{key}.arrays"
    arrays = read_entry(path, key)
    if arrays is not None:
        try:
            return decode(arrays)
        except MALFORMED:
            pass  # not what this code stores: rebuilt below
    value = build()
    with contextlib.suppress(OSError):  # an unwritable cache: the next run builds again
        write_entry(path, key, encode(value))
    return value
