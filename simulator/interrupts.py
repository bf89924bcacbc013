"""Ctrl-C and SIGTERM around a run's outputs: held while files are written, and the one line
that says what a stopped run left (shared by the single-replica and the cluster entry points)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

from simulator.records.summary import Summary


@contextmanager
def deferred_signals():
    """Hold SIGINT and SIGTERM while files are written (one note line on the first); the
    yielded list holds the signals received, so the caller can exit 130 afterwards."""
    import signal
    import threading

    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def hold(signum, frame) -> None:
        if not received:
            print("interrupt received: finishing writing the results first", file=sys.stderr)
        received.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def note_interrupt(summary: Summary, out_dir: Path, deferred: list[int]) -> None:
    """One line on stderr for a run stopped early (partial results) or interrupted while writing
    (then exit 130 here; a partial run exits 130 in ``main``)."""
    partial = summary.sections.get("partial")
    if partial:
        print(f"interrupted at {partial['interrupted_at_s']:.0f} s of simulated time: partial results "
              f"({partial['unfinished']} requests unfinished, {partial['not_arrived']} not yet arrived) "
              f"in {out_dir}", file=sys.stderr)
    if deferred and not partial:
        print(f"interrupted while writing: every file was written to {out_dir}", file=sys.stderr)
        sys.exit(130)
