"""Trace readers on the real copies in data/ and on small malformed files."""

import json
from pathlib import Path

import numpy as np
import pytest

from simulator.records.errors import ConfigError
from simulator.workload.traces import (
    REPO_ROOT,
    mooncake_prefix_groups,
    read_azure_csv,
    read_lengths_csv,
    read_mooncake_jsonl,
    read_servegen_client,
    read_servegen_trace,
    resolve_path,
    servegen_client_ids,
)

AZURE_CONV = "data/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv"
AZURE_CODE = "data/traces/azure-llm-2023/AzureLLMInferenceTrace_code.csv"
MOONCAKE = "data/traces/mooncake/conversation_trace.jsonl"
MOONCAKE_SYNTHETIC = "data/traces/mooncake/synthetic_trace.jsonl"
SERVEGEN = "data/workloads/servegen-deepseek-r1"
BENCH = "data/bench/reasoning_lengths_20k.csv"


def test_every_copied_data_file_has_its_licence_beside_it():
    for folder in ("data/traces/azure-llm-2023", "data/traces/mooncake", SERVEGEN):
        assert (REPO_ROOT / folder / "LICENSE").stat().st_size > 1000


def test_azure_conv_trace():
    trace = read_azure_csv(AZURE_CONV)
    assert len(trace) == 19366
    assert trace.arrival_s[0] == 0.0
    assert np.all(np.diff(trace.arrival_s) >= 0)
    assert trace.arrival_s[-1] == pytest.approx(3501.72, abs=0.01)
    gaps = np.diff(trace.arrival_s)
    assert len(trace) / trace.arrival_s[-1] == pytest.approx(5.5, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.1, rel=0.05)
    assert trace.prompt_tokens[:2].tolist() == [374, 396]
    assert trace.output_tokens[:2].tolist() == [44, 109]


def test_azure_code_trace_is_burstier():
    trace = read_azure_csv(AZURE_CODE)
    assert len(trace) == 8819
    gaps = np.diff(trace.arrival_s)
    assert gaps.std() / gaps.mean() > 2.0
    assert trace.prompt_tokens[0] == 4808 and trace.output_tokens[0] == 10


def test_paths_resolve_from_the_repo_root_wherever_we_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path(AZURE_CONV) == REPO_ROOT / AZURE_CONV
    with pytest.raises(ConfigError, match=r"^workload.path: no such file data/nope.csv"):
        resolve_path("data/nope.csv")


def test_mooncake_conversation_trace():
    trace = read_mooncake_jsonl(MOONCAKE)
    assert len(trace) == 12031
    assert trace.arrival_s[0] == 0.0
    assert trace.arrival_s[-1] == pytest.approx(3537.0, abs=0.01)
    assert trace.prompt_tokens[0] == 6758 and trace.output_tokens[0] == 500
    assert np.all(trace.prefix_tokens <= trace.prompt_tokens)
    assert np.all((trace.prefix_group >= 0) == (trace.prefix_tokens > 0))


@pytest.mark.parametrize("path", [MOONCAKE, MOONCAKE_SYNTHETIC])
def test_mooncake_groups_never_overstate_and_keep_most_of_the_sharing(path):
    rows = [json.loads(line) for line in (REPO_ROOT / path).read_text().splitlines()]
    hashes = [r["hash_ids"] for r in rows]
    group, shared = mooncake_prefix_groups(hashes)
    # within a group, every member's first `shared` blocks are those of the member sharing most
    for g in np.unique(group[group >= 0]):
        members = np.flatnonzero(group == g)
        top = hashes[members[np.argmax(shared[members])]]
        for i in members:
            assert hashes[i][: shared[i]] == top[: shared[i]]
    # blocks an unbounded prefix cache would hit (ids are position-fixed, so a seen id means a seen prefix)
    seen: set[int] = set()
    exact = 0
    for path_ids in hashes:
        run = 0
        while run < len(path_ids) and path_ids[run] in seen:
            run += 1
        exact += run
        seen.update(path_ids)
    best_in_group: dict[int, int] = {}
    kept = 0
    for g, s in zip(group.tolist(), shared.tolist(), strict=True):
        if g >= 0:
            kept += min(s, best_in_group.get(g, 0))
            best_in_group[g] = max(best_in_group.get(g, 0), s)
    assert kept <= exact
    assert kept >= 0.9 * exact


def test_mooncake_groups_on_hand_made_cases():
    hashes = [
        [0, 1, 2],  # turn 1 of a conversation
        [7, 8],  # unrelated, shares nothing
        [0, 1, 2, 3, 4],  # turn 2 extends turn 1
        [0, 1, 5],  # a branch from turn 1 that nobody follows
        [0, 1, 2, 3, 4, 6],  # turn 3
    ]
    group, shared = mooncake_prefix_groups(hashes)
    assert group.tolist() == [0, -1, 0, 0, 0]
    assert shared.tolist() == [3, 0, 5, 2, 5]


