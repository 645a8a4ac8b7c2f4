"""Peak memory of one call, on CPU or CUDA: for the benchmarks, the demo and the tests that assert no large
temporaries (not part of the installed package: it measures, it does not adapt)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from typing import Any, Callable

import torch

# What the CPU profiler's C++ side (kineto) prints on stderr at every start/stop, and on a machine without a GPU an
# "ERROR ... gpuGetDeviceCount failed" line: noise to a user, who reads ERROR as a failure.
_PROFILER_NOISE = re.compile(r"^(USDT:|ERROR:.*gpuGetDeviceCount|.*(profiler_start|profiler_stop|ActivityProfiler))")


@contextlib.contextmanager
def _quiet_profiler_stderr():
    """Capture the process's stderr (file descriptor 2, which C++ writes to) while profiling, then pass on every line
    that is not the profiler's own log, so real warnings still reach the console."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines():
                if line.strip() and not _PROFILER_NOISE.match(line):
                    print(line, file=sys.stderr)


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[Any, int]:
    """Run fn() and return (its result, peak bytes allocated above the level at the start of the call)."""
    result, peak, _ = memory_levels(fn, device)
    return result, peak


def memory_levels(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[Any, int, int]:
    """Run fn() and return (its result, peak bytes allocated above the level at the start of the call, bytes still
    allocated at its end above that level: what fn left alive, e.g. what a forward keeps for backward).

    CUDA: the caching allocator's max_memory_allocated. CPU: every allocation and free the profiler records,
    summed in time order; the call runs on one thread because the profiler does not see allocations made by
    ATen's OpenMP worker threads (per-thread blocks would otherwise go uncounted). The CPU profiler knows the size
    only of blocks allocated while it runs: a block from before the call that fn frees counts as 0 freed (torch
    warns "Memory block of unknown size"), so free such blocks before the call (zero_grad outside it).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - start, torch.cuda.memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _quiet_profiler_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    finally:
        torch.set_num_threads(threads)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        level += e.nbytes()
        peak = max(peak, level)
    return result, peak, level
