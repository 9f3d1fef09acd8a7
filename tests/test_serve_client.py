"""moerun.serve.loop -> pipe -> moerun.serve.client: every engine event reaches its request's
inbox, in order and unchanged (plain tokens travel as columns, the rest as items), held
back N at a time under --stream-interval; refusals, the pipe's framing (messages split
over reads, larger than one read) and a closed pipe. A fake engine stands in for the model."""
import asyncio
import multiprocessing as mp
import os
import pickle
import random
import threading
import time

import pytest

from moerun.engine.request import TokenEvent
from moerun.options import SamplingParams
from moerun.serve.client import EngineClient, Inbox
from moerun.serve.loop import Accepted, EngineLoop, Failed, Stats, Token


class FakeEngine:
    """Random tokens; a request ends after max_new_tokens (or when aborted); log
    probabilities when asked for; an empty prompt is refused. Records what it emitted."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.reqs: dict[int, list] = {}
        self.emitted: dict[int, list[tuple]] = {}
        self.next_id, self.num_preemptions = 0, 0

    def add_request(self, prompt, params):
        if not prompt:
            raise ValueError("the prompt is empty")
        rid, self.next_id = self.next_id, self.next_id + 1
        self.reqs[rid] = [params.max_new_tokens, 0, params.logprobs is not None, False]
        self.emitted[rid] = []
        return rid

    def has_unfinished(self):
        return bool(self.reqs)

    def abort(self, rid):
        if rid in self.reqs:
            self.reqs[rid][3] = True

    def num_running(self):
        return len(self.reqs)

    def num_waiting(self):
        return 0

    def kv_usage(self):
        return 0.5

    def step(self):
        time.sleep(0.0005)
        events = []
        for rid, r in list(self.reqs.items()):
            if r[3]:
                ev = TokenEvent(rid, None, True, "abort")
            else:
                r[1] += 1
                fin = r[1] >= r[0]
                lp = -self.rng.random() if r[2] else None
                top = ((self.rng.randrange(1000), -1.5),) if r[2] else ()
                ev = TokenEvent(rid, self.rng.randrange(100_000), fin, "length" if fin else None, lp, top)
            events.append(ev)
            self.emitted[rid].append(Token.wire(ev))
            if ev.finished:
                del self.reqs[rid]
        return events


async def _collect(h) -> list[tuple]:
    """Every (item, t) of one request until its last (a finished token or a Failed)."""
    got = []
    while True:
        for _, item, t in await h.inbox.take():
            got.append((item, t))
            if isinstance(item, Failed) or (isinstance(item, Token) and item.finished):
                return got


def _run(interval: int, seed: int, body):
    """An EngineLoop (its own thread) and an EngineClient (this thread's event loop) over a
    pipe; ``body(client, engine)`` is the coroutine; the loop drains and stops at its end."""
    engine_end, http_end = mp.Pipe()
    engine = FakeEngine(seed)
    loop = EngineLoop(engine, engine_end, stream_interval=interval)
    failure = []

    def run_loop():
        try:
            loop.run()
        except BaseException as e:  # noqa: BLE001 - the test reports it
            failure.append(e)
        engine_end.send(("stop",))

    client = EngineClient(http_end)
    runner = threading.Thread(target=run_loop, daemon=True)
    runner.start()

    async def main():
        client.attach(asyncio.get_running_loop())
        try:
            return await asyncio.wait_for(body(client, engine), 30)
        finally:
            loop.drain(0.0)
            await asyncio.get_running_loop().run_in_executor(None, client.wait, 10)

    out = asyncio.run(main())
    runner.join(10)
    assert not failure and not runner.is_alive() and client.stopped
    return out


@pytest.mark.parametrize("interval", [1, 3])
def test_every_event_reaches_its_request_in_order(interval):
    async def body(client, engine):
        rng = random.Random(interval)
        params = [SamplingParams(max_new_tokens=rng.randrange(1, 40), logprobs=(1 if i % 3 == 0 else None))
                  for i in range(24)]
        handles = [client.submit([1, 2, 3], p) for p in params]
        shared = Inbox()  # two more requests into one inbox, as a stream of n choices does
        for k in range(2):
            client.submit([4], SamplingParams(max_new_tokens=5), shared, owner=k)
        results = await asyncio.gather(*(_collect(h) for h in handles))
        merged = []
        while sum(isinstance(i, Token) and i.finished for _, i, _ in merged) < 2:
            merged += [(h.owner, item, t) for h, item, t in await shared.take()]
        return engine, handles, params, results, merged

    engine, _, params, results, merged = _run(interval, 0, body)
    for rid, (p, got) in enumerate(zip(params, results)):
        assert isinstance(got[0][0], Accepted) and got[0][0].req_id == rid
        tokens = [item for item, _ in got[1:]]
        assert all(isinstance(t, Token) for t in tokens)
        assert [tuple(t) for t in tokens] == engine.emitted[rid]  # every field, in order
        times = [t for _, t in got[1:]]
        assert all(t is not None for t in times) and times == sorted(times)
        assert len(tokens) == p.max_new_tokens and tokens[-1].finish_reason == "length"
    for k in range(2):
        mine = [item for owner, item, _ in merged if owner == k]
        assert isinstance(mine[0], Accepted)
        assert [tuple(t) for t in mine[1:]] == engine.emitted[mine[0].req_id]


def test_refusal_abort_and_the_stats():
    async def body(client, engine):
        bad = client.submit([], SamplingParams(max_new_tokens=4))
        refused = await _collect(bad)
        long = client.submit([1], SamplingParams(max_new_tokens=10_000))
        first = await long.inbox.take()
        while len(first) < 3:
            first += await long.inbox.take()
        client.abort(long)  # the client is gone: nothing more reaches it, the engine stops it
        await asyncio.sleep(0.05)
        return refused, first, list(long.inbox.items), dict(engine.reqs), client.stats

    refused, first, after, left, stats = _run(1, 1, body)
    assert len(refused) == 1 and isinstance(refused[0][0], Failed) and refused[0][0].status == 400
    assert "the prompt is empty" in refused[0][0].message
    assert isinstance(first[0][1], Accepted) and not after and not left
    assert isinstance(stats, Stats) and stats.kv_usage == 0.5


def test_the_pipes_framing_and_a_closed_pipe():
    """Messages split over writes, several in one read, one larger than a read; then the
    engine's end closes: the open request fails with a 500 and the client stops."""
    engine_end, http_end = mp.Pipe()
    readies = []
    client = EngineClient(http_end, on_ready=lambda *a: readies.append(a))

    async def main():
        client.attach(asyncio.get_running_loop())
        h = client.submit([1], SamplingParams(max_new_tokens=3))
        assert engine_end.recv()[:2] == ("submit", h.hid)
        frames = [pickle.dumps(m) for m in (("ready", "x" * 300_000, 1), ("ready", "y", 2))]
        raw = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
        fd = engine_end.fileno()
        def write():  # another thread: the pipe holds less than the big message
            for part in (raw[:3], raw[3:70_000], raw[70_000:]):  # a header split, then the rest
                while part:
                    part = part[os.write(fd, part):]
                time.sleep(0.02)
        await asyncio.get_running_loop().run_in_executor(None, write)
        engine_end.send(("step", [(h.hid, Accepted(0), None)], Stats(1, 0, 0.1, 0), time.monotonic(),
                         [h.hid], [42]))
        got = await _collect_until_failed(h)
        return got

    async def _collect_until_failed(h):
        got = []
        while not got or not isinstance(got[-1][1], Failed):
            got += await h.inbox.take()
            if len(got) == 2:
                engine_end.close()  # the engine process is gone
        return got

    got = asyncio.run(asyncio.wait_for(main(), 20))
    assert readies == [("x" * 300_000, 1), ("y", 2)]
    assert isinstance(got[0][1], Accepted) and got[1][1] == Token(42, False, None, None, ())
    assert got[2][1].status == 500 and client.stopped and client.closed.is_set()


def test_the_idle_loop_sleeps_and_wakes_on_a_message_or_a_drain():
    """No request in flight: the loop ticks no step (it waits in select) until a submit comes,
    which it answers at once; a drain wakes it at once too (well before IDLE_WAIT_S), and it
    returns."""
    from moerun.serve import loop as loop_mod

    engine_end, http_end = mp.Pipe()
    engine = FakeEngine(3)
    steps = []
    real_step = engine.step
    engine.step = lambda: steps.append(time.monotonic()) or real_step()
    loop = EngineLoop(engine, engine_end)
    runner = threading.Thread(target=loop.run, daemon=True)
    runner.start()
    time.sleep(0.3)
    assert not steps and runner.is_alive()  # idle: no step
    t0 = time.monotonic()
    http_end.send_bytes(pickle.dumps(("submit", 7, [1, 2], SamplingParams(max_new_tokens=30))))
    answers = []
    while sum(len(m[5]) + sum(1 for it in m[1] if type(it[1]) is tuple) for m in answers if m[0] == "step") < 30:
        assert http_end.poll(5), "no answer from the loop"
        answers.append(http_end.recv())
    assert steps and steps[0] - t0 < 0.2  # woken by the submit, not by the idle timeout
    assert isinstance(answers[0][1][0][1], Accepted)
    n = len(steps)
    time.sleep(0.3)
    assert len(steps) == n  # idle again
    t1 = time.monotonic()
    loop.drain(5.0)
    runner.join(2)
    assert not runner.is_alive() and time.monotonic() - t1 < 0.2 < loop_mod.IDLE_WAIT_S
    loop.drain(1.0)  # after the loop ended: nothing to wake, no error
