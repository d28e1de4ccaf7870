"""UniPC for the rectified flow: the sampler Wan's diffusers pipelines run by default.

UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models") in the configuration of Wan's `UniPCMultistepScheduler`: data prediction
(x0 = x - t * v), order 2, the B(h) = e^h - 1 variant ("bh2"), first order on the first step
(warm-up) and on the last (`lower_order_final`). Each step costs one velocity call:

- UniC, the corrector, refines the state x_i that the last predictor produced, using the data
  prediction just made at x_i; that prediction itself is not recomputed (it stays the one made at
  the uncorrected x_i), so the corrector adds no model call;
- UniP, the predictor, is DPM-Solver++'s exponential-integrator step from x_i to t_{i+1} plus a
  finite-difference correction from the previous data prediction.

With alpha_t = 1 - t, sigma_t = t and lambda = log(alpha / sigma), a step from s to t has
h = lambda_t - lambda_s > 0 and e^-h = (t (1 - s)) / ((1 - t) s), which is 0 when s = 1 or t = 0:
steps from pure noise and into data are the exact limits of the formulas (diffusers instead
starts at 1 - 1e-6 to keep its logs finite; `diffusers_flow_schedule` does the same).

`diffusers_flow_schedule` reproduces the schedule diffusers builds for this scheduler, and the
integer timesteps WanPipeline hands the transformer, so that `denoise(..., sampler="unipc")`
renders what a diffusers user gets (tests/test_unipc.py, tests/test_wan_import.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from t2v.diffusion.flow import Progress, VelocityFn


def diffusers_flow_schedule(steps: int, shift: float = 1.0,
                            train_steps: int = 1000) -> tuple[Tensor, Tensor]:
    """diffusers' UniPC flow schedule: sigmas (steps + 1,) from ~1 to 0 and model times (steps,).

    `UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, final_sigmas_type="zero")`
    spaces steps + 1 sigmas uniformly from 1 to 1/train_steps, drops the last, shifts the rest
    with `timestep_shift`'s formula, moves a first sigma of 1 to 1 - 1e-6 and appends 0; it keeps
    the sigmas in float32. Its timesteps are int(train_steps * sigma) of the float64 sigmas, and
    WanPipeline gives the transformer those integers: the model sees t = timestep / train_steps,
    slightly below the sigma the solver steps from. Computed here in Python floats with the
    operations numpy does, so both come out bit for bit the same (sigmas float32, times float64).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    delta = (1.0 / train_steps - 1.0) / steps  # np.linspace(1, 1/train_steps, steps + 1)
    sigmas = [i * delta + 1.0 for i in range(steps)]
    sigmas = [shift * s / (1.0 + (shift - 1.0) * s) for s in sigmas]
    if abs(sigmas[0] - 1.0) < 1e-6:
        sigmas[0] -= 1e-6
    times = [math.trunc(s * train_steps) / train_steps for s in sigmas]
    return (torch.tensor([*sigmas, 0.0], dtype=torch.float32),  # (steps + 1,)
            torch.tensor(times, dtype=torch.float64))  # (steps,)


def _decay(s: float, t: float) -> float:
    """e^-h for a step from s to t < s: sigma_t alpha_s / (alpha_t sigma_s)."""
    return t * (1.0 - s) / ((1.0 - t) * s)


def _lam(t: float) -> float:
    """lambda = log(alpha / sigma) = log((1 - t) / t) for 0 < t < 1."""
    return math.log1p(-t) - math.log(t)


def _step(x: Tensor, m_s: Tensor, s: float, t: float) -> Tensor:
    """The first-order (DPM-Solver++ / DDIM) step from s to t: sigma_t / sigma_s * x +
    alpha_t (1 - e^-h) m_s, with m_s the data prediction at s."""
    return (t / s) * x + (1.0 - t) * (1.0 - _decay(s, t)) * m_s  # (B, C, T, H, W)


def _slope(m_p: Tensor, p: float, m_s: Tensor, s: float, t: float) -> Tensor | None:
    """D1 = (m_p - m_s) / r_p with r_p = (lambda_p - lambda_s) / h: the divided difference of the
    data predictions at the previous time p and at s. None when p = 1 (lambda_p = -inf, D1 = 0)."""
    if p >= 1.0:
        return None
    r = (_lam(p) - _lam(s)) / (_lam(t) - _lam(s))
    return (m_p - m_s) / r  # (B, C, T, H, W)


