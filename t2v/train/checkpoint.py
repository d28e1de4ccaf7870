"""Training checkpoints that restore on any number of workers (thin orchestration over DeepSpeed).

Each rank writes `state/rank-R.safetensors`: its own piece of every trainable parameter's fp32
master weights, AdamW moments and EMA, one 1-D tensor per piece, keyed `KIND/NAME@START` (START:
the piece's offset in the flattened parameter). Rank 0 adds `trainer.json` (step, samples, the
optimizer's step count, shapes, world size). Nothing in the files depends on how the pieces were
cut, so a run saved by N workers restores on M: each rank reads, from every saved file, just the
slices that overlap the pieces it owns now (safetensors slices, never a whole file), writes them
into DeepSpeed's own buffers and lets DeepSpeed rebuild the working weights (ZeRO-1/2: fp32
partition -> bit16 all-gather; ZeRO-3: fp32 partition -> partitioned parameters, persistent ones
re-gathered), as its universal-checkpoint loader does. The same path serves every resume, so
every resume test exercises it.

Which piece a rank owns: ZeRO-3, DeepSpeed's partition ([r * ceil(n / W), ...)); ZeRO-1/2 (and
DeepSpeed's bf16 optimizer), the fragment its flat partition holds (`_hp_mapping`); ZeRO-0 (plain
data parallel; in bf16 with per-parameter fp32 masters), an even split of the whole tensors every
rank holds. The EMA: see zero.py.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from t2v.train.schedule import EMA
from t2v.train.zero import is_partitioned, piece

STATE_DIR = "state"
MOMENTS = ("exp_avg", "exp_avg_sq")
KINDS = ("param", *MOMENTS)


# ----------------------------------------------------------------------------- reading pieces


class Pieces:
    """Every `NAME@START` tensor of a set of safetensors files, readable by element range."""

    def __init__(self, files: list[str]) -> None:
        self.files = files
        # Each file is opened (memory-mapped) once; fills read slices through these handles.
        self.handles = {path: safe_open(path, framework="pt") for path in files}
        self.index: dict[str, list[tuple[int, int, str, str]]] = {}
        for path, f in self.handles.items():
            for key in f.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                name, _, at = key.rpartition("@") if "@" in key else (key, "", "0")
                count = 1
                for n in f.get_slice(key).get_shape():
                    count *= n
                self.index.setdefault(name, []).append((int(at), count, path, key))

    def fill(self, name: str, start: int, out: Tensor) -> int:
        """Copy elements [start, start + out.numel()) of `name` into the 1-D `out`; returns how
        many were found."""
        got = 0
        for at, count, path, key in self.index.get(name, []):
            lo, hi = max(at, start), min(at + count, start + out.numel())
            if lo >= hi:
                continue
            f = self.handles[path]
            part = f.get_slice(key)
            values = (part[lo - at:hi - at] if len(part.get_shape()) == 1
                      else f.get_tensor(key).reshape(-1)[lo - at:hi - at])
            out[lo - start:hi - start] = values.to(out.dtype)
            got += hi - lo
        return got

    def whole(self, name: str, count: int) -> Tensor:
        out = torch.empty(count, dtype=torch.float32)
        if self.fill(name, 0, out) != count:
            raise ValueError(f"{self.files[0]}...: the checkpoint does not hold all of {name}")
        return out


def state_files(directory: str | Path) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, STATE_DIR, "rank-*.safetensors")))


def read_whole(directory: str | Path, kind: str = "param") -> dict[str, Tensor]:
    """Whole tensors of one kind (param, exp_avg, exp_avg_sq, ema) from a checkpoint directory."""
    shapes = json.loads(Path(directory, "trainer.json").read_text())["shapes"]
    pieces = Pieces(state_files(directory))
    return {name: pieces.whole(f"{kind}/{name}", torch.Size(shape).numel()).view(shape)
            for name, shape in shapes.items()}


# ----------------------------------------------------------------------------- DeepSpeed's buffers


def _base(engine) -> torch.optim.Optimizer:
    """The torch AdamW inside DeepSpeed's ZeRO/bf16 wrapper (or the optimizer itself)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def _masters(engine) -> dict[nn.Parameter, Tensor]:
    """ZeRO-0 in bf16: DeepSpeed's unfused optimizer keeps an fp32 master per parameter
    (`fp32_groups` beside the model's `fp16_groups`); the optimizer steps the masters. (ZeRO-1/2/3
    name their flat groups alike: call this for ZeRO-0 only.)"""
    opt = engine.optimizer
    pairs = zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []), strict=True)
    return {lp: hp for lps, hps in pairs for lp, hp in zip(lps, hps, strict=True)}


