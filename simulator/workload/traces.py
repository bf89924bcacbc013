"""Readers of real request traces and of ServeGen's per-client data.

- Azure LLM inference trace 2023 (CSV: TIMESTAMP, ContextTokens, GeneratedTokens).
- Mooncake traces (JSONL: timestamp in ms, input_length, output_length,
  hash_ids: one id per 512-token prompt block, equal ids = equal prefixes).
- ServeGen client data: ``chunk-<client>-trace.csv`` (per 10-minute window:
  start_s, rate, cv, gap family, shape, scale) and ``chunk-<client>-dataset.json``
  (per 6-hour window: distributions of input tokens, output tokens and
  reason_ratio as ``{value: probability}``).
- Length files (CSV: num_prefill_tokens, num_decode_tokens), as Vidur reads them.

Readers are plain Python and numpy (no pandas). Bad rows raise ConfigError
naming the file, the line and the column. Relative paths are looked up in the
current directory, then under the repository root, so the copies in data/
work from anywhere.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulator.records.errors import ConfigError, require, warn
from simulator.records.workload import clamp_zero_outputs, require_prompts
from simulator.workload.arrivals import RateWindow

REPO_ROOT = Path(__file__).resolve().parents[2]
MOONCAKE_BLOCK_TOKENS = 512
SERVEGEN_FIELDS = ("input_tokens", "output_tokens", "reason_ratio")


@dataclass(frozen=True, eq=False)
class TraceRequests:
    """Requests read from a trace, in file order (arrival_s starts at 0)."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    prefix_group: np.ndarray | None = None
    prefix_tokens: np.ndarray | None = None
    outer_group: np.ndarray | None = None
    outer_tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.arrival_s)


def resolve_path(path: str | Path, field: str = "workload.path", directory: bool = False) -> Path:
    """An existing path: as given (absolute, or relative to the CWD), else under the repo root."""
    require(path is not None and str(path) != "", field, "is not set; give a file path")
    given = Path(str(path)).expanduser()
    candidates = [given] if given.is_absolute() else [Path.cwd() / given, REPO_ROOT / given]
    for candidate in candidates:
        if candidate.is_dir() if directory else candidate.is_file():
            return candidate
    kind = "directory" if directory else "file"
    tried = " or ".join(str(c) for c in candidates)
    raise ConfigError(field, f"no such {kind} {path} (looked for {tried})")


