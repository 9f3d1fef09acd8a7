"""The load generator's client: streaming completions over wire.Pool, one record per request
(when each token arrived), bounded by concurrency, a Poisson rate and --max-duration."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field

import httpx

from .cpu import cpu_used
from .datasets import Prompt
from .stats import arrival_offsets, itls, tpot
from .wire import Pool

WARMUP_FAILED = "every warm-up request failed"


@dataclass
class RequestRecord:
    index: int
    prompt_len: int | None  # ids sent; None for a text prompt
    max_tokens: int
    sent: bool = False
    finished: bool = False
    success: bool = False
    error: str | None = None
    start_s: float | None = None  # when it was sent, s after the run's start
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    output_tokens_from: str | None = None  # "usage" or "chunks"
    usage_prompt_tokens: int | None = None
    finish_reason: str | None = None
    token_times_s: list[float] = field(default_factory=list)  # token chunk arrivals, s after sending
    itl_s: list[float] = field(default_factory=list)
    text_chars: int = 0

    @property
    def input_tokens(self) -> int:
        return self.prompt_len if self.prompt_len is not None else (self.usage_prompt_tokens or 0)


class RequestFailed(Exception):
    pass


def _error_text(obj: dict) -> str:
    err = obj.get("error", obj)
    if isinstance(err, dict):
        msg = err.get("message") or json.dumps(err)[:300]
        kind = err.get("type") or err.get("code")
        return f"{kind}: {msg}" if kind else str(msg)
    return str(err)[:300]


def _sse_data(raw: bytes, rec: RequestRecord, st: float, now: float) -> bool:
    """One ``data:`` line of the stream into ``rec`` (``now``: when it arrived); True at
    ``data: [DONE]``. (The caller skips every other line: blank separators, ": comments",
    event:/id: fields.)"""
    data = raw[5:].strip()
    if data == b"[DONE]":
        return True
    try:
        obj = json.loads(data)  # bytes: json decodes the UTF-8 itself
    except ValueError:  # UnicodeDecodeError included
        raise RequestFailed(f"malformed SSE data: {data[:200]!r}") from None
    if not isinstance(obj, dict):
        raise RequestFailed(f"SSE data is not an object: {data[:200]!r}")
    if "error" in obj or obj.get("object") == "error":
        raise RequestFailed(f"error chunk: {_error_text(obj)}")
    choices = obj.get("choices")
    if choices:
        c = choices[0] if isinstance(choices[0], dict) else {}
        text, role_only = c.get("text"), False
        if text is None and isinstance(c.get("delta"), dict):  # chat-style chunks
            text = c["delta"].get("content")
            role_only = "role" in c["delta"] and not text  # the role chunk is no token
        text = text or ""
        finish = c.get("finish_reason")
        if text or (finish is None and not role_only):
            rec.token_times_s.append(now - st)
            rec.text_chars += len(text)
        if finish:
            rec.finish_reason = finish
    usage = obj.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            rec.output_tokens_from = "usage"
            rec.output_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            rec.usage_prompt_tokens = usage["prompt_tokens"]
    return False


class _SSE:
    """The sink of one streamed response (wire.Sink): splits what arrives into lines, reads each
    ``data:`` line into the record, and says when ``data: [DONE]`` came."""
    __slots__ = ("rec", "st", "max_tokens", "max_lines", "lines", "rest", "done")

    def __init__(self, rec: RequestRecord, st: float, max_tokens: int):
        self.rec, self.st, self.max_tokens, self.rest, self.lines, self.done = rec, st, max_tokens, b"", 0, False
        self.max_lines = 8 * max_tokens + 64  # a bound on the SSE lines besides --timeout

    def __call__(self, data: bytes) -> bool:
        now = time.perf_counter()
        *whole, self.rest = (self.rest + data).split(b"\n")
        self.lines += len(whole)
        if self.lines > self.max_lines:
            raise RequestFailed(f"more than {self.max_lines} SSE lines for max_tokens {self.max_tokens}")
        for raw in whole:
            if raw.startswith(b"data:") and _sse_data(raw, self.rec, self.st, now):
                self.done = True  # stops at [DONE]
                return True
        return False


async def _stream(pool: Pool, headers: dict, payload: dict, rec: RequestRecord, st: float) -> None:
    sse = _SSE(rec, st, payload["max_tokens"])
    status, head = await pool.post("", headers, json.dumps(payload).encode(), sse)
    if status != 200:
        raise RequestFailed(f"HTTP {status}: {head.decode('utf-8', 'replace').strip()}")
    if not sse.done and sse.rest.startswith(b"data:"):
        sse.done = _sse_data(sse.rest, rec, st, time.perf_counter())  # a last line without its newline
    if not sse.done:
        raise RequestFailed("stream ended without data: [DONE]")
    if not rec.token_times_s:
        raise RequestFailed("no token chunk received")


async def send_request(pool: Pool, headers: dict, payload: dict, rec: RequestRecord, t0: float,
                       timeout: float) -> RequestRecord:
    """Send one streaming request and fill ``rec``; never raises (but for cancellation)."""
    rec.sent = True
    st = time.perf_counter()
    rec.start_s = st - t0
    try:
        await asyncio.wait_for(_stream(pool, headers, payload, rec, st), timeout)
        rec.e2e_s = time.perf_counter() - st
        rec.ttft_s = rec.token_times_s[0]
        if rec.output_tokens_from is None:
            rec.output_tokens_from, rec.output_tokens = "chunks", len(rec.token_times_s)
        rec.tpot_s = tpot(rec.ttft_s, rec.e2e_s, rec.output_tokens)
        rec.itl_s = itls(rec.token_times_s)
        rec.success = True
    except asyncio.TimeoutError:
        rec.error = f"timeout: no complete response within --timeout {timeout:g} s"
    except RequestFailed as e:
        rec.error = str(e)
    except Exception as e:  # noqa: BLE001 - a request's failure (connection, protocol) must not end the run
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        if rec.e2e_s is None:
            rec.e2e_s = time.perf_counter() - st
        rec.finished = True
    return rec


def make_payload(p: Prompt, model: str | None, temperature: float) -> dict:
    body = {"prompt": p.prompt, "max_tokens": p.max_tokens, "temperature": temperature,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body = {"model": model, **body}
    return body


def auth_headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def resolve_model(base_url: str, api_key: str | None, timeout: float = 10.0) -> tuple[str | None, str | None]:
    """(first model id from GET /v1/models, or None; a warning when that failed)."""
    try:
        with httpx.Client(timeout=timeout, trust_env=False) as c:
            r = c.get(base_url.rstrip("/") + "/v1/models", headers=auth_headers(api_key))
        r.raise_for_status()
        data = r.json().get("data") or []
        if data and data[0].get("id"):
            return data[0]["id"], None
        return None, "GET /v1/models listed no model"
    except Exception as e:  # noqa: BLE001
        return None, f"GET /v1/models failed ({type(e).__name__}: {e})"


@dataclass
class BenchRun:
    records: list[RequestRecord]
    duration_s: float
    stopped: str | None  # why the run stopped early, or None
    warmup_errors: list[str]
    cpu_s: list | None = None  # cpu_used() of cpu_probe()'s snapshots at the timed run's start and end


async def run_benchmark(url: str, prompts: list[Prompt], *, model: str | None, temperature: float,
                        request_rate: float, max_concurrency: int | None, seed: int, timeout: float,
                        max_duration: float, api_key: str | None = None, num_warmups: int = 0,
                        progress=None, cpu_probe=None) -> BenchRun:
    headers = auth_headers(api_key)
    records = [RequestRecord(i, len(p.ids) if p.ids is not None else None, p.max_tokens)
               for i, p in enumerate(prompts)]
    offsets = arrival_offsets(len(prompts), request_rate, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    def slot():  # a place among --max-concurrency requests in flight (any number without it)
        return sem if sem is not None else contextlib.nullcontext()
    pool = Pool(url)  # connections opened as requests need them: at most the requests in flight
    try:
        # untimed: the first prompt, at most 8 tokens, at the run's concurrency (as vLLM's bench
        # serve warms up), so the timed run starts on open connections
        warm = Prompt(prompts[0].prompt, min(prompts[0].max_tokens, 8)) if prompts else None

        async def warm_one(w: int) -> RequestRecord:
            async with slot():
                return await send_request(pool, headers, make_payload(warm, model, temperature),
                                          RequestRecord(-1 - w, None, warm.max_tokens), time.perf_counter(), timeout)

        warmed = await asyncio.gather(*(warm_one(w) for w in range(num_warmups if prompts else 0)))
        warm_errors = [r.error or "failed" for r in warmed if not r.success]
        if num_warmups and len(warm_errors) == num_warmups:
            return BenchRun(records, 0.0, WARMUP_FAILED, warm_errors)

        cpu_before = cpu_probe() if cpu_probe else None
        t0 = time.perf_counter()
        deadline = t0 + max_duration
        stopped = None

        async def one(rec: RequestRecord, p: Prompt):
            async with slot():
                await send_request(pool, headers, make_payload(p, model, temperature), rec, t0, timeout)
            if progress:
                progress(rec)

        tasks = []
        for rec, p, off in zip(records, prompts, offsets):
            if t0 + off >= deadline:
                stopped = f"--max-duration {max_duration:g} s reached"
                break
            delay = t0 + off - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(rec, p)))
        pending = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        if pending:
            stopped = f"--max-duration {max_duration:g} s reached"
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        t_end = time.perf_counter()
        cpu_after = cpu_probe() if cpu_probe else None
    finally:
        pool.close()
    for rec in records:
        if rec.sent and not rec.success and rec.error is None:
            rec.error = "aborted: --max-duration reached while in flight"
            rec.finished = True
    return BenchRun(records, t_end - t0, stopped, warm_errors, cpu_used(cpu_before, cpu_after))
