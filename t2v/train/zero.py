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
- Checkpoints hold each rank's EMA fragments beside its weights and moments and restore on any
  number of workers: t2v/train/checkpoint.py.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from t2v.train.schedule import EMA, Fragment


def import_deepspeed(use_gpu: bool):
    """The deepspeed module, set up for this process's device.

    On CPU, DeepSpeed's comm backend JIT-compiles its shared-memory all-reduce op the first time
    it initialises (`zero.Init` or `deepspeed.initialize`: ~30 s of gcc on every fresh machine,
    ~1 min on slower CPUs), an op only its inference path (`inference_all_reduce`) uses;
    training all-reduces through torch.distributed (gloo). Marking the op unavailable in
    DeepSpeed's compatibility table (a dict it keeps for edits like this) skips the build.

    `import deepspeed` also reaches its autotuner, which imports MLflow where it is installed
    (t2v's `tracking` extra) to log its tuning experiments: ~2.1 s of a core in every worker of
    every run (BENCHMARKS.md "Start-up of a Ray Train run"). The autotuner is a launcher feature
    t2v never runs, so MLflow is hidden from that one import (`None` in sys.modules makes it
    raise ImportError, which the autotuner catches); t2v's own tracker (t2v/train/tracking.py)
    imports it as usual afterwards.
    """
    hide = "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment] - import raises ImportError
    try:
        import deepspeed  # noqa: PLC0415 - heavy: the workers' import, never the driver's
    finally:
        if hide:
            del sys.modules["mlflow"]
    if not use_gpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def build_model(
    build: Callable[..., nn.Module], zero_stage: int, ds_config: dict, device: torch.device
) -> nn.Module:
    """`build(whole)` -> the model on `device`; at ZeRO-3 partitioned as it is constructed."""
    if zero_stage != 3:
        return build(None).to(device)
    deepspeed = import_deepspeed(use_gpu=device.type != "cpu")
    # Imported inside zero.Init (peft does, lazily), torch._dynamo fails to register its
    # polyfills against DeepSpeed's patched tensor constructor.
    import torch._dynamo  # noqa: F401, PLC0415

    def whole(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
        # Every rank computes the same values (same seed); rank 0's are kept and re-partitioned.
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return build(whole)


def share_fp32_partitions(engine) -> None:
    """ZeRO-3 in fp32: let the optimizer step the model's own fp32 partition.

    DeepSpeed means to skip its fp32 master copy when the partition already is fp32 on the
    optimizer's device, but compares the tensor's `torch.device` with the device's *name* (a
    str: never equal), so it always clones: 4 bytes per parameter / W for nothing. Pointing each
    master at its partition is what its own branch would do: the step writes the weights
    in place and its copy back to the partition becomes a copy onto itself. (bf16: the master is
    a real fp32 copy of bf16 weights, left alone; ZeRO-1/2 keep their copy.)"""
    opt = engine.optimizer
    for lp, hp in zip(getattr(opt, "fp16_partitioned_groups_flat", []),
                      getattr(opt, "fp32_partitioned_groups_flat", []), strict=True):
        if lp.dtype == hp.dtype and lp.device == hp.device and lp.data_ptr() != hp.data_ptr():
            hp.data = lp.data


def grad_norm(module: nn.Module) -> float:
    """The 2-norm of the module's gradients, as held (after ZeRO-0's all-reduce at a boundary,
    the global one): what DeepSpeed's fp32 clipping measures and does not keep."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def is_partitioned(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def numel(p: nn.Parameter) -> int:
    """Elements of the whole parameter (ZeRO-3 keeps an empty placeholder in the module)."""
    return p.ds_numel if is_partitioned(p) else p.numel()


def piece(p: nn.Parameter, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of this rank's piece of the flattened parameter: ZeRO-3's partition
    ([r * ceil(n / W), ...), as DeepSpeed cuts it), else the same even split of the whole
    parameter every rank holds. count is 0 where n < W leaves a rank nothing."""
    n = numel(p)
    size = p.ds_tensor.numel() if is_partitioned(p) else -(-n // world)
    start = min(rank * size, n)
    return start, min(size, n - start)


def local_fragments(module: nn.Module, rank: int, world: int) -> Iterator[Fragment]:
    """This rank's piece of each trainable parameter (module order; see the module docstring)."""
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        start, count = piece(p, rank, world)
        if not count:
            continue
        if is_partitioned(p):
            from deepspeed.utils import safe_get_local_fp32_param  # noqa: PLC0415

            # (ceil(n / W),): this rank's fp32 partition, the last rank's padded
            yield Fragment(name, start, safe_get_local_fp32_param(p)[:count])
        else:
            yield Fragment(name, start, p.detach().reshape(-1)[start : start + count])


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
