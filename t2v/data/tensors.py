"""uint8 pixels <-> the models' float range: the one place the two layouts meet (no Ray).

Kept out of t2v/data/video.py so that what reads and decodes data stays torch-free (see
t2v/data/collate.py for why); the collates, render, encode and eval convert here.
"""

from __future__ import annotations

import numpy as np
import torch


def to_model_range(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 clips (..., T, H, W, 3) -> float32 (..., 3, T, H, W) in [-1, 1], the VAE's input.

    A tensor stays on its device: move uint8 to a GPU first (a quarter of the float bytes).
    """
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8 or x.dim() < 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 (..., T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    return x.movedim(-1, -4).float().div_(127.5).sub_(1.0)  # (..., 3, T, H, W)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """A model-range video (3, T, H, W) -> uint8 (T, H, W, 3) on the CPU; out of range clamps."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected (3, T, H, W), got {tuple(video.shape)}")
    v = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)
