"""The on-disk cache of derived tables: built once, rebuilt when a source changes, never executed."""

import dataclasses
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from calibration import kernel_tables, table_cache
from calibration.table_cache import cached


class Builder:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {"calls": np.array(self.calls), "rows": np.arange(5.0), "name": np.array(["a", "bc"])}


def decode(arrays):
    if set(arrays) != {"calls", "rows", "name"} or arrays["rows"].shape != (5,):
        raise ValueError("not ours")
    return dict(arrays)


def use(source, build):
    return cached("t", [source], build, encode=lambda v: v, decode=decode)


@pytest.fixture
def source(tmp_path, monkeypatch):
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "table.csv"
    path.write_text("a,b\n1,2\n")
    return path


def test_a_second_use_loads_what_the_first_built(source):
    build = Builder()
    first = use(source, build)
    second = use(source, build)
    assert build.calls == 1 and same(second, first)
    assert second["name"].tolist() == ["a", "bc"] and second["rows"].flags.writeable


def test_a_changed_source_is_built_again(source):
    build = Builder()
    use(source, build)
    source.write_text("a,b\n1,2\n3,4\n")
    os.utime(source, ns=(1, 1))
    assert use(source, build)["calls"] == 2


def test_no_cache_when_off_or_unwritable(tmp_path, monkeypatch, source):
    build = Builder()
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", "off")
    use(source, build)
    use(source, build)
    assert build.calls == 2
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    assert use(source, build)["calls"] == 3


def entry_of(folder: Path) -> Path:
    (entry,) = folder.glob("t-*")
    return entry


def _truncated(blob: bytes) -> bytes:
    return blob[: len(blob) - 3]


def _header_lies(blob: bytes) -> bytes:
    return blob.replace(b'"shape": [5]', b'"shape": [500]')


def _other_key(blob: bytes) -> bytes:
    start = len(table_cache.MAGIC) + 8
    return blob[:start] + blob[start:].replace(b'"key": "', b'"key": "x', 1)


def _objects(blob: bytes) -> bytes:
    return blob.replace(b'"dtype": "<f8"', b'"dtype": "|O8"')


@pytest.mark.parametrize("spoil", [lambda b: b"not an entry", _truncated, _header_lies, _other_key, _objects],
                         ids=["garbage", "truncated", "header-lies", "other-key", "object-dtype"])
def test_a_malformed_entry_is_rebuilt(tmp_path, source, spoil):
    build = Builder()
    use(source, build)
    entry = entry_of(tmp_path / "cache")
    entry.write_bytes(spoil(entry.read_bytes()))
    assert use(source, build)["calls"] == 2
    assert use(source, build)["calls"] == 2  # and written again, whole
    assert build.calls == 2


def test_arrays_the_decoder_refuses_are_rebuilt(tmp_path, source):
    build = Builder()
    use(source, build)
    entry = entry_of(tmp_path / "cache")
    key = entry.stem.rsplit("-", 1)[1]
    table_cache.write_entry(entry, key, {"calls": np.array(7), "rows": np.arange(3.0), "name": np.array(["x"])})
    assert use(source, build)["calls"] == 2


class Planted:
    """Unpickling this creates a marker file: what a planted cache entry would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_or_npz_runs_no_code_and_the_tables_equal_the_csvs(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", str(folder))
    marker = tmp_path / "code-ran"
    system = "h100_sxm"
    version = kernel_tables.resolve_version(system)
    fresh = kernel_tables._read_tables(system, version)
    kernel_tables.load_tables.cache_clear()
    kernel_tables.load_tables(system)
    (entry,) = folder.glob("kernel-tables-*")
    payloads = {
        "pickle": pickle.dumps(Planted(marker)),
        "npz": None,  # an .npz whose array holds the planted object
    }
    np.savez(tmp_path / "planted.npz", evil=np.array([Planted(marker)], dtype=object))
    payloads["npz"] = (tmp_path / "planted.npz").read_bytes()
    pickle.loads(payloads["pickle"]).close()  # the payload works ...
    assert marker.exists()
    marker.unlink()
    for name, payload in payloads.items():
        for where in (entry, entry.with_suffix(".pickle"), entry.with_suffix(".npz")):
            where.write_bytes(payload)
        kernel_tables.load_tables.cache_clear()
        loaded = kernel_tables.load_tables(system)
        assert not marker.exists(), name  # ... but loading the cache never runs it
        assert same(loaded, fresh), name
    kernel_tables.load_tables.cache_clear()


def test_kernel_tables_from_the_cache_equal_the_csvs(tmp_path, monkeypatch):
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", str(tmp_path / "cache"))
    system = "h100_sxm"
    version = kernel_tables.resolve_version(system)
    kernel_tables.load_tables.cache_clear()
    first = kernel_tables.load_tables(system)  # built from the CSVs, then stored
    kernel_tables.load_tables.cache_clear()
    second = kernel_tables.load_tables(system)  # from the stored entry
    fresh = kernel_tables._read_tables(system, version)
    assert len(list((tmp_path / "cache").glob("kernel-tables-*"))) == 1
    assert same(second, fresh) and same(first, fresh)
    assert not same(second, kernel_tables._read_tables("a100_sxm", kernel_tables.resolve_version("a100_sxm")))
    grid = second.generation.grid(28, 4, "bf16")  # the lazily completed grids work from the cache too
    assert np.array_equal(grid.ms, fresh.generation.grid(28, 4, "bf16").ms, equal_nan=True)
    kernel_tables.load_tables.cache_clear()


def test_no_pickle_on_data_a_user_directory_can_hold():
    """No module of the project unpickles: a cache or data file can never run code when read."""
    root = Path(__file__).resolve().parents[2]
    offenders = [str(p.relative_to(root)) for folder in ("calibration", "simulator", "profiler")
                 for p in (root / folder).rglob("*.py")
                 if any(word in p.read_text() for word in ("import pickle", "pickle.load", "allow_pickle=True"))]
    assert offenders == []


def same(a, b) -> bool:
    """Equal, field by field and array by array."""
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        return a.dtype.kind == b.dtype.kind and a.shape == b.shape and \
            bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if hasattr(a, "__dict__"):
        return same(vars(a), vars(b))
    return a == b
