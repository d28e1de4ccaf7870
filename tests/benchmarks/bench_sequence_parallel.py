"""Peak activation memory per rank of one long sample, sequence parallel 1 vs 2 (and the step
time, which on CPU says little: the ranks share the box's cores).

    .venv/bin/python tests/benchmarks/bench_sequence_parallel.py [--preset small]
        [--latent 8x32x32] [--checkpointing] [--out runs/bench/sequence_parallel.json]

Each rank is a process (gloo, CPU, fp32): the DiT built, one sample's latents and text made,
then the peak RSS (sampled every 5 ms) of one forward + backward minus the RSS before it: the
activations saved for backward plus the gradients (the same at both SP sizes: every rank holds
the whole model here; ZeRO shards it across the data-parallel group in training).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.benchmarks.bench_memory import SAMPLER  # noqa: E402
from tests.benchmarks.machine import describe  # noqa: E402

STEP = SAMPLER + textwrap.dedent("""
    import json, os, sys, time, torch, torch.distributed as dist
    rank, world, port, preset, latent, ckpt = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                               sys.argv[4], sys.argv[5], sys.argv[6] == "1")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    from t2v.models.dit import VideoDiT, dit_config
    torch.manual_seed(0)
    model = VideoDiT(dit_config(preset)).train()
    model.checkpointing = ckpt
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                          WORLD_SIZE=str(world))
        dist.init_process_group("gloo")
        from t2v.models.sequence_parallel import parallelize
        parallelize(model)
    c = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, c.in_channels, *map(int, latent.split("x")), generator=g)
    text = torch.randn(1, 16, c.text_dim, generator=g)
    peak = Peak()
    base = peak.rss()
    peak.start()
    t0 = time.time()
    loss = model(x, torch.rand(1, generator=g), text).pow(2).mean()
    loss.backward()
    seconds = time.time() - t0
    top = peak.stop() - base
    tokens = model.grid(x.shape)
    print("RESULT" + json.dumps({"rank": rank, "peak": top, "seconds": seconds,
                                 "tokens": tokens[0] * tokens[1] * tokens[2],
                                 "grads": 4 * sum(p.numel() for p in model.parameters())}))
""")


def main() -> None:
    from tests.s3_fixtures import free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--latent", default="8x32x32", help="T'xH'xW' latent of the one sample")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--out", default="runs/bench/sequence_parallel.json")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gib, rows = 2**30, {}
    for sp in (1, 2):
        port = str(free_port())

        def rank(r: int, sp: int = sp, port: str = port) -> dict:
            p = subprocess.run([sys.executable, "-c", STEP, str(r), str(sp), port, args.preset,
                                args.latent, "1" if args.checkpointing else "0"],
                               capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
            lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
            if p.returncode or not lines:
                raise RuntimeError(f"SP {sp} rank {r}: exit {p.returncode}\n{p.stderr[-3000:]}")
            return json.loads(lines[0][6:])

        with ThreadPoolExecutor(sp) as pool:
            rows[sp] = list(pool.map(rank, range(sp)))
        print(f"SP {sp}: peak {max(x['peak'] for x in rows[sp]) / gib:.2f} GiB per rank",
              flush=True)
    first = rows[1][0]
    cpu = describe()
    print(f"\n{args.preset} DiT, one sample of {args.latent} latents ({first['tokens']:,} tokens)"
          f", fp32, activation checkpointing {'on' if args.checkpointing else 'off'}, "
          f"{cpu}; gradients {first['grads'] / gib:.2f} GiB of each peak\n")
    print("| SP | peak per rank (fwd + bwd) | minus gradients | vs SP 1 | seconds |")
    print("|---|---|---|---|---|")
    act1 = first["peak"] - first["grads"]
    for sp, ranks in rows.items():
        peak = max(x["peak"] for x in ranks)
        act = peak - first["grads"]
        print(f"| {sp} | {peak / gib:.2f} GiB | {act / gib:.2f} GiB | {act / act1:.2f}x | "
              f"{max(x['seconds'] for x in ranks):.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "cpu": cpu,
                                          "rows": {str(k): v for k, v in rows.items()}},
                                         indent=1))


if __name__ == "__main__":
    main()
