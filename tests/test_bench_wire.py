"""scripts/serve_bench/wire.py, the load generator's HTTP/1.1 client, against a raw ASGI app on
uvicorn (a free 127.0.0.1 port, in a thread) whose responses are known: the streamed body
reaches the sink whole and in order, keep-alive connections are reused (and only when the
server keeps them), a request's result is its own when its connection goes on to the next
request at once, and errors (a status, a cut stream, a sink's exception, a timeout) fail
only their request."""
import asyncio
import json
import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("httptools")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from asgi_thread import serve_in_thread  # noqa: E402
from serve_bench.wire import ConnectionClosed, Pool  # noqa: E402


async def app(scope, receive, send):
    """POST body {"n": chunks, "mode": ...}: streams n chunks "<port>:<i>;" (the client's port
    names its connection) as separate body messages. mode "close": Connection: close;
    "cut": the app fails after two chunks (uvicorn drops the connection); "status": 503 and a
    1000-byte body; "slow": 0.5 s before the body."""
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    req = json.loads(body)
    mode, port = req.get("mode", "ok"), scope["client"][1]
    if mode == "status":
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"x" * 1000})
        return
    headers = [(b"content-type", b"text/event-stream")] + ([(b"connection", b"close")] if mode == "close" else [])
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if mode == "slow":
        await asyncio.sleep(0.5)
    for i in range(req["n"]):
        if mode == "cut" and i == 2:
            raise RuntimeError("the app fails mid-stream")
        await send({"type": "http.response.body", "body": f"{port}:{i};".encode(), "more_body": True})
        await asyncio.sleep(0)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.fixture(scope="module")
def base_url():
    pytest.importorskip("uvicorn")
    with serve_in_thread(app, log_level="critical", http="httptools") as url:
        yield url


class Collect:
    """A sink that keeps what it got; True (the end) once it has seen ``stop``."""

    def __init__(self, stop: bytes | None = None):
        self.data, self.calls, self.stop = b"", 0, stop

    def __call__(self, b: bytes) -> bool:
        self.data += b
        self.calls += 1
        return self.stop is not None and self.stop in self.data

    def chunks(self):
        return [c.split(":") for c in self.data.decode().split(";") if c]


def post(pool, n, mode="ok", sink=None):
    return pool.post("/s", {"X-Test": "1"}, json.dumps({"n": n, "mode": mode}).encode(), sink or Collect())


def test_stream_reaches_the_sink_and_connections_are_reused(base_url):
    async def main():
        pool = Pool(base_url)
        ports = []
        for n in (5, 1, 40):
            s = Collect()
            assert await post(pool, n, sink=s) == (200, b"")
            got = s.chunks()
            assert [int(i) for _, i in got] == list(range(n))  # whole and in order
            ports += [p for p, _ in got]
        assert len(set(ports)) == 1  # one keep-alive connection for the three
        # 16 at once, each followed at once by another on whatever connection is free: 16
        # connections, and each result is its own (the connection may already serve the next)
        sinks = [[Collect(), Collect()] for _ in range(16)]

        async def two(k):
            r1 = await post(pool, 3 + k, sink=sinks[k][0])
            r2 = await post(pool, 20 - k, sink=sinks[k][1])
            return r1, r2
        res = await asyncio.gather(*(two(k) for k in range(16)))
        assert all(r == ((200, b""), (200, b"")) for r in res)
        for k in range(16):
            assert [int(i) for _, i in sinks[k][0].chunks()] == list(range(3 + k))
            assert [int(i) for _, i in sinks[k][1].chunks()] == list(range(20 - k))
        used = {p for ss in sinks for s in ss for p, _ in s.chunks()}
        assert len(used) <= 16
        assert len(pool.open) == len(used) and len(pool.idle) == len(used)
        pool.close()
        assert not pool.open and not pool.idle
    asyncio.run(main())


