"""t2v.storage against the local filesystem and a real S3 endpoint (moto in server mode)."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from t2v import arrowfs, storage, tempfiles
from t2v.storage import StorageError
from tests.s3_fixtures import MotoS3, free_port

SECRET_ID = "AKIAT2VTESTKEYID0001"
SECRET_KEY = "t2v-very-secret-access-key-value"


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A writable root URI: a local directory or a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket")


def assert_one_line(err: pytest.ExceptionInfo[StorageError], uri: str, cause: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert uri in msg, msg
    assert cause in msg, msg
    assert SECRET_ID not in msg and SECRET_KEY not in msg


# ------------------------------------------------------------------------------------------ URIs

def test_join_and_split() -> None:
    assert storage.join("s3://b", "a", "c.tar") == "s3://b/a/c.tar"
    assert storage.join("s3://b/", "/a/", "/c") == "s3://b/a/c"
    assert storage.join("s3://b/x/", "") == "s3://b/x/"
    assert storage.join("/data/", "runs/", "r1") == "/data/runs/r1"
    assert storage.join("/", "x") == "/x"
    assert storage.join("rel", "x") == "rel/x"
    assert storage.join("file:///d", "x") == "file:///d/x"
    assert storage.split_s3("s3://b/a/c.tar") == ("b", "a/c.tar")
    assert storage.split_s3("s3://b") == ("b", "")
    assert storage.split_s3("s3://b/") == ("b", "")
    for bad in ("s3:///key", "s3://", "/local/path", "gs://b/k"):
        with pytest.raises(ValueError):
            storage.split_s3(bad)


def test_local_paths(tmp_path: Path) -> None:
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x")
    assert storage.is_local("/tmp/x") and storage.is_local("file:///tmp/x")
    assert not storage.is_local("s3://b/k") and not storage.is_local("gs://b/k")
    assert storage.local_path("file:///tmp/a%20b") == Path("/tmp/a b")
    assert storage.local_path(tmp_path / "x") == tmp_path / "x"
    with pytest.raises(ValueError, match="unsupported"):
        storage.read_bytes("gs://bucket/key")
    storage.write_text(f"file://{tmp_path}/f.txt", "via file uri")
    assert (tmp_path / "f.txt").read_text() == "via file uri"


# -------------------------------------------------------------------------- shared behaviour

def test_round_trip(root: str) -> None:
    uri = storage.join(root, "deep/er/blob.bin")
    data = os.urandom(1000)
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    storage.write_text(uri, "héllo\n")  # overwrite
    assert storage.read_text(uri) == "héllo\n"
    assert storage.size(uri) == len("héllo\n".encode())
    assert storage.exists(uri)
    assert not storage.exists(storage.join(root, "deep/nope"))
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)  # deleting a missing object is fine


def test_list_prefix(root: str) -> None:
    names = ["a/1.tar", "a/2.json", "a/sub/3.tar", "a2/4.tar", "b.tar"]
    for name in names:
        storage.write_bytes(storage.join(root, name), b"x")
    a = storage.join(root, "a")
    assert storage.list_prefix(a) == [storage.join(a, n) for n in ["1.tar", "2.json", "sub/3.tar"]]
    assert storage.list_prefix(a + "/", suffix=".tar") == [
        storage.join(a, "1.tar"), storage.join(a, "sub/3.tar")]
    assert storage.list_prefix(root) == [storage.join(root, n) for n in names]
    assert storage.list_prefix(storage.join(root, "missing")) == []


def test_atomic_local_file(root: str) -> None:
    uri = storage.join(root, "shards/000000.tar")
    with pytest.raises(RuntimeError):
        with storage.atomic_local_file(uri) as tmp:
            assert tmp.suffix == ".tar"
            tmp.write_bytes(b"half a shard")
            # A half-written shard is never listed as a shard.
            assert storage.list_prefix(root, suffix=".tar") == []
            raise RuntimeError("writer died")
    assert not tmp.exists()
    assert not storage.exists(uri)
    assert storage.list_prefix(root) == []
    with storage.atomic_local_file(uri, suffix=".tmp.tar") as tmp:
        tmp.write_bytes(b"whole shard")
    assert not tmp.exists()
    assert storage.read_bytes(uri) == b"whole shard"
    with storage.local_copy(uri) as path:
        assert path.read_bytes() == b"whole shard"
    if storage.is_s3(uri):
        assert not path.exists()  # the temporary download is gone


def test_a_storage_failure_is_found_however_ray_wrapped_it() -> None:
    """Ray hands a task's exception back as a task error whose cause may be lost on the way
    (only the remote traceback's text is left): the one-line StorageError is found either way,
    and NotFound (a vanished object) is a StorageError too."""
    err = storage.NotFound("s3://b/k: no such object")
    assert isinstance(err, StorageError)
    try:
        try:
            raise err
        except StorageError as inner:
            raise RuntimeError("UDF failed to process a data block") from inner
    except RuntimeError as outer:
        assert str(storage.failure_in(outer)) == "s3://b/k: no such object"
    text = RuntimeError("ray::MapWorker(...)\n  File x\nt2v.storage.StorageError: s3://b/v/1.mp4: "
                        "cannot reach the S3 endpoint http://127.0.0.1:9\n\nUserCodeException")
    assert str(storage.failure_in(text)) == ("s3://b/v/1.mp4: cannot reach the S3 endpoint "
                                             "http://127.0.0.1:9")
    assert storage.failure_in(RuntimeError("ValueError: something else")) is None


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    """A SIGKILLed writer leaves its temp file; the next job removes it, never a live writer's
    (this process's, or another host's on a shared filesystem until it is a day old)."""
    import socket
    import subprocess
    import sys
    import time

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    host = socket.gethostname().replace(".", "-")
    (tmp_path / "videos").mkdir()
    killed = tmp_path / "videos" / f"{storage.TMP_PREFIX}{host}_{pid}.a.mp4.x1.mp4"
    live = tmp_path / "videos" / f"{storage.TMP_PREFIX}{host}_{os.getpid()}.b.mp4.x2.mp4"
    remote_new = tmp_path / f"{storage.TMP_PREFIX}otherhost_1.c.json.x3"
    remote_old = tmp_path / f"{storage.TMP_PREFIX}otherhost_1.d.json.x4"
    keep = tmp_path / "videos" / "done.mp4"
    for f in (killed, live, remote_new, remote_old, keep):
        f.write_bytes(b"x")
    old = time.time() - 2 * 86400
    os.utime(remote_old, (old, old))
    with storage.atomic_local_file(str(tmp_path / "e.bin")) as tmp:  # the name says who writes
        assert tmp.name.startswith(f"{storage.TMP_PREFIX}{host}_{os.getpid()}.e.bin.")
        assert storage.remove_stale_temps(str(tmp_path)) == 2  # the dead pid's, the old one
        assert tmp.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [live.name, remote_new.name, keep.name, "e.bin"])
    assert storage.remove_stale_temps("s3://bucket/out") == 0


def test_local_copies_of_dead_writers_leave_the_temp_dir(tmp_path: Path, monkeypatch) -> None:
    """An upload or download killed mid-way leaves its whole local copy in the system temp dir
    (a package's size each); the first one the next process makes removes those of dead
    writers on this host, never a live writer's or another host's."""
    import socket
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(tempfiles, "_swept_tempdir", False)
    pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                             capture_output=True, text=True, check=True).stdout)
    host = socket.gethostname().replace(".", "-")
    dead_file = tmp_path / f"{storage.TMP_PREFIX}{host}_{pid}.k2j4.safetensors"
    dead_dir = tmp_path / f"{storage.TMP_PREFIX}{host}_{pid}.x8z1"
    live = tmp_path / f"{storage.TMP_PREFIX}{host}_{os.getpid()}.q1.safetensors"
    other = tmp_path / f"{storage.TMP_PREFIX}otherhost_{pid}.q2.safetensors"
    unrelated = tmp_path / "someone-elses.tmp"
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"x")
    for f in (dead_file, live, other, unrelated):
        f.write_bytes(b"x")
    made = tempfiles.owned_tempfile(".bin")
    assert made.parent == tmp_path and made.name.startswith(live.name.split(".q1")[0] + ".")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, other.name, unrelated.name, made.name])
    dead_file.write_bytes(b"x")  # one sweep a process: later temp files cost no directory scan
    tempfiles.owned_tempfile()
    assert dead_file.exists()


def test_large_transfer_is_multipart(root: str, tmp_path: Path, moto_s3: MotoS3) -> None:
    src = tmp_path / "big.bin"
    data = os.urandom(17 * storage.MiB)
    src.write_bytes(data)
    uri = storage.join(root, "big/big.bin")
    storage.upload_file(src, uri)
    assert storage.size(uri) == len(data)
    if storage.is_s3(uri):
        bucket, key = storage.split_s3(uri)
        etag = moto_s3.client().head_object(Bucket=bucket, Key=key)["ETag"]
        assert "-" in etag, f"expected a multipart ETag, got {etag}"
    dst = tmp_path / "out" / "copy.bin"
    storage.download_file(uri, dst)
    assert dst.read_bytes() == data
    assert [p.name for p in dst.parent.iterdir()] == ["copy.bin"]


# ------------------------------------------------------------------------------------ S3 only

def test_list_prefix_paginates(s3_bucket: str, monkeypatch) -> None:
    """Every page of the listing, in order, directory markers left out. Pages of 100 keys rather
    than S3's 1000: the same loop over 3 pages, with 250 objects to write instead of 1100."""
    monkeypatch.setattr(storage, "LIST_PAGE_KEYS", 100)
    client = storage.s3_client()
    bucket, _ = storage.split_s3(s3_bucket)
    keys = [f"many/{i:05d}.txt" for i in range(250)]
    pages = []

    def count(parsed, **_) -> None:  # noqa: ANN001, ANN003 - botocore's event signature
        pages.append(parsed.get("KeyCount"))

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"."), keys))
    client.put_object(Bucket=bucket, Key="many/dir-marker/", Body=b"")
    client.meta.events.register("after-call.s3.ListObjectsV2", count)
    try:
        listed = storage.list_prefix(storage.join(s3_bucket, "many"), suffix=".txt")
    finally:  # the client is the process's shared one
        client.meta.events.unregister("after-call.s3.ListObjectsV2", count)
    assert listed == [f"{s3_bucket}/{k}" for k in keys]
    assert pages == [100, 100, 51], pages  # the marker is listed, then dropped


