"""ODE samplers for the rectified flow, with batched classifier-free guidance.

Sampling integrates dx/dt = v(x, t) from pure noise at t = 1 to data at t = 0 (conventions in
t2v/diffusion/flow.py). Small typed pure functions in the manner of flux's sampling.py:
`get_noise` -> `get_schedule` -> `denoise`, which wraps the model in `cfg_velocity` and hands it
to one of the `SAMPLERS` (UniPC, Wan's default, lives in t2v/diffusion/unipc.py). Every sampler
is deterministic: the only randomness is the noise, and each video's noise depends only on its
own seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from t2v.diffusion.flow import Progress, VelocityFn, VelocityModel, timestep_shift
from t2v.diffusion.unipc import diffusers_flow_schedule, unipc


def get_noise(
    shape: tuple[int, int, int, int],
    seeds: list[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Initial noise (B, C, T, H, W), one CPU generator per seed.

    A video then depends only on its own seed: not on its batch mates, the batch size or the
    device (CPU draws are the same everywhere). Drawn in float32 and cast, so the dtype only
    rounds the same numbers.
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be (C, T, H, W), got {tuple(shape)}")
    if not seeds:
        raise ValueError("seeds must not be empty")
    noise = [
        torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(int(seed)))
        for seed in seeds
    ]
    return torch.stack(noise).to(device=device, dtype=dtype)  # (B, C, T, H, W)


def get_schedule(steps: int, shift: float = 1.0) -> Tensor:
    """Timesteps (steps + 1,) from 1 to 0: uniform, then `timestep_shift`.

    Computed in float64 with the endpoints pinned, so that every schedule starts exactly at pure
    noise and ends exactly at t = 0 whatever the shift.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = timestep_shift(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)
    ts[0], ts[-1] = 1.0, 0.0
    return ts.float()  # (steps + 1,)


