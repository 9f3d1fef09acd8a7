"""The server's Prometheus metrics, named like vLLM's with a ``moerun:`` prefix, in their
own CollectorRegistry (never the process-wide one, so several servers or tests coexist).

    m = ServerMetrics("my-model", tp=2, pp=1, ep=2, dp=1, dtype="bfloat16", device="cuda")
    m.set_queue(running=3, waiting=1, kv_usage=0.42)      # each engine step (kv_usage in 0..1)
    m.add_preemptions(1)
    clock = RequestClock()                                # per request, at arrival
    clock.token()                                         # at each output the request gets
    m.request_finished("stop", prompt_tokens=12, gen_tokens=30, ttft_s=clock.ttft,
                       itls=clock.itls, e2e_s=clock.e2e())
    body, content_type = m.render()                       # GET /metrics

Every metric carries the label ``model_name``:

    moerun:num_requests_running, moerun:num_requests_waiting    gauges
    moerun:kv_cache_usage_perc                                  gauge, 0..1 (1 = full), like vLLM
    moerun:num_preemptions_total                                counter
    moerun:prompt_tokens_total, moerun:generation_tokens_total  counters (of finished requests)
    moerun:request_success_total{finished_reason=stop|length|abort}
    moerun:time_to_first_token_seconds, moerun:inter_token_latency_seconds,
    moerun:e2e_request_latency_seconds                          histograms, vLLM's buckets
    moerun:layout_info{tp, pp, ep, dp, dtype, device}           gauge, always 1
"""
from __future__ import annotations

import bisect
import time
from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FINISHED_REASONS = ("stop", "length", "abort")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    def __init__(self, model_name: str, *, tp: int = 1, pp: int = 1, ep: int = 1, dp: int = 1,
                 dtype: str = "", device: str = ""):
        self.model_name = model_name
        self.registry = r = CollectorRegistry(auto_describe=True)
        lab = ["model_name"]
        self.running = Gauge("moerun:num_requests_running", "Requests in the engine's running batch.", lab,
                             registry=r).labels(model_name)
        self.waiting = Gauge("moerun:num_requests_waiting", "Requests waiting to be scheduled.", lab,
                             registry=r).labels(model_name)
        self.kv_usage = Gauge("moerun:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", lab,
                              registry=r).labels(model_name)
        # prometheus_client adds "_total" to a Counter's name itself
        self.preemptions = Counter("moerun:num_preemptions", "Preempted requests (KV cache full).", lab,
                                   registry=r).labels(model_name)
        self.prompt_tokens = Counter("moerun:prompt_tokens", "Prompt tokens of finished requests.", lab,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("moerun:generation_tokens", "Generated tokens of finished requests.", lab,
                                         registry=r).labels(model_name)
        success = Counter("moerun:request_success", "Finished requests by finish reason.",
                          lab + ["finished_reason"], registry=r)
        self.success = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}
        self.ttft = Histogram("moerun:time_to_first_token_seconds", "Time to the first generated token.", lab,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("moerun:inter_token_latency_seconds", "Time between a request's outputs.", lab,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("moerun:e2e_request_latency_seconds", "Arrival to finish of a request.", lab,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        Gauge("moerun:layout_info", "The parallel layout and number format the model runs with (value 1).",
              ["model_name", "tp", "pp", "ep", "dp", "dtype", "device"], registry=r
              ).labels(model_name, str(tp), str(pp), str(ep), str(dp), str(dtype), str(device)).set(1)

    def set_queue(self, running: int, waiting: int, kv_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)

    def add_preemptions(self, n: int = 1) -> None:
        if n:
            self.preemptions.inc(n)

    def request_finished(self, reason: str, prompt_tokens: int, gen_tokens: int, ttft_s: float | None = None,
                         itls: Iterable[float] = (), e2e_s: float | None = None) -> None:
        """One finished request: ``reason`` is "stop", "length" or "abort"; ttft_s None when it
        produced no token."""
        if reason not in self.success:
            raise ValueError(f"finished_reason must be one of {FINISHED_REASONS}, got {reason!r}")
        self.success[reason].inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(gen_tokens)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        observe_many(self.itl, itls)
        if e2e_s is not None:
            self.e2e.observe(e2e_s)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def observe_many(h, values: Iterable[float]) -> None:
    """``h.observe(v)`` for each value, as one update per bucket that got any (a request's
    inter-token gaps at its end: one per output token). Histogram.observe takes two locked
    increments and a bucket search per value, ~3 us; this reads the labelled histogram's
    ``_upper_bounds``, ``_buckets`` and ``_sum``, and falls back to observe without them."""
    bounds, buckets, total = (getattr(h, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            h.observe(v)
        return
    counts = [0] * len(bounds)
    s = 0.0
    for v in values:
        counts[bisect.bisect_left(bounds, v)] += 1  # the first bound >= v, as observe's `v <= bound`
        s += v
    if any(counts):
        total.inc(s)
        for i, n in enumerate(counts):
            if n:
                buckets[i].inc(n)


class RequestClock:
    """A request's timings (time.monotonic seconds): ``token()`` at each output it gets; then
    ``ttft`` (arrival -> first output), ``itls`` (the gaps between outputs), ``e2e()``."""

    def __init__(self, start: float | None = None):
        self.start = time.monotonic() if start is None else start
        self.ttft: float | None = None
        self.itls: list[float] = []
        self._last: float | None = None

    def token(self, t: float | None = None) -> None:
        t = time.monotonic() if t is None else t
        if self._last is None:
            self.ttft = t - self.start
        else:
            self.itls.append(t - self._last)
        self._last = t

    def e2e(self, t: float | None = None) -> float:
        return (time.monotonic() if t is None else t) - self.start
