"""Where the demo DiT's training time goes: Ray Train + DeepSpeed against bare torch loops.

    .venv/bin/python tests/benchmarks/bench_overhead.py [--steps 200] [--only bare,ddp,ray]
        [--profile default|long] [--batch N]

The demo's DiT (the `debug` preset on latents of the demo's VAE geometry — the default profile's
`vae.model_overrides` — MiniLM text, the profile's DiT batch: global 64 since training overhead
round 16, 32 in the rows before; `--profile long`: `t2v demo --long`'s 17x64x64 clips, global
batch 32 (16 before round 16), the DiT in the profile's 1x4x4 patches: 1x2x2 in rows from
before 144d18b; `--batch N`: N a worker in every way) trained for `--steps` optimizer steps
four ways, on the same cores:
- `bare`: one process, torch on all cores, the global batch, AdamW: the maths alone;
- `ddp`: two processes (torch.distributed over gloo, DistributedDataParallel, 1 thread and
  half the batch each): what splitting the batch over two processes costs, without Ray or
  DeepSpeed;
- `ds`: the same two processes with DeepSpeed's engine as t2v's workers configure it (ZeRO-2
  and ZeRO-0), data in memory: DeepSpeed's share, without Ray Train or Ray Data;
- `ray`: `t2v train` as the demo runs it (Ray Train, DeepSpeed ZeRO-0 as the demo's DiT, Ray
  Data streaming, EMA, metrics), 2 workers x half the batch;
- `engine`: one process, one thread, one rank's batch: a bare step against DeepSpeed's engine
  at ZeRO-0 and ZeRO-2 (no communication): what the engine itself costs;
samples/s after a warm-up, and for `ray` the per-phase split the workers measure (data wait,
forward+backward, the gradient reduction after it with the wait for the other rank, optimizer
step, EMA, reporting); for `ds` the same reduction, timed the same way. Target ([5/7] item 4):
`ray` >= 0.8x `bare`. Prints a markdown table; --out keeps the numbers.

Shared 2-core boxes drift by 10-25 % between runs minutes apart, so `--rounds N` runs the
chosen ways N times in turn (ray, bare, ...) and reports each round's ratio and the median.
`--cpu-window S` samples every process's CPU time (/proc, cpu_split) over S seconds of the training of
each `ray` run in the first round, grouped by process kind (workers, Ray Data read tasks, Ray's own processes):
where the two cores go besides the training workers; and each kind's context switches a second
(wake-ups, and times taken off a core: `bench_wakeups.py` measures what those cost); and
each training worker's threads (the training thread, gloo's, Ray's) with their CPU and switches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_split import (  # noqa: E402
    DRIVER,
    all_switches,
    by_kind,
    cpu_seconds,
    switches_by_kind,
    threads,
)

from t2v import storage  # noqa: E402
from t2v.config import EncodeConfig, SynthConfig, TrainConfig  # noqa: E402
from tests.benchmarks.machine import describe  # noqa: E402

WORKERS = 2
"""The demo's DiT stage: 2 workers x the profile's batch_size (global batch 64 by default)."""
WORKER_KIND = "ray::RayTrainWorker"
"""Ray Train's training workers, as `cpu_split.process_kind` names them."""


def make_latents(tmp: str, profile: str = "default") -> tuple[str, str]:
    """1024 clips of the demo profile's geometry (8 shards of 128, as the demo) encoded by a VAE
    shaped as its (random weights: the step cost is the DiT's, whatever the latents hold)."""
    import torch

    from t2v.data.encode import run_encode
    from t2v.data.synthetic import run_synth
    from t2v.demo import PROFILES
    from t2v.models.latent import fit_latent_stats
    from t2v.models.package import save_package
    from t2v.models.text import TextEncoderConfig
    from t2v.models.vae import CausalVideoVAE, vae_config

    raw, vae_uri, out = f"{tmp}/raw", f"{tmp}/vae", f"{tmp}/latents"
    demo = PROFILES[profile]()
    frames, size = demo.synth.frames, demo.synth.size
    run_synth(SynthConfig(out=raw, num=1024, frames=frames, size=size, shard_size=128, seed=0))
    torch.manual_seed(0)
    vae = CausalVideoVAE(vae_config(demo.vae.model, **demo.vae.model_overrides)).eval()
    with torch.no_grad():
        sample = torch.rand(4, 3, frames, size, size) * 2 - 1
        shift, scale = fit_latent_stats(vae.encode(sample).mean)
    vae.set_latent_stats(shift=shift, scale=scale)
    save_package(vae_uri, vae=vae, text=TextEncoderConfig())
    run_encode(EncodeConfig(src=raw, out=out, vae=vae_uri, batch_size=16))
    return out, vae_uri


