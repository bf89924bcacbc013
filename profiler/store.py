"""Point-by-point storage of a profiler run, so that a killed run resumes where it stopped.

While a run is going, ``<out>/.partial/`` holds ``run.json`` (the settings'
and the machine's fingerprint), one Parquet file of steps per finished grid point, and
``points.jsonl`` with one line per finished point (written after its steps, so
a line means the point is complete). ``finish`` merges them into the profile.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from simulator.records.errors import ConfigError
from simulator.records.profile import read_steps, steps_frame, write_steps

PARTIAL = ".partial"
RUN_FILE = "run.json"


class PointStore:
    """Finished points of one run (and of the runs it resumes)."""

    def __init__(self, out_dir: Path, fingerprint: dict[str, Any], resume: bool):
        self.out_dir = Path(out_dir)
        self.dir = self.out_dir / PARTIAL
        self.fingerprint = fingerprint
        self.points: dict[str, dict[str, Any]] = {}
        self.resumed = 0
        run_file = self.dir / RUN_FILE
        if self.dir.exists() and resume and run_file.exists():
            previous = json.loads(run_file.read_text())
            if previous != fingerprint:
                changed = sorted(k for k in set(previous) | set(fingerprint)
                                 if previous.get(k) != fingerprint.get(k))
                raise ConfigError(
                    "resume",
                    f"the unfinished run in {self.dir} used other settings (changed: {', '.join(changed)}); "
                    "rerun with resume=false to start over",
                )
            self._load_finished()
            self.resumed = len(self.points)
        elif self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        run_file.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")

    def _load_finished(self) -> None:
        lines = (self.dir / "points.jsonl").read_text().splitlines() if (self.dir / "points.jsonl").exists() else []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill: that point is redone
            part = record.get("file")
            if part and not (self.dir / part).exists():
                continue
            self.points[record["point_id"]] = record

    def done(self, point_id: str) -> bool:
        return point_id in self.points

    @property
    def next_step(self) -> int:
        return 1 + max((int(r.get("last_step", -1)) for r in self.points.values()), default=-1)

    def record(self, point: dict[str, Any], status: str, rows: list[dict[str, Any]],
               reason: str = "", extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Persist one finished point: its steps first, then its line in points.jsonl."""
        index = len(self.points)
        record = {**point, "status": status, "reason": reason, "steps": len(rows), "index": index, **(extra or {})}
        if rows:
            name = f"steps-{index:04d}.parquet"
            write_steps(steps_frame(rows), self.dir / name)
            record["file"] = name
            record["last_step"] = max(int(r["step"]) for r in rows)
        with open(self.dir / "points.jsonl", "a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.points[record["point_id"]] = record
        return record

    def steps(self) -> pd.DataFrame:
        """All finished points' steps, in step order."""
        frames = [read_steps(self.dir / r["file"]) for r in self.points.values() if r.get("file")]
        if not frames:
            return steps_frame([])
        return pd.concat(frames, ignore_index=True).sort_values("step", kind="stable").reset_index(drop=True)

    def point_records(self) -> list[dict[str, Any]]:
        keep = ("point_id", "phase", "params", "status", "reason", "steps")
        return [{k: r.get(k) for k in keep} for r in sorted(self.points.values(), key=lambda r: r["index"])]

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
