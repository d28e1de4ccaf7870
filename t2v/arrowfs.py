"""pyarrow filesystems for t2v's URIs: what Ray Data and Ray Train read and write through.

Local paths need none; an s3:// URI gets an `S3FileSystem` built from the same boto3 session as
t2v/storage.py's client (region, endpoint, static credentials), so Ray reads what boto3 writes.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from botocore.credentials import RefreshableCredentials

from t2v import storage


def _pyarrow_path(uri: str) -> str:
    uri = storage.check_uri(uri)
    if storage.is_s3(uri):
        return "/".join(storage.split_s3(uri)).rstrip("/")
    return str(storage.local_path(uri).absolute())


def pyarrow_filesystem(uri: str) -> tuple[Any, str]:
    """``(filesystem, path)`` for pyarrow/Ray Data: local -> ``(None, "/abs/path")``.

    For S3 an ``S3FileSystem`` from the same boto3 session as ``s3_client`` (region, endpoint;
    static credentials passed on, refreshable ones left to Arrow's default chain), so Ray Data
    reads what boto3 writes, on AWS, moto or any S3-compatible server, for as long as it runs.
    """
    if not storage.is_s3(uri):
        return None, _pyarrow_path(uri)
    import pyarrow.fs as pafs  # noqa: PLC0415 - heavy; only the readers need it

    session, client = storage.session_and_client()
    kwargs: dict[str, Any] = {
        "region": client.meta.region_name or session.region_name or "us-east-1",
        "connect_timeout": 10, "request_timeout": 120,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=storage.max_attempts()),
    }
    creds = session.get_credentials()
    if creds is None:
        kwargs["anonymous"] = True
    elif not isinstance(creds, RefreshableCredentials):  # static keys: env, files, explicit
        frozen = creds.get_frozen_credentials()
        kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key,
                      session_token=frozen.token)
    # Keys that expire (web identity / IRSA, instance or container role, assume-role,
    # credential_process with an Expiration) are NOT frozen into the filesystem: they last
    # about an hour and a run lasts days. Arrow's own default chain (the AWS SDK's: env,
    # profile, credential_process, web identity, container, instance metadata) finds the same
    # source wherever the filesystem is unpickled (every Ray worker) and refreshes it.
    env = os.environ.get
    endpoint = urlsplit(env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")
                        or client.meta.endpoint_url or "")
    if endpoint.hostname and not endpoint.hostname.endswith("amazonaws.com"):
        kwargs["endpoint_override"] = endpoint.netloc.rpartition("@")[2] + endpoint.path.rstrip("/")
        kwargs["scheme"] = endpoint.scheme or "https"
    return pafs.S3FileSystem(**kwargs), _pyarrow_path(uri)


def pyarrow_paths(uris: list[str]) -> tuple[Any, list[str]]:
    """One filesystem for a list of URIs (all local or all S3) and the paths inside it."""
    if not uris:
        return None, []
    if len({storage.is_s3(u) for u in uris}) > 1:
        raise ValueError(f"cannot mix local and s3:// URIs in one read: {uris[0]!r} ...")
    return pyarrow_filesystem(uris[0])[0], [_pyarrow_path(u) for u in uris]
