"""Where the shape goes, VAE side ([5/7] item 3): train VAE variants on the demo's clips in one
process and read shapes off their reconstructions of the held-out clips.

    .venv/bin/python tests/benchmarks/sweep_vae.py [--steps 550] [--batch 8] \\
        [--variant NAME:key=value,key=value ...] [--out DIR]

The data is the default demo's: 1024 training clips with the 12 held-out combinations excluded
and 96 held-out clips (the same synth seeds, sizes and mp4 round trip as `t2v demo`). Each
variant is the `debug` VAE preset with its overrides (model fields of VAEConfig, and the loss
weights `edge_weight`, `kl_weight`, `scale_weight`, `l1_weight`, `mse_weight`
(CausalVideoVAE.loss), plus `steps` / `lr` / `batch`, `crop` /
`crop_frames` for windows, `finish` / `finish_lr` for whole-clip steps after them, and `seed` for
the initial weights, the batches' order and the windows, default 0) trained by
a bare torch loop
on the box's cores: AdamW with the demo's betas, warm-up, cosine schedule, gradient clipping and
EMA, the VAE's own `loss`. So a row measures what the model and loss can learn in that many
steps, not what Ray Train costs (tests/benchmarks/bench_overhead.py measures that). Each row:
parameters, compression, seconds a step, held-out PSNR and what the eval's detector reads off
the reconstructions (colour / shape / motion accuracy against the clips' truth; the clips
themselves score the ceiling row). Prints a markdown table; --out keeps it, the JSON rows and
each variant's VAE package (OUT/NAME/package, latent statistics fitted on the held-out clips as
the demo's export does) for tests/benchmarks/sweep_dit.py.

Without --variant it runs the default set: the demo's VAE as it is, and the candidates that
keep its 24x compression.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from t2v.config import OptimConfig  # noqa: E402
from t2v.data.synthetic import RADIUS, TRAVEL, generate_samples, heldout_combos  # noqa: E402
from t2v.data.tensors import to_model_range, to_uint8  # noqa: E402
from t2v.data.video import decode_video  # noqa: E402
from t2v.eval.detector import detect  # noqa: E402
from t2v.eval.report import TRUTH_KEYS, VOCAB  # noqa: E402
from t2v.eval.scoring import judge, summarize  # noqa: E402
from t2v.models.latent import fit_latent_stats  # noqa: E402
from t2v.models.package import load_package, save_package  # noqa: E402
from t2v.models.vae import CausalVideoVAE, vae_config  # noqa: E402
from t2v.train.schedule import EMA, Fragment, adamw, lr_factor  # noqa: E402

DEFAULT_VARIANTS = [
    "demo:latent_channels=6,shortcut=true",
    "demo-edge:latent_channels=6,shortcut=true,edge_weight=1.0",
    "wide:latent_channels=6,shortcut=true,base_channels=32",
    "wide-edge:latent_channels=6,shortcut=true,base_channels=32,edge_weight=1.0",
]
TRAIN_KEYS = {"steps": int, "lr": float, "batch": int, "edge_weight": float, "kl_weight": float,
              "l1_weight": float, "mse_weight": float,
              "crop": int, "crop_frames": int, "finish": int, "finish_lr": float,
              "scale_weight": float, "seed": int}


def parse_value(text: str) -> object:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if "/" in text:
        return tuple(int(v) for v in text.split("/"))
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_variant(spec: str) -> tuple[str, dict, dict]:
    """'NAME:k=v,k=v' -> (name, model overrides, training overrides); a/b/c is a tuple."""
    name, _, body = spec.partition(":")
    model, train = {}, {}
    for item in filter(None, body.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {spec}: {item!r} is not key=value")
        (train if key in TRAIN_KEYS else model)[key] = parse_value(value)
    return name, model, train


def clips(num: int, *, seed: int, exclude=(), only=(), travel=TRAVEL, radius=RADIUS,
          frames: int = 9, size: int = 32) -> tuple[np.ndarray, list[str], list[dict]]:
    """Synthesised clips through the demo's mp4 round trip: uint8 (N, frames, size, size, 3),
    captions, truths."""
    videos, captions, truths = [], [], []
    for _, fields in generate_samples(num, seed=seed, frames=frames, size=size, exclude=exclude,
                                      only=only, travel=travel, radius=radius):
        videos.append(decode_video(fields["mp4"]))
        captions.append(fields["txt"].decode())
        meta = json.loads(fields["json"])
        truths.append({k: meta[k] for k in TRUTH_KEYS if k in meta})
    return np.stack(videos), captions, truths


def demo_data(cache: Path, travel: tuple[float, float] = TRAVEL, count: int = 1024,
              radius: tuple[float, float] = RADIUS, frames: int = 9, size: int = 32) -> dict:
    """The default demo's training clips (held-out combinations excluded) with their captions,
    and its held-out clips with their truths: {train, captions, held, truths}. `travel`: the
    synthetic objects' path length (`SynthConfig.travel`) and `radius` their size
    (`SynthConfig.radius`; other ones are cached apart); `count`:
    training clips (the demo's 1024, or more of the same seed's clips, cached apart); `frames`
    and `size`: the clips' geometry (the default demo's 9x32x32; `t2v demo --long`'s is
    17x64x64, cached apart)."""
    if tuple(travel) != TRAVEL:
        cache = cache.with_name(f"{cache.stem}-travel{travel[0]:g}-{travel[1]:g}{cache.suffix}")
    if tuple(radius) != RADIUS:
        cache = cache.with_name(f"{cache.stem}-radius{radius[0]:g}-{radius[1]:g}{cache.suffix}")
    if count != 1024:
        cache = cache.with_name(f"{cache.stem}-n{count}{cache.suffix}")
    if (frames, size) != (9, 32):
        cache = cache.with_name(f"{cache.stem}-{frames}x{size}{cache.suffix}")
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if "captions" in z:
            return {"train": z["train"], "captions": json.loads(str(z["captions"])),
                    "held": z["held"], "truths": json.loads(str(z["truths"]))}
    held_names = [str(c) for c in heldout_combos(12)]
    geometry = {"travel": travel, "radius": radius, "frames": frames, "size": size}
    train, captions, _ = clips(count, seed=0, exclude=held_names, **geometry)  # seed 0
    held, _, truths = clips(96, seed=7919, only=held_names, **geometry)  # held-out seed
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, train=train, captions=json.dumps(captions), held=held,
             truths=json.dumps(truths))
    return {"train": train, "captions": captions, "held": held, "truths": truths}


def fit(name: str, module: torch.nn.Module, loss_of, count: int, steps: int, batch: int,  # noqa: ANN001
        lr: float, warmup: int, ema_decay: float, seed: int = 0,
        every: int = 100, weight_decay: float = 0.0,
        shard_order: int | None = None) -> tuple[float, float]:
    """The demo's training recipe in one process: `steps` AdamW steps (betas 0.9/0.99, no
    weight decay unless given, warm-up + cosine to 0.1x, clipping at 1) of `loss_of(indices)` over `count`
    samples in a new order each pass, then the EMA weights copied into `module`; returns
    (seconds, the mean loss of the last `every` steps). `shard_order=S`: a pass reads shards
    of S samples in a new order but each shard's samples in stored order, as `t2v train`'s
    stream does with `data.local_shuffle_buffer` 0 (so a pass repeats the same batches)."""
    opt = adamw(module.parameters(), OptimConfig(lr=lr, betas=[0.9, 0.99],
                                                 weight_decay=weight_decay))  # as t2v train's
    ema = EMA.of_module(module, ema_decay)
    rng = np.random.default_rng(seed)
    per_pass = count // batch  # a new order every pass, as the trainer's shuffle
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, warmup=warmup, total=steps, kind="cosine",
                                         min_ratio=0.1)
        if step % per_pass == 0 and shard_order:
            order = np.concatenate([np.arange(k * shard_order, min(count, (k + 1) * shard_order))
                                    for k in rng.permutation(-(-count // shard_order))])
        elif step % per_pass == 0:
            order = rng.permutation(count)
        loss = loss_of(order[(step % per_pass) * batch:(step % per_pass + 1) * batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        ema.update(Fragment(n, 0, p) for n, p in module.named_parameters() if p.requires_grad)
        losses.append(loss.item())
        if (step + 1) % every == 0:
            print(f"  {name} step {step + 1}/{steps} loss {np.mean(losses[-every:]):.4f} "
                  f"({(time.perf_counter() - t0) / (step + 1):.3f} s/step)", flush=True)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        for pname, p in module.named_parameters():
            p.copy_(ema.whole()[pname].view_as(p))
    module.eval()
    return seconds, float(np.mean(losses[-every:]))


def train_variant(name: str, model_kw: dict, train_kw: dict, data: np.ndarray,
                  held: np.ndarray, truths: list[dict], steps: int, batch: int,
                  package: Path | None = None) -> dict:
    steps, batch = train_kw.get("steps", steps), train_kw.get("batch", batch)
    loss_kw = {k: train_kw[k] for k in ("edge_weight", "kl_weight", "scale_weight", "l1_weight",
                                        "mse_weight") if k in train_kw}
    seed = train_kw.get("seed", 0)  # initial weights, the batches' order and the windows
    torch.manual_seed(seed)
    vae = CausalVideoVAE(vae_config("debug", **model_kw))
    crop_rng = np.random.default_rng(seed)
    _, frames, height, width, _ = data.shape
    side, length = train_kw.get("crop", min(height, width)), train_kw.get("crop_frames", frames)
    if side > min(height, width) or length > frames:
        raise SystemExit(f"{name}: crop {length}x{side}x{side} exceeds the clips' "
                         f"{frames}x{height}x{width}")

    def loss_of(take: np.ndarray) -> torch.Tensor:
        # A random window of `crop_frames` frames and `crop` x `crop` pixels per batch (the
        # conv VAE is the same at any size, so it can learn on crops and run on whole frames)
        t0 = int(crop_rng.integers(frames - length + 1))
        y0, x0 = (int(v) for v in crop_rng.integers(0, (height - side + 1, width - side + 1)))
        x = to_model_range(data[take][:, t0:t0 + length, y0:y0 + side, x0:x0 + side])
        return vae_loss(x)

    def vae_loss(x: torch.Tensor) -> torch.Tensor:
        recon, posterior = vae(x)
        return vae.loss(x, recon, posterior, **loss_kw)["total"]

    def whole_loss(take: np.ndarray) -> torch.Tensor:
        return vae_loss(to_model_range(data[take]))

    lr = train_kw.get("lr", 2e-3)
    seconds, _ = fit(name, vae, loss_of, len(data), steps, batch, lr, warmup=20, ema_decay=0.99,
                     seed=seed)
    # `finish=N`: N more steps on whole clips after the windows (a new warm-up and cosine
    # schedule from `finish_lr`, default lr/4, starting at the windows' EMA weights)
    finish = train_kw.get("finish", 0)
    if finish:
        more, _ = fit(f"{name} finish", vae.train(), whole_loss, len(data), finish, batch,
                      train_kw.get("finish_lr", lr / 4), warmup=10, ema_decay=0.99, seed=1,
                      every=min(100, finish))
        seconds, steps = seconds + more, steps + finish
    if package is not None:  # a VAE-only package as the demo's VAE stage exports it
        with torch.no_grad():
            vae.set_latent_stats(*fit_latent_stats(vae.encode(to_model_range(held)).mean))
        save_package(str(package), vae=vae, run={"name": name, "step": steps,
                                                 "stage": "vae", "sweep": model_kw | train_kw})
    return score(name, vae, held, truths) | {
        "overrides": model_kw | train_kw, "steps": steps, "batch": batch,
        "s_per_step": seconds / steps}


def score(name: str, vae: CausalVideoVAE, held: np.ndarray, truths: list[dict]) -> dict:
    """A row's held-out part: PSNR of the reconstructions and what the detector reads off them."""
    with torch.no_grad():
        x = to_model_range(held)
        recon = torch.cat([vae.decode_raw(vae.encode(x[i:i + 16]).mean)
                           for i in range(0, len(x), 16)]).clamp(-1, 1)
        mse = ((recon - x) / 2).pow(2).flatten(1).mean(1)
        psnr = float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())
    judged = [judge(detect(to_uint8(r)), t) for r, t in zip(recon, truths, strict=True)]
    acc = summarize(judged, VOCAB)
    return {"name": name, "params_m": sum(p.numel() for p in vae.parameters()) / 1e6,
            "compression": vae.compression_ratio(*held.shape[1:4]), "psnr": psnr,
            **{a: acc[a]["accuracy"] for a in ("colour", "shape", "motion")},
            "shape_by_shape": per_shape(judged)}


