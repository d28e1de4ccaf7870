"""ODE samplers and CFG (t2v/diffusion/sampling.py).

The key test integrates the exact velocity field of a Gaussian data distribution
x0 ~ N(MU, S^2) (per dimension; `gaussian_velocity` in tests/test_flow.py derives it). The
marginal of x_t is N((1-t) MU, (1-t)^2 S^2 + t^2) and the probability-flow ODE moves every point
along x_t = (1-t) MU + sqrt((1-t)^2 S^2 + t^2) * z, so noise eps = x_1 lands exactly on
x_0 = MU + S * eps: an affine map, against which each sample's error is measured.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from t2v.diffusion.flow import timestep_shift
from t2v.diffusion.sampling import (
    SAMPLERS,
    cfg_velocity,
    denoise,
    dpm_solver_2m,
    euler,
    get_noise,
    get_schedule,
    heun,
)
from tests.test_flow import MU, S, gaussian_velocity

SHAPE = (2, 1, 3, 3)  # (C, T, H, W)
WIDTH = 8  # text embedding width


def _eps(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 1, 1, 1, generator=g, dtype=torch.float64)  # D = 4 dims


def _oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return gaussian_velocity(x, t)


def _max_error(sampler, steps: int, eps: torch.Tensor) -> float:
    out = sampler(_oracle, eps, get_schedule(steps))
    return (out - (MU + S * eps)).abs().max().item()


def _order(sampler, coarse: int, eps: torch.Tensor) -> float:
    """Observed order p from the errors at coarse and 2 * coarse steps: ratio = 2^p."""
    return math.log2(_max_error(sampler, coarse, eps) / _max_error(sampler, 2 * coarse, eps))


def test_closed_form_flow_matches_a_fine_rk4_reference():
    # RK4 with 500 steps is accurate to ~7e-13 here (4th order: 100 steps give ~4e-10).
    eps = _eps(200, seed=1)
    ts = torch.linspace(1.0, 0.0, 501, dtype=torch.float64).tolist()
    x = eps.clone()

    def tt(s: float) -> torch.Tensor:
        return torch.full((eps.shape[0],), s, dtype=torch.float64)

    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        h = t_next - t
        k1 = _oracle(x, tt(t))
        k2 = _oracle(x + 0.5 * h * k1, tt(t + 0.5 * h))
        k3 = _oracle(x + 0.5 * h * k2, tt(t + 0.5 * h))
        k4 = _oracle(x + h * k3, tt(t_next))
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    torch.testing.assert_close(x, MU + S * eps, atol=1e-11, rtol=0)


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_solver_2m", "unipc"])
def test_samplers_land_on_the_gaussian_target(name):
    # 20000 x 4 draws: the sampling error of the mean is ~0.002, of the std ~0.001. Euler at 50
    # steps is short of the std by ~0.013 (it contracts); the others by < 0.005.
    eps = _eps(20000)
    out = SAMPLERS[name](_oracle, eps, get_schedule(50))
    assert out.mean().item() == pytest.approx(MU, abs=0.01)
    assert out.std().item() == pytest.approx(S, abs=0.02 if name == "euler" else 0.005)


def test_euler_is_first_order_and_heun_second_order():
    eps = _eps(2000)
    # Measured (max error over 2000 x 4 samples): Euler 20/40/80 steps -> orders 0.97, 0.99;
    # Heun 10/20/40 -> 2.12, 2.07.
    for coarse in (20, 40):
        assert 0.85 < _order(euler, coarse, eps) < 1.15, coarse
    for coarse in (10, 20):
        assert 1.8 < _order(heun, coarse, eps) < 2.3, coarse
    for steps in (5, 10, 20, 50):
        assert _max_error(heun, steps, eps) < _max_error(euler, steps, eps), steps
    # Shifted schedules keep the orders (asymptotically).
    shifted = lambda f: lambda v, x, s: f(v, x, get_schedule(len(s) - 1, shift=3.0))  # noqa: E731
    assert 0.85 < _order(shifted(euler), 40, eps) < 1.15
    assert 1.8 < _order(shifted(heun), 40, eps) < 2.3


def test_dpm_solver_2m_is_second_order_between_noise_and_data_ends():
    # Away from t = 0 and t = 1, on a grid uniform in lambda = log((1-t)/t), 2M is second
    # order (measured 1.94, 1.99 at 20/40/80 steps). End to end on a uniform-t grid the lambda
    # steps of the last few steps do not shrink (lambda -> +inf at t = 0), and the error they add
    # makes the measured order erratic (1.2, 1.6, 1.7 from 10 to 160 steps), yet 2M stays far
    # ahead of Euler for the same number of model calls.
    z = _eps(2000)

    def on_path(t: float) -> torch.Tensor:
        return (1 - t) * MU + math.sqrt((1 - t) ** 2 * S**2 + t**2) * z

    def error(steps: int) -> float:
        lam = torch.linspace(math.log(0.05 / 0.95), math.log(0.98 / 0.02), steps + 1)
        schedule = torch.sigmoid(-lam.double())  # t from 0.95 to 0.02
        out = dpm_solver_2m(_oracle, on_path(0.95), schedule)
        return (out - on_path(0.02)).abs().max().item()

    for coarse in (20, 40):
        assert 1.8 < math.log2(error(coarse) / error(2 * coarse)) < 2.3, coarse
    for steps in (10, 20, 50):
        assert _max_error(dpm_solver_2m, steps, z) < 0.2 * _max_error(euler, steps, z), steps


class ToyModel(nn.Module):
    """A deterministic per-sample velocity model that reads x, t and the masked text mean."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.mix = nn.Parameter(torch.randn(SHAPE[0], SHAPE[0], generator=gen) * 0.5)
        self.text_proj = nn.Parameter(torch.randn(WIDTH, SHAPE[0], generator=gen) * 0.5)
        self.calls: list[int] = []  # batch size of each forward

    def forward(self, x, t, text, text_mask):
        self.calls.append(x.shape[0])
        m = text_mask.to(text.dtype).unsqueeze(-1)  # (B, L, 1)
        pooled = (text * m).sum(1) / m.sum(1).clamp(min=1)  # (B, D)
        bias = (pooled @ self.text_proj)[:, :, None, None, None]  # (B, C, 1, 1, 1)
        h = torch.einsum("bcthw,cd->bdthw", x, self.mix)  # (B, C, T, H, W)
        return torch.tanh(h) * (1 + t.reshape(-1, 1, 1, 1, 1)) + bias - 0.3 * x


