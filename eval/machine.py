"""Measuring on a shared machine: how much of the CPUs other processes used while we measured (`MachineLoad`, and
`QUIET`, the share below which a measurement counts as quiet), and the resident set (`rss_bytes`, `PeakRSS`) behind
the "memory held" every memory mechanism states. Linux; the helpers degrade to `None` / no waiting elsewhere."""

from __future__ import annotations

import os
import threading
import time


QUIET = 0.25  # a measurement is "quiet" when other processes used less than this fraction of the CPUs meanwhile


class MachineLoad:
    """CPU time spent by *other* processes (and the hypervisor: steal) while we measure, as a fraction of the machine.
    Our own threads' time (including OpenMP spin-waits) is excluded. Linux only; None elsewhere."""

    def __init__(self):
        self.ok = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")
        self.ticks = os.sysconf("SC_CLK_TCK") if self.ok else 100
        self.ncpu = os.cpu_count() or 1

    def sample(self):
        if not self.ok:
            return None
        with open("/proc/stat") as f:
            parts = [int(v) for v in f.readline().split()[1:]]
        busy = parts[0] + parts[1] + parts[2] + parts[5] + parts[6] + (parts[7] if len(parts) > 7 else 0)
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ours = int(fields[11]) + int(fields[12])  # utime, stime
        return busy, ours, time.perf_counter()

    def wait_quiet(self, threshold: float = QUIET, window: float = 0.2, max_wait: float = 30.0) -> float:
        """Sleep until other processes use less than `threshold` of the machine over a `window`; give up after
        `max_wait` seconds. Returns the seconds waited."""
        if not self.ok or max_wait <= 0:
            return 0.0
        start = time.perf_counter()
        while time.perf_counter() - start < max_wait:
            before = self.sample()
            time.sleep(window)
            if self.foreign(before, self.sample()) < threshold:
                break
        return time.perf_counter() - start

    def foreign(self, before, after):
        if before is None or after is None:
            return None
        wall = after[2] - before[2]
        other = (after[0] - before[0]) - (after[1] - before[1])
        return max(0.0, other / self.ticks / max(wall, 1e-9) / self.ncpu)


def rss_bytes() -> int:
    """Resident set size of this process now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size every `interval` seconds in a thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = rss_bytes()
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
