"""The rectified-flow objective (t2v/diffusion/flow.py): formulas, timestep laws, the loss.

The loss is checked against an exact oracle: for Gaussian data x0 ~ N(mu, s^2) (per dimension)
the optimal velocity E[eps - x0 | x_t] has a closed form, its loss is the irreducible one, and
any perturbation of it does worse.
"""

from __future__ import annotations

import math

import pytest
import torch

from t2v.diffusion.flow import (
    flow_loss,
    heldout_flow_loss,
    noisy,
    resolution_shift,
    sample_t,
    timestep_shift,
    velocity_target,
)

SHAPE = (2, 1, 2, 2)  # (C, T, H, W) of the toy latents
MU, S = 2.0, 0.5  # the Gaussian data distribution of the oracle tests


def _text(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(batch, 3, 4), torch.ones(batch, 3, dtype=torch.bool)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor, mu: float = MU, s: float = S):
    """Exact E[eps - x0 | x_t = x] for x0 ~ N(mu, s^2), eps ~ N(0, 1), per dimension.

    x_t is Gaussian with mean (1-t) mu and variance var = (1-t)^2 s^2 + t^2;
    Cov(x0, x_t) = (1-t) s^2 and Cov(eps, x_t) = t, so Gaussian conditioning gives
    E[x0|x] = mu + (1-t) s^2 / var * (x - (1-t) mu) and E[eps|x] = t / var * (x - (1-t) mu).
    Their difference is affine in x: v = k * (x - (1-t) mu) - mu with
    k = (t - (1-t) s^2) / var = Cov(v, x_t) / Var(x_t). The coefficients are computed per
    sample so that only two operations touch the full tensor.
    """
    t = t.to(x.dtype)  # (B,)
    var = (1 - t) ** 2 * s**2 + t**2
    k = (t - (1 - t) * s**2) / var  # (B,)
    offset = -k * (1 - t) * mu - mu  # (B,)
    view = (-1, *([1] * (x.dim() - 1)))
    return torch.addcmul(offset.reshape(view), k.reshape(view), x)  # (B, C, T, H, W)


def test_noisy_and_target_formulas():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, *SHAPE, generator=g), torch.randn(3, *SHAPE, generator=g)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = noisy(x0, eps, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(velocity_target(x0, eps), eps - x0)
    # The target is the time derivative of the path: d x_t / dt = eps - x0 (a () t broadcasts).
    x0, eps, h = x0.double(), eps.double(), 1e-4
    t_mid = torch.tensor(0.4, dtype=torch.float64)
    deriv = (noisy(x0, eps, t_mid + h) - noisy(x0, eps, t_mid - h)) / (2 * h)
    torch.testing.assert_close(deriv, velocity_target(x0, eps))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        noisy(x0, eps, torch.rand(2))


def test_timestep_shift_fixed_points_monotone_identity():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(timestep_shift(t, 1.0), t)
    for shift in (0.5, 1.15, 3.0, 7.0):
        s = timestep_shift(t, shift)
        assert s[0] == 0.0 and s[-1].item() == pytest.approx(1.0, abs=1e-15)
        assert bool((s[1:] > s[:-1]).all()), shift
        # shift > 1 moves mass towards noise (t' > t), shift < 1 towards data.
        inner = slice(1, -1)
        assert bool((s[inner] > t[inner]).all()) == (shift > 1), shift
    with pytest.raises(ValueError, match="-1"):
        timestep_shift(t, -1.0)


def test_resolution_shift_grows_with_tokens():
    assert resolution_shift(256) == pytest.approx(math.exp(0.5))
    assert resolution_shift(4096) == pytest.approx(math.exp(1.15))
    counts = [64, 256, 1024, 4096, 16384]
    shifts = [resolution_shift(n) for n in counts]
    assert shifts == sorted(shifts) and len(set(shifts)) == len(shifts)
    with pytest.raises(ValueError, match="0"):
        resolution_shift(0)


def test_sample_t_range_determinism_and_logit_normal_moments():
    t = sample_t(20000, torch.Generator().manual_seed(0), mean=0.3, std=0.8)
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert bool(((t > 0) & (t < 1)).all())
    again = sample_t(20000, torch.Generator().manual_seed(0), mean=0.3, std=0.8)
    assert torch.equal(t, again)
    logit = torch.log(t.double() / (1 - t.double()))
    # Standard errors are 0.8 / sqrt(20000) ~ 0.006 (mean) and ~0.004 (std).
    assert logit.mean().item() == pytest.approx(0.3, abs=0.025)
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)
    shifted = sample_t(20000, torch.Generator().manual_seed(0), mean=0.3, std=0.8, shift=3.0)
    torch.testing.assert_close(shifted, timestep_shift(t, 3.0))
    assert shifted.mean() > t.mean()


