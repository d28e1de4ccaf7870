"""A fault-injecting HTTP proxy in front of an S3 endpoint (moto), on 127.0.0.1.

Every S3 request of the test session goes through it (tests/s3_fixtures.py puts it in front of
moto), so the same endpoint that serves the ordinary tests breaks on command for the chaos
tests, also for Ray workers and pyarrow's C++ client, which no in-process mock reaches.

Faults, chosen per request (the n-th request that `match`es):
- "503":   an S3 `SlowDown` error (what S3 answers when throttling), nothing forwarded;
- "500":   an S3 `InternalError` (S3's own failure), nothing forwarded: clients retry it like a
           503 but, not being told to slow down, do not throttle themselves (botocore's
           adaptive mode waits ~1-3 s before each request after a few SlowDowns);
- "reset": the request is read in full, then the TCP connection is reset (RST) unanswered;
- "stall": the request waits `stall_s` seconds, then goes through.
`inject(every=k)` faults every k-th matching request (kinds in turn) until `times` faults;
`outage()` faults every matching request until `restore()`.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("503", "reset", "stall")  # what `inject` injects by default, in turn
ERRORS = {  # kind -> (status, reason, S3's error document)
    "503": (503, "Slow Down", b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown'
            b"</Code><Message>Please reduce your request rate.</Message>"
            b"<RequestId>t2v-chaos</RequestId></Error>"),
    "500": (500, "Internal Server Error", b'<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
            b"<Code>InternalError</Code><Message>We encountered an internal error. Please try "
            b"again.</Message><RequestId>t2v-chaos</RequestId></Error>"),
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
              "proxy-connection", "content-length"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # with the query string: "/bucket/key?partNumber=2&uploadId=..."

    @property
    def is_upload_part(self) -> bool:
        return self.method == "PUT" and "partNumber=" in self.path


@dataclass
class Plan:
    kinds: tuple[str, ...] = ()
    every: int = 0  # 0: no faults; 1: every matching request
    times: int | None = None  # faults left (None: unlimited)
    match: Callable[[Request], bool] | None = None
    stall_s: float = 1.0
    after: int = 0  # faults begin once this many requests matching `trigger` went through
    trigger: Callable[[Request], bool] | None = None
    seen: int = 0


@dataclass
class FaultProxy:
    upstream: str
    requests: int = 0
    injected: Counter = field(default_factory=Counter)
    watch: Callable[[Request], None] | None = None
    """Called with every request before it is answered (a test acts at an exact moment: the
    first part of a checkpoint upload, say)."""
    _plan: Plan = field(default_factory=Plan)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy, up = self, urlsplit(self.upstream)

        class Handler(_Relay):
            upstream_host, upstream_port, owner = up.hostname, up.port, proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def inject(self, kinds: tuple[str, ...] = KINDS, every: int = 3, times: int | None = None,
               match: Callable[[Request], bool] | None = None, stall_s: float = 1.0,
               after: int = 0, trigger: Callable[[Request], bool] | None = None) -> None:
        """Fault every `every`-th request matching `match` (kinds in turn), `times` at most,
        once `after` requests matching `trigger` (default: any) have gone through."""
        unknown = set(kinds) - set(KINDS) - set(ERRORS)
        if unknown or every < 1:
            raise ValueError(f"bad fault plan: kinds {kinds}, every {every}")
        with self._lock:
            self._plan = Plan(tuple(kinds), every, times, match, stall_s, after, trigger)

    def outage(self, kind: str = "503", match: Callable[[Request], bool] | None = None,
               after: int = 0, trigger: Callable[[Request], bool] | None = None) -> None:
        """Every matching request fails (once `after` `trigger` requests passed) until
        `restore()`."""
        self.inject((kind,), every=1, match=match, after=after, trigger=trigger)

    def restore(self) -> None:
        with self._lock:
            self._plan = Plan()

    @contextlib.contextmanager
    def faults(self, **plan) -> Iterator[FaultProxy]:
        self.inject(**plan)
        try:
            yield self
        finally:
            self.restore()

    def decide(self, request: Request) -> tuple[str | None, float]:
        if self.watch is not None:
            self.watch(request)
        with self._lock:
            self.requests += 1
            p = self._plan
            if p.every and p.after:  # still waiting for the trigger
                p.after -= p.trigger is None or p.trigger(request)
                return None, 0.0
            if not p.every or (p.match is not None and not p.match(request)):
                return None, 0.0
            p.seen += 1
            if p.seen % p.every or p.times == 0:
                return None, 0.0
            if p.times is not None:
                p.times -= 1
            kind = p.kinds[(p.seen // p.every - 1) % len(p.kinds)]
            self.injected[kind] += 1
            return kind, p.stall_s


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # a reset client is no news
        pass


class _Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    upstream_host: str
    upstream_port: int
    owner: FaultProxy
    _conn: http.client.HTTPConnection | None = None

    def log_message(self, *args) -> None:  # no access log on stderr
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _relay(self) -> None:
        body = self._body()
        kind, stall = self.owner.decide(Request(self.command, self.path))
        if kind == "reset":
            # SO_LINGER 0: close() sends RST, as a crashed load balancer does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if kind in ERRORS:
            status, reason, doc = ERRORS[kind]
            self.send_response(status, reason)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(doc)))
            self.end_headers()
            self.wfile.write(b"" if self.command == "HEAD" else doc)
            return
        if kind == "stall":
            time.sleep(stall)
        status, reason, headers, data = self._forward(body)
        self.send_response(status, reason)
        for k, v in headers:
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        self.send_header("Content-Length",
                         length if self.command == "HEAD" and length else str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _forward(self, body: bytes) -> tuple[int, str, list, bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have been closed
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port,
                                                        timeout=300)
            try:
                self._conn.request(self.command, self.path, body=body, headers=headers)
                r = self._conn.getresponse()
                return r.status, r.reason, r.getheaders(), r.read()
            except (ConnectionError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().finish()
        if self._conn is not None:
            self._conn.close()