def test_pyarrow_filesystem_reads_moto(s3_bucket: str, tmp_path: Path) -> None:
    uri = storage.join(s3_bucket, "pa/obj.bin")
    storage.s3_client().put_object(Bucket=storage.split_s3(uri)[0], Key="pa/obj.bin", Body=b"abc")
    fs, path = arrowfs.pyarrow_filesystem(uri)
    assert path == f"{storage.split_s3(uri)[0]}/pa/obj.bin"
    with fs.open_input_stream(path) as f:
        assert f.read() == b"abc"
    fs2, paths = arrowfs.pyarrow_paths([uri, uri])
    assert paths == [path, path] and fs2 is not None
    assert arrowfs.pyarrow_filesystem(str(tmp_path)) == (None, str(tmp_path))
    assert arrowfs.pyarrow_paths([]) == (None, [])
    with pytest.raises(ValueError, match="mix"):
        arrowfs.pyarrow_paths([uri, str(tmp_path)])


CREDENTIAL_PROCESS = """
import datetime, json, pathlib, sys
calls = pathlib.Path(sys.argv[1])
n = int(calls.read_text() or 0) + 1 if calls.exists() else 1
calls.write_text(str(n))
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1)
print(json.dumps({"Version": 1, "AccessKeyId": f"AKIAROTATING{n:08d}",
                  "SecretAccessKey": f"secret-{n}", "SessionToken": f"token-{n}",
                  "Expiration": expires.isoformat()}))
"""


