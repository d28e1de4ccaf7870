"""Memory per worker by ZeRO stage, and of exporting / loading a package, for a real-size DiT.

    .venv/bin/python tests/benchmarks/bench_memory.py [--preset base] [--runs 0x2,2x2,3x2,3x4]
        [--precision fp32|bf16] [--out runs/bench/memory.json]

Training: W processes per run (gloo, CPU; the worker loop's own pieces without Ray: the model
built by t2v.train.zero (under deepspeed.zero.Init at ZeRO-3), DeepSpeed's engine, the sharded
EMA, 2 optimizer steps on a 16-token sample, then a checkpoint of this rank's pieces, restored
again: bytes each rank reads of the whole checkpoint, by range). Per rank:
peak RSS (sampled every 5 ms) minus the RSS before the model existed = model-state memory,
beside the theoretical bytes per rank of t2v/train/memory.py. Target (issue [2/7]): ZeRO-3 <=
0.55x ZeRO-0.

Package: one process builds the DiT, then `save_package` (streamed safetensors); another
`load_package`s it. Peak RSS during each minus the RSS before the model existed, over the size
of the weights. Target: <= 1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.machine import describe  # noqa: E402

SAMPLER = textwrap.dedent("""
    import threading, time, psutil
    class Peak:
        '''Peak RSS of this process between start() and stop(), sampled every 5 ms.'''
        def __init__(self):
            self.proc, self.peak, self.run = psutil.Process(), 0, False
        def rss(self):
            return self.proc.memory_info().rss
        def start(self):
            self.peak, self.run = self.rss(), True
            self.t = threading.Thread(target=self._loop, daemon=True); self.t.start(); return self
        def _loop(self):
            while self.run:
                self.peak = max(self.peak, self.rss()); time.sleep(0.005)
        def stop(self):
            self.run = False; self.t.join(); self.peak = max(self.peak, self.rss()); return self.peak
""")

TRAIN = SAMPLER + textwrap.dedent("""
    import json, os, sys, time, torch, torch.distributed as dist
    rank, port, stage, preset = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    world, bf16, shared = int(sys.argv[5]), sys.argv[6] == "bf16", sys.argv[7]
    from t2v.train.worker import tune_host_allocator
    if stage == 3:
        tune_host_allocator()  # as the worker loop does, first thing
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401 - imported before the baseline, as in a worker
    from t2v.config import TrainConfig
    from t2v.models.dit import VideoDiT, dit_config
    from t2v.train import checkpoint, zero
    from t2v.train.schedule import EMA
    from t2v.train.worker import deepspeed_config, initialize_engine
    geo = dit_config(preset)
    ds = deepspeed_config(TrainConfig(batch_size=1, zero_stage=stage), bf16)
    peak = Peak()
    base = peak.rss()
    peak.start()
    torch.manual_seed(0)
    model = zero.build_model(lambda whole: VideoDiT(geo, whole), stage, ds, torch.device("cpu"))
    built = peak.rss() - base
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    eng = initialize_engine(model, opt, None, ds, use_gpu=False)
    ema = EMA(zero.local_fragments(eng.module, rank, world), 0.999)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        dtype = torch.bfloat16 if bf16 else torch.float32
        x = torch.randn(1, geo.in_channels, 1, 8, 8, generator=g).to(dtype)
        txt = torch.randn(1, 8, geo.text_dim, generator=g).to(dtype)
        v = eng(x, torch.rand(1, generator=g).to(dtype), txt)
        eng.backward((v.float() - x.float()).pow(2).mean())
        eng.step()
        ema.update(zero.local_fragments(eng.module, rank, world))
    trained = peak.stop() - base
    peak.start()
    checkpoint.save_state(eng, ema, shared, rank, world)
    saved = peak.stop() - base
    if rank == 0:
        state = checkpoint.trainer_state(eng, ema, zero.full_shapes(eng.module), 2, 2, world, 1)
        json.dump(state, open(f"{shared}/trainer.json", "w"))
    dist.barrier()
    # Restore it (into the same engine): what this rank reads of the whole checkpoint.
    peak.start()
    t0 = time.time()
    state, pieces = checkpoint.open_local(shared)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    checkpoint.restore_state(eng, ema, state, pieces, rank, world, sched)
    restore = {"restore_seconds": time.time() - t0, "restore_read": pieces.bytes_read,
               "restore_reads": pieces.reads, "checkpoint_bytes": pieces.total_bytes,
               "peak_with_restore": peak.stop() - base}
    print("RESULT" + json.dumps({"rank": rank, "built": built, "peak": trained,
                                 "peak_with_checkpoint": saved} | restore))
