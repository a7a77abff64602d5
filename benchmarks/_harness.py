"""Measurement helpers shared by the benchmark scripts (not part of the package).

Each measured configuration runs in a fresh Python process so that its peak RSS
(``ru_maxrss``) belongs to it alone; the worker prints one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def maxrss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux's VmHWM belongs to the current address space and starts afresh at exec;
    ru_maxrss does not (it keeps the parent's peak across fork + exec), so a worker
    started by a large driver would report the driver's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak() -> None:
    """Start VmHWM afresh from the current RSS (Linux ≥ 4.0: ``echo 5 > /proc/self/clear_refs``),
    so that a peak read afterwards belongs to the measured call, not to data generation."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def cpu_s() -> float:
    """User + system CPU seconds of this process (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    import torch

    try:
        import psutil

        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = "? RAM"
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs, {mem}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {sys.version.split()[0]}")


class Timer:
    """Wall and CPU seconds of a block, and the CPU utilisation (≈ 1 on a quiet machine)."""

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        self._c0, self._t0 = cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self._t0
        self.cpu = cpu_s() - self._c0
        self.utilisation = self.cpu / max(self.seconds * self.threads, 1e-9)
        return False


def git_commit() -> str:
    """Short HEAD of the checkout, "+dirty" when the library itself has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "unicon_dist"], capture_output=True, text=True,
                               cwd=REPO).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def spawn(script: Path, worker: str, params: dict) -> dict:
    """Run ``script --worker NAME --params JSON`` in a fresh process; its last stdout line is JSON."""
    cmd = [sys.executable, str(script), "--worker", worker, "--params", json.dumps(params)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        return {"error": f"worker exited with {proc.returncode}", "stderr_tail": tail, "process_wall_s": wall, **params}
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "no JSON from worker", "stdout": proc.stdout[-2000:], "process_wall_s": wall, **params}
    out["process_wall_s"] = wall
    return out


def use_checkout() -> None:
    """Benchmark the ``unicon_dist`` checkout the scripts sit in."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
