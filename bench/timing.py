"""Timing and peak memory of one callable. All times in milliseconds, memory in bytes.

GPU: ``triton.testing.do_bench`` with quantiles (it flushes L2 between calls and syncs the device).
CPU: ``time.perf_counter`` around many warm calls; ``time_cpu_side_by_side`` interleaves the contenders
of one measurement round by round, and counts each call's minor page faults (``getrusage``, outside the timed
span): memory a call maps afresh is faulted in on first write, at a cost that depends on what happened to
those pages before (on a VM with free page reporting, 4-7 ms or 35-44 ms for the same 64 MiB on huge pages).
Both report the median and the 20th/80th percentiles, so a noisy shared machine shows as a wide p20–p80 band
rather than as a wrong median.
"""
from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass(frozen=True)
class Timing:
    """Median, 20th and 80th percentile of one call, in ms, over ``repeats`` warm calls; ``minor_faults``: the
    median of the minor page faults of the process during one call (None: not counted)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    minor_faults: float | None = None


def time_cpu(fn: Callable[[], object], min_repeats: int = 3, max_repeats: int = 40, budget_s: float = 0.3) -> Timing:
    """Warm ``fn`` once, then call it until ``budget_s`` seconds or ``max_repeats`` calls (at least ``min_repeats``)."""
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        begin = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - begin) * 1e3)
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0], 1)
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), deciles[1], deciles[7], len(samples))


def time_cpu_side_by_side(calls: dict[str, Callable[[], object]], min_repeats: int = 5, max_repeats: int = 40,
                          budget_s: float = 0.3) -> dict[str, Timing | Exception]:
    """``time_cpu`` for several calls at once, taking turns: each round calls each of them once, so that a
    neighbour's load on a shared machine falls on all contenders alike and their ratio stays meaningful.

    Each call takes part in rounds until it has spent ``budget_s`` of its own (at least ``min_repeats`` calls,
    at most ``max_repeats``), so that a slow contender leaves the race early instead of spending the faster
    ones' rounds (with one budget for the whole race, a 300 ms peer left 3 calls to each of the others: their
    medians rested on 3 samples); the race ends when fewer than two calls are left in it (one when it has one),
    so that every sample is taken side by side. A call that raises is dropped from the race and its exception
    returned in its place.
    """
    results: dict[str, Timing | Exception] = {}
    samples: dict[str, list[float]] = {}
    faults: dict[str, list[int]] = {}
    for name, fn in calls.items():
        try:
            fn()
            samples[name], faults[name] = [], []
        except Exception as failure:  # reported by the caller as a failed row
            results[name] = failure
    for _ in range(max_repeats):
        racing = [name for name, times in samples.items() if len(times) < min_repeats or sum(times) < budget_s * 1e3]
        if len(racing) < min(2, len(samples)) or not racing:
            break
        for name in racing:
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            begin = time.perf_counter()
            try:
                calls[name]()
            except Exception as failure:
                results[name] = failure
                del samples[name]
                continue
            samples[name].append((time.perf_counter() - begin) * 1e3)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    for name, times in samples.items():
        deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
        results[name] = Timing(statistics.median(times), deciles[1], deciles[7], len(times), statistics.median(faults[name]))
    return results


def time_gpu(fn: Callable[[], object], warmup_ms: float = 10, rep_ms: float = 40) -> Timing:
    """``triton.testing.do_bench`` median and p20/p80 of ``fn`` on the current CUDA device."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
    # do_bench runs as many calls as fit in rep_ms after estimating one call's time.
    return Timing(median, p20, p80, -1)


def time_call(fn: Callable[[], object], device: torch.device) -> Timing:
    return time_gpu(fn) if device.type == "cuda" else time_cpu(fn)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak CUDA memory one call allocates above what was allocated before it; None on the CPU.

    On the CPU, tensors come from c10's allocator, which neither tracemalloc nor torch tracks, so
    nothing meaningful can be reported without a profiler run.
    """
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
