"""Plots drawn in a background process are the plots drawn in this one, and failures surface."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

from simulator.engine.loop import simulate
from simulator.plots import PLOTS, BackgroundPlots, plotted_part, write_plots
from simulator.records.engine_config import EngineConfig
from tests.simulator.conftest import LinearModel, make_workload


@pytest.fixture(scope="module")
def result():
    w = make_workload(300, rate=6.0, seed=4, output=(100, 800))
    # a small cache so the timeline has thousands of steps with KV pressure
    engine = EngineConfig(num_gpu_blocks_override=400, max_num_seqs=64)
    return simulate(w, engine, LinearModel())


def test_plotted_part_is_what_the_plots_draw(result):
    part = plotted_part(result, points=500)
    assert len(result.timeline["time_s"]) > 500 and len(part.timeline["time_s"]) == 500
    # the same samples the plots take from the full timeline
    idx = np.linspace(0, len(result.timeline["time_s"]) - 1, 500).astype(int)
    for column in ("time_s", "kv_usage", "running", "waiting"):
        np.testing.assert_array_equal(part.timeline[column], result.timeline[column][idx])
    np.testing.assert_array_equal(part.requests["e2e_s"], result.requests["e2e_s"])


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_background_plots_are_byte_identical_to_inline_ones(result, tmp_path):
    (tmp_path / "inline").mkdir()
    inline = write_plots(result, tmp_path / "inline", "t")
    plots = BackgroundPlots()
    (tmp_path / "bg").mkdir()
    plots.submit(result, tmp_path / "bg", "t")
    paths = plots.wait()
    assert [p.name for p in paths] == list(PLOTS) == [p.name for p in inline]
    for a, b in zip(inline, paths, strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_drawing_error_is_raised_and_cancel_ends_the_process(result, tmp_path):
    plots = BackgroundPlots()
    process = plots._process
    plots.submit(result, tmp_path / "missing" / "dir", "t")  # savefig cannot write there
    with pytest.raises(RuntimeError, match="plots: FileNotFoundError"):
        plots.wait()
    assert not process.is_alive()
    idle = BackgroundPlots()
    process = idle._process
    idle.cancel()
    assert not process.is_alive() and process.exitcode == 0
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_an_error_in_the_forked_drawing_is_raised(result, tmp_path, monkeypatch):
    import simulator.plots as plots_module

    def broken(*args):
        raise ValueError("no CDF today")

    last = list(PLOTS)[-1]
    monkeypatch.setitem(plots_module.PLOTS, last, broken)
    plots = BackgroundPlots()
    plots.submit(result, tmp_path, "t")
    with pytest.raises(RuntimeError, match=f"drawing {last} failed"):
        plots.wait()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(list(PLOTS)[:-1])
