"""Causal 3D-conv video VAE: 1 + 4k frames in, 1 + k latent frames out, KL-regularised.

Causality is what lets one model serve images and videos and encode long clips in chunks:
- every temporal convolution is padded on the PAST side only, by REPLICATING the first frame (a
  still image then looks like a static clip to every temporal kernel, instead of a fade from black);
- norms never mix time steps (GroupNorm per frame: statistics over channels-in-group x H x W);
- temporal downsampling is a causal stride-2 conv, so latent frame j sees input frames <= 4j:
  frame 0 is encoded alone (as an image), frames 4j-3..4j make latent frame j;
- the decoder mirrors it: latent frame 0 decodes to one frame, each later one to 4.

Chunked encode/decode streams the clip through the same layers: each causal conv keeps the input
frames its next window still needs (kernel_t - stride_t of them) in a cache between chunks, the idea
of Wan's `feat_cache`. Chunked output equals the unchunked one up to float rounding (~1e-6 in fp32).

Temporal kernels start as 2D ones (weight on the current frame only, "inflated" init): with random
temporal mixing at init a small VAE sat for hundreds of steps at a background-only output.

Latent normalisation (the latent-shard contract): `encode_latents` returns (mean - shift) * scale,
`decode` inverts it first. `scale`/`shift` live in `VAEConfig`, so they travel in every config.json.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from t2v.models.latent import DiagonalGaussian, LatentVAE, fit_latent_stats
from t2v.models.tiling import Tiling, tiled_decode

Cache = dict[nn.Module, Tensor]  # per-layer carry between time chunks; None = one whole clip


@dataclass
class VAEConfig:
    """Shape of a `CausalVideoVAE` plus the latent normalisation fitted after training.

    The defaults are the `base` preset.
    """

    in_channels: int = 3
    """Pixel channels (RGB)."""
    latent_channels: int = 16
    """Latent channels C (4 to 16 in the presets)."""
    base_channels: int = 96
    """Channels of the first (full-resolution) level."""
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Per-level multipliers of base_channels; one level more than there are 2x spatial stages."""
    num_res_blocks: int = 2
    """ResNet blocks per encoder level (the decoder uses one more, as in SD and Wan)."""
    spatial_down: int = 8
    """Spatial downsampling factor, a power of 2 equal to 2 ** (len(channel_mult) - 1)."""
    temporal_down: int = 4
    """Temporal factor, a power of 2 (1 = image-only); done at the deepest stages, as in Wan."""
    norm_groups: int = 32
    """GroupNorm groups; must divide every level's channels."""
    shortcut: bool = False
    """Residual autoencoding (the idea of DC-AE, Chen et al. 2024): the first in_channels latent
    channels get the clip average-pooled over each latent cell (space and causal time groups)
    added, and the decoder adds them back upsampled. The networks learn residuals around a
    blocky but correctly coloured reconstruction; without it a small VAE spends its first
    hundreds of steps drawing every object in the mean colour. Needs latent_channels >= 3."""
    scale: list[float] | float = 1.0
    """Latent normalisation: normalised = (mean - shift) * scale (per channel or global)."""
    shift: list[float] | float = 0.0
    """See scale."""

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        for name in ("in_channels", "latent_channels", "base_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("spatial_down", "temporal_down"):
            if getattr(self, name) < 1 or getattr(self, name) & (getattr(self, name) - 1):
                raise ValueError(f"VAEConfig.{name} must be a power of 2, got {getattr(self, name)}")
        if 2 ** (len(self.channel_mult) - 1) != self.spatial_down:
            raise ValueError(f"channel_mult={self.channel_mult} needs "
                             f"log2(spatial_down={self.spatial_down}) + 1 levels")
        if self.temporal_down > self.spatial_down:  # each 2x time stage rides on a spatial one
            raise ValueError(f"temporal_down={self.temporal_down} > spatial_down={self.spatial_down}")
        if self.shortcut and self.latent_channels < self.in_channels:
            raise ValueError(f"shortcut needs latent_channels >= in_channels={self.in_channels}, "
                             f"got {self.latent_channels}")
        if any(m < 1 or self.base_channels * m % self.norm_groups for m in self.channel_mult):
            raise ValueError(f"norm_groups={self.norm_groups} must divide every level's channels "
                             f"{[self.base_channels * m for m in self.channel_mult]}")
        for name in ("scale", "shift"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)) and len(v) != self.latent_channels:
                raise ValueError(f"VAEConfig.{name} has {len(v)} values for "
                                 f"latent_channels={self.latent_channels}")
            setattr(self, name, [float(a) for a in v] if isinstance(v, (list, tuple)) else float(v))
        scales = self.scale if isinstance(self.scale, list) else [self.scale]
        if any(s == 0 or not math.isfinite(s) for s in scales):
            raise ValueError(f"VAEConfig.scale must be finite and non-zero, got {self.scale}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)  # JSON/YAML friendly
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAEConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown VAEConfig keys: {', '.join(unknown)}")
        return cls(**d)


VAE_PRESETS: dict[str, dict[str, Any]] = {
    # tests: 0.56M params, encode + decode of 9x32x32 in well under a second on 2 CPU cores
    "debug": dict(latent_channels=4, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                  spatial_down=4, temporal_down=4, norm_groups=8),
    # the 2-core laptop demo: 9x32x32 clips -> 4x3x8x8 latents (36x fewer values)
    "demo": dict(latent_channels=4, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                 spatial_down=4, temporal_down=4, norm_groups=8),
    # GPU-sized, Wan-2.1-like layout: 8x spatial, 4x temporal, 16 latent channels
    "base": dict(latent_channels=16, base_channels=96, channel_mult=(1, 2, 4, 4),
                 num_res_blocks=2, spatial_down=8, temporal_down=4, norm_groups=32),
}


def vae_config(name: str, **overrides: Any) -> VAEConfig:
    """A preset from `VAE_PRESETS` with field overrides (unknown fields are a ValueError)."""
    if name not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {name!r}; known: {', '.join(VAE_PRESETS)}")
    return VAEConfig.from_dict({**VAE_PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- layers


class CausalConv3d(nn.Module):
    """Conv3d padded in time on the past side only (first frame replicated), streamable."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int] = (3, 3, 3),
                 stride: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        self.kt, self.st = kernel[0], stride[0]
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride,
                              padding=(0, kernel[1] // 2, kernel[2] // 2))
        if self.kt > 1:  # start as a per-frame 2D conv: random temporal mixing slows training a lot
            with torch.no_grad():
                w = self.conv.weight  # (Cout, Cin, kt, kh, kw)
                w2d = w[:, :, -1] * self.kt**0.5  # a 2D init at the 2D fan-in
                w.zero_()
                taps = self.st  # a strided conv averages the frames it folds together
                w[:, :, -taps:] = (w2d / taps).unsqueeze(2)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        if self.kt == 1 and self.st == 1:
            return self.conv(x)  # no temporal context: nothing to pad or carry
        past = None if cache is None else cache.get(self)
        if past is None:  # start of the clip: the first frame stands in for the past
            past = x[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1)  # (B, C, kt-1, H, W)
        buf = torch.cat([past, x], dim=2)  # (B, C, kt-1+T, H, W) on the first chunk
        n = (buf.shape[2] - self.kt) // self.st + 1  # complete windows = output frames
        if cache is not None:  # the frames the next chunk's first window still needs
            cache[self] = buf[:, :, n * self.st:].clone()
        return self.conv(buf[:, :, : (n - 1) * self.st + self.kt])  # (B, Cout, n, H', W')


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame, never across time (causality, chunk equivalence)."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W): time folded into batch
        y = F.group_norm(y, self.num_groups, self.weight, self.bias, self.eps)
        return y.view(b, t, c, h, w).transpose(1, 2)  # (B, C, T, H, W)


class ResBlock(nn.Module):
    """Pre-norm ResNet block of two causal 3x3x3 convs."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = FrameGroupNorm(groups, cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = CausalConv3d(cin, cout, (1, 1, 1)) if cin != cout else None

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)  # (B, Cout, T, H, W)
        h = self.conv2(F.silu(self.norm2(h)), cache)  # (B, Cout, T, H, W)
        return (x if self.skip is None else self.skip(x)) + h


class Upsample(nn.Module):
    """Mirror of the encoder's stride-2 conv: 1 + m frames -> 1 + 2m, then 2x space."""

    def __init__(self, ch: int, temporal: bool) -> None:
        super().__init__()
        self.time_conv = CausalConv3d(ch, 2 * ch, (3, 1, 1)) if temporal else None
        self.conv = CausalConv3d(ch, ch, (1, 3, 3))
        if self.time_conv is not None:  # start as "repeat each frame twice", like the 2D init
            with torch.no_grad():
                w = self.time_conv.conv.weight  # (2C, C, 3, 1, 1)
                w.zero_()
                w[:, :, -1, 0, 0] = torch.eye(ch, device=w.device, dtype=w.dtype).repeat(2, 1)
                self.time_conv.conv.bias.zero_()

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        if self.time_conv is not None:
            b, c, t, h, w = x.shape
            y = self.time_conv(x, cache)  # (B, 2C, T, H, W): two sub-frames per frame
            x = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            if cache is None or self not in cache:  # latent frame 0 is an image: 1 sub-frame
                x = x[:, :, 1:]  # (B, C, 2T-1, H, W)
                if cache is not None:
                    cache[self] = x.new_empty(0)  # marks "first chunk done"
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")  # (B, C, T, 2H, 2W)
        return self.conv(x, cache)


class OutHead(nn.Module):
    """Norm, SiLU and a causal conv to the output channels."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm = FrameGroupNorm(groups, cin)
        self.conv = CausalConv3d(cin, cout)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        return self.conv(F.silu(self.norm(x)), cache)


def _temporal_stages(cfg: VAEConfig) -> list[bool]:
    """Which 2x spatial stages also halve time: the deepest log2(temporal_down) ones (as Wan)."""
    stages = len(cfg.channel_mult) - 1
    return [s >= stages - int(math.log2(cfg.temporal_down)) for s in range(stages)]


def _encoder_layers(cfg: VAEConfig) -> list[nn.Module]:
    chans = [cfg.base_channels * m for m in cfg.channel_mult]
    temporal, g = _temporal_stages(cfg), cfg.norm_groups
    layers: list[nn.Module] = [CausalConv3d(cfg.in_channels, chans[0])]
    ch = chans[0]
    for level, out in enumerate(chans):
        for _ in range(cfg.num_res_blocks):
            layers.append(ResBlock(ch, out, g))
            ch = out
        if level < len(chans) - 1:
            # time kernel 3 / stride 2 over 2 past frames: output j sees frames 2j-2..2j, so frame
            # 0 alone makes output 0 and each later pair (2j-1, 2j) one more: 1 + 2m -> 1 + m
            kt, st = (3, 2) if temporal[level] else (1, 1)
            layers.append(CausalConv3d(ch, ch, (kt, 3, 3), (st, 2, 2)))
    layers += [ResBlock(ch, ch, g), OutHead(ch, 2 * cfg.latent_channels, g)]  # mean, logvar
    return layers


def _decoder_layers(cfg: VAEConfig) -> list[nn.Module]:
    chans = [cfg.base_channels * m for m in cfg.channel_mult]
    temporal, g = _temporal_stages(cfg), cfg.norm_groups
    ch = chans[-1]
    layers: list[nn.Module] = [CausalConv3d(cfg.latent_channels, ch), ResBlock(ch, ch, g)]
    for level in reversed(range(len(chans))):
        for _ in range(cfg.num_res_blocks + 1):
            layers.append(ResBlock(ch, chans[level], g))
            ch = chans[level]
        if level > 0:
            layers.append(Upsample(ch, temporal[level - 1]))
    layers.append(OutHead(ch, cfg.in_channels, g))
    return layers


class CausalStack(nn.Module):
    """A chain of causal layers sharing one cache."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, cache: Cache | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, cache)
        return x

    def stream(self, x: Tensor, chunk: int) -> Tensor:
        """Same result as forward(x): frame 0 alone, then `chunk` frames at a time."""
        cache: Cache = {}
        pieces = [x[:, :, :1]] + [x[:, :, s:s + chunk] for s in range(1, x.shape[2], chunk)]
        return torch.cat([self(p, cache) for p in pieces], dim=2)  # (B, C', T', H', W')


# ----------------------------------------------------------------------------- model


class CausalVideoVAE(LatentVAE):
    """Video (B, 3, T, H, W) in [-1, 1] <-> latents (B, C, 1 + (T-1)/4, H/s, W/s).

    The decoder output is unclamped (clamp to [-1, 1] when writing pixels).
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = CausalStack(_encoder_layers(config))
        self.decoder = CausalStack(_decoder_layers(config))
        if config.shortcut:  # start near-deterministic: unit posterior noise on the shortcut
            head = self.encoder.layers[-1].conv.conv  # channels would swamp the pooled colours
            with torch.no_grad():
                head.bias[config.latent_channels:] = -8.0  # logvar: std e^-4 ~ 0.02

    # ---- encode

    def encode(self, x: Tensor, chunk_frames: int | None = None) -> DiagonalGaussian:
        """Posterior over raw latents; chunk_frames (a multiple of temporal_down) bounds memory."""
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (B, {self.config.in_channels}, T, H, W), "
                             f"got {tuple(x.shape)}")
        self.latent_shape(*x.shape[2:])
        if chunk_frames is None:
            h = self.encoder(x)  # (B, 2C, T', H', W')
        elif chunk_frames < 1 or chunk_frames % self.config.temporal_down:
            raise ValueError(f"chunk_frames={chunk_frames} must be a positive multiple of "
                             f"temporal_down={self.config.temporal_down}")
        else:  # whole groups of temporal_down frames per chunk keep every chunk aligned
            h = self.encoder.stream(x, chunk_frames)  # (B, 2C, T', H', W')
        mean, logvar = h.chunk(2, dim=1)  # (B, C, T', H', W') each
        if self.config.shortcut:
            c = self.config.in_channels
            mean = torch.cat([mean[:, :c] + self.pool(x), mean[:, c:]], dim=1)
        return DiagonalGaussian(mean, logvar)

    def pool(self, x: Tensor) -> Tensor:
        """(B, 3, T, H, W) -> its mean over each latent cell: frame 0 alone, then groups of
        temporal_down frames, spatial_down x spatial_down pixels (the shortcut's encoder half)."""
        b, c, t, h, w = x.shape
        td, sd = self.config.temporal_down, self.config.spatial_down
        rest = x[:, :, 1:].reshape(b, c, (t - 1) // td, td, h, w).mean(3)  # (B, 3, k, H, W)
        return F.avg_pool3d(torch.cat([x[:, :, :1], rest], dim=2), (1, sd, sd))  # (B,3,1+k,..)

    def unpool(self, z: Tensor) -> Tensor:
        """Latent cells -> pixels by repetition (the shortcut's decoder half)."""
        td, sd = self.config.temporal_down, self.config.spatial_down
        y = torch.cat([z[:, :, :1], z[:, :, 1:].repeat_interleave(td, dim=2)], dim=2)
        return F.interpolate(y, scale_factor=(1.0, float(sd), float(sd)), mode="nearest")

    # ---- decode

    def decode_raw(self, z: Tensor, chunk_latent_frames: int | None = None,
                   tiling: Tiling | None = None) -> Tensor:
        """Pixels from raw latents. Memory bounds: chunks of `chunk_latent_frames` latent frames
        (exact, causal cache); spatial tiles (t2v/models/tiling.py: close, not exact)."""
        if z.dim() != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"z must be (B, {self.config.latent_channels}, T', H', W'), "
                             f"got {tuple(z.shape)}")
        if chunk_latent_frames is not None and chunk_latent_frames < 1:
            raise ValueError(f"chunk_latent_frames={chunk_latent_frames} must be >= 1")

        def run(part: Tensor) -> Tensor:  # (B, C, T', h, w) -> (B, 3, T, h * s, w * s)
            if chunk_latent_frames is None:
                return self.decoder(part)
            return self.decoder.stream(part, chunk_latent_frames)

        out = run(z) if tiling is None else tiled_decode(run, z, tiling, self.config.spatial_down)
        if self.config.shortcut:
            out = out + self.unpool(z[:, : self.config.in_channels])
        return out  # (B, 3, T, H, W)

    def set_latent_stats(self, shift: list[float] | float, scale: list[float] | float) -> None:
        """Store fitted stats in the config (validated), e.g. from `fit_latent_stats`."""
        self.config = VAEConfig.from_dict({**self.config.to_dict(), "shift": shift,
                                           "scale": scale})

    fit_latent_stats = staticmethod(fit_latent_stats)

    # ---- training

    def forward(self, x: Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mean
        return self.decode_raw(z), posterior  # (B, 3, T, H, W), q(z | x)

    def loss(self, x: Tensor, recon: Tensor, posterior: DiagonalGaussian,
             kl_weight: float = 1e-6, l1_weight: float = 1.0,
             mse_weight: float = 1.0, edge_weight: float = 0.0,
             scale_weight: float = 0.0) -> dict[str, Tensor]:
        """total = l1_weight*L1 + mse_weight*MSE (pixel means) + edge_weight*edge
        + scale_weight*scale + kl_weight*KL (per-sample sum).

        MSE on by default: with L1 alone a tiny VAE sits far longer at "background only".
        `edge` is the L1 distance between the spatial finite differences of recon and x (a
        gradient-difference loss): pixel losses spread an object's outline into a blob of the
        right colour, which costs them little on a small object and is exactly what tells a
        square from a circle.

        `scale` (scale equivariance; Skorokhodov et al. 2025, "Improving the Diffusability of
        Autoencoders"): the posterior means average-pooled 2x in space must decode to the clip
        pooled the same way (L1 + MSE). It keeps fine detail out of the latents' coarse
        structure: without it, the better a VAE reconstructs, the worse a DiT learns on its
        latents (BENCHMARKS.md round 14: 32.9 dB, motion 38.5 %; with it 31.5 dB, 95.8 %).
        Costs one decode at a quarter of the pixels; needs even latent height and width.
        """
        diff = recon.float() - x.float()  # fp32 losses even under bf16 autocast
        l1, mse = diff.abs().mean(), diff.pow(2).mean()
        edge = (diff.diff(dim=-1).abs().mean() + diff.diff(dim=-2).abs().mean()) / 2
        recon_loss = l1_weight * l1 + mse_weight * mse + edge_weight * edge
        scale = diff.new_zeros(())
        if scale_weight:
            z = posterior.mean  # (B, C, T', H', W')
            if z.shape[-1] % 2 or z.shape[-2] % 2:
                raise ValueError(f"scale_weight needs latents of even height and width, got "
                                 f"{tuple(z.shape[-2:])} (clips of {tuple(x.shape[-2:])})")
            small = self.decode_raw(F.avg_pool3d(z, (1, 2, 2))).float()  # (B, 3, T, H/2, W/2)
            sdiff = small - F.avg_pool3d(x.float(), (1, 2, 2))
            scale = sdiff.abs().mean() + sdiff.pow(2).mean()
            recon_loss = recon_loss + scale_weight * scale
        kl = posterior.kl().float().mean()
        return {"total": recon_loss + kl_weight * kl, "recon": recon_loss, "l1": l1,
                "mse": mse, "edge": edge, "scale": scale, "kl": kl}
