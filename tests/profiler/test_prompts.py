"""Seeded prompt token streams."""

from __future__ import annotations

from profiler.prompts import FIRST_TOKEN_ID, TokenStreams


def test_prompts_of_one_stream_are_prefixes_of_each_other():
    streams = TokenStreams(vocab_size=8192, seed=0, max_len=4096)
    long = streams.tokens("ctx0", 3000)
    assert streams.tokens("ctx0", 1000) == long[:1000]
    assert TokenStreams(8192, 0, 4096).tokens("ctx0", 3000) == long  # same seed, same tokens


def test_streams_differ_and_avoid_special_tokens():
    streams = TokenStreams(vocab_size=512, seed=0, max_len=2048)
    a, b = streams.tokens("a", 2048), streams.tokens("b", 2048)
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 20
    assert min(a + b) >= FIRST_TOKEN_ID and max(a + b) < 512
    assert TokenStreams(512, 1, 2048).tokens("a", 100) != a[:100]


def test_repetitive_prompt_repeats_its_pattern():
    streams = TokenStreams(vocab_size=8192, seed=0, max_len=1024)
    tokens = streams.repetitive("spec/0", 100, pattern_tokens=16)
    assert len(tokens) == 100
    assert tokens[16:32] == tokens[:16] and tokens[96:] == tokens[:4]
