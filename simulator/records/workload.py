"""The Workload record: what arrives, when, and how long each request is.

The simulator and the live runner consume the very same object. Columns are
numpy arrays (one entry per request, sorted by arrival) so that workloads of
hundreds of thousands of requests stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simulator.records.errors import ConfigError, require, warn

DOMAINS = ("math", "code", "science", "chat")


@dataclass(frozen=True, eq=False)
class Workload:
    """Requests sorted by arrival time.

    - ``arrival_s``: arrival time in seconds from the start of the run.
    - ``prompt_tokens``: prompt length.
    - ``output_tokens``: tokens the model generates (after any ``max_tokens`` cut).
    - ``reasoning_tokens``: the hidden (thinking) part of the output; the first
      visible token is output token number ``reasoning_tokens + 1``.
    - ``domain``: a label such as ``math`` or ``chat`` (free text for traces).
    - ``prefix_group``: requests with the same non-negative group share their
      first ``prefix_tokens`` prompt tokens (-1 means no shared prefix).
    - ``outer_group``, ``outer_tokens``: two-level sharing; the first
      ``outer_tokens`` of a request's prefix (``<= prefix_tokens``) are those of
      prefix group ``outer_group`` (a system prompt many groups start with):
      shared with that group's members and with every request naming it as
      outer group, across groups; -1: no outer group.
    - ``timeout_s``: the client's timeout, from arrival (inf: none). A request
      unfinished by then is aborted: it leaves the engine and frees its blocks.
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    reasoning_tokens: np.ndarray
    domain: np.ndarray
    prefix_group: np.ndarray = field(default=None)  # type: ignore[assignment]
    prefix_tokens: np.ndarray = field(default=None)  # type: ignore[assignment]
    name: str = "workload"
    seed: int = 0
    outer_group: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer_tokens: np.ndarray = field(default=None)  # type: ignore[assignment]
    timeout_s: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        fix = {
            "arrival_s": np.asarray(self.arrival_s, dtype=np.float64),
            "prompt_tokens": np.asarray(self.prompt_tokens, dtype=np.int64),
            "output_tokens": np.asarray(self.output_tokens, dtype=np.int64),
            "reasoning_tokens": np.asarray(self.reasoning_tokens, dtype=np.int64),
            "domain": np.asarray(self.domain, dtype=object),
            "prefix_group": np.full(n, -1, np.int64)
            if self.prefix_group is None
            else np.asarray(self.prefix_group, dtype=np.int64),
            "prefix_tokens": np.zeros(n, np.int64)
            if self.prefix_tokens is None
            else np.asarray(self.prefix_tokens, dtype=np.int64),
            "outer_group": np.full(n, -1, np.int64)
            if self.outer_group is None
            else np.asarray(self.outer_group, dtype=np.int64),
            "outer_tokens": np.zeros(n, np.int64)
            if self.outer_tokens is None
            else np.asarray(self.outer_tokens, dtype=np.int64),
            "timeout_s": np.full(n, np.inf)
            if self.timeout_s is None
            else np.broadcast_to(np.asarray(self.timeout_s, dtype=np.float64), (n,)).copy(),
        }
        for key, value in fix.items():
            if len(value) != n:
                raise ConfigError(f"workload.{key}", f"has {len(value)} entries, expected {n}")
            object.__setattr__(self, key, value)
        self.validate()

    def validate(self) -> None:
        """Check the columns; raise ConfigError naming the first bad one."""
        a = self.arrival_s
        require(bool(np.all(np.isfinite(a))), "workload.arrival_s", "must be finite")
        require(bool(np.all(np.diff(a) >= 0)), "workload.arrival_s", "must be sorted ascending")
        require(bool(np.all(a >= 0)), "workload.arrival_s", "must be >= 0")
        require(bool(np.all(self.prompt_tokens >= 1)), "workload.prompt_tokens", "must be >= 1")
        require(bool(np.all(self.output_tokens >= 1)), "workload.output_tokens", "must be >= 1")
        require(
            bool(np.all((self.reasoning_tokens >= 0) & (self.reasoning_tokens <= self.output_tokens))),
            "workload.reasoning_tokens",
            "must lie in [0, output_tokens]",
        )
        require(
            bool(np.all((self.prefix_tokens >= 0) & (self.prefix_tokens <= self.prompt_tokens))),
            "workload.prefix_tokens",
            "must lie in [0, prompt_tokens]",
        )
        outer = self.outer_group >= 0
        require(bool(np.all(self.prefix_group[outer] >= 0)), "workload.outer_group",
                "needs a prefix_group >= 0 (the outer group's tokens lie inside the group's prefix)")
        require(
            bool(np.all((self.outer_tokens >= 0) & (~outer | (self.outer_tokens <= self.prefix_tokens)))),
            "workload.outer_tokens",
            "must lie in [0, prefix_tokens]",
        )
        require(bool(np.all(self.timeout_s > 0)), "workload.timeout_s", "must be > 0 seconds (inf: none)")

    @property
    def has_outer_groups(self) -> bool:
        return bool(np.any(self.outer_group >= 0))

    @property
    def has_timeouts(self) -> bool:
        return bool(np.any(np.isfinite(self.timeout_s)))

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        """Time of the last arrival."""
        return float(self.arrival_s[-1]) if len(self) else 0.0

    def head(self, n: int) -> Workload:
        """The first n requests."""
        return self.select(slice(0, n))

    def select(self, index) -> Workload:
        """A sub-workload (index: slice, mask or sorted integer array)."""
        return Workload(
            arrival_s=self.arrival_s[index],
            prompt_tokens=self.prompt_tokens[index],
            output_tokens=self.output_tokens[index],
            reasoning_tokens=self.reasoning_tokens[index],
            domain=self.domain[index],
            prefix_group=self.prefix_group[index],
            prefix_tokens=self.prefix_tokens[index],
            name=self.name,
            seed=self.seed,
            outer_group=self.outer_group[index],
            outer_tokens=self.outer_tokens[index],
            timeout_s=self.timeout_s[index],
        )

    def to_frame(self):
        """The workload as a pandas DataFrame (one row per request)."""
        import pandas as pd

        columns = {
            "request_id": np.arange(len(self)),
            "arrival_s": self.arrival_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "domain": self.domain.astype(str),
            "prefix_group": self.prefix_group,
            "prefix_tokens": self.prefix_tokens,
        }
        if self.has_outer_groups:  # (only then: older readers see the columns they know)
            columns.update(outer_group=self.outer_group, outer_tokens=self.outer_tokens)
        if self.has_timeouts:
            columns["timeout_s"] = self.timeout_s
        return pd.DataFrame(columns)

    @classmethod
    def from_frame(cls, frame, name: str = "workload", seed: int = 0) -> Workload:
        """Build from a DataFrame with the columns of ``to_frame``."""
        missing = {"arrival_s", "prompt_tokens", "output_tokens"} - set(frame.columns)
        if missing:
            raise ConfigError("workload", f"table lacks columns {sorted(missing)}")
        frame = frame.sort_values("arrival_s", kind="stable")
        n = len(frame)
        prompt = frame["prompt_tokens"].to_numpy()
        require_prompts(prompt, "workload.path", f"{name} column prompt_tokens")
        return cls(
            arrival_s=frame["arrival_s"].to_numpy(),
            prompt_tokens=prompt,
            output_tokens=clamp_zero_outputs(frame["output_tokens"].to_numpy(), f"{name} column output_tokens"),
            reasoning_tokens=frame["reasoning_tokens"].to_numpy()
            if "reasoning_tokens" in frame
            else np.zeros(n, np.int64),
            domain=frame["domain"].to_numpy() if "domain" in frame else np.full(n, "unknown", object),
            prefix_group=frame["prefix_group"].to_numpy() if "prefix_group" in frame else None,
            prefix_tokens=frame["prefix_tokens"].to_numpy() if "prefix_tokens" in frame else None,
            name=name,
            seed=seed,
            **{key: frame[key].to_numpy() for key in ("outer_group", "outer_tokens", "timeout_s") if key in frame},
        )

    def save(self, path: str | Path) -> None:
        """Write as Parquet."""
        self.to_frame().to_parquet(path, index=False)

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        """Read a Parquet file written by ``save``."""
        import pandas as pd

        path = Path(path)
        if not path.exists():
            raise ConfigError("workload.path", f"no such file {path}")
        try:
            frame = pd.read_parquet(path)
        except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... on a corrupt file
            raise ConfigError(
                "workload.path",
                f"{path.name} is not a readable Parquet file ({type(error).__name__}); expected a "
                "workload saved by Workload.save (.parquet) or its CSV (.csv)",
            ) from None
        return cls.from_frame(frame, name=path.stem)


def clamp_zero_outputs(output: np.ndarray, source: str) -> np.ndarray:
    """Outputs of 0 tokens raised to 1 (the engine emits at least one token), with a warning."""
    zeros = int(np.count_nonzero(output == 0))
    if zeros:
        warn(f"{source}: {zeros} request(s) with 0 output tokens run with 1 (vLLM emits >= 1 token)")
    return np.maximum(output, 1)


def require_prompts(prompt: np.ndarray, field: str, source: str) -> None:
    """Refuse prompts of 0 tokens (vLLM rejects an empty prompt)."""
    zeros = int(np.count_nonzero(prompt == 0))
    require(
        zeros == 0,
        field,
        f"{source}: {zeros} request(s) have 0 prompt tokens; allowed: >= 1 (vLLM rejects empty prompts)",
    )
