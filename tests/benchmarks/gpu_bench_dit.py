"""bf16 MFU of VideoDiT (`large` = Wan 2.1 1.3B geometry) at 480p-like token counts, fwd+bwd.

Ray-free and package-free: needs only torch>=2.11 and t2v/models/dit.py (+ rope.py), which it
imports by path, so it runs on a bare GPU box with the repository checked out:

    python tests/benchmarks/gpu_bench_dit.py                    # 21x60x104 latent = 32760 tokens
    python tests/benchmarks/gpu_bench_dit.py --tokens 8192 --no-checkpointing
    python tests/benchmarks/gpu_bench_dit.py --dry-run          # CPU, tiny shape: a smoke test

MFU = model FLOPs / step time / dense bf16 peak, where model FLOPs = 3 x VideoDiT.flops()
(forward + backward; the recompute of activation checkpointing is NOT counted, as usual for MFU).
Peaks (dense, no sparsity): H100 SXM 989 TFLOP/s, H100 PCIe 756, H100 NVL 835, H200 989,
A100 312; for another card pass --peak-tflops. The attention backend check fails loudly if
SDPA would fall back to the O(N^2)-memory math kernel.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

DIT_PATH = Path(__file__).resolve().parents[2] / "t2v" / "models" / "dit.py"
# Dense bf16 tensor-core peaks; more specific names first (the first substring match wins).
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0}


def load_dit(path: Path = DIT_PATH):
    """Import dit.py (and the rope.py it imports) without the package's __init__ chain: the
    rest of t2v, Ray etc. are not needed."""
    sys.path.insert(0, str(path.parents[2]))
    spec = importlib.util.spec_from_file_location("t2v_models_dit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def grid_for(tokens: int, max_frames: int = 21) -> tuple[int, int, int]:
    """A (T', H', W') token grid with exactly `tokens` tokens, as video-like as the factors allow."""
    t = max(d for d in range(1, max_frames + 1) if tokens % d == 0)
    rest = tokens // t
    h = max(d for d in range(1, math.isqrt(rest) + 1) if rest % d == 0)
    return t, h, rest // h


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def attention_backends(heads: int, head_dim: int, tokens: int, dtype: torch.dtype) -> dict:
    """Which fused SDPA backends run the self-attention shape, and how fast (ms, fwd only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = torch.randn(3, 1, heads, tokens, head_dim, device="cuda", dtype=dtype).unbind(0)
    result = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                torch.nn.functional.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
            result[backend.name] = f"ok {1e3 * (time.perf_counter() - t0):.1f} ms"
        except RuntimeError as e:
            result[backend.name] = f"unavailable: {str(e).splitlines()[0][:100]}"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="large")
    ap.add_argument("--latent", default="21x60x104", help="T x H x W of the latent (patch 1,2,2)")
    ap.add_argument("--tokens", type=int, help="override: video tokens per sample")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, default=512, help="umT5 context length of Wan")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="keep all activations (needs far more memory at 32k tokens)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--sdpa", default="",
                    help="fused SDPA backends in order of preference, e.g. cudnn,flash,efficient "
                         "(default: torch's own order among the fused ones)")
    ap.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this card")
    ap.add_argument("--out", help="write the result as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="CPU, debug preset, tiny shape")
    args = ap.parse_args()

    dit = load_dit()
    if args.dry_run:
        device, dtype = torch.device("cpu"), torch.float32
        args.preset, args.latent, args.tokens, args.text_len = "debug", "3x8x8", None, 16
        args.steps, args.warmup = 1, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (use --dry-run for a CPU smoke test)")
        if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11):
            print(f"warning: torch {torch.__version__} < 2.11 (this benchmark targets >= 2.11)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True

    cfg = dit.dit_config(args.preset)
    with torch.device("meta"):
        model = dit.VideoDiT(cfg)
    model = model.to_empty(device=device)
    model.checkpointing = not args.no_checkpointing
    model.init_weights()
    model = model.to(dtype).train()
    pt, ph, pw = cfg.patch
    if args.tokens:
        gt, gh, gw = grid_for(args.tokens)
        thw = (gt * pt, gh * ph, gw * pw)
    else:
        thw = tuple(int(s) for s in args.latent.split("x"))
    x = torch.randn(args.batch, cfg.in_channels, *thw, device=device, dtype=dtype)
    t = torch.rand(args.batch, device=device)
    text = torch.randn(args.batch, args.text_len, cfg.text_dim, device=device, dtype=dtype)
    tokens = args.batch * math.prod(model.grid(tuple(x.shape)))
    flops = 3 * model.flops(tuple(x.shape), args.text_len)
    step_model = torch.compile(model) if args.compile else model

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        step_model(x, t, text).float().square().mean().backward()

    backends = {}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = attention_backends(cfg.heads, cfg.head_dim, tokens // args.batch, dtype)
        print("SDPA backends for self-attention:", json.dumps(backends, indent=1))
        fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION]
        if args.sdpa:
            names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION}
            order = [names[n] for n in args.sdpa.split(",")]
            guard = sdpa_kernel(order, set_priority=True)  # the first that supports the call
        else:
            guard = sdpa_kernel(fused)  # no silent fallback to the math kernel
    else:
        from contextlib import nullcontext

        guard = nullcontext()

    times = []
    with guard:
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
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    achieved = flops / step_s / 1e12
    result = {
        "device": name, "torch": torch.__version__, "preset": args.preset,
        "params": model.num_params(), "latent": list(thw), "batch": args.batch,
        "tokens": tokens, "text_len": args.text_len, "checkpointing": model.checkpointing,
        "compile": args.compile, "sdpa": args.sdpa or "default", "dtype": str(dtype),
        "step_s": step_s,
        "model_tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
        "peak_tflops": peak, "mfu": achieved / peak if peak else None,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "sdpa_backends": backends,
    }
    print(json.dumps(result, indent=1))
    mfu = f"{100 * result['mfu']:.1f} % of {peak:.0f}" if peak else "n/a (no peak for this device)"
    print(f"{args.preset} {tokens} tokens: {step_s * 1e3:.0f} ms/step fwd+bwd, "
          f"{achieved:.1f} TFLOP/s, MFU {mfu}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
