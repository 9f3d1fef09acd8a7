"""moerun.serve.metrics: the Prometheus exposition parses and holds the names, labels and values."""
import pytest


def test_metrics_exposition():
    from prometheus_client.parser import text_string_to_metric_families

    from moerun.serve.metrics import RequestClock, ServerMetrics

    m = ServerMetrics("tiny-moe", tp=2, pp=1, ep=2, dp=1, dtype="bfloat16", device="cuda")
    other = ServerMetrics("second")  # its own registry: no clash, no leak
    m.set_queue(running=3, waiting=2, kv_usage=0.25)
    m.add_preemptions(2)
    m.add_preemptions(1)
    clock = RequestClock(start=100.0)
    for t in (100.5, 100.6, 100.8):
        clock.token(t)
    assert clock.ttft == 0.5 and clock.itls == pytest.approx([0.1, 0.2]) and clock.e2e(101.0) == 1.0
    m.request_finished("stop", prompt_tokens=10, gen_tokens=3, ttft_s=clock.ttft, itls=clock.itls, e2e_s=1.0)
    m.request_finished("length", prompt_tokens=5, gen_tokens=7, ttft_s=0.02, itls=[0.03] * 6, e2e_s=0.4)
    m.request_finished("abort", prompt_tokens=4, gen_tokens=0)
    with pytest.raises(ValueError):
        m.request_finished("eos", 1, 1)
    body, ctype = m.render()
    assert ctype.startswith("text/plain")
    samples = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            assert s.labels.get("model_name") == "tiny-moe", s
            samples[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name")))] = s.value
    get = lambda name, **labels: samples[(name, tuple(sorted(labels.items())))]
    assert get("moerun:num_requests_running") == 3 and get("moerun:num_requests_waiting") == 2
    assert get("moerun:kv_cache_usage_perc") == 0.25
    assert get("moerun:num_preemptions_total") == 3
    assert get("moerun:prompt_tokens_total") == 19 and get("moerun:generation_tokens_total") == 10
    assert [get("moerun:request_success_total", finished_reason=r) for r in ("stop", "length", "abort")] == [1, 1, 1]
    assert get("moerun:time_to_first_token_seconds_count") == 2
    assert get("moerun:time_to_first_token_seconds_sum") == pytest.approx(0.52)
    assert get("moerun:inter_token_latency_seconds_count") == 8
    assert get("moerun:e2e_request_latency_seconds_count") == 2
    assert get("moerun:e2e_request_latency_seconds_bucket", le="0.5") == 1
    assert get("moerun:layout_info", tp="2", pp="1", ep="2", dp="1", dtype="bfloat16", device="cuda") == 1
    assert b'model_name="tiny-moe"' not in other.render()[0]


def test_observe_many_equals_observe_one_by_one():
    """The bulk update of a request's inter-token gaps gives the histogram that observing
    each gap does: every bucket and the count equal, the sum to rounding (random values,
    bucket bounds themselves, 0, inf, huge)."""
    import math
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from moerun.serve.metrics import ITL_BUCKETS, observe_many

    def samples(reg):
        return {(s.name, s.labels.get("le")): s.value for fam in text_string_to_metric_families(
            generate_latest(reg).decode()) for s in fam.samples if not s.name.endswith("_created")}
    rng = random.Random(7)
    for trial in range(100):
        regs = [CollectorRegistry(), CollectorRegistry()]
        one, many = (Histogram("h", "h", ["m"], buckets=ITL_BUCKETS, registry=r).labels("x") for r in regs)
        for _ in range(rng.randrange(1, 4)):  # a few requests into the same histogram
            vals = [rng.choice([rng.expovariate(8), rng.choice(ITL_BUCKETS), 0.0, math.inf, 1e9, 0.0100000001])
                    for _ in range(rng.randrange(0, 70))]
            for v in vals:
                one.observe(v)
            observe_many(many, vals)
        a, b = samples(regs[0]), samples(regs[1])
        assert a.keys() == b.keys()
        for k in a:
            assert (b[k] == pytest.approx(a[k], rel=1e-12)) if k[0] == "h_sum" else b[k] == a[k], (trial, k)