def _predict(x: Tensor, hist: list[tuple[float, Tensor]], t: float, order: int) -> Tensor:
    """UniP-`order` from the newest entry of hist [(time, x0), ...] to time t."""
    s, m_s = hist[-1]
    x_t = _step(x, m_s, s, t)  # (B, C, T, H, W)
    if order == 1:
        return x_t
    p, m_p = hist[-2]
    d1 = _slope(m_p, p, m_s, s, t)
    if d1 is None:
        return x_t
    # UniP-2 takes rho = 1/2, as the reference UniPC code and diffusers do; B(h) = e^-h - 1.
    b_h = _decay(s, t) - 1.0
    return x_t - (1.0 - t) * b_h * 0.5 * d1  # (B, C, T, H, W)


def _correct(x_s: Tensor, hist: list[tuple[float, Tensor]], t: float, m_t: Tensor,
             order: int) -> Tensor:
    """UniC-`order`: redo the step from hist[-1] (time s, state x_s) to t with m_t, the data
    prediction at t, as one more interpolation point (order + 1 in all)."""
    s, m_s = hist[-1]
    x_t = _step(x_s, m_s, s, t)  # (B, C, T, H, W)
    e = _decay(s, t)
    b_h = e - 1.0  # B(h) = e^-h - 1 (bh2), in (-1, 0)
    if order == 1:
        return x_t - (1.0 - t) * b_h * 0.5 * (m_t - m_s)  # (B, C, T, H, W)
    p, m_p = hist[-2]
    hh = math.log(e)  # -h, finite: order 2 never starts at s = 1
    # rho solves [[1, 1], [r, 1]] rho = (b1, b2), b_k from the phi functions of -h (B(h) form).
    b1 = (b_h / hh - 1.0) / b_h
    b2 = 2.0 * (b_h / hh**2 - 1.0 / hh - 0.5) / b_h
    d1 = _slope(m_p, p, m_s, s, t)
    if d1 is None:  # r = -inf: rho_p -> 0 and the D1 term vanishes
        return x_t - (1.0 - t) * b_h * b1 * (m_t - m_s)
    r = (_lam(p) - _lam(s)) / (_lam(t) - _lam(s))
    rho_p = (b1 - b2) / (1.0 - r)
    rho_t = b1 - rho_p
    return x_t - (1.0 - t) * b_h * (rho_p * d1 + rho_t * (m_t - m_s))  # (B, C, T, H, W)


def _t_batch(t: float, x: Tensor) -> Tensor:
    """As sampling._t_batch: (B,) float32, float64 for a float64 state."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)  # (B,)


def unipc(
    velocity_fn: VelocityFn,
    x: Tensor,
    schedule: Tensor,
    progress: Progress | None = None,
    model_times: Tensor | None = None,
) -> Tensor:
    """UniPC-2 (bh2, data prediction) from schedule[0] to schedule[-1]: 1 velocity call per step.

    schedule must decrease strictly, from at most 1 to at least 0. The velocity is evaluated at
    the schedule's times, or at `model_times` (steps,) where given: diffusers' integer timesteps
    (`diffusers_flow_schedule`), which the solver itself does not use.
    """
    if schedule.dim() != 1 or schedule.numel() < 2:
        raise ValueError(f"schedule must be 1-D with >= 2 times, got shape {tuple(schedule.shape)}")
    ts = schedule.tolist()
    steps = len(ts) - 1
    if not (ts[0] <= 1.0 and ts[-1] >= 0.0 and all(ts[i] > ts[i + 1] for i in range(steps))):
        raise ValueError(f"unipc needs a schedule decreasing strictly within [0, 1], got {ts}")
    times = ts[:-1] if model_times is None else model_times.tolist()
    if len(times) != steps:
        raise ValueError(f"model_times must have {steps} entries, got {len(times)}")
    hist: list[tuple[float, Tensor]] = []  # (time, data prediction) of the last two steps
    x_last, order = x, 0  # the state the last predictor started from, and its order
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = velocity_fn(x, _t_batch(times[i], x)).to(x.dtype)  # (B, C, T, H, W)
        x0 = x - t * v  # (B, C, T, H, W)
        if hist:
            x = _correct(x_last, hist, t, x0, order)  # (B, C, T, H, W)
        hist = [*hist[-1:], (t, x0)]
        order = 1 if i == 0 or i == steps - 1 else 2  # warm-up, lower_order_final
        x_last = x
        x = _predict(x, hist, t_next, order)  # (B, C, T, H, W)
        if progress is not None:
            progress(i + 1, steps)
    return x