def per_shape(judged: list[dict]) -> dict[str, str]:
    """{asked shape: "right/asked"}: where the shape score comes from (squares are the first
    to round into circles)."""
    out: dict[str, list[int]] = {}
    for j in judged:
        hit = out.setdefault(str(j["shape"]["truth"]), [0, 0])
        hit[0] += bool(j["shape"]["pass"])
        hit[1] += 1
    return {k: f"{a}/{n}" for k, (a, n) in sorted(out.items())}


def table(rows: list[dict], ceiling: dict) -> str:
    lines = ["| variant | overrides | params | compression | steps x batch | s/step | PSNR dB "
             "| colour | shape | motion |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines.append(f"| clips (ceiling) | | | | | | | {ceiling['colour']:.1%} | "
                 f"{ceiling['shape']:.1%} | {ceiling['motion']:.1%} |")
    for r in rows:
        over = ", ".join(f"{k}={v}" for k, v in r["overrides"].items())
        lines.append(f"| {r['name']} | {over} | {r['params_m']:.2f}M | {r['compression']:.0f}x "
                     f"| {r['steps']} x {r['batch']} | {r['s_per_step']:.3f} | {r['psnr']:.2f} "
                     f"| {r['colour']:.1%} | {r['shape']:.1%} | {r['motion']:.1%} |")
    return "\n".join(lines)


