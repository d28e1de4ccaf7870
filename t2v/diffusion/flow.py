"""The rectified-flow objective: noising, timestep sampling, the velocity loss.

Conventions (DESIGN.md "Objective"): x_t = (1 - t) * x0 + t * eps with t in [0, 1], t = 0 is data
and t = 1 is noise. The model predicts the velocity v = eps - x0 = dx_t/dt, so sampling integrates
the ODE from t = 1 down to t = 0 (t2v/diffusion/sampling.py). The model is called as
`model(x, t, text, text_mask) -> v` with x (B, C, T, H, W), t (B,) float in [0, 1],
text (B, L, D) and text_mask (B, L) bool.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# model(x, t, text, text_mask) -> v, all shapes as in the module docstring.
VelocityModel = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
# velocity_fn(x, t) -> v with x (B, C, T, H, W) and t (B,): a model with its text bound (the
# samplers' view of it, t2v/diffusion/sampling.py).
VelocityFn = Callable[[Tensor, Tensor], Tensor]
# progress(done_steps, total_steps), called by a sampler after each step.
Progress = Callable[[int, int], None]


def timestep_shift(t: Tensor, shift: float) -> Tensor:
    """Warp t by t' = shift * t / (1 + (shift - 1) * t) (SD3 / Wan / diffusers convention).

    The map keeps 0 and 1 fixed and is monotone; shift > 1 moves mass towards the noise end,
    which larger inputs need because more tokens average away more of the noise
    (Esser et al. 2024, sec 5.3.2). shift = 1 is the identity.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(
    num_tokens: int,
    base_tokens: int = 256,
    max_tokens: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The timestep shift for an input of `num_tokens` tokens (frames x H' x W' / patch).

    mu is linear in the token count through (base_tokens, base_shift) and (max_tokens, max_shift)
    and shift = exp(mu): Esser et al. 2024, "Scaling Rectified Flow Transformers", sec 5.3.2, in
    the form of flux's `get_lin_function` + `time_shift` (black-forest-labs/flux,
    src/flux/sampling.py). As in flux the line is extrapolated, not clamped, outside
    [base_tokens, max_tokens]: video token counts far above max_tokens give large shifts, so pass
    a max_tokens that matches the range being trained on.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    if max_tokens == base_tokens:
        raise ValueError(f"max_tokens must differ from base_tokens, both are {base_tokens}")
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = base_shift + slope * (num_tokens - base_tokens)
    return math.exp(mu)


def _randn(
    shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str | None
) -> Tensor:
    """Standard normal noise drawn on the generator's device (if any), then moved to `device`."""
    if generator is None:
        return torch.randn(*shape, device=device)
    return torch.randn(*shape, generator=generator, device=generator.device).to(device)


def sample_t(
    batch: int,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Training timesteps: logit-normal t = sigmoid(N(mean, std)), then `timestep_shift`.

    Logit-normal puts most samples at intermediate t, where the velocity is hardest to predict
    (Esser et al. 2024, sec 3.1). Returns (batch,) float32 in (0, 1).
    """
    if batch <= 0:
        raise ValueError(f"batch must be > 0, got {batch}")
    if not std > 0:
        raise ValueError(f"std must be > 0, got {std}")
    z = _randn((batch,), generator, device) * std + mean  # (B,)
    return timestep_shift(torch.sigmoid(z), shift)  # (B,)


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """t of shape (B,) or () viewed as (B, 1, ..., 1) to broadcast over x's non-batch dims."""
    if t.dim() > 1 or t.numel() not in (1, x.shape[0]):
        raise ValueError(f"t must have shape () or ({x.shape[0]},), got {tuple(t.shape)}")
    return t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def noisy(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) * x0 + t * eps, with t (B,) broadcast over the non-batch dims."""
    if x0.shape != eps.shape:
        raise ValueError(f"x0 and eps differ in shape: {tuple(x0.shape)} vs {tuple(eps.shape)}")
    tb = _per_sample(t, x0)  # (B, 1, 1, 1, 1)
    return (1.0 - tb) * x0 + tb * eps  # (B, C, T, H, W)


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """The regression target v = eps - x0 = d x_t / dt."""
    return eps - x0


def flow_loss(
    model: VelocityModel,
    x0: Tensor,
    text: Tensor,
    text_mask: Tensor,
    t: Tensor | None = None,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    reduce: bool = True,
) -> Tensor:
    """The rectified-flow loss: MSE between the model's velocity and eps - x0.

    t (B,) and eps (like x0) are drawn when not given (t logit-normal with `shift`; a given t is
    used as is). The squared error is averaged over each sample's latent, then over the batch;
    `reduce=False` returns the per-sample losses (B,). The MSE is taken in float32 so that a
    bf16 model output does not lose the small differences late in training.
    """
    batch = x0.shape[0]
    if t is None:
        t = sample_t(batch, generator, shift=shift, device=x0.device)  # (B,)
    if eps is None:
        eps = _randn(x0.shape, generator, x0.device).to(x0.dtype)  # (B, C, T, H, W)
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    x_t = noisy(x0, eps, t)  # (B, C, T, H, W)
    v = model(x_t, t, text, text_mask)  # (B, C, T, H, W)
    if v.shape != x0.shape:
        raise ValueError(f"model returned {tuple(v.shape)}, expected {tuple(x0.shape)}")
    err = (v.float() - velocity_target(x0, eps).float()) ** 2  # (B, C, T, H, W)
    per_sample = err.flatten(1).mean(dim=1)  # (B,)
    return per_sample.mean() if reduce else per_sample


def heldout_flow_loss(
    model: VelocityModel,
    x0: Tensor,
    text: Tensor,
    text_mask: Tensor,
    t_values: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    seed: int = 0,
) -> dict[float, float]:
    """Validation loss at fixed timesteps with fixed noise: {t: loss}.

    The training loss is noisy because t and eps are random; fixing both (one noise draw from
    `seed`, shared by every t) makes the numbers comparable across training steps for the same
    x0. The noise is drawn on the CPU so it is the same on every device. The model's train/eval
    mode is the caller's business.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    eps = torch.randn(x0.shape, generator=generator).to(device=x0.device, dtype=x0.dtype)
    losses: dict[float, float] = {}
    with torch.no_grad():
        for tv in t_values:
            if not 0.0 <= tv <= 1.0:
                raise ValueError(f"t_values must lie in [0, 1], got {tv}")
            t = torch.full((x0.shape[0],), float(tv), device=x0.device)  # (B,)
            losses[float(tv)] = flow_loss(model, x0, text, text_mask, t=t, eps=eps).item()
    return losses
