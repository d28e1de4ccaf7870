"""Does a trained package render and train the same on a GPU as on the CPU? Ray-free.

Two halves, one file, so that the numbers compared are made by the same code:

    # here, on the CPU (needs the package's text encoder): the float32 reference
    .venv/bin/python tests/benchmarks/gpu_check.py reference --package PKG --out ref.pt
    # on the GPU box (torch, safetensors, pydantic, boto3; no Ray, DeepSpeed or text encoder)
    python tests/benchmarks/gpu_check.py check --package PKG --ref ref.pt --out gpu.json
    # and, with no package: one 81x480x832 decode of the `base` VAE, whole/chunked/tiled
    python tests/benchmarks/gpu_check.py vae-scale [--frames 81 --size 480x832]

The reference holds the prompts' embeddings (so the GPU side needs no text encoder), the
seeds, and what the CPU made: sampled latents and uint8 videos for each sampler
(`render_batch`, the renderer's own function), one training step's flow loss and gradients
(fixed x0, eps and t), and the VAE's encoding and decoding of fixed clips. `check` loads the
same package on `cuda` with `load_package` and repeats each in float32 and in the bf16 autocast
render and training use, and reports the differences: relative L2 of latents, PSNR of videos,
loss difference and gradient cosine. On a GPU it also times a batch of 16 renders. Both
devices decode in spatial tiles too. Thresholds are in `LIMITS`; a failed one
makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from t2v.diffusion.flow import flow_loss  # noqa: E402
from t2v.diffusion.sampling import SAMPLERS, denoise, get_noise  # noqa: E402
from t2v.models.package import load_package  # noqa: E402
from t2v.models.tiling import Tiling  # noqa: E402
from t2v.render.model import RenderModel, render_batch  # noqa: E402
from t2v.render.rows import Sample  # noqa: E402

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right",
           "a yellow circle moving down"]
SEEDS = [11, 12, 13, 14]
# What "the same" means. fp32 on the GPU differs from the CPU only by summation order (and TF32,
# which this script turns off); bf16 autocast rounds every matmul input to 8 bits of mantissa.
LIMITS = {
    "fp32_latent_rel": 1e-3,   # sampled latents, relative L2, fp32 cuda vs cpu
    "bf16_latent_rel": 0.15,   # ... bf16 autocast (what render_batch runs on cuda) vs cpu
    "bf16_video_psnr": 25.0,   # dB, uint8 videos, bf16 cuda vs cpu fp32
    "fp32_grad_cos": 0.9999,   # gradient of one flow-loss step, cosine, fp32 cuda vs cpu
    "bf16_grad_cos": 0.98,     # ... bf16 autocast vs cpu fp32
    "bf16_loss_rel": 0.02,     # flow loss, relative, bf16 vs fp32
    "vae_fp32_rel": 1e-4,      # VAE encode mean and decode, fp32 cuda vs cpu
    "vae_tiled_rel": 1e-4,     # tiled decode, fp32 cuda vs cpu (the same tiles and blend)
}


class EmbeddingTable(torch.nn.Module):
    """Stands in for the text encoder on the GPU box: the reference's embeddings by prompt."""

    def __init__(self, table: dict[str, tuple[torch.Tensor, torch.Tensor]], device) -> None:
        super().__init__()
        self.table, self.device = table, device

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.stack([self.table[p][0] for p in prompts]).to(self.device)
        mask = torch.stack([self.table[p][1] for p in prompts]).to(self.device)
        return emb, mask


def samples_for(geometry: dict, steps: int, cfg: float) -> list[Sample]:
    return [Sample(id=f"s{i}", prompt=p, seed=s, steps=steps, cfg=cfg, **geometry)
            for i, (p, s) in enumerate(zip(PROMPTS, SEEDS, strict=True))]


def settings(pkg) -> tuple[dict, int, float, float]:
    r = pkg.meta.render
    geometry = dict(frames=r.frames, height=r.height, width=r.width)
    return geometry, r.steps or 20, r.cfg if r.cfg is not None else 5.0, r.shift


def train_inputs(pkg, geometry: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (len(PROMPTS), *pkg.vae.latent_shape(**geometry))
    return {"x0": torch.randn(shape, generator=g), "eps": torch.randn(shape, generator=g),
            "t": torch.rand(len(PROMPTS), generator=g)}


def step_grads(dit, inputs: dict, emb, mask, device, autocast: bool) -> tuple[float, torch.Tensor]:
    """One flow-loss forward + backward; (loss, all gradients flattened, float32 on the CPU)."""
    dit.zero_grad(set_to_none=True)
    x = {k: inputs[k].to(device) for k in ("x0", "eps", "t")}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = flow_loss(dit, x["x0"], emb.to(device), mask.to(device), t=x["t"], eps=x["eps"])
    loss.backward()
    grads = torch.cat([p.grad.float().flatten().cpu() for p in dit.parameters()
                       if p.grad is not None])
    return loss.item(), grads


def clips(geometry: dict) -> torch.Tensor:
    """Two smooth moving-blob clips in [-1, 1] (B, 3, T, H, W): structure the VAE can encode."""
    t = torch.arange(geometry["frames"]).float()[:, None, None]
    y = torch.linspace(-1, 1, geometry["height"])[None, :, None]
    x = torch.linspace(-1, 1, geometry["width"])[None, None, :]
    out = []
    for k in range(2):
        cx, cy = -0.5 + 0.1 * t + 0.3 * k, 0.2 - 0.05 * t
        blob = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.08)  # (T, H, W)
        out.append(torch.stack([2 * blob - 1, 1 - 2 * blob, 0.5 * blob - 0.25 * k]))
    return torch.stack(out)