def test_expiring_credentials_are_refreshed_not_frozen(s3_bucket: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys from a `credential_process` that expire after 1 s (what IRSA / instance roles are,
    at an hour's scale): the pyarrow filesystem Ray Data and Ray Train use must not freeze them.
    It gets none; Arrow's default chain runs the process itself and again once they expire."""
    import pickle
    import sys
    import time

    bucket = storage.split_s3(s3_bucket)[0]
    storage.s3_client().put_object(Bucket=bucket, Key="obj.bin", Body=b"abc")
    script, calls = tmp_path / "creds.py", tmp_path / "calls"
    script.write_text(CREDENTIAL_PROCESS)
    config = tmp_path / "aws-config"
    config.write_text(f"[profile rotating]\ncredential_process = {sys.executable} {script} "
                      f"{calls}\nregion = us-east-1\n")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "rotating")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask 169.254.169.254
    storage.clear_client_cache()
    try:
        fs, path = arrowfs.pyarrow_filesystem(f"{s3_bucket}/obj.bin")
        options = pickle.loads(pickle.dumps(fs))  # what a Ray worker gets
        assert "AKIAROTATING" not in repr(pickle.dumps(fs))  # no key travels with it
        before = int(calls.read_text())  # boto3 ran the process to learn the source
        with options.open_input_stream(path) as f:
            assert f.read() == b"abc"
        time.sleep(1.5)  # the keys Arrow holds have expired
        with options.open_input_stream(path) as f:
            assert f.read() == b"abc"
        assert int(calls.read_text()) >= before + 2  # Arrow fetched keys, then fresh ones
    finally:
        storage.clear_client_cache()


def test_client_cache(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> None:
    first = storage.s3_client()
    assert storage.s3_client() is first
    with monkeypatch.context() as mp:  # a forked child must not reuse its parent's client
        mp.setattr(storage.os, "getpid", lambda: -1)
        assert storage.s3_client() is not first
    assert storage.s3_client() is first
    storage.clear_client_cache()
    assert storage.s3_client() is not first


# -------------------------------------------------------------------------------------- errors

def test_missing_bucket(moto_s3: MotoS3) -> None:
    uri = "s3://t2v-no-such-bucket/a/b.txt"
    for call in (storage.read_bytes, storage.exists, storage.size, storage.list_prefix,
                 lambda u: storage.write_bytes(u, b"x")):
        with pytest.raises(StorageError) as err:
            call(uri)
        assert_one_line(err, uri, "bucket does not exist")


def test_missing_key(s3_bucket: str, tmp_path: Path) -> None:
    uri = storage.join(s3_bucket, "nope.txt")
    for call in (storage.read_bytes, storage.size,
                 lambda u: storage.download_file(u, tmp_path / "x")):
        with pytest.raises(StorageError) as err:
            call(uri)
        assert_one_line(err, uri, "no such object")
    assert list(tmp_path.iterdir()) == []
    local = str(tmp_path / "missing.txt")
    for call in (storage.read_text, storage.size, lambda u: storage.local_copy(u).__enter__(),
                 lambda u: storage.download_file(u, tmp_path / "y")):
        with pytest.raises(StorageError) as err:
            call(local)
        assert_one_line(err, local, "no such file")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch, moto_s3: MotoS3) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    uri = "s3://any-bucket/k.txt"
    for call in (storage.read_bytes, storage.exists, lambda u: storage.write_text(u, "x")):
        with pytest.raises(StorageError) as err:
            call(uri)
        assert_one_line(err, uri, f"cannot reach the S3 endpoint {endpoint}")


@contextmanager
def moto_auth(moto_s3: MotoS3) -> Iterator[None]:
    """Make moto check signatures against its IAM users (it accepts any key by default)."""
    def set_count(value: str) -> None:
        url = f"{moto_s3.endpoint}/moto-api/reset-auth"
        urllib.request.urlopen(urllib.request.Request(
            url, data=value.encode(), method="POST", headers={"Content-Type": "text/plain"}
        ))

    set_count("0")
    try:
        yield
    finally:
        set_count("inf")


def test_access_denied(monkeypatch: pytest.MonkeyPatch, moto_s3: MotoS3, s3_bucket: str) -> None:
    uri = storage.join(s3_bucket, "k.txt")
    storage.write_text(uri, "x")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with moto_auth(moto_s3):
        for call in (storage.read_bytes, storage.exists, storage.list_prefix):
            with pytest.raises(StorageError) as err:
                call(uri)
            assert_one_line(err, uri, "access denied")


@pytest.mark.parametrize(
    "code,status,cause",
    [("NoSuchBucket", 404, "bucket does not exist"), ("NoSuchKey", 404, "no such object"),
     ("404", 404, "no such object"), ("AccessDenied", 403, "access denied"),
     ("InvalidAccessKeyId", 403, "access denied"), ("SignatureDoesNotMatch", 403, "access denied"),
     ("SlowDown", 503, "S3 error SlowDown")],
)
def test_error_mapping(code: str, status: int, cause: str,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    response = {"Error": {"Code": code, "Message": f"line one\nkey {SECRET_KEY}"},
                "ResponseMetadata": {"HTTPStatusCode": status}}
    err = storage.storage_error("s3://b/k", ClientError(response, "GetObject"))  # type: ignore[arg-type]
    assert "\n" not in str(err) and str(err).startswith("s3://b/k: ") and cause in str(err)
    assert SECRET_KEY not in str(err)
    wrapped = RuntimeError("wrapper")
    wrapped.__context__ = ClientError(response, "UploadPart")  # type: ignore[arg-type]
    assert cause in str(storage.storage_error("s3://b/k", wrapped))
    net = EndpointConnectionError(endpoint_url="http://user:pw@10.0.0.1:9000/")
    assert str(storage.storage_error("s3://b/k", net)) == (
        "s3://b/k: cannot reach the S3 endpoint http://10.0.0.1:9000")
