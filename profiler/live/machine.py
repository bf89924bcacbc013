"""The machine's state around a live run: load average, memory and busy processes.

Live timings on a shared machine are only as good as its quietness, so every
run records what else was using the CPU, read from /proc (Linux).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_ticks() -> dict[int, tuple[int, str]]:
    """pid -> (user+system ticks, command line) for every readable process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        name = stat[stat.find("(") + 1: stat.rfind(")")]
        out[int(entry.name)] = (int(rest[11]) + int(rest[12]), cmd.strip() or f"[{name}]")
    return out


def _steal_ticks() -> int | None:
    """Ticks the hypervisor gave this VM's CPUs to other guests (``steal`` in /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    return int(fields[8]) if fields[0] == "cpu" and len(fields) > 8 else None


def _meminfo() -> dict[str, int]:
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return values


def busy_processes(window_s: float = 0.5, min_cpu: float = 0.05, exclude: set[int] | None = None
                   ) -> list[dict]:
    """Processes that used more than ``min_cpu`` of a core over ``window_s``, busiest first."""
    exclude = exclude or set()
    before = _cpu_ticks()
    time.sleep(window_s)
    after = _cpu_ticks()
    busy = []
    for pid, (ticks, cmd) in after.items():
        if pid in exclude or pid == os.getpid() or pid not in before:
            continue
        share = (ticks - before[pid][0]) / CLOCK_TICKS / window_s
        if share >= min_cpu:
            busy.append({"pid": pid, "cpu": round(share, 3), "cmd": cmd[:160]})
    return sorted(busy, key=lambda p: -p["cpu"])


def machine_state(exclude: set[int] | None = None, window_s: float = 0.5) -> dict:
    """Load average, CPU count, memory and the other busy processes, right now.

    ``others_cpu`` sums the CPU share of busy processes outside ``exclude``
    (pass the server's pids); ``quiet`` is True when that is under 0.2 cores.
    """
    load1, load5, load15 = os.getloadavg()
    others = busy_processes(window_s=window_s, exclude=exclude)
    others_cpu = round(sum(p["cpu"] for p in others), 3)
    mem = _meminfo()
    return {
        "time_unix": time.time(),
        "load_avg": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": mem.get("MemTotal"),
        "mem_available_bytes": mem.get("MemAvailable"),
        "others_cpu": others_cpu,
        "quiet": others_cpu < 0.2,
        "busy_processes": others[:10],
    }


class CpuWatch:
    """CPU used by other processes over a whole run: snapshot at the start, compare at the end.

    Processes that both start and exit inside the window are missed; ones that
    start inside it count fully.
    """

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.before = _cpu_ticks()
        self.steal_before = _steal_ticks()

    def stop(self, exclude: set[int] | None = None) -> dict:
        """{"others_cpu_mean": cores used on average by other processes, "quiet", "busiest",
        "steal_cpu_mean": cores the hypervisor took for other guests (None off Linux)}.

        Steal is what no process list shows: on a shared VM a neighbour's load
        slows every step of a run while ``others_cpu_mean`` stays at zero."""
        exclude = (exclude or set()) | {os.getpid()}
        elapsed = max(time.monotonic() - self.started, 1e-6)
        after = _cpu_ticks()
        used = []
        for pid, (ticks, cmd) in after.items():
            if pid in exclude:
                continue
            share = (ticks - self.before.get(pid, (0, ""))[0]) / CLOCK_TICKS / elapsed
            if share > 0.01:
                used.append({"pid": pid, "cpu": round(share, 3), "cmd": cmd[:160]})
        used.sort(key=lambda p: -p["cpu"])
        total = round(sum(p["cpu"] for p in used), 3)
        steal_after = _steal_ticks()
        steal = (None if steal_after is None or self.steal_before is None
                 else round((steal_after - self.steal_before) / CLOCK_TICKS / elapsed, 3))
        return {"window_s": round(elapsed, 2), "others_cpu_mean": total, "quiet": total < 0.2,
                "busiest": used[:5], "steal_cpu_mean": steal}
