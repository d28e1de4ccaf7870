"""URIs for every location t2v touches: local paths and ``s3://bucket/key``, one API for both.

Writes are atomic (a reader sees the old object or the whole new one) because resumable jobs
decide "done" by an output's existence. boto3 finds endpoint, credentials and region in the
standard places (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ``~/.aws/config``): any S3 server works.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as bx
from botocore.config import Config

from t2v import hub
from t2v.tempfiles import (
    TMP_OWNER,
    TMP_PREFIX,
    owned_tempfile,
    pid_alive,
    replace_local,
    writer_host,
)

MiB = 1 << 20
PART_MIB_ENV = "T2V_S3_PART_MIB"
"""Multipart part size and threshold in MiB (default 8; S3 allows 5 to 5120, and 10,000 parts:
8 MiB parts carry objects up to ~78 GiB)."""


def transfer_config() -> TransferConfig:
    """Above the threshold boto3 uploads in parts; the object appears only on
    CompleteMultipartUpload, so a killed upload leaves nothing at the final key."""
    part = float(os.environ.get(PART_MIB_ENV, "8")) * MiB
    return TransferConfig(multipart_threshold=int(part), multipart_chunksize=int(part))


# Local temp files start with this, so that list_prefix can hide half-written outputs.

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "ExpiredToken", "InvalidToken", "AllAccessDisabled"}
_NETWORK = (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError)


class StorageError(Exception):
    """A storage operation failed; the message is one line: ``<uri>: <cause>``."""


class NotFound(StorageError):
    """The object or file does not exist (the store itself answered: it is not failing)."""


def is_s3(uri: str) -> bool:
    return os.fspath(uri).lower().startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; the key may be empty."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = os.fspath(uri)[5:].partition("/")
    if not bucket or any(c.isspace() for c in bucket):
        raise ValueError(f"malformed s3 URI (no bucket): {uri!r}")
    return bucket, key


def is_local(uri: str | os.PathLike[str]) -> bool:
    """Plain paths and ``file://`` URIs are local; any other ``scheme://`` is not."""
    s = os.fspath(uri)
    return s.startswith("file://") or "://" not in s


def local_path(uri: str | os.PathLike[str]) -> Path:
    s = os.fspath(uri)
    if hub.is_hub(s):
        return hub.local_path(s)
    if s.startswith("file://"):
        parts = urlsplit(s)
        return Path(unquote(parts.netloc + parts.path))
    if "://" in s:
        raise ValueError(f"not a local path: {s!r}")
    return Path(s).expanduser()


def join(uri: str, *parts: str) -> str:
    """Join parts with exactly one ``/`` between them, for paths and URIs alike."""
    out = os.fspath(uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out.rstrip('/')}/{part}" if out else part
    return out


def _norm(uri: str | os.PathLike[str]) -> str:
    """Accept Path objects too, and refuse schemes other than file:// and s3:// early
    (`hf:ORG/NAME/...` reads from the local Hugging Face cache, t2v/hub.py)."""
    s = os.fspath(uri)
    if not (is_s3(s) or is_local(s)):
        raise ValueError(f"unsupported URI scheme (use a path or s3://): {s!r}")
    return s


def check_uri(uri: str | os.PathLike[str]) -> str:
    """A path or URI t2v can use, as a string (ValueError for another scheme)."""
    return _norm(uri)


def _norm_write(uri: str | os.PathLike[str]) -> str:
    """`_norm` for writes: a Hub reference is read-only."""
    s = _norm(uri)
    if hub.is_hub(s):
        raise ValueError(f"{s}: a Hugging Face Hub reference is read-only; write to a path or "
                         "an s3:// URI")
    return s


def _scrub(text: str) -> str:
    """One line, with any credential value that a server or library echoed replaced by ***."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(text.split())


def _find_cause(exc: BaseException | None, types: tuple[type[BaseException], ...]) -> Any:
    """boto3's transfer manager wraps ClientError (S3UploadFailedError, RetriesExceededError)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, types):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "last_exception", None)
    return None


def _error_code(exc: BaseException) -> str | None:
    client_err = _find_cause(exc, (bx.ClientError,))
    return None if client_err is None else str(client_err.response.get("Error", {}).get("Code"))


