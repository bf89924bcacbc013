"""`python -m calibration list`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from calibration.cmd_list import main


def test_lists_sources_and_calibration(capsys):
    assert main(["--hardware", "h100", "l40s", "--model", "r1-distill-qwen-7b", "--tp", "1", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out if line.startswith(("h100", "l40s"))]
    assert [(r[0], r[2], r[3], r[4]) for r in rows] == [
        ("h100", "1", "aiconfigurator", "yes"), ("h100", "2", "aiconfigurator", "yes"),
        ("l40s", "1", "roofline", "NO"), ("l40s", "2", "roofline", "NO")]
    h100_opts = rows[0][5].split(",")
    assert {"none", "fp8_weights", "fp8_kv", "spec_ngram"} <= set(h100_opts)
    assert "int8_weights" not in h100_opts
    assert int(rows[1][6]) > int(rows[0][6])  # tp=2 leaves more KV per GPU
    assert "vLLM 0.19.0" in out[1]


def test_failures_with_reasons_and_csv(capsys):
    assert main(["--hardware", "h100", "--model", "r1-distill-llama-70b", "--optimization", "none",
                 "--tp", "1", "--all", "--csv"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "hardware,model,tp,source,calibrated,optimizations,kv_blocks,extrapolated,built_from"
    assert "unavailable: tp: r1-distill-llama-70b does not fit on h100 at tp=1" in out


def test_bad_name_is_a_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "calibration", "list", "--hardware", "tpu"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: hardware: unknown hardware 'tpu'; allowed: "
                                   "a100, b200, h100, h200, l40s, rtxpro6000")


@pytest.mark.parametrize("argv, expected", [
    (["--tp", "0"], "error: --tp: a positive integer, got '0'"),
    (["--tp", "-1"], "error: --tp: a positive integer, got '-1'"),
    (["--tp", "two"], "error: --tp: a positive integer, got 'two'"),
    (["--tp"], "error: --tp: expected at least one argument"),
    (["--source", "magic"], "error: --source: invalid choice: 'magic'"),
    (["--bogus"], "error: arguments: unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line_errors_naming_the_option(argv, expected):
    proc = subprocess.run([sys.executable, "-m", "calibration", "list", *argv],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(expected) and proc.stderr.count("\n") == 1, proc.stderr