def tiling_for(pkg, geometry: dict) -> Tiling:
    """Tiles a little over half the latent's side: several tiles, overlaps and halos in play."""
    return Tiling(max(2, pkg.vae.latent_shape(**geometry)[2] // 2 + 1))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def psnr(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    mse = np.mean([(x.astype(np.float64) - y.astype(np.float64)) ** 2 for x, y in zip(a, b, strict=True)])
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def reference(args) -> None:
    torch.manual_seed(0)
    pkg = load_package(args.package, device="cpu")
    geometry, steps, cfg, shift = settings(pkg)
    model = RenderModel(pkg.dit.requires_grad_(False), pkg.vae.requires_grad_(False), pkg.text,
                        torch.device("cpu"))
    prompts = PROMPTS + [""]
    emb, mask = pkg.text(prompts)
    renders = {}
    for sampler in SAMPLERS:
        t0 = time.perf_counter()
        z, videos = render_batch(model, samples_for(geometry, steps, cfg), sampler, shift)
        renders[sampler] = {"z": z, "videos": [torch.from_numpy(v) for v in videos]}
        print(f"cpu {sampler}: {time.perf_counter() - t0:.1f} s for {len(videos)} videos")
    inputs = train_inputs(pkg, geometry)
    pkg.dit.requires_grad_(True)
    loss, grads = step_grads(pkg.dit, inputs, emb[:-1], mask[:-1], torch.device("cpu"), False)
    x = clips(geometry)
    with torch.no_grad():
        mean = pkg.vae.encode(x).mean
        decoded = pkg.vae.decode(renders["euler"]["z"])
        tiled = pkg.vae.decode(renders["euler"]["z"], tiling=tiling_for(pkg, geometry))
    torch.save({"geometry": geometry, "steps": steps, "cfg": cfg, "shift": shift,
                "embeddings": {p: (emb[i], mask[i]) for i, p in enumerate(prompts)},
                "renders": renders, "train": inputs | {"loss": loss, "grads": grads},
                "vae": {"clips": x, "mean": mean, "decoded": decoded, "tiled": tiled},
                "cpu": cpu_name()},
               args.out)
    print(f"wrote {args.out}: {geometry}, {steps} steps, cfg {cfg}, shift {shift}, "
          f"loss {loss:.5f}")


def check(args) -> int:
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (--device cpu runs the comparison as a smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = torch.load(args.ref, weights_only=False)
    geometry, steps, cfg, shift = ref["geometry"], ref["steps"], ref["cfg"], ref["shift"]
    pkg = load_package(args.package, device=dev, load_text=False)
    table = EmbeddingTable(ref["embeddings"], dev)
    model = RenderModel(pkg.dit.requires_grad_(False), pkg.vae.requires_grad_(False), table, dev)
    samples = samples_for(geometry, steps, cfg)
    out: dict = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else cpu_name(),
                 "torch": torch.__version__,
                 "reference_cpu": ref["cpu"], "geometry": geometry, "steps": steps, "render": {}}
    for sampler in SAMPLERS:
        if sampler not in ref["renders"]:  # a reference made before this sampler existed
            print(f"{sampler}: not in the reference (made with an older t2v): skipped")
            continue
        want = ref["renders"][sampler]
        z16, videos16 = render_batch(model, samples, sampler, shift)  # bf16 autocast on cuda
        emb, mask = table([s.prompt for s in samples])
        neg, neg_mask = table(["" for _ in samples])
        noise = get_noise(pkg.vae.latent_shape(**geometry), SEEDS, device=dev)
        z32 = denoise(model.dit, noise, emb, mask, neg, neg_mask, steps=steps,
                      cfg=torch.tensor([cfg] * len(samples)), shift=shift, sampler=sampler)
        out["render"][sampler] = {
            "fp32_latent_rel": rel(z32.cpu(), want["z"]),
            "bf16_latent_rel": rel(z16.cpu(), want["z"]),
            "bf16_video_psnr": psnr(videos16, [v.numpy() for v in want["videos"]]),
        }
    # One training step: the same flow loss and gradients as on the CPU?
    dit = pkg.dit.requires_grad_(True)
    tr = ref["train"]
    emb, mask = table(PROMPTS)
    loss32, g32 = step_grads(dit, tr, emb, mask, dev, autocast=False)
    loss16, g16 = step_grads(dit, tr, emb, mask, dev, autocast=True)
    cos = torch.nn.functional.cosine_similarity
    out["train"] = {"cpu_loss": tr["loss"], "fp32_loss": loss32, "bf16_loss": loss16,
                    "bf16_loss_rel": abs(loss16 - tr["loss"]) / tr["loss"],
                    "fp32_grad_cos": cos(g32, tr["grads"], dim=0).item(),
                    "bf16_grad_cos": cos(g16, tr["grads"], dim=0).item()}
    dit.requires_grad_(False)
    # The VAE, both ways, and tiled decoding against whole on the device.
    v = ref["vae"]
    with torch.no_grad():
        mean = pkg.vae.encode(v["clips"].to(dev)).mean.cpu()
        whole = pkg.vae.decode(ref["renders"]["euler"]["z"].to(dev))
        tiled = pkg.vae.decode(ref["renders"]["euler"]["z"].to(dev),
                               tiling=tiling_for(pkg, geometry))
    out["vae"] = {"vae_fp32_rel": max(rel(mean, v["mean"]), rel(whole.cpu(), v["decoded"])),
                  "vae_tiled_rel": rel(tiled.cpu(), v["tiled"])}
    # Throughput on the GPU: a batch of 16 videos, bf16 autocast, after one warm-up batch.
    if dev.type == "cuda":
        many = [s.model_copy(update={"id": f"b{i}", "seed": 100 + i})
                for i, s in enumerate(samples * 4)]
        render_batch(model, many, "euler", shift)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        render_batch(model, many, "euler", shift)
        torch.cuda.synchronize()
        out["throughput"] = {"videos": len(many), "seconds": time.perf_counter() - t0,
                             "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    failed = []
    flat = {f"render.{k}.{m}": x for k, d in out["render"].items() for m, x in d.items()}
    flat |= {f"train.{m}": x for m, x in out["train"].items()}
    flat |= {f"vae.{m}": x for m, x in out["vae"].items()}
    for name, value in flat.items():
        limit = LIMITS.get(name.rsplit(".", 1)[1])
        if limit is None:
            continue
        ok = value >= limit if name.endswith(("psnr", "cos")) else value <= limit
        if not ok:
            failed.append(f"{name} = {value:.6g} (limit {limit})")
    out["failed"] = failed
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    print("FAILED: " + "; ".join(failed) if failed else "all checks within LIMITS")
    return 1 if failed else 0


def vae_scale(args) -> int:
    """Decode one video of the real size with our `base` VAE (random weights: time and memory do
    not depend on them) whole, in latent-frame chunks, in spatial tiles and both: seconds and
    peak GPU memory each, float32 as the renderer decodes."""
    from t2v.models.vae import CausalVideoVAE, vae_config

    dev = torch.device(args.device)
    torch.manual_seed(0)
    vae = CausalVideoVAE(vae_config(args.preset)).to(dev).eval()
    height, width = (int(v) for v in args.size.split("x"))
    shape = vae.latent_shape(args.frames, height, width)
    z = torch.randn(1, *shape, device=dev)
    tile = Tiling(args.tile // vae.config.spatial_down)
    ways = {"whole": {}, "chunk": {"chunk_latent_frames": args.chunk}, "tile": {"tiling": tile},
            "chunk+tile": {"chunk_latent_frames": args.chunk, "tiling": tile}}
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else cpu_name(),
           "preset": args.preset, "video": [args.frames, height, width], "latent": list(shape),
           "chunk_latent_frames": args.chunk, "tile_px": args.tile, "ways": {}}
    for name, kwargs in ways.items():
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                video = vae.decode_raw(z, **kwargs)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            row = {"seconds": round(time.perf_counter() - t0, 2), "shape": list(video.shape)}
            if dev.type == "cuda":
                row["peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
            del video
        except torch.OutOfMemoryError as e:
            row = {"error": str(e).splitlines()[0][:160]}
        out["ways"][name] = row
        print(name, row, flush=True)
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reference", help="CPU float32 reference (needs the text encoder)")
    r.add_argument("--package", required=True)
    r.add_argument("--out", required=True)
    c = sub.add_parser("check", help="repeat on cuda and compare")
    c.add_argument("--package", required=True)
    c.add_argument("--ref", required=True)
    c.add_argument("--out")
    c.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    v = sub.add_parser("vae-scale", help="decode one real-size video: time and memory")
    v.add_argument("--preset", default="base")
    v.add_argument("--frames", type=int, default=81)
    v.add_argument("--size", default="480x832", help="HEIGHTxWIDTH")
    v.add_argument("--chunk", type=int, default=4, help="latent frames a pass")
    v.add_argument("--tile", type=int, default=256, help="tile side in pixels")
    v.add_argument("--device", default="cuda")
    v.add_argument("--out")
    args = ap.parse_args()
    if args.cmd == "reference":
        reference(args)
        return 0
    return vae_scale(args) if args.cmd == "vae-scale" else check(args)


if __name__ == "__main__":
    sys.exit(main())