def test_flow_loss_matches_hand_computed_mse_for_a_linear_model():
    weight, bias = 0.7, -0.3

    def linear(x, t, text, mask):
        return weight * x + bias * t.reshape(-1, 1, 1, 1, 1)

    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, *SHAPE, generator=g), torch.randn(4, *SHAPE, generator=g)
    t = torch.tensor([0.1, 0.4, 0.6, 0.95])
    text, mask = _text(4)
    tb = t.reshape(-1, 1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    per_sample = ((weight * x_t + bias * tb - (eps - x0)) ** 2).mean(dim=(1, 2, 3, 4))
    got = flow_loss(linear, x0, text, mask, t=t, eps=eps, reduce=False)
    assert got.shape == (4,)
    torch.testing.assert_close(got, per_sample)
    torch.testing.assert_close(flow_loss(linear, x0, text, mask, t=t, eps=eps), per_sample.mean())
    # Drawn t and eps: deterministic under a generator, different across seeds.
    a = flow_loss(linear, x0, text, mask, generator=torch.Generator().manual_seed(5))
    b = flow_loss(linear, x0, text, mask, generator=torch.Generator().manual_seed(5))
    c = flow_loss(linear, x0, text, mask, generator=torch.Generator().manual_seed(6))
    assert a.item() == b.item() and a.item() != c.item()


def _gaussian_batch(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + S * torch.randn(n, *SHAPE, generator=g, dtype=torch.float64)


def test_exact_velocity_oracle_beats_perturbed_oracles():
    n = 8192
    x0 = _gaussian_batch(n, seed=2)
    g = torch.Generator().manual_seed(3)
    t = sample_t(n, g).double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    text, mask = _text(n)

    def oracle(x, t, text, mask):
        return gaussian_velocity(x, t)

    best = flow_loss(oracle, x0, text, mask, t=t, eps=eps).item()
    perturbed = {
        "scaled": lambda x, t, *_: 1.05 * gaussian_velocity(x, t),
        "offset": lambda x, t, *_: gaussian_velocity(x, t) + 0.05,
        "wrong mean": lambda x, t, *_: gaussian_velocity(x, t, mu=MU + 0.1),
        "wrong std": lambda x, t, *_: gaussian_velocity(x, t, s=S * 1.1),
        "target at t=0.5": lambda x, t, *_: gaussian_velocity(x, torch.full_like(t, 0.5)),
    }
    for name, model in perturbed.items():
        assert flow_loss(model, x0, text, mask, t=t, eps=eps).item() > best, name


def test_heldout_loss_of_the_oracle_is_the_irreducible_loss():
    # Var(v | x_t) for v = eps - x0: Var(v) - Cov(v, x_t)^2 / Var(x_t), with Var(v) = 1 + s^2 and
    # Cov(v, x_t) = t - (1 - t) s^2. The oracle reaches it; nothing can go below it.
    x0 = _gaussian_batch(4096, seed=4)
    text, mask = _text(4096)
    losses = heldout_flow_loss(lambda x, t, *_: gaussian_velocity(x, t), x0, text, mask, seed=7)
    assert list(losses) == [0.1, 0.3, 0.5, 0.7, 0.9]
    for t, loss in losses.items():
        var = (1 - t) ** 2 * S**2 + t**2
        floor = 1 + S**2 - (t - (1 - t) * S**2) ** 2 / var
        assert loss == pytest.approx(floor, rel=0.04), t
    # Fixed noise: the same numbers on every call, different with another seed.
    again = heldout_flow_loss(lambda x, t, *_: gaussian_velocity(x, t), x0, text, mask, seed=7)
    other = heldout_flow_loss(lambda x, t, *_: gaussian_velocity(x, t), x0, text, mask, seed=8)
    assert again == losses and other != losses


def test_heldout_flow_loss_runs_without_grad():
    layer = torch.nn.Linear(2, 2)
    grad_enabled: list[bool] = []

    def model(x, t, text, mask):
        grad_enabled.append(torch.is_grad_enabled())
        return layer(x.movedim(1, -1)).movedim(-1, 1)

    x0 = torch.randn(2, *SHAPE)
    losses = heldout_flow_loss(model, x0, *_text(2), t_values=(0.5,))
    assert set(losses) == {0.5} and isinstance(losses[0.5], float)
    assert grad_enabled == [False]
    with pytest.raises(ValueError, match="1.5"):
        heldout_flow_loss(model, x0, *_text(2), t_values=(1.5,))
