"""PNG plots of a run, like the study's: KV usage, running/waiting, latency CDFs."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import traceback
from pathlib import Path

import numpy as np

from simulator.records.run_result import RunResult


def _figure(width: float, height: float, ncols: int = 1, margins: dict | None = None):
    """A figure and its axes on the Agg canvas, without pyplot (much lighter to import).

    Fixed margins stand in for tight_layout, which costs more than drawing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(**(margins or {"left": 0.08, "right": 0.98, "bottom": 0.14, "top": 0.9}))
    axes = fig.subplots(1, ncols)
    return fig, axes


#: at most this many samples of a time series are drawn
PLOT_POINTS = 4000


def _downsample(t: np.ndarray, *ys: np.ndarray, points: int = PLOT_POINTS):
    """Keep plots light: at most ``points`` samples, evenly spaced in index."""
    if len(t) <= points:
        return (t, *ys)
    idx = np.linspace(0, len(t) - 1, points).astype(int)
    return (t[idx], *(y[idx] for y in ys))


def _finish_time_series(fig, ax, path: Path, ylabel: str, title: str) -> Path:
    """Label, legend and save a time-series figure."""
    ax.set_xlabel("time (s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=110)
    return path


def plot_kv_usage(result: RunResult, path: Path, title: str = "") -> Path:
    tl = result.timeline
    t, u = _downsample(tl["time_s"], tl["kv_usage"] * 100)
    mean = result.summary.kv_usage["mean"] * 100
    fig, ax = _figure(9, 3.5)
    ax.plot(t, u, lw=0.8, color="tab:blue", label="KV-cache usage")
    ax.axhline(mean, color="tab:red", ls="--", lw=1, label=f"mean {mean:.1f}%")
    ax.set_ylim(0, 105)
    return _finish_time_series(fig, ax, path, "KV-cache usage (%)", title or "KV-cache usage over time")


def plot_queues(result: RunResult, path: Path, title: str = "") -> Path:
    tl = result.timeline
    t, r, w = _downsample(tl["time_s"], tl["running"], tl["waiting"])
    fig, ax = _figure(9, 3.5)
    ax.plot(t, r, lw=0.8, label="running")
    ax.plot(t, w, lw=0.8, label="waiting")
    return _finish_time_series(fig, ax, path, "requests", title or "Running and waiting requests")


def plot_latency_cdfs(result: RunResult, path: Path, title: str = "") -> Path:
    req = result.requests
    done = req["status"] == "completed"
    margins = {"left": 0.05, "right": 0.99, "bottom": 0.17, "top": 0.86, "wspace": 0.25}
    fig, axes = _figure(13, 3.2, ncols=4, margins=margins)
    for ax, key, label in zip(
        axes,
        ("ttft_s", "ttfvt_s", "tpot_s", "e2e_s"),
        ("TTFT (s)", "TTFVT (s)", "TPOT (s)", "E2E (s)"),
        strict=True,
    ):
        v = np.sort(req[key][done].astype(float))
        v = v[np.isfinite(v)]
        if v.size:
            ax.plot(v, np.arange(1, v.size + 1) / v.size, lw=1.2)
            ax.axvline(np.percentile(v, 99), color="grey", ls=":", lw=1)
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("CDF")
    fig.suptitle(title or "Latency CDFs (dotted: p99)")
    fig.savefig(path, dpi=110)
    return path


#: every plot of a run: file name and drawing function
PLOTS = {"kv_usage.png": plot_kv_usage, "queues.png": plot_queues, "latency_cdf.png": plot_latency_cdfs}


def write_plots(result: RunResult, out_dir: str | Path, title: str = "") -> list[Path]:
    """Write kv_usage.png, queues.png and latency_cdf.png into out_dir."""
    out = Path(out_dir)
    return [draw(result, out / name, title) for name, draw in PLOTS.items()]


def plotted_part(result: RunResult, points: int = PLOT_POINTS) -> RunResult:
    """The part of a run the plots draw: the timeline downsampled as they downsample it,
    the latency columns and the KV summary (small enough to send to another process)."""
    tl = result.timeline
    columns = ("time_s", "kv_usage", "running", "waiting")
    sampled = _downsample(*(np.asarray(tl[c]) for c in columns), points=points)
    req = result.requests
    return RunResult(
        requests={k: np.asarray(req[k]) for k in ("status", "ttft_s", "ttfvt_s", "tpot_s", "e2e_s")},
        timeline=dict(zip(columns, sampled, strict=True)),
        summary={"kv_usage": {"mean": result.summary.kv_usage["mean"]}},
        metadata={},
    )


def _write_plots_in_two(result: RunResult, out_dir: str, title: str) -> list[Path]:
    """``write_plots`` with the latency CDFs drawn by a forked copy of this process (matplotlib
    already imported) while this one draws the time series: the two cores share the drawing."""
    if not hasattr(os, "fork"):
        return write_plots(result, out_dir, title)
    out = Path(out_dir)
    *here, (last, draw_last) = PLOTS.items()
    pid = os.fork()
    if pid == 0:  # the copy: draw, then leave without running the parent's exit handlers
        code = 1
        try:
            draw_last(result, out / last, title)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    try:
        paths = [draw(result, out / name, title) for name, draw in here]
    finally:
        _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"drawing {last} failed (see the traceback above)")
    return [*paths, out / last]


