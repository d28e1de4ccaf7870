"""What Ray's resident processes cost two training processes on 2 cores: wake-ups ([5/7] item 4).

    .venv/bin/python tests/benchmarks/bench_wakeups.py [--rounds 3] [--steps 150]
        [--procs 14] [--hz 150] [--busy-us 65] [--window 20]

Part 1: an idle Ray actor (a local Ray of 2 CPUs, no dashboard): each of its threads' CPU
seconds and voluntary context switches (wake-ups) over `--window` seconds. Ray's task loop checks
for signals every 10 ms on the worker's main thread, so every Ray worker process, idle or not,
wakes >= 100 times a second.

Part 2: the default demo's DiT step (debug preset, 6x3x8x8 latents, batch 16, one thread, fused
AdamW; what each of `t2v demo`'s two training workers runs) in two plain processes side by side,
alone and beside `--procs` processes that each wake `--hz` times a second for `--busy-us` of
work (Ray's resident actors during a `t2v train` run, as `bench_overhead.py --cpu-window`
counts them), in turns for `--rounds` rounds (a drifting box slows both alike). Prints per
way: wall ms a step, the training thread's CPU ms a step (time.thread_time) and its involuntary
context switches a second, and the wakers' share of the two cores. Pure torch and standard library
beside Ray's part 1; no Ray Train, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_split import read_process, threads  # noqa: E402
from machine import cpu_name  # noqa: E402

TEXT = 14
"""Text positions of a batch before the DiT drops the unused ones (as bench_compile.py)."""


def idle_actor(window: float) -> list[tuple[str, float, float]]:
    """(thread name, CPU s, wake-ups a second) of an idle Ray actor's busiest threads."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=0.1)
        class Idle:
            def pid(self) -> int:
                return os.getpid()

        actor = Idle.remote()
        pid = ray.get(actor.pid.remote())
        time.sleep(5)  # start-up settles
        a = threads(pid)
        time.sleep(window)
        b = threads(pid)
    finally:
        ray.shutdown()
    rows = [(name, cpu - a[t][1], (vol - a[t][2]) / window)
            for t, (name, cpu, vol, _) in b.items() if t in a]
    return sorted(rows, key=lambda r: -r[2])


def waker(hz: float, busy: float, stop: float) -> None:
    """Wake `hz` times a second and spin `busy` seconds each time, until `stop` (time.time)."""
    period = 1.0 / hz
    while time.time() < stop:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy:
            pass
        time.sleep(max(period - (time.perf_counter() - t0), 0.0))


def dit_steps(steps: int, out: mp.Queue, go) -> None:  # noqa: ANN001 - an mp.Event
    """`steps` DiT training steps on one thread, after warming up and `go`: (wall s, thread CPU
    s, involuntary switches) to `out`."""
    import torch

    from t2v.diffusion.flow import flow_loss
    from t2v.models.dit import VideoDiT, dit_config
    from t2v.train.schedule import adamw

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = dit_config("debug", in_channels=6)
    model = VideoDiT(cfg).train()
    opt = adamw(model.parameters(), _optim())
    x, text = torch.randn(16, 6, 3, 8, 8), torch.randn(16, TEXT, cfg.text_dim)

    def step(i: int) -> None:
        g = torch.Generator().manual_seed(i)
        mask = torch.arange(TEXT)[None] < torch.randint(5, 9 + i % 4, (16,), generator=g)[:, None]
        flow_loss(model, x, text, mask, generator=g).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(10):  # warm-up
        step(i)
    out.put("ready")
    go.wait()
    tid = threading.get_native_id()
    inv0 = threads(os.getpid(), tid)[tid][3]
    w0, c0 = time.perf_counter(), time.thread_time()
    for i in range(steps):
        step(i)
    out.put((time.perf_counter() - w0, time.thread_time() - c0,
             threads(os.getpid(), tid)[tid][3] - inv0))


def _optim():  # noqa: ANN202 - the demo's optimizer settings (t2v.config.OptimConfig)
    from t2v.config import OptimConfig

    return OptimConfig(lr=3e-3)


def pair(steps: int, procs: int, hz: float, busy: float) -> dict:
    """Two DiT processes side by side, beside `procs` wakers (0: alone)."""
    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    train = [ctx.Process(target=dit_steps, args=(steps, q, go)) for _ in range(2)]
    for p in train:
        p.start()
    assert [q.get() for _ in train] == ["ready", "ready"]  # both warmed up
    wakers = [ctx.Process(target=waker, args=(hz, busy, time.time() + 3600))
              for _ in range(procs)]
    for p in wakers:
        p.start()
    time.sleep(2)  # the wakers' imports done: they only wake from here on
    cpu0 = sum(read_process(w.pid)[2] for w in wakers)
    go.set()
    got = [q.get() for _ in train]
    background = sum(read_process(w.pid)[2] for w in wakers) - cpu0
    for p in wakers:
        p.kill()
    for p in train + wakers:
        p.join()
    wall = statistics.mean(g[0] for g in got)
    return {"wall_ms": 1000 * wall / steps, "cpu_ms": 1000 * statistics.mean(g[1] for g in got) / steps,
            "invol_per_s": statistics.mean(g[2] / g[0] for g in got),
            "background_cpu_s": background,
            "background_share": background / wall / (os.cpu_count() or 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--procs", type=int, default=14)
    p.add_argument("--hz", type=float, default=150.0)
    p.add_argument("--busy-us", type=float, default=65.0)
    p.add_argument("--window", type=float, default=20.0)
    p.add_argument("--skip-ray", action="store_true", help="part 2 only")
    p.add_argument("--out", default="runs/bench/wakeups.json")
    a = p.parse_args()
    print(f"{cpu_name()}, {os.cpu_count()} cores", flush=True)
    result: dict = {"machine": cpu_name()}
    if not a.skip_ray:
        rows = idle_actor(a.window)
        result["idle_actor"] = rows
        print(f"An idle Ray actor over {a.window:g} s: {len(rows)} threads, "
              f"{sum(r[1] for r in rows):.2f} CPU-s, {sum(r[2] for r in rows):.0f} wake-ups/s")
        for name, cpu, rate in rows[:4]:
            print(f"  {name:16s} {cpu:5.2f} CPU-s  {rate:6.0f} wake-ups/s")
    ways = {"alone": 0, f"beside {a.procs} wakers": a.procs}
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    for r in range(a.rounds):
        for way, n in ways.items():
            runs[way].append(pair(a.steps, n, a.hz, a.busy_us / 1e6))
            print(f"round {r}: {way}: {json.dumps(runs[way][-1])}", flush=True)
    result["pairs"] = runs
    print(f"\nTwo single-thread DiT steps side by side ({a.steps} steps, {a.rounds} rounds; wakers: "
          f"{a.hz:g}/s x {a.busy_us:g} us each), medians:")
    print("| way | wall ms a step | thread CPU ms a step | involuntary switches/s | "
          "the wakers' share of the cores |")
    print("|---|---|---|---|---|")
    for way, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        print(f"| {way} | {med['wall_ms']:.1f} | {med['cpu_ms']:.1f} | "
              f"{med['invol_per_s']:.0f} | {100 * med['background_share']:.1f} % |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
