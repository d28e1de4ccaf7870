"""Raw shards: WebDataset tars of KEY.mp4 / KEY.txt / KEY.json, plus `_index.json` written last.

Pure (no Ray): the writer and the index are used by `t2v data synth`, by the pack job's tasks
and by the latent encoder. A shard becomes visible only when complete (storage.atomic_local_file),
so a reader that lists `shard-*.tar` never sees a half-written tar.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from t2v import storage

INDEX_NAME = "_index.json"
SHARD_PATTERN = "shard-{:06d}.tar"
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


def shard_name(i: int) -> str:
    return SHARD_PATTERN.format(i)


def safe_key(text: str) -> str:
    """A WebDataset key: no dots (the first dot starts the extension) and no slashes."""
    key = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")
    return key or "sample"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic tars: same samples -> same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(uri: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write one complete tar at `uri` atomically; returns the number of samples written."""
    n = 0
    with storage.atomic_local_file(uri, suffix=".tar") as tmp, tarfile.open(tmp, "w") as tar:
        for key, fields in samples:
            if not _KEY_OK.match(key):
                raise ValueError(f"shard {uri}: bad sample key {key!r} (use safe_key)")
            for ext, data in sorted(fields.items()):
                _add_member(tar, f"{key}.{ext}", data)
            n += 1
    return n


@dataclass
class ShardWriter:
    """Rolls samples into `out/shard-000000.tar`, ... of `shard_size` samples each.

    Buffers one shard in memory (a shard is small by design: tens of MB), then writes it
    atomically. `close()` writes `_index.json` last, which marks the data set complete.
    """

    out: str
    shard_size: int = 64
    start_index: int = 0
    extra_index: dict = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)
    _pending: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        self._pending.append((key, fields))
        if len(self._pending) >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        name = shard_name(self.start_index + len(self.shards))
        n = write_shard(storage.join(self.out, name), self._pending)
        self.shards.append({"name": name, "samples": n})
        self._pending = []

    def close(self) -> dict:
        self._flush()
        return write_index(self.out, self.shards, **self.extra_index)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def write_index(out: str, shards: list[dict], **extra) -> dict:
    index = {
        "format": "t2v-shards-v1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "total": sum(s["samples"] for s in shards),
        "shards": sorted(shards, key=lambda s: s["name"]),
        **extra,
    }
    storage.write_text(storage.join(out, INDEX_NAME), json.dumps(index, indent=1))
    return index


def read_index(root: str) -> dict:
    """The data set's index, or StorageError naming the missing `_index.json`."""
    return json.loads(storage.read_text(storage.join(root, INDEX_NAME)))


def indexed_shards(root: str, uris: list[str]) -> list[dict] | None:
    """The index entries (name, samples, buckets) of the shards `uris` of the data set at
    `root`; None when it has no index."""
    if not storage.exists(storage.join(root, INDEX_NAME)):
        return None
    wanted = {u.rsplit("/", 1)[-1] for u in uris}
    return [s for s in read_index(root).get("shards", []) if s.get("name") in wanted]


def index_samples(shards: list[dict] | None) -> int | None:
    """Samples the index lists for these entries (`indexed_shards`); None without an index."""
    return None if shards is None else sum(int(s.get("samples", 0)) for s in shards)


def bucket_counts(shards: list[dict] | None) -> dict[str, int]:
    """Samples per bucket (FRAMESxHEIGHTxWIDTH) in these index entries (`indexed_shards`; pack
    --buckets and encode record them per shard); {} when they record none."""
    counts: dict[str, int] = {}
    for shard in shards or []:
        for name, n in (shard.get("buckets") or {}).items():
            counts[name] = counts.get(name, 0) + int(n)
    return dict(sorted(counts.items()))


def shard_uris(root: str) -> list[str]:
    """Complete shards of a data set: from `_index.json` when present, else by listing."""
    if storage.exists(storage.join(root, INDEX_NAME)):
        return [storage.join(root, s["name"]) for s in read_index(root)["shards"]]
    return storage.list_prefix(root, suffix=".tar")


