"""Start and stop a vLLM OpenAI-compatible server on 127.0.0.1 for live runs.

The server is started from the engine environment's Python as
``python -m vllm.entrypoints.openai.api_server`` with flags derived from the
simulator's EngineConfig, so that the live engine and the simulated one run
the same scheduler settings. Things that matter on our CPU machines
(see ../shared/vllm-cpu.md):

- It stays in the client's session (never ``start_new_session``): a new
  session puts it in its own scheduling group and the client then stalls for
  seconds at a time. It gets its own process group inside that session, so a
  terminal Ctrl-C reaches the runner first and the runner decides the order
  (save results, then stop the server).
- ``VLLM_CPU_KVCACHE_SPACE`` is always set (unset, vLLM sizes the KV cache to
  most of RAM) and ``HF_HUB_OFFLINE=1`` (no model hub).
- ``--enable-logging-iteration-details`` logs one line per engine step: the
  per-step ground truth that ``iteration_log`` parses. Every output line is
  time-stamped on arrival with ``time.monotonic()``.
- It is stopped by its process id and the ids of its children, even on error.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from profiler.tiny_model import engine_dtype
from simulator.records.engine_config import EngineConfig
from simulator.records.errors import ConfigError, require

REPO_ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"


class ServerError(RuntimeError):
    """The server failed to start or died; the message quotes its log."""


@dataclass(frozen=True)
class ServerSpec:
    """How to launch one vLLM server.

    ``model`` is a local model folder. ``kv_cache_space_gib`` becomes
    ``VLLM_CPU_KVCACHE_SPACE`` (ignored by GPU builds, which use
    ``engine.gpu_memory_utilization``). ``port`` 0 picks a free port.
    ``pin_frontend``: once the server is up, its processes other than vLLM's
    worker, and the caller (the client) while it runs, are kept to the CPUs the
    worker leaves (vLLM's CPU build binds the worker to its cores and reserves
    the rest for the other processes, which Linux otherwise also runs on the
    worker's cores).
    """

    model: str
    engine: EngineConfig
    port: int = 0
    kv_cache_space_gib: int = 1
    enforce_eager: bool = True
    python: str | None = None
    seed: int = 0
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    startup_timeout_s: float = 240.0
    pin_frontend: bool = False

    def __post_init__(self) -> None:
        require(bool(self.model), "server.model", "must name a local model folder")
        require(0 <= self.port < 65536, "server.port", "must lie in [0, 65535]")
        require(self.kv_cache_space_gib >= 1, "server.kv_cache_space_gib", "must be >= 1 (GiB)")
        e = self.engine
        if e.num_gpu_blocks_override is not None:
            usable = (e.num_gpu_blocks_override - 1) * e.block_size
            require(
                usable >= e.max_model_len,
                "engine.num_gpu_blocks_override",
                f"{e.num_gpu_blocks_override} blocks of {e.block_size} tokens hold {usable} tokens "
                f"(one block is vLLM's null block); vLLM needs at least max_model_len="
                f"{e.max_model_len}: use >= {-(-e.max_model_len // e.block_size) + 1} blocks",
            )
        for arg in self.extra_args:
            require(
                not arg.startswith(("--host", "--port")),
                "server.extra_args",
                "must not set --host or --port (the server listens on 127.0.0.1 only)",
            )


def find_engine_python() -> str:
    """The Python of the engine environment (the one with vLLM).

    Order: ``$RLLM_SIM_ENGINE_PYTHON``, ``$RLLM_SIM_ENGINE_VENV/bin/python``,
    ``<repo>/.venv-engine/bin/python`` (made by scripts/setup_vllm_cpu.sh),
    then the running interpreter if it can import vllm.
    """
    explicit = os.environ.get("RLLM_SIM_ENGINE_PYTHON")
    if explicit:
        require(Path(explicit).exists(), "RLLM_SIM_ENGINE_PYTHON", f"no such file {explicit}")
        return explicit
    venv = os.environ.get("RLLM_SIM_ENGINE_VENV")
    for candidate in ([Path(venv) / "bin" / "python"] if venv else []) + [
        REPO_ROOT / ".venv-engine" / "bin" / "python"
    ]:
        if candidate.exists():
            return str(candidate)
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise ConfigError(
        "engine_python",
        "no vLLM engine environment found: run ./scripts/setup_vllm_cpu.sh "
        "or set RLLM_SIM_ENGINE_PYTHON to a Python that imports vllm",
    )


def resolve_model(model: str, python: str | None = None) -> str:
    """A local model folder for ``model``: a folder as is, or ``tiny-llama`` built on demand."""
    path = Path(model).expanduser()
    if path.is_dir():
        require((path / "config.json").exists(), "model", f"{path} has no config.json")
        return str(path.resolve())
    if model == "tiny-llama":
        code = "from profiler.tiny_model import ensure_tiny_model; print(ensure_tiny_model())"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
        done = subprocess.run([python or find_engine_python(), "-c", code], capture_output=True,
                              text=True, env=env, cwd=REPO_ROOT, check=False)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ConfigError("model", f"could not build tiny-llama: {tail}")
        return done.stdout.strip().splitlines()[-1]
    raise ConfigError("model", f"{model!r} is neither a local model folder nor 'tiny-llama'")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def engine_flags(engine: EngineConfig) -> list[str]:
    """vLLM command-line flags that make the server's scheduler match ``engine``."""
    flags = [
        "--block-size", str(engine.block_size),
        "--max-model-len", str(engine.max_model_len),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--max-num-batched-tokens", str(engine.max_num_batched_tokens),
        "--gpu-memory-utilization", str(engine.gpu_memory_utilization),
        "--enable-prefix-caching" if engine.enable_prefix_caching else "--no-enable-prefix-caching",
        "--enable-chunked-prefill" if engine.enable_chunked_prefill else "--no-enable-chunked-prefill",
    ]
    if engine.num_gpu_blocks_override is not None:
        flags += ["--num-gpu-blocks-override", str(engine.num_gpu_blocks_override)]
    if engine.long_prefill_token_threshold:
        flags += ["--long-prefill-token-threshold", str(engine.long_prefill_token_threshold)]
    if engine.kv_cache_dtype not in ("auto", ""):
        flags += ["--kv-cache-dtype", engine.kv_cache_dtype]
    spec = engine.speculative
    if spec.enabled:
        config = {"method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens}
        if spec.method == "ngram":
            config.update(prompt_lookup_max=4, prompt_lookup_min=2)
        flags += ["--speculative-config", json.dumps(config)]
    return flags


def server_command(spec: ServerSpec, port: int, python: str) -> list[str]:
    """The full command line of the server."""
    cmd = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", spec.model,
        "--host", LOOPBACK,
        "--port", str(port),
        "--seed", str(spec.seed),
        "--enable-logging-iteration-details",
        *engine_flags(spec.engine),
    ]
    if spec.enforce_eager:
        cmd.append("--enforce-eager")
    dtype = engine_dtype(spec.model)
    if dtype and "--dtype" not in spec.extra_args:
        cmd += ["--dtype", dtype]
    return cmd + list(spec.extra_args)


def server_env(spec: ServerSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: offline, bounded KV space, unbuffered output."""
    env = dict(os.environ if base is None else base)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=str(spec.kv_cache_space_gib),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PYTHONUNBUFFERED="1",
        # the per-step ground truth and the KV size are INFO lines: never inherit a quieter level
        VLLM_LOGGING_LEVEL="INFO",
    )
    env.update(dict(spec.extra_env))
    return env


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields_after_name = raw.rsplit(")", 1)[1].split()
    if fields_after_name[0] == "Z":
        return None
    return int(fields_after_name[1]), int(fields_after_name[19])


def descendants(pid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of ``pid``, read from /proc."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


#: vLLM's title for the process that runs the model (vllm.v1.executor.multiproc_executor)
WORKER_TITLE = b"VLLM::Worker"


def _is_worker(pid: int) -> bool:
    try:
        return WORKER_TITLE in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def pin_frontend(pid: int) -> set[int] | None:
    """Keep every process of the server ``pid`` but vLLM's worker (each of their threads) to the
    CPUs the worker is not bound to; those CPUs, or None (nothing pinned) when no worker is
    found or it holds every CPU the server may use."""
    processes = [pid] + [p for p, _ in descendants(pid)]
    workers = [p for p in processes if _is_worker(p)]
    if not workers:
        return None
    bound: set[int] = set()
    for worker in workers:
        with contextlib.suppress(OSError):
            bound |= os.sched_getaffinity(worker)
    reserved = os.sched_getaffinity(pid) - bound
    if not reserved:
        return None
    for process in processes:
        if process in workers:
            continue
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{process}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), reserved)
    return reserved


#: Runs first in the server's process: asks Linux to SIGTERM it if the runner dies
#: without stopping it (PR_SET_PDEATHSIG survives exec), then becomes the server.
PARENT_DEATH_WRAPPER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "except Exception:\n"
    "    pass\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


@dataclass
class LogLine:
    """One line of server output and when (time.monotonic()) the runner read it."""

    t: float
    text: str


@dataclass
class VllmServer:
    """A running vLLM server; use as a context manager or call start()/stop()."""

    spec: ServerSpec
    log_path: Path
    on_line: Callable[[LogLine], None] | None = None
    port: int = 0
    python: str = ""
    process: subprocess.Popen | None = None
    command: list[str] = field(default_factory=list)
    started_s: float = 0.0
    ready_s: float = 0.0
    _tail: deque = field(default_factory=lambda: deque(maxlen=400))
    _reader: threading.Thread | None = None
    _known_children: dict[int, int] = field(default_factory=dict)
    #: the CPUs the server's other processes and the caller were kept to (``ServerSpec.pin_frontend``)
    reserved_cpus: set[int] | None = None
    _caller_affinity: set[int] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # --- lifecycle ------------------------------------------------------------
    def start(self) -> VllmServer:
        """Launch the server and block until /health answers (or raise ServerError)."""
        self.python = self.spec.python or find_engine_python()
        self.port = self.spec.port or free_port()
        self.command = server_command(self.spec, self.port, self.python)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.started_s = time.monotonic()
        self.process = subprocess.Popen(
            [self.python, "-c", PARENT_DEATH_WRAPPER, *self.command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=server_env(self.spec),
            cwd=str(REPO_ROOT),
            process_group=0,  # own group, same session (never start_new_session)
        )
        self._reader = threading.Thread(target=self._read_output, name="vllm-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic()
        if self.spec.pin_frontend:
            self.reserved_cpus = pin_frontend(self.process.pid)
            if self.reserved_cpus:
                self._caller_affinity = os.sched_getaffinity(0)
                os.sched_setaffinity(0, self.reserved_cpus)
        return self

    def _read_output(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with open(self.log_path, "w", encoding="utf-8") as log:
            for raw in iter(self.process.stdout.readline, b""):
                line = LogLine(time.monotonic(), raw.decode("utf-8", "replace").rstrip("\n"))
                log.write(line.text + "\n")
                log.flush()
                self._tail.append(line.text)
                if self.on_line is not None:
                    with contextlib.suppress(Exception):
                        self.on_line(line)

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.spec.startup_timeout_s
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                raise ServerError(f"vLLM server exited with code {code} during start-up: "
                                  f"{self.failure_reason()}  (log: {self.log_path})")
            self._remember_children()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.5)
        raise ServerError(f"vLLM server not ready after {self.spec.startup_timeout_s:.0f} s "
                          f"(log: {self.log_path})")

    def exit_code(self) -> int | None:
        """The server's exit code, or None while it runs."""
        return None if self.process is None else self.process.poll()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def failure_reason(self) -> str:
        """The most telling line of the log tail (the last error), for messages."""
        lines = [t for t in self._tail if t.strip()]
        for text in reversed(lines):
            if "Error:" in text or "error:" in text:
                return text.split("] ", 1)[-1].strip()[:400]
        return lines[-1].strip()[:400] if lines else "no output"

    def log_tail(self, n: int = 30) -> list[str]:
        return list(self._tail)[-n:]

    def _remember_children(self) -> None:
        if self.process is not None:
            for pid, start in descendants(self.process.pid):
                self._known_children[pid] = start

    def stop(self, grace_s: float = 15.0) -> int | None:
        """Stop the server and its children by pid: SIGTERM, then SIGKILL after ``grace_s``."""
        proc = self.process
        if proc is None:
            return None
        self._remember_children()
        targets = [(proc.pid, None)] + list(self._known_children.items())
        for pid, start in targets:
            self._signal(pid, start, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(self._alive(p, s) for p, s in targets):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.2)
        for pid, start in targets:
            if self._alive(pid, start):
                self._signal(pid, start, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._caller_affinity is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self._caller_affinity)
            self._caller_affinity = None
        return proc.returncode

    def _alive(self, pid: int, start: int | None) -> bool:
        if self.process is not None and pid == self.process.pid:
            return self.process.poll() is None
        stat = _stat(pid)
        return stat is not None and (start is None or stat[1] == start)

    def _signal(self, pid: int, start: int | None, sig: signal.Signals) -> None:
        if self._alive(pid, start):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
