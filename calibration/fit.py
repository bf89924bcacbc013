"""A step-time model fitted to a profile: seven physical terms, non-negative least squares.

    step_time = overhead
              + per_prefill_token   x  sum(prefill_tokens)
              + per_attention_pair  x  sum(q * (c + (q + 1) / 2))   (prefill chunk q over context c)
              + decode_step         x  [the step decodes at all]
              + per_decode_seq      x  max(0, decoding requests - decode_knee)
              + per_decode_kv_token x  sum(decode_context)           (KV tokens read by decodes)
              + per_spec_token      x  sum(decode_spec_tokens)       (speculative verify)

Every coefficient is a time (seconds per unit) and must be >= 0, so the fit is
a non-negative least squares (scipy.optimize.nnls) on relative errors (each
row divided by its measured time), which is what the reported absolute
percentage errors measure. Grid points (all steps of one point together) are
split into a training and a held-out set; the saved model is the one fitted on
the training set, and its report gives the held-out median and p90 APE.

The decode terms are a roofline knee: a decode batch of up to ``decode_knee``
requests costs about the same as one (the layers' weights are read once
whatever the batch; on the shipped CPU profiles batches of 1 and 4 take the
same time), and each request beyond it adds ``per_decode_seq`` (its GEMM row,
LM-head row and sampling). The knee is chosen from DECODE_KNEES by the
training error; a knee of 0 is the plain linear law.

KV capacity, bytes per token and memory come from the profile, not from the fit.

A CPU profile's ``shape_cold`` / ``shape_warm`` steps (the profiler's shapes phase) are not
step-law rows: they give the engine's per-shape set-up cost (``shape_cache_cost``).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from simulator.records.errors import ConfigError
from simulator.records.model_arch import ModelArchitecture
from simulator.records.performance import (
    KVCapacity,
    MemoryBreakdown,
    PerformanceModel,
    ShapeCacheCost,
    StepBatch,
    keeps_shape_cache,
)
from simulator.records.profile import META_FILE, SHAPE_PHASES, Profile, engine_settings, point_of

FIT_FILE = "fit.json"
FIT_FORMAT = "rllm-sim-fitted-step-model"
FIT_FORMAT_VERSION = 2
TERMS = ("overhead", "per_prefill_token", "per_attention_pair", "decode_step", "per_decode_seq",
         "per_decode_kv_token", "per_spec_token")
#: terms a fit.json of format version 1 lacks (read as 0: that version's model)
NEW_TERMS = ("decode_step",)
#: knees tried (requests a decode batch holds at the cost of one); a larger one must lower the
#: training error by KNEE_GAIN (relative) to be chosen, so that noise does not pick it
DECODE_KNEES = (0, 1, 2, 4, 8, 16, 32)
KNEE_GAIN = 0.02
TERM_MEANING = {
    "overhead": "seconds per step (scheduling, launch, sampling set-up)",
    "per_prefill_token": "seconds per prefill token (GEMMs, norms, KV writes)",
    "per_attention_pair": "seconds per (query token, key token) pair of prefill attention",
    "decode_step": "seconds per step that decodes (weights read once for a small decode batch)",
    "per_decode_seq": "seconds per decoding request beyond decode_knee (GEMM row, LM head, sampler)",
    "per_decode_kv_token": "seconds per KV token a decoding request attends over",
    "per_spec_token": "seconds per speculative draft token verified",
}
#: token counts whose oneDNN primitives vLLM's CPU linear layers keep (create_onednn_mm(weight, 32)
#: in vllm/model_executor/layers/utils.py, primitive_cache_size)
ONEDNN_PRIMITIVE_CACHE = 32
#: phases whose grid points repeat one batch composition in every step (and round): a point's
#: median step stands for the point (``held_out_points_by_phase``)
POINT_PHASES = ("prefill", "decode")
#: rows further than this many median absolute relative residuals from the first fit are
#: treated as disturbed measurements (another process took the core) and refitted without
OUTLIER_MADS = 4.0


def features(frame: pd.DataFrame, decode_knee: int = 0) -> np.ndarray:
    """The terms' quantities per step (columns in TERMS order)."""
    n = len(frame)
    x = np.zeros((n, len(TERMS)))
    x[:, 0] = 1.0
    for i, (tokens, context, dctx, spec) in enumerate(zip(
            frame["prefill_tokens"], frame["prefill_context"], frame["decode_context"],
            frame["decode_spec_tokens"], strict=True)):
        q = np.asarray(tokens, dtype=np.float64)
        c = np.asarray(context, dtype=np.float64)
        x[i, 1] = q.sum()
        x[i, 2] = float(np.sum(q * (c + (q + 1.0) / 2.0)))
        x[i, 3] = 1.0 if len(dctx) else 0.0
        x[i, 4] = max(0, len(dctx) - decode_knee)
        x[i, 5] = float(np.sum(dctx))
        x[i, 6] = float(np.sum(spec))
    return x


