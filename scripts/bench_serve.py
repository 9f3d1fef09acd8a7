"""Online serving benchmark for an OpenAI-compatible completions server (after vLLM's
``vllm bench serve``): send N streaming requests with Poisson arrivals (or all at once),
optionally capped in concurrency, and report throughput and latency as the client saw them.

    # against a server that is already running (moerun serve, vLLM, ...)
    python scripts/bench_serve.py --base-url http://127.0.0.1:8000 --num-prompts 100 \\
        --request-rate 8 --max-concurrency 16 --save-result out.json --plot plots/

    # start `python -m moerun.serve ARGS --host 127.0.0.1 --port <free>` itself, benchmark
    # it, stop it, then run the same prompts through the offline engine for a ratio
    python scripts/bench_serve.py --launch "--model tiny --weights-seed 0" --compare-offline

What is measured
    Each request is a POST to ``--endpoint`` (default /v1/completions) with ``stream: true``,
    ``stream_options: {include_usage: true}``, ``ignore_eos: true`` and ``temperature: 0``
    (unless ``--temperature``), so each asks for exactly ``max_tokens`` tokens. The reply is
    read as server-sent events: ``data: {json}`` lines, ending with ``data: [DONE]``.
    A *token chunk* is a data chunk whose ``choices`` list is non-empty; its text may be ""
    (a byte that is not yet a whole UTF-8 character), but a chunk with empty text that only
    carries a ``finish_reason`` is not a token. The usage chunk (``choices: []``) gives the
    request's output token count (``usage.completion_tokens``); without one, the number of
    token chunks is used. Times come from ``time.perf_counter`` in this (client) process.

    A request succeeds when the server answered HTTP 200, sent at least one token chunk,
    sent no error chunk (``{"error": ...}`` or ``"object": "error"``) and ended with
    ``[DONE]`` within ``--timeout`` seconds. Anything else (HTTP error, connection error,
    error chunk, malformed chunk, timeout, stream cut short) is recorded with its error text
    and counted as failed; the run goes on. Only successful requests enter the figures below.

Metrics (per request, then mean / median / P90 / P99 over requests, in ms)
    TTFT   time to first token: from sending the request to the arrival of its first token chunk.
    TPOT   time per output token after the first: (E2E - TTFT) / (output tokens - 1); requests
           with one output token have none.
    ITL    inter-token latency: the gaps between successive token chunks of a request, all
           requests' gaps pooled (a chunk carrying several tokens is one gap).
    E2E    end-to-end latency: from sending the request to the end of its stream ([DONE]).
Run totals
    duration                 from the first arrival to the end of the last request (or to
                             --max-duration when that bound stopped the run).
    request throughput       successful requests / duration.
    output token throughput  output tokens of successful requests / duration.
    total token throughput   (input + output tokens of successful requests) / duration; input
                             tokens are the prompt's id count, or usage.prompt_tokens for a
                             text prompt.
    goodput                  successful requests meeting every SLO given (TTFT <= --slo-ttft-ms,
                             TPOT <= --slo-tpot-ms; a request without a TPOT meets that one) /
                             duration. Printed only when an SLO is given.
    served / offline         (--compare-offline) the served output token throughput as a
                             percentage of the offline engine's on the same prompts; offline
                             times only ``Engine.generate`` (all prompts at once, after a short
                             untimed warm-up), not model building.

Bounds: at most --num-prompts requests, each at most --timeout s, the whole run at most
--max-duration s; when that hits, requests not yet sent are not sent, those in flight are
aborted and counted failed, and the output says so. The only traffic is to --base-url (or
the launched server on 127.0.0.1); proxy environment variables are ignored.

The streams are read with aiohttp (the dev extra), which takes about half the CPU per chunk
that httpx does: on a small machine the client shares the CPUs with the server it measures.

Exit status: 0 when at least one request succeeded; 1 when none did, every warm-up request
failed, or the launched server did not come up; 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import glob
import json
import math
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
PERCENTILES = (50, 90, 99)
WARMUP_FAILED = "every warm-up request failed"
# launch args the offline comparison reads (the rest are the server's business)
OFFLINE_FLAGS = {"--model": str, "--weights-seed": int, "--max-batch-tokens": int, "--kv-cache-gb": float,
                 "--block-size": int, "--micro-batches": int, "--dtype": str, "--device": str,
                 "--kernels": str}
PARALLEL_FLAGS = ("--tp", "--pp", "--ep", "--dp")
SERVER_CMD = [sys.executable, "-m", "moerun.serve"]  # what --launch runs, before its ARGS


# =========================================================== pure metric functions
def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); NaN for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values) -> float:
    xs = list(values)
    return sum(xs) / len(xs) if xs else math.nan


def latency_stats(values_s) -> dict[str, float]:
    """mean, median, p90, p99 in milliseconds of values given in seconds."""
    ms = [v * 1000 for v in values_s]
    out = {"mean": mean(ms)}
    for q in PERCENTILES:
        out["median" if q == 50 else f"p{q}"] = percentile(ms, q)
    return out


def tpot(ttft_s: float, e2e_s: float, output_tokens: int) -> float | None:
    """Time per output token after the first; None for fewer than two output tokens."""
    if output_tokens is None or output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def itls(token_times_s) -> list[float]:
    """Gaps between successive token chunk arrival times."""
    ts = list(token_times_s)
    return [b - a for a, b in zip(ts, ts[1:])]


def meets_slo(ttft_s: float | None, tpot_s: float | None, slo_ttft_ms: float | None,
              slo_tpot_ms: float | None) -> bool:
    if slo_ttft_ms is not None and (ttft_s is None or ttft_s * 1000 > slo_ttft_ms):
        return False
    if slo_tpot_ms is not None and tpot_s is not None and tpot_s * 1000 > slo_tpot_ms:
        return False
    return True


def goodput(records, duration_s: float, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> float:
    """Successful requests per second that meet every SLO given. ``records`` are
    RequestRecord objects or dicts with success, ttft_s and tpot_s."""
    if duration_s <= 0:
        return math.nan
    good = 0
    for r in records:
        get = r.get if isinstance(r, dict) else lambda k, r=r: getattr(r, k)
        if get("success") and meets_slo(get("ttft_s"), get("tpot_s"), slo_ttft_ms, slo_tpot_ms):
            good += 1
    return good / duration_s


def poisson_intervals(n: int, rate: float, seed: int) -> list[float]:
    """n inter-arrival gaps (s) of a Poisson process of ``rate`` requests/s: exponential
    with mean 1/rate, seeded; all zeros for an infinite rate."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    return [rng.expovariate(rate) for _ in range(n)]


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """When each request is due (s after the start): the first at 0, then Poisson gaps."""
    gaps = poisson_intervals(max(n - 1, 0), rate, seed)
    out, t = [], 0.0
    for i in range(n):
        out.append(t)
        if i < len(gaps):
            t += gaps[i]
    return out


