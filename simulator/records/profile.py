"""The Profile record: what the profiler measured on a real vLLM engine.

A profile is a directory (see docs/profile-format.md):

- ``steps.parquet``: one row per engine step, with its batch composition as the
  scheduler built it and its wall time (columns in ``STEP_COLUMNS``);
- ``profile.json``: metadata: hardware, versions, the model's architecture,
  the optimization and every engine setting, KV capacity, memory, the grid and
  the status of every grid point, and per-optimization summaries.

The profiler writes it, calibration fits step-time models to it, the simulator
reads KV capacity and memory from it. ``Profile.load`` validates both files and
raises ConfigError naming what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulator.records.errors import ConfigError
from simulator.records.model_arch import ModelArchitecture
from simulator.records.performance import KVCapacity, StepBatch

FORMAT_NAME = "rllm-sim-profile"
FORMAT_VERSION = 1
STEPS_FILE = "steps.parquet"
META_FILE = "profile.json"

#: column -> (kind, meaning). Kinds: "str", "int", "float", "bool", "list" (list of ints).
STEP_COLUMNS: dict[str, tuple[str, str]] = {
    "point_id": ("str", "grid point the step belongs to, e.g. 'prefill/chunk512/context4096'"),
    "phase": ("str", "prefill | decode | mixed | prefix | spec | fill | warmup | shape_cold | shape_warm"),
    "rep": ("int", "repeat index at the point; -1 for fill and warm-up steps"),
    "step": ("int", "engine step number within the run"),
    "wall_s": ("float", "wall time of one LLMEngine.step(): schedule, forward, sample, outputs"),
    "cpu_s": ("float", "CPU time of the profiler process during the step"),
    "prefill_tokens": ("list", "new prompt tokens computed, per prefilling request"),
    "prefill_context": ("list", "tokens already in the KV cache, per prefilling request"),
    "prefill_cached": ("list", "of prefill_context, tokens found in the prefix cache this step"),
    "decode_context": ("list", "KV length attended over (incl. the new token), per decoding request"),
    "decode_spec_tokens": ("list", "draft tokens verified, per decoding request"),
    "decode_accepted_tokens": ("list", "draft tokens accepted, per decoding request"),
    "num_prefill_tokens": ("int", "sum of prefill_tokens"),
    "num_decode_seqs": ("int", "number of decoding requests"),
    "num_spec_tokens": ("int", "sum of decode_spec_tokens"),
    "num_tokens": ("int", "all tokens the engine scheduled this step"),
    "kv_blocks_used": ("int", "KV blocks in use after scheduling"),
    "kv_usage": ("float", "kv_blocks_used / num_gpu_blocks"),
    "num_preempted": ("int", "requests preempted while scheduling this step"),
    "draft_s": ("float", "time spent proposing draft tokens during the step"),
    "rss_bytes": ("int", "resident memory of the profiler process after the step"),
    "disturbed": ("bool", "another process took the engine's core during the step (CPU, one bound "
                          "thread: wall_s > 1.25 x cpu_s + 1 ms); fits leave such steps out"),
}
LIST_COLUMNS = tuple(c for c, (kind, _) in STEP_COLUMNS.items() if kind == "list")
#: phases whose steps are measurements (warm-up steps are not)
MEASURED_PHASES = ("prefill", "decode", "mixed", "prefix", "spec", "fill")
#: prefills of a token count the engine meets first (cold) and again (warm): the engine's per-shape
#: set-up cost (calibration.fit.shape_cache_cost), not step-law measurements
SHAPE_PHASES = ("shape_cold", "shape_warm")


def point_of(point_id: str) -> str:
    """A step's grid point without the round it was measured in (``decode/batch4/context1024``
    for ``decode/batch4/context1024/window1``, ``grid.decode_windows``): a held-out split keeps
    a point's rounds together."""
    head, _, last = point_id.rpartition("/")
    return head if head and last.startswith("window") and last[6:].isdigit() else point_id


REQUIRED_META = ("format", "format_version", "hardware", "versions", "model", "optimization",
                 "engine", "kv", "memory", "grid", "points")