def demo_config(out: str, shards: str, vae: str, steps: int,
                profile: str = "default", batch: int | None = None) -> TrainConfig:
    from t2v.demo import PROFILES

    dit = PROFILES[profile]().dit
    return dit.model_copy(update={
        "out": out, "name": "ray", "vae": vae, "steps": steps, "ckpt_every": steps,
        "batch_size": batch or dit.batch_size,
        "val_every": steps, "val_samples": 0, "log_every": max(1, steps // 8),
        "data": dit.data.model_copy(update={"shards": shards})})


def load_latents(shards: str) -> dict:
    """Every training sample in memory: latent, text, mask tensors (decoded as training
    decodes them: t2v.data.latents.decode_latent_row)."""
    import numpy as np
    import torch

    from t2v.data.latents import decode_latent_row
    from t2v.data.shards import iter_shard_samples, shard_uris

    rows = [r for key, fields in iter_shard_samples(shard_uris(shards)[:-1])
            for r in decode_latent_row({"__key__": key, **fields})]
    return {"latent": torch.from_numpy(np.stack([r["latent"] for r in rows])).float(),
            "text": torch.from_numpy(np.stack([r["text"] for r in rows])).float(),
            "mask": torch.from_numpy(np.stack([r["mask"] for r in rows])).bool()}


def build(cfg: TrainConfig, data: dict):  # noqa: ANN201 - (model, optimizer)
    import torch

    from t2v.models.dit import VideoDiT
    from t2v.train.dit_task import dit_geometry
    from t2v.train.schedule import adamw

    torch.manual_seed(cfg.seed)
    model = VideoDiT(dit_geometry(cfg, data["latent"].shape[1], data["text"].shape[-1]))
    return model, adamw(model.parameters(), cfg.optim)  # as t2v's workers make it


def torch_update(model, opt):  # noqa: ANN001, ANN201 - a loss -> None step
    """A plain optimizer step: backward, clip at 1, AdamW."""
    import torch

    def update(loss) -> None:  # noqa: ANN001
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return update


def loop(model, update, data: dict, steps: int, batch: int, rank: int = 0,  # noqa: ANN001
         world: int = 1, warmup: int = 20) -> float:
    """Train `steps` steps on this process's share of each global batch (`update(loss)` steps
    the weights); samples/s (global) after `warmup` steps."""
    import torch

    from t2v.diffusion.flow import flow_loss

    g = torch.Generator().manual_seed(rank)
    n = data["latent"].shape[0]
    t0 = None
    for step in range(steps):
        if step == warmup:
            t0 = time.perf_counter()
        idx = torch.randint(0, n, (batch,), generator=g)
        update(flow_loss(model, data["latent"][idx], data["text"][idx], data["mask"][idx],
                         generator=g))
    return (steps - warmup) * batch * world / (time.perf_counter() - t0)


def bare(cfg: TrainConfig, shards: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    data = load_latents(shards)
    model, opt = build(cfg, data)
    return {"way": "bare", "processes": 1, "threads": torch.get_num_threads(),
            "samples_per_s": loop(model, torch_update(model, opt), data, steps,
                                  WORKERS * cfg.batch_size)}


def _ddp_worker(rank: int, world: int, cfg_json: str, shards: str, steps: int, port: int,
                result: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrainConfig.model_validate_json(cfg_json)
    data = load_latents(shards)
    model, opt = build(cfg, data)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rate = loop(ddp, torch_update(ddp, opt), data, steps, cfg.batch_size, rank, world)
    if rank == 0:
        Path(result).write_text(json.dumps(rate))
    dist.destroy_process_group()


def _ds_worker(rank: int, world: int, cfg_json: str, shards: str, steps: int, port: int,
               result: str) -> None:
    """DeepSpeed's engine as t2v's workers make it (their config), data in memory, no Ray."""
    import torch
    import torch.distributed as dist

    from t2v.train.worker import deepspeed_config, initialize_engine

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = TrainConfig.model_validate_json(cfg_json)
    data = load_latents(shards)
    model, opt = build(cfg, data)
    eng = initialize_engine(model, opt, None, deepspeed_config(cfg, False), False)
    reduce, spent = eng.allreduce_gradients, []

    def timed_reduce(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - as t2v's `reduce` phase
        t0 = time.perf_counter()
        out = reduce(*args, **kwargs)
        spent.append(time.perf_counter() - t0)
        return out

    eng.allreduce_gradients = timed_reduce

    def update(loss) -> None:  # noqa: ANN001
        eng.backward(loss)
        eng.step()

    rate = loop(eng, update, data, steps, cfg.batch_size, rank, world)
    warm = spent[20:]  # as loop's warm-up
    Path(f"{result}.rank{rank}").write_text(json.dumps(sum(warm) / max(len(warm), 1)))
    if rank == 0:
        Path(result).write_text(json.dumps(rate))
    dist.destroy_process_group()


def spawn2(worker, cfg: TrainConfig, shards: str, steps: int, result: str) -> float:  # noqa: ANN001
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, cfg.model_dump_json(), shards, steps, port, result), nprocs=2,
             join=True)
    return json.loads(Path(result).read_text())


def ddp(cfg: TrainConfig, shards: str, steps: int, tmp: str) -> dict:
    return {"way": "ddp", "processes": 2, "threads": 1,
            "samples_per_s": spawn2(_ddp_worker, cfg, shards, steps, f"{tmp}/ddp.json")}


def ds(cfg: TrainConfig, shards: str, steps: int, tmp: str) -> list[dict]:
    """Two processes with DeepSpeed's engine at ZeRO-2 and ZeRO-0 over gloo, no Ray: what
    DeepSpeed costs at two ranks, apart from what Ray Train and Ray Data cost."""
    rows = []
    for stage in (2, 0):
        result = f"{tmp}/ds{stage}.json"
        rate = spawn2(_ds_worker, cfg.model_copy(update={"zero_stage": stage}), shards, steps,
                      result)
        # The gradient reduction after the backward pass, as the `ray` rows' phase "reduce".
        reduce = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(2)]
        rows.append({"way": f"deepspeed ZeRO-{stage}, no Ray", "processes": 2, "threads": 1,
                     "samples_per_s": rate, "phases": {"reduce": sum(reduce) / 2}})
    return rows


def engine(cfg: TrainConfig, shards: str, steps: int, tmp: str) -> list[dict]:
    """One process, one thread, one rank's batch (the profile's batch_size): a bare step
    against DeepSpeed's engine at ZeRO-0 and ZeRO-2 (world size 1: no communication), ms per
    step after a warm-up."""
    import socket

    import torch
    import torch.distributed as dist

    from t2v.diffusion.flow import flow_loss
    from t2v.train.worker import deepspeed_config, initialize_engine

    torch.set_num_threads(1)
    data = load_latents(shards)
    half = cfg.batch_size
    batch = {k: v[:half] for k, v in data.items()}
    g = torch.Generator().manual_seed(0)

    def ms(step_fn, n: int) -> float:
        for _ in range(10):
            step_fn()
        t0 = time.perf_counter()
        for _ in range(n):
            step_fn()
        return (time.perf_counter() - t0) / n * 1000

    model, opt = build(cfg, data)

    def bare_step() -> None:
        loss = flow_loss(model, batch["latent"], batch["text"], batch["mask"], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    rows = [{"way": "engine: bare, 1 process", "ms_per_step": ms(bare_step, steps)}]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        for stage in (0, 2):
            run = cfg.model_copy(update={"zero_stage": stage, "batch_size": half})
            m, o = build(run, data)
            eng = initialize_engine(m, o, None, deepspeed_config(run, False), False)

            def ds_step(eng=eng) -> None:  # noqa: ANN001
                loss = flow_loss(eng, batch["latent"], batch["text"], batch["mask"],
                                 generator=g)
                eng.backward(loss)
                eng.step()

            rows.append({"way": f"engine: DeepSpeed ZeRO-{stage}, 1 process",
                         "ms_per_step": ms(ds_step, steps)})
    finally:
        dist.destroy_process_group()
    return rows


class CpuSampler(threading.Thread):
    """Once `metrics` holds two logged intervals (training under way), every process's CPU
    seconds over `window` s, summed by `process_kind`; `shares` is left empty if training
    ended first."""

    def __init__(self, metrics: str, window: float) -> None:
        super().__init__(daemon=True)
        self.metrics, self.window, self.shares = metrics, window, {}
        self.switches: dict[str, list[float]] = {}
        self.worker_threads: list[list[tuple[str, float, float, float]]] = []
        self.stopped = threading.Event()

    def _logged(self) -> int:
        try:
            return Path(self.metrics).read_text().count("samples_per_s")
        except OSError:
            return 0

    def run(self) -> None:
        while self._logged() < 2:
            if self.stopped.wait(0.5):
                return
        before = cpu_seconds()
        workers = [pid for pid, (kind, _) in before.items() if kind == WORKER_KIND]
        th0 = {pid: threads(pid) or {} for pid in workers}
        sw0, t0 = all_switches(set(before)), time.perf_counter()
        if self.stopped.wait(self.window):
            return
        after = cpu_seconds()
        th1 = {pid: threads(pid) or {} for pid in workers}
        sw1, dt = all_switches(set(after)), time.perf_counter() - t0
        for pid in workers:  # each worker's threads that used >= 0.2 % of a core
            got = [(name, cpu - th0[pid][t][1], (vol - th0[pid][t][2]) / dt,
                    (inv - th0[pid][t][3]) / dt)
                   for t, (name, cpu, vol, inv) in th1[pid].items() if t in th0[pid]]
            self.worker_threads.append(sorted((g for g in got if g[1] >= 0.002 * dt),
                                              key=lambda g: -g[1]))
        shares = by_kind(before, after, new=False)
        self.shares = {k: v for k, v in shares.items() if k != DRIVER}
        rates = switches_by_kind(after, sw0, sw1, dt)
        self.switches = {k: v for k, v in rates.items() if k != DRIVER and v[1] >= 1}


def ray_train(cfg: TrainConfig, variant: str, cpu_window: float = 0.0) -> dict:
    """`t2v train` with `variant` = comma-free KEY=VALUE overrides joined by '+', e.g.
    'zero_stage=0+data.prefetch_batches=1' ('' = the demo's settings)."""
    from t2v.configfile import deep_merge, parse_overrides
    from t2v.train.trainer import run_train

    over = [kv for kv in variant.split("+") if kv]
    name = "ray-" + ("-".join(kv.replace("=", "").replace(".", "") for kv in over) or "demo")
    cfg = TrainConfig.model_validate(deep_merge(cfg.model_dump(),
                                                parse_overrides([*over, f"name={name}"])))
    sampler = None
    if cpu_window:
        sampler = CpuSampler(storage.join(cfg.out, cfg.name, "metrics.jsonl"), cpu_window)
        sampler.start()
    try:
        run_train(cfg)
    finally:
        if sampler is not None:
            sampler.stopped.set()
            sampler.join()
    rows = [json.loads(x) for x in storage.read_text(
        storage.join(cfg.out, cfg.name, "metrics.jsonl")).splitlines()]
    logged = [r for r in rows if "samples_per_s" in r][1:]  # the first holds start-up
    mean = lambda k: sum(r.get(k, 0.0) for r in logged) / len(logged)  # noqa: E731
    return {"way": f"ray {variant or '(demo)'}", "processes": cfg.num_workers, "threads": 1,
            "samples_per_s": mean("samples_per_s"), "data_wait": mean("data_wait_frac"),
            "phases": {k[len("phase_"):]: mean(k) for k in logged[-1] if k.startswith("phase_")},
            **({"cpu_window": cpu_window, "cpu_s": sampler.shares,
                "switches_per_s": sampler.switches,
                "worker_threads": sampler.worker_threads} if sampler else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--only", default="bare,ddp,ds,ray,engine")
    p.add_argument("--profile", default="default", choices=["default", "long"],
                   help="whose DiT stage: the default demo's (6x3x8x8 latents, 32 a worker) "
                        "or --long's (6x5x16x16, 16 a worker)")
    p.add_argument("--variants", default="",
                   help="Ray Train runs, separated by ',': each '' (the demo's settings) or "
                        "KEY=VALUE[+KEY=VALUE...], e.g. ',zero_stage=0,data.prefetch_batches=1'")
    p.add_argument("--batch", type=int, default=None,
                   help="samples a worker a step for every way (the bare loop takes twice "
                        "that); default: the profile's DiT batch_size")
    p.add_argument("--out", default="runs/bench/overhead.json")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the ways this many times in turn; each round's ratio and the median")
    p.add_argument("--cpu-window", type=float, default=0.0,
                   help="seconds of each first-round ray run's training to split the CPU of")
    args = p.parse_args()
    ways = args.only.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        import ray

        def start_ray() -> None:
            from t2v.runtime import local_ray_defaults

            local_ray_defaults(os.environ)  # as t2v starts a local Ray (t2v.runtime.ensure_ray)
            ray.init(num_cpus=4, include_dashboard=False, configure_logging=False,
                     log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False

        start_ray()
        try:
            shards, vae = make_latents(tmp, args.profile)
        finally:
            ray.shutdown()
        for r in range(args.rounds):
            cfg = demo_config(f"{tmp}/runs{r}", shards, vae, args.steps, args.profile,
                              args.batch)
            if "ray" in ways:
                start_ray()
                try:
                    for variant in args.variants.split(","):
                        rows.append({"round": r, **ray_train(
                            cfg, variant, args.cpu_window if r == 0 else 0.0)})
                        print(json.dumps(rows[-1]), flush=True)
                finally:
                    ray.shutdown()
            if "bare" in ways:
                rows.append({"round": r, **bare(cfg, shards, args.steps)})
                print(json.dumps(rows[-1]), flush=True)
        if "ddp" in ways:
            rows.append(ddp(cfg, shards, args.steps, tmp))
            print(json.dumps(rows[-1]), flush=True)
        if "ds" in ways:
            rows.extend(ds(cfg, shards, args.steps, tmp))
            print(json.dumps(rows[-2:]), flush=True)
        if "engine" in ways:
            probes = engine(cfg, shards, min(args.steps, 60), tmp)
            print(json.dumps(probes), flush=True)
    bares = {r.get("round", 0): r["samples_per_s"] for r in rows if r["way"] == "bare"}
    print(f"\nmachine: {describe()}; "
          f"the {args.profile} demo's DiT (debug preset), global batch "
          f"{WORKERS * cfg.batch_size}, {args.steps} steps")
    print("| round | way | processes x threads | samples/s | x bare (same round) |")
    print("|---|---|---|---|---|")
    ratios: dict[str, list[float]] = {}
    for r in rows:
        base = bares.get(r.get("round", 0)) or next(iter(bares.values()), None)
        ratio = r["samples_per_s"] / base if base else None
        if ratio is not None:
            ratios.setdefault(r["way"], []).append(ratio)
        print(f"| {r.get('round', '-')} | {r['way']} | {r['processes']} x {r['threads']} | "
              f"{r['samples_per_s']:.1f} | {'-' if ratio is None else f'{ratio:.2f}'} |")
    if args.rounds > 1:
        for way, got in ratios.items():
            if way != "bare":
                print(f"{way}: x bare median {statistics.median(got):.2f} over "
                      f"{len(got)} rounds ({', '.join(f'{x:.2f}' for x in got)})")
    for r in rows:
        if r.get("cpu_s"):
            total = sum(r["cpu_s"].values())
            print(f"{r['way']}: CPU seconds in {r['cpu_window']:g} s of training "
                  f"({os.cpu_count() * r['cpu_window']:g} on {os.cpu_count()} cores; "
                  f"{total:.1f} used): " + ", ".join(
                      f"{k} {v:.2f}" for k, v in r["cpu_s"].items()))
            print(f"{r['way']}: context switches a second in that window, by kind (processes: "
                  "voluntary = wake-ups / involuntary = taken off a core): " + ", ".join(
                      f"{k} ({n:.0f}): {vol:.0f} / {inv:.0f}"
                      for k, (n, vol, inv) in r["switches_per_s"].items()))
            for i, got in enumerate(r.get("worker_threads", [])):
                print(f"{r['way']}: training worker {i}'s threads (CPU-s, wake-ups/s, taken "
                      "off a core/s): " + ", ".join(
                          f"{name} {cpu:.2f} {vol:.0f} {inv:.0f}" for name, cpu, vol, inv in got))
    for r in probes if "engine" in ways else []:
        print(f"{r['way']}: {r['ms_per_step']:.1f} ms a step of {cfg.batch_size} samples, "
              "1 thread")
    for r in rows:
        if r.get("phases"):
            print(f"{r['way']}: ms per step " + ", ".join(
                f"{k} {1000 * v:.1f}" for k, v in r["phases"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
