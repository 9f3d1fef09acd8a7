"""The load generator's HTTP/1.1 client: keep-alive connections as asyncio protocols, responses
parsed by httptools (the parser uvicorn takes), and a streamed body handed to the caller's
``sink`` inside the event loop's read callback.

Why not aiohttp: on a machine the client shares with the server it measures, the client's CPU
per streamed chunk is taken from the server. aiohttp wakes the reading task once per chunk and
runs its stream reader's machinery around it; here a chunk costs one ``data_received`` call, the
parser's callbacks and the sink, and the waiting coroutine wakes once per request.

    pool = Pool("http://127.0.0.1:8000")
    status, head = await pool.post("/v1/completions", {"Authorization": ...}, body, sink)
    pool.close()

``sink(data: bytes) -> bool`` sees a 200 response's body as it arrives (any split) and returns
True once it has seen the end it waits for (the caller's ``data: [DONE]``); an exception it
raises fails the request with that exception. Other statuses keep their first 500 body bytes
(``head``) and the sink never runs.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Callable
from urllib.parse import urlsplit

import httptools

Sink = Callable[[bytes], bool]
ERROR_BODY_BYTES = 500


class ConnectionClosed(Exception):
    """The server closed the connection (or it failed) before the response ended."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection; at most one request on it at a time."""

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None  # the current request's (status, head), at its end or the sink's
        self.sink: Sink | None = None
        self.status = 0
        self.head = bytearray()
        self.keep_alive = False
        self.framed = False  # the response has a Content-Length or is chunked: else the close ends it

    # ---- asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ConnectionClosed("the server switched protocols"))
        except httptools.HttpParserError as e:
            self._fail(ConnectionClosed(f"malformed HTTP response: {e}"))

    def connection_lost(self, exc):
        self.closed = True
        self.pool.forget(self)
        w = self.waiter
        if w is not None and not w.done():
            if self.status and not self.framed and exc is None:  # a body delimited by the close (HTTP/1.0)
                w.set_result((self.status, bytes(self.head)))
                return
            why = f": {exc}" if exc else ""
            w.set_exception(ConnectionClosed(f"the server closed the connection before the response ended{why}"))

    # ---- httptools callbacks
    def on_header(self, name: bytes, value: bytes):
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self):
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes):
        if self.status != 200:
            if len(self.head) < ERROR_BODY_BYTES:
                self.head += body[: ERROR_BODY_BYTES - len(self.head)]
            return
        w = self.waiter
        if self.sink is None or w is None or w.done():
            return  # the request already ended (its [DONE] seen): the rest of the body is dropped
        try:
            if self.sink(body):
                w.set_result((200, b""))
        except Exception as e:  # noqa: BLE001 - the sink's verdict on the stream: the request fails with it
            self._fail(e)

    def on_message_complete(self):  # the only place a connection goes back to the pool
        w = self.waiter
        if w is not None and not w.done():
            w.set_result((self.status, bytes(self.head)))
        if self.keep_alive and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    # ----
    def _fail(self, exc: Exception):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.close()

    def close(self):
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def start(self, data: bytes, sink: Sink) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.sink, self.status, self.head, self.framed = sink, 0, bytearray(), False
        self.transport.write(data)
        return self.waiter


class Pool:
    """Keep-alive connections to one ``http://`` or ``https://`` origin, opened as needed (the
    caller bounds how many requests are in flight); no proxy, no redirects, no retries."""

    def __init__(self, base_url: str):
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"base URL {base_url!r}: expected http://HOST[:PORT][/PATH] or https://...")
        self.host, self.ssl = u.hostname, (ssl.create_default_context() if u.scheme == "https" else None)
        self.port = u.port or (443 if self.ssl else 80)
        self.prefix = u.path.rstrip("/")
        default_port = self.port == (443 if self.ssl else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        self.authority = host if default_port else f"{host}:{self.port}"
        self.idle: list[_Conn] = []
        self.open: set[_Conn] = set()

    def release(self, c: _Conn):
        self.idle.append(c)

    def forget(self, c: _Conn):
        self.open.discard(c)
        if c in self.idle:
            self.idle.remove(c)

    async def _connection(self) -> _Conn:
        while self.idle:
            c = self.idle.pop()
            if not c.closed:
                return c
        loop = asyncio.get_running_loop()
        _, c = await loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self.ssl,
                                            server_hostname=self.host if self.ssl else None)
        self.open.add(c)
        return c

    def request_bytes(self, path: str, headers: dict, body: bytes) -> bytes:
        """The request's bytes: its line, headers and body (h11 would take ~0.3 ms a request)."""
        lines = [f"POST {self.prefix + path or '/'} HTTP/1.1", f"Host: {self.authority}",
                 "Content-Type: application/json", f"Content-Length: {len(body)}"]
        for k, v in headers.items():
            if any(c in f"{k}{v}" for c in "\r\n\0") or ":" in k:
                raise ValueError(f"header {k!r}: a name or value with a line break, NUL or a colon in the name")
            lines.append(f"{k}: {v}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def post(self, path: str, headers: dict, body: bytes, sink: Sink) -> tuple[int, bytes]:
        """POST ``body`` (JSON) to ``path``; returns (status, the first bytes of a non-200 body).
        A 200 response has ended when this returns: at the sink's True or the body's end. Raises
        ConnectionClosed, OSError or the sink's exception; cancelled, it closes the connection."""
        data = self.request_bytes(path, headers, body)
        c = await self._connection()
        w = c.start(data, sink)
        try:
            # the result, not c's fields: once the response ends, c may take another request
            # before this coroutine resumes
            return await w
        except BaseException:
            if c.waiter is w:
                c.close()  # mid-response: the connection cannot take another request
            raise

    def close(self):
        for c in list(self.open):
            c.close()