def _ensure_moments(engine) -> None:
    """AdamW makes its moments at the first step; a restore before it needs them to exist (zero,
    as AdamW would make them) and DeepSpeed's fragments linked to them."""
    base = _base(engine)
    flats = [p for group in base.param_groups for p in group["params"]]
    # ZeRO-3 empties the param groups between steps; its flat fp32 partitions are kept here.
    flats += getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])
    for p in flats:
        state = base.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)
            for key in MOMENTS:
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def _pieces_of(engine, rank: int, world: int) -> Iterator[tuple[str, int, dict[str, Tensor]]]:
    """(name, start, {kind: 1-D view}) of this rank's piece of each trainable
    parameter: views into DeepSpeed's fp32 partition and the optimizer's moments, so reading
    them saves and writing them restores."""
    base, masters = _base(engine), None
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if is_partitioned(p):  # ZeRO-3: views, as DeepSpeed's safe_get_local_* read them
            start, count = piece(p, rank, world)
            views = {k: engine.optimizer._get_fp32_opt_state_partition(
                p, release_swap_buffers=False, optim_state_key=None if k == "param" else k)[0]
                for k in KINDS}
        elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, bf16 optimizer: a fragment, maybe none
            m = p._hp_mapping
            if m is None:
                continue
            views = {"param": m.hp_fragment} | {k: m.get_optim_state_fragment(k) for k in MOMENTS}
            start, count = m.lp_fragment_address.start, m.lp_fragment_address.numel
        else:  # ZeRO-0: whole tensors on every rank, each saves an even share
            start, count = piece(p, rank, world)
            masters = _masters(engine) if masters is None else masters
            hp = masters.get(p, p)
            views = {"param": hp.data} | {k: base.state[hp][k] for k in MOMENTS}
            views = {k: v.reshape(-1)[start:] for k, v in views.items()}
        if count > 0:
            yield name, start, {k: v.reshape(-1)[:count] for k, v in views.items()}


def optimizer_step(engine) -> int:
    steps = {int(s["step"]) for s in _base(engine).state.values() if "step" in s}
    return steps.pop() if len(steps) == 1 else 0


# ----------------------------------------------------------------------------- save / restore


def save_state(engine, ema: EMA, directory: str, rank: int, world: int) -> None:
    """This rank's pieces of weights, moments and EMA -> `state/rank-R.safetensors`."""
    tensors = {f"{kind}/{name}@{start}": v.detach().float().contiguous().cpu()
               for name, start, views in _pieces_of(engine, rank, world)
               for kind, v in views.items()}
    tensors |= {f"ema/{name}@{start}": t.cpu() for (name, start), t in ema.shadow.items()}
    os.makedirs(os.path.join(directory, STATE_DIR), exist_ok=True)
    save_file(tensors, os.path.join(directory, STATE_DIR, f"rank-{rank:05d}.safetensors"))


def trainer_state(engine, ema: EMA, shapes: dict[str, torch.Size], step: int, samples: int,
                  world: int, configured_accum: int) -> dict:
    batch, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    return {"step": step, "samples": samples, "optimizer_step": optimizer_step(engine),
            "ema_updates": ema.updates, "world": world, "batch_size": batch,
            "grad_accum": accum, "configured_grad_accum": configured_accum,
            "global_batch": batch * accum * world,
            "shapes": {name: list(shape) for name, shape in shapes.items()}}