def random_lengths(rng: random.Random, n: int, length: int, ratio: float) -> list[int]:
    """n integer lengths uniform in [length*(1-ratio), length*(1+ratio)], each >= 1."""
    lo = max(1, math.ceil(length * (1 - ratio)))
    hi = max(lo, math.floor(length * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


# ================================================================= datasets
@dataclass
class Prompt:
    prompt: list[int] | str
    max_tokens: int

    @property
    def ids(self) -> list[int] | None:
        return self.prompt if isinstance(self.prompt, list) else None


def random_dataset(n: int, input_len: int, output_len: int, ratio: float, low: int, high: int,
                   seed: int) -> list[Prompt]:
    if not 0 <= ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be >= 1")
    if not 0 <= low < high:
        raise ValueError(f"token id range [{low}, {high}) is empty")
    rng = random.Random(seed)
    ins = random_lengths(rng, n, input_len, ratio)
    outs = random_lengths(rng, n, output_len, ratio)
    return [Prompt([rng.randrange(low, high) for _ in range(i)], o) for i, o in zip(ins, outs)]


def jsonl_dataset(path: str, n: int, default_max_tokens: int) -> tuple[list[Prompt], str | None]:
    """The first n lines of a JSONL file of {"prompt": str | "prompt_ids": [...], "max_tokens": n}
    ("max_new_tokens" is read too); repeated in order when the file has fewer lines."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            if "prompt_ids" in obj:
                p = obj["prompt_ids"]
                if not (isinstance(p, list) and p and all(isinstance(t, int) and t >= 0 for t in p)):
                    raise ValueError(f"{path}:{lineno}: prompt_ids must be a non-empty list of ids >= 0")
            elif isinstance(obj.get("prompt"), str) and obj["prompt"]:
                p = obj["prompt"]
            else:
                raise ValueError(f'{path}:{lineno}: needs "prompt" (a string) or "prompt_ids" (a list)')
            m = obj.get("max_tokens", obj.get("max_new_tokens", default_max_tokens))
            if not isinstance(m, int) or m < 1:
                raise ValueError(f"{path}:{lineno}: max_tokens must be an integer >= 1")
            items.append(Prompt(p, m))
            if len(items) >= n:
                break
    if not items:
        raise ValueError(f"{path}: no prompts")
    note = None
    if len(items) < n:
        note = f"{path} has {len(items)} prompts; they repeat in order to make {n}"
        items = [items[i % len(items)] for i in range(n)]
    return items, note


# =================================================================== client
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


def _sse_line(raw: bytes, rec: RequestRecord, st: float, now: float) -> bool:
    """One line of the stream into ``rec`` (``now``: when it arrived); True at ``data: [DONE]``."""
    line = raw.decode("utf-8", "replace").strip()
    if not line.startswith("data:"):
        return False  # blank separators, ": comments", event:/id: fields
    data = line[5:].strip()
    if data == "[DONE]":
        return True
    try:
        obj = json.loads(data)
    except ValueError:
        raise RequestFailed(f"malformed SSE data: {data[:200]!r}") from None
    if not isinstance(obj, dict):
        raise RequestFailed(f"SSE data is not an object: {data[:200]!r}")
    if "error" in obj or obj.get("object") == "error":
        raise RequestFailed(f"error chunk: {_error_text(obj)}")
    choices = obj.get("choices") or []
    if choices:
        c = choices[0] if isinstance(choices[0], dict) else {}
        text, role_only = c.get("text"), False
        if text is None and isinstance(c.get("delta"), dict):  # chat-style chunks
            text = c["delta"].get("content")
            role_only = "role" in c["delta"] and not text  # the role chunk is no token
        text = text or ""
        if text or (c.get("finish_reason") is None and not role_only):
            rec.token_times_s.append(now - st)
            rec.text_chars += len(text)
        if c.get("finish_reason"):
            rec.finish_reason = c["finish_reason"]
    usage = obj.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            rec.output_tokens_from = "usage"
            rec.output_tokens = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            rec.usage_prompt_tokens = usage["prompt_tokens"]
    return False


async def _stream(client: aiohttp.ClientSession, url: str, headers: dict, payload: dict,
                  rec: RequestRecord, st: float) -> None:
    max_lines = 8 * payload["max_tokens"] + 64  # a bound on the SSE loop besides --timeout
    async with client.post(url, json=payload, headers=headers) as resp:
        if resp.status != 200:
            body = (await resp.read())[:500].decode("utf-8", "replace").strip()
            raise RequestFailed(f"HTTP {resp.status}: {body}")
        done = False
        lines = 0
        rest = b""
        # whatever arrived, split into lines here: one await per read, not one per line
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            *whole, rest = (rest + data).split(b"\n")
            lines += len(whole)
            if lines > max_lines:
                raise RequestFailed(f"more than {max_lines} SSE lines for max_tokens {payload['max_tokens']}")
            done = any(_sse_line(raw, rec, st, now) for raw in whole)  # stops at [DONE]
            if done:
                break
        if not done and rest.strip():
            done = _sse_line(rest, rec, st, time.perf_counter())  # a last line without its newline
        if not done:
            raise RequestFailed("stream ended without data: [DONE]")
    if not rec.token_times_s:
        raise RequestFailed("no token chunk received")


async def send_request(client: aiohttp.ClientSession, url: str, headers: dict, payload: dict,
                       rec: RequestRecord, t0: float, timeout: float) -> RequestRecord:
    """Send one streaming request and fill ``rec``; never raises (but for cancellation)."""
    rec.sent = True
    st = time.perf_counter()
    rec.start_s = st - t0
    try:
        await asyncio.wait_for(_stream(client, url, headers, payload, rec, st), timeout)
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
    except aiohttp.ClientError as e:
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except Exception as e:  # noqa: BLE001 - a request's failure must not end the run
        rec.error = f"{type(e).__name__}: {e}"
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


def new_client(max_connections: int) -> aiohttp.ClientSession:
    # trust_env=False: no proxy from the environment; traffic goes to the given URL only
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=max_connections),
                                 timeout=aiohttp.ClientTimeout(total=None), trust_env=False)


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


async def run_benchmark(url: str, prompts: list[Prompt], *, model: str | None, temperature: float,
                        request_rate: float, max_concurrency: int | None, seed: int, timeout: float,
                        max_duration: float, api_key: str | None = None, num_warmups: int = 0,
                        progress=None) -> BenchRun:
    headers = auth_headers(api_key)
    records = [RequestRecord(i, len(p.ids) if p.ids is not None else None, p.max_tokens)
               for i, p in enumerate(prompts)]
    offsets = arrival_offsets(len(prompts), request_rate, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    most = max(len(prompts), num_warmups if prompts else 0)  # requests that can be in flight at once
    conns = max(1, min(max_concurrency or most, most))
    async with new_client(conns) as client:
        # untimed: the first prompt, at most 8 tokens, at the run's concurrency (as vLLM's bench
        # serve warms up), so the timed run starts on open connections
        warm = Prompt(prompts[0].prompt, min(prompts[0].max_tokens, 8)) if prompts else None

        async def warm_one(w: int) -> RequestRecord:
            async with sem if sem is not None else contextlib.nullcontext():
                return await send_request(client, url, headers, make_payload(warm, model, temperature),
                                          RequestRecord(-1 - w, None, warm.max_tokens), time.perf_counter(), timeout)

        warmed = await asyncio.gather(*(warm_one(w) for w in range(num_warmups if prompts else 0)))
        warm_errors = [r.error or "failed" for r in warmed if not r.success]
        if num_warmups and len(warm_errors) == num_warmups:
            return BenchRun(records, 0.0, WARMUP_FAILED, warm_errors)

        t0 = time.perf_counter()
        deadline = t0 + max_duration
        stopped = None

        async def one(rec: RequestRecord, p: Prompt):
            payload = make_payload(p, model, temperature)
            if sem is None:
                await send_request(client, url, headers, payload, rec, t0, timeout)
            else:
                async with sem:
                    await send_request(client, url, headers, payload, rec, t0, timeout)
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
    for rec in records:
        if rec.sent and not rec.success and rec.error is None:
            rec.error = "aborted: --max-duration reached while in flight"
            rec.finished = True
    return BenchRun(records, t_end - t0, stopped, warm_errors)


# ================================================================== summary
def summarize(run: BenchRun, slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict:
    ok = [r for r in run.records if r.success]
    sent = [r for r in run.records if r.sent]
    d = run.duration_s
    tin = sum(r.input_tokens for r in ok)
    tout = sum(r.output_tokens for r in ok)

    def rate(x):
        return x / d if d > 0 else math.nan

    s = {
        "completed": len(ok),
        "failed": len(sent) - len(ok),
        "not_sent": len(run.records) - len(sent),
        "duration_s": d,
        "total_input_tokens": tin,
        "total_output_tokens": tout,
        "request_throughput": rate(len(ok)),
        "output_throughput": rate(tout),
        "total_token_throughput": rate(tin + tout),
        "output_len_mismatch": sum(1 for r in ok if r.output_tokens != r.max_tokens),
        "stopped_early": run.stopped,
    }
    for name, vals in (("ttft", [r.ttft_s for r in ok]),
                       ("tpot", [r.tpot_s for r in ok if r.tpot_s is not None]),
                       ("itl", [g for r in ok for g in r.itl_s]),
                       ("e2el", [r.e2e_s for r in ok])):
        for k, v in latency_stats(vals).items():
            s[f"{k}_{name}_ms"] = v
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        s["slo_ttft_ms"], s["slo_tpot_ms"] = slo_ttft_ms, slo_tpot_ms
        s["request_goodput"] = goodput(ok, d, slo_ttft_ms, slo_tpot_ms)
    errors: dict[str, int] = {}
    for r in sent:
        if not r.success:
            errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
    s["errors"] = errors
    return s


def _fmt(v, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def format_table(s: dict, *, request_rate: float, max_concurrency: int | None,
                 offline: dict | None = None) -> str:
    W = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=W, c="=")]

    def row(label, value):
        lines.append(f"{label:<40}{value}")

    def sep(title):
        lines.append("{s:{c}^{n}}".format(s=title, n=W, c="-"))

    row("Successful requests:", s["completed"])
    row("Failed requests:", s["failed"])
    if s.get("not_sent"):
        row("Requests not sent (bound reached):", s["not_sent"])
    row("Maximum request concurrency:", max_concurrency if max_concurrency else "none")
    row("Traffic request rate (req/s):", _fmt(float(request_rate)))
    row("Benchmark duration (s):", _fmt(s["duration_s"]))
    row("Total input tokens:", s["total_input_tokens"])
    row("Total generated tokens:", s["total_output_tokens"])
    row("Request throughput (req/s):", _fmt(s["request_throughput"]))
    if "request_goodput" in s:
        row("Request goodput (req/s):", _fmt(s["request_goodput"]))
    row("Output token throughput (tok/s):", _fmt(s["output_throughput"]))
    row("Total token throughput (tok/s):", _fmt(s["total_token_throughput"]))
    for key, title, short in (("ttft", "Time to First Token", "TTFT"),
                              ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                              ("itl", "Inter-token Latency", "ITL"),
                              ("e2el", "End-to-end Latency", "E2EL")):
        sep(title)
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{label} {short} (ms):", _fmt(s[f"{stat}_{key}_ms"]))
    if "request_goodput" in s:
        sep("Goodput SLOs")
        row("TTFT SLO (ms):", _fmt(s["slo_ttft_ms"]) if s["slo_ttft_ms"] is not None else "none")
        row("TPOT SLO (ms):", _fmt(s["slo_tpot_ms"]) if s["slo_tpot_ms"] is not None else "none")
    if offline is not None:
        sep("Served vs offline engine")
        if offline.get("error"):
            row("Offline run:", "failed")
            lines.append(f"  {offline['error']}")
        else:
            row("Offline concurrency (requests):", offline["max_concurrency"])
            row("Offline duration (s):", _fmt(offline["duration_s"]))
            row("Offline generated tokens:", offline["output_tokens"])
            row("Offline output throughput (tok/s):", _fmt(offline["output_throughput"]))
            row("Served / offline (%):", _fmt(offline["served_over_offline_pct"], 1))
            row("Offline, all prompts at once (tok/s):", _fmt(offline["all_at_once_output_throughput"]))
    lines.append("=" * W)
    return "\n".join(lines)


# =================================================================== machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("model name", "hardware", "cpu model"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def gpu_names() -> list[str]:
    """NVIDIA GPU models from /proc (no torch import); torch.cuda only if torch is loaded already."""
    names = []
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        try:
            with open(info) as f:
                for line in f:
                    if line.startswith("Model:"):
                        names.append(line.split(":", 1)[1].strip())
        except OSError:
            pass
    if not names and "torch" in sys.modules:
        torch = sys.modules["torch"]
        try:
            if torch.cuda.is_available():
                names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001
            pass
    return names


def machine() -> str:
    desc = f"{cpu_model()} ({os.cpu_count()} CPUs)"
    gpus = gpu_names()
    if gpus:
        uniq = sorted(set(gpus))
        desc += ", GPU: " + ", ".join(f"{n} x{gpus.count(n)}" if gpus.count(n) > 1 else n for n in uniq)
    return desc


# ===================================================================== plots
def _save(plt, fig, label: str, path) -> str:
    """Title, lay out, write and close one figure; its path."""
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_plots(records: list[RequestRecord], out_dir: str, label: str) -> list[str]:
    """latency_cdf.png (TTFT, TPOT, E2E) and output_throughput.png (1 s bins) in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok = [r for r in records if r.success]
    paths = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (name, vals) in zip(axes, (("TTFT", [r.ttft_s for r in ok]),
                                       ("TPOT", [r.tpot_s for r in ok if r.tpot_s is not None]),
                                       ("E2E latency", [r.e2e_s for r in ok]))):
        xs = sorted(v * 1000 for v in vals)
        if xs:
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post")
            for q, ls in ((50, "--"), (99, ":")):
                ax.axvline(percentile(xs, q), color="gray", ls=ls, lw=1, label=f"p{q} {percentile(xs, q):.1f} ms")
            ax.legend(loc="lower right", fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(f"{name} CDF ({len(xs)} requests)")
    paths.append(_save(plt, fig, label, out / "latency_cdf.png"))

    # output tokens per 1 s bin (a request's tokens spread evenly over its token chunks),
    # divided by the part of the bin the run lasted; requests in flight as a step function
    spans = [(r.start_s, r.start_s + r.e2e_s) for r in records
             if r.sent and r.start_s is not None and r.e2e_s is not None]
    t_end = max((e for _, e in spans), default=0.0)
    nbins = max(1, math.ceil(t_end))
    tok = [0.0] * nbins
    for r in ok:
        per = r.output_tokens / len(r.token_times_s)
        for t in r.token_times_s:
            tok[min(int(r.start_s + t), nbins - 1)] += per
    rate = [x / max(min(1.0, t_end - b), 1e-3) for b, x in enumerate(tok)]
    events = sorted([(s0, 1) for s0, _ in spans] + [(e, -1) for _, e in spans], key=lambda ev: (ev[0], ev[1]))
    ts, level, cur = [0.0], [0], 0
    for t, d in events:
        cur += d
        ts.append(t)
        level.append(cur)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    a1.bar([b + 0.5 for b in range(nbins)], rate, width=0.9)
    a1.set_ylabel("output tokens/s")
    a1.set_title("output token throughput over time (1 s bins, successful requests)")
    a1.grid(alpha=0.3)
    a2.step(ts, level, where="post")
    a2.set_ylim(bottom=0)
    a2.set_ylabel("requests in flight")
    a2.set_xlabel("time since the first request (s)")
    a2.grid(alpha=0.3)
    paths.append(_save(plt, fig, label, out / "output_throughput.png"))
    return paths


# ==================================================================== launch
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_launch_args(launch: str) -> dict:
    """The flags of OFFLINE_FLAGS found in the --launch string (both "--f v" and "--f=v"),
    converted; model defaults to "tiny" and weights_seed to 0. Also "parallel": the layout flags seen."""
    toks = shlex.split(launch)
    out: dict = {"model": "tiny", "weights_seed": 0, "parallel": []}
    i = 0
    while i < len(toks):
        t = toks[i]
        name, val = (t.split("=", 1) + [None])[:2] if t.startswith("--") else (t, None)
        if name in OFFLINE_FLAGS or name in PARALLEL_FLAGS:
            if val is None and i + 1 < len(toks):
                val, i = toks[i + 1], i + 1
            if val is None:
                raise ValueError(f"--launch: {name} needs a value")
            if name in PARALLEL_FLAGS:
                out["parallel"].append(f"{name} {val}")
            else:
                try:
                    out[name[2:].replace("-", "_")] = OFFLINE_FLAGS[name](val)
                except ValueError:
                    raise ValueError(f"--launch: bad value for {name}: {val!r}") from None
        i += 1
    return out


class LaunchError(RuntimeError):
    pass


class LaunchedServer:
    """``python -m moerun.serve ARGS --host 127.0.0.1 --port P`` as a subprocess, its output
    in a log file. ``cmd_prefix`` replaces SERVER_CMD (tests)."""

    def __init__(self, launch_args: str, *, ready_timeout: float = 300.0, log_path: str | None = None,
                 cmd_prefix: list[str] | None = None):
        args = shlex.split(launch_args)
        for a in args:
            if a.split("=", 1)[0] in ("--host", "--port"):
                raise ValueError("--launch must not set --host or --port: the benchmark picks them")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*(cmd_prefix or SERVER_CMD), *args,
                    "--host", "127.0.0.1", "--port", str(self.port)]
        self.ready_timeout = ready_timeout
        self.keep_log = log_path is not None
        self.log_path = log_path or tempfile.mkstemp(prefix="moerun-serve-", suffix=".log")[1]
        self.proc: subprocess.Popen | None = None

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def start(self) -> None:
        print(f"Launching: {shlex.join(self.cmd)}", flush=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        t0 = time.monotonic()
        deadline = t0 + self.ready_timeout
        with httpx.Client(timeout=2.0, trust_env=False) as c:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise LaunchError(f"the server exited with code {code} before it was ready; "
                                      f"last lines of its output ({self.log_path}):\n{self.tail()}")
                try:
                    if c.get(self.base_url + "/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() >= deadline:
                    raise LaunchError(f"GET /health did not return 200 within {self.ready_timeout:g} s; "
                                      f"last lines of its output ({self.log_path}):\n{self.tail()}")
                time.sleep(0.25)
        print(f"Server ready at {self.base_url} after {time.monotonic() - t0:.1f} s", flush=True)

    def stop(self) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is not None and self.proc.returncode != 0:
                print(f"Warning: the server exited by itself (code {self.proc.returncode}) before the end; "
                      f"last lines of its output:\n{self.tail()}", file=sys.stderr)
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    print("Server ignored SIGTERM for 30 s: killing it", file=sys.stderr)
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            code = self.proc.returncode
        if not self.keep_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass
        return code


# ============================================================ offline engine
def run_offline(prompts: list[Prompt], opts: dict, temperature: float, max_concurrency: int | None = None) -> dict:
    """Build the launched model in this process and time the engine on the same prompts (one
    SamplingParams each), twice: with at most ``max_concurrency`` requests in the engine at
    once (a new one joins as one finishes, as the served run's clients kept it) and with all
    prompts at once (``Engine.generate``). The first is what "served / offline" compares
    with: the same work, without HTTP. Returns durations, tokens and throughputs."""
    from moerun.build import build_model  # lazily: the rest of the script needs no torch
    from moerun.engine import Engine, EngineConfig
    from moerun.options import SamplingParams

    if opts.get("kernels"):
        from moerun import kernels

        kernels.set_default_impl(opts["kernels"])
    model = build_model(opts["model"], dtype=opts.get("dtype"), device=opts.get("device"), seed=opts["weights_seed"])
    ecfg = {k: opts[k] for k in ("max_batch_tokens", "kv_cache_gb", "block_size", "micro_batches") if k in opts}
    ids = [p.ids for p in prompts]
    params = [SamplingParams(max_new_tokens=p.max_tokens, temperature=temperature, ignore_eos=True) for p in prompts]
    engine = Engine(model, EngineConfig(**ecfg))  # one engine: on a GPU its KV cache takes the memory
    engine.generate(ids[:1], [SamplingParams(  # untimed warm-up, as the served run had
        max_new_tokens=min(prompts[0].max_tokens, 8), temperature=temperature, ignore_eos=True)])
    cap = min(max_concurrency or len(ids), len(ids))
    t0 = time.perf_counter()
    n_capped, nxt, live = 0, 0, 0
    while nxt < len(ids) or engine.has_unfinished():
        while live < cap and nxt < len(ids):
            engine.add_request(ids[nxt], params[nxt])
            nxt, live = nxt + 1, live + 1
        for ev in engine.step():
            n_capped += ev.token is not None
            live -= ev.finished
    dt_capped = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_all = sum(len(o) for o in engine.generate(ids, params))
    dt_all = time.perf_counter() - t0
    return {"duration_s": dt_capped, "output_tokens": n_capped, "max_concurrency": cap,
            "output_throughput": n_capped / dt_capped if dt_capped > 0 else math.nan,
            "all_at_once_duration_s": dt_all,
            "all_at_once_output_throughput": n_all / dt_all if dt_all > 0 else math.nan,
            "model": opts["model"], "weights_seed": opts["weights_seed"], "engine_config": ecfg}


# ====================================================================== main
def jsonable(x):
    """Strict JSON: NaN -> null, +-inf -> "inf"/"-inf", unknown objects -> str."""
    if isinstance(x, float):
        return None if math.isnan(x) else (("inf" if x > 0 else "-inf") if math.isinf(x) else x)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (str, int, bool)):
        return x
    return str(x)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as it is, and each flag's default unless it has none."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_serve.py", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--base-url", default=None, help=f"server to measure (default: {DEFAULT_BASE_URL})")
    ap.add_argument("--endpoint", default="/v1/completions", help="completions path (completions payload)")
    ap.add_argument("--model", default=None, help="served model name (default: the first id of GET /v1/models)")
    ap.add_argument("--api-key", default=None, help="Bearer token (default: $MOERUN_API_KEY)")
    ap.add_argument("--num-prompts", type=int, default=100, help="requests to send")
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="Poisson arrival rate in requests/s; inf sends all at once")
    ap.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    ap.add_argument("--seed", type=int, default=0, help="seed for the dataset and the arrivals")
    ap.add_argument("--temperature", type=float, default=0.0, help="sent with every request; 0 = greedy")
    ap.add_argument("--num-warmups", type=int, default=1,
                    help="untimed requests before the run (first prompt, <= 8 tokens), sent at once up to "
                         "--max-concurrency, so the run starts on open connections; if all fail, stop")
    ds = ap.add_argument_group("dataset")
    ds.add_argument("--dataset", choices=["random", "jsonl"], default="random")
    ds.add_argument("--dataset-path", default=None,
                    help='JSONL, one {"prompt": str | "prompt_ids": [...], "max_tokens": n} per line')
    ds.add_argument("--random-input-len", type=int, default=128)
    ds.add_argument("--random-output-len", type=int, default=64,
                    help="output tokens (also the jsonl default when a line has no max_tokens)")
    ds.add_argument("--random-range-ratio", type=float, default=0.0,
                    help="lengths uniform in [len*(1-r), len*(1+r)]")
    ds.add_argument("--token-id-low", type=int, default=0, help="random prompt ids are in [low, high)")
    ds.add_argument("--token-id-high", type=int, default=256)
    ap.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT SLO for goodput")
    ap.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT SLO for goodput")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--max-duration", type=float, default=600.0, help="seconds for the whole run")
    ap.add_argument("--save-result", default=None, metavar="FILE.json",
                    help="write every request record, the summary, the command line and the date")
    ap.add_argument("--plot", default=None, metavar="DIR", help="write latency_cdf.png and output_throughput.png")
    la = ap.add_argument_group("launch a server")
    la.add_argument("--launch", default=None, metavar='"ARGS"',
                    help="run `python -m moerun.serve ARGS --host 127.0.0.1 --port <free>` and measure it")
    la.add_argument("--launch-timeout", type=float, default=300.0, help="seconds to wait for GET /health == 200")
    la.add_argument("--server-log", default=None, help="keep the launched server's output in this file")
    la.add_argument("--compare-offline", action="store_true",
                    help="after the served run, time the same prompts through the offline engine")
    return ap


def check_args(ap: argparse.ArgumentParser, a) -> None:
    if a.num_prompts < 1:
        ap.error("--num-prompts must be >= 1")
    if not a.request_rate > 0:
        ap.error("--request-rate must be > 0 (inf = all at once)")
    if a.max_concurrency is not None and a.max_concurrency < 1:
        ap.error("--max-concurrency must be >= 1")
    if a.timeout <= 0 or a.max_duration <= 0 or a.launch_timeout <= 0:
        ap.error("--timeout, --max-duration and --launch-timeout must be > 0")
    if a.temperature < 0:
        ap.error("--temperature must be >= 0")
    if a.num_warmups < 0:
        ap.error("--num-warmups must be >= 0")
    if a.dataset == "jsonl" and not a.dataset_path:
        ap.error("--dataset jsonl needs --dataset-path")
    if a.dataset_path and a.dataset != "jsonl":
        ap.error("--dataset-path goes with --dataset jsonl")
    if a.compare_offline and a.launch is None:
        ap.error("--compare-offline needs --launch (it builds the launched model offline)")
    if a.launch is not None and a.base_url is not None:
        ap.error("--launch starts its own server on 127.0.0.1: drop --base-url")
    if not a.endpoint.startswith("/"):
        ap.error("--endpoint must start with /")


def redact_argv(argv: list[str]) -> list[str]:
    """argv with the --api-key value (and any --api-key inside --launch) replaced."""
    out, hide = [], False
    for x in argv:
        if hide:
            out.append("<redacted>")
            hide = False
        elif x == "--api-key":
            out.append(x)
            hide = True
        elif x.startswith("--api-key="):
            out.append("--api-key=<redacted>")
        elif "--api-key" in x:  # a --launch string
            toks = shlex.split(x.split("=", 1)[1] if x.startswith("--launch=") else x)
            toks = redact_argv(toks)
            out.append(("--launch=" if x.startswith("--launch=") else "") + shlex.join(toks))
        else:
            out.append(x)
    return out


def glue_launch(argv: list[str]) -> list[str]:
    """``--launch "--model tiny"`` as ``--launch=--model tiny``: argparse would take a value
    that starts with "--" for a flag."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--launch" and i + 1 < len(argv):
            out.append("--launch=" + argv[i + 1])
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = [str(x) for x in (sys.argv[1:] if argv is None else argv)]
    ap = build_parser()
    a = ap.parse_args(glue_launch(argv))
    check_args(ap, a)
    if a.api_key is None:
        a.api_key = os.environ.get("MOERUN_API_KEY") or None
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")

    try:
        if a.dataset == "random":
            prompts, note = random_dataset(a.num_prompts, a.random_input_len, a.random_output_len,
                                           a.random_range_ratio, a.token_id_low, a.token_id_high, a.seed), None
        else:
            prompts, note = jsonl_dataset(a.dataset_path, a.num_prompts, a.random_output_len)
        launch_opts = parse_launch_args(a.launch) if a.launch is not None else None
        server = (LaunchedServer(a.launch, ready_timeout=a.launch_timeout, log_path=a.server_log)
                  if a.launch is not None else None)
    except (OSError, ValueError) as e:
        print(f"bench_serve: error: {e}", file=sys.stderr)
        return 2
    if a.compare_offline and any(p.ids is None for p in prompts):
        print("bench_serve: error: --compare-offline needs token-id prompts (random, or jsonl prompt_ids)",
              file=sys.stderr)
        return 2
    if note:
        print(f"Note: {note}")

    server_code = None
    try:
        if server is not None:
            try:
                server.start()
            except LaunchError as e:
                print(f"bench_serve: {e}", file=sys.stderr)
                return 1
        base_url = (server.base_url if server else a.base_url or DEFAULT_BASE_URL).rstrip("/")
        model = a.model
        if model is None:
            model, warn = resolve_model(base_url, a.api_key)
            if warn:
                print(f"Warning: {warn}; sending requests without a model name (pass --model)")
        url = base_url + a.endpoint
        label = f"measured against {base_url}"
        print(f"Benchmark: {len(prompts)} requests to {url} (model {model or 'unnamed'}), "
              f"request rate {_fmt(float(a.request_rate))} req/s, max concurrency {a.max_concurrency or 'none'}, "
              f"dataset {a.dataset}, seed {a.seed}, --timeout {a.timeout:g} s, --max-duration {a.max_duration:g} s",
              flush=True)
        done = [0]
        step = max(1, len(prompts) // 10)

        def progress(rec):
            done[0] += 1
            if done[0] % step == 0 or done[0] == len(prompts):
                print(f"  {done[0]}/{len(prompts)} requests done", flush=True)

        run = asyncio.run(run_benchmark(
            url, prompts, model=model, temperature=a.temperature, request_rate=a.request_rate,
            max_concurrency=a.max_concurrency, seed=a.seed, timeout=a.timeout, max_duration=a.max_duration,
            api_key=a.api_key, num_warmups=a.num_warmups, progress=progress))
    finally:
        if server is not None and server.proc is not None:
            server_code = server.stop()
            print(f"Server stopped (exit code {server_code})", flush=True)

    for e in run.warmup_errors:
        print(f"Warning: warm-up request failed: {e}")
    if run.stopped == WARMUP_FAILED:
        print(f"bench_serve: {WARMUP_FAILED} (see above): no benchmark run against {url}", file=sys.stderr)
        return 1
    summary = summarize(run, a.slo_ttft_ms, a.slo_tpot_ms)

    offline = None
    if a.compare_offline:
        if a.request_rate != float("inf") or a.max_concurrency:
            print("Note: the served run paced its requests (rate/concurrency); offline keeps the same "
                  "concurrency and also runs all prompts at once")
        if launch_opts["parallel"]:
            print(f"Note: the server was launched with {', '.join(launch_opts['parallel'])}; "
                  "the offline engine runs in one process")
        print(f"Offline: building {launch_opts['model']} (weights seed {launch_opts['weights_seed']}) in this process...", flush=True)
        try:
            offline = run_offline(prompts, launch_opts, a.temperature, a.max_concurrency)
            so = summary["output_throughput"]
            offline["served_over_offline_pct"] = 100 * so / offline["output_throughput"]
        except Exception as e:  # noqa: BLE001 - the served figures still get printed
            offline = {"error": f"{type(e).__name__}: {e}"}

    mach = machine()
    print()
    print(f"{label}, model {model or 'unnamed'}")
    print(f"date {date}; {'machine (client and launched server)' if server else 'client machine'}: {mach}")
    if run.stopped:
        s = summary
        print(f"Stopped early: {run.stopped}"
              + (f"; {s['failed']} sent requests failed or were aborted, {s['not_sent']} not sent"
                 if run.stopped.startswith("--max") else ""))
    print(format_table(summary, request_rate=a.request_rate, max_concurrency=a.max_concurrency, offline=offline))
    if summary["errors"]:
        print("Errors (count: text):")
        for text, n in sorted(summary["errors"].items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {n}: {text}")
    if summary["output_len_mismatch"]:
        print(f"Note: {summary['output_len_mismatch']} successful requests returned a different number of "
              "tokens than max_tokens (does the server honour ignore_eos?)")

    if a.plot:
        try:
            for p in write_plots(run.records, a.plot, f"{label}, model {model or 'unnamed'} | {date} | {mach}"):
                print(f"Wrote {p}")
        except ImportError as e:
            print(f"Warning: --plot needs matplotlib ({e})")
    if a.save_result:
        script = Path(__file__).resolve()
        try:
            script = script.relative_to(Path.cwd())
        except ValueError:
            pass
        shown = redact_argv(argv)
        config = {**vars(a), "api_key": "<redacted>" if a.api_key else None}
        result = {"date": date, "command": shlex.join(["python", str(script), *shown]), "argv": shown,
                  "base_url": base_url, "url": url, "model": model, "machine": mach, "label": label,
                  "config": config, "summary": summary, "offline": offline,
                  "server_exit_code": server_code, "warmup_errors": run.warmup_errors,
                  "requests": [asdict(r) for r in run.records]}
        Path(a.save_result).parent.mkdir(parents=True, exist_ok=True)
        with open(a.save_result, "w") as f:
            json.dump(jsonable(result), f, indent=1, allow_nan=False)
        print(f"Wrote {a.save_result}")
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
