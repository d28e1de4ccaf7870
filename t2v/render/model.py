"""What one renderer holds and does without Ray: a package's networks on a device, and one
batch of prompts -> latents -> pixels. `t2v/render/pipeline.py` runs it on a Ray Data actor pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch

from t2v.data.tensors import to_uint8
from t2v.diffusion.sampling import Progress, denoise, get_noise
from t2v.models.dit import VideoDiT
from t2v.models.package import PackageError, load_package
from t2v.models.text import TextEncoder
from t2v.models.tiling import Tiling
from t2v.models.vae import CausalVideoVAE
from t2v.models.wan_vae import WanVAE
from t2v.render.rows import Sample


def vae_tiling(vae_tile: int | None, spatial_down: int) -> Tiling | None:
    """`vae_tile` pixels -> tiles in latent pixels (default overlap and halo); raises unless a
    multiple of the VAE's spatial factor."""
    if vae_tile is None:
        return None
    if vae_tile % spatial_down or vae_tile < 2 * spatial_down:
        near = max(2 * spatial_down, vae_tile // spatial_down * spatial_down)
        raise ValueError(f"vae_tile={vae_tile}: must be a multiple of the VAE's spatial factor "
                         f"{spatial_down}, at least two of it (e.g. {near})")
    return Tiling(vae_tile // spatial_down)


@dataclass
class RenderModel:
    """What a renderer holds: the networks of one package, on one device.

    Memory savers for one GPU: `offload_text` keeps the text encoder on the CPU between batches
    (it visits the device only to encode a batch's prompts: umT5-xxl is ~11 GB in bf16), and
    `vae_chunk` decodes the videos of a batch one at a time, `vae_chunk` latent frames a pass;
    `vae_tile` decodes in overlapping spatial tiles of that many pixels a side.
    """

    dit: VideoDiT
    vae: CausalVideoVAE | WanVAE
    text: TextEncoder
    device: torch.device
    offload_text: bool = False
    vae_chunk: int | None = None
    vae_tile: int | None = None
    tiling: Tiling | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.tiling = vae_tiling(self.vae_tile, self.vae.config.spatial_down)

    @classmethod
    def load(cls, uri: str, truncate: bool = True, device: torch.device | None = None,
             offload_text: bool = False,
             vae_chunk: int | None = None,
             vae_tile: int | None = None) -> tuple[RenderModel, str]:
        """Load a package (DiT with any LoRA merged, VAE, text encoder); returns the model and
        the package hash."""
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        pkg = load_package(uri, device=device, load_text=False)
        if pkg.dit is None or pkg.vae is None:
            raise PackageError(f"{uri}: rendering needs a DiT and a VAE in the package")
        text = TextEncoder(replace(pkg.meta.text, truncate=truncate))
        text = text.to("cpu" if offload_text else device)
        return cls(pkg.dit.requires_grad_(False), pkg.vae.requires_grad_(False), text,
                   device, offload_text, vae_chunk, vae_tile), pkg.hash

    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (U, L, D), mask (U, L)) on the device; see `offload_text`."""
        if not self.offload_text:
            return self.text(prompts)
        self.text.to(self.device)
        try:
            emb, mask = self.text(prompts)
        finally:
            self.text.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # hand the encoder's memory to the DiT
        return emb.to(self.device), mask.to(self.device)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, T, H, W) from normalised latents; see `vae_chunk` and `vae_tile`."""
        if self.vae_chunk is None:
            return self.vae.decode(z, tiling=self.tiling)
        return torch.cat([self.vae.decode(zi[None], chunk_latent_frames=self.vae_chunk,
                                          tiling=self.tiling) for zi in z])


def _check_batch(samples: list[Sample]) -> tuple[int, int, int, int]:
    keys = {(s.frames, s.height, s.width, s.steps) for s in samples}
    if len(keys) != 1:
        raise ValueError(f"a batch needs one (frames, height, width, steps), got {sorted(keys)}")
    return keys.pop()


@torch.no_grad()
def render_batch(model: RenderModel, samples: list[Sample], sampler: str = "euler",
                 shift: float | None = 1.0, progress: Progress | None = None,
                 ) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Samples of one shape and step count -> (latents (B, C, T', H', W'), videos (T, H, W, 3)).

    `shift` None means 1 (the job resolves RenderConfig.shift None to the package's first).
    `progress(k, n)` is called after each of the n sampler steps (the online API's progress).

    Needs no Ray. Each sample's noise comes from its own seed (`get_noise`) and cfg is per
    sample, so a video depends only on its own row: batch size and batch mates change nothing
    but the summation order inside batched matmuls (float32 latents agree to ~1e-6, pixels to
    one uint8 level; see tests/test_render.py).
    """
    frames, height, width, steps = _check_batch(samples)
    unique = list(dict.fromkeys([s.prompt for s in samples]
                                + [s.negative_prompt for s in samples]))
    emb, emb_mask = model.encode_text(unique)  # (U, L, D), (U, L): each distinct string once
    pos = [unique.index(s.prompt) for s in samples]
    neg = [unique.index(s.negative_prompt) for s in samples]
    text, mask = emb[pos], emb_mask[pos]  # (B, L, D), (B, L)
    neg_text, neg_mask = emb[neg], emb_mask[neg]  # (B, L, D), (B, L)
    shape = model.vae.latent_shape(frames, height, width)  # (C, T', H', W')
    noise = get_noise(shape, [s.seed for s in samples], device=model.device)  # (B, C, T', ..)
    cfg = torch.tensor([s.cfg for s in samples])  # (B,)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda")
    with autocast:
        z = denoise(model.dit, noise, text, mask, neg_text, neg_mask, steps=steps, cfg=cfg,
                    shift=shift or 1.0, sampler=sampler,
                    progress=progress)  # (B, C, T', H', W') float32
    pixels = model.decode(z.float())  # (B, 3, T, H, W), unclamped
    return z, [to_uint8(v) for v in pixels]

