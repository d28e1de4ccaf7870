"""Pure pieces of training: LR schedule, EMA, per-sample randomness, throughput maths.

No Ray, no DeepSpeed: the worker loop (t2v/train/worker.py) wires these in, and the tests check
each against its formula.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from t2v.config import OptimConfig

FUSED_DEVICES = ("cpu", "cuda")
"""Device types with torch's fused AdamW kernel (torch >= 2.4 for CPU)."""


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


def adamw(params: Iterable[nn.Parameter], optim: OptimConfig) -> torch.optim.AdamW:
    """torch's AdamW as every training loop here makes it: the config's LR, betas and weight
    decay, and the fused kernel where `optim.fused` asks for it and the device has it."""
    params = list(params)
    fused = optim.fused and all(p.device.type in FUSED_DEVICES and p.is_floating_point()
                                for p in params)
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                             weight_decay=optim.weight_decay, fused=fused or None)


def step_count(optimizer: torch.optim.Optimizer, p: Tensor, value: int) -> Tensor:
    """AdamW's `step` state as AdamW itself keeps it: a float32 scalar, on the parameter's
    device for the fused (and capturable) kernels, on the CPU otherwise."""
    fused = any(g.get("fused") or g.get("capturable") for g in optimizer.param_groups)
    return torch.tensor(float(value), dtype=torch.float32, device=p.device if fused else "cpu")


class Fragment(NamedTuple):
    """Elements [start, start + len(values)) of the flattened parameter `name`."""

    name: str
    start: int
    values: Tensor


class EMA:
    """Exponential moving average of parameters: shadow <- d * shadow + (1 - d) * param.

    Kept over fragments of the flattened parameters, in float32 whatever the training precision:
    a whole parameter is the fragment at 0; under ZeRO each rank keeps only the pieces it owns and
    updates them from its own piece of the parameters, with no communication
    (t2v/train/zero.py). With `warmup`, the decay of update n (1-based) is
    min(decay, (1 + n) / (10 + n)), so a short run's EMA is not stuck near its random init (the
    schedule of TensorFlow's ExponentialMovingAverage with num_updates).
    """

    UPDATES_KEY = "__ema_updates__"

    def __init__(self, fragments: Iterable[Fragment], decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shadow: dict[tuple[str, int], Tensor] = {
            (f.name, f.start): f.values.detach().reshape(-1).float().clone() for f in fragments}

    @classmethod
    def of_module(cls, module: nn.Module, decay: float, warmup: bool = True) -> EMA:
        """Whole trainable parameters of an undistributed module."""
        return cls((Fragment(n, 0, p) for n, p in module.named_parameters() if p.requires_grad),
                   decay, warmup)

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, fragments: Iterable[Fragment]) -> None:
        """One update from the same fragments the EMA was made of (any order)."""
        self.updates += 1
        d = self.current_decay()
        shadows, values = [], []
        for f in fragments:
            s = self.shadow[f.name, f.start]
            shadows.append(s)
            values.append(f.values.detach().reshape(-1).to(s.dtype))
        if len(shadows) != len(self.shadow):
            raise ValueError(f"EMA update got {len(shadows)} fragments, keeps {len(self.shadow)}")
        # One multi-tensor op rather than one lerp per tensor (a DiT has hundreds).
        if shadows:
            torch._foreach_lerp_(shadows, values, 1.0 - d)

    def whole(self) -> dict[str, Tensor]:
        """Name -> flat float32 tensor, for an EMA of whole parameters (`of_module`)."""
        return {name: t for (name, start), t in self.shadow.items() if start == 0}

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"{name}@{start}": t.contiguous() for (name, start), t in self.shadow.items()}
        state[self.UPDATES_KEY] = torch.tensor(self.updates)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """The state of an EMA of the same fragments (strict); other layouts: zero.load_ema."""
        state = dict(state)
        self.updates = int(state.pop(self.UPDATES_KEY, torch.tensor(0)))
        want = {f"{name}@{start}" for name, start in self.shadow}
        if set(state) != want:
            raise ValueError(f"EMA state has other fragments: {sorted(set(state) ^ want)[:3]}")
        for (name, start), t in self.shadow.items():
            t.copy_(state[f"{name}@{start}"])


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
