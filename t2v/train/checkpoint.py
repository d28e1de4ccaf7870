"""Training checkpoints that restore on any number of workers (thin orchestration over DeepSpeed).

Each rank writes `state/rank-R.safetensors`: its own piece of every trainable parameter's fp32
master weights, AdamW moments and EMA, one 1-D tensor per piece, keyed `KIND/NAME@START` (START:
the piece's offset in the flattened parameter). Rank 0 adds `trainer.json` (step, samples, the
optimizer's step count, shapes, world size). Nothing in the files depends on how the pieces were
cut, so a run saved by N workers restores on M: each rank reads, from every saved file where it
lies (local disk or S3, through Ray's checkpoint filesystem), just the byte ranges of the pieces it
owns now (`Pieces`: nothing downloaded whole, so W ranks read the checkpoint about once between
them, not W times), writes them into DeepSpeed's own buffers and lets DeepSpeed rebuild the
working weights (ZeRO-1/2: fp32 partition -> bit16 all-gather; ZeRO-3: fp32 partition -> partitioned parameters, persistent ones
re-gathered), as its universal-checkpoint loader does. The same path serves every resume, so
every resume test exercises it.

Which piece a rank owns: ZeRO-3, DeepSpeed's partition ([r * ceil(n / W), ...)); ZeRO-1/2 (and
DeepSpeed's bf16 optimizer), the fragment its flat partition holds (`_hp_mapping`); ZeRO-0 (plain
data parallel; in bf16 with per-parameter fp32 masters), an even split of the whole tensors every
rank holds. The EMA: see zero.py.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from t2v import arrowfs, storage
from t2v.train.schedule import EMA, step_count
from t2v.train.zero import is_partitioned, piece

STATE_DIR = "state"
MOMENTS = ("exp_avg", "exp_avg_sq")
KINDS = ("param", *MOMENTS)


# ----------------------------------------------------------------------------- reading pieces

# A ranged read costs a request (tens of ms on S3: megabytes of transfer), so reads of nearby
# pieces are merged across gaps up to GAP bytes, into reads of at most SPAN bytes, READERS at once.
GAP, SPAN, READERS = 1 << 20, 64 << 20, 8
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64}


@dataclass(frozen=True)
class Entry:
    """One stored tensor: elements [start, start + count) of NAME, at byte `offset` of `path`."""
    start: int
    count: int
    path: str
    offset: int
    dtype: torch.dtype


class Pieces:
    """Every `NAME@START` tensor of a set of safetensors files on a pyarrow filesystem (local
    disk or S3: Ray's checkpoint storage), read by element range with ranged reads of just the
    bytes asked for. No file is downloaded whole: a rank restoring 1/W of a checkpoint reads
    about 1/W of its bytes. `bytes_read` and `reads` count them.

    The safetensors layout is read directly (8-byte little-endian header size, JSON header of
    dtype / shape / data_offsets, then row-major data), so a range of elements is a range of
    bytes whatever the tensor's shape.
    """

    def __init__(self, fs, paths: list[str]) -> None:
        self.paths = paths
        self.files = {path: fs.open_input_file(path) for path in paths}
        self.total_bytes = sum(f.size() for f in self.files.values())
        self.bytes_read = self.reads = 0
        self.index: dict[str, list[Entry]] = {}
        for path, f in self.files.items():
            size = int.from_bytes(self._read(f, 0, 8), "little")
            header = json.loads(self._read(f, 8, size))
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in DTYPES:
                    raise ValueError(f"{path}: {key} is {meta['dtype']}, not a float tensor")
                name, _, at = key.rpartition("@") if "@" in key else (key, "", "0")
                count = math.prod(meta["shape"])
                self.index.setdefault(name, []).append(Entry(
                    int(at), count, path, 8 + size + meta["data_offsets"][0],
                    DTYPES[meta["dtype"]]))

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def _read(self, f, offset: int, nbytes: int) -> bytes:
        data = f.read_at(nbytes, offset)
        if len(data) != nbytes:
            raise ValueError(f"{self.paths[0]}...: truncated checkpoint file ({len(data)} of "
                             f"{nbytes} bytes at {offset})")
        self.bytes_read += nbytes
        self.reads += 1
        return data

    def read(self, requests: list[tuple[str, int, Tensor]]) -> None:
        """Fill each (name, start, 1-D out) with elements [start, start + out.numel()) of
        name; raises naming the first one the files do not cover."""
        # Every (file, byte range, destination) a request needs ...
        wants: dict[str, list[tuple[int, int, Entry, Tensor]]] = {}
        found = [0] * len(requests)
        for i, (name, start, out) in enumerate(requests):
            for e in self.index.get(name, []):
                lo, hi = max(e.start, start), min(e.start + e.count, start + out.numel())
                if lo < hi:
                    size = e.dtype.itemsize
                    wants.setdefault(e.path, []).append((
                        e.offset + (lo - e.start) * size, e.offset + (hi - e.start) * size, e,
                        out[lo - start:hi - start]))
                    found[i] += hi - lo
        for (name, start, out), got in zip(requests, found, strict=True):
            if got != out.numel():
                raise ValueError(f"{self.paths[0]}...: the checkpoint does not cover {name}@"
                                 f"{start} ({got} of {out.numel()} elements; saved by another "
                                 f"version or its files are missing)")
        # ... merged into few large reads per file, read concurrently, scattered as they land.
        runs: list[list] = []  # [path, lo, hi, parts]
        for path, parts in wants.items():
            parts.sort(key=lambda w: w[0])
            for part in parts:
                last = runs[-1] if runs and runs[-1][0] == path else None
                if last and part[0] - last[2] <= GAP and part[1] - last[1] <= SPAN:
                    last[2] = max(last[2], part[1])
                    last[3].append(part)
                else:
                    runs.append([path, part[0], part[1], [part]])

        def load(run: list) -> None:
            path, lo, hi, parts = run
            data = self._read(self.files[path], lo, hi - lo)
            with torch.no_grad():  # grad mode is per thread: this one's is on
                for a, b, e, dest in parts:
                    dest.copy_(torch.frombuffer(bytearray(data[a - lo:b - lo]), dtype=e.dtype))

        with ThreadPoolExecutor(READERS) as pool:
            list(pool.map(load, runs))

    def whole(self, name: str, count: int) -> Tensor:
        out = torch.empty(count, dtype=torch.float32)
        self.read([(name, 0, out)])
        return out


def open_checkpoint(fs, path: str) -> tuple[dict, Pieces]:
    """(trainer.json, the pieces of every rank's state file) of a checkpoint directory on a
    pyarrow filesystem, e.g. Ray's `Checkpoint.filesystem` / `.path`; nothing downloaded."""
    import pyarrow.fs as pafs  # noqa: PLC0415 - heavy; only checkpoint readers need it

    with fs.open_input_file(f"{path}/trainer.json") as f:
        saved = json.loads(f.read())
    listing = fs.get_file_info(pafs.FileSelector(f"{path}/{STATE_DIR}", allow_not_found=True))
    files = sorted(i.path for i in listing if i.is_file and i.base_name.startswith("rank-")
                   and i.base_name.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no {STATE_DIR}/rank-*.safetensors (a checkpoint of an "
                                f"older t2v: finish it with that version or start afresh)")
    return saved, Pieces(fs, files)


def open_uri(uri: str) -> tuple[dict, Pieces]:
    """`open_checkpoint` of a checkpoint directory given by URI (local path or s3://)."""
    import pyarrow.fs as pafs  # noqa: PLC0415 - heavy; only checkpoint readers need it

    fs, path = arrowfs.pyarrow_filesystem(uri)
    return open_checkpoint(fs or pafs.LocalFileSystem(), path)


@dataclass
class RunCheckpoint:
    """A `checkpoint_*` directory of a run, as found in storage."""

    name: str
    uri: str
    step: int | None
    """From its trainer.json; None when rank 0 never wrote it."""
    world: int | None
    ranks: int
    """state/rank-*.safetensors present."""
    registered: bool
    """Listed in Ray Train's checkpoint_manager_snapshot.json (Ray restores only these)."""

    @property
    def complete(self) -> bool:
        return self.step is not None and self.ranks == self.world


def run_checkpoints(run_uri: str) -> list[RunCheckpoint]:
    """Every checkpoint directory of the run at `run_uri`, complete or not, by step.

    A driver killed after the workers uploaded a checkpoint but before Ray registered it leaves
    a complete checkpoint Ray does not know (it would resume from the one before); a kill during
    the upload leaves an incomplete one. Both are found here by listing, not from Ray's snapshot.
    """
    files: dict[str, list[str]] = {}
    for uri in storage.list_prefix(run_uri):
        rel = uri[len(run_uri.rstrip("/")) + 1:]
        head, _, rest = rel.partition("/")
        if head.startswith("checkpoint_") and rest:
            files.setdefault(head, []).append(rest)
    snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")
    registered = set()
    if storage.exists(snapshot):
        results = json.loads(storage.read_text(snapshot)).get("checkpoint_results") or []
        registered = {r.get("checkpoint_dir_name") for r in results}
    out = []
    for name, rels in files.items():
        uri = storage.join(run_uri, name)
        step = world = None
        if "trainer.json" in rels:
            saved = json.loads(storage.read_text(storage.join(uri, "trainer.json")))
            step, world = int(saved["step"]), int(saved["world"])
        ranks = sum(1 for r in rels if r.startswith(f"{STATE_DIR}/rank-")
                    and r.endswith(".safetensors"))
        out.append(RunCheckpoint(name, uri, step, world, ranks, name in registered))
    return sorted(out, key=lambda c: (c.step is None, c.step or 0, c.name))


def open_local(directory: str | Path) -> tuple[dict, Pieces]:
    import pyarrow.fs as pafs  # noqa: PLC0415 - heavy; only checkpoint readers need it

    return open_checkpoint(pafs.LocalFileSystem(), str(Path(directory).absolute()))


def read_whole(directory: str | Path, kind: str = "param") -> dict[str, Tensor]:
    """Whole tensors of one kind (param, exp_avg, exp_avg_sq, ema) from a checkpoint directory."""
    saved, pieces = open_local(directory)
    return {name: pieces.whole(f"{kind}/{name}", math.prod(shape)).view(shape)
            for name, shape in saved["shapes"].items()}


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
            state["step"] = step_count(base, p, 0)
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
                  world: int, configured_accum: int, data_parallel: int | None = None,
                  data: dict | None = None) -> dict:
    """The trainer.json of a checkpoint. `data_parallel`: the replicas reading different samples
    (world / sequence_parallel; default world); `data`: where in the data the run is,
    {"pass": the pass over the data (0-based), "batches": micro-batches each replica took of
    it} (`data_position` reads it back)."""
    batch, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    dp = data_parallel or world
    return {"step": step, "samples": samples, "optimizer_step": optimizer_step(engine),
            "ema_updates": ema.updates, "world": world, "data_parallel": dp, "batch_size": batch,
            "grad_accum": accum, "configured_grad_accum": configured_accum,
            "global_batch": batch * accum * dp, "data": data or {"pass": 0, "batches": 0},
            "shapes": {name: list(shape) for name, shape in shapes.items()}}


def data_position(saved: dict | None, batch_size: int,
                  data_parallel: int) -> tuple[int, int, str | None]:
    """(the pass a resumed run reads, how many of its micro-batches each replica skips, a note
    when that is only approximate) for resuming `saved` with `data_parallel` replicas of
    `batch_size`. With the split the checkpoint's, the skip is exact: the pass is read again
    in the same order and the batches taken before are passed over. Another split deals the
    pass differently: the skip then passes over as many samples as were taken, not the same
    ones."""
    if not saved:
        return 0, 0, None
    if "data" not in saved:  # checkpoints from before positions were recorded
        return 0, 0, "the checkpoint records no data position: a new pass starts"
    pass_index, taken = int(saved["data"]["pass"]), int(saved["data"]["batches"])
    saved_dp = int(saved.get("data_parallel", saved["world"]))
    if (int(saved["batch_size"]), saved_dp) == (batch_size, data_parallel) or not taken:
        return pass_index, taken, None
    rows = taken * int(saved["batch_size"]) * saved_dp
    skip = rows // (batch_size * data_parallel)
    return pass_index, skip, (
        f"micro-batches of {saved_dp}x{saved['batch_size']} -> {data_parallel}x{batch_size} "
        f"samples: pass {pass_index} resumes after {skip * batch_size * data_parallel} of "
        f"the {rows} samples taken, not the same ones")


def elastic_accum(batch_size: int, grad_accum: int, saved: dict | None,
                  world: int, data_parallel: int | None = None) -> tuple[int, str | None]:
    """Gradient accumulation for resuming `saved` on `world` workers (`data_parallel` of them
    reading different samples: world / sequence_parallel; default world), with a note when the
    worker count or the global batch changes.

    Batch settings as configured before: accumulation makes up for the worker count, so the
    global batch (hence the optimisation) stays the run's; where it cannot (not a multiple),
    the configured accumulation is used and the note says so. Batch settings changed by the
    user: theirs, and the note gives the new global batch.
    """
    if not saved or "global_batch" not in saved:
        return grad_accum, None
    dp = data_parallel or world
    target, new = saved["global_batch"], batch_size * grad_accum * dp
    saved_dp = saved.get("data_parallel", saved["world"])
    moved = (saved["world"], saved_dp) != (world, dp)
    head = "resume"
    if moved:
        head = f"elastic resume, {saved['world']} -> {world} workers"
        if saved_dp != saved["world"] or dp != world:  # sequence parallel on either side
            head += f", data-parallel {saved_dp} -> {dp}"
    if (saved["batch_size"], saved["configured_grad_accum"]) != (batch_size, grad_accum):
        return grad_accum, (f"{head}: batch settings changed, global batch {target} -> {new}"
                            if new != target else head if moved else None)
    if target % (batch_size * dp) == 0:
        accum = target // (batch_size * dp)
        return accum, (f"{head}: grad_accum {grad_accum} -> {accum} keeps the global batch at "
                       f"{target}" if accum != grad_accum else head if moved else None)
    return grad_accum, (f"{head}: global batch {target} -> {new} ({target} is not a multiple "
                        f"of {batch_size} x {dp} "
                        f"{'workers' if dp == world else 'data-parallel groups'})")


def restore_state(engine, ema: EMA, saved: dict, pieces: Pieces, rank: int, world: int,
                  lr_scheduler) -> None:
    """Weights, moments, optimizer step, LR schedule and EMA from a checkpoint of any world
    size (`open_checkpoint`); raises naming the first tensor the checkpoint does not cover."""
    _ensure_moments(engine)
    opt = engine.optimizer
    partitioned = hasattr(opt, "fp32_partitioned_groups_flat") or hasattr(opt, "update_lp_params")
    with torch.no_grad():
        if partitioned:  # this rank's pieces of the fp32 masters and moments
            wants = [(f"{kind}/{name}", start, view)
                     for name, start, views in _pieces_of(engine, rank, world)
                     for kind, view in views.items()]
        else:  # ZeRO-0: every rank holds whole weights (+ fp32 masters in bf16) and moments
            base, masters = _base(engine), _masters(engine)
            pairs = [(p, masters.get(p, p), name) for name, p in engine.module.named_parameters()
                     if p.requires_grad]
            wants = [(f"{kind}/{name}", 0, (hp if kind == "param" else base.state[hp][kind])
                      .data.view(-1)) for _, hp, name in pairs for kind in KINDS]
        wants += [(f"ema/{name}", start, t) for (name, start), t in ema.shadow.items()]
        pieces.read(wants)  # one batch: merged ranged reads
        base = _base(engine)
        for p, state in base.state.items():
            state["step"] = step_count(base, p, saved["optimizer_step"])
        ema.updates = int(saved["ema_updates"])
        if partitioned:
            _rebuild_working_weights(opt)
        else:
            for p, hp, _ in pairs:
                if p is not hp:  # bf16 weights from the fp32 masters
                    p.data.copy_(hp.data)
    step = int(saved["step"])
    lr_scheduler.last_epoch = step - 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": intended here
        warnings.simplefilter("ignore")
        lr_scheduler.step()  # the LR of step `step`, as the uninterrupted run had it
    engine.global_steps, engine.global_samples = step, int(saved["samples"])
    engine.micro_steps = step * engine.gradient_accumulation_steps()


def _rebuild_working_weights(opt) -> None:
    """ZeRO-1/2/3: from the restored fp32 master pieces to the weights forward uses, DeepSpeed's
    way."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3, as its universal loader does
        for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
            if fp32.numel():
                opt.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)
            flats = opt.unflatten(opt.fp16_partitioned_groups_flat[i],
                                  opt.fp16_partitioned_groups[i])
            for part, q in zip(opt.fp16_partitioned_groups[i], flats, strict=True):
                part.data = q.data
        opt.checkpoint_event_epilogue()  # re-gathers the persistent (small, unsplit) parameters
    else:  # ZeRO-1/2, bf16: fp32 pieces -> bit16, all-gather
        opt.update_lp_params()
