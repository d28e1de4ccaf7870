"""GPU memory and step time of LoRA vs full fine-tuning of VideoDiT `large` (Wan 2.1 1.3B).

Ray-free and DeepSpeed-free: one process, one GPU, the repository on sys.path (needs torch, peft
and t2v/models only). Each mode builds the model fresh, runs `--warmup` + `--steps` optimizer
steps (forward, backward, AdamW) on one sample and reports the median step time and the peak
GPU memory (torch.cuda.max_memory_allocated: weights, gradients, optimizer state, activations).

    python tests/benchmarks/gpu_bench_lora.py                   # both modes, 21x60x104 latent
    python tests/benchmarks/gpu_bench_lora.py --modes lora --rank 64 --latent 21x30x52
    python tests/benchmarks/gpu_bench_lora.py --dry-run         # CPU, debug preset: a smoke test

Precision, as the DeepSpeed bf16 run would hold it:
- full: float32 weights under bf16 autocast, float32 AdamW (16 bytes a parameter, the same as
  DeepSpeed's bf16 weights + bf16 grads + float32 master and moments without ZeRO sharding);
- lora: the frozen base in bf16 (`--base-dtype`), float32 adapters (peft keeps them float32)
  and AdamW over the adapters only.
Both use activation checkpointing unless `--no-checkpointing`, and Wan's unmasked text
(DiTConfig.text_mask False, as an imported package has it). Step FLOPs are 3 x VideoDiT.flops
for both modes (LoRA skips the weight gradients of the frozen layers: its "MFU" is the model
FLOPs over time, so a lower number than full's is expected).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from t2v.models.dit import VideoDiT, dit_config  # noqa: E402
from t2v.models.lora import DEFAULT_TARGETS, add_lora  # noqa: E402

PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def build(mode: str, args: argparse.Namespace, device: torch.device) -> VideoDiT:
    cfg = dit_config(args.preset, text_mask=False)
    with torch.device("meta"):
        model = VideoDiT(cfg)
    model = model.to_empty(device=device)
    model.checkpointing = not args.no_checkpointing
    model.init_weights()  # random weights: speed and memory do not depend on their values
    if mode == "lora":
        if device.type == "cuda":
            model = model.to(getattr(torch, args.base_dtype))
        add_lora(model, args.rank, args.alpha, 0.0, args.targets.split(","))
    return model.train()


def measure(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One mode, from an empty GPU: build, train `warmup + steps` steps, time and peak memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(mode, args, device)
    cfg = model.config
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    thw = tuple(int(s) for s in args.latent.split("x"))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, *thw, device=device, generator=g)
    target = torch.randn(x.shape, device=device, generator=g)
    t = torch.rand(args.batch, device=device, generator=g)
    text = torch.randn(args.batch, args.text_len, cfg.text_dim, device=device, generator=g)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else nullcontext())

    def step() -> float:
        with autocast:
            v = model(x, t, text)  # (B, C, T, H, W)
        loss = (v.float() - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    flops = 3 * model.flops(tuple(x.shape), args.text_len)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    result = {
        "mode": mode, "device": name, "torch": torch.__version__, "preset": args.preset,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "rank": args.rank if mode == "lora" else None,
        "targets": args.targets if mode == "lora" else None,
        "base_dtype": args.base_dtype if mode == "lora" and device.type == "cuda" else "float32",
        "latent": list(thw), "batch": args.batch,
        "tokens": args.batch * math.prod(model.grid(tuple(x.shape))), "text_len": args.text_len,
        "checkpointing": not args.no_checkpointing, "step_s": step_s,
        "model_tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / 1e12 / peak if peak else None,
        "max_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                           if device.type == "cuda" else None),
    }
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="full,lora", help="comma list of full, lora")
    ap.add_argument("--preset", default="large")
    ap.add_argument("--latent", default="21x60x104", help="T x H x W (81 frames at 480x832)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=512, help="umT5 context length of Wan")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    ap.add_argument("--base-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="dtype of LoRA's frozen base weights on the GPU")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this card")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="CPU, debug preset, tiny shape")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if unknown := sorted(set(modes) - {"full", "lora"}):
        raise SystemExit(f"unknown modes {unknown} (full, lora)")
    if args.dry_run:
        device = torch.device("cpu")
        args.preset, args.latent, args.text_len, args.rank = "debug", "3x8x8", 16, 4
        args.steps, args.warmup = 1, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (use --dry-run for a CPU smoke test)")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True

    results = [measure(m, args, device) for m in modes]
    print(json.dumps(results, indent=1))
    print("| mode | trainable params | step (s) | peak GPU memory (GiB) | model TFLOP/s |")
    print("|---|---|---|---|---|")
    for r in results:
        mem = f"{r['max_memory_gib']:.1f}" if r["max_memory_gib"] is not None else "n/a"
        label = f"LoRA r={r['rank']} ({r['base_dtype']} base)" if r["mode"] == "lora" else "full"
        print(f"| {label} | {r['trainable']:,} | {r['step_s']:.3f} | {mem} | "
              f"{r['model_tflops']:.1f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