def read_text(path: Path, field: str, expected: str) -> str:
    """A file's text; ConfigError naming field and the expected format if it is not UTF-8 text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            field, f"{path.name} is not UTF-8 text (byte {error.start}); expected {expected}"
        ) from None


def _bad(
    path: Path, line: int, column: str, value: str, expected: str, field: str = "workload.path"
) -> ConfigError:
    return ConfigError(
        field, f"{path.name} line {line}, column {column}: {value!r} is not {expected}"
    )


def _read_csv_columns(
    path: Path, columns: Sequence[str], has_header: bool = True, field: str = "workload.path"
) -> dict[str, list[str]]:
    """The named columns of a small CSV file as lists of strings (data from line 2, or 1)."""
    lines = read_text(path, field, f"a CSV file with columns {list(columns)}").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if has_header:
        require(len(lines) > 0, field, f"{path.name} is empty")
        header = [h.strip().lstrip("\ufeff") for h in lines[0].split(",")]
        missing = [c for c in columns if c not in header]
        require(not missing, field, f"{path.name} lacks columns {missing}; its header is {header}")
        index = [header.index(c) for c in columns]
        width = len(header)
        first_line = 2
        body = lines[1:]
    else:
        index = list(range(len(columns)))
        width = len(columns)
        first_line = 1
        body = lines
    rows = [line.split(",") for line in body]
    for number, row in enumerate(rows, start=first_line):
        if len(row) != width:
            raise ConfigError(
                field, f"{path.name} line {number}: expected {width} columns, found {len(row)}"
            )
    require(len(rows) > 0, field, f"{path.name} has no data rows")
    return {c: [row[i].strip() for row in rows] for c, i in zip(columns, index, strict=True)}


def _integers(
    path: Path, column: str, values: list[str], first_line: int = 2, field: str = "workload.path"
) -> np.ndarray:
    """Non-negative integers parsed from strings; ConfigError names the first bad one."""
    try:
        parsed = np.array(values, dtype=np.float64)
        if (
            np.all(np.isfinite(parsed))
            and np.all(parsed >= 0)
            and np.all(parsed == np.floor(parsed))
        ):
            return parsed.astype(np.int64)
    except ValueError:
        pass
    for number, value in enumerate(values, start=first_line):
        try:
            number_value = float(value)
        except ValueError:
            number_value = math.nan
        if not (
            math.isfinite(number_value) and number_value >= 0 and number_value == int(number_value)
        ):
            raise _bad(path, number, column, value, "a non-negative integer", field)
    raise AssertionError("unreachable")  # pragma: no cover


def read_azure_csv(path: str | Path) -> TraceRequests:
    """Azure LLM inference trace 2023: arrivals from TIMESTAMP, lengths from the token columns.

    Zero token counts are raised to 1 (a request has at least one prompt and
    one output token), with a warning; rows out of time order are sorted, with a warning.
    """
    path = resolve_path(path)
    columns = _read_csv_columns(path, ["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
    try:
        stamps = np.asarray(columns["TIMESTAMP"], dtype="datetime64[ns]")
    except ValueError:
        for number, value in enumerate(columns["TIMESTAMP"], start=2):
            try:
                np.datetime64(value)
            except ValueError:
                raise _bad(
                    path, number, "TIMESTAMP", value, "a timestamp like 2023-11-16 18:15:46.68"
                ) from None
        raise
    seconds = (stamps - stamps.min()) / np.timedelta64(1, "s")
    unsorted = int(np.count_nonzero(np.diff(seconds) < 0))
    if unsorted:
        warn(f"{path.name}: {unsorted} TIMESTAMP(s) earlier than the row before; requests sorted by time")
    order = np.argsort(seconds, kind="stable")
    prompt = _integers(path, "ContextTokens", columns["ContextTokens"])
    output = _integers(path, "GeneratedTokens", columns["GeneratedTokens"])
    zero_prompts = int(np.count_nonzero(prompt == 0))
    if zero_prompts:
        warn(f"{path.name}: {zero_prompts} request(s) with 0 ContextTokens run with 1 prompt token")
    return TraceRequests(
        arrival_s=seconds[order],
        prompt_tokens=np.maximum(prompt[order], 1),
        output_tokens=clamp_zero_outputs(output[order], f"{path.name} GeneratedTokens"),
    )


def read_lengths_csv(
    path: str | Path, field: str = "workload.lengths_file"
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, output tokens) from a CSV with num_prefill_tokens, num_decode_tokens."""
    path = resolve_path(path, field)
    names = ["num_prefill_tokens", "num_decode_tokens"]
    columns = _read_csv_columns(path, names, field=field)
    prompt, output = (_integers(path, name, columns[name], field=field) for name in names)
    require_prompts(prompt, field, f"{path.name} column num_prefill_tokens")
    return prompt, clamp_zero_outputs(output, f"{path.name} column num_decode_tokens")


def read_mooncake_jsonl(
    path: str | Path, block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> TraceRequests:
    """A Mooncake trace, with its shared prefixes mapped to prefix groups.

    See ``mooncake_prefix_groups`` for the mapping of hash_ids to
    (prefix_group, prefix_tokens); prefix_tokens is capped at the prompt length.
    """
    path = resolve_path(path)
    stamps, prompts, outputs, hashes = [], [], [], []
    text = read_text(path, "workload.path", "a Mooncake JSONL file (one JSON object a line)")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(
                "workload.path", f"{path.name} line {number}: not JSON ({error.msg})"
            ) from None
        require(
            isinstance(row, dict),
            "workload.path",
            f"{path.name} line {number}: not a JSON object",
        )
        for key, expected in (
            ("timestamp", "a number of ms >= 0"),
            ("input_length", "an integer >= 1"),
            ("output_length", "an integer >= 0"),
        ):
            value = row.get(key)
            ok = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value >= 0
            )
            if key != "timestamp":  # a recorded 0-token output is accepted (run with 1, a warning)
                ok = ok and value == int(value) and value >= (1 if key == "input_length" else 0)
            if not ok:
                raise _bad(path, number, key, str(value), expected)
        ids = row.get("hash_ids", [])
        if not isinstance(ids, list):
            raise _bad(path, number, "hash_ids", str(ids)[:40], "a list of integers")
        stamps.append(row["timestamp"])
        prompts.append(int(row["input_length"]))
        outputs.append(int(row["output_length"]))
        hashes.append(ids)
    require(len(stamps) > 0, "workload.path", f"{path.name} has no requests")
    if set(map(type, itertools.chain.from_iterable(hashes))) - {int}:
        number = next(i for i, ids in enumerate(hashes, 1) if set(map(type, ids)) - {int})
        raise _bad(path, number, "hash_ids", str(hashes[number - 1])[:40], "a list of integers")
    seconds = np.asarray(stamps, dtype=np.float64) / 1000.0
    order = np.argsort(seconds, kind="stable")
    hashes = [hashes[i] for i in order]
    prompt = np.asarray(prompts, dtype=np.int64)[order]
    group, shared_blocks, outer, outer_blocks = mooncake_prefix_levels(hashes)
    return TraceRequests(
        arrival_s=seconds[order] - seconds.min(),
        prompt_tokens=prompt,
        output_tokens=clamp_zero_outputs(np.asarray(outputs, dtype=np.int64)[order], f"{path.name} output_length"),
        prefix_group=group,
        prefix_tokens=np.minimum(shared_blocks * block_tokens, prompt),
        outer_group=outer,
        outer_tokens=np.minimum(outer_blocks * block_tokens, prompt),
    )


