"""The gradient all-reduce of the demo DiT over gloo: alone, and after or during the backward pass.

    .venv/bin/python tests/benchmarks/bench_reduce.py [--steps 300] [--rounds 2]
        [--ways deepspeed,overlap-1MiB,overlap-256KiB,overlap-4MiB]

Part 1: an all-reduce of 1, 3.9 (the demo DiT's 1.02M fp32 gradients) and 15.3 MiB between two
idle processes (gloo, one thread each): wall time, and the calling thread's CPU (the transfer
runs in gloo's own threads).

Part 2: the demo's DiT (the `debug` preset at the default demo's latent shape 6x3x8x8, MiniLM
width text, 16 samples a rank) trained by DeepSpeed's engine at ZeRO-0 in two processes, as
t2v's workers configure it, no Ray (random data in memory: the step's cost is the model's);
`deepspeed`: DeepSpeed's own reduction after the backward pass; `overlap-SIZE`:
t2v/train/overlap.py's buckets of SIZE sent while the backward pass runs, as `t2v train` does
at fp32 ZeRO-0. The ways run in turns for `--rounds` rounds (shared boxes drift); per way and
round, ms a step of wall time and of the training thread's CPU in each phase (forward,
backward, what is left of the reduction, optimizer step), rank 0, after 20 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.benchmarks.machine import describe  # noqa: E402

WARMUP = 20
SIZES = {"1MiB": 1 << 20, "256KiB": 1 << 18, "4MiB": 1 << 22}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=2)


def _alone(rank: int, port: int, reps: int, result: str) -> None:
    import torch
    import torch.distributed as dist

    _init(rank, port)
    rows = []
    for mib in (1.0, 1_016_856 * 4 / 2**20, 15.3):
        x = torch.randn(int(mib * 2**20 / 4))
        for _ in range(10):
            dist.all_reduce(x)
        dist.barrier()
        t, c = time.perf_counter(), time.thread_time()
        for _ in range(reps):
            dist.all_reduce(x)
        rows.append({"MiB": round(mib, 1), "wall_ms": 1000 * (time.perf_counter() - t) / reps,
                     "thread_cpu_ms": 1000 * (time.thread_time() - c) / reps})
        dist.barrier()
    if rank == 0:
        Path(result).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _train(rank: int, port: int, way: str, steps: int, result: str) -> None:
    import torch
    import torch.distributed as dist

    from t2v.demo import PROFILES
    from t2v.diffusion.flow import flow_loss
    from t2v.models.dit import VideoDiT, dit_config
    from t2v.train.overlap import OverlappedReduce
    from t2v.train.schedule import adamw
    from t2v.train.worker import deepspeed_config, initialize_engine

    _init(rank, port)
    cfg = PROFILES["default"]().dit.model_copy(update={"zero_stage": 0})
    torch.manual_seed(0)
    model = VideoDiT(dit_config(cfg.model, **{"in_channels": 6, "text_dim": 384,
                                              **cfg.model_overrides}))
    eng = initialize_engine(model, adamw(model.parameters(), cfg.optim), None,
                            deepspeed_config(cfg, False), False)
    reducer = None
    if way != "deepspeed":
        eng.enable_backward_allreduce = False
        reducer = OverlappedReduce(eng.module.parameters(),
                                   bucket_bytes=SIZES[way.split("-", 1)[1]])
    spent: dict[str, list[float]] = {k: [0.0, 0.0] for k in ("forward", "backward", "reduce",
                                                              "step")}
    own = eng.allreduce_gradients

    def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - DeepSpeed's reduction
        w, c = time.perf_counter(), time.thread_time()
        out = own(*args, **kwargs)
        spent["reduce"][0] += time.perf_counter() - w
        spent["reduce"][1] += time.thread_time() - c
        spent["backward"][0] -= time.perf_counter() - w  # counted apart from the backward
        spent["backward"][1] -= time.thread_time() - c
        return out

    eng.allreduce_gradients = timed
    g = torch.Generator().manual_seed(rank)
    b = cfg.batch_size
    for step in range(steps):
        if step == WARMUP:
            for v in spent.values():
                v[0] = v[1] = 0.0
            t0, c0 = time.perf_counter(), time.thread_time()
        x, text = torch.randn(b, 6, 3, 8, 8, generator=g), torch.randn(b, 16, 384, generator=g)
        mask = torch.arange(16)[None] < torch.randint(4, 17, (b, 1), generator=g)
        marks = [(time.perf_counter(), time.thread_time())]
        loss = flow_loss(eng, x, text, mask, generator=g)
        marks.append((time.perf_counter(), time.thread_time()))
        if reducer is not None:
            reducer.arm()
        eng.backward(loss)
        marks.append((time.perf_counter(), time.thread_time()))
        if reducer is not None:
            reducer.finish()
        marks.append((time.perf_counter(), time.thread_time()))
        eng.step()
        marks.append((time.perf_counter(), time.thread_time()))
        for k, (a, z) in zip(("forward", "backward", "reduce", "step"), zip(marks, marks[1:], strict=False),
                             strict=True):
            spent[k][0] += z[0] - a[0]
            spent[k][1] += z[1] - a[1]
    n = steps - WARMUP
    row = {k: [1000 * w / n, 1000 * c / n] for k, (w, c) in spent.items()}
    row["total"] = [1000 * (time.perf_counter() - t0) / n, 1000 * (time.thread_time() - c0) / n]
    if rank == 0:
        Path(result).write_text(json.dumps(row))
    dist.destroy_process_group()


def spawn(fn, *args) -> object:  # noqa: ANN001 - a worker function
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = f"{tmp}/result.json"
        mp.spawn(fn, args=(_port(), *args, result), nprocs=2, join=True)
        return json.loads(Path(result).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=100, help="part 1: all-reduces per size")
    p.add_argument("--ways", default="deepspeed,overlap-1MiB,overlap-256KiB,overlap-4MiB")
    p.add_argument("--out", default="runs/bench/reduce.json")
    args = p.parse_args()
    ways = args.ways.split(",")
    for way in ways:
        if way != "deepspeed" and way.split("-", 1)[-1] not in SIZES:
            p.error(f"--ways: {way!r} is not deepspeed or overlap-{{{','.join(SIZES)}}}")
    alone = spawn(_alone, args.reps)
    rows = [{"round": r, "way": way, **spawn(_train, way, args.steps)}
            for r in range(args.rounds) for way in ways]
    print(f"\nmachine: {describe()}")
    print("| all-reduce of | wall ms | the calling thread's CPU ms |\n|---|---|---|")
    for a in alone:
        print(f"| {a['MiB']} MiB | {a['wall_ms']:.2f} | {a['thread_cpu_ms']:.2f} |")
    print(f"\nthe demo DiT, DeepSpeed ZeRO-0, 2 processes x 1 thread x 16 samples, {args.steps} "
          "steps; ms a step, rank 0 (wall / the training thread's CPU)")
    print("| round | way | forward | backward | reduce (left) | step | total |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['way']} | " + " | ".join(
            f"{r[k][0]:.1f} / {r[k][1]:.1f}"
            for k in ("forward", "backward", "reduce", "step", "total")) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"alone": alone, "rows": rows, "args": vars(args)},
                                         indent=1))


if __name__ == "__main__":
    main()
