"""UniPC (t2v/diffusion/unipc.py) against diffusers' `UniPCMultistepScheduler` as Wan ships it.

The velocity model is the exact field of a 1-D Gaussian mixture (per element): smooth, strongly
nonlinear in x near the data end, and cheap. Our sampler and diffusers' step loop integrate it
from the same noise with the same schedule; diffusers hands the model its integer timesteps,
ours `diffusers_flow_schedule`'s model times.
"""

from __future__ import annotations

import math

import pytest
import torch

from t2v.diffusion.sampling import denoise, dpm_solver_2m, euler, get_schedule, heun
from t2v.diffusion.unipc import diffusers_flow_schedule, unipc
from tests.test_flow import MU, S, gaussian_velocity

# scheduler/scheduler_config.json of Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers, less its shift.
WAN_UNIPC = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    solver_order=2, prediction_type="flow_prediction", predict_x0=True, solver_type="bh2",
    lower_order_final=True, disable_corrector=[], use_flow_sigmas=True, final_sigmas_type="zero",
    timestep_spacing="linspace", steps_offset=0, thresholding=False)
# Components (mean, std, weight) of the data distribution behind `mixture_velocity`.
MIXTURE = ((-1.5, 0.3, 0.3), (0.5, 0.5, 0.5), (2.0, 0.2, 0.2))
MATCH_ATOL = 1e-5


def mixture_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact velocity E[eps - x0 | x_t] when every element of x0 follows `MIXTURE`.

    Given component k, x_t ~ N((1 - t) mu_k, V_k) with V_k = (1 - t)^2 s_k^2 + t^2, and
    E[x0 | x_t, k] = mu_k + (1 - t) s_k^2 (x_t - (1 - t) mu_k) / V_k, E[eps | x_t, k] =
    t (x_t - (1 - t) mu_k) / V_k; the components are weighted by their posterior.
    """
    t = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))  # (B, 1, ...)
    logits, velocities = [], []
    for mu, s, w in MIXTURE:
        var = (1 - t) ** 2 * s**2 + t**2
        r = x - (1 - t) * mu
        logits.append(math.log(w) - 0.5 * torch.log(var) - 0.5 * r**2 / var)
        velocities.append(t * r / var - (mu + (1 - t) * s**2 * r / var))
    post = torch.softmax(torch.stack(logits), dim=0)  # (K, B, ...)
    return (post * torch.stack(velocities)).sum(0)  # (B, ...)


def _noise(n: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 3, 4, 4, generator=g, dtype=torch.float64)  # (B, C, T, H, W)


def _diffusers_unipc(steps: int, shift: float, x: torch.Tensor) -> torch.Tensor:
    """WanPipeline's denoising loop, less the transformer and guidance."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=shift)
    sched.set_timesteps(steps)
    for timestep in sched.timesteps:  # int64
        v = mixture_velocity(x, (timestep / 1000.0).expand(x.shape[0]).double())
        x = sched.step(v, timestep, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 7.5])
def test_schedule_is_diffusers_bit_for_bit(shift):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(**WAN_UNIPC, flow_shift=shift)
    for steps in (1, 2, 3, 7, 9, 10, 20, 30, 50, 999):
        sched.set_timesteps(steps)
        sigmas, times = diffusers_flow_schedule(steps, shift)
        assert sigmas.dtype == sched.sigmas.dtype == torch.float32
        assert torch.equal(sigmas, sched.sigmas), steps
        # shift 1 puts many sigmas on multiples of 1/1000, where int() is one rounding away
        # from the integer below: the times must come from the same float64 numbers.
        assert torch.equal((times * 1000).round().long(), sched.timesteps), steps
    assert sigmas[0].item() < 1.0 and sigmas[-1].item() == 0.0
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        diffusers_flow_schedule(0, shift)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20])
def test_unipc_matches_diffusers_unipc(steps, shift):
    x = _noise()
    want = _diffusers_unipc(steps, shift, x.clone())
    sigmas, times = diffusers_flow_schedule(steps, shift)
    got = unipc(mixture_velocity, x.clone(), sigmas, model_times=times)
    assert got.dtype == torch.float64
    assert (got - want).abs().max().item() <= MATCH_ATOL
    if steps >= 2:  # the comparison can tell samplers apart
        assert (dpm_solver_2m(mixture_velocity, x, sigmas) - want).abs().max() > 1e-3
        # ... and the model times: the velocity at sigma instead of int(1000 sigma) / 1000.
        assert (unipc(mixture_velocity, x, sigmas) - want).abs().max() > 10 * MATCH_ATOL


