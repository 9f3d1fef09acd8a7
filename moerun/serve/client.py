"""The HTTP process's view of the engine: ``EngineClient`` sends requests to the
``EngineLoop`` in the engine process over the pipe and reads its messages in the event
loop itself (``add_reader`` on the pipe), putting each step's items into the requests'
inboxes: one wake-up of the event loop per engine step, no thread in between. Everything
but ``attach`` and ``wait`` runs in that event loop's thread.

    client = EngineClient(conn, on_stats, on_ready)
    client.attach(asyncio_loop)    # the loop (uvicorn's) starts reading the engine's pipe
    h = client.submit(prompt_ids, params)            # an inbox of its own
    h2 = client.submit(prompt_ids, params, inbox, owner=x)   # or a shared one
    for h, item, t in await h.inbox.take(): ...   # (its handle, Accepted, None), then Tokens
                                     # (t: the monotonic time of the step that made it)..., or Failed
    client.abort(h)                # client gone, stop string: the engine frees its KV blocks
    client.queued(), client.draining, client.stopped      # for /health and --max-waiting
    client.wait()                  # the HTTP process's main thread: until the pipe closes

When the pipe closes (the engine process ended or failed) every request still open gets
``Failed(500)`` and ``stopped`` turns True.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import threading
from dataclasses import dataclass
from typing import Callable

from .loop import Failed, Stats, Token

log = logging.getLogger("moerun")


class Inbox:
    """Where a request's engine items wait for the coroutine that reads them: ``put`` (the
    pipe's reader), ``await take()`` every item put since the last take, waiting for the
    first. One list and one future: less work per token than an asyncio.Queue's put and
    get, and all of a step's items in one wake-up."""
    __slots__ = ("items", "waiter")

    def __init__(self):
        self.items: list = []
        self.waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        self.items.append(item)
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def take(self) -> list:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.items = self.items, []
        return items


@dataclass(eq=False)
class RequestHandle:
    hid: int
    inbox: Inbox  # gets (this handle, item, t) for each engine item
    owner: object = None  # whatever the submitter wants to find from an item of a shared inbox


class EngineClient:
    def __init__(self, conn, on_stats: Callable[[Stats], None] | None = None,
                 on_ready: Callable[[int, int], None] | None = None):
        self.conn, self.on_stats, self.on_ready = conn, on_stats, on_ready
        self.fd = conn.fileno()
        self.buf = bytearray()  # bytes read from the pipe, not yet a whole message
        self.ids = itertools.count()
        self.open: dict[int, RequestHandle] = {}
        self.draining = self.stopped = False
        self.stats = Stats(0, 0, 0.0, 0)
        self.unanswered: set[int] = set()  # submitted, not yet accepted or refused: they wait too
        self.aio: asyncio.AbstractEventLoop | None = None  # the loop that reads the pipe (attach)
        self.closed = threading.Event()  # the pipe closed: every request still open has failed

    # ------------------------------------------------------------- requests
    def submit(self, prompt: list[int], params, inbox: Inbox | None = None, owner=None) -> RequestHandle:
        h = RequestHandle(next(self.ids), inbox if inbox is not None else Inbox(), owner)
        if self.stopped:
            h.inbox.put((h, Failed(500, "the engine has stopped"), None))
        elif self.draining:
            h.inbox.put((h, Failed(503, "the server is shutting down"), None))
        else:
            self.open[h.hid] = h
            self.unanswered.add(h.hid)
            # (plain pickle: Connection.send's ForkingPickler costs more than the request's pickle)
            self.conn.send_bytes(pickle.dumps(("submit", h.hid, prompt, params), pickle.HIGHEST_PROTOCOL))
        return h

    def abort(self, h: RequestHandle) -> None:
        if self.open.pop(h.hid, None) is not None and not self.stopped:
            self.conn.send(("abort", h.hid))

    def queued(self) -> int:
        """Requests not yet running: for the --max-waiting check."""
        return self.stats.waiting + len(self.unanswered)

    # ------------------------------------------------------ the engine's messages
    def attach(self, aio: asyncio.AbstractEventLoop) -> None:
        """Read the engine's messages in ``aio``'s own thread (``add_reader`` on the pipe):
        each step's items go straight into the inboxes, with no reader thread to wake and no
        interpreter lock handed back and forth per step. Callable from any thread."""
        self.aio = aio
        aio.call_soon_threadsafe(aio.add_reader, self.fd, self._readable)

    def wait(self, timeout: float | None = None) -> bool:
        """Block (the HTTP process's main thread) until the engine's pipe has closed."""
        return self.closed.wait(timeout)

    def _readable(self) -> None:
        """What the pipe holds, in one read: every whole message in it (framed as
        ``Connection.send`` frames them: a 4-byte big-endian length, then the pickle) is
        handled, a partial one waits for the rest. (``Connection.recv`` would take two
        reads and a buffer object per message, on the thread that writes every stream.)"""
        try:
            data = os.read(self.fd, 1 << 16)
        except OSError:
            data = b""
        if not data:  # the engine process closed the pipe
            self._stop()
            return
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= 4 and not self.stopped:
            size = int.from_bytes(buf[pos:pos + 4], "big", signed=True)
            if size < 0:  # Connection's frame for 2 GiB and more: no message of ours is. A
                # raise here would leave the reader firing on the same bytes: end it instead
                log.error("a message of 2 GiB or more from the engine process: closing the pipe")
                self._stop()
                return
            if end - pos - 4 < size:
                break
            self._message(pickle.loads(buf[pos + 4:pos + 4 + size]))
            pos += 4 + size
        del buf[:pos]

    def _message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "step":
            self._step(*msg[1:])
        elif kind == "drain":
            self.draining = True
        elif kind == "ready":
            self.on_ready(*msg[1:])
        elif kind == "stop":
            self._stop()

    def _step(self, items, stats: Stats, t_step: float | None, hids: list[int], tokens: list[int]) -> None:
        self.stats = stats
        for hid, item, t in items:
            if type(item) is tuple:  # a token event
                item = Token._make(item)
                last = item.finished
            else:  # Accepted or Failed
                self.unanswered.discard(hid)
                last = isinstance(item, Failed)
            h = self.open.pop(hid, None) if last else self.open.get(hid)
            if h is not None:  # else aborted here already
                h.inbox.put((h, item, t))
        get = self.open.get
        for hid, token in zip(hids, tokens):  # plain tokens: not the last, no log probabilities
            h = get(hid)
            if h is not None:
                h.inbox.put((h, Token(token, False, None, None, ()), t_step))
        if self.on_stats is not None:
            self.on_stats(stats)

    def _stop(self) -> None:
        self.aio.remove_reader(self.fd)
        self.stopped = True
        left, self.open = list(self.open.values()), {}
        for h in left:
            h.inbox.put((h, Failed(500, "the engine stopped"), None))
        self.closed.set()