def _plot_worker(conn) -> None:
    """Import matplotlib, then draw the (result, out_dir, title) received; send back paths or an error."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401  (the import is the point: do it early)
        import matplotlib.figure  # noqa: F401

        job = conn.recv()
        if job is not None:
            conn.send([str(p) for p in _write_plots_in_two(*job)])
    except Exception as err:  # reported to the parent, which raises it
        conn.send(f"{type(err).__name__}: {err}")
    finally:
        conn.close()


class BackgroundPlots:
    """Draw a run's plots in a forked process that imports matplotlib while the run computes.

    On a machine with two cores the plotting library loads alongside the
    simulation instead of after it, and the figures are drawn while the run's
    tables are written. (Two drawing processes were slower: their imports
    compete with the simulation for the cores.) Where fork is not available
    the plots are drawn in this process when the result is submitted.
    """

    def __init__(self) -> None:
        self._conn = self._process = None
        if "fork" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("fork")
            self._conn, child = ctx.Pipe()
            self._process = ctx.Process(target=_plot_worker, args=(child,), daemon=True)
            self._process.start()
            child.close()
        self._paths: list[Path] = []

    def submit(self, result: RunResult, out_dir: str | Path, title: str = "") -> None:
        """Hand over the run to draw (only the part the plots need crosses processes)."""
        if self._process is None:
            self._paths = write_plots(result, out_dir, title)
        else:
            self._conn.send((plotted_part(result), str(out_dir), title))

    def wait(self) -> list[Path]:
        """The plots' paths once written; raises RuntimeError if drawing failed."""
        if self._process is not None:
            reply = self._conn.recv()
            self._close()
            if isinstance(reply, str):
                raise RuntimeError(f"plots: {reply}")
            self._paths = [Path(p) for p in reply]
        return self._paths

    def cancel(self) -> None:
        """Stop the plotting process without drawing (the run failed)."""
        if self._process is not None:
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._close()

    def _close(self) -> None:
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
        self._conn.close()
        self._conn = self._process = None


def plot_kv_per_replica(result: RunResult, path: str | Path, title: str = "") -> Path:
    """One line per replica: its KV-cache usage (%) after each of its steps."""
    tl = result.timeline
    replicas = [r.get("replica", i) for i, r in enumerate(result.summary.get("replicas", []))]
    roles = {r.get("replica", i): r.get("role", "replica") for i, r in enumerate(result.summary.get("replicas", []))}
    fig, ax = _figure(9, 3.5)
    for index in replicas or np.unique(tl["replica"]).tolist():
        mask = tl["replica"] == index
        t, u = _downsample(tl["time_s"][mask], tl["kv_usage"][mask] * 100,
                           points=max(400, 4000 // max(len(replicas), 1)))
        role = roles.get(index, "replica")
        ax.plot(t, u, lw=0.8, drawstyle="steps-post", label=f"{role} {index}" if role != "replica" else f"replica {index}")
    ax.set_ylim(0, 105)
    return _finish_time_series(fig, ax, Path(path), "KV-cache usage (%)", title or "KV-cache usage per replica")