class DamagedShard(tarfile.TarError):
    """A tar that ends inside a member, before its end-of-archive blocks, or at a header that is
    not one. The samples before the damage were yielded; the message names the shard, the byte
    and how many samples came out of it."""


class _Tail:
    """A read-only file object that counts what it hands out and keeps the last `keep` bytes,
    so that where tarfile stopped reading can be looked at afterwards."""

    def __init__(self, raw, keep: int = 1 << 16) -> None:
        self.raw, self.keep, self.pos = raw, keep, 0
        self.chunks: deque[bytes] = deque()  # the last reads, >= `keep` bytes in all
        self.held = 0

    def read(self, n: int = -1) -> bytes:
        data = bytes(self.raw.read() if n is None or n < 0 else self.raw.read(n))
        self.pos += len(data)
        self.chunks.append(data)  # kept by reference: no copy on the read path
        self.held += len(data)
        while self.held - len(self.chunks[0]) >= self.keep:
            self.held -= len(self.chunks.popleft())
        return data

    def rest_after(self, since: int) -> tuple[bool, bool, int]:
        """(the 512 bytes from offset `since` are a zero block, every byte from `since` to the
        end of the file is zero, the file's size); reads the file to its end."""
        back = self.pos - since
        tail = b"".join(self.chunks)
        if back > len(tail):  # cannot happen with tarfile's 10 KiB read-ahead
            return False, False, self.pos
        after = tail[len(tail) - back:] if back > 0 else b""
        while len(after) < tarfile.BLOCKSIZE and (chunk := self.read(tarfile.BLOCKSIZE)):
            after += chunk
        ended = len(after) >= tarfile.BLOCKSIZE and not after[:tarfile.BLOCKSIZE].strip(b"\0")
        clean = not after.strip(b"\0")
        while chunk := self.raw.read(1 << 20):
            self.pos += len(chunk)
            clean = clean and not bytes(chunk).strip(b"\0")
        return ended, clean, self.pos


def read_tar_samples(fileobj, source: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a tar read front to back (`fileobj` needs only `read`: a local file or an S3
    stream), members grouped by key (the members of a key are contiguous).

    Python's tarfile ends a stream quietly at a header that is not one, or at a cut between
    members; here either is a `DamagedShard` (after the samples before it): a well-formed tar
    ends with zero blocks and nothing else. A sample whose members the damage cuts off is not
    yielded."""
    stream = _Tail(fileobj)
    key: str | None = None
    fields: dict[str, bytes] = {}
    count, name = 0, None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                name = member.name
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                k, _, ext = base.partition(".")
                if k != key and key is not None:
                    yield key, fields
                    count, fields = count + 1, {}
                key = k
                f = tar.extractfile(member)
                data = f.read() if f else b""
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                fields[ext] = data
            end = tar.offset
    except tarfile.ReadError as e:  # a cut inside a member's data
        raise DamagedShard(f"{source}: damaged inside member {name} ({e}) after {count} "
                           "complete samples") from None
    ended, clean, size = stream.rest_after(end)
    if ended and key is not None:  # the tar ended properly: its last sample is whole
        yield key, fields
        count += 1
    if size - end < tarfile.BLOCKSIZE:
        raise DamagedShard(f"{source}: cut at byte {size}, before the end-of-archive blocks, "
                           f"after {count} complete samples")
    if not clean:
        raise DamagedShard(
            f"{source}: " + (f"data after the end-of-archive blocks at byte {end} (not read)"
                             if ended else f"a damaged tar header at byte {end}")
            + f" after {count} complete samples")


def iter_tar_samples(tar_path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of a local tar (`read_tar_samples`: damage is a `DamagedShard`)."""
    with open(tar_path, "rb") as f:
        yield from read_tar_samples(f, str(tar_path))


def iter_shard_samples(uris: Iterable[str]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of many shards at any URI (S3 shards are fetched to a temp file one at a time)."""
    for uri in uris:
        with ExitStack() as stack:
            path = stack.enter_context(storage.local_copy(uri))
            yield from iter_tar_samples(path)
