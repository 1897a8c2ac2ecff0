"""Where a benchmark ran, as it prints it for docs/benchmarks.md: cores, CPU, kernel, Python,
time and load (figures on this shared machine mean little without the load beside them)."""

from __future__ import annotations

import os
import platform
import time


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