""")

PACKAGE = SAMPLER + textwrap.dedent("""
    import json, sys, torch
    mode, preset, uri = sys.argv[1], sys.argv[2], sys.argv[3]
    from t2v.train.worker import tune_host_allocator
    tune_host_allocator()
    from t2v.models.dit import VideoDiT, dit_config
    from t2v.models.package import RenderDefaults, load_package, save_package
    from t2v.models.text import TextEncoderConfig
    from t2v.models.vae import CausalVideoVAE, vae_config
    peak = Peak()
    base = peak.rss()
    if mode == "export":
        torch.manual_seed(0)
        dit = VideoDiT(dit_config(preset, text_dim=384))
        vae = CausalVideoVAE(vae_config("debug", latent_channels=dit.config.in_channels))
        peak.start()
        save_package(uri, vae=vae, dit=dit, text=TextEncoderConfig(),
                     render=RenderDefaults(frames=9, height=32, width=32, fps=8.0, shift=1.0))
        top = peak.stop() - base
        print("RESULT" + json.dumps({"peak": top}))
    else:
        peak.start()
        pkg = load_package(uri, load_text=False)
        top = peak.stop() - base
        peak.start()  # safetensors maps the file: pages are read as the weights are first used
        total = sum(float(p.double().sum()) for p in pkg.dit.parameters())
        used = peak.stop() - base
        print("RESULT" + json.dumps({"peak": top, "peak_after_use": used}))
""")


def run_script(code: str, args: list[str], env: dict) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=3600)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    if r.returncode or not lines:
        raise RuntimeError(f"{args}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return json.loads(lines[0][6:])


def theory(preset: str, stage: int, world: int, bf16: bool) -> dict:
    from t2v.config import TrainConfig
    from t2v.models.dit import dit_config
    from t2v.train.memory import estimate_memory

    geo = dit_config(preset)
    est = estimate_memory(geo, (geo.in_channels, 1, 8, 8), 8,
                          TrainConfig(num_workers=world, zero_stage=stage, batch_size=1),
                          bf16=bf16)
    return {"params": est.params, "weights": est.weights, "gradients": est.gradients,
            "optimizer": est.optimizer, "ema": est.ema,
            "model_states": est.weights + est.gradients + est.optimizer + est.ema}


def main() -> None:
    from tests.s3_fixtures import free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="base")
    ap.add_argument("--runs", default="0x2,2x2,3x2,3x4",
                    help="ZeRO stage x workers, comma-separated")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: what GPU runs use (on a CPU without bf16 units: slow, same bytes)")
    ap.add_argument("--out", default="runs/bench/memory.json")
    args = ap.parse_args()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    gib = 2**30
    rows = []
    for run in args.runs.split(","):
        stage, world = (int(x) for x in run.split("x"))
        port = str(free_port())
        t0 = time.time()
        with ThreadPoolExecutor(world) as pool, tempfile.TemporaryDirectory() as ckpt:
            results = list(pool.map(lambda r, p=port, z=stage, w=world, d=ckpt: run_script(
                TRAIN, [str(r), p, str(z), args.preset, str(w), args.precision, d], env),
                range(world)))  # the ranks run together
        want = theory(args.preset, stage, world, args.precision == "bf16")
        rows.append({"stage": stage, "workers": world, "seconds": round(time.time() - t0, 1),
                     "theory": want, "ranks": results})
        print(f"ZeRO-{stage} x {world}: peak {max(r['peak'] for r in results) / gib:.2f} GiB per "
              f"rank (theory {want['model_states'] / gib:.2f})", flush=True)
    with tempfile.TemporaryDirectory() as d:
        uri = f"{d}/pkg"
        export = run_script(PACKAGE, ["export", args.preset, uri], env)
        load = run_script(PACKAGE, ["load", args.preset, uri], env)
        weights = sum(p.stat().st_size for p in Path(uri).glob("*.safetensors"))
    z0 = next((r for r in rows if r["stage"] == 0 and r["workers"] == 2), None)
    cpu = describe()
    print(f"\n{args.preset} DiT, {rows[0]['theory']['params'] / 1e6:.0f}M params, "
          f"{args.precision}, CPU "
          f"workers (gloo), {cpu}\n")
    print("| ZeRO | workers | peak RSS - baseline, per rank (max) | after build | theory: "
          "weights + grads + Adam + EMA per rank | peak / ZeRO-0 x 2's | checkpoint save peak | "
          "restore: read per rank of the checkpoint, reads, seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = max(x["peak"] for x in r["ranks"])
        ratio = f"{peak / max(x['peak'] for x in z0['ranks']):.2f}x" if z0 else "-"
        print(f"| {r['stage']} | {r['workers']} | {peak / gib:.2f} GiB | "
              f"{max(x['built'] for x in r['ranks']) / gib:.2f} GiB | "
              f"{r['theory']['model_states'] / gib:.2f} GiB | {ratio} | "
              f"{max(x['peak_with_checkpoint'] for x in r['ranks']) / gib:.2f} GiB | "
              f"{max(x['restore_read'] for x in r['ranks']) / gib:.2f} of "
              f"{r['ranks'][0]['checkpoint_bytes'] / gib:.2f} GiB, "
              f"{max(x['restore_reads'] for x in r['ranks'])}, "
              f"{max(x['restore_seconds'] for x in r['ranks']):.1f} s |")
    print(f"\nPackage ({weights / gib:.2f} GiB of weights): export peak "
          f"{export['peak'] / gib:.2f} GiB ({export['peak'] / weights:.2f}x, the model "
          f"included), load peak {load['peak'] / gib:.2f} GiB ({load['peak'] / weights:.2f}x; "
          f"after reading every weight once {load['peak_after_use'] / gib:.2f} GiB, "
          f"{load['peak_after_use'] / weights:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"preset": args.preset, "cpu": cpu, "training": rows,
                                          "package": {"weights": weights, "export": export,
                                                      "load": load}}, indent=1))


if __name__ == "__main__":
    main()
