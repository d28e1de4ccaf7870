"""The `diffusers:` VAE backend: Wan 2.1's `AutoencoderKLWan` behind CausalVideoVAE's interface.

An imported Wan package keeps its VAE where the user holds it (`vae_ref = "diffusers:URI"` in
model.json) and records here only what the rest of t2v reads without loading weights: latent
channels, the temporal/spatial factors and the latent normalisation. Everything else that uses a
VAE (render, encode, validation samples) calls the same methods on a `WanVAE` as on a
`CausalVideoVAE`: `latent_shape`, `encode`, `encode_latents`, `decode`, `decode_raw`.

Latent normalisation follows the latent-shard contract, normalised = (z - shift) * scale, with
shift = `latents_mean` and scale = 1 / `latents_std` of the diffusers config: exactly what
WanPipeline undoes before decoding (`z / (1 / std) + mean`).

diffusers is an optional extra (`pip install 't2v[diffusers]'`): it is imported inside
`WanVAE.load` only, so t2v/models imports without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from t2v.models.latent import DiagonalGaussian, LatentVAE
from t2v.models.text import resolve_model_dir
from t2v.models.tiling import Tiling

DIFFUSERS_PREFIX = "diffusers:"
VAE_CLASS = "AutoencoderKLWan"


@dataclass
class WanVAEConfig:
    """What t2v needs to know of a diffusers `AutoencoderKLWan` without loading it."""

    latent_channels: int = 16
    """Latent channels C (`z_dim`)."""
    temporal_down: int = 4
    """Temporal factor: 1 + 4k frames -> 1 + k latent frames."""
    spatial_down: int = 8
    """Spatial factor."""
    in_channels: int = 3
    """Pixel channels."""
    shift: list[float] | float = 0.0
    """Latent normalisation, normalised = (z - shift) * scale; Wan's `latents_mean`."""
    scale: list[float] | float = 1.0
    """1 / Wan's `latents_std`."""
    backend: str = VAE_CLASS
    """The diffusers class that holds the weights (what `vae_ref` points at)."""

    def __post_init__(self) -> None:
        for name in ("latent_channels", "temporal_down", "spatial_down", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"WanVAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.backend != VAE_CLASS:
            raise ValueError(f"WanVAEConfig.backend={self.backend!r}: only {VAE_CLASS} is known")
        for name in ("shift", "scale"):
            v = getattr(self, name)
            if isinstance(v, list) and len(v) != self.latent_channels:
                raise ValueError(f"WanVAEConfig.{name} has {len(v)} values for "
                                 f"{self.latent_channels} latent channels")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WanVAEConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown WanVAEConfig keys: {unknown}")
        return cls(**d)


def wan_vae_config(config: dict) -> WanVAEConfig:
    """WanVAEConfig from the config.json dict of a diffusers `AutoencoderKLWan` folder."""
    name = config.get("_class_name")
    if name != VAE_CLASS:
        raise ValueError(f"vae/config.json: _class_name={name!r}, expected {VAE_CLASS}")
    z_dim = int(config.get("z_dim", 16))
    # Wan 2.1 leaves the factors out of older configs; they follow from the stage layout.
    temporal = config.get("scale_factor_temporal") or 2 ** sum(
        config.get("temperal_downsample", [False, True, True]))
    spatial = config.get("scale_factor_spatial") or 2 ** (len(config.get("dim_mult", [1] * 4)) - 1)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is None or std is None or len(mean) != z_dim or len(std) != z_dim:
        raise ValueError(f"vae/config.json: latents_mean/latents_std must hold z_dim={z_dim} "
                         "values each")
    if any(s <= 0 for s in std):
        raise ValueError(f"vae/config.json: latents_std must be positive, got {std}")
    return WanVAEConfig(latent_channels=z_dim, temporal_down=int(temporal),
                        spatial_down=int(spatial), in_channels=int(config.get("in_channels", 3)),
                        shift=[float(m) for m in mean], scale=[1.0 / float(s) for s in std])


def parse_ref(ref: str) -> str:
    """The URI of a `diffusers:URI` reference; ValueError for any other form."""
    if not ref.startswith(DIFFUSERS_PREFIX) or not ref[len(DIFFUSERS_PREFIX):]:
        raise ValueError(f"vae_ref={ref!r}: expected '{DIFFUSERS_PREFIX}URI'")
    return ref[len(DIFFUSERS_PREFIX):]


class WanVAE(LatentVAE):
    """A diffusers `AutoencoderKLWan` with CausalVideoVAE's methods and latent contract."""

    def __init__(self, model: nn.Module, config: WanVAEConfig, ref: str) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.ref = ref
        """`diffusers:URI` of the weights: what a package exported from this VAE records."""

    @classmethod
    def load(cls, ref: str, config: WanVAEConfig, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> WanVAE:
        """Load the diffusers folder behind `ref` (local or s3://, cached per node), offline."""
        try:
            from diffusers import AutoencoderKLWan  # noqa: PLC0415 - optional extra t2v[diffusers]
        except ImportError:
            raise ImportError(f"{ref}: a diffusers VAE needs the optional extra: "
                              "pip install 't2v[diffusers]'") from None
        folder = resolve_model_dir(parse_ref(ref))
        model = AutoencoderKLWan.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
        found = wan_vae_config(dict(model.config))
        if (found.latent_channels, found.temporal_down, found.spatial_down) != (
                config.latent_channels, config.temporal_down, config.spatial_down):
            raise ValueError(f"{ref}: the VAE there ({found}) is not the one model.json "
                             f"describes ({config})")
        return cls(model.to(device).eval(), config, ref)

    # ---- encode / decode (shapes and normalisation: LatentVAE)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, x: Tensor, chunk_frames: int | None = None) -> DiagonalGaussian:
        """Posterior over raw latents of x (B, 3, T, H, W) in [-1, 1].

        `chunk_frames` is accepted for interface parity: diffusers' Wan VAE always streams the
        clip causally (first frame, then 4 frames at a time, with its feature cache).
        """
        if x.dim() != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"x must be (B, {self.config.in_channels}, T, H, W), "
                             f"got {tuple(x.shape)}")
        self.latent_shape(*x.shape[2:])
        if chunk_frames is not None and chunk_frames < 1:
            raise ValueError(f"chunk_frames={chunk_frames} must be >= 1")
        dist = self.model.encode(x.to(self._dtype())).latent_dist
        return DiagonalGaussian(dist.mean.to(x.dtype), dist.logvar.to(x.dtype))

    def decode_raw(self, z: Tensor, chunk_latent_frames: int | None = None,
                   tiling: Tiling | None = None) -> Tensor:
        """Pixels from raw latents. diffusers decodes one latent frame at a time (causal cache)
        whatever `chunk_latent_frames` says, so memory is already bounded along time; videos
        of a batch are decoded one by one when it is given. `tiling` turns on diffusers' own
        spatial tiling for this call (its tile and stride; Wan's norms are per pixel, so its
        tiles need no halo)."""
        if z.dim() != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"z must be (B, {self.config.latent_channels}, T', H', W'), "
                             f"got {tuple(z.shape)}")
        if chunk_latent_frames is not None and chunk_latent_frames < 1:
            raise ValueError(f"chunk_latent_frames={chunk_latent_frames} must be >= 1")
        parts = z.split(1) if chunk_latent_frames is not None else [z]
        if tiling is not None:
            s, stride = self.config.spatial_down, tiling.tile - tiling.overlap
            self.model.enable_tiling(tile_sample_min_height=tiling.tile * s,
                                     tile_sample_min_width=tiling.tile * s,
                                     tile_sample_stride_height=stride * s,
                                     tile_sample_stride_width=stride * s)
        try:
            out = [self.model.decode(p.to(self._dtype())).sample for p in parts]  # (b, 3, T, H, W)
        finally:
            if tiling is not None:
                self.model.disable_tiling()
        return torch.cat(out).to(z.dtype)  # (B, 3, T, H, W)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of x (B, 3, T, H, W) through the posterior mean."""
        return self.decode_raw(self.encode(x).mean)

