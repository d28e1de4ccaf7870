"""The rank layout of a training run with sequence parallelism (thin orchestration).

`sequence_parallel: P` splits the W Ray Train workers into W / P groups of P consecutive ranks.
The ranks of a group hold the same samples and split each sample's video tokens between them
(t2v/models/sequence_parallel.py); the groups are the data-parallel replicas. Ray Train numbers
workers node by node, so a group lies on one node when every node runs a multiple of P workers
(checked when the run starts: all-to-all every layer wants the node's fast links).

Data: the stream is split W / P ways (`GroupedData`), one split per group. The group's first rank
(its leader) reads it and broadcasts each batch to the others (`Layout.share`): a batch is read
and decoded once per group, and the group's ranks agree on its samples and order exactly.

Gradients: each rank's backward leaves the gradient of its own tokens, the group's sum being the
group's gradient; DeepSpeed averages over all W ranks. Scaling the loss by P before backward
makes that average the mean over the W / P groups, i.e. the data-parallel gradient of the global
batch (`Layout.loss_scale`). So one world-wide reduction serves both, and ZeRO shards weights,
gradients and optimizer states over all W ranks (as DeepSpeed-Ulysses does), P times less per
rank than sharding over the data-parallel replicas alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from ray.train import DataConfig
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    rank: int
    world: int
    sp: int = 1
    """Ranks per sequence-parallel group."""
    group: object = None
    """This rank's sequence-parallel process group (None when sp == 1)."""

    @property
    def data_parallel(self) -> int:
        """Replicas that read different samples: W / P."""
        return self.world // self.sp

    @property
    def leader(self) -> int:
        """Global rank of this group's first rank: it reads the data."""
        return self.rank - self.rank % self.sp

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def loss_scale(self) -> float:
        """What the loss is multiplied by before backward (module docstring)."""
        return float(self.sp)

    def batches(self, stream, device: torch.device, agree: bool = False):
        """The group's batches: the leader iterates `stream` (its split), the others receive
        each of its batches, until the pass ends on the leader.

        agree: the pass ends for every rank when it ends for one (a MIN all-reduce per batch).
        Ray Data's equal splits make equal batch counts, except with per-bucket batching, where
        each split leaves its own part-full buckets; without agreement a rank would wait in a
        collective for one that has no batch left."""
        it = iter(stream) if self.is_leader else None
        while True:
            batch = self.share(next(it, None) if it is not None else None, device)
            if agree and self.data_parallel > 1:
                have = torch.tensor([int(batch is not None)], device=device)
                dist.all_reduce(have, op=dist.ReduceOp.MIN)
                batch = batch if have.item() else None
            if batch is None:
                return
            yield batch

    def share(self, batch: object | None, device: torch.device) -> object | None:
        """The leader's `batch` (a dataclass; None at the end of a pass) on every rank of the
        group: its tensors on `device`, the rest as is. Collective within the group."""
        if self.sp == 1:
            return batch
        header = None
        tensors: dict[str, Tensor] = {}
        if self.is_leader and batch is not None:
            values = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
            tensors = {k: v for k, v in values.items() if isinstance(v, Tensor)}
            header = (type(batch), {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()},
                      {k: v for k, v in values.items() if k not in tensors})
        box = [header]
        dist.broadcast_object_list(box, src=self.leader, group=self.group,
                                   device=device if device.type != "cpu" else None)
        if box[0] is None:
            return None
        cls, specs, rest = box[0]
        out = {}
        for name, (shape, dtype) in specs.items():
            t = (tensors[name].to(device).contiguous() if self.is_leader
                 else torch.empty(shape, dtype=dtype, device=device))
            dist.broadcast(t, src=self.leader, group=self.group)
            out[name] = t
        return cls(**out, **rest)


def make_layout(sp: int, rank: int, world: int, local_rank: int, local_world: int) -> Layout:
    """The layout of this rank; creates the W / P groups (collective: every rank calls it).

    Raises on every rank alike (so none waits on the others) when a group would span nodes."""
    if sp == 1:
        return Layout(rank, world)
    if world % sp:
        raise ValueError(f"sequence_parallel={sp} must divide the {world} workers")
    places = [None] * world
    dist.all_gather_object(places, (rank - local_rank, local_world))  # (node's first rank, size)
    for r, (first, size) in enumerate(places):
        if first % sp or size % sp:
            raise ValueError(
                f"sequence_parallel={sp}: a node runs {size} workers (ranks {first}-"
                f"{first + size - 1}, rank {r} among them), not a multiple of {sp}, so a "
                "sequence-parallel group would span nodes; give every node a multiple of "
                f"{sp} workers (placement_strategy PACK and {sp}-GPU multiples per node)")
    groups = [dist.new_group(list(range(g * sp, (g + 1) * sp))) for g in range(world // sp)]
    return Layout(rank, world, sp, groups[rank // sp])


class GroupedData(DataConfig):
    """Ray Train's data config with one stream split per sequence-parallel group: the P ranks
    of a group get the same split (only the leader iterates it; `Layout.share`)."""

    def __init__(self, sp: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sp = sp

    def configure(self, datasets, world_size: int, worker_handles, worker_node_ids, **kwargs):
        sp = self.sp
        if world_size % sp:
            raise ValueError(f"sequence_parallel={sp} must divide the {world_size} workers")
        splits = super().configure(
            datasets, world_size // sp, worker_handles[::sp] if worker_handles else None,
            worker_node_ids[::sp] if worker_node_ids else None, **kwargs)
        return [splits[r // sp] for r in range(world_size)]
