"""The on-disk cache of derived tables: built once, rebuilt when a source changes."""

import dataclasses
import os
import pickle
from collections.abc import Mapping

import numpy as np

from calibration import kernel_tables
from calibration.table_cache import cached


class Builder:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return {"calls": self.calls, "rows": list(range(5))}


def test_a_second_use_loads_what_the_first_built(tmp_path, monkeypatch):
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "table.csv"
    source.write_text("a,b\n1,2\n")
    build = Builder()
    first = cached("t", [source], build)
    second = cached("t", [source], build)
    assert build.calls == 1 and second == first


def test_a_changed_source_is_built_again(tmp_path, monkeypatch):
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "table.csv"
    source.write_text("a,b\n1,2\n")
    build = Builder()
    cached("t", [source], build)
    source.write_text("a,b\n1,2\n3,4\n")
    os.utime(source, ns=(1, 1))
    assert cached("t", [source], build)["calls"] == 2


def test_no_cache_when_off_or_unwritable(tmp_path, monkeypatch):
    source = tmp_path / "table.csv"
    source.write_text("x\n")
    build = Builder()
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", "off")
    cached("t", [source], build)
    cached("t", [source], build)
    assert build.calls == 2
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    assert cached("t", [source], build)["calls"] == 3


def test_a_corrupt_entry_is_rebuilt(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", str(folder))
    source = tmp_path / "table.csv"
    source.write_text("x\n")
    build = Builder()
    cached("t", [source], build)
    (entry,) = folder.glob("t-*.pickle")
    entry.write_bytes(b"not a pickle")
    assert cached("t", [source], build)["calls"] == 2
    assert pickle.loads(entry.read_bytes())["calls"] == 2  # and written again


def test_kernel_tables_from_the_cache_equal_the_csvs(tmp_path, monkeypatch):
    monkeypatch.setenv("RLLM_SIM_CACHE_DIR", str(tmp_path / "cache"))
    system = "h100_sxm"
    version = kernel_tables.resolve_version(system)
    kernel_tables.load_tables.cache_clear()
    first = kernel_tables.load_tables(system)  # built from the CSVs, then stored
    kernel_tables.load_tables.cache_clear()
    second = kernel_tables.load_tables(system)  # from the stored pickle
    fresh = kernel_tables._read_tables(system, version)
    assert len(list((tmp_path / "cache").glob("kernel-tables-*.pickle"))) == 1
    assert same(second, fresh) and same(first, fresh)
    assert not same(second, kernel_tables._read_tables("a100_sxm", kernel_tables.resolve_version("a100_sxm")))
    kernel_tables.load_tables.cache_clear()


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
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))
    if hasattr(a, "__dict__"):
        return same(vars(a), vars(b))
    return a == b