def batch_features(batch: StepBatch, decode_knee: int = 0) -> tuple[float, float, float, float, float, float]:
    """(prefill tokens, attention pairs, decodes at all, decode seqs beyond the knee, decode KV tokens,
    spec tokens) of a StepBatch."""
    prefill = 0.0
    pairs = 0.0
    for q, c in zip(batch.prefill_tokens, batch.prefill_context, strict=False):
        prefill += q
        pairs += q * (c + (q + 1) / 2)
    seqs = len(batch.decode_context)
    return prefill, pairs, 1.0 if seqs else 0.0, float(max(0, seqs - decode_knee)), \
        float(sum(batch.decode_context)), float(sum(batch.decode_spec_tokens))


def nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative coefficients minimising the sum of squared relative errors."""
    from scipy.optimize import nnls

    a = x / y[:, None]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(a / scale, np.ones(len(y)), maxiter=50 * x.shape[1])
    return coef / scale


def ape(predicted: np.ndarray, measured: np.ndarray) -> np.ndarray:
    return np.abs(predicted - measured) / measured


def _stats(errors: np.ndarray) -> dict[str, float | int | None]:
    if len(errors) == 0:
        return {"n": 0, "median_ape": None, "p90_ape": None, "mean_ape": None}
    return {"n": int(len(errors)), "median_ape": float(np.median(errors)),
            "p90_ape": float(np.quantile(errors, 0.9)), "mean_ape": float(np.mean(errors))}


def point_errors(predicted: np.ndarray, measured: np.ndarray, frame: pd.DataFrame,
                 rows: np.ndarray) -> dict[str, dict[str, float | int | None]]:
    """Per phase of POINT_PHASES, the APE of each grid point's median step (over its repeats and
    rounds, ``rows`` only) against the model's: what the model misses once the moments a step was
    measured in are averaged out (a step's own APE counts both)."""
    steps = pd.DataFrame({"phase": frame["phase"].to_numpy(), "point": [point_of(p) for p in frame["point_id"]],
                          "predicted": predicted, "measured": measured})
    steps = steps[rows & steps["phase"].isin(POINT_PHASES).to_numpy()]
    medians = steps.groupby(["phase", "point"])[["predicted", "measured"]].median()
    return {phase: _stats(ape(group["predicted"].to_numpy(), group["measured"].to_numpy()))
            for phase, group in medians.groupby(level="phase")}


def split_groups(frame: pd.DataFrame, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out rows: whole grid points (every round of one), and single steps of
    the mixed workload."""
    points = np.array([point_of(p) for p in frame["point_id"]], dtype=object)
    groups = np.where(frame["phase"].to_numpy() == "mixed", "mixed#" + frame["step"].astype(str).to_numpy(), points)
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(unique, size=max(1, int(round(test_fraction * len(unique)))), replace=False))
    return np.array([g in held for g in groups])


@dataclass(frozen=True)
class FitResult:
    coefficients: dict[str, float]
    report: dict[str, Any]
    decode_knee: int = 0


def _robust_fit(x: np.ndarray, y: np.ndarray, used: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(coefficients, inlier rows, their mean APE): a fit on ``used``, refitted without outliers."""
    coef = nnls_relative(x[used], y[used])
    residual = (x[used] @ coef - y[used]) / y[used]
    mad = float(np.median(np.abs(residual - np.median(residual)))) or 1e-9
    inliers = used[np.abs(residual - np.median(residual)) <= OUTLIER_MADS * 1.4826 * mad]
    if len(inliers) >= len(TERMS) + 2 and len(inliers) < len(used):
        coef = nnls_relative(x[inliers], y[inliers])
    else:
        inliers = used
    return coef, inliers, float(np.mean(ape(x[inliers] @ coef, y[inliers])))


def fit_steps(frame: pd.DataFrame, test_fraction: float = 0.25, seed: int = 0) -> FitResult:
    """Fit the terms (and the decode knee) to a steps table (measured steps only); report held-out errors."""
    frame = frame[~frame["phase"].isin(SHAPE_PHASES)].reset_index(drop=True)
    if len(frame) < len(TERMS) + 2:
        raise ConfigError("profile", f"has {len(frame)} measured steps; a fit needs at least {len(TERMS) + 2}")
    if not 0 < test_fraction < 1:
        raise ConfigError("test_fraction", f"must lie in (0, 1), got {test_fraction}")
    y = frame["wall_s"].to_numpy(dtype=np.float64)
    held = split_groups(frame, test_fraction, seed)
    disturbed = frame["disturbed"].to_numpy(dtype=bool) if "disturbed" in frame else np.zeros(len(frame), bool)
    fallback = int(np.sum(~held & ~disturbed)) < max(len(TERMS) + 2, int(0.2 * np.sum(~held)))
    if fallback:  # the machine was busy throughout: fit what there is, and say so in the report
        disturbed = np.zeros(len(frame), bool)
    train = ~held & ~disturbed
    used = np.flatnonzero(train)
    best = None
    for knee in DECODE_KNEES:  # ascending: a larger knee must earn its place
        x_k = features(frame, knee)
        coef_k, inliers_k, error = _robust_fit(x_k, y, used)
        if best is None or error < (1 - KNEE_GAIN) * best[0]:
            best = (error, knee, x_k, coef_k, inliers_k)
    _, knee, x, coef, inliers = best
    predicted = x @ coef
    errors = ape(predicted, y)
    phases = frame["phase"].to_numpy()
    test = held & ~disturbed
    report = {
        "test_fraction": test_fraction,
        "seed": seed,
        "held_out": _stats(errors[test]),
        "held_out_including_disturbed": _stats(errors[held]),
        "train": _stats(errors[train]),
        "disturbed_steps": int(frame["disturbed"].sum()) if "disturbed" in frame else 0,
        "disturbed_steps_used": fallback,
        "train_outliers_dropped": int(len(used) - len(inliers)) if len(inliers) < len(used) else 0,
        "held_out_by_phase": {p: _stats(errors[test & (phases == p)]) for p in sorted(set(phases[test]))},
        "held_out_points_by_phase": point_errors(predicted, y, frame, test),
        "decode_knee": knee,
        "terms": TERM_MEANING,
    }
    return FitResult(coefficients=dict(zip(TERMS, map(float, coef), strict=True)), report=report,
                     decode_knee=knee)


def _misses_in_steps(steps: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(token counts, miss seconds) of a steps table's cold shape steps: each minus the warm median of its count."""
    rows = steps[steps["phase"].isin(SHAPE_PHASES) & ~steps["disturbed"].astype(bool)]
    warm = rows[rows["phase"] == "shape_warm"].groupby("num_tokens")["wall_s"].median()
    cold = rows[(rows["phase"] == "shape_cold") & rows["num_tokens"].isin(warm.index)]
    tokens = cold["num_tokens"].to_numpy(dtype=np.float64)
    return tokens, cold["wall_s"].to_numpy(dtype=np.float64) - warm.loc[cold["num_tokens"]].to_numpy(dtype=np.float64)


def _misses_in_probes(probe_sets: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token counts, miss seconds) of a serving phase's shape probes: cold minus warm TTFT."""
    pairs = [(p["tokens"], p["cold_s"] - p["warm_s"]) for probes in probe_sets for p in probes.get("shape_probe") or []]
    return np.array([t for t, _ in pairs], dtype=np.float64), np.array([m for _, m in pairs], dtype=np.float64)


def has_primitive_cache(meta: Any) -> bool:
    """Whether the profiled engine keeps per-token-count set-up (the shape cache): a CPU engine
    whose linear layers run oneDNN (``keeps_shape_cache`` of the profile's
    ``engine.linear_dispatch``; a profile taken before it was recorded counts as oneDNN's). GPU
    engines have no such term."""
    if (meta.hardware or {}).get("kind") == "gpu":
        return False
    return keeps_shape_cache((meta.get("engine") or {}).get("linear_dispatch"))


def shape_cache_cost(steps: pd.DataFrame, probe_sets: list[dict] | None = None) -> ShapeCacheCost | None:
    """The per-shape set-up cost, or None if neither the server nor the steps measured it.

    The misses come from the serving phase's shape probes when it has them (the server is what
    ``perf=profile`` simulates, and its set-up costs more than the in-process engine's: other
    threads), else from the steps table's shape_cold / shape_warm rows (each cold step minus the
    warm median of its count). ``miss = per_miss_s + per_miss_token_s x tokens`` is fitted by least
    squares, both terms >= 0 (non-negative least squares).
    """
    tokens, miss = _misses_in_probes(probe_sets or [])
    where = f"{len(tokens)} shape probes on `vllm serve` (cold minus warm TTFT of the same prompt length)"
    if len(tokens) == 0:
        tokens, miss = _misses_in_steps(steps)
        where = "cold prefill steps minus the warm median of the same count (profiler shapes phase)"
    if len(tokens) == 0:
        return None
    if len(np.unique(tokens)) < 2:  # one size: a constant only
        a, b = max(0.0, float(np.mean(miss))), 0.0
    else:
        from scipy.optimize import nnls

        scale = float(tokens.max())
        (a, b), _ = nnls(np.column_stack([np.ones_like(tokens), tokens / scale]), miss)
        a, b = float(a), float(b) / scale
    at, cost = miss_table(tokens, miss)
    source = (f"capacity: vLLM CPU create_onednn_mm primitive_cache_size ({ONEDNN_PRIMITIVE_CACHE}); miss cost: "
              f"{len(tokens)} misses at {len(np.unique(tokens))} token counts, {where}; the table of their "
              f"medians is used (the line a + b x tokens is a summary)")
    return ShapeCacheCost(capacity=ONEDNN_PRIMITIVE_CACHE, per_miss_s=a, per_miss_token_s=b, source=source,
                          measured_tokens=at, measured_miss_s=cost)


#: misses whose token counts differ by at most this many tokens are one size (the probes shift by
#: 2 tokens each round, the shapes phase measures T and T + 2)
SAME_SIZE_TOKENS = 16


def miss_table(tokens: np.ndarray, miss: np.ndarray) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Per size (counts within SAME_SIZE_TOKENS of each other), the median token count and the
    median miss, never below 0: the cost table the simulator interpolates."""
    order = np.argsort(tokens, kind="stable")
    tokens, miss = tokens[order], miss[order]
    groups, start = [], 0
    for i in range(1, len(tokens) + 1):
        if i == len(tokens) or tokens[i] - tokens[start] > SAME_SIZE_TOKENS:
            groups.append(slice(start, i))
            start = i
    at = tuple(int(round(float(np.median(tokens[g])))) for g in groups)
    cost = tuple(max(0.0, float(np.median(miss[g]))) for g in groups)
    return at, cost


class FittedPerformanceModel(PerformanceModel):
    """Step time from fitted coefficients; KV capacity and memory from the profile."""

    calibrated = True

    def __init__(self, coefficients: dict[str, float], kv: dict[str, Any], memory: dict[str, Any],
                 architecture: dict[str, Any], name: str, hardware: dict[str, Any] | None = None,
                 report: dict[str, Any] | None = None, source: str = "", decode_knee: int = 0,
                 serving: dict[str, Any] | None = None, engine: dict[str, Any] | None = None,
                 shape_cache: dict[str, Any] | None = None):
        missing = [t for t in TERMS if t not in coefficients and t not in NEW_TERMS]
        if missing:
            raise ConfigError("fit", f"coefficients lack {missing}")
        self.coefficients = {t: float(coefficients.get(t, 0.0)) for t in TERMS}
        self._c = tuple(self.coefficients[t] for t in TERMS)
        self.decode_knee = int(decode_knee)
        #: the server's overheads measured by the profiler's serving phase (ServingOverheads), or None
        self.serving = dict(serving) if serving else None
        #: the profiled engine's settings (simulator.records.profile.engine_settings)
        self.engine_settings = dict(engine) if engine else None
        #: the engine's per-shape set-up cost (CPU profiles with a shapes phase), or None
        self.shape_cache = ShapeCacheCost.from_dict(shape_cache) if shape_cache else None
        self.kv = dict(kv)
        self.memory_info = dict(memory)
        self.architecture = ModelArchitecture.from_dict(architecture)
        self.hardware = dict(hardware or {})
        self.report = dict(report or {})
        self.name = name
        self.source = source
        if self.hardware.get("slug"):
            self.hardware_label = str(self.hardware["slug"])

    def step_time(self, batch: StepBatch) -> float:
        c0, c_tok, c_attn, c_dec, c_seq, c_kv, c_spec = self._c
        prefill, pairs, decodes, seqs, kv_tokens, spec = batch_features(batch, self.decode_knee)
        base = c0 + c_dec * decodes + c_seq * seqs + c_kv * kv_tokens
        return base + c_tok * prefill + c_attn * pairs + c_spec * spec

    def decode_times(self, num_seqs: int, total_context):
        """Pure-decode steps: the same arithmetic as step_time, vectorised (bit-identical)."""
        c0, _, _, c_dec, c_seq, c_kv, _ = self._c
        total = np.asarray(total_context, dtype=np.float64)
        decodes = 1.0 if num_seqs else 0.0
        return c0 + c_dec * decodes + c_seq * float(max(0, num_seqs - self.decode_knee)) + c_kv * total

    def kv_bytes_per_token(self) -> int:
        return int(self.kv["bytes_per_token"])

    @property
    def on_gpu(self) -> bool:
        return self.hardware.get("kind") == "gpu"

    def memory(self, gpu_memory_utilization: float) -> MemoryBreakdown:
        """GPU profiles: vLLM's split of utilization x memory. CPU profiles: the KV space the
        profile ran with (set explicitly on CPU, independent of the utilization)."""
        mem = self.memory_info
        weights = int(mem.get("weights_bytes") or 0)
        activation = int(mem.get("activation_peak_bytes") or 0)
        total = int(mem.get("device_total_bytes") or 0)
        if self.on_gpu:
            usable = int(total * gpu_memory_utilization)
            other = int(mem.get("other_bytes") or 0)
            kv_cache = max(0, usable - weights - activation - other)
        else:
            kv_cache = int(mem.get("kv_cache_bytes") or 0)
            other = max(0, int(mem.get("rss_after_engine") or 0) - kv_cache - weights)
            usable = weights + activation + other + kv_cache
        return MemoryBreakdown(total=total, usable=usable, weights=weights, activation_peak=activation,
                               other=other, kv_cache=kv_cache)

    def kv_capacity(self, block_size: int, gpu_memory_utilization: float = 0.9,
                    num_gpu_blocks_override: int | None = None) -> KVCapacity:
        if (not num_gpu_blocks_override and int(block_size) == int(self.kv["block_size"])
                and not self.on_gpu):
            return KVCapacity(int(self.kv["num_gpu_blocks"]), int(block_size), self.kv_bytes_per_token())
        return super().kv_capacity(block_size, gpu_memory_utilization, num_gpu_blocks_override)

    def describe(self) -> dict:
        held = self.report.get("held_out", {})
        shapes = {"shape_cache": self.shape_cache.to_dict()} if self.shape_cache else {}
        return {**super().describe(), "source": self.source, "coefficients": self.coefficients,
                "decode_knee": self.decode_knee, **shapes,
                "held_out_median_ape": held.get("median_ape"), "held_out_p90_ape": held.get("p90_ape")}

    # --- persistence ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FIT_FORMAT, "format_version": FIT_FORMAT_VERSION, "name": self.name,
                "source": self.source, "coefficients": self.coefficients, "decode_knee": self.decode_knee,
                "kv": self.kv, "memory": self.memory_info, "architecture": self.architecture.to_dict(),
                "hardware": self.hardware, "engine": self.engine_settings, "serving": self.serving,
                "shape_cache": self.shape_cache.to_dict() if self.shape_cache else None, "report": self.report}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FittedPerformanceModel:
        if data.get("format") != FIT_FORMAT:
            raise ConfigError("fit", f"not a fitted step model (format={data.get('format')!r})")
        return cls(coefficients=data["coefficients"], kv=data["kv"], memory=data["memory"],
                   architecture=data["architecture"], name=data["name"], hardware=data.get("hardware"),
                   report=data.get("report"), source=data.get("source", ""),
                   decode_knee=int(data.get("decode_knee") or 0), serving=data.get("serving"),
                   engine=data.get("engine"), shape_cache=data.get("shape_cache"))


def fit_profile(profile: Profile, test_fraction: float = 0.25, seed: int = 0) -> FittedPerformanceModel:
    """Fit a FittedPerformanceModel to a profile's measured steps."""
    result = fit_steps(profile.measured_steps(), test_fraction=test_fraction, seed=seed)
    report = {
        **result.report,
        "profile": profile.name,
        "profile_created": profile.meta.get("created"),
        "profile_steps": int(len(profile.steps)),
        "fitted": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    model = FittedPerformanceModel(
        coefficients=result.coefficients, kv=profile.meta.kv, memory=profile.meta.memory,
        architecture=profile.meta.model["architecture"], name=f"fitted:{profile.name}",
        hardware=profile.meta.hardware, report=report,
        source=str(profile.path) if profile.path else profile.name, decode_knee=result.decode_knee,
        engine=engine_settings(profile.meta),
    )
    if has_primitive_cache(profile.meta):
        model.shape_cache = shape_cache_cost(profile.steps, (profile.meta.get("serving") or {}).get("probes"))
    model.serving = serving_of(profile, model)  # its served loads are simulated with the shape cost
    return model


def serving_of(profile: Profile, model: FittedPerformanceModel) -> dict[str, Any] | None:
    """The serving phase's overheads against ``model`` (ServingOverheads as a dict), or None when
    the profile has no serving phase."""
    serving = profile.meta.get("serving") or {}
    probes = serving.get("probes") or []
    if not probes:
        return None
    from calibration.serving import overheads_from_probes
    from simulator.records.engine_config import EngineConfig

    settings = dict(model.engine_settings or {})
    async_scheduling = bool(settings.pop("async_scheduling", False))
    engine = EngineConfig.from_dict(settings)
    busy = [m for m in serving.get("machine") or [] if not m.get("quiet", True)]
    source = (f"profile serving phase: {len(probes)} probe rounds on `vllm serve` "
              f"({serving.get('servers', 1)} server(s), loopback"
              + (f"; other processes busy on {len(busy)} of them: noisy" if busy else "") + ")")
    speculative = bool((profile.meta.optimization or {}).get("engine_args", {}).get("speculative_config"))
    return overheads_from_probes(model, probes, engine, async_scheduling, source, speculative,
                                 loads=serving.get("loads")).to_dict()


def _versions() -> dict[str, str]:
    """The numerical libraries a fit depends on (its last digits differ between versions and machines)."""
    import platform

    import scipy

    return {"python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__}


def save_fitted_model(model: FittedPerformanceModel, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(model.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


def load_fitted_model(path: str | Path) -> PerformanceModel:
    """A FittedPerformanceModel from a fit.json, or from a profile directory.

    A profile directory with a fit.json made from this very profile (same creation
    time and step count) by this fit's format version loads that fit; otherwise the
    profile is fitted now (deterministically; nothing is written).
    """
    path = Path(path)
    if path.is_file() and path.name != META_FILE:
        try:
            data = json.loads(path.read_text())
        except ValueError as err:  # not JSON, or not text at all
            raise ConfigError("fit", f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError("fit", f"{path} is not a fitted step model (a JSON {type(data).__name__})")
        try:
            return FittedPerformanceModel.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError("fit", f"{path} is not a complete fitted step model ({type(err).__name__}: "
                                     f"{err})") from None
    folder = path.parent if path.name == META_FILE else path
    if not (folder / META_FILE).exists():
        raise ConfigError("profile", f"no profile at {folder} (missing {META_FILE})")
    fit_file = folder / FIT_FILE
    if fit_file.exists():
        try:
            saved = json.loads(fit_file.read_text())
            meta = json.loads((folder / META_FILE).read_text())
            report = saved.get("report", {})
            if (report.get("profile_created") == meta.get("created")
                    and report.get("profile_steps") == meta.get("summary", {}).get("steps")
                    and saved.get("format_version", 1) >= FIT_FORMAT_VERSION):
                return FittedPerformanceModel.from_dict(saved)
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # an unreadable fit.json (or profile.json: Profile.load says why) is not used
    return fit_profile(Profile.load(folder))
