"""The HTTP process's view of the engine: ``EngineClient`` sends requests to the
``EngineLoop`` in the engine process over the pipe and hands its events to each request's
asyncio queue, one wake-up of the event loop per engine step.

    client = EngineClient(conn, on_stats)
    h = client.submit(prompt_ids, params, asyncio_loop)   # thread-safe; a queue of its own
    h2 = client.submit(prompt_ids, params, asyncio_loop, queue=q, owner=x)  # or a shared one
    h, item, t = await h.queue.get()  # (its handle, Accepted, None), then TokenEvents (t: the
                                      # monotonic time of the step that made it)..., or Failed
    client.abort(h)                # client gone, stop string: the engine frees its KV blocks
    client.queued(), client.draining, client.stopped      # for /health and --max-waiting
    client.run()                   # the HTTP process's main thread: read the engine's messages

When the pipe closes (the engine process ended or failed) every request still open gets
``Failed(500)`` and ``stopped`` turns True.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass
from typing import Callable

from .loop import Accepted, Failed, Stats


@dataclass(eq=False)
class RequestHandle:
    hid: int
    queue: asyncio.Queue  # gets (this handle, item, t) for each engine item
    aio: asyncio.AbstractEventLoop
    owner: object = None  # whatever the submitter wants to find from an item of a shared queue


def _deliver(items) -> None:
    for h, item, t in items:
        h.queue.put_nowait((h, item, t))


class EngineClient:
    def __init__(self, conn, on_stats: Callable[[Stats], None] | None = None,
                 on_ready: Callable[[int, int], None] | None = None):
        self.conn, self.on_stats, self.on_ready = conn, on_stats, on_ready
        self.ids = itertools.count()
        self.open: dict[int, RequestHandle] = {}
        self.lock = threading.Lock()
        self.draining = self.stopped = False
        self.stats = Stats(0, 0, 0.0, 0)
        self.unanswered: set[int] = set()  # submitted, not yet accepted or refused: they wait too


    # ------------------------------------------------------- event-loop side
    def submit(self, prompt: list[int], params, aio: asyncio.AbstractEventLoop,
               queue: asyncio.Queue | None = None, owner=None) -> RequestHandle:
        h = RequestHandle(next(self.ids), queue if queue is not None else asyncio.Queue(), aio, owner)
        with self.lock:
            if self.stopped:
                h.queue.put_nowait((h, Failed(500, "the engine has stopped"), None))
                return h
            if self.draining:
                h.queue.put_nowait((h, Failed(503, "the server is shutting down"), None))
                return h
            self.open[h.hid] = h
            self.unanswered.add(h.hid)
            self.conn.send(("submit", h.hid, prompt, params))
        return h

    def abort(self, h: RequestHandle) -> None:
        with self.lock:
            if self.open.pop(h.hid, None) is not None and not self.stopped:
                self.conn.send(("abort", h.hid))

    def queued(self) -> int:
        """Requests not yet running: for the --max-waiting check."""
        return self.stats.waiting + len(self.unanswered)

    # ---------------------------------------------- the HTTP process's main thread
    def run(self) -> None:
        """Read the engine's messages until the pipe closes."""
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "stop":
                break
            if msg[0] == "drain":
                self.draining = True
                continue
            if msg[0] == "ready":
                self.on_ready(*msg[1:])
                continue
            _, items, stats = msg
            by_loop: dict = {}
            with self.lock:
                self.stats = stats
                for hid, item, t in items:
                    if isinstance(item, (Accepted, Failed)):
                        self.unanswered.discard(hid)
                    h = self.open.get(hid)
                    if h is None:
                        continue  # aborted here already
                    if isinstance(item, Failed) or getattr(item, "finished", False):
                        del self.open[hid]
                    by_loop.setdefault(h.aio, []).append((h, item, t))
            for aio, batch in by_loop.items():
                aio.call_soon_threadsafe(_deliver, batch)
            if self.on_stats is not None:
                self.on_stats(stats)
        with self.lock:
            self.stopped = True
            left, self.open = list(self.open.values()), {}
        for h in left:
            h.aio.call_soon_threadsafe(h.queue.put_nowait, (h, Failed(500, "the engine stopped"), None))
