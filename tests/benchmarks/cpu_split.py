"""Where a box's CPU goes, by process: the one /proc reader the benchmarks share (standard
library only, so that bench_suite_cpu.py runs before `make` has built .venv).

`box_ticks()` reads the whole box's busy and idle time; `read_process(pid)` one process;
`cpu_seconds()` every live process's user + system CPU
seconds with its kind
(`process_kind`: Ray's workers by their `ray::WHAT` title, Ray's daemons by program);
`by_kind(before, after)` is what each kind spent between two readings; `threads(pid)` a
process's threads (CPU, context switches), `switches(pid)` their sums, `switches_by_kind` the
rates between two readings.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DRIVER = "driver (this process)"
HZ = os.sysconf("SC_CLK_TCK")


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


def box_ticks() -> tuple[int, int]:
    """(all, idle + iowait) clock ticks of every core since boot: /proc/stat's cpu line."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(v), v[3] + v[4]


def read_process(pid: int) -> tuple[list[str], str, float] | None:
    """(command line, stat's short name, user + system CPU seconds) of a live process from
    /proc; None once it is gone or unreadable. A kernel thread has an empty command line."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    cmdline = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    return cmdline, name, (int(fields[11]) + int(fields[12])) / HZ


def cpu_seconds(pids: set[int] | None = None) -> dict[int, tuple[str, float]]:
    """{pid: (kind, CPU seconds so far)} of every live process (or of `pids`); this process
    is the kind `DRIVER`."""
    me, out = os.getpid(), {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or (pids is not None and int(d) not in pids):
            continue
        got = read_process(int(d))
        if got is not None:
            out[int(d)] = (DRIVER if int(d) == me else process_kind(got[0]), got[2])
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


def threads(pid: int, tid: int | None = None) -> dict[int, tuple[str, float, int, int]] | None:
    """{tid: (name, user + system CPU seconds, voluntary, involuntary context switches)} of a
    process's threads (or of one); None once the process is gone. A voluntary switch is a
    thread going to sleep (each wake-up ends one), an involuntary one a thread taken off its
    core while it could run. A thread gone between listing and reading is left out."""
    try:
        tids = [tid] if tid is not None else [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return None
    out = {}
    for t in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{t}/stat").read_text()
            status = Path(f"/proc/{pid}/task/{t}/status").read_text().splitlines()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        sw = {ln.split(":")[0]: int(ln.split()[1]) for ln in status if "ctxt_switches" in ln}
        out[t] = (stat[stat.index("(") + 1:stat.rindex(")")],
                  (int(fields[11]) + int(fields[12])) / HZ,
                  sw["voluntary_ctxt_switches"], sw["nonvoluntary_ctxt_switches"])
    return out


def switches(pid: int) -> tuple[int, int] | None:
    """(voluntary, involuntary) context switches of all of a process's threads so far (see
    `threads`); None once the process is gone."""
    got = threads(pid)
    if got is None:
        return None
    return sum(v[2] for v in got.values()), sum(v[3] for v in got.values())


def all_switches(pids: set[int]) -> dict[int, tuple[int, int]]:
    """{pid: switches(pid)} of those of `pids` still alive."""
    return {pid: got for pid in pids if (got := switches(pid)) is not None}


def switches_by_kind(kinds: dict[int, tuple[str, float]], before: dict[int, tuple[int, int]],
                     after: dict[int, tuple[int, int]], seconds: float) -> dict[str, list[float]]:
    """{kind: [processes, voluntary/s, involuntary/s]} of the processes in both readings
    (`kinds` as `cpu_seconds` gives them), most wake-ups first."""
    out: dict[str, list[float]] = {}
    for pid, (vol, invol) in after.items():
        if pid not in before or pid not in kinds:
            continue
        row = out.setdefault(kinds[pid][0], [0, 0.0, 0.0])
        row[0] += 1
        row[1] += (vol - before[pid][0]) / seconds
        row[2] += (invol - before[pid][1]) / seconds
    return dict(sorted(out.items(), key=lambda kv: -kv[1][1]))
