"""ZeRO plumbing of the worker loop (thin orchestration over DeepSpeed and torch.distributed).

- `build_model`: at ZeRO-3 the model is constructed inside `deepspeed.zero.Init`, so every
  parameter is partitioned the moment its layer exists and no rank ever holds the whole model;
  initialisation that touches a built layer runs inside `whole` (a gather of just those
  parameters), so the ZeRO-3 model starts bit-identical to the ZeRO-0/1/2 one.
- `local_fragments`: this rank's piece of every trainable parameter, as (name, start, 1-D
  tensor) of the flattened parameter. ZeRO-3: DeepSpeed's own fp32 partition (ranks own
  [r * ceil(n / W), ...)); ZeRO-0/1/2 (whole parameters on every rank): the same even split, so the
  EMA is sharded W ways at every stage and fed without any communication.
- `gather_fragments`: the whole tensors, on rank 0 only, one parameter at a time (a collective:
  validation and export call it on every rank).
- EMA files: each rank writes its fragments to `ema/rank-R.safetensors` (keys `NAME@START`);
  reading takes, for each fragment this rank owns now, the pieces of any saved file that cover it,
  so the files restore on any number of workers. A single `ema.safetensors` of whole tensors
  (checkpoints of earlier versions) reads the same way.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from t2v.train.schedule import EMA, Fragment

EMA_DIR = "ema"


def build_model(
    build: Callable[..., nn.Module], zero_stage: int, ds_config: dict, device: torch.device
) -> nn.Module:
    """`build(whole)` -> the model on `device`; at ZeRO-3 partitioned as it is constructed."""
    if zero_stage != 3:
        return build(None).to(device)
    import deepspeed  # noqa: PLC0415 - heavy: workers only

    def whole(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        # Every rank computes the same values (same seed); rank 0's are kept and re-partitioned.
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return build(whole)


def is_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def local_fragments(module: nn.Module, rank: int, world: int) -> Iterator[Fragment]:
    """This rank's piece of each trainable parameter (module order; see the module docstring)."""
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if is_partitioned(p):
            from deepspeed.utils import safe_get_local_fp32_param  # noqa: PLC0415

            local = safe_get_local_fp32_param(p)  # (ceil(n / W),), the last rank's padded
            start = rank * local.numel()
            count = max(0, min(local.numel(), p.ds_numel - start))
            flat = local[:count]
        else:
            size = -(-p.numel() // world)
            start = min(rank * size, p.numel())
            flat = p.detach().reshape(-1)[start : start + size]
        if flat.numel():
            yield Fragment(name, start, flat)


def full_shapes(module: nn.Module) -> dict[str, torch.Size]:
    """Name -> whole shape of each trainable parameter (ZeRO-3's are stored empty)."""
    return {
        name: p.ds_shape if is_partitioned(p) else p.shape
        for name, p in module.named_parameters()
        if p.requires_grad
    }


def gather_fragments(
    fragments: dict[str, list[tuple[int, Tensor]]],
    shapes: dict[str, torch.Size],
    rank: int,
    device: torch.device,
) -> dict[str, Tensor] | None:
    """Whole float32 tensors from every rank's fragments: rank 0 gets them, others None.

    One parameter at a time (a zero-filled buffer, each rank writes its pieces, a sum-reduce to
    rank 0), so no rank holds more than the result plus one parameter. Single-process runs need
    no communication.
    """
    out: dict[str, Tensor] = {}
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    for name, shape in shapes.items():
        buf = torch.zeros(shape.numel(), dtype=torch.float32, device=device)
        for start, t in fragments.get(name, []):
            buf[start : start + t.numel()] = t.to(device, torch.float32)
        if distributed:
            dist.reduce(buf, dst=0)
        if rank == 0:
            out[name] = buf.view(shape).cpu()
    return out if rank == 0 else None


def ema_by_name(ema: EMA) -> dict[str, list[tuple[int, Tensor]]]:
    pieces: dict[str, list[tuple[int, Tensor]]] = {}
    for (name, start), t in ema.shadow.items():
        pieces.setdefault(name, []).append((start, t))
    return pieces


def save_ema(ema: EMA, directory: str, rank: int) -> None:
    os.makedirs(os.path.join(directory, EMA_DIR), exist_ok=True)
    save_file(ema.state_dict(), os.path.join(directory, EMA_DIR, f"rank-{rank:05d}.safetensors"))


def load_ema(ema: EMA, directory: str) -> None:
    """Fill this rank's EMA fragments from the saved pieces that cover them (any saved world
    size); raises if a fragment is not covered completely."""
    files = sorted(glob.glob(os.path.join(directory, EMA_DIR, "rank-*.safetensors")))
    legacy = os.path.join(directory, "ema.safetensors")
    files = files or ([legacy] if os.path.exists(legacy) else [])
    if not files:
        raise FileNotFoundError(
            f"{directory}: checkpoint has no EMA ({EMA_DIR}/rank-*.safetensors)"
        )
    mine: dict[str, list[tuple[int, Tensor]]] = ema_by_name(ema)
    filled = dict.fromkeys(ema.shadow, 0)
    updates = None
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                if key == EMA.UPDATES_KEY:
                    updates = int(f.get_tensor(key))
                    continue
                name, _, at = key.partition("@")
                if name not in mine:
                    continue  # a frozen parameter of a legacy whole-module file
                start, piece = int(at or 0), f.get_slice(key)
                shape = piece.get_shape()
                count = 1
                for n in shape:
                    count *= n
                for own_start, t in mine[name]:
                    lo, hi = max(start, own_start), min(start + count, own_start + t.numel())
                    if lo >= hi:
                        continue
                    # Fragments are 1-D: read just the overlap; legacy whole tensors entirely.
                    values = (
                        piece[lo - start : hi - start]
                        if len(shape) == 1
                        else f.get_tensor(key).reshape(-1)[lo - start : hi - start]
                    )
                    t[lo - own_start : hi - own_start] = values.to(t.dtype)
                    filled[name, own_start] += hi - lo
    short = [f"{n}@{s}" for (n, s), got in filled.items() if got != ema.shadow[n, s].numel()]
    if short or updates is None:
        raise ValueError(
            f"{directory}: the saved EMA does not cover "
            f"{', '.join(short[:3]) or 'the update count'}"
            f"{' ...' if len(short) > 3 else ''}"
        )
    ema.updates = updates