def _prompts(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, length, WIDTH, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, length - 1 - torch.arange(batch) % 2] = False  # ragged prompts
    return text, mask


def test_get_noise_depends_only_on_each_seed():
    batch = get_noise(SHAPE, [11, 22, 33])
    assert batch.shape == (3, *SHAPE) and batch.dtype == torch.float32
    for k, seed in enumerate([11, 22, 33]):
        assert torch.equal(batch[k], get_noise(SHAPE, [seed])[0])
    assert not torch.equal(batch[0], batch[1])
    half = get_noise(SHAPE, [22], dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half[0], batch[1].bfloat16())
    with pytest.raises(ValueError, match="seeds"):
        get_noise(SHAPE, [])
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        get_noise((4, 4), [1])  # type: ignore[arg-type]


def test_schedule_endpoints_monotone_and_shift():
    sched = get_schedule(10)
    assert sched.shape == (11,) and sched.dtype == torch.float32
    assert sched[0].item() == 1.0 and sched[-1].item() == 0.0
    assert bool((sched[1:] < sched[:-1]).all())
    torch.testing.assert_close(sched, torch.linspace(1, 0, 11))
    for shift in (1.15, 3.0, 5.0):
        shifted = get_schedule(10, shift=shift)
        assert shifted[0].item() == 1.0 and shifted[-1].item() == 0.0
        assert bool((shifted[1:] < shifted[:-1]).all())
        assert bool((shifted[1:-1] > sched[1:-1]).all())  # more steps spent near noise
        torch.testing.assert_close(shifted, timestep_shift(sched.double(), shift).float())
    with pytest.raises(ValueError, match="0"):
        get_schedule(0)


def test_cfg_one_is_the_cond_only_forward():
    model, x = ToyModel(), get_noise(SHAPE, [1, 2, 3])
    t = torch.full((3,), 0.6)
    text, mask = _prompts(3, 5, seed=0)
    neg, neg_mask = _prompts(3, 3, seed=1)
    v = cfg_velocity(model, x, t, text, mask, neg, neg_mask, cfg=1.0)
    assert model.calls == [3]
    assert torch.equal(v, model(x, t, text, mask))
    cfg_ones = cfg_velocity(model, x, t, text, mask, None, None, cfg=torch.ones(3))
    assert torch.equal(cfg_ones, v)  # no negative prompt needed when cfg is 1


