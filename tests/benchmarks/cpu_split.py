"""Where a box's CPU goes, by process: the one psutil sampler the benchmarks share.

`cpu_seconds()` reads every live process's user + system CPU seconds with its kind
(`process_kind`: Ray's workers by their `ray::WHAT` title, Ray's daemons by program);
`by_kind(before, after)` is what each kind spent between two readings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DRIVER = "driver (this process)"


def process_kind(cmdline: list[str]) -> str:
    """A process's kind for the CPU split: Ray names its workers `ray::WHAT` (ray::IDLE is a
    pooled worker, where Ray Data's read tasks run); other Ray processes by their program."""
    first = cmdline[0] if cmdline else "?"
    if first.startswith("ray::"):  # the title names the method running too: ray::X.method
        return re.split(r"[\s.(]", first, maxsplit=1)[0]
    if " " in first:  # a title set by the process itself (Ray's dashboard modules)
        return first.split()[0]
    prog = " ".join(cmdline[:3])
    for name in ("raylet", "gcs_server", "dashboard_agent", "dashboard.py", "log_monitor",
                 "monitor.py", "runtime_env"):
        if name in prog:
            return name
    name = Path(first).name or "?"
    if name.startswith("python"):  # by what it runs: a module, a script or -c code
        args = [a for a in cmdline[1:] if a not in ("-B", "-u", "-E", "-s", "-I")]
        if args[:1] == ["-m"] and len(args) > 1:
            return f"python -m {args[1]}"
        if args[:1] == ["-c"]:
            return "python -c"
        if args:
            return f"python {Path(args[0]).name}"
    return name


def cpu_seconds(pids: set[int] | None = None) -> dict[int, tuple[str, float]]:
    """{pid: (kind, CPU seconds so far)} of every live process (or of `pids`); this process
    is the kind `DRIVER`."""
    import psutil

    me, out = os.getpid(), {}
    for p in psutil.process_iter(["cmdline"]):
        if pids is not None and p.pid not in pids:
            continue
        try:
            t = p.cpu_times()
            kind = DRIVER if p.pid == me else process_kind(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[p.pid] = (kind, t.user + t.system)
    return out


def by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
            *, new: bool = True, least: float = 0.01) -> dict[str, float]:
    """CPU seconds each kind spent from `before` to `after`, largest first, those under `least`
    left out; a process absent from `before` counts whole if `new`, else not at all."""
    out: dict[str, float] = {}
    for pid, (kind, t) in after.items():
        if pid in before:
            t -= before[pid][1]
        elif not new:
            continue
        out[kind] = out.get(kind, 0.0) + t
    return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v >= least}
