"""What machine a measurement ran on: every benchmark and every run summary prints it.

Figures without their machine are the seeds' mistake; this is the one place that says
what "this machine" is (CPU model, usable cores, OS, Python, GPU where torch sees one).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from pathlib import Path


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else what platform knows). Read
    once per process: parsing /proc/cpuinfo was a measurable part of every batch job's
    summary."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (affinity), not merely those online."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gpu_name() -> str | None:
    """The first CUDA device's name when torch is already imported and sees one."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return None


def cache_bytecode_in_child_processes() -> str:
    """Let the processes a benchmark starts write and reuse ``__pycache__``, as a user's do.

    The dev VM's shell sets ``PYTHONDONTWRITEBYTECODE=1``, so every child process compiled
    this package from source again (~0.05 s per process start, a tenth of a 21K-trade
    run's whole process) while the packages pip installed, NautilusTrader's included, came
    precompiled. Benchmarks that time whole processes call this first; it returns the line
    their header prints.
    """
    if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None:
        return "bytecode: cached in child processes (PYTHONDONTWRITEBYTECODE was set in this shell, unset for them)"
    return "bytecode: cached (PYTHONDONTWRITEBYTECODE not set)"


def describe() -> str:
    """One line: CPU, cores, OS, Python (and the GPU when torch sees one)."""
    line = (
        f"{cpu_model()}, {usable_cores()} cores usable ({os.cpu_count()} online), "
        f"{platform.system()} {platform.release()} {platform.machine()}, "
        f"Python {platform.python_version()}"
    )
    gpu = gpu_name()
    return f"{line}, GPU {gpu}" if gpu else line
