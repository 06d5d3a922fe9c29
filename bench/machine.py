"""The machine a benchmark runs on: how busy other processes keep it (``CpuMeter``, ``wait_idle``),
what it is (``machine_info``) and which commit is measured (``git_state``). Standard library only,
so benchmark worker processes can import it without paying for torch.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

BUSY_CORES = 0.25  # other processes using more CPU than this during a measurement: contended


class CpuMeter:
    """CPU used by *other* processes while we measure, in cores: (all busy CPU time on the machine,
    from /proc/stat) minus (ours and our reaped children's, from getrusage), over wall time. On a
    machine with as many cores as threads, anything above ~0.1 means the figures are contended."""

    def __init__(self, workers: list | tuple = ()):
        self.workers = list(workers)  # live Worker processes: their CPU is ours too
        self.t, self.busy, self.mine = time.perf_counter(), self._busy(), self._mine()

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")

    def _mine(self) -> float:
        import resource

        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                      resource.getrusage(resource.RUSAGE_CHILDREN))
                   ) + sum(w.cpu_s() for w in self.workers)

    def other(self) -> tuple[float, float]:
        """(CPU seconds used by other processes, wall seconds) since the meter started."""
        wall = time.perf_counter() - self.t
        return max(0.0, (self._busy() - self.busy) - (self._mine() - self.mine)), wall

    def other_cores(self) -> float:
        cpu, wall = self.other()
        return cpu / wall if wall > 0 else float("nan")


def wait_idle(max_wait: float, say, workers: list | tuple = (), threshold: float = BUSY_CORES,
              window: float = 3.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes use < ``threshold`` cores over ``window`` s;
    returns the last measured load. ``say(text)`` reports the waiting every 30 s."""
    start = time.perf_counter()
    said = -1e9
    while True:
        m = CpuMeter(workers)
        time.sleep(window)
        load = m.other_cores()
        now = time.perf_counter()
        if load < threshold or now - start >= max_wait:
            return load
        if now - said >= 30:
            say(f"machine busy ({load:.2f} cores used by other processes): waiting "
                f"(up to {max_wait - (now - start):.0f} s more)")
            said = now


def git_state() -> dict:
    """The commit measured, and whether the package had uncommitted changes (read-only git calls)."""
    def git(*a: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent.parent), *a], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "opengemma")
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "opengemma_uncommitted_changes": None if dirty is None else bool(dirty)}


def machine_info(threads: int) -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    info = {"cpu": cpu, "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "threads": threads, "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return info
