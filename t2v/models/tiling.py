"""Spatially tiled VAE decoding: the memory of decoding a large frame bounded by one tile's.

The latent frame is cut into overlapping square tiles; each is decoded on its own (with whatever
temporal chunking the caller does) and the decoded tiles are blended back with weights that ramp
linearly across each overlap, so no seam is a hard edge. It is what `AutoencoderKLWan.enable_tiling`
and the Stable Diffusion VAE's tiled decode do.

Not exact: a tile's decoder sees zero padding where the frame goes on, and our VAE's per-frame
GroupNorm takes its statistics over the tile instead of the whole frame. Overlaps and blending
hide the first; the second is small for tiles that hold a fair sample of the frame (measured in
tests/test_vae.py on a trained VAE). The arithmetic itself (covering, weights) is exact: a decoder
without spatial context decodes tiled exactly as untiled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles for decoding, in latent pixels: `tile` a side; `overlap` shared with each
    neighbour and blended (default tile // 8, at least 1); `halo` of context decoded around each
    tile and cut away (default tile // 4)."""

    tile: int
    overlap: int | None = None
    halo: int | None = None

    def __post_init__(self) -> None:
        if self.tile < 2:
            raise ValueError(f"tile={self.tile} must be >= 2 latent pixels")
        overlap = max(1, self.tile // 8) if self.overlap is None else self.overlap
        halo = self.tile // 4 if self.halo is None else self.halo
        if not 0 <= overlap < self.tile or halo < 0:
            raise ValueError(f"tiling {self.tile}: overlap {overlap} must be in [0, tile) and "
                             f"halo {halo} >= 0")
        object.__setattr__(self, "overlap", overlap)
        object.__setattr__(self, "halo", halo)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest tiles of side `tile` covering [0, size) with neighbours sharing >=
    `overlap`, spread evenly (the overlaps differ by at most one)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap} must be in [0, tile={tile})")
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def blend_weights(starts: list[int], tile: int, size: int, scale: int) -> list[Tensor]:
    """1-D weights (pixels) of each tile along one axis: 1 inside, a linear ramp across each
    overlap with a neighbour (rising on its first side, falling on its last), never 0; the two
    ramps of one overlap sum to 1."""
    out = []
    for i, s in enumerate(starts):
        n = (min(s + tile, size) - s) * scale
        w = torch.ones(n)
        if i > 0:  # shared with the tile before: [s, end of that tile)
            m = (starts[i - 1] + tile - s) * scale
            w[:m] = (torch.arange(m) + 0.5) / m
        if i < len(starts) - 1:  # shared with the tile after
            m = (s + tile - starts[i + 1]) * scale
            w[n - m:] = torch.minimum(w[n - m:], ((torch.arange(m) + 0.5) / m).flip(0))
        out.append(w)
    return out


def tiled_decode(decode: Callable[[Tensor], Tensor], z: Tensor, tiling: Tiling,
                 scale: int) -> Tensor:
    """`decode` (latents (B, C, T', h, w) -> pixels (B, 3, T, h * scale, w * scale)) applied to
    overlapping `tile` x `tile` latent tiles of z (B, C, T', H', W'), blended into (B, 3, T,
    H' * scale, W' * scale) (`Tiling`). Each tile is decoded with `halo` more latent pixels of context on
    every side (where the frame has them), cut off again before blending: what it sees of its
    surroundings then matches the whole-frame decode out to that distance. Memory: the output,
    plus one (tile + 2 halo)-sized decode."""
    tile, overlap, halo = tiling.tile, tiling.overlap, tiling.halo
    height, width = z.shape[-2:]
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    if len(rows) == len(cols) == 1:
        return decode(z)
    wy, wx = blend_weights(rows, tile, height, scale), blend_weights(cols, tile, width, scale)
    out = total = None
    for i, y in enumerate(rows):
        for j, x in enumerate(cols):
            y0, x0 = max(0, y - halo), max(0, x - halo)
            part = decode(z[..., y0:y + tile + halo, x0:x + tile + halo])
            th, tw = wy[i].numel(), wx[j].numel()
            part = part[..., (y - y0) * scale:(y - y0) * scale + th,
                        (x - x0) * scale:(x - x0) * scale + tw]  # (B, 3, T, th, tw)
            w = (wy[i][:, None] * wx[j][None, :]).to(part.device, part.dtype)  # (th, tw)
            if out is None:
                out = part.new_zeros(*part.shape[:3], height * scale, width * scale)
                total = part.new_zeros(height * scale, width * scale)
            ys, xs = slice(y * scale, y * scale + th), slice(x * scale, x * scale + tw)
            out[..., ys, xs] += part * w
            total[ys, xs] += w
    return out / total  # every pixel is covered with weight > 0
