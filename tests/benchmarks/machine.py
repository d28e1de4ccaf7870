"""What box a benchmark figure came from: the CPU model and its vector width (AVX-512 boxes of
this class train ~2-3x faster than AVX2-only ones, so a figure without it cannot be compared),
the core count and Python. Every benchmark prints this beside its rows."""

from __future__ import annotations

import os
import platform
import subprocess


def cpu_name() -> str:
    """`lscpu`'s model name and vector width, e.g. "Intel(R) Xeon(R) Processor (AVX-512)"."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                  if line.startswith("Model name")), platform.machine())
    return f"{model} ({'AVX-512' if 'avx512f' in out else 'AVX2'})"


def describe() -> str:
    """"<cpu_name>, <n> cores, Python <version>"."""
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}"
