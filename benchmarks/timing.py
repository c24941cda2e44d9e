"""Timing shared by the benchmark scripts: device-synchronised clocks, interleaved medians, A/B ratios.

Scripts run as ``python benchmarks/<name>.py`` and import this file as ``timing`` (the script's folder is
first on ``sys.path``). Ratios are taken inside one process with the two sides interleaved, so that load
from other work on the machine falls on both sides alike.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

import torch

CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def synchronize(device: str | torch.device) -> None:
    """Wait for queued kernels, so that a clock read after it covers the work (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str | torch.device = "cpu", clock: Callable[[], float] = time.perf_counter,
          calls: int = 1) -> float:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls."""
    synchronize(device)
    start = clock()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (clock() - start) / calls


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                        device: str | torch.device = "cpu", clock: Callable[[], float] = time.perf_counter,
                        calls: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the functions taking turns round after round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timed(fn, device, clock, calls))
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_ratio(a: Callable[[], object], b: Callable[[], object], rounds: int, warmup: int = 1,
                      device: str | torch.device = "cpu", clock: Callable[[], float] = time.perf_counter) -> dict:
    """Median over rounds of time(a) / time(b), the two run back to back in alternating order."""
    for _ in range(warmup):
        a(), b()
    ratios, times_a, times_b = [], [], []
    for i in range(rounds):
        if i % 2 == 0:
            ta, tb = timed(a, device, clock), timed(b, device, clock)
        else:
            tb, ta = timed(b, device, clock), timed(a, device, clock)
        ratios.append(ta / tb), times_a.append(ta), times_b.append(tb)
    return {"ratio": statistics.median(ratios), "ms_a": 1e3 * statistics.median(times_a),
            "ms_b": 1e3 * statistics.median(times_b)}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
