"""A fault-injecting HTTP proxy on loopback, in front of the S3 server of the tests (moto).

Each request, drawn from a seeded random generator, is one of:

- **SlowDown**: answered ``503 SlowDown`` (S3's throttling reply) before it reaches the server;
- **dropped**: forwarded, so it takes effect, then the connection is closed with no reply, or,
  for a reply with a body, after half of it (a GetObject cut off mid-response);
- passed through, after ``latency`` seconds before the first byte.
A request signed with the access key ``denied_key`` is answered ``403 InvalidAccessKeyId``, as a
store answers wrong credentials (moto itself accepts any key).

Bounded: one thread per client connection, each ending when its client closes or the server
is shut down; every socket has a timeout.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
INVALID_KEY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InvalidAccessKeyId</Code>'
               b"<Message>The AWS Access Key Id you provided does not exist in our records.</Message></Error>")
#: hop-by-hop headers, and those the proxy recomputes
_DROP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length", "proxy-connection"}


@dataclass
class Faults:
    """What the proxy does, and what it did (counts per kind)."""

    slow_down: float = 0.0
    dropped: float = 0.0
    latency: float = 0.0
    denied_key: str | None = None
    seed: int = 0
    counts: dict = field(default_factory=lambda: {"requests": 0, "slow_down": 0, "dropped": 0})
    #: requests per object path (``/bucket/key``), whatever the proxy did with them
    by_path: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self, path: str = "") -> str:
        with self._lock:
            self.counts["requests"] += 1
            self.by_path[urlparse(path).path] += 1
            x = self._rng.random()
            kind = "slow_down" if x < self.slow_down else "dropped" if x < self.slow_down + self.dropped else "pass"
            if kind != "pass":
                self.counts[kind] += 1
            return kind

    def set(self, slow_down: float = 0.0, dropped: float = 0.0, latency: float = 0.0,
            denied_key: str | None = None) -> None:
        with self._lock:
            self.slow_down, self.dropped, self.latency = slow_down, dropped, latency
            self.denied_key = denied_key


def _handler(upstream: tuple[str, int], faults: Faults) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 60

        def log_message(self, *args) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            # one upstream connection per client connection, kept open as a store keeps it: a connection
            # (and a server thread) per request would cost this machine's cores what a remote store does not
            reused = getattr(self, "_upstream", None)
            self._upstream = None
            if reused is not None:
                try:
                    return self._send(reused, body)
                except (http.client.RemoteDisconnected, BrokenPipeError):  # the server closed an idle connection
                    pass  # before it took the request: sending it again does it once
            return self._send(http.client.HTTPConnection(*upstream, timeout=60), body)

        def _send(self, conn: http.client.HTTPConnection, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in _DROP_HEADERS:
                        conn.putheader(name, value)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
            except BaseException:
                conn.close()
                raise
            if resp.will_close:
                conn.close()
            else:
                self._upstream = conn
            return resp.status, resp.getheaders(), data

        def finish(self) -> None:
            super().finish()
            if getattr(self, "_upstream", None) is not None:
                self._upstream.close()

        def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes, length: int | None = None) -> None:
            if self.command == "HEAD":  # no body: the length the server gave
                length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            self.send_response_only(status)
            for name, value in headers:
                if name.lower() not in _DROP_HEADERS:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            self.wfile.flush()

        def _handle(self) -> None:
            body = self._body()
            kind = faults.draw(self.path)
            if faults.latency:
                threading.Event().wait(faults.latency)
            if kind == "slow_down":
                self._reply(503, [("Content-Type", "application/xml")], SLOW_DOWN)
                return
            signed = (self.headers.get("Authorization") or "") + self.path.replace("%2F", "/")  # header or query
            if faults.denied_key and f"Credential={faults.denied_key}/" in signed:
                self._reply(403, [("Content-Type", "application/xml")], INVALID_KEY)
                return
            status, headers, data = self._forward(body)
            if kind == "dropped":
                if self.command == "GET" and len(data) > 1:  # cut off mid-response
                    self._reply(status, headers, data[: len(data) // 2], length=len(data))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self._reply(status, headers, data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


class FaultyProxy:
    """``with FaultyProxy(upstream_url, faults) as url:``: a proxy on a free loopback port."""

    def __init__(self, upstream_url: str, faults: Faults):
        parsed = urlparse(upstream_url)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler((parsed.hostname, parsed.port), faults))
        self.server.daemon_threads = True
        self.faults = faults
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="faulty-s3-proxy", daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
