"""How many CPU threads PyTorch and onnxruntime use: ``--threads N``, or ``0`` for a count that does
not oversubscribe the machine.

PyTorch's and onnxruntime's defaults take every core whatever else runs: on a busy 2-core machine
that made ``predict`` 4.7x and training 6x slower than one thread, because the threads wait for each
other behind the other processes. Auto takes ``$OMP_NUM_THREADS`` when the user set it, else the
cores this process may run on (CPU affinity and a cgroup quota) minus those other processes keep
busy right now (the kernel's count of runnable threads), at least one. ``benchmarks/bench_threads.py`` measures the choice on an
idle and on a loaded machine.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def choose_threads(requested: int = 0) -> int:
    """``requested`` when above 0; else ``$OMP_NUM_THREADS`` when set to a number; else the usable
    cores not already busy (``busy_cores``), at least 1."""
    if requested > 0:
        return int(requested)
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = usable_cores()
    return max(1, min(cores, int(cores - busy_cores() + 0.5)))


def busy_cores(samples: int = 5, interval: float = 0.01) -> float:
    """How many cores other processes keep busy right now: the runnable threads the kernel counts
    (``/proc/loadavg``'s ``running/total``) less this process's own (its numerical libraries' thread
    pools may be spinning right after import), the least of a few samples ``interval`` apart so a
    passing spike does not count. The 1-minute load average lags a minute behind (a process that
    just ended still counts), so it is only the fallback where there is no ``/proc``."""
    try:
        others = []
        for i in range(samples):
            if i:
                time.sleep(interval)
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
            others.append(running - _own_running())
        return float(max(0, min(others)))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _own_running() -> int:
    """This process's threads the kernel counts as runnable (state ``R``; at least this one)."""
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:  # a thread that ended meanwhile
            continue
        count += stat[stat.rindex(")") + 2:].startswith("R")
    return max(1, count)


def apply_threads(requested: int = 0) -> int:
    """Set the thread count for this process (``choose_threads``) and return it: PyTorch's intra-op
    threads if it is loaded (or ``OMP_NUM_THREADS`` for when it loads), onnxruntime sessions read
    ``current()``."""
    global _CURRENT
    _CURRENT = choose_threads(requested)
    if "torch" in sys.modules and sys.modules["torch"] is not None:
        import torch

        torch.set_num_threads(_CURRENT)
    else:  # read by PyTorch's OpenMP runtime when it is first loaded
        os.environ["OMP_NUM_THREADS"] = str(_CURRENT)
    return _CURRENT


_CURRENT = 0


def current() -> int:
    """The count ``apply_threads`` set (0: never set; the libraries' own defaults apply)."""
    return _CURRENT
