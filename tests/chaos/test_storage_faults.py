"""Object storage faults, caused by the S3 endpoint itself: every S3 request of the session goes
through tests/chaos/proxy.py, which here throttles (503 SlowDown), resets connections and stalls,
or goes down for good. Transient faults must cost nothing but time; a permanent outage must end
the job with one line naming the URI and leave nothing half-written at a final key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from t2v import storage
from t2v.render import manifest as mf
from t2v.render.pipeline import run_render_command
from tests.chaos.proxy import Request
from tests.conftest import ROOT
from tests.s3_fixtures import copy_tree
from tests.test_pack import video_folder  # noqa: F401 - a fixture
from tests.test_render import check_video, config, ok_rows

TRANSIENT = {"kinds": ("503", "reset", "stall"), "every": 4, "stall_s": 0.3}
"""Every 4th request fails or stalls: a store far worse than S3 on a bad day."""


def upstream(moto_s3):
    """A client straight to moto, past the proxy: what really is in the bucket."""
    import boto3

    from tests.s3_fixtures import SECRETS

    return boto3.client("s3", endpoint_url=moto_s3.proxy.upstream, region_name="us-east-1",
                        aws_access_key_id=SECRETS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"],
                        aws_session_token=SECRETS["AWS_SESSION_TOKEN"])


def leftovers(moto_s3, bucket_uri: str) -> tuple[list[str], list[str]]:
    """(temporary or partial objects, unfinished multipart uploads) in the bucket."""
    client, bucket = upstream(moto_s3), bucket_uri[5:]
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return ([k for k in keys if storage.TMP_PREFIX in k.rsplit("/", 1)[-1]],
            [u["Key"] for u in uploads])


def injected_during(proxy, before: Counter) -> dict:
    return {k: proxy.injected[k] - before[k] for k in proxy.injected}


def write_prompts(bucket: str, n: int) -> str:
    uri = f"{bucket}/in/prompts.txt"
    storage.write_bytes(uri, "".join(f"chaos shape {i}\n" for i in range(n)).encode())
    return uri


def test_render_to_s3_through_throttling_resets_and_stalls(ray_local, render_package, moto_s3,
                                                           s3_bucket, ledger):
    """Package, prompts and output in reach of a store that fails every 4th request: every
    video is rendered and recorded exactly once, nothing temporary is left."""
    n = 6
    prompts = write_prompts(s3_bucket, n)
    out = f"{s3_bucket}/out"
    before = Counter(moto_s3.proxy.injected)
    with moto_s3.proxy.faults(**TRANSIENT):
        summary = run_render_command(config(render_package, prompts, out))
    hit = injected_during(moto_s3.proxy, before)
    assert all(hit.get(k, 0) > 0 for k in TRANSIENT["kinds"]), hit
    assert (summary["rendered"], summary["failed"], summary["total_ok"]) == (n, 0, n)
    ids = [r["id"] for r in ok_rows(out)]
    assert len(ids) == len(set(ids)) == n
    for row in ok_rows(out):
        check_video(row)
    assert leftovers(moto_s3, s3_bucket) == ([], [])
    ledger(fault="S3 503/reset/stall every 4th request (render)", injected=sum(hit.values()),
           survived=sum(hit.values()), lost=0)


def test_multipart_upload_that_cannot_finish_is_aborted(moto_s3, s3_bucket, tmp_path,
                                                        monkeypatch, ledger):
    """Parts refused until the client gives up: one line naming the URI, no object at the
    final key, no multipart upload left behind (it would be billed storage); then the store
    recovers and the same upload goes through. Refused with S3's 500 InternalError: after a 503
    SlowDown on every part botocore's adaptive client waits 1-3 s before each request (the
    throttling tests show that): this test took 11.1 s with 503s, 1.0 s with 500s (AVX2 EPYC)."""
    monkeypatch.setenv(storage.PART_MIB_ENV, "5")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # give up quickly
    storage.clear_client_cache()
    data = os.urandom(12 * 2**20)  # 3 parts
    (tmp_path / "big").write_bytes(data)
    uri = f"{s3_bucket}/models/big.safetensors"
    before = Counter(moto_s3.proxy.injected)
    try:
        with moto_s3.proxy.faults(kinds=("500",), every=1, match=Request.is_upload_part.fget):
            with pytest.raises(storage.StorageError) as e:
                storage.upload_file(tmp_path / "big", uri)
        assert str(e.value).startswith(uri) and "\n" not in str(e.value), e.value
        assert not storage.exists(uri)
        assert leftovers(moto_s3, s3_bucket) == ([], [])
        storage.upload_file(tmp_path / "big", uri)
        assert storage.read_bytes(uri) == data
    finally:
        storage.clear_client_cache()
    hit = injected_during(moto_s3.proxy, before)
    ledger(fault="S3 refuses every upload part (permanent)", injected=sum(hit.values()),
           survived=1, lost=0, note="one-line error, upload aborted, retried later: complete")


@pytest.mark.chaos_full
def test_s3_gone_mid_render_ends_in_one_line_and_a_rerun_finishes(
        ray_cluster, render_package, moto_s3, s3_bucket, ledger):
    """`t2v render` (the CLI, on the session cluster) loses its store for good after 3 videos:
    it stops with a summary line and one error line naming the URI (no Ray traceback), exit 2.
    The store comes back; the same command renders the rest: every prompt exactly once."""
    n = 10
    prompts = write_prompts(s3_bucket, n)
    out = f"{s3_bucket}/out"
    cmd = [sys.executable, "-m", "t2v.cli", "render", f"model={render_package}",
           f"prompts={prompts}", f"out={out}", "steps=2", "batch_size=1"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address, "PYTHONPATH": str(ROOT)}
    video_put = lambda r: r.method == "PUT" and "/out/videos/" in r.path  # noqa: E731
    moto_s3.proxy.outage("reset", after=3, trigger=video_put)
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    finally:
        moto_s3.proxy.restore()
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert err[-1].startswith(f"t2v render: error: {out}/"), err[-5:]
    assert "Traceback" not in r.stderr and "UDF failed" not in r.stderr, r.stderr[-3000:]
    assert "[render] done:" in r.stdout and "summary.json not written" in r.stdout, r.stdout
    written = {k.rsplit("/", 1)[1] for k in storage.list_prefix(f"{out}/videos")}
    assert 3 <= len(written) < n  # what was written is whole (atomic puts)
    assert leftovers(moto_s3, s3_bucket) == ([], [])

    summary = run_render_command(config(render_package, prompts, out, batch_size=1))
    assert summary["total_ok"] == n and summary["failed"] == 0
    ids = [row["id"] for row in ok_rows(out)]
    assert len(ids) == len(set(ids)) == n
    for row in ok_rows(out):
        check_video(row)
    assert json.loads(storage.read_text(f"{out}/{mf.SUMMARY_NAME}"))["total_ok"] == n
    assert leftovers(moto_s3, s3_bucket) == ([], [])
    ledger(fault="S3 gone for good mid-render (connection resets)", injected=1, survived=1,
           lost=0, note=f"exit 2, {len(err)} stderr lines, last names the URI; rerun completes")


@pytest.mark.chaos_full
def test_pack_and_encode_through_a_faulty_store(
        ray_local, moto_s3, s3_bucket, train_raw, train_latents, debug_vae_package, ledger,
        video_folder):  # noqa: F811 - the fixture imported above
    """Source videos, raw shards and latent shards in S3, every 4th request failing or
    stalling (Ray Data's reads through Arrow, our writes through boto3): the same clips are
    packed and encoded as without faults, and no temporary object is left."""
    from t2v.config import EncodeConfig, PackConfig
    from t2v.data.encode import run_encode
    from t2v.data.pack import run_pack
    from t2v.data.shards import read_index

    src = copy_tree(str(video_folder), storage.join(s3_bucket, "videos"))
    raw = copy_tree(train_raw, f"{s3_bucket}/raw")
    before = Counter(moto_s3.proxy.injected)
    with moto_s3.proxy.faults(**TRANSIENT):
        packed = run_pack(PackConfig(src=src, out=f"{s3_bucket}/shards", shard_size=4,
                                     frames=8, size=[32, 32]))
        encoded = run_encode(EncodeConfig(src=raw, out=f"{s3_bucket}/latents",
                                          vae=debug_vae_package, batch_size=4))
    hit = injected_during(moto_s3.proxy, before)
    assert all(hit.get(k, 0) > 0 for k in TRANSIENT["kinds"]), hit
    assert (packed["packed"], packed["skipped"]) == (6, 4), packed  # as without faults
    want = read_index(train_latents)
    got = read_index(f"{s3_bucket}/latents")
    assert [s["samples"] for s in got["shards"]] == [s["samples"] for s in want["shards"]]
    assert encoded.get("skipped", 0) == 0, encoded
    assert leftovers(moto_s3, s3_bucket) == ([], [])
    ledger(fault="S3 503/reset/stall every 4th request (pack + encode)",
           injected=sum(hit.values()), survived=sum(hit.values()), lost=0)


@pytest.mark.chaos_full
def test_training_streams_and_checkpoints_through_a_faulty_store(
        debug_run, train_latents, debug_vae_package, moto_s3, s3_bucket, ledger):
    """Latents, checkpoints, metrics, TensorBoard and the package in S3, every 4th request
    failing or stalling: the run's losses are the fault-free reference's, step for step."""
    from t2v.train.trainer import run_train
    from tests.test_train import STEPS, assert_same_losses
    from tests.test_train import config as train_config

    shards = copy_tree(train_latents, f"{s3_bucket}/latents")
    runs = f"{s3_bucket}/runs"
    before = Counter(moto_s3.proxy.injected)
    with moto_s3.proxy.faults(**TRANSIENT):
        result = run_train(train_config(runs, "faulty", shards, debug_vae_package))
    hit = injected_during(moto_s3.proxy, before)
    assert all(hit.get(k, 0) > 0 for k in TRANSIENT["kinds"]), hit
    assert result["step"] == STEPS
    assert_same_losses(f"{runs}/faulty", storage.join(debug_run.out, "debug"),
                       range(1, STEPS + 1))
    assert storage.exists(f"{runs}/faulty/package/model.json")
    assert leftovers(moto_s3, s3_bucket) == ([], [])
    ledger(fault="S3 503/reset/stall every 4th request (training: data, checkpoints, package)",
           injected=sum(hit.values()), survived=sum(hit.values()), lost=0)


@pytest.mark.chaos_full
def test_pack_with_the_store_gone_ends_in_one_line_and_a_rerun_completes(
        ray_local, moto_s3, s3_bucket, ledger,
        video_folder):  # noqa: F811 - the fixture imported above
    """The store goes away (connections reset) once a few source videos were read: pack stops
    with one line naming a URI (a vanished store is not a skipped clip), writes no index; the
    store comes back and the same command packs what a fault-free run packs."""
    from t2v.config import PackConfig
    from t2v.data.pack import run_pack

    src = copy_tree(str(video_folder), storage.join(s3_bucket, "videos"))
    cfg = PackConfig(src=src, out=f"{s3_bucket}/shards", shard_size=4, frames=8, size=[32, 32])
    get_video = lambda r: r.method == "GET" and "/videos/" in r.path  # noqa: E731
    moto_s3.proxy.outage("reset", after=3, trigger=get_video)
    try:
        with pytest.raises(storage.StorageError) as e:
            run_pack(cfg)
    finally:
        moto_s3.proxy.restore()
    assert str(e.value).startswith(f"{s3_bucket}/") and "\n" not in str(e.value), e.value
    assert not storage.exists(f"{s3_bucket}/shards/_index.json")
    report = run_pack(cfg)
    assert (report["packed"], report["skipped"]) == (6, 4), report
    assert leftovers(moto_s3, s3_bucket) == ([], [])
    ledger(fault="S3 gone for good mid-pack (connection resets)", injected=1, survived=1,
           lost=0, note="one line naming the URI, no index; rerun packs all 6 (4 bad skipped)")