def test_lengths_csv():
    prompt, output = read_lengths_csv(BENCH)
    assert len(prompt) == len(output) == 20000
    assert prompt.min() >= 1 and output.min() >= 1
    assert (prompt + output).max() <= 32768  # every request fits the default 32k context
    assert 3000 < output.mean() < 8000  # long reasoning outputs (benchmarks/make_reasoning_lengths.py)


def test_servegen_client_windows_and_datasets():
    assert len(servegen_client_ids(SERVEGEN)) == 73
    client = read_servegen_client(SERVEGEN, 0)
    assert len(client.windows) == 144
    assert {w.duration_s for w in client.windows} == {600.0}
    # chunk-0-trace.csv line 5: 2400,0.085,6.69...,Gamma,0.0223...,73.0...
    window = client.windows[4]
    assert (window.rate, window.family) == (0.085, "gamma")
    assert window.shape == pytest.approx(0.02232167101916883)
    assert client.dataset_starts.tolist() == [0.0, 21600.0, 43200.0, 64800.0]
    dataset = client.dataset(0)
    for field in ("input_tokens", "output_tokens", "reason_ratio"):
        assert dataset[field].probs.sum() == pytest.approx(1.0)
        assert np.all(np.diff(dataset[field].values) > 0)
    assert dataset["reason_ratio"].values.max() <= 1.0


def test_servegen_peak_rate_over_all_clients():
    total = sum(
        np.array([w.rate for w in read_servegen_client(SERVEGEN, c).windows])
        for c in servegen_client_ids(SERVEGEN)
    )
    assert total.max() == pytest.approx(42.52, abs=0.01)


# --------------------------------------------------------------------------- malformed files


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:50.99,3x6,109\n",
            r"line 3, column ContextTokens: '3x6'",
        ),
        (
            "2023-11-16 18:15:46.68,374,-4\n",
            r"line 2, column GeneratedTokens: '-4' is not a non-negative",
        ),
        ("yesterday,374,44\n", r"line 2, column TIMESTAMP: 'yesterday'"),
        ("2023-11-16 18:15:46.68,374\n", r"line 2: expected 3 columns, found 2"),
    ],
)
def test_malformed_azure_rows_name_line_and_column(tmp_path, body, message):
    path = write(tmp_path, "azure.csv", AZURE_HEADER + body)
    with pytest.raises(ConfigError, match=message) as error:
        read_azure_csv(path)
    assert error.value.field == "workload.path"


def test_blank_lines_inside_a_csv_keep_line_numbers_exact(tmp_path):
    path = write(
        tmp_path,
        "azure.csv",
        AZURE_HEADER + "2023-11-16 18:15:46.68,374,44\n\n2023-11-16 18:15:47.68,1,x\n\n",
    )
    with pytest.raises(ConfigError, match=r"azure.csv line 3: expected 3 columns, found 1"):
        read_azure_csv(path)


def test_azure_missing_column(tmp_path):
    path = write(tmp_path, "azure.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.68,374\n")
    with pytest.raises(ConfigError, match=r"lacks columns \['GeneratedTokens'\]"):
        read_azure_csv(path)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]}', "{oops"],
            "line 2: not JSON",
        ),
        (
            ['{"timestamp": 0, "input_length": 0, "output_length": 5}'],
            "line 1, column input_length",
        ),
        (['{"timestamp": -3, "input_length": 9, "output_length": 5}'], "line 1, column timestamp"),
        (['{"timestamp": 0, "input_length": 9}'], "line 1, column output_length"),
        (
            ['{"timestamp": 0, "input_length": 9, "output_length": 5, "hash_ids": ["a"]}'],
            "line 1, column hash_ids",
        ),
    ],
)
def test_malformed_mooncake_lines(tmp_path, lines, message):
    path = write(tmp_path, "trace.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message):
        read_mooncake_jsonl(path)


def test_malformed_lengths_csv(tmp_path):
    path = write(tmp_path, "lengths.csv", "num_prefill_tokens,num_decode_tokens\n10,20\n10,2.5\n")
    with pytest.raises(
        ConfigError,
        match=r"^workload.lengths_file: lengths.csv line 3, column num_decode_tokens: '2.5'",
    ):
        read_lengths_csv(path)
    with pytest.raises(ConfigError, match=r"^workload.lengths_file: no such file"):
        read_lengths_csv(tmp_path / "absent.csv")


def test_malformed_servegen_trace(tmp_path):
    path = write(tmp_path, "chunk-1-trace.csv", "0,0,0,,0,0\n600,0.5,1.0,Pareto,1.0,2.0\n")
    with pytest.raises(ConfigError, match=r"line 2, column family/shape"):
        read_servegen_trace(path)
    path = write(tmp_path, "chunk-2-trace.csv", "0,0,0,,0,0\n600,fast,1.0,Gamma,1.0,2.0\n")
    with pytest.raises(ConfigError, match=r"line 2, column rate: 'fast' is not a number"):
        read_servegen_trace(path)
