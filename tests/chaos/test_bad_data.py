"""Damaged data in the middle of a latent data set: a .npy that is not one, a truncated member,
a tar cut in half. The reader skips exactly those (naming shard and key, or the shard, on the
log) and every sample before and after them still flows; a training run over them finishes,
and each pass's check against the index counts what was lost."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from t2v import storage
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


@pytest.mark.chaos_full
def test_training_over_a_cut_tar_and_a_bad_npy_finishes_and_counts_them(
        chaos_latents, debug_vae_package, tmp_path, ledger):
    from t2v.train.trainer import run_train
    from tests.test_train import config

    root = tmp_path / "latents"
    shutil.copytree(chaos_latents, root)
    shards = shard_uris(str(root))[:-1]  # the 4 training shards of 4 samples
    everything = {r["key"] for r in latent_stream(shards).iter_rows()}
    cut = root / shards[1].rsplit("/", 1)[1]
    data = cut.read_bytes()
    with tarfile.open(cut) as tar:  # cut inside the third sample's first member
        members = [m for m in tar.getmembers() if m.isfile()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    third = next(m for m in members if m.name.split(".")[0] == keys[2])
    cut.write_bytes(data[: third.offset_data + 10])
    bad = damage(shards[2], "latent.npy", 3, lambda b: b"\x93NUMPY not really" + b[20:])
    flowing = {r["key"] for r in latent_stream(shards).iter_rows()}
    lost = len(everything) - len(flowing)
    assert lost == 3 and bad not in flowing  # 2 cut off, 1 damaged; 13 flow
    out = str(tmp_path / "runs")
    result = run_train(config(out, "bad", str(root), debug_vae_package, max_failures=0,
                              steps=7, ckpt_every=7, val_every=7, val_samples=0,
                              **{"data.passes_per_read": 1}))  # a check per pass
    assert result["step"] == 7
    rows = [json.loads(x) for x in storage.read_text(
        storage.join(out, "bad", "metrics.jsonl")).splitlines()]
    passes = [r for r in rows if r.get("event") == "pass"]
    assert len(passes) == 2, rows  # 13 samples: 3 batches of 2 per worker, 3 steps a pass
    for p in passes:  # Ray's equal split drops at most one row per worker more
        assert p["index_rows"] == 16 and lost <= p["missing"] < lost + 2, p
    ledger(fault="a cut tar and a damaged .npy mid data set (DiT training run)", injected=2,
           survived=2, lost=0, note=f"{lost} damaged samples skipped and counted each pass; "
                                    "the run finished")
