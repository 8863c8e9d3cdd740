"""Faults to inject: an S3 proxy that throttles, a TCP proxy that can be cut (both on
127.0.0.1), and fault hooks that make a committer die at a named step.

:class:`SlowDownProxy` sits between the workers and moto's S3 server and answers a share of the
requests (``fault_rate``) with what S3 sends when it throttles: HTTP 503 with the ``SlowDown`` XML
error; it can also hold chosen requests for ``delay_s`` before forwarding them (``delay_when``),
a floor under how long they take that does not depend on the machine's speed. The workers reach S3 through pyarrow's S3 client inside pyiceberg's FileIO (the AWS C++
SDK), so an HTTP proxy is the honest way to reach them: no patching, the SDK's own retries run
first and ours (``common/lake/retry.py``) take over when those are exhausted.

:class:`TcpProxy` forwards raw TCP (e.g. to PostgreSQL) until :meth:`TcpProxy.cut`: then every
open connection is reset and new ones are refused, as when the catalog's database goes away,
until :meth:`TcpProxy.restore`. The shared PostgreSQL cluster is never stopped, so other test
sessions on the machine are not disturbed.

:func:`raise_at` and :func:`crash_at` are ``FaultHook`` values for ``Committer(fault=...)``: the
committer calls its hook at each step of the commit protocol, by name.
"""

from __future__ import annotations

import http.client
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from common.commit.committer import FaultHook

LOOPBACK = "127.0.0.1"
# Headers that describe one hop of a connection, not the message (RFC 9110 §7.6.1).
_HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    )
)
SLOW_DOWN_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    "<Message>Please reduce your request rate.</Message><RequestId>{request_id}</RequestId></Error>"
)


@dataclass
class ProxyStats:
    requests: int = 0
    faults: int = 0
    delayed: int = 0


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        upstream: tuple[str, int],
        fault_rate: float,
        seed: int,
        delay_s: float = 0.0,
        delay_when: Callable[[str, str], bool] | None = None,
    ) -> None:
        super().__init__((LOOPBACK, 0), _ProxyHandler)
        self.upstream = upstream
        self.fault_rate = fault_rate
        self.delay_s = delay_s
        self.delay_when = delay_when
        self.stats = ProxyStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._local = threading.local()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that dies mid-request (a killed worker) is part of the game

    def should_fail(self) -> bool:
        with self._lock:
            self.stats.requests += 1
            fail = self._rng.random() < self.fault_rate
            if fail:
                self.stats.faults += 1
            return fail

    def forward(
        self, method: str, path: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        for attempt in (1, 2):  # a kept-alive upstream connection may have been closed
            conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = http.client.HTTPConnection(*self.upstream, timeout=60)
                self._local.conn = conn
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                conn.endheaders(body if body else None)
                reply = conn.getresponse()
                data = reply.read()
                return reply.status, reply.reason, reply.getheaders(), data
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, then the empty line
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()
        delay_when = self.server.delay_when
        if self.server.delay_s and (delay_when is None or delay_when(self.command, self.path)):
            self.server.stats.delayed += 1
            time.sleep(self.server.delay_s)
        if self.server.should_fail():
            xml = SLOW_DOWN_XML.format(request_id=uuid.uuid4().hex).encode()
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(xml)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(xml)
            return
        headers = [(k, v) for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP]
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        if body or self.command in ("PUT", "POST"):
            headers.append(("Content-Length", str(len(body))))
        status, reason, reply_headers, data = self.server.forward(
            self.command, self.path, headers, body
        )
        self.send_response(status, reason)
        for name, value in reply_headers:
            lowered = name.lower()
            if lowered in _HOP_BY_HOP or (lowered == "content-length" and self.command != "HEAD"):
                continue
            self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class SlowDownProxy:
    """An HTTP proxy in front of an S3 endpoint answering ``503 SlowDown`` to a share of requests.

    ``fault_rate`` may be changed while it runs (0 to stop injecting). Requests for which
    ``delay_when(method, path)`` is true (all, without it) wait ``delay_s`` before they are
    forwarded. :attr:`stats` counts the requests seen, the faults injected and the delays.
    """

    def __init__(
        self,
        upstream_url: str,
        fault_rate: float = 0.2,
        seed: int = 7,
        *,
        delay_s: float = 0.0,
        delay_when: Callable[[str, str], bool] | None = None,
    ) -> None:
        host, _, port = upstream_url.removeprefix("http://").rstrip("/").partition(":")
        self._server = _ProxyServer((host, int(port or 80)), fault_rate, seed, delay_s, delay_when)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self._server.server_address[1]}"

    @property
    def stats(self) -> ProxyStats:
        return self._server.stats

    @property
    def fault_rate(self) -> float:
        return self._server.fault_rate

    @fault_rate.setter
    def fault_rate(self, value: float) -> None:
        self._server.fault_rate = value

    def start(self) -> SlowDownProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> SlowDownProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TcpProxy:
    """Forwards TCP connections from a loopback port to ``upstream`` until :meth:`cut`."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.outages = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    @property
    def up(self) -> bool:
        return self._listener is not None

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def cut(self) -> None:
        """Reset every open connection and refuse new ones (the server is gone)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            with suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with suppress(OSError):
                # SO_LINGER 0: close with RST, as a server that died would look
                conn.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                conn.close()
        self.outages += 1

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        if self._listener is None:
            self.start()

    @contextmanager
    def outage(self, seconds: float) -> Iterator[None]:
        self.cut()
        try:
            time.sleep(seconds)
            yield
        finally:
            self.restore()

    def stop(self) -> None:
        self.cut()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    server.close()
                    continue
                self._conns.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)


# --- committer fault hooks -------------------------------------------------------------------


class CommitterCrash(Exception):
    """A committer dying at a fault point, in-process (see :func:`raise_at`)."""


def raise_at(point: str) -> FaultHook:
    """A fault hook that raises :class:`CommitterCrash` at ``point``: the committer's state in
    Redis and the catalog is what a crash there leaves, and its lock is released on the way out
    (as its TTL would free it)."""

    def hook(reached: str) -> None:
        if reached == point:
            raise CommitterCrash(point)

    return hook


def crash_at(point: str, exit_code: int = 17) -> FaultHook:
    """A fault hook that kills the process the hard way (no cleanup, no ``finally``) at ``point``."""

    def hook(reached: str) -> None:
        if reached == point:
            os._exit(exit_code)

    return hook