REQUIRED_KV = ("block_size", "num_gpu_blocks", "bytes_per_token")


def empty_steps() -> pd.DataFrame:
    """A steps table with every column and no rows."""
    return steps_frame([])


def steps_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Build a steps table from row dicts (one per step), with the documented dtypes."""
    data: dict[str, Any] = {}
    for column, (kind, _) in STEP_COLUMNS.items():
        values = [row[column] for row in rows]
        if kind == "list":
            data[column] = pd.Series([list(map(int, v)) for v in values], dtype=object)
        elif kind == "int":
            data[column] = pd.Series(values, dtype="int64")
        elif kind == "float":
            data[column] = pd.Series(values, dtype="float64")
        elif kind == "bool":
            data[column] = pd.Series(values, dtype="bool")
        else:
            data[column] = pd.Series(values, dtype=object).astype(str)
    return pd.DataFrame(data)


def write_steps(frame: pd.DataFrame, path: str | Path) -> None:
    """Write a steps table as Parquet (list columns as list<int64>)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, names = [], []
    for column, (kind, _) in STEP_COLUMNS.items():
        values = frame[column].tolist() if column in frame else []
        typ = {"list": pa.list_(pa.int64()), "int": pa.int64(), "float": pa.float64(),
               "bool": pa.bool_(), "str": pa.string()}[kind]
        if kind == "list":
            values = [[int(x) for x in v] for v in values]
        arrays.append(pa.array(values, type=typ))
        names.append(column)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.table(arrays, names=names), tmp)
    tmp.replace(path)


def read_steps(path: str | Path) -> pd.DataFrame:
    """Read and validate a steps table."""
    path = Path(path)
    if not path.exists():
        raise ConfigError("profile", f"no steps table {path}")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError("profile", f"{path} is not a readable steps table: {first}") from None
    validate_steps(frame, str(path))
    for column in LIST_COLUMNS:
        frame[column] = [list(map(int, v)) for v in frame[column]]
    return frame


def validate_steps(frame: pd.DataFrame, where: str = "steps") -> None:
    """Check columns, dtypes and the per-row invariants; ConfigError names the first problem."""
    missing = [c for c in STEP_COLUMNS if c not in frame.columns]
    if missing:
        raise ConfigError("profile", f"{where} lacks columns {missing}")
    for column, (kind, _) in STEP_COLUMNS.items():
        series = frame[column]
        if kind in ("int", "float", "bool") and not (pd.api.types.is_numeric_dtype(series)
                                                     or pd.api.types.is_bool_dtype(series)):
            raise ConfigError("profile", f"{where}: column {column!r} must be numeric")
    if len(frame) == 0:
        return
    if not np.all(np.isfinite(frame["wall_s"].to_numpy(float))) or (frame["wall_s"] <= 0).any():
        raise ConfigError("profile", f"{where}: column 'wall_s' must be finite and > 0")
    bad_phase = set(frame["phase"]) - set(MEASURED_PHASES) - set(SHAPE_PHASES) - {"warmup"}
    if bad_phase:
        raise ConfigError("profile", f"{where}: unknown phases {sorted(bad_phase)}; allowed: "
                          f"{list(MEASURED_PHASES) + ['warmup', *SHAPE_PHASES]}")
    lengths = {c: frame[c].map(len).to_numpy() for c in LIST_COLUMNS}
    for a, b in (("prefill_tokens", "prefill_context"), ("prefill_tokens", "prefill_cached"),
                 ("decode_context", "decode_spec_tokens"),
                 ("decode_context", "decode_accepted_tokens")):
        if not np.array_equal(lengths[a], lengths[b]):
            raise ConfigError("profile", f"{where}: columns {a!r} and {b!r} differ in length")
    sums = frame["prefill_tokens"].map(sum).to_numpy()
    if not np.array_equal(sums, frame["num_prefill_tokens"].to_numpy()):
        raise ConfigError("profile", f"{where}: num_prefill_tokens != sum(prefill_tokens)")
    if not np.array_equal(lengths["decode_context"], frame["num_decode_seqs"].to_numpy()):
        raise ConfigError("profile", f"{where}: num_decode_seqs != len(decode_context)")


