"""Our tar reader and Ray datasource: damage named, pass order chosen by the training workers,
and the same pass dealt to the same split in every execution (the basis of exact resumes)."""

from __future__ import annotations

import io
import shutil
import tarfile
import threading

import pytest

from t2v.data.shards import DamagedShard, read_tar_samples, shard_uris
from t2v.data.tarsource import PassClock, pass_order, tar_dataset

SIZE = 3000
RECORD = tarfile.BLOCKSIZE + 3072  # one member: its header and 3000 bytes padded to 512s


def _tar(samples: int = 4) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(samples):
            for ext in ("a.npy", "txt"):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = SIZE
                tar.addfile(info, io.BytesIO(bytes([i + 1]) * SIZE))
    return buf.getvalue()


def _read(data: bytes) -> tuple[list[str], str | None]:
    keys: list[str] = []
    try:
        for key, fields in read_tar_samples(io.BytesIO(data), "s/shard-000001.tar"):
            assert set(fields) == {"a.npy", "txt"} and len(fields["txt"]) == SIZE
            keys.append(key)
    except DamagedShard as e:
        return keys, str(e)
    return keys, None


def _bad_header(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at + 148: at + 156] = b"garbage!"  # the header's checksum field
    return bytes(out)


@pytest.mark.parametrize("cut,keys,says", [
    pytest.param(lambda d: d, 4, None, id="whole"),
    pytest.param(lambda d: d[: 8 * RECORD + 512], 4, None, id="one-end-block"),
    pytest.param(lambda d: d[: 8 * RECORD], 3, "cut at byte 28672", id="no-end-blocks"),
    pytest.param(lambda d: d[: 5 * RECORD + 100], 2, "cut at byte", id="mid-header"),
    pytest.param(lambda d: d[: 5 * RECORD + 700], 2, "inside member k2.txt", id="mid-data"),
    pytest.param(lambda d: _bad_header(d, 5 * RECORD), 2, "damaged tar header at byte 17920",
                 id="bad-header"),
    pytest.param(lambda d: d + b"\0" * 512 + b"trailing junk", 4, "after the end-of-archive",
                 id="trailing-junk"),
])
def test_a_damaged_tar_ends_with_a_line_naming_it_after_the_samples_before(cut, keys, says):
    got, error = _read(cut(_tar()))
    assert got == [f"k{i}" for i in range(keys)]  # a sample cut in half is not yielded
    if says is None:
        assert error is None
    else:
        assert error is not None and says in error and "s/shard-000001.tar" in error
        assert f"after {keys} complete samples" in error


