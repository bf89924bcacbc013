"""`python -m profiler.live`: bad input is one line naming the flag or field, exit 2."""

from __future__ import annotations

import pytest

from profiler.live.__main__ import main

URL = ["--url", "http://127.0.0.1:1"]


@pytest.mark.parametrize("argv, field", [
    (["run", "--workload", "poisson", "--out", "{tmp}/r", "--runs", "abc"], "--runs"),
    (["run", "--workload", "poisson"], "--out"),
    (["run", "--workload", "poisson", "--out", "{tmp}/r", "--bogus"], "arguments"),
    (["bogus"], "command"),
    ([], "command"),
    (["run", "--workload", "poisson", "-e", "block_size=abc", "--out", "{tmp}/r", *URL], "engine.block_size"),
    (["run", "--workload", "poisson", "-e", "speculative={num_speculative_tokens: x}", "--out", "{tmp}/r", *URL],
     "engine.speculative.num_speculative_tokens"),
    (["run", "--workload", "poisson", "--out", "{tmp}/file/r", *URL], "--out"),
    (["run", "--workload", "nope", "--out", "{tmp}/r", *URL], "workload"),
    (["run", "--workload", "poisson", "--out", "{tmp}/r", "--url", "http://10.0.0.1:8000"], "--url"),
])
def test_bad_input_is_one_line_naming_the_field(argv, field, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    try:
        code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {field}: "), lines
