"""Paths in profile metadata: relative to the checkout or home, never this machine's absolute path."""

from __future__ import annotations

import os

from profiler.portable import REPO_ROOT, portable, portable_path, portable_text


def test_paths_under_the_checkout_and_home_become_relative():
    home = os.path.expanduser("~")
    assert portable_path(REPO_ROOT / ".cache" / "models" / "tiny-llama") == ".cache/models/tiny-llama"
    assert portable_path(f"{home}/models/Qwen3-8B") == "~/models/Qwen3-8B"
    assert portable_path("/data/models/Qwen3-8B") == "Qwen3-8B"  # elsewhere: the folder's name
    assert portable_path("tiny-llama") == "tiny-llama"


def test_paths_inside_text_lose_the_checkout_and_home():
    home = os.path.expanduser("~")
    text = portable_text(f"python -m profiler output_dir={REPO_ROOT}/out x={home}/p")
    assert text == "python -m profiler output_dir=out x=~/p"
    assert portable_text(f"a {REPO_ROOT} b") == "a . b"
    assert portable_text(f"a {REPO_ROOT}2/x") == f"a {REPO_ROOT}2/x"  # another folder, not the checkout


def test_metadata_is_walked_and_exact_strings_are_replaced_first():
    model = str(REPO_ROOT / ".cache" / "models" / "tiny-llama")
    meta = {"model": {"source": model}, "kwargs": [{"model": model, "n": 3}], "rate": 1.5}
    out = portable(meta, {model: "tiny-llama"})
    assert out == {"model": {"source": "tiny-llama"}, "kwargs": [{"model": "tiny-llama", "n": 3}], "rate": 1.5}


def test_shipped_profiles_record_no_absolute_path():
    home = os.path.expanduser("~")
    for path in sorted((REPO_ROOT / "calibration" / "profiles").glob("*/*/*/*.json")):
        text = path.read_text()
        assert str(REPO_ROOT) not in text and f'"{home}' not in text and '"/' not in text, path
