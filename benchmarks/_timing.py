"""Timing helpers shared by the benchmark scripts (median of repeats, one run)."""

from __future__ import annotations

import os
import platform
import statistics
import time


def median_time(fn, *, repeats: int = 7, warmup: int = 2, sync=lambda out: None) -> float:
    """Median wall time of ``fn()`` in seconds; ``sync`` blocks on async results."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(fns: dict, *, rounds: int = 9, warmup: int = 2, sync=lambda out: None) -> dict:
    """``{name: (median, min)}`` seconds, the candidates run in turn each round.

    On a shared VM the machine's speed drifts within a run; interleaving
    exposes every candidate to the same drift, so their ratios stay honest.
    """
    for _ in range(warmup):
        for fn in fns.values():
            sync(fn())
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            sync(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(out)
