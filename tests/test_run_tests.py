"""scripts/run_tests.sh: the suite in two passes (without the real engine in parallel, then the
``engine`` tests one by one), run on small test files of known outcome."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "run_tests.sh"

MODULE = """
import pytest

def test_plain_one():
    assert {plain_ok}

def test_plain_two():
    pass

@pytest.mark.engine
def test_with_the_engine():
    assert {engine_ok}
"""


def _run(tmp_path: Path, plain_ok: bool, engine_ok: bool, *args: str) -> subprocess.CompletedProcess:
    test_file = tmp_path / "test_sample.py"
    test_file.write_text(MODULE.format(plain_ok=plain_ok, engine_ok=engine_ok))
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    engine: needs the real engine\n")
    # the engine venv is the interpreter running these tests (sys.prefix), wherever it lives
    env = {**os.environ, "RLLM_SIM_ENGINE_VENV": sys.prefix, "RLLM_SIM_TEST_WORKERS": "2"}
    return subprocess.run([str(SCRIPT), "-p", "no:cacheprovider", str(test_file), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def _summaries(done: subprocess.CompletedProcess) -> list[str]:
    """Each pass's closing line, e.g. "2 passed" or "1 failed, 2 deselected"."""
    return re.findall(r"^=+ (.+?) in [\d.]+s(?: \(.*\))? =+$", done.stdout, flags=re.MULTILINE)


@pytest.mark.slow
def test_both_passes_run_and_a_failure_in_either_fails_the_suite(tmp_path):
    done = _run(tmp_path, True, True)
    assert done.returncode == 0, done.stdout + done.stderr
    # pass 1: the plain tests, on two workers; pass 2: the engine test alone
    assert _summaries(done) == ["2 passed", "1 passed, 2 deselected"], done.stdout
    assert "created: 2/2 workers" in done.stdout

    first_fails = _run(tmp_path, False, True)
    assert first_fails.returncode == 1
    assert _summaries(first_fails) == ["1 failed, 1 passed", "1 passed, 2 deselected"]  # pass 2 still ran

    second_fails = _run(tmp_path, True, False)
    assert second_fails.returncode == 1
    assert _summaries(second_fails) == ["2 passed", "1 failed, 2 deselected"]


@pytest.mark.slow
def test_a_pass_with_nothing_selected_counts_only_when_the_other_ran_tests(tmp_path):
    done = _run(tmp_path, True, True, "-k", "plain")  # the engine pass selects nothing
    assert done.returncode == 0, done.stdout + done.stderr
    nothing = _run(tmp_path, True, True, "-k", "no_such_test")
    assert nothing.returncode == 5
    engine_fails = _run(tmp_path, True, False, "-k", "with_the_engine")  # pass 1 selects nothing
    assert engine_fails.returncode == 1


@pytest.mark.slow
def test_bad_arguments_stop_before_the_engine_pass(tmp_path):
    done = _run(tmp_path, True, True, "--no-such-option")
    assert done.returncode == 4  # pytest's usage error
    assert "pass 2 of 2" not in done.stderr and _summaries(done) == []