def storage_error(uri: str, exc: BaseException) -> StorageError:
    """Translate a boto3/OS exception into a one-line StorageError naming the URI and cause."""
    if isinstance(exc, StorageError):
        return exc
    code, net = _error_code(exc), _find_cause(exc, _NETWORK)
    if code == "NoSuchBucket":
        cause = "bucket does not exist"
    elif code in _NOT_FOUND:
        return NotFound(f"{uri}: no such object")
    elif code in _DENIED:
        cause = f"access denied ({code}); check credentials, profile and bucket policy"
    elif code is not None:
        message = _find_cause(exc, (bx.ClientError,)).response["Error"].get("Message", "")
        cause = _scrub(f"S3 error {code}: {message}")
    elif net is not None:  # host and port only: a URL may carry user:password@
        url = urlsplit(str(getattr(net, "kwargs", {}).get("endpoint_url", "")))
        port = f":{url.port}" if url.port else ""
        cause = f"cannot reach the S3 endpoint {url.scheme}://{url.hostname}{port}"
    elif _find_cause(exc, (bx.NoCredentialsError,)) is not None:
        cause = "no AWS credentials found (set AWS_PROFILE or AWS_ACCESS_KEY_ID/...)"
    elif isinstance(exc, FileNotFoundError):
        return NotFound(f"{uri}: no such file or directory")
    elif isinstance(exc, PermissionError):
        cause = "permission denied"
    else:
        cause = _scrub(exc.strerror if isinstance(exc, OSError) and exc.strerror
                       else f"{type(exc).__name__}: {exc}")
    return StorageError(f"{uri}: {cause}")


_REMOTE = re.compile(rf"^{re.escape(__name__)}\.(?:StorageError|NotFound): (.+)$", re.MULTILINE)