def _pad_tokens(text: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad text (B, L, D) and mask (B, L) to `length` tokens; padding is masked out."""
    pad = length - text.shape[1]
    if pad == 0:
        return text, mask
    text = torch.nn.functional.pad(text, (0, 0, 0, pad))  # (B, length, D)
    mask = torch.nn.functional.pad(mask, (0, pad), value=False)  # (B, length)
    return text, mask


def cfg_velocity(
    model: VelocityModel,
    x: Tensor,
    t: Tensor,
    text: Tensor,
    text_mask: Tensor,
    neg_text: Tensor | None,
    neg_mask: Tensor | None,
    cfg: float | Tensor,
) -> Tensor:
    """Classifier-free guided velocity v = v_u + cfg * (v_c - v_u).

    Cond and uncond go through ONE forward of batch 2B (text padded to a common length), which
    keeps the GPU busy and halves the kernel launches. cfg is a float or a per-sample (B,)
    tensor; when every cfg is 1 the guidance is the identity and only the cond forward runs.
    neg_text / neg_mask may have batch 1 (e.g. the encoded empty prompt) or B.
    """
    batch = x.shape[0]
    cfg_t = torch.as_tensor(cfg, dtype=torch.float32)
    if cfg_t.dim() > 1 or cfg_t.numel() not in (1, batch):
        raise ValueError(f"cfg must be a float or a ({batch},) tensor, got shape {tuple(cfg_t.shape)}")
    if bool((cfg_t == 1.0).all()):
        return model(x, t, text, text_mask)  # (B, C, T, H, W)
    if neg_text is None or neg_mask is None:
        raise ValueError(f"cfg={cfg} needs neg_text and neg_mask (e.g. the encoded empty prompt)")
    if neg_text.shape[-1] != text.shape[-1]:
        raise ValueError(f"neg_text width {neg_text.shape[-1]} != text width {text.shape[-1]}")
    if neg_text.shape[0] not in (1, batch):
        raise ValueError(f"neg_text batch must be 1 or {batch}, got {neg_text.shape[0]}")
    neg_text = neg_text.expand(batch, -1, -1)  # (B, Ln, D)
    neg_mask = neg_mask.expand(batch, -1)  # (B, Ln)
    length = max(text.shape[1], neg_text.shape[1])
    text, text_mask = _pad_tokens(text, text_mask, length)  # (B, L, D), (B, L)
    neg_text, neg_mask = _pad_tokens(neg_text, neg_mask, length)  # (B, L, D), (B, L)
    v = model(
        torch.cat([x, x]),  # (2B, C, T, H, W)
        torch.cat([t, t]),  # (2B,)
        torch.cat([text, neg_text.to(text.dtype)]),  # (2B, L, D)
        torch.cat([text_mask, neg_mask.to(text_mask.dtype)]),  # (2B, L)
    )  # (2B, C, T, H, W)
    v_c, v_u = v.chunk(2)  # (B, C, T, H, W) each
    scale = cfg_t.to(device=v.device, dtype=v.dtype).reshape(-1, *([1] * (v.dim() - 1)))
    return v_u + scale * (v_c - v_u)  # (B, C, T, H, W)


def _times(schedule: Tensor) -> list[float]:
    """The schedule as Python floats (steps are scalars; no device syncs inside the loop)."""
    if schedule.dim() != 1 or schedule.numel() < 2:
        raise ValueError(f"schedule must be 1-D with >= 2 times, got shape {tuple(schedule.shape)}")
    return schedule.tolist()


def _t_batch(t: float, x: Tensor) -> Tensor:
    """The scalar time t as a (B,) tensor; float32 (timestep embeddings want it even for bf16 x),
    float64 when the state is float64."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)  # (B,)


def _report(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def euler(
    velocity_fn: VelocityFn, x: Tensor, schedule: Tensor, progress: Progress | None = None
) -> Tensor:
    """First-order Euler from schedule[0] to schedule[-1]: one velocity call per step."""
    ts = _times(schedule)
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        v = velocity_fn(x, _t_batch(t, x))  # (B, C, T, H, W)
        x = x + (t_next - t) * v.to(x.dtype)  # (B, C, T, H, W)
        _report(progress, i + 1, len(ts) - 1)
    return x


def heun(
    velocity_fn: VelocityFn, x: Tensor, schedule: Tensor, progress: Progress | None = None
) -> Tensor:
    """Heun's second-order method (explicit trapezoid): 2 velocity calls per step.

    A step that ends at t = 0 is a plain Euler step, as in EDM (Karras et al. 2022, Alg. 1):
    logit-normal training almost never shows the model t = 0, and the one first-order step of
    local error O(h^2) keeps the global order at 2. So `steps` steps cost 2 * steps - 1 calls.
    """
    ts = _times(schedule)
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t
        v = velocity_fn(x, _t_batch(t, x)).to(x.dtype)  # (B, C, T, H, W)
        x_euler = x + dt * v  # (B, C, T, H, W)
        if t_next == 0.0:
            x = x_euler
        else:
            v_next = velocity_fn(x_euler, _t_batch(t_next, x)).to(x.dtype)  # (B, C, T, H, W)
            x = x + 0.5 * dt * (v + v_next)  # (B, C, T, H, W)
        _report(progress, i + 1, len(ts) - 1)
    return x


def dpm_solver_2m(
    velocity_fn: VelocityFn, x: Tensor, schedule: Tensor, progress: Progress | None = None
) -> Tensor:
    """DPM-Solver++(2M) for the flow (Lu et al. 2022): data-prediction multistep, 1 call per step.

    With alpha_t = 1 - t, sigma_t = t and lambda = log(alpha / sigma), the data prediction is
    x0 = x - t * v, and the exponential integrator steps x to sigma_n / sigma * x +
    alpha_n * (1 - e^-h) * D with h = lambda_n - lambda. D is x0 (first order; this step is then
    exactly Euler) or the linear extrapolation of the last two x0 predictions in lambda (second
    order). Steps that start at t = 1 (lambda = -inf) or end at t = 0 (sigma_n = 0) are first
    order, as in diffusers' `lower_order_final`.
    """
    ts = _times(schedule)
    prev: tuple[float, Tensor] | None = None  # (lambda, x0) of the previous step
    for i in range(len(ts) - 1):
        t, t_next = ts[i], ts[i + 1]
        v = velocity_fn(x, _t_batch(t, x)).to(x.dtype)  # (B, C, T, H, W)
        x0 = x - t * v  # (B, C, T, H, W)
        if t_next == 0.0:
            x = x0
        elif t == 1.0:
            # From pure noise: sigma = 1, alpha = 0, e^-h = 0.
            x = t_next * x + (1.0 - t_next) * x0  # (B, C, T, H, W)
        else:
            lam, lam_next = math.log((1.0 - t) / t), math.log((1.0 - t_next) / t_next)
            h = lam_next - lam
            d = x0
            if prev is not None:
                r = (lam - prev[0]) / h
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * prev[1]  # (B, C, T, H, W)
            x = (t_next / t) * x + (1.0 - t_next) * (-math.expm1(-h)) * d  # (B, C, T, H, W)
        prev = (math.log((1.0 - t) / t), x0) if 0.0 < t < 1.0 else None
        _report(progress, i + 1, len(ts) - 1)
    return x


Sampler = Callable[[VelocityFn, Tensor, Tensor, Progress | None], Tensor]
SAMPLERS: dict[str, Sampler] = {"euler": euler, "heun": heun, "dpm_solver_2m": dpm_solver_2m,
                                 "unipc": unipc}
DEFAULT_SAMPLER = "euler"
"""What a package that names no sampler renders with (render's fallback, and the scheduler a
diffusers export of it gets, so both render the same)."""


@torch.no_grad()
def denoise(
    model: VelocityModel,
    noise: Tensor,
    text: Tensor,
    text_mask: Tensor,
    neg_text: Tensor | None = None,
    neg_mask: Tensor | None = None,
    steps: int = 30,
    cfg: float | Tensor = 5.0,
    shift: float = 1.0,
    sampler: str = "euler",
    progress: Progress | None = None,
) -> Tensor:
    """Noise (B, C, T, H, W) at t = 1 -> latents at t = 0, guided by text with `cfg`.

    The unconditional input is the caller's: pass the encoded empty (or negative) prompt as
    neg_text / neg_mask. The state keeps noise's dtype; pass float32 noise for a bf16 model.
    Every sampler runs on `get_schedule(steps, shift)` except "unipc", which is Wan's default
    sampler as diffusers runs it, schedule and integer model timesteps included
    (`diffusers_flow_schedule`): an imported Wan package renders what WanPipeline does.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        return cfg_velocity(model, x, t, text, text_mask, neg_text, neg_mask, cfg)

    if sampler == "unipc":
        schedule, model_times = diffusers_flow_schedule(steps, shift)  # (steps + 1,), (steps,)
        return unipc(velocity_fn, noise, schedule, progress, model_times)
    return SAMPLERS[sampler](velocity_fn, noise, get_schedule(steps, shift), progress)
