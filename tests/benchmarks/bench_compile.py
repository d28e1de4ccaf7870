"""Training steps of a DiT with `compile_blocks()` (train.compile) against the eager model.

    .venv/bin/python tests/benchmarks/bench_compile.py [--latent 6x5x16x16] [--patch 1x4x4]
        [--batch 8] [--threads 1] [--rounds 6] [--steps 10] [--device cpu]

Pure torch (no Ray, no DeepSpeed; runs on the lent GPU machine too): two copies of the same
model, one with its blocks compiled, trained in turns (`--steps` steps each, `--rounds` times:
a drifting box slows both alike), on a flow-matching loss with text lengths that change from
step to step as the demo's do (the DiT drops unused text positions per batch, so the compiled
blocks recompile once with a dynamic text length). Prints the time of the first steps (the
compiling) and ms per step, each round and the median. The default geometry is `t2v demo
--long`'s DiT micro-batch (6x5x16x16 latents in 1x4x4 patches, batch 8, one thread as each of
its 2 workers); BENCHMARKS.md's rows from before 144d18b were taken in 1x2x2 patches, as
`--long` trained then (`--patch 1x2x2` reproduces them).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from machine import cpu_name  # noqa: E402

from t2v.diffusion.flow import flow_loss  # noqa: E402
from t2v.models.dit import VideoDiT, dit_config  # noqa: E402

TEXT = 14
"""Text positions of a batch before the DiT drops the unused ones."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="debug")
    p.add_argument("--latent", default="6x5x16x16", help="C x T' x H' x W'")
    p.add_argument("--patch", default="1x4x4", help="the DiT's patch, T x H x W")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    c, t, h, w = map(int, a.latent.split("x"))
    x = torch.randn(a.batch, c, t, h, w, device=dev)
    cfg = dit_config(a.model, in_channels=c, patch=tuple(map(int, a.patch.split("x"))))
    text = torch.randn(a.batch, TEXT, cfg.text_dim, device=dev)

    def make(compiled: bool):  # noqa: ANN202
        torch.manual_seed(0)
        model = VideoDiT(cfg).to(dev).train()
        if compiled:
            model.compile_blocks()
        # fused: what t2v.train.schedule.adamw makes on CPU and CUDA
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

    def step(model, opt, i: int) -> float:  # noqa: ANN001
        g = torch.Generator().manual_seed(i)
        lengths = torch.randint(5, 9 + i % 4, (a.batch,), generator=g)
        mask = (torch.arange(TEXT)[None] < lengths[:, None]).to(dev)
        loss = flow_loss(model, x, text, mask, t=torch.rand(a.batch, generator=g).to(dev),
                         eps=torch.randn(x.shape, generator=g).to(dev))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    ways = {"eager": make(False), "compiled blocks": make(True)}
    print(f"{cpu_name()}, torch {torch.__version__}, "
          f"{a.device}, {a.threads} thread(s), {a.model} DiT, latents {a.latent}, "
          f"batch {a.batch}", flush=True)
    for name, (model, opt) in ways.items():  # the first steps: compiling, both text lengths
        t0 = time.perf_counter()
        losses = [step(model, opt, i) for i in range(6)]
        print(f"{name}: first 6 steps {time.perf_counter() - t0:.1f} s, loss {losses[0]:.6f}",
              flush=True)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(a.rounds):
        for name, (model, opt) in ways.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(a.steps):
                step(model, opt, 100 * r + i)
            times[name].append((time.perf_counter() - t0) / a.steps * 1000)
    eager = statistics.median(times["eager"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in ts)} | {med:.1f} | "
              f"{eager / med:.2f}x |")


if __name__ == "__main__":
    main()
