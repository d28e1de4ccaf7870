"""A real S3 endpoint for tests: moto in server mode on 127.0.0.1.

Imported by tests/conftest.py. Server mode (not ``mock_aws``) because Ray workers and pyarrow's
C++ S3 client run outside this Python process's patched boto3: they need a real HTTP endpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from t2v import storage
from tests.chaos.proxy import FaultProxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_tree(src: str, dst: str) -> str:
    """Copy every file under `src` (a local folder or s3:// prefix) to `dst`; returns `dst`."""
    for uri in storage.list_prefix(src):
        storage.write_bytes(storage.join(dst, uri[len(src.rstrip("/")) + 1:]),
                            storage.read_bytes(uri))
    return dst


@dataclass
class MotoS3:
    endpoint: str
    """The fault proxy's endpoint: what every client of the session uses."""
    proxy: FaultProxy
    """Passes everything through until a chaos test asks it for faults."""

    def client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=SECRETS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=SECRETS["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=SECRETS["AWS_SESSION_TOKEN"],
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"


# Set for the whole session, so that subprocesses (Ray workers, jobs) see the same endpoint.
# Distinct per session (moto takes any), so that tests/chaos/test_secrets.py can prove that none
# of them appears in anything the session wrote.
SECRETS = {
    "AWS_ACCESS_KEY_ID": f"AKIAT2V{uuid.uuid4().hex[:13].upper()}",
    "AWS_SECRET_ACCESS_KEY": f"t2vSecret{uuid.uuid4().hex}",
    "AWS_SESSION_TOKEN": f"t2vToken{uuid.uuid4().hex}{uuid.uuid4().hex}",
}
_ENV = {**SECRETS, "AWS_DEFAULT_REGION": "us-east-1"}
# Removed so that a developer's own AWS set-up cannot leak into (or be used by) the tests.
_UNSET = ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS")


def start_moto_server():
    """A moto S3 server on a free 127.0.0.1 port: (server, endpoint URL). Caller stops it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access-log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    server, upstream = start_moto_server()
    proxy = FaultProxy(upstream).start()
    endpoint = proxy.endpoint
    with pytest.MonkeyPatch.context() as mp:
        for var in _UNSET:
            mp.delenv(var, raising=False)
        for var, value in {**_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(var, value)
        # Keep ~/.aws out: a developer's default profile must not change what tests do.
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        storage.clear_client_cache()
        try:
            yield MotoS3(endpoint, proxy)
        finally:
            proxy.stop()
            server.stop()
            storage.clear_client_cache()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3) -> str:
    """A fresh, empty bucket per test, so tests never see each other's objects."""
    return moto_s3.make_bucket(f"t2v-test-{uuid.uuid4().hex[:16]}")
