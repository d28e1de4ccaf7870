"""WebDataset shards into Ray Data, read by us: a pass order training can name, damage named.

Ray's `read_webdataset` falls short of a training stream twice. Its per-pass file shuffle is
seeded by how many times the dataset has run, which starts again at 0 when Ray Train restarts
the workers or the run is resubmitted: a resumed run cannot read the pass it stopped in. And
its tar reader ends a shard quietly at a damaged header or a cut, so samples vanish unnamed.

Here a pass's shard order is `pass_order(seed, pass)`, where the pass is what the training
workers say it is (they restored it from their checkpoint) through a `PassClock` actor read when
Ray Data starts the execution (which may read several passes in a row); each shard is one read
task, read front to back by `read_tar_samples`, whose damage (a cut, a header that is not one,
fewer samples than `_index.json` lists) is one line naming the shard, printed and given to
`on_damage(uri, line)`, while every sample before it flows. Blocks are cut by row count and
bytes only (and split by whatever a `decode` function groups on, deterministically), so with Ray
Data's `preserve_order` the same passes give every worker the same batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from t2v import arrowfs, storage
from t2v.data.shards import DamagedShard, indexed_shards, read_tar_samples

BLOCK_ROWS = 16
"""Samples per block at most (a latent sample is ~100 KiB; a raw clip a few MiB)."""
BLOCK_BYTES = 64 << 20
"""Member bytes per block at most."""
READ_BUFFER = 8 << 20
"""Bytes per read from the store (one ranged GET on S3)."""


@ray.remote(num_cpus=0)
class PassClock:
    """Which passes over the data the next execution of a training stream reads: from the
    pass the training workers set, `passes` of them in a row (one execution for several
    passes spares a small data set Ray Data's start-up between passes). Every worker sets it
    before it starts iterating (all set the same value: the pass they restored, advanced
    since), and the datasource reads it when Ray Data starts the execution, which Ray's
    streaming split begins only once every worker asked."""

    def __init__(self, passes: int = 1) -> None:
        self.value, self.passes = 0, max(1, int(passes))

    def set(self, value: int) -> None:
        self.value = int(value)

    def get(self) -> tuple[int, int]:
        """(the first pass of the next execution, how many passes it reads)."""
        return self.value, self.passes


def pass_order(count: int, seed: int | None, pass_index: int) -> list[int]:
    """The shard order of pass `pass_index`: a permutation drawn from (seed, pass), the same
    on every machine and every run; None keeps the listed order."""
    if seed is None:
        return list(range(count))
    rng = np.random.default_rng([seed % 2**63, pass_index])
    return [int(i) for i in rng.permutation(count)]


def _blocks(rows: list[dict], columns: tuple[str, ...]) -> list[pa.Table]:
    data = {"__key__": pa.array([r["__key__"] for r in rows], pa.string()),
            "__url__": pa.array([r["__url__"] for r in rows], pa.string())}
    for c in columns:
        data[c] = pa.array([r.get(c) for r in rows], pa.large_binary())
    return [pa.table(data)]


Decode = Callable[[list[dict]], Iterable[pa.Table]]
"""Rows of raw members ({__key__, __url__, member: bytes or None}) -> the blocks a data set
holds, run in the read task: decoding there spares Ray Data a block of raw bytes per block
and a per-row map after it."""


def read_shard(uri: str, path: str, filesystem, columns: tuple[str, ...],
               expected: int | None, on_damage: Callable[[str, str], None] | None,
               decode: Decode | None = None) -> Iterator[pa.Table]:
    """One shard's samples as blocks of raw members (missing ones null), or as `decode` makes
    them of each block's rows. Damage ends the shard with one line naming it; a storage
    failure is a one-line StorageError."""
    emit = decode or functools.partial(_blocks, columns=columns)
    rows: list[dict] = []
    size, count, damage = 0, 0, None
    try:
        f = (open(path, "rb") if filesystem is None  # noqa: SIM115 - closed below
             else filesystem.open_input_stream(path, buffer_size=READ_BUFFER))
    except OSError as e:
        raise storage.storage_error(uri, e) from None
    try:
        for key, fields in read_tar_samples(f, uri):
            row = {"__key__": key, "__url__": uri}
            row.update((c, fields.get(c)) for c in columns)
            rows.append(row)
            count += 1
            size += sum(len(v) for v in fields.values())
            if len(rows) >= BLOCK_ROWS or size >= BLOCK_BYTES:
                yield from emit(rows)
                rows, size = [], 0
    except DamagedShard as e:
        damage = str(e)
    except OSError as e:
        raise storage.storage_error(uri, e) from None
    finally:
        f.close()
    if rows:
        yield from emit(rows)
    if damage is None and expected is not None and count < expected:
        damage = f"{uri}: {count} samples, {expected} listed in the index"
    if damage is not None:
        lost = f"; {expected - count} of its {expected} samples lost" if expected else ""
        message = f"damaged shard {damage}{lost}"
        print(f"[t2v] {message}", flush=True)
        if on_damage is not None:
            on_damage(uri, message)


class TarShards(Datasource):
    """WebDataset shards as rows {__key__, __url__, one binary column per member suffix}: one
    read task per shard and pass, pass after pass in `pass_order(seed, pass)` for the clock's
    passes."""

    def __init__(self, uris: list[str], columns: tuple[str, ...], seed: int | None = None,
                 clock=None, expected: dict[str, int] | None = None,  # noqa: ANN001 - an actor
                 on_damage: Callable[[str, str], None] | None = None,
                 decode: Decode | None = None) -> None:
        super().__init__()
        self.uris, self.columns, self.seed, self.clock = list(uris), tuple(columns), seed, clock
        self.expected, self.on_damage, self.decode = expected or {}, on_damage, decode
        self.filesystem, self.paths = arrowfs.pyarrow_paths(self.uris)

    def get_name(self) -> str:
        return "ReadTarShards"

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def passes(self) -> range:
        """The passes the next execution reads: the clock's, or pass 0 alone."""
        if self.clock is None:
            return range(1)
        first, count = ray.get(self.clock.get.remote())
        return range(int(first), int(first) + int(count))

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:  # noqa: ANN001, ARG002
        order = [i for p in self.passes() for i in pass_order(len(self.uris), self.seed, p)]
        tasks = []
        for i in order:
            uri = self.uris[i]
            expected = self.expected.get(uri.rsplit("/", 1)[-1])
            # No row count: a damaged shard or sample yields fewer rows than the index lists,
            # and Ray Data answers count() from this metadata without reading when it has one.
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[uri],
                                 exec_stats=None)
            read = functools.partial(read_shard, uri, self.paths[i], self.filesystem,
                                     self.columns, expected, self.on_damage, self.decode)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


def tar_dataset(uris: list[str], columns: tuple[str, ...], seed: int | None = None,
                clock=None,  # noqa: ANN001 - a PassClock handle
                on_damage: Callable[[str, str], None] | None = None,
                decode: Decode | None = None) -> ray.data.Dataset:
    """The shards `uris` (of one data set: the index beside them gives each one's sample
    count, checked as it is read) as a lazy Ray dataset of raw members, or of what `decode`
    makes of them."""
    root = uris[0].rsplit("/", 1)[0] if uris else ""
    listed = indexed_shards(root, uris) if uris else None
    expected = {s["name"]: int(s["samples"]) for s in listed or []}
    return ray.data.read_datasource(TarShards(uris, columns, seed, clock, expected, on_damage,
                                              decode),
                                    override_num_blocks=max(1, len(uris)))
