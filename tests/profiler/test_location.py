"""Where a profile goes: one directory per machine fingerprint; another machine's is never reused."""

from __future__ import annotations

import json

import pytest

from profiler.__main__ import compose, split_overrides
from profiler.hardware import HardwareInfo, fingerprint_of_meta, machine_fingerprint, machine_key
from profiler.location import profile_location
from profiler.settings import PROFILES_DIR, settings_from_config
from profiler.store import PointStore
from simulator.records.errors import ConfigError

REPO_PROFILE = PROFILES_DIR / "cpu-amd-2c" / "tiny-llama" / "none" / "profile.json"


def settings(*argv: str):
    return settings_from_config(compose(*split_overrides(list(argv))))


def machine(name: str = "AMD EPYC", isa: tuple[str, ...] = ("avx2", "avx512f"), torch: str = "2.13.0+cpu"):
    info = HardwareInfo(kind="cpu", name=name, vendor="amd", count=2, slug="cpu-amd-2c",
                        memory_total_bytes=1, details={"machine": "x86_64", "isa": list(isa)})
    fp = machine_fingerprint(info, "0.32.0", torch)
    return fp, machine_key(fp)


def write_profile_meta(folder, fingerprint) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "profile.json").write_text(json.dumps({"machine": {"fingerprint": fingerprint}}))


def test_two_fingerprints_get_two_default_directories():
    s = settings("optimization=fp8_kv")
    (a, ka), (b, kb) = machine(), machine(isa=("avx2", "avx512f", "avx512_vp2intersect"))
    assert ka != kb
    first, second = profile_location(s, "cpu-amd-2c", a, ka), profile_location(s, "cpu-amd-2c", b, kb)
    assert first.path == PROFILES_DIR / f"cpu-amd-2c-{ka}" / "tiny-llama" / "fp8_kv"
    assert second.path == PROFILES_DIR / f"cpu-amd-2c-{kb}" / "tiny-llama" / "fp8_kv"
    assert not first.note and not second.note


def test_the_shipped_profiles_directory_is_not_a_default(tmp_path):
    """The shipped profiles sit in cpu-amd-2c/ without a key: no run takes them as its own."""
    fp, key = machine()
    assert profile_location(settings(), "cpu-amd-2c", fp, key).path.parent.parent.name == f"cpu-amd-2c-{key}"


def test_another_machines_profile_is_not_reused_and_the_line_says_why(tmp_path):
    theirs, _ = machine(name="Intel Xeon")
    ours, key = machine()
    write_profile_meta(tmp_path / "none", theirs)
    where = profile_location(settings(f"output_dir={tmp_path / 'none'}"), "cpu-amd-2c", ours, key)
    assert where.path == tmp_path / f"none-{key}"
    assert "\n" not in where.note
    assert "not reusing the profile" in where.note and "another machine" in where.note
    assert "name: 'Intel Xeon' there, 'AMD EPYC' here" in where.note


def test_another_machines_unfinished_run_is_not_resumed(tmp_path):
    theirs, _ = machine(torch="2.12.0+cpu")
    ours, key = machine()
    PointStore(tmp_path / "p", {"seed": 0, "machine": theirs}, resume=True)
    where = profile_location(settings(f"output_dir={tmp_path / 'p'}"), "cpu-amd-2c", ours, key)
    assert where.path == tmp_path / f"p-{key}"
    assert "unfinished run" in where.note and "torch: '2.12.0+cpu' there, '2.13.0+cpu' here" in where.note


def test_a_profile_without_a_fingerprint_is_not_reused(tmp_path):
    ours, key = machine()
    (tmp_path / "p" / ".partial").mkdir(parents=True)
    (tmp_path / "p" / ".partial" / "run.json").write_text(json.dumps({"seed": 0}))
    where = profile_location(settings(f"output_dir={tmp_path / 'p'}"), "cpu-amd-2c", ours, key)
    assert where.path == tmp_path / f"p-{key}" and "records no machine fingerprint" in where.note


def test_a_named_hardware_directory_of_another_machine_moves_to_a_keyed_one():
    ours, key = machine(name="Some Other CPU")
    shipped = fingerprint_of_meta(json.loads(REPO_PROFILE.read_text()))
    assert shipped != ours
    where = profile_location(settings("hardware_name=cpu-amd-2c"), "cpu-amd-2c", ours, key)
    assert where.path == PROFILES_DIR / f"cpu-amd-2c-{key}" / "tiny-llama" / "none"
    assert str(REPO_PROFILE.parent) in where.note


def test_the_same_fingerprint_resumes_in_place(tmp_path):
    ours, key = machine()
    store = PointStore(tmp_path / "p", {"seed": 0, "machine": ours}, resume=True)
    store.record({"point_id": "a", "phase": "decode", "params": {}}, "oom", [], "full")
    where = profile_location(settings(f"output_dir={tmp_path / 'p'}"), "cpu-amd-2c", ours, key)
    assert where.path == tmp_path / "p" and not where.note
    assert PointStore(where.path, {"seed": 0, "machine": ours}, resume=True).resumed == 1


def test_both_directories_taken_by_other_machines_is_an_error(tmp_path):
    ours, key = machine()
    write_profile_meta(tmp_path / "p", machine(name="A")[0])
    write_profile_meta(tmp_path / f"p-{key}", machine(name="B")[0])
    with pytest.raises(ConfigError) as err:
        profile_location(settings(f"output_dir={tmp_path / 'p'}"), "cpu-amd-2c", ours, key)
    assert err.value.field == "output_dir"


def test_shipped_profiles_store_their_machine_fingerprint():
    for path in sorted(PROFILES_DIR.glob("*/*/*/profile.json")):
        meta = json.loads(path.read_text())
        stored = meta["machine"]
        assert stored["fingerprint"]["name"] == meta["hardware"]["name"]
        assert stored["key"] == machine_key(stored["fingerprint"])


def test_an_unwritable_output_directory_is_one_error_naming_output_dir(tmp_path):
    from profiler.location import writable_directory

    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError) as err:
        writable_directory(tmp_path / "file" / "profile", "output_dir")
    assert err.value.field == "output_dir" and "file/profile" in str(err.value)
    assert writable_directory(tmp_path / "a" / "b", "output_dir").is_dir()