def elastic_accum(batch_size: int, grad_accum: int, saved: dict | None,
                  world: int) -> tuple[int, str | None]:
    """Gradient accumulation for resuming `saved` on `world` workers, with a note when the
    worker count or the global batch changes.

    Batch settings as configured before: accumulation makes up for the worker count, so the
    global batch (hence the optimisation) stays the run's; where it cannot (not a multiple),
    the configured accumulation is used and the note says so. Batch settings changed by the
    user: theirs, and the note gives the new global batch.
    """
    if not saved or "global_batch" not in saved:
        return grad_accum, None
    target, new = saved["global_batch"], batch_size * grad_accum * world
    moved = saved["world"] != world
    head = f"elastic resume, {saved['world']} -> {world} workers" if moved else "resume"
    if (saved["batch_size"], saved["configured_grad_accum"]) != (batch_size, grad_accum):
        return grad_accum, (f"{head}: batch settings changed, global batch {target} -> {new}"
                            if new != target else head if moved else None)
    if target % (batch_size * world) == 0:
        accum = target // (batch_size * world)
        return accum, (f"{head}: grad_accum {grad_accum} -> {accum} keeps the global batch at "
                       f"{target}" if accum != grad_accum else head if moved else None)
    return grad_accum, (f"{head}: global batch {target} -> {new} ({target} is not a multiple "
                        f"of {batch_size} x {world} workers)")


def restore_state(engine, ema: EMA, directory: str, saved: dict, rank: int, world: int,
                  lr_scheduler) -> None:
    """Weights, moments, optimizer step, LR schedule and EMA from a checkpoint of any world
    size; raises naming the first tensor the checkpoint does not cover."""
    files = state_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no {STATE_DIR}/rank-*.safetensors (a checkpoint "
                                f"of an older t2v: finish it with that version or start afresh)")
    pieces = Pieces(files)

    def fill(name: str, start: int, out: Tensor) -> None:
        if pieces.fill(name, start, out) != out.numel():
            raise ValueError(f"{directory}: the checkpoint does not cover {name}@{start} "
                             f"({out.numel()} elements; saved by {saved.get('world')} workers)")

    _ensure_moments(engine)
    with torch.no_grad():
        for name, start, views in _pieces_of(engine, rank, world):
            for kind, view in views.items():
                fill(f"{kind}/{name}", start, view)
        for state in _base(engine).state.values():
            state["step"] = torch.tensor(float(saved["optimizer_step"]))
        for (name, start), t in ema.shadow.items():
            fill(f"ema/{name}", start, t)
        ema.updates = int(saved["ema_updates"])
        _rebuild_working_weights(engine, pieces)
    step = int(saved["step"])
    lr_scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        lr_scheduler.step()  # the LR of step `step`, as the uninterrupted run had it
    engine.global_steps, engine.global_samples = step, int(saved["samples"])
    engine.micro_steps = step * engine.gradient_accumulation_steps()


def _rebuild_working_weights(engine, pieces: Pieces) -> None:
    """From the restored fp32 master pieces to the weights forward uses, DeepSpeed's way."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3, as its universal loader does
        for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
            if fp32.numel():
                opt.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)
            flats = opt.unflatten(opt.fp16_partitioned_groups_flat[i],
                                  opt.fp16_partitioned_groups[i])
            for part, q in zip(opt.fp16_partitioned_groups[i], flats, strict=True):
                part.data = q.data
        opt.checkpoint_event_epilogue()  # re-gathers the persistent (small, unsplit) parameters
    elif hasattr(opt, "update_lp_params"):  # ZeRO-1/2, bf16: fp32 pieces -> bit16, all-gather
        opt.update_lp_params()
    else:  # ZeRO-0: every rank holds whole weights (+ fp32 masters in bf16) and moments
        base, masters = _base(engine), _masters(engine)
        for name, p in engine.module.named_parameters():
            if p.requires_grad:
                hp = masters.get(p, p)
                hp.data.copy_(pieces.whole(f"param/{name}", p.numel()).view_as(hp))
                p.data.copy_(hp.data)
                for key in MOMENTS:
                    base.state[hp][key].copy_(pieces.whole(f"{key}/{name}", p.numel()).view_as(hp))
