"""No access key, secret or session token in anything the session wrote.

The session's S3 credentials are distinct random values (tests/s3_fixtures.py SECRETS). This
test runs last, after every run, render, job and fault of the session, and reads everything they
left: every file under pytest's temp root (run directories, config.yaml, metrics, TensorBoard
events, manifests, logs, packages), every log and runtime-env file of the session's Ray cluster,
every object in every bucket, and what `ray job submit` recorded about its jobs (runtime_env,
entrypoint). It also provokes the errors most likely to quote a request (a denied bucket, a
broken endpoint) and reads their messages.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from t2v import storage
from tests.s3_fixtures import SECRETS


def needles() -> dict[str, bytes]:
    return {name: value.encode() for name, value in SECRETS.items()}


def files_under(root: Path):
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            path = Path(dirpath, f)
            if path.is_file() and not path.is_symlink():
                yield path


def stored_objects() -> dict[str, list[bytes]]:
    """Every version of every object the session's moto server holds, read from its backend:
    the server runs in this process (tests/s3_fixtures.py), and 1,276 GETs through the storage
    layer took 68 s of a CI run where this takes ~1 s."""
    from moto.s3.models import s3_backends

    held: dict[str, list[bytes]] = {}
    for account in s3_backends.values():
        for backend in account.values():
            for bucket in backend.buckets.values():
                for name, versions in bucket.keys.iterlists():
                    held[f"s3://{bucket.name}/{name}"] = [
                        v.value for v in versions if getattr(v, "value", None) is not None]
    return held


@pytest.mark.last
def test_no_credential_in_anything_the_session_wrote(ray_cluster, debug_run, moto_s3,
                                                     tmp_path_factory, ledger):
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRETS["AWS_SECRET_ACCESS_KEY"]  # in use
    t0, seconds = time.time(), {}
    found, scanned, size = [], 0, 0
    roots = [tmp_path_factory.getbasetemp(), Path(ray_cluster.temp_dir),
             Path(ray_cluster.temp_dir + "n2")]
    for root in roots:
        for path in files_under(root):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            scanned, size = scanned + 1, size + len(data)
            found += [f"{path}: {name}" for name, value in needles().items() if value in data]
    seconds["files"] = time.time() - t0
    client = storage.s3_client()
    listed = {key for bucket in client.list_buckets()["Buckets"]
              for key in storage.list_prefix(f"s3://{bucket['Name']}")}
    held = stored_objects()
    assert listed <= set(held), sorted(listed - set(held))[:5]  # the server the session used
    objects = sum(len(versions) for versions in held.values())
    for key, versions in held.items():
        for data in versions:
            size += len(data)
            found += [f"{key}: {name}" for name, value in needles().items() if value in data]
    seconds["objects"] = time.time() - t0 - sum(seconds.values())
    from ray.job_submission import JobSubmissionClient

    jobs = json.dumps([j.dict() if hasattr(j, "dict") else str(j) for j in
                       JobSubmissionClient(ray_cluster.dashboard).list_jobs()], default=str)
    assert "jobs/train.py" in jobs  # the session's `ray job submit` is in there
    found += [f"ray job info: {name}" for name, value in needles().items()
              if value.decode() in jobs]
    seconds["jobs"] = time.time() - t0 - sum(seconds.values())
    # Errors that quote requests: a bucket we may not read, an endpoint that is down.
    messages = []
    for uri in ("s3://t2v-no-such-bucket-0/x", f"{debug_run.out}/missing.json"):
        with pytest.raises(storage.StorageError) as e:
            storage.read_bytes(uri)
        messages.append(str(e.value))
    with moto_s3.proxy.faults(kinds=("503",), every=1):
        os.environ["AWS_MAX_ATTEMPTS"] = "1"
        storage.clear_client_cache()
        try:
            with pytest.raises(storage.StorageError) as e:
                storage.read_bytes("s3://t2v-store-down/x")
            messages.append(str(e.value))
        finally:
            del os.environ["AWS_MAX_ATTEMPTS"]
            storage.clear_client_cache()
    found += [f"error message: {name}" for m in messages for name, value in needles().items()
              if value.decode() in m]
    seconds["errors"] = time.time() - t0 - sum(seconds.values())
    # Where the scan's time went (a CI run took 70 s here), kept beside what it scanned.
    (tmp_path_factory.getbasetemp() / "secrets_scan.json").write_text(json.dumps(
        {"files": scanned, "objects": objects, "bytes": size, "seconds": seconds}))
    assert scanned > 100, scanned  # at least the debug run and the cluster's logs
    assert found == [], found[:20]
    ledger(fault="secrets scan of everything the session wrote", injected=3, survived=3, lost=0,
           note=f"{scanned} files + {objects} objects, {size / 2**20:.0f} MiB: no key, secret "
                "or token")
