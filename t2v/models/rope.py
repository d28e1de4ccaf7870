"""3D rotary position embedding of video tokens, exactly as Wan 2.1 (VideoDiT's positions)."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to (frame, height, width) rotations, exactly as Wan.

    Height and width get 2*(head_dim//6) each, frames the rest (128 -> 44/42/42). Channels are
    rotated in interleaved pairs (2i, 2i+1); the pairs are ordered frame, height, width.
    """
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Rotation angles (N, head_dim/2), float64, for integer (frame, y, x) positions (N, 3).

    Axis a with d_a channels rotates pair j by pos_a * theta^(-2j/d_a).
    """
    out = []
    for axis, d in enumerate(rope_split(head_dim)):
        j = torch.arange(0, d, 2, dtype=torch.float64, device=positions.device)
        freqs = 1.0 / theta ** (j / d)  # (d/2,)
        out.append(positions[:, axis, None].to(torch.float64) * freqs)  # (N, d/2)
    return torch.cat(out, dim=1)  # (N, head_dim/2)


def grid_positions(grid: tuple[int, int, int], device: torch.device | None = None) -> Tensor:
    """(frame, y, x) of every token of a (T', H', W') grid in patch-embedding order, (N, 3)."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate interleaved channel pairs of x (B, N, H, Dh) by complex rope (N, 1, Dh/2)."""
    ct = torch.promote_types(x.dtype, torch.float32)  # complex maths needs f32/f64
    xc = torch.view_as_complex(x.to(ct).unflatten(-1, (-1, 2)))  # (B, N, H, Dh/2)
    return torch.view_as_real(xc * rope).flatten(-2).type_as(x)  # (B, N, H, Dh)