def _info(name: str, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for k, v in fields.items():
        setattr(info, k, v)
    return info


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_our_reader_reads_what_tarfile_writes_long_names_and_pax_headers_included(fmt):
    """Members as tarfile itself reads them: long names (ustar prefix, GNU 'L', pax path),
    non-ASCII names (pax), directories and links skipped, sizes that are not multiples of 512."""
    deep = "d" * 60 + "/" + "e" * 60  # > 100 characters: a ustar prefix / GNU / pax name
    names = [f"{deep}/k0.mp4", f"{deep}/k0.txt", "k1.json", "k1.txt", "k2.x.npy"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["ä" * 10 + "/k3.txt", "k4." + "z" * 120]  # pax: utf-8; GNU/pax: long names
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        tar.addfile(_info("adir", type=tarfile.DIRTYPE))
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 1 + 517 * i
            tar.addfile(info, io.BytesIO(bytes([i + 1]) * info.size))
        tar.addfile(_info("k5.link", type=tarfile.SYMTYPE, linkname="k1.txt"))
    buf.seek(0)
    expected: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=buf) as tar:
        for m in tar.getmembers():
            if m.isfile():
                k, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
                expected.setdefault(k, {})[ext] = tar.extractfile(m).read()
    got = dict(read_tar_samples(io.BytesIO(buf.getvalue()), "s.tar"))
    assert got == expected and len(got) == (5 if fmt != tarfile.USTAR_FORMAT else 3)
    assert got["k2"]["x.npy"] == bytes([5]) * (1 + 517 * 4)


def test_a_damaged_pax_record_is_a_damaged_shard_not_a_crash():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("k0.txt", "k1." + "z" * 120):  # the second needs a pax header
            tar.addfile(_info(name, size=3), io.BytesIO(b"abc"))
    data = bytearray(buf.getvalue())
    at = data.index(b" path=")  # "LEN path=...": make LEN not a number
    data[at - 3:at] = b"x!?"
    keys, error = [], None
    try:
        for key, _ in read_tar_samples(io.BytesIO(bytes(data)), "s.tar"):
            keys.append(key)
    except DamagedShard as e:
        error = str(e)
    assert error is not None and "damaged pax header" in error and "s.tar" in error
    assert keys == [] and "after 0 complete samples" in error  # k0 is not known to be whole


def test_pass_order_is_a_permutation_drawn_from_seed_and_pass():
    orders = {p: pass_order(50, 7, p) for p in range(4)}
    assert all(sorted(o) == list(range(50)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) == 4  # every pass its own order
    assert pass_order(50, 7, 2) == orders[2]  # and the same one again, anywhere
    assert pass_order(50, 8, 2) != orders[2]
    assert pass_order(5, None, 3) == [0, 1, 2, 3, 4]
    assert len(pass_order(5, -1, 0)) == 5  # negative seeds are seeds too


def _split_keys(ds, n: int = 2) -> list[list[str]]:
    """One execution of `ds` through Ray's streaming split, each split read by its own thread
    (as by its own training worker): the keys each got, in order."""
    splits = ds.streaming_split(n, equal=True)
    got: list[list[str]] = [[] for _ in range(n)]

    def read(i: int) -> None:
        for batch in splits[i].iter_batches(batch_size=2, batch_format="numpy"):
            got[i] += [str(k) for k in batch["__key__"]]

    threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return got


def test_the_same_pass_deals_each_split_the_same_rows_and_the_clock_names_the_pass(
        ray_local, shapes_shards):
    import ray

    uris = shard_uris(shapes_shards)  # 24 clips in shards of 10, 10, 4
    clock = PassClock.remote()
    ds = tar_dataset(uris, ("txt",), seed=3, clock=clock)
    ds.context.execution_options.preserve_order = True
    ray.get(clock.set.remote(1))
    first, again = _split_keys(ds), _split_keys(ds)
    assert first == again  # every split, every row, in order
    assert sum(map(len, first)) == 24 and len(first[0]) == len(first[1])
    ray.get(clock.set.remote(2))
    other = _split_keys(ds)
    assert sorted(sum(other, [])) == sorted(sum(first, []))
    assert other != first  # pass 2 reads the shards in another order
    ray.get(clock.set.remote(1))
    assert _split_keys(ds) == first  # pass 1 again: a resumed run reads what it read


def test_a_truncated_shard_mid_data_set_is_named_and_counted(ray_local, shapes_shards,
                                                            tmp_path):
    from t2v.config import ReaderConfig
    from t2v.data.streaming import video_stream

    root = tmp_path / "shards"
    shutil.copytree(shapes_shards, root)
    uris = shard_uris(str(root))  # 24 clips in shards of 10, 10, 4
    whole = {r["__key__"] for r in tar_dataset(uris, ("txt",)).iter_rows()}
    middle = uris[1]
    data = (root / middle.rsplit("/", 1)[1]).read_bytes()
    (root / middle.rsplit("/", 1)[1]).write_bytes(data[: len(data) // 2])  # cut mid data set
    stream = video_stream(ReaderConfig(shards=str(root), frames=9), uris)
    keys = {r["key"] for r in stream.dataset.iter_rows()}
    lost = whole - keys
    assert 0 < len(lost) < 10 and keys < whole  # the shards before and after still flow
    (skip,) = stream.skipped()
    assert skip["url"] == middle and skip["key"] == "*"
    assert skip["reason"].startswith(f"damaged shard {middle}: ")
    assert f"; {len(lost)} of its 10 samples lost" in skip["reason"], skip
    assert stream.skip_counts() == {"damaged shard " + middle: 1}


def test_one_execution_reads_the_clocks_passes_in_a_row(ray_local, shapes_shards):
    import ray

    uris = shard_uris(shapes_shards)
    clock = PassClock.remote(2)
    ray.get(clock.set.remote(5))
    ds = tar_dataset(uris, ("txt",), seed=3, clock=clock)
    ds.context.execution_options.preserve_order = True
    keys = [r["__key__"] for r in ds.iter_rows()]
    assert len(keys) == 48 and sorted(keys[:24]) == sorted(keys[24:])  # passes 5 and 6
    by_shard = {u: {r["__key__"] for r in tar_dataset([u], ("txt",)).iter_rows()} for u in uris}
    for half, p in ((keys[:24], 5), (keys[24:], 6)):  # each in its own pass's shard order
        firsts = [next(u for u in uris if k in by_shard[u]) for k in half]
        assert list(dict.fromkeys(firsts)) == [uris[i] for i in pass_order(3, 3, p)]