def test_denoise_unipc_is_wans_recipe():
    """`denoise(sampler="unipc")` runs diffusers' schedule with its integer model timesteps."""
    x = _noise(8)
    seen: list[float] = []

    def model(x, t, *_):
        seen.append(t[0].item())
        return mixture_velocity(x, t)

    text, mask = torch.zeros(8, 1, 4), torch.ones(8, 1, dtype=torch.bool)
    done: list[tuple[int, int]] = []
    out = denoise(model, x, text, mask, steps=6, cfg=1.0, shift=3.0, sampler="unipc",
                  progress=lambda i, n: done.append((i, n)))
    sigmas, times = diffusers_flow_schedule(6, 3.0)
    assert seen == times.tolist() and all(float(int(1000 * t)) == 1000 * t for t in seen)
    assert done == [(i, 6) for i in range(1, 7)]  # one velocity call per step
    assert torch.equal(out, unipc(mixture_velocity, x, sigmas, model_times=times))
    assert (out - _diffusers_unipc(6, 3.0, x)).abs().max() <= MATCH_ATOL


def test_unipc_beats_euler_and_converges():
    """On t2v's own schedule, against a 200-step Heun reference (error ~2e-4 at shift 3)."""
    x = _noise(256, seed=1)
    for shift in (1.0, 3.0):
        ref = heun(mixture_velocity, x, get_schedule(200, shift))

        def error(sampler, steps: int) -> float:
            out = sampler(mixture_velocity, x, get_schedule(steps, shift))  # noqa: B023
            return (out - ref).abs().mean().item()  # noqa: B023

        # Measured (mean abs error), shift 1: UniPC 3.4e-2 / 2.7e-2 / 3.2e-3 at 5 / 10 / 20
        # steps, Euler 2.2e-1 / 1.1e-1 / 5.7e-2; shift 3: UniPC 1.7e-1 / 4.6e-2 / 3.7e-2.
        assert error(unipc, 10) < 0.5 * error(euler, 10), shift
        assert error(unipc, 20) < error(unipc, 10) < error(unipc, 5), shift


def test_unipc_is_third_order_between_the_noise_and_data_ends():
    """UniC raises the order of UniP by one: on a grid uniform in lambda, away from t = 0 and
    t = 1, UniPC-2 converges at order 3 (measured 2.97, 3.07) where DPM-Solver++(2M), the same
    predictor without the corrector, is second order (1.94, 1.99); Gaussian target as in
    tests/test_sampling.py, where the flow is known in closed form."""
    z = _noise(500, seed=2)

    def on_path(t: float) -> torch.Tensor:
        return (1 - t) * MU + math.sqrt((1 - t) ** 2 * S**2 + t**2) * z

    def error(sampler, steps: int) -> float:
        lam = torch.linspace(math.log(0.05 / 0.95), math.log(0.98 / 0.02), steps + 1)
        schedule = torch.sigmoid(-lam.double())  # t from 0.95 to 0.02
        return (sampler(gaussian_velocity, on_path(0.95), schedule) - on_path(0.02)).abs().max()

    for coarse in (20, 40):
        assert 2.7 < math.log2(error(unipc, coarse) / error(unipc, 2 * coarse)) < 3.4, coarse
        assert error(unipc, coarse) < 0.5 * error(dpm_solver_2m, coarse), coarse


def test_unipc_from_pure_noise_takes_the_limits():
    """A schedule starting at t = 1 (lambda = -inf) takes the formulas' limits. Starting at
    1 - eps instead (diffusers: eps = 1e-6) weighs the first data prediction by ~1 / log(1/eps)
    in the later second-order terms, so the results approach the limit slowly but surely
    (measured max differences 2.5e-3, 1.4e-4, 9.5e-5, 7.0e-5 for eps = 1e-3, 1e-6, 1e-9, 1e-12).
    """
    x = _noise(16)
    at_one = unipc(mixture_velocity, x, get_schedule(8, 3.0))
    assert bool(at_one.isfinite().all())
    diffs = []
    for eps in (1e-3, 1e-6, 1e-9, 1e-12):
        below = get_schedule(8, 3.0).double()
        below[0] = 1 - eps
        diffs.append((unipc(mixture_velocity, x, below) - at_one).abs().max().item())
    assert diffs == sorted(diffs, reverse=True) and diffs[-1] < 1e-4, diffs
    # One step from noise to data is the data prediction x - v(x, 1).
    one = unipc(mixture_velocity, x, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(one, x - mixture_velocity(x, torch.ones(16)), atol=0, rtol=0)


def test_unipc_refuses_bad_schedules():
    x = _noise(2)
    with pytest.raises(ValueError, match="decreasing strictly"):
        unipc(mixture_velocity, x, torch.tensor([1.0, 0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="decreasing strictly"):
        unipc(mixture_velocity, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="model_times must have 2 entries, got 3"):
        unipc(mixture_velocity, x, torch.tensor([1.0, 0.5, 0.0]),
              model_times=torch.tensor([1.0, 0.5, 0.0]))
