"""The latent contract every VAE backend shares (our CausalVideoVAE, the imported WanVAE).

A backend maps clips (B, 3, T, H, W) in [-1, 1] to a posterior over raw latents
(B, C, 1 + (T-1)/temporal_down, H/spatial_down, W/spatial_down) and back. What passes between
the pieces (latent shards, the DiT, render) is the NORMALISED latent `(z - shift) * scale`, with
`shift`/`scale` fitted after training (`fit_latent_stats`) and kept in the backend's config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from t2v.models.tiling import Tiling


class DiagonalGaussian:
    """The posterior q(z | x): a diagonal Gaussian over raw (unnormalised) latents."""

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean  # (B, C, T', H', W')
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite early in training

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * eps  # (B, C, T', H', W')

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over each sample's latent values: shape (B,)."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(1)


def fit_latent_stats(latents: Tensor, per_channel: bool = True) -> tuple[list[float], list[float]]:
    """(shift, scale) that give `(latents - shift) * scale` mean 0 and std 1.

    latents: raw posterior means shaped (N, C, ...), channels at dim 1. Per channel by default
    (as Wan stores them); `per_channel=False` fits one global pair, repeated for every channel.
    """
    if latents.dim() < 2:
        raise ValueError(f"latents must be (N, C, ...), got shape {tuple(latents.shape)}")
    c = latents.shape[1]
    x = latents.detach().double().transpose(0, 1).reshape(c, -1)  # (C, N*...)
    if not per_channel:
        x = x.reshape(1, -1).expand(c, -1)
    std, mean = torch.std_mean(x, dim=1, correction=0)  # (C,), (C,)
    if bool((std <= 0).any()):
        raise ValueError(f"latent channel(s) {torch.nonzero(std <= 0).flatten().tolist()} are "
                         "constant; cannot fit a scale")
    return mean.tolist(), (1.0 / std).tolist()


class LatentVAE(nn.Module):
    """The latent contract every VAE backend shares (CausalVideoVAE, the imported WanVAE): clip
    and latent shapes, and the normalisation `(z - shift) * scale` from `config.shift/scale`.

    Subclasses provide `config` (latent_channels, temporal_down, spatial_down, in_channels,
    shift, scale), `encode(x, chunk_frames) -> DiagonalGaussian` and `decode_raw(z, chunk, tiling)`.
    """

    config: Any

    # ---- shapes

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        cfg = self.config
        if frames < 1 or (frames - 1) % cfg.temporal_down:
            raise ValueError(f"frames={frames} must be 1 + {cfg.temporal_down}k")
        for name, v in (("height", height), ("width", width)):
            if v < 1 or v % cfg.spatial_down:
                raise ValueError(f"{name}={v} must be a positive multiple of spatial_down="
                                 f"{cfg.spatial_down}")
        t = 1 + (frames - 1) // cfg.temporal_down
        return cfg.latent_channels, t, height // cfg.spatial_down, width // cfg.spatial_down

    def compression_ratio(self, frames: int, height: int, width: int) -> float:
        """Input values per latent value at this clip size."""
        c, t, h, w = self.latent_shape(frames, height, width)
        return (self.config.in_channels * frames * height * width) / (c * t * h * w)

    def encode_latents(self, x: Tensor, sample: bool = False, chunk_frames: int | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
        """Normalised latents (z - shift) * scale: what latent shards store and the DiT sees."""
        posterior = self.encode(x, chunk_frames)
        z = posterior.sample(generator) if sample else posterior.mean  # (B, C, T', H', W')
        return self.normalize(z)

    def decode(self, z: Tensor, chunk_latent_frames: int | None = None,
               tiling: Tiling | None = None) -> Tensor:
        """Pixels (B, 3, T, H, W) from NORMALISED latents (inverts scale/shift first); see
        `decode_raw` for the memory bounds."""
        return self.decode_raw(self.denormalize(z), chunk_latent_frames, tiling)

    # ---- latent normalisation

    def _stats(self, z: Tensor) -> tuple[Tensor, ...]:
        c = self.config.latent_channels  # plain floats in the config: nothing to load or move
        return tuple(torch.as_tensor(v, dtype=z.dtype, device=z.device).expand(c).view(1, c, 1, 1, 1)
                     for v in (self.config.shift, self.config.scale))

    def normalize(self, z: Tensor) -> Tensor:
        shift, scale = self._stats(z)
        return (z - shift) * scale

    def denormalize(self, z: Tensor) -> Tensor:
        shift, scale = self._stats(z)
        return z / scale + shift
