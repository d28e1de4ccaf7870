"""Damaged samples in the middle of a latent data set: a .npy that is not one, a truncated
member. The reader skips exactly those (naming shard and key on the log; training's pass check
counts them as missing) and every sample before and after them still flows."""

from __future__ import annotations

import io
import shutil
import tarfile

from t2v.data.latents import latent_stream
from t2v.data.shards import shard_uris


def damage(tar_path, member_suffix: str, index: int, how) -> str:
    """Rewrite `tar_path` with the `index`-th member ending in `member_suffix` replaced by
    how(bytes); returns that sample's key."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    hits = [i for i, (m, _) in enumerate(members) if m.name.endswith(member_suffix)]
    target = hits[index]
    member, data = members[target]
    members[target] = (member, how(data))
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return member.name[: -len(member_suffix) - 1]


def test_damaged_npy_members_are_skipped_and_the_rest_flows(ray_local, train_latents, tmp_path,
                                                            ledger):
    root = tmp_path / "latents"
    shutil.copytree(train_latents, root)
    shards = shard_uris(str(root))
    everything = {r["key"] for r in latent_stream(shards).iter_rows()}
    assert len(everything) == 5
    bad = {
        damage(shards[0], "latent.npy", 1, lambda b: b"\x93NUMPY not really" + b[20:]),
        damage(shards[1], "text.npy", 0, lambda b: b[: len(b) // 2]),  # cut short
    }
    rows = list(latent_stream(shards).iter_rows())
    assert {r["key"] for r in rows} == everything - bad
    for r in rows:
        assert r["latent"].ndim == 4 and r["text"].ndim == 2 and r["mask"].ndim == 1
        assert isinstance(r["caption"], str) and r["caption"]
    ledger(fault="damaged .npy members mid data set (latent stream)", injected=len(bad),
           survived=len(bad), lost=0, note="exactly the damaged samples skipped, the rest flows")
