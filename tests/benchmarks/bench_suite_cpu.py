"""Where a command's CPU goes, by process kind, and how much of the box sat idle: run e.g. the
test suite under it ([1/7] item 7: the suite's wall time on 2 cores).

    python3 tests/benchmarks/bench_suite_cpu.py --out /tmp/suite_cpu.json -- bash .ci/run

Standard library only (reads /proc), so it runs before `make` has built .venv. Every `--every`
seconds it reads every process's user + system CPU and names it with `cpu_split.process_kind`
(a pooled Ray worker is `ray::IDLE` until it becomes an actor or task; its CPU from then on
counts under that name); the box's busy share comes from /proc/stat. A process that starts and
ends between two readings is missed, and one that ends counts up to its last reading.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_split import box_ticks, process_kind, read_process  # noqa: E402
from machine import describe  # noqa: E402


def kind_and_cpu(pid: int) -> tuple[str, float] | None:
    """(kind, CPU seconds) of a live process; None once it is gone. No command line: a kernel
    thread, or a process on its way out (`Sampler` keeps the kind it had); stat's short name
    stands in."""
    got = read_process(pid)
    if got is None:
        return None
    cmdline, name, seconds = got
    return (process_kind(cmdline) if cmdline else f"[{name}]"), seconds


class Sampler:
    def __init__(self, every: float) -> None:
        self.every, self.stop = every, threading.Event()
        self.seen: dict[int, float] = {}  # pid -> CPU seconds counted so far
        self.kind: dict[int, str] = {}  # pid -> its last kind other than ray::IDLE, if any
        self.last: dict[int, str] = {}  # pid -> the kind it was counted under last
        self.cpu: dict[str, float] = {}  # kind -> CPU seconds
        self.before = {int(d) for d in os.listdir("/proc") if d.isdigit()}
        self.me = os.getpid()

    def sample(self) -> None:
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == self.me:
                continue
            pid, got = int(d), kind_and_cpu(int(d))
            if got is None:
                continue
            kind, seconds = got
            if kind.startswith("[") and pid in self.last:  # exiting: its kind so far
                kind = self.last[pid]
            self.last[pid] = kind
            if pid not in self.seen:  # processes already running count from now on
                self.seen[pid] = seconds if pid in self.before else 0.0
            if kind != "ray::IDLE" or pid not in self.kind:
                self.kind[pid] = kind
            self.cpu[kind] = self.cpu.get(kind, 0.0) + seconds - self.seen[pid]
            self.seen[pid] = seconds

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)
        self.sample()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="", help="write the result as JSON here too")
    ap.add_argument("--every", type=float, default=1.0, help="seconds between readings")
    ap.add_argument("--top", type=int, default=20, help="kinds in the printed table")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command to run after --")
    sampler = Sampler(args.every)
    all0, idle0 = box_ticks()
    t0 = time.time()
    thread = threading.Thread(target=sampler.run, daemon=True)
    thread.start()
    rc = subprocess.call(command)
    wall = time.time() - t0
    sampler.stop.set()
    thread.join()
    all1, idle1 = box_ticks()
    busy = 1 - (idle1 - idle0) / max(1, all1 - all0)
    cpu = dict(sorted(sampler.cpu.items(), key=lambda kv: -kv[1]))
    total = sum(cpu.values())
    started: dict[str, int] = {}
    for pid, kind in sampler.kind.items():
        if pid not in sampler.before:
            started[kind] = started.get(kind, 0) + 1
    print(f"\n`{' '.join(command)}`: exit {rc}, {wall:.0f} s wall, the box busy "
          f"{busy:.1%} of it ({describe()}); {total:.0f} CPU-s counted")
    print("| kind | CPU-s | share | processes started |")
    print("|---|---|---|---|")
    for kind, s in [kv for kv in cpu.items() if kv[1] >= 0.05][:args.top]:
        print(f"| {kind} | {s:.1f} | {s / total:.1%} | {started.get(kind, 0)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": command, "rc": rc, "wall_s": wall, "busy": busy, "machine": describe(),
            "cpu_s": cpu, "processes_started": started}, indent=1))
    return rc


if __name__ == "__main__":
    sys.exit(main())
