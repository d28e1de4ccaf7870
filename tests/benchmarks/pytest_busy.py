"""Which tests wait rather than work: per test, its wall seconds and the box's busy and idle
core-seconds over it (/proc/stat), for [1/7] item 7 (the suite's time on 2 cores).

    CI=true T2V_BUSY_OUT=/tmp/busy.jsonl .venv/bin/python -m pytest tests \\
        -p tests.benchmarks.pytest_busy
    python3 tests/benchmarks/pytest_busy.py /tmp/busy.jsonl [--top 40]

A test whose idle core-seconds approach twice its wall time left both cores idle: it sleeps,
polls or waits on a client's back-off, and is cheaper to shorten than one that computes. Each
test's row counts its setup and teardown, so a session fixture's cost lands on the first test
that asks for it. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_split import HZ, box_ticks  # noqa: E402

OUT_ENV = "T2V_BUSY_OUT"
_started: dict[str, tuple[float, int, int]] = {}


def pytest_runtest_logstart(nodeid: str, location) -> None:  # noqa: ANN001 - pytest's hook
    _started[nodeid] = (time.time(), *box_ticks())


def pytest_runtest_logfinish(nodeid: str, location) -> None:  # noqa: ANN001 - pytest's hook
    t0, all0, idle0 = _started.pop(nodeid)
    every, idle = box_ticks()
    busy = (every - all0) - (idle - idle0)
    row = {"id": nodeid, "wall": round(time.time() - t0, 2),
           "busy": round(busy / HZ, 2), "idle": round((idle - idle0) / HZ, 2)}
    with open(os.environ.get(OUT_ENV, "busy.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    with open(args.file) as f:
        rows = [json.loads(line) for line in f]
    wall, busy, idle = (sum(r[k] for r in rows) for k in ("wall", "busy", "idle"))
    print(f"{len(rows)} tests: {wall:.0f} s wall, {busy:.0f} core-s busy, {idle:.0f} idle "
          f"({100 * busy / (busy + idle):.1f} % busy)\n")
    print("| idle core-s | busy core-s | wall s | test |\n|---|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["idle"])[:args.top]:
        print(f"| {r['idle']:.1f} | {r['busy']:.1f} | {r['wall']:.1f} | {r['id']} |")
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for r in rows:
        acc = files[r["id"].split("::")[0]]
        acc[0], acc[1], acc[2], acc[3] = (acc[0] + r["wall"], acc[1] + r["busy"],
                                          acc[2] + r["idle"], acc[3] + 1)
    print("\n| wall s | busy core-s | idle core-s | tests | file |\n|---|---|---|---|---|")
    for name, (w, b, i, n) in sorted(files.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"| {w:.1f} | {b:.1f} | {i:.1f} | {n} | {name} |")


if __name__ == "__main__":
    main()
