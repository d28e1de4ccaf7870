"""Ulysses sequence parallelism for VideoDiT, applied from outside the model.

The P ranks of a sequence-parallel group hold the same samples. Between `VideoDiT.embed` and the
head, each rank keeps 1/P of every sample's video tokens (the sequence padded to a multiple of P;
padded keys are masked, padded outputs dropped) with their global RoPE positions. Self-attention
is the only step that needs the whole sequence: an all-to-all trades tokens for heads, so each
rank attends over every token with H/P of the heads, and a second all-to-all trades back (the
swapped piece is `Attention.attend`; the weights and their names do not change). Cross-attention
(its keys are the text, the same on every rank), norms, the FFN and the head work per token.
The head's outputs are all-gathered: every rank returns the whole velocity and computes the same
loss. The gather's backward keeps each rank's own tokens' gradient, so the group's parameter
gradients sum to the one-process gradient (`reduce_gradients`). Activation checkpointing works
unchanged: the recomputed forward repeats the collectives in the same order on every rank.

torch.distributed only (gloo on CPU, NCCL on GPU); no Ray, no DeepSpeed here.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from t2v.models.dit import VideoDiT, sdpa


def _all_to_all(x: Tensor, group, scatter: int, gather: int) -> Tensor:
    """Split x into P parts along `scatter`, send part i to rank i, concatenate what arrives
    along `gather` (in rank order)."""
    p = dist.get_world_size(group)
    send = torch.stack(x.chunk(p, dim=scatter)).contiguous()  # (P, ...)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, scatter: int, gather: int) -> Tensor:
        ctx.group, ctx.scatter, ctx.gather = group, scatter, gather
        return _all_to_all(x, group, scatter, gather)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.group, ctx.gather, ctx.scatter), None, None, None


class _GatherTokens(torch.autograd.Function):
    """(B, n, K) per rank -> (B, P*n, K) on every rank; backward keeps this rank's slice (every
    rank computes the same loss from the gathered whole)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.rank, ctx.n = dist.get_rank(group), x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[:, ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n].contiguous(), None


class UlyssesAttend:
    """`Attention.attend` over a sequence split across `group`: q, k, v (B, n, H, Dh) of this
    rank's tokens -> (B, n, H, Dh), attending over all `valid` tokens of the whole sequence."""

    def __init__(self, group) -> None:
        self.group = group
        # Real tokens of the current sequence, set by each forward. A checkpointed block's
        # recompute reads it in backward: run a forward's backward before the next forward of
        # another length (training does: one micro-batch at a time).
        self.valid = 0

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            raise ValueError("sequence-parallel self-attention takes no mask")
        qkv = _AllToAll.apply(torch.stack([q, k, v]), self.group, 3, 2)  # (3, B, N, H/P, Dh)
        q, k, v = qkv.unbind(0)
        n = q.shape[1]
        keys = None
        if self.valid < n:  # padding at the end of the sequence: never a key
            keys = (torch.arange(n, device=q.device) < self.valid)[None, None, None, :]
        o = sdpa(q, k, v, keys)  # (B, N, H/P, Dh)
        return _AllToAll.apply(o, self.group, 1, 2)  # (B, n, H, Dh)


def _forward(model: VideoDiT, x: Tensor, t: Tensor, text: Tensor,
             text_mask: Tensor | None = None) -> Tensor:
    """VideoDiT.forward with the token sequence split across the group (see module doc)."""
    split: SequenceSplit = model.sequence_split
    tokens, cond = model.embed(x, t, text, text_mask)  # (B, N, D), the same on every rank
    rope = model.rope(cond.grid, x.device)  # (N, 1, Dh/2)
    n, p, r = tokens.shape[1], split.size, split.rank
    per = -(-n // p)
    if per * p > n:
        tokens = F.pad(tokens, (0, 0, 0, per * p - n))
        rope = torch.cat([rope, rope.new_ones(per * p - n, *rope.shape[1:])])
    split.attend.valid = n
    local = slice(r * per, (r + 1) * per)
    out = model.run_blocks(tokens[:, local], cond, rope[local])  # (B, per, D)
    out = _GatherTokens.apply(model.head(out, cond.temb), split.group)[:, :n]  # (B, N, K)
    return model.unpatchify(out, cond.grid)


class SequenceSplit:
    """What `parallelize` attaches to a model: its group and the shared attention core."""

    def __init__(self, group) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.attend = UlyssesAttend(group)


def parallelize(model: VideoDiT, group=None) -> VideoDiT:
    """Split `model`'s video tokens across the ranks of `group` (default: the whole world), in
    place; parameters, their names and the model's outputs are unchanged."""
    split = SequenceSplit(group)
    heads = model.config.heads
    if heads % split.size:
        raise ValueError(f"sequence_parallel={split.size} must divide the DiT's {heads} heads")
    model.sequence_split = split
    for block in model.blocks:
        block.self_attn.attend = split.attend
    model.forward = types.MethodType(_forward, model)
    return model


def reduce_gradients(model: nn.Module, group=None) -> None:
    """Sum each parameter's gradient over the group's ranks (each holds its own tokens' part)."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
