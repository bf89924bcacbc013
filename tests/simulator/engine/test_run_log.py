"""The step log: single steps and runs joined in order; several logs joined into one copy."""

import numpy as np

from simulator.engine.run_log import STEP_COLUMNS, StepLog


def _log(seed: int) -> tuple[StepLog, dict[str, np.ndarray]]:
    """A log of single steps and runs of steps, mixed, and its columns written out row by row."""
    rng = np.random.default_rng(seed)
    log = StepLog()
    rows: dict[str, list] = {name: [] for name in STEP_COLUMNS}

    def row(*values) -> None:
        for name, value in zip(STEP_COLUMNS, values, strict=True):
            rows[name].append(value)

    t = 0.0
    for _ in range(5):
        for _ in range(int(rng.integers(0, 4))):
            used = int(rng.integers(0, 100))
            log.add_step(t, t + 0.01, used, 3, 1, 0, 3, 3, 0)
            row(t + 0.01, (t + 0.01) - t, used, 3, 1, 0, 3, 3, 0)
            t += 0.01
        k = int(rng.integers(1, 6))
        ends = t + 0.02 * np.arange(1, k + 1)
        used = rng.integers(0, 100, k)
        # one segment: batch 4, 4 running after, no prefill; 2 waiting; one preemption in the last row
        log.add_run(k, ends - 0.02, ends, used, [(0, 4, 4, 0, 0)], 2, {}, {k - 1: 1})
        for i in range(k):
            row(ends[i], ends[i] - (ends[i] - 0.02), used[i], 4, 2, 0, 4, 4, int(i == k - 1))
        t = float(ends[-1])
    return log, {name: np.array(values) for name, values in rows.items()}


def test_join_is_the_logs_one_after_the_other_and_each_keeps_its_rows():
    logs, alone = zip(*(_log(seed) for seed in range(4)), strict=True)
    joined, starts = StepLog.join(logs)
    assert starts == [0, *np.cumsum([len(a["end_s"]) for a in alone]).tolist()]
    for name in STEP_COLUMNS:
        assert np.array_equal(joined[name], np.concatenate([a[name] for a in alone]))
    assert joined["end_s"].dtype == np.float64 and joined["kv_blocks_used"].dtype == np.int32
    # the rows are kept once: a log's rows are a view of the joined columns
    assert all(np.shares_memory(log._chunks["end_s"][0], joined["end_s"]) for log in logs)
    for log, a in zip(logs, alone, strict=True):  # each log reads its own rows after the join
        again = log.columns()
        assert all(np.array_equal(again[name], a[name]) for name in STEP_COLUMNS)
        assert log.kv_before(float(a["end_s"][-1]) + 1) == a["kv_blocks_used"][-1]


def test_an_empty_log_joins_as_no_rows():
    logs = [_log(0)[0], StepLog(), _log(1)[0]]
    joined, starts = StepLog.join(logs)
    assert starts[1] == starts[2]
    assert len(joined["running"]) == starts[-1] == len(logs[0]) + len(logs[2])