def test_the_sinks_end_returns_before_the_body_ends(base_url):
    async def main():
        pool = Pool(base_url)
        s = Collect(stop=b":3;")
        assert await post(pool, 50, sink=s) == (200, b"")
        assert b":3;" in s.data and b":49;" not in s.data  # returned at the sink's True
        await asyncio.sleep(0.2)  # the rest of the body is read and dropped; then the connection is free
        port = s.chunks()[0][0]
        s2 = Collect()
        assert await post(pool, 2, sink=s2) == (200, b"")
        assert {p for p, _ in s2.chunks()} == {port}
        pool.close()
    asyncio.run(main())


def test_errors_fail_their_request_only(base_url):
    async def main():
        pool = Pool(base_url)
        s = Collect()
        status, head = await post(pool, 3, "status", sink=s)
        assert status == 503 and head == b"x" * 500 and s.calls == 0
        # Connection: close: the next request opens a new connection
        a, b = Collect(), Collect()
        assert await post(pool, 2, "close", sink=a) == (200, b"")
        assert await post(pool, 2, sink=b) == (200, b"")
        assert a.chunks()[0][0] != b.chunks()[0][0]
        # a stream cut short
        c = Collect()
        with pytest.raises(ConnectionClosed, match="before the response ended"):
            await post(pool, 10, "cut", sink=c)
        assert [int(i) for _, i in c.chunks()] == [0, 1]

        # the sink's exception is the request's, and its connection is not reused
        def bad(data):
            raise ValueError("the sink refuses")
        with pytest.raises(ValueError, match="the sink refuses"):
            await post(pool, 3, sink=bad)
        assert not pool.open and not pool.idle  # every connection so far was closed (by either side)
        # a timeout (cancellation) closes its connection
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(post(pool, 3, "slow"), 0.1)
        assert not pool.open and not pool.idle
        d = Collect()
        assert await post(pool, 4, sink=d) == (200, b"")  # still serving
        assert len(d.chunks()) == 4
        pool.close()
        # nobody listening
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        dead = Pool(f"http://127.0.0.1:{free.getsockname()[1]}")
        free.close()
        with pytest.raises(OSError):
            await post(dead, 1)
    asyncio.run(main())


def test_request_bytes_and_bad_urls():
    p = Pool("http://127.0.0.1:8000/v1/completions/")
    raw = p.request_bytes("", {"Authorization": "Bearer k"}, b'{"a": 1}')
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/completions HTTP/1.1" and body == b'{"a": 1}'
    assert set(lines[1:]) == {"Host: 127.0.0.1:8000", "Content-Type: application/json", "Content-Length: 8",
                              "Authorization: Bearer k"}
    assert b"Host: example.org\r\n" in Pool("https://example.org").request_bytes("/x", {}, b"")
    with pytest.raises(ValueError, match="line break"):
        p.request_bytes("", {"X": "a\r\nInjected: 1"}, b"")
    for bad in ("ftp://h/", "127.0.0.1:8000", "http://"):
        with pytest.raises(ValueError, match="expected http"):
            Pool(bad)


def test_a_body_delimited_by_the_close():
    """An HTTP/1.0-style response (no Content-Length, not chunked) ends when the server closes:
    its status and body are the response's, not an error; a framed body cut short still is."""
    replies = {
        b"/eof": b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2\n\n",
        b"/busy": b"HTTP/1.0 503 Service Unavailable\r\n\r\nbusy",
        b"/short": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
    }

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        n = int(next(v for k, v in (ln.split(b": ", 1) for ln in head.split(b"\r\n")[1:] if b": " in ln)
                     if k.lower() == b"content-length"))
        await reader.readexactly(n)
        writer.write(replies[head.split(b" ")[1]])
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        pool = Pool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        s = Collect()
        assert await pool.post("/eof", {}, b"{}", s) == (200, b"")
        assert s.data == b"data: 1\n\ndata: 2\n\n"
        assert await pool.post("/busy", {}, b"{}", Collect()) == (503, b"busy")
        with pytest.raises(ConnectionClosed):
            await pool.post("/short", {}, b"{}", Collect())
        assert not pool.open
        server.close()
        await server.wait_closed()
    asyncio.run(main())
