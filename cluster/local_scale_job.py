"""Watch a Ray cluster scale: ask for more one-CPU actors than the head holds, then let go.

Run against the local fake multi-node cluster (``cluster/local.yaml``) or any autoscaling cluster:

    python cluster/local_scale_job.py --address 127.0.0.1:6379 --actors 3

It prints a timestamped line whenever the set of alive nodes changes, and one JSON summary line
last (``{"initial": ..., "peak": ..., "final": ..., "up_s": ..., "down_s": ...}``) that the
local autoscaling test reads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import ray


@ray.remote(num_cpus=1)
class Holder:
    """Occupies one CPU until killed: the demand the autoscaler has to meet."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def alive_nodes() -> dict[str, dict[str, float]]:
    """Node id -> its total resources, for nodes that are alive now."""
    return {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}


def wait_until_at_most(target: int, timeout_s: float, t0: float) -> int:
    """Poll until at most ``target`` nodes are alive; log every change with its time."""
    seen = -1
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        count = len(alive_nodes())
        if count != seen:
            print(f"[{time.monotonic() - t0:6.1f}s] alive nodes: {count}", flush=True)
            seen = count
        if count <= target:
            return count
        time.sleep(0.5)
    raise TimeoutError(f"alive nodes stayed at {seen} (wanted <= {target}) for {timeout_s:.0f} s; "
                       "is idle_timeout_minutes longer than --timeout?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--address", default="auto", help="GCS address of the cluster")
    parser.add_argument("--actors", type=int, default=3, help="one-CPU actors to hold at once")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per phase")
    args = parser.parse_args(argv)
    if args.actors < 1:
        raise ValueError(f"--actors must be >= 1, got {args.actors}")

    ray.init(address=args.address, configure_logging=False, log_to_driver=False)
    t0 = time.monotonic()
    initial = alive_nodes()
    print(f"[   0.0s] start: {len(initial)} node(s), "
          f"{sum(r.get('CPU', 0) for r in initial.values()):g} CPUs", flush=True)

    holders = [Holder.remote() for _ in range(args.actors)]
    # ray.get blocks until every actor is placed, i.e. until the new nodes have joined.
    placed = ray.get([h.node.remote() for h in holders], timeout=args.timeout)
    up_s = time.monotonic() - t0
    peak = len(alive_nodes())
    print(f"[{up_s:6.1f}s] scale-up: {args.actors} actors on {len(set(placed))} node(s), "
          f"{peak} alive", flush=True)

    for h in holders:
        ray.kill(h)
    released = time.monotonic()
    print(f"[{released - t0:6.1f}s] actors released; waiting for the idle timeout", flush=True)
    final = wait_until_at_most(len(initial), args.timeout, t0)
    down_s = time.monotonic() - released
    print(f"[{time.monotonic() - t0:6.1f}s] scale-down: back to {final} node(s)", flush=True)
    print(json.dumps({"initial": len(initial), "peak": peak, "final": final,
                      "actor_nodes": len(set(placed)), "up_s": round(up_s, 1),
                      "down_s": round(down_s, 1)}), flush=True)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