def validate_meta(meta: dict[str, Any], where: str = "profile.json") -> None:
    """Check the metadata has what readers rely on."""
    if not isinstance(meta, dict):
        raise ConfigError("profile", f"{where} is not an rllm-sim profile (a JSON {type(meta).__name__})")
    if meta.get("format") != FORMAT_NAME:
        raise ConfigError("profile", f"{where} is not an rllm-sim profile (format={meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ConfigError("profile", f"{where} has format_version {meta['format_version']}; "
                          f"this rllm-sim reads up to {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ConfigError("profile", f"{where} lacks keys {missing}")
    kv_missing = [k for k in REQUIRED_KV if k not in meta["kv"]]
    if kv_missing:
        raise ConfigError("profile", f"{where}: kv lacks {kv_missing}")
    if "architecture" not in meta["model"]:
        raise ConfigError("profile", f"{where}: model lacks 'architecture'")


#: EngineConfig fields a profile sets (as the profiled engine resolved them)
ENGINE_SETTING_KEYS = ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                       "enable_prefix_caching", "enable_chunked_prefill", "long_prefill_token_threshold")


def engine_settings(meta: dict[str, Any]) -> dict[str, Any]:
    """The profiled engine's scheduler settings, under EngineConfig's names: what a simulation
    of this profile runs by default. ``async_scheduling`` is the served engine's (the serving
    phase reads it from the server), else False on CPU (vLLM's CPU platform turns it off),
    else null (vLLM's rule). The KV capacity is the profile's own (``kv``)."""
    resolved = (meta.get("engine") or {}).get("resolved") or {}
    out = {k: resolved[k] for k in ENGINE_SETTING_KEYS if resolved.get(k) is not None}
    if "block_size" not in out and meta.get("kv", {}).get("block_size"):
        out["block_size"] = int(meta["kv"]["block_size"])
    served = (meta.get("serving") or {}).get("async_scheduling")
    if served is not None:
        out["async_scheduling"] = bool(served)
    elif (meta.get("hardware") or {}).get("kind") == "cpu":
        out["async_scheduling"] = False
    return out


def batch_of(row: Any) -> StepBatch:
    """The StepBatch of one steps-table row (a dict or a pandas row)."""
    spec = [int(x) for x in row["decode_spec_tokens"]]
    return StepBatch(
        prefill_tokens=[int(x) for x in row["prefill_tokens"]],
        prefill_context=[int(x) for x in row["prefill_context"]],
        decode_context=[int(x) for x in row["decode_context"]],
        decode_spec_tokens=spec if any(spec) else [],
    )


@dataclass
class ProfileMeta:
    """profile.json: the profile's metadata (docs/profile-format.md gives every key's contents).

    The sections every reader relies on are fields; the others (``created``, ``machine``,
    ``summary``, ``run``, and any later ones) are in ``extra``. ``order`` keeps the file's key
    order, so that a profile read and saved again is byte-identical. Reads like the dictionary
    it replaces (``meta["kv"]``, ``meta.get("created")``).
    """

    format: str  # FORMAT_NAME
    format_version: int  # readers refuse newer versions than FORMAT_VERSION
    hardware: dict[str, Any]  # kind, name, vendor, count, slug, memory_total_bytes, details, ...
    versions: dict[str, Any]  # vllm, vllm_distribution, torch, transformers, python, rllm_sim, ...
    model: dict[str, Any]  # name, source, architecture (a ModelArchitecture as a dict)
    optimization: dict[str, Any]  # name, engine_args, phases
    engine: dict[str, Any]  # llm_kwargs, resolved (the settings vLLM used), env
    kv: dict[str, Any]  # block_size, num_gpu_blocks, num_tokens, bytes_per_token, ...
    memory: dict[str, Any]  # weights_bytes, kv_cache_bytes, activation_peak_bytes, ...
    grid: dict[str, Any]  # the grid's parameters and the points left out
    points: list[dict[str, Any]]  # every grid point in measuring order, with its status
    extra: dict[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "profile.json") -> ProfileMeta:
        """Validated (``validate_meta``) metadata, from profile.json's content."""
        validate_meta(data, where)
        known = {k: data[k] for k in REQUIRED_META}
        return cls(**known, extra={k: v for k, v in data.items() if k not in REQUIRED_META},
                   order=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        """profile.json's content, in the order read (new keys after)."""
        values = {k: getattr(self, k) for k in REQUIRED_META} | self.extra
        keys = [k for k in self.order if k in values] + [k for k in values if k not in self.order]
        return {k: values[k] for k in keys}

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key) if key in REQUIRED_META else self.extra[key]

    def __setitem__(self, key: str, value: Any) -> None:
        """Set a section (a field, or one of ``extra``: e.g. the profiler's ``serving``)."""
        if key in REQUIRED_META:
            setattr(self, key, value)
        else:
            self.extra[key] = value

    def __contains__(self, key: object) -> bool:
        return key in REQUIRED_META or key in self.extra

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        return default

    def keys(self) -> list[str]:
        return list(self.to_dict())