def failure_in(e: BaseException) -> StorageError | None:
    """The StorageError that ended a Ray job, however Ray wrapped it (a task error, Ray Data's
    UserCodeException, a cause chain, or only the remote traceback's text), as a fresh one-line
    error; None if it was not one."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, StorageError):
            return StorageError(str(x).strip().splitlines()[0])
        todo += [x.__cause__, x.__context__, getattr(x, "cause", None)]
    found = _REMOTE.findall(str(e))
    return StorageError(found[-1].strip()) if found else None


def _check_bucket(uri: str) -> None:
    """Raise if the bucket is missing: HEAD answers that with a bare 404, like a missing key."""
    try:
        s3_client().head_bucket(Bucket=split_s3(uri)[0])
    except (bx.ClientError, bx.BotoCoreError) as exc:
        if _error_code(exc) in _NOT_FOUND:
            raise StorageError(f"{uri}: bucket does not exist") from exc
        raise storage_error(uri, exc) from exc


@contextmanager
def _errors(uri: str) -> Iterator[None]:
    try:
        yield
    except (bx.ClientError, bx.BotoCoreError, Boto3Error, OSError) as exc:
        if is_s3(uri) and _error_code(exc) in _NOT_FOUND:
            _check_bucket(uri)
        raise storage_error(uri, exc) from exc


_clients: dict[tuple[Any, ...], tuple[Any, Any]] = {}
_lock = threading.Lock()


def clear_client_cache() -> None:
    """Forget cached clients (tests change endpoint and credentials between cases)."""
    with _lock:
        _clients.clear()


def max_attempts() -> int:
    # AWS_MAX_ATTEMPTS is the standard variable; honour it (fail-fast tests, impatient users).
    return int(os.environ.get("AWS_MAX_ATTEMPTS") or 8)


def session_and_client() -> tuple[boto3.session.Session, Any]:
    env = os.environ.get
    # The pid keeps a forked child (Ray worker, DataLoader) from sharing its parent's sockets.
    key = (os.getpid(), env("AWS_ENDPOINT_URL_S3"), env("AWS_ENDPOINT_URL"), env("AWS_PROFILE"),
           env("AWS_ACCESS_KEY_ID"), env("AWS_DEFAULT_REGION"), env("AWS_MAX_ATTEMPTS"))
    with _lock:
        if key not in _clients:
            session = boto3.session.Session()  # a fresh session reads the current environment
            config = Config(retries={"max_attempts": max_attempts(), "mode": "adaptive"},
                            connect_timeout=10, read_timeout=120)
            _clients[key] = (session, session.client("s3", config=config))
        return _clients[key]


def s3_client() -> Any:
    """A boto3 S3 client, cached per (process, endpoint, profile, credentials)."""
    return session_and_client()[1]


def read_bytes(uri: str) -> bytes:
    uri = _norm(uri)
    with _errors(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return local_path(uri).read_bytes()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def exists(uri: str) -> bool:
    """True if the object (locally: the file or directory) exists.

    A missing bucket or denied access raises instead of answering False, so that a typo in a
    bucket name cannot make a resumed job believe nothing was done yet.
    """
    uri = _norm(uri)
    if not is_s3(uri):
        return local_path(uri).exists()
    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except (bx.ClientError, bx.BotoCoreError) as exc:
        if _error_code(exc) not in _NOT_FOUND:
            raise storage_error(uri, exc) from exc
    _check_bucket(uri)
    return False


def size(uri: str) -> int:
    uri = _norm(uri)
    with _errors(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        return local_path(uri).stat().st_size


LIST_PAGE_KEYS = 1000
"""Keys per ListObjectsV2 page (S3's most; tests set fewer to cross pages cheaply)."""


def list_prefix(uri: str, suffix: str | None = None) -> list[str]:
    """Sorted URIs of all files under a directory/prefix (``s3://b/r`` lists ``r/*``, not ``r2``).

    Recursive; local temp files are hidden. A missing local directory is empty, a missing bucket
    an error.
    """
    uri = _norm(uri)
    out: list[str] = []
    with _errors(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            prefix = key if not key or key.endswith("/") else key + "/"
            paginator = s3_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix,
                                           PaginationConfig={"PageSize": LIST_PAGE_KEYS}):
                out += [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", [])
                        if not o["Key"].endswith("/")]
        else:
            root = local_path(uri)
            for dirpath, _dirs, files in os.walk(root):
                rel = os.path.relpath(dirpath, root)
                out += [join(uri, "" if rel == "." else rel, f) for f in files
                        if not f.startswith(TMP_PREFIX)]
    return sorted(u for u in out if not suffix or u.endswith(suffix))


def remove_stale_temps(uri: str, max_age_s: float = 86400.0) -> int:
    """Delete the temp files a killed writer left under a local directory (recursively): those
    whose writer on this host is gone, and on a shared filesystem any older than `max_age_s`.
    A live writer's temp file is kept. S3 has none: objects appear whole or not at all.
    Returns how many were removed."""
    if is_s3(uri) or hub.is_hub(uri):
        return 0
    host, now, removed = writer_host(), time.time(), 0
    for dirpath, _dirs, files in os.walk(local_path(uri)):
        for f in files:
            if not f.startswith(TMP_PREFIX):
                continue
            path = Path(dirpath, f)
            m = TMP_OWNER.match(f)
            try:
                dead = m is not None and m["host"] == host and not pid_alive(int(m["pid"]))
                if dead or now - path.stat().st_mtime > max_age_s:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # its writer finished meanwhile
                continue
    return removed


def write_bytes(uri: str, data: bytes) -> None:
    """Atomically replace ``uri`` with ``data`` (S3: one put_object, never a partial object)."""
    uri = _norm_write(uri)
    with _errors(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
            return
        with replace_local(local_path(uri)) as tmp:
            tmp.write_bytes(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_file(local: str | os.PathLike[str], uri: str) -> None:
    """Copy a local file to ``uri``; big S3 uploads are multipart and appear only when whole."""
    uri, src = _norm_write(uri), local_path(local)
    if not src.is_file():
        raise StorageError(f"{uri}: upload source {src} is not a file")
    with _errors(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client().upload_file(str(src), bucket, key, Config=transfer_config())
            return
        with replace_local(local_path(uri), src.suffix) as tmp:
            shutil.copyfile(src, tmp)


def download_file(uri: str, local: str | os.PathLike[str]) -> None:
    """Copy ``uri`` to a local file through a temp file in the same directory."""
    uri, target = _norm(uri), local_path(local)
    with _errors(uri), replace_local(target, target.suffix) as tmp:
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client().download_file(bucket, key, str(tmp), Config=transfer_config())
        else:
            shutil.copyfile(local_path(uri), tmp)


def delete(uri: str) -> None:
    """Delete one file/object; a missing one is fine (cleanup may run twice after a crash)."""
    uri = _norm_write(uri)
    with _errors(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client().delete_object(Bucket=bucket, Key=key)
        else:
            local_path(uri).unlink(missing_ok=True)


@contextmanager
def atomic_local_file(uri: str, suffix: str = "") -> Iterator[Path]:
    """Yield a local temp path; on clean exit it becomes ``uri``, on error nothing appears.

    ``suffix`` defaults to the target's extension, since writers such as PyAV choose the
    container format from the file name.
    """
    uri = _norm_write(uri)
    suffix = suffix or Path(uri).suffix
    if not is_s3(uri):
        with _errors(uri):  # report an unwritable directory before the caller does the work
            local_path(uri).parent.mkdir(parents=True, exist_ok=True)
        with replace_local(local_path(uri), suffix) as tmp:
            yield tmp
        return
    split_s3(uri)  # refuse a malformed URI before the caller does the work
    name = owned_tempfile(suffix)
    try:
        yield name
        upload_file(name, uri)
    finally:
        Path(name).unlink(missing_ok=True)


@contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """Yield a local path with ``uri``'s content: the file itself, or a temporary download."""
    uri = _norm(uri)
    if not is_s3(uri):
        if not local_path(uri).exists():
            raise StorageError(f"{uri}: no such file or directory")
        yield local_path(uri)
        return
    tmpdir = owned_tempfile(directory=True)
    try:
        dst = tmpdir / (Path(split_s3(uri)[1]).name or "object")
        download_file(uri, dst)
        yield dst
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
