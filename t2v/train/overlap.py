"""Gradient all-reduce in buckets while the backward pass still runs (pure torch.distributed).

DeepSpeed's engine at ZeRO-0 averages the gradients after the backward pass has ended: it
flattens all of them, all-reduces the one buffer and copies it back, while the training thread
waits. Over gloo on CPU that wait is most of a step's `reduce` phase (a 4 MiB all-reduce takes
~7 ms of wall time between two processes of a 2-core box, with nothing to overlap it). DDP's
reducer instead starts each bucket's all-reduce as soon as the backward pass has produced its
gradients, so the transfer runs beside the rest of the backward pass.

`OverlappedReduce` does that for a DeepSpeed engine whose own reduction is switched off
(`engine.enable_backward_allreduce = False`): DeepSpeed still clips, steps the optimizer and
scheduler and checkpoints, on gradients that are already averaged when `finish()` returns.

The buckets are fixed at construction, in reverse order of the parameters (the order a
backward pass produces gradients in, near enough) and launched strictly in that order, so
every rank issues the same collectives in the same order whatever order its gradients come
in; a bucket whose parameters got no gradient this pass is launched by `finish()` with zeros
for them (as DeepSpeed does). Only the accumulation boundary's backward reduces (`arm()`
before it): micro-batches in between accumulate locally, as DeepSpeed's own path does. Each
parameter's gradient must be accumulated once per backward pass (the DiT's activation
checkpointing is non-reentrant: it is); a second one is refused in one line, never averaged
wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 1 << 20
"""Bucket size: 1 MiB, DDP's first bucket. Small enough that the first transfer starts early in
the backward pass, large enough that per-collective latency (~0.2 ms over gloo) stays small."""


class OverlappedReduce:
    """Average the gradients of `params` over `group` (None: the world) during the backward
    pass that follows `arm()`; `finish()` waits for the transfers and writes the means back
    into each parameter's `.grad`."""

    def __init__(self, params: Iterable[nn.Parameter], group=None,  # noqa: ANN001 - a ProcessGroup
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("OverlappedReduce: no parameter requires a gradient")
        self.group, self.world = group, dist.get_world_size(group)
        self.buckets: list[list[nn.Parameter]] = []
        size = bucket_bytes
        for p in reversed(params):
            if size >= bucket_bytes or p.dtype != self.buckets[-1][0].dtype:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._left: list[int] = []
        self._next = 0
        self._pending: list[tuple[int, torch.Tensor, dist.Work]] = []
        self.armed = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def arm(self) -> None:
        """The next backward pass's gradients are the ones to reduce (an accumulation
        boundary)."""
        self._left = [len(b) for b in self.buckets]
        self._next, self._pending, self.armed = 0, [], True

    def _ready(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        i = self.bucket_of[p]
        if self._left[i] == 0:  # e.g. reentrant checkpointing accumulating a parameter twice
            raise RuntimeError(
                f"OverlappedReduce: a parameter of shape {tuple(p.shape)} got a second gradient "
                "in one backward pass, after its bucket was sent; set overlap_reduce: false")
        self._left[i] -= 1
        while self._next < len(self.buckets) and self._left[self._next] == 0:
            self._launch(self._next)

    def _launch(self, i: int) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.buckets[i]])
        self._pending.append((i, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        self._next = i + 1

    def finish(self) -> None:
        """After the armed backward pass: launch what it left (parameters without a
        gradient), wait for every transfer, and set each `.grad` to the mean over the group."""
        if not self.armed:
            raise RuntimeError("OverlappedReduce.finish() without arm() before the backward pass")
        while self._next < len(self.buckets):
            self._launch(self._next)
        for i, flat, work in self._pending:
            work.wait()
            flat.div_(self.world)
            offset = 0
            for p in self.buckets[i]:
                mean = flat[offset:offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
                offset += p.numel()
        self._pending, self.armed = [], False

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
