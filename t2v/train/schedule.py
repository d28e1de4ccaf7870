"""Pure pieces of training: LR schedule, EMA, per-sample randomness, throughput maths.

No Ray, no DeepSpeed: the worker loop (t2v/train/worker.py) wires these in, and the tests check
each against its formula.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def lr_factor(step: int, *, warmup: int, total: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based).

    Linear warmup over `warmup` steps ((step + 1) / warmup), then constant, or a cosine from 1
    down to `min_ratio` reached at step `total`.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind != "cosine":
        raise ValueError(f"unknown LR schedule {kind!r} (cosine, constant)")
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of parameters: shadow <- d * shadow + (1 - d) * param.

    With `warmup`, the decay of update n (1-based) is min(decay, (1 + n) / (10 + n)), so a short
    run's EMA is not stuck near its random init (the schedule of TensorFlow's
    ExponentialMovingAverage with num_updates). Kept in float32 whatever the training precision, as a plain module (`self.module`) that
    samples and exports without touching the distributed engine.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.module = copy.deepcopy(module).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, params: Iterable[tuple[str, Tensor]]) -> None:
        self.updates += 1
        d = self.current_decay()
        shadow = dict(self.module.named_parameters())
        for name, p in params:
            s = shadow[name]
            s.lerp_(p.detach().to(s.dtype), 1.0 - d)

    def state_dict(self) -> dict[str, Tensor]:
        state = {k: v.detach().contiguous() for k, v in self.module.state_dict().items()}
        state["__ema_updates__"] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        state = dict(state)
        self.updates = int(state.pop("__ema_updates__", torch.tensor(0)))
        self.module.load_state_dict(state, strict=True)


def sample_seed(seed: int, step: int, key: str, salt: str = "") -> int:
    """A 63-bit seed that depends only on (run seed, optimizer step, sample key).

    Noise, timesteps and caption dropout drawn from it do not depend on which worker got the
    sample or on the micro-batch split, so ZeRO stages, worker counts and gradient accumulation
    see identical training signals (and the tests can compare them).
    """
    digest = hashlib.sha256(f"{seed}/{step}/{key}/{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def per_sample_generators(seed: int, step: int, keys: list[str],
                          salt: str = "") -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, step, k, salt)) for k in keys]


def train_flops(flops_forward: float) -> float:
    """Training FLOPs of one sample: forward + backward ~= 3x forward (Kaplan et al. 2020)."""
    return 3 * flops_forward


def mfu(flops_per_s: float, peak_flops: float) -> float:
    return flops_per_s / peak_flops if peak_flops > 0 else float("nan")