def sweep_parser(doc: str, stage: str, steps: int, batch: int) -> argparse.ArgumentParser:
    """The options both sweeps take; their defaults are the default demo's stage."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=steps, help=f"the default demo's {stage} steps")
    ap.add_argument("--batch", type=int, default=batch, help="the demo stage's global batch")
    ap.add_argument("--variant", action="append", help="NAME:key=value,... (repeatable)")
    ap.add_argument("--out", default=f"/tmp/t2v-sweep-{stage.lower()}")
    ap.add_argument("--travel", type=lambda v: tuple(float(x) for x in v.split("/")),
                    default=TRAVEL, help="MIN/MAX path length of the synthetic objects, as "
                    f"fractions of the frame (SynthConfig.travel; default {TRAVEL[0]}/{TRAVEL[1]})")
    ap.add_argument("--radius", type=lambda v: tuple(float(x) for x in v.split("/")),
                    default=RADIUS, help="MIN/MAX radius of the synthetic objects, as fractions "
                    f"of the frame (SynthConfig.radius; default {RADIUS[0]}/{RADIUS[1]})")
    ap.add_argument("--frames", type=int, default=9, help="frames a clip (default 9, the "
                    "default demo's; `t2v demo --long` trains on 17)")
    ap.add_argument("--size", type=int, default=32, help="frame side in pixels (default 32, "
                    "the default demo's; `t2v demo --long` trains on 64)")
    torch.set_num_threads(os.cpu_count() or 1)
    return ap


def main() -> None:
    ap = sweep_parser(__doc__, "VAE", 550, 8)
    ap.add_argument("--score", action="append", help="score this VAE package (path or URI) on "
                    "the held-out clips as a row, untrained (repeatable; alone: no variants)")
    args = ap.parse_args()
    out = Path(args.out)
    t0 = time.time()
    demo = demo_data(out / "demo_clips.npz", args.travel, radius=args.radius,
                     frames=args.frames, size=args.size)
    data, held, truths = demo["train"], demo["held"], demo["truths"]
    print(f"data: {len(data)} training clips, {len(held)} held-out ({time.time() - t0:.0f} s)",
          flush=True)
    base = summarize([judge(detect(c), t) for c, t in zip(held, truths, strict=True)], VOCAB)
    ceiling = {a: base[a]["accuracy"] for a in ("colour", "shape", "motion")}
    rows = []
    for uri in args.score or []:  # a trained VAE as it is, e.g. a demo's RUN/runs/vae/package
        vae = load_package(uri, load_text=False, load_dit=False).vae.eval()
        rows.append(score(uri, vae, held, truths) | {"overrides": {}, "steps": 0, "batch": 0,
                                                      "s_per_step": float("nan")})
        print(f"{uri}: PSNR {rows[-1]['psnr']:.2f} dB", flush=True)
    for spec in ([] if args.score and not args.variant else args.variant or DEFAULT_VARIANTS):
        name, model_kw, train_kw = parse_variant(spec)
        rows.append(train_variant(name, model_kw, train_kw, data, held, truths,
                                  args.steps, args.batch, out / name / "package"))
        r = rows[-1]
        print(f"{name}: PSNR {r['psnr']:.2f} dB, shape {r['shape']:.1%}, colour "
              f"{r['colour']:.1%}, motion {r['motion']:.1%}, {r['s_per_step']:.3f} s/step",
              flush=True)
        with open(out / "rows.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
    text = table(rows, ceiling)
    print(text)
    (out / "sweep_vae.md").write_text(text + "\n")
    if not math.isfinite(sum(r["psnr"] for r in rows)):
        raise SystemExit("a variant diverged (PSNR not finite)")


if __name__ == "__main__":
    main()