def mooncake_prefix_groups(hash_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(prefix_group, shared_blocks) of ``mooncake_prefix_levels``."""
    group, shared, _, _ = mooncake_prefix_levels(hash_ids)
    return group, shared


def mooncake_prefix_levels(
    hash_ids: Sequence[Sequence[int]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Map Mooncake block-hash lists (in arrival order) to (prefix_group, shared_blocks,
    outer_group, outer_blocks).

    Mooncake's hash ids form a trie: an id always sits at the same position
    behind the same parent, so two requests share exactly their longest common
    run of leading ids. A Workload only knows "requests of one group share
    their first min(prefix_tokens) tokens", i.e. one chain of blocks per group.
    The trie is cut into such chains in arrival order:

    - a request whose path extends a group's chain at its tip (a multi-turn
      follow-up) joins that group and extends the chain;
    - if it leaves a chain where only one earlier request went on (the old
      continuation is private to that request), the chain is redirected along
      the new request;
    - if it leaves a chain where later requests will follow it, it founds a
      new group whose outer group is the old one: the new group's members
      share its head (the blocks up to the branch point) with the old chain,
      two-level sharing (a system prompt, then a conversation);
    - otherwise it joins the group, sharing the blocks up to the branch point.

    A request's shared_blocks is the longest run it shares with another
    member along the group's chain (0 and group -1 when it shares nothing).
    A member of a group founded at a branch has as outer group the chain it
    branched from, with outer_blocks its head as that chain finally stands
    (capped by its shared_blocks). The mapping never claims more sharing than
    the trace has; on the shipped traces the groups alone keep ~96%
    (conversation) and ~94% (synthetic) of the blocks an unbounded prefix
    cache would hit, with the outer level ~99% and 100%.
    """
    visits = Counter(itertools.chain.from_iterable(hash_ids))
    owner: dict[int, int] = {}
    chains: list[list[int]] = []
    parent: dict[int, int] = {}  # a chain founded at a branch of another -> that chain
    group = np.full(len(hash_ids), -1, np.int64)
    for i, path in enumerate(hash_ids):
        depth = 0
        while depth < len(path) and path[depth] in owner:
            depth += 1
        if depth == 0:
            g = _found_chain(chains, owner, path)
        else:
            g = owner[path[depth - 1]]
            chain = chains[g]
            if len(chain) == depth:  # at the tip: extend the chain
                _extend_chain(chain, owner, g, path[depth:])
            elif visits[chain[depth]] == 1:  # the old continuation is private: redirect
                for block in chain[depth:]:
                    owner.pop(block, None)
                del chain[depth:]
                _extend_chain(chain, owner, g, path[depth:])
            elif depth < len(path) and visits[path[depth]] >= 2:  # others will follow this branch
                old, g = g, _found_chain(chains, owner, path, start=depth)
                parent[g] = old
        group[i] = g
    along = np.zeros(len(hash_ids), np.int64)
    for i, path in enumerate(hash_ids):
        if group[i] >= 0:
            along[i] = _common_run(path, chains[group[i]])
    shared = np.zeros(len(hash_ids), np.int64)
    order = np.lexsort((-along, group))
    start = 0
    while start < len(order):
        stop = start
        while stop < len(order) and group[order[stop]] == group[order[start]]:
            stop += 1
        members = order[start:stop]
        if len(members) >= 2 and group[members[0]] >= 0:
            best, second = along[members[0]], along[members[1]]
            others_best = np.where(along[members] == best, second, best)
            shared[members] = np.minimum(along[members], others_best)
        start = stop
    group = np.where(shared > 0, group, -1)
    # the outer level: a group's head shared with the chain it branched from (as that chain stands now)
    outer = np.full(len(hash_ids), -1, np.int64)
    outer_blocks = np.zeros(len(hash_ids), np.int64)
    for i in np.flatnonzero(group >= 0):
        old = parent.get(int(group[i]), -1)
        if old >= 0:
            head = min(_common_run(chains[old], chains[group[i]]), int(shared[i]))
            if head > 0:
                outer[i], outer_blocks[i] = old, head
    group, outer = _renumber_levels(group, outer)
    return group, shared, outer, outer_blocks


def _found_chain(
    chains: list[list[int]], owner: dict[int, int], path: Sequence[int], start: int = 0
) -> int:
    g = len(chains)
    chains.append(list(path))
    for block in path[start:]:
        owner[block] = g
    return g


def _extend_chain(chain: list[int], owner: dict[int, int], g: int, blocks: Sequence[int]) -> None:
    chain.extend(blocks)
    for block in blocks:
        owner[block] = g


def _common_run(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _renumber_levels(group: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_renumber`` of both levels in one numbering (an outer group names its chain's blocks as
    that chain's own group does), in order of first appearance, outer before inner."""
    both = np.stack([outer, group], axis=1).reshape(-1)
    renumbered = _renumber(both).reshape(-1, 2)
    return renumbered[:, 1].copy(), renumbered[:, 0].copy()


def _renumber(group: np.ndarray) -> np.ndarray:
    """Groups numbered 0, 1, ... in order of first appearance (-1 kept)."""
    used = group >= 0
    if not used.any():
        return group
    _, first, inverse = np.unique(group[used], return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    out = group.copy()
    out[used] = rank[inverse]
    return out


# --------------------------------------------------------------------------- ServeGen


@dataclass(frozen=True, eq=False)
class Distribution:
    """An empirical distribution: sorted values and their probabilities (summing to 1)."""

    values: np.ndarray
    probs: np.ndarray

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        cdf = np.cumsum(self.probs)
        index = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right")
        return self.values[np.minimum(index, len(self.values) - 1)]

    @property
    def mean(self) -> float:
        return float(np.dot(self.values, self.probs))


@dataclass(frozen=True, eq=False)
class ServeGenClient:
    """One ServeGen client: its 10-minute rate windows and its 6-hour length datasets.

    Dataset window ``i`` covers the time of day from ``dataset_starts[i]``; it is
    parsed on first use (``dataset(i)``, None when the window has no data).
    """

    directory: str
    client: int
    window_starts: np.ndarray
    windows: tuple[RateWindow, ...]
    dataset_starts: np.ndarray

    @property
    def requests_per_day(self) -> float:
        return sum(w.expected_requests for w in self.windows)

    def dataset(self, index: int) -> dict[str, Distribution] | None:
        """The distributions (by SERVEGEN_FIELDS) of dataset window ``index``."""
        return _servegen_window(self.directory, self.client, int(index))

    def dataset_at(self, time_of_day: np.ndarray) -> np.ndarray:
        """Index of the dataset window to use at each time of day (the nearest one with data)."""
        index = np.searchsorted(self.dataset_starts, time_of_day, side="right") - 1
        index = np.clip(index, 0, len(self.dataset_starts) - 1)
        for wanted in np.unique(index):
            if self.dataset(wanted) is None:
                index[index == wanted] = self._nearest_with_data(int(wanted))
        return index

    def _nearest_with_data(self, wanted: int) -> int:
        by_distance = sorted(range(len(self.dataset_starts)), key=lambda i: (abs(i - wanted), i))
        for i in by_distance:
            if self.dataset(i) is not None:
                return i
        raise ConfigError("workload.clients", f"ServeGen client {self.client} has no length data")


def servegen_client_ids(directory: str | Path) -> list[int]:
    """The client numbers present in a ServeGen data directory."""
    directory = resolve_path(directory, directory=True)
    ids = sorted(int(p.name.split("-")[1]) for p in directory.glob("chunk-*-trace.csv"))
    require(len(ids) > 0, "workload.path", f"{directory} holds no chunk-<client>-trace.csv files")
    return ids


def read_servegen_client(directory: str | Path, client: int) -> ServeGenClient:
    """Read ``chunk-<client>-trace.csv`` and the window list of ``chunk-<client>-dataset.json``."""
    directory = resolve_path(directory, directory=True)
    return _read_servegen_client(str(directory), int(client))


@functools.lru_cache(maxsize=256)
def _read_servegen_client(directory: str, client: int) -> ServeGenClient:
    trace = Path(directory) / f"chunk-{client}-trace.csv"
    require(trace.is_file(), "workload.clients", f"no ServeGen client {client}: {trace} is missing")
    starts, windows = read_servegen_trace(trace)
    keys = _servegen_dataset_keys(directory, client)
    return ServeGenClient(
        directory=directory,
        client=client,
        window_starts=starts,
        windows=windows,
        dataset_starts=np.array([float(k) for k in keys]),
    )


@functools.lru_cache(maxsize=256)
def _servegen_raw(directory: str, client: int) -> dict:
    path = Path(directory) / f"chunk-{client}-dataset.json"
    require(path.is_file(), "workload.clients", f"no ServeGen client {client}: {path} is missing")
    text = read_text(path, "workload.path", "a ServeGen dataset JSON file")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError("workload.path", f"{path.name}: not JSON ({error.msg})") from None
    require(
        isinstance(raw, dict) and len(raw) > 0, "workload.path", f"{path.name}: no dataset windows"
    )
    return raw


def _servegen_dataset_keys(directory: str, client: int) -> list[str]:
    keys = list(_servegen_raw(directory, client))
    try:
        return sorted(keys, key=float)
    except ValueError:
        raise ConfigError(
            "workload.path",
            f"chunk-{client}-dataset.json: window keys must be start seconds, got {keys}",
        ) from None


@functools.lru_cache(maxsize=2048)
def _servegen_window(directory: str, client: int, index: int) -> dict[str, Distribution] | None:
    """The three distributions of one dataset window (None if it has no mass)."""
    key = _servegen_dataset_keys(directory, client)[index]
    window = _servegen_raw(directory, client)[key]
    name = f"chunk-{client}-dataset.json window {key}"
    fields = {}
    for field in SERVEGEN_FIELDS:
        text = window.get(field) if isinstance(window, dict) else None
        require(isinstance(text, str), "workload.path", f"{name}: lacks {field}")
        flat = np.fromstring(text.strip().strip("{}").replace(":", ","), sep=",")
        require(
            len(flat) % 2 == 0,
            "workload.path",
            f"{name}, {field}: not a {{value: probability}} map",
        )
        values, probs = flat[0::2], flat[1::2]
        if not (np.all(np.isfinite(probs)) and np.all(probs >= 0)) or probs.sum() <= 0:
            return None
        order = np.argsort(values)
        fields[field] = Distribution(values[order], probs[order] / probs.sum())
    return fields


def read_servegen_trace(path: str | Path) -> tuple[np.ndarray, tuple[RateWindow, ...]]:
    """Window starts and RateWindows of a ServeGen ``chunk-<client>-trace.csv``.

    Each row is one window: start_s, rate, cv, gap family (Gamma or Weibull),
    shape, scale. The fitted family and shape are kept; the scale is reset so
    that the mean gap is 1/rate.
    """
    path = resolve_path(path)
    names = ["start_s", "rate", "cv", "family", "shape", "scale"]
    columns = _read_csv_columns(path, names, has_header=False)
    numbers = {}
    for name in ("start_s", "rate", "cv", "shape"):
        try:
            numbers[name] = np.asarray(columns[name]).astype(np.float64)
        except ValueError:
            for number, value in enumerate(columns[name], start=1):
                try:
                    float(value)
                except ValueError:
                    raise _bad(path, number, name, value, "a number") from None
    starts = numbers["start_s"]
    require(
        len(starts) >= 2 and bool(np.all(np.diff(starts) > 0)),
        "workload.path",
        f"{path.name}: window starts (column 1) must increase",
    )
    durations = np.append(np.diff(starts), starts[1] - starts[0])
    windows = []
    for i, (rate, cv, family, shape) in enumerate(
        zip(numbers["rate"], numbers["cv"], columns["family"], numbers["shape"], strict=True)
    ):
        if not rate > 0:
            windows.append(RateWindow(float(durations[i]), 0.0))
            continue
        family = family.lower()
        if family not in ("gamma", "weibull") or not shape > 0:
            raise _bad(
                path,
                i + 1,
                "family/shape",
                f"{family},{shape}",
                "Gamma or Weibull with a shape > 0",
            )
        windows.append(
            RateWindow(
                float(durations[i]), float(rate), float(cv) if cv > 0 else 1.0, family, float(shape)
            )
        )
    return starts, tuple(windows)