def test_batched_cfg_equals_two_separate_forwards():
    model, x = ToyModel(), get_noise(SHAPE, [1, 2, 3])
    t = torch.tensor([0.9, 0.5, 0.1])
    text, mask = _prompts(3, 5, seed=0)
    neg, neg_mask = _prompts(3, 3, seed=1)  # shorter: padded inside cfg_velocity
    v_c, v_u = model(x, t, text, mask), model(x, t, neg, neg_mask)
    model.calls.clear()
    got = cfg_velocity(model, x, t, text, mask, neg, neg_mask, cfg=4.0)
    assert model.calls == [6]  # one forward for cond and uncond
    torch.testing.assert_close(got, v_u + 4.0 * (v_c - v_u), atol=1e-6, rtol=0)
    # Per-sample guidance scales.
    cfg = torch.tensor([1.0, 3.0, 7.5])
    got = cfg_velocity(model, x, t, text, mask, neg, neg_mask, cfg=cfg)
    want = v_u + cfg.reshape(-1, 1, 1, 1, 1) * (v_c - v_u)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # A batch-1 negative prompt (the encoded empty prompt) serves the whole batch.
    got = cfg_velocity(model, x, t, text, mask, neg[:1], neg_mask[:1], cfg=4.0)
    v_u1 = model(x, t, neg[:1].expand(3, -1, -1), neg_mask[:1].expand(3, -1))
    torch.testing.assert_close(got, v_u1 + 4.0 * (v_c - v_u1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="neg_text"):
        cfg_velocity(model, x, t, text, mask, None, None, cfg=4.0)


@pytest.mark.parametrize(("sampler", "calls"),
                         [("euler", 6), ("heun", 11), ("dpm_solver_2m", 6), ("unipc", 6)])
def test_denoise_makes_one_batched_forward_per_velocity(sampler, calls):
    model = ToyModel()
    text, mask = _prompts(2, 4, seed=0)
    neg, neg_mask = _prompts(1, 2, seed=1)
    done: list[tuple[int, int]] = []
    out = denoise(model, get_noise(SHAPE, [5, 6]), text, mask, neg, neg_mask, steps=6, cfg=5.0,
                  sampler=sampler, progress=lambda i, n: done.append((i, n)))
    assert out.shape == (2, *SHAPE) and bool(out.isfinite().all())
    assert model.calls == [4] * calls  # heun: 2 per step, Euler at the last one
    assert done == [(i, 6) for i in range(1, 7)]
    model.calls.clear()
    denoise(model, get_noise(SHAPE, [5, 6]), text, mask, steps=6, cfg=1.0, sampler=sampler)
    assert model.calls == [2] * calls


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_denoise_is_deterministic_and_independent_of_batch_mates(sampler):
    model, seeds = ToyModel(), [3, 1, 4, 1]
    text, mask = _prompts(4, 5, seed=0)
    neg, neg_mask = _prompts(1, 3, seed=1)
    kwargs = dict(steps=8, cfg=4.0, shift=2.0, sampler=sampler)
    batch = denoise(model, get_noise(SHAPE, seeds), text, mask, neg, neg_mask, **kwargs)
    again = denoise(model, get_noise(SHAPE, seeds), text, mask, neg, neg_mask, **kwargs)
    assert torch.equal(batch, again)
    for k, seed in enumerate(seeds):
        alone = denoise(model, get_noise(SHAPE, [seed]), text[k : k + 1], mask[k : k + 1], neg,
                        neg_mask, **kwargs)
        # Equal up to fp32 rounding: the matmuls of another batch size sum in another order
        # (on an AVX2-only CPU, ATEN_CPU_CAPABILITY=avx2, 2 ulps of values ~9 after 8 steps);
        # a batch mate leaking in would differ by orders of magnitude more.
        torch.testing.assert_close(alone[0], batch[k], atol=1e-6, rtol=1e-6)


def test_denoise_with_the_oracle_is_the_plain_sampler():
    eps = _eps(100)
    text, mask = torch.zeros(100, 1, WIDTH), torch.ones(100, 1, dtype=torch.bool)
    out = denoise(lambda x, t, *_: _oracle(x, t), eps, text, mask, steps=20, cfg=1.0,
                  sampler="heun")
    assert torch.equal(out, heun(_oracle, eps, get_schedule(20)))


def test_unknown_sampler_is_named():
    text, mask = _prompts(1, 2, seed=0)
    with pytest.raises(ValueError, match=r"'rk45'.*euler.*heun.*unipc"):
        denoise(ToyModel(), get_noise(SHAPE, [0]), text, mask, cfg=1.0, sampler="rk45")
