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


def check_captions(value: object) -> list[str]:
    """`value` as a sample's `captions` field (its alternative captions); ValueError naming the
    field when it is not a list of strings."""
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValueError("captions: expected a list of strings")
    return value


def other_captions(meta: dict, caption: str) -> list[str]:
    """A raw sample's alternative captions: its json `captions` (`check_captions`), stripped,
    without blanks, repeats or the caption itself. ValueError names the field when it is not a
    list of strings."""
    try:
        alternatives = check_captions(meta.get("captions", []))
    except ValueError as e:
        raise ValueError(f"json {e}") from None
    return [a for a in dict.fromkeys(a.strip() for a in alternatives) if a and a != caption]


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


BLOCK = tarfile.BLOCKSIZE
_REGULAR = (b"0", b"\0", b"7")
"""Type flags of members with file data (regular, old-style regular, contiguous)."""


def _number(field: bytes) -> int:
    """A tar header number: octal digits (NUL/space padded), or base-256 when the top bit of
    the first byte is set (GNU, for sizes of 8 GiB and up)."""
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    if field[0] & 0x80:
        raise ValueError("a negative base-256 number")
    digits = field.split(b"\0", 1)[0].strip()
    return int(digits, 8) if digits else 0


def _header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type flag) of a 512-byte header, or None when it is not one (its checksum,
    the sum of its bytes with the checksum field as spaces, signed or not, does not match)."""
    try:
        stored = _number(block[148:156])
    except ValueError:
        return None
    unsigned = sum(block) - sum(block[148:156]) + 8 * 32
    if stored != unsigned and stored != unsigned - 256 * sum(  # some writers sum signed bytes
            1 for b in block[:148] + block[156:] if b & 0x80):
        return None
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and (prefix := block[345:500].split(b"\0", 1)[0]):
        name = prefix + b"/" + name
    try:
        size = _number(block[124:136])
    except ValueError:
        return None
    return name.decode("utf-8", "surrogateescape"), size, block[156:157]


def _pax(data: bytes) -> dict[str, str]:
    """A pax extended header's records ("LEN key=value\\n" each)."""
    out, i = {}, 0
    while i < len(data) and data[i:i + 1] not in (b"", b"\0"):
        length = int(data[i:data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1:i + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        i += length
    return out


def _member_data(fileobj, size: int, name: str, source: str, count: int) -> bytes:
    """A member's `size` bytes and the padding to the next 512 after them."""
    data = bytes(fileobj.read(size)) if size else b""
    padding = -size % BLOCK
    if len(data) < size or len(fileobj.read(padding)) < padding:
        raise DamagedShard(f"{source}: damaged inside member {name} (unexpected end of data) "
                           f"after {count} complete samples")
    return data


def read_tar_samples(fileobj, source: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of a tar read front to back (`fileobj` needs only `read`: a local file or an S3
    stream), members grouped by key (the members of a key are contiguous).

    Our own reader of ustar, GNU (long names) and pax headers: Python's tarfile ends a stream
    quietly at a header that is not one, or at a cut between members, and spends ~70 us a
    member parsing fields we do not use. Here either damage is a `DamagedShard` (after the
    samples before it): a well-formed tar ends with a zero block and nothing but zeros after
    it. A sample whose members the damage cuts off is not yielded."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    count, offset = 0, 0
    long_name: str | None = None  # from a GNU 'L' member or a pax header, for the next member
    long_size: int | None = None
    while True:
        block = bytes(fileobj.read(BLOCK))
        if len(block) < BLOCK:
            raise DamagedShard(f"{source}: cut at byte {offset + len(block)}, before the "
                               f"end-of-archive blocks, after {count} complete samples")
        if not block.strip(b"\0"):  # the end-of-archive block
            break
        header = _header(block)
        if header is None:
            raise DamagedShard(f"{source}: a damaged tar header at byte {offset} after "
                               f"{count} complete samples")
        name, size, kind = header
        offset += BLOCK
        if kind in (b"L", b"x", b"X"):  # GNU long name, pax header: about the next member
            data = _member_data(fileobj, size, name, source, count)
            offset += size + -size % BLOCK
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                try:
                    records = _pax(data)
                    long_size = int(records["size"]) if "size" in records else None
                except ValueError:  # a record whose length or size is not a number
                    raise DamagedShard(f"{source}: a damaged pax header at byte {offset - BLOCK}"
                                       f" after {count} complete samples") from None
                long_name = records.get("path", long_name)
            continue
        name, size = long_name or name, size if long_size is None else long_size
        long_name, long_size = None, None
        if kind in _REGULAR:
            k, _, ext = name.rsplit("/", 1)[-1].partition(".")
            if k != key and key is not None:  # the previous sample is whole
                yield key, fields
                count, fields = count + 1, {}
            key = k
        data = _member_data(fileobj, size, name, source, count)  # directories, links: skipped
        offset += size + -size % BLOCK
        if kind in _REGULAR:
            fields[ext] = data
    end = offset
    clean = True
    while chunk := fileobj.read(1 << 20):
        clean = clean and not bytes(chunk).strip(b"\0")
    if key is not None:  # the tar ended properly: its last sample is whole
        yield key, fields
        count += 1
    if not clean:
        raise DamagedShard(f"{source}: data after the end-of-archive blocks at byte {end} "
                           f"(not read) after {count} complete samples")


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