@dataclass(frozen=True, eq=False)
class Profile:
    """A profile: the steps table and its metadata (see the module docstring)."""

    meta: ProfileMeta  # a profile.json-like dict is validated and converted
    steps: pd.DataFrame
    path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.meta, ProfileMeta):
            object.__setattr__(self, "meta", ProfileMeta.from_dict(self.meta))
        validate_steps(self.steps)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile directory (or its profile.json)."""
        path = Path(path)
        folder = path.parent if path.name == META_FILE else path
        meta_path = folder / META_FILE
        if not meta_path.exists():
            raise ConfigError("profile", f"no profile at {folder} (missing {META_FILE})")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as err:  # not JSON, or not text at all
            raise ConfigError("profile", f"{meta_path} is not valid JSON: {err}") from None
        return cls(meta=ProfileMeta.from_dict(meta, str(meta_path)), steps=read_steps(folder / STEPS_FILE),
                   path=folder)

    def save(self, folder: str | Path) -> Path:
        """Write steps.parquet and profile.json into folder (atomically, file by file)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_steps(self.steps, folder / STEPS_FILE)
        tmp = folder / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(self.meta.to_dict(), indent=2, sort_keys=False, default=_json_default) + "\n")
        tmp.replace(folder / META_FILE)
        return folder

    # --- typed views -------------------------------------------------------
    @property
    def name(self) -> str:
        """hardware/model/optimization, the profile's identity."""
        return f"{self.hardware_slug}/{self.model_name}/{self.optimization}"

    @property
    def hardware_slug(self) -> str:
        return str(self.meta.hardware.get("slug", "unknown"))

    @property
    def model_name(self) -> str:
        return str(self.meta.model.get("name", "model"))

    @property
    def optimization(self) -> str:
        return str(self.meta.optimization.get("name", "none"))

    @property
    def architecture(self) -> ModelArchitecture:
        return ModelArchitecture.from_dict(self.meta.model["architecture"])

    @property
    def kv_capacity(self) -> KVCapacity:
        kv = self.meta.kv
        return KVCapacity(num_blocks=int(kv["num_gpu_blocks"]), block_size=int(kv["block_size"]),
                          bytes_per_token=int(kv["bytes_per_token"]))

    def measured_steps(self) -> pd.DataFrame:
        """Rows that are measurements (warm-up steps and steps with no work left out)."""
        steps = self.steps
        keep = steps["phase"].isin(MEASURED_PHASES) & (steps["num_tokens"] > 0)
        return steps[keep].reset_index(drop=True)

    def batches(self, frame: pd.DataFrame | None = None) -> list[StepBatch]:
        """StepBatch of every row of frame (default: the measured steps)."""
        frame = self.measured_steps() if frame is None else frame
        return [batch_of(row) for _, row in frame.iterrows()]


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
