"""What an idle local Ray costs the box ([5/7] item 4: the share of 2 cores Ray's own processes take).

    .venv/bin/python tests/benchmarks/bench_ray_idle.py [--rest 15] [--window 30]

Starts a local Ray as `t2v` does (t2v.runtime.ensure_ray: dashboard on 127.0.0.1, 4 logical
CPUs), waits `--rest` seconds for start-up to settle, then sums the CPU time (user + system,
/proc, cpu_split) of every process that started with it over `--window` seconds, and prints the largest
(by kind, cpu_split.process_kind) and the total as a share of one core. Run it on an otherwise idle box: processes are matched by
start time, not by name, so another Ray started meanwhile would count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
from cpu_split import cpu_seconds  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rest", type=float, default=15.0, help="seconds before measuring")
    ap.add_argument("--window", type=float, default=30.0, help="seconds measured")
    args = ap.parse_args()
    import ray

    from t2v.runtime import ensure_ray

    me, started = psutil.Process(), time.time() - 1
    ensure_ray(num_cpus=4)
    time.sleep(args.rest)
    pids = {p.pid for p in psutil.process_iter(["create_time"])
            if p.pid != me.pid and p.info["create_time"] >= started}
    before = cpu_seconds(pids)
    time.sleep(args.window)
    after = cpu_seconds(pids)
    rows = [(t - before[pid][1], f"{kind} (pid {pid})") for pid, (kind, t) in after.items()
            if pid in before]
    ray.shutdown()
    total = sum(d for d, _ in rows)
    for d, cmd in sorted(rows, reverse=True)[:12]:
        print(f"{d:6.2f} CPU-s  {cmd}")
    print(f"{len(rows)} processes: {total:.2f} CPU-s in {args.window:g} s = "
          f"{100 * total / args.window:.1f} % of one core")


if __name__ == "__main__":
    main()
