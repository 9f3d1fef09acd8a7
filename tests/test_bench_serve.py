"""scripts/bench_serve.py and its package scripts/serve_bench/: the metric functions against
hand computations, and whole runs against a stub OpenAI-style streaming server (FastAPI +
uvicorn on a free 127.0.0.1 port, in a thread) whose chunks, sleeps and failures are known.
(No ``from __future__ import annotations`` here: FastAPI reads the stub's ``req: Request``
annotation at runtime.)"""
import asyncio
import importlib.util
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from asgi_thread import serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_serve.py"

_spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
bs = importlib.util.module_from_spec(_spec)
sys.modules["bench_serve"] = bs  # dataclasses resolve their module by name
_spec.loader.exec_module(bs)
# the package beside the script, which it put on the path
stats, datasets, launch, cpu = (sys.modules[f"serve_bench.{m}"] for m in ("stats", "datasets", "launch", "cpu"))

FIRST_SLEEP = 0.05  # the stub's wait before its first token chunk
GAP_SLEEP = 0.005  # and between token chunks


# ================================================================ pure functions
def test_percentile_matches_hand_computation():
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4
    assert stats.percentile(xs, 50) == pytest.approx(2.5)
    assert stats.percentile(xs, 0) == 1.0 and stats.percentile(xs, 100) == 4.0
    assert stats.percentile(xs, 90) == pytest.approx(3.7)  # pos 2.7: 3 + 0.7 * (4 - 3)
    assert stats.percentile(xs, 99) == pytest.approx(3.97)
    assert stats.percentile([7.0], 99) == 7.0
    assert math.isnan(stats.percentile([], 50))
    s = stats.latency_stats([0.001, 0.002, 0.003])  # seconds in, ms out
    assert s["mean"] == pytest.approx(2.0) and s["median"] == pytest.approx(2.0)
    assert s["p90"] == pytest.approx(2.8) and s["p99"] == pytest.approx(2.98)


def test_tpot_and_itl_from_timestamps():
    times = [0.10, 0.15, 0.17, 0.30]  # token chunk arrivals after sending
    assert stats.itls(times) == pytest.approx([0.05, 0.02, 0.13])
    assert stats.itls([0.1]) == [] and stats.itls([]) == []
    # e2e 0.40, ttft 0.10, 4 tokens: (0.40 - 0.10) / 3
    assert stats.tpot(0.10, 0.40, 4) == pytest.approx(0.1)
    assert stats.tpot(0.10, 0.40, 1) is None and stats.tpot(0.1, 0.4, 0) is None


def test_goodput_under_slos():
    recs = [dict(success=True, ttft_s=0.050, tpot_s=0.010),   # meets both
            dict(success=True, ttft_s=0.200, tpot_s=0.010),   # TTFT too slow
            dict(success=True, ttft_s=0.050, tpot_s=0.030),   # TPOT too slow
            dict(success=True, ttft_s=0.080, tpot_s=None),    # one token: no TPOT, meets it
            dict(success=False, ttft_s=0.010, tpot_s=0.001)]  # failed: never good
    assert stats.goodput(recs, 2.0, 100, 20) == pytest.approx(2 / 2.0)
    assert stats.goodput(recs, 2.0, 100, None) == pytest.approx(3 / 2.0)
    assert stats.goodput(recs, 2.0, None, 20) == pytest.approx(3 / 2.0)
    assert stats.goodput(recs, 4.0, None, None) == pytest.approx(4 / 4.0)
    assert stats.meets_slo(0.1, None, 100, 5) and not stats.meets_slo(0.1001, None, 100, None)


def test_poisson_arrivals():
    rate = 4.0
    gaps = stats.poisson_intervals(20000, rate, seed=1)
    assert all(g >= 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert gaps == stats.poisson_intervals(20000, rate, seed=1)  # seeded
    assert gaps[:50] != stats.poisson_intervals(50, rate, seed=2)
    assert stats.poisson_intervals(5, float("inf"), seed=0) == [0.0] * 5
    assert stats.arrival_offsets(4, float("inf"), seed=0) == [0.0] * 4
    offs = stats.arrival_offsets(4, 2.0, seed=3)
    g = stats.poisson_intervals(3, 2.0, seed=3)
    assert offs == pytest.approx([0.0, g[0], g[0] + g[1], g[0] + g[1] + g[2]])
    with pytest.raises(ValueError):
        stats.poisson_intervals(3, 0.0, seed=0)


def test_random_dataset_lengths_and_ids():
    ps = datasets.random_dataset(200, 100, 20, 0.5, 10, 20, seed=0)
    assert all(50 <= len(p.ids) <= 150 and 10 <= p.max_tokens <= 30 for p in ps)
    assert all(10 <= t < 20 for p in ps for t in p.ids)
    assert len({len(p.ids) for p in ps}) > 10
    fixed = datasets.random_dataset(5, 7, 3, 0.0, 0, 256, seed=0)
    assert [len(p.ids) for p in fixed] == [7] * 5 and [p.max_tokens for p in fixed] == [3] * 5
    assert [p.ids for p in fixed] == [p.ids for p in datasets.random_dataset(5, 7, 3, 0.0, 0, 256, seed=0)]


def test_jsonl_dataset(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt_ids": [1, 2, 3], "max_tokens": 4}\n\n{"prompt": "hi", "max_new_tokens": 2}\n'
                 '{"prompt": "x"}\n')
    ps, note = datasets.jsonl_dataset(str(f), 5, 9)
    assert [(p.prompt, p.max_tokens) for p in ps] == [([1, 2, 3], 4), ("hi", 2), ("x", 9), ([1, 2, 3], 4), ("hi", 2)]
    assert "repeat" in note
    f.write_text('{"max_tokens": 3}\n')
    with pytest.raises(ValueError):
        datasets.jsonl_dataset(str(f), 1, 9)


def test_parse_launch_args():
    o = launch.parse_launch_args("--model /ckpt --weights-seed=3 --kv-cache-gb 0.5 --block-size 32 --tp 2 --api-key k")
    assert o["model"] == "/ckpt" and o["weights_seed"] == 3 and o["kv_cache_gb"] == 0.5 and o["block_size"] == 32
    assert o["parallel"] == ["--tp 2"] and "max_batch_tokens" not in o
    assert launch.parse_launch_args("")["model"] == "tiny" and launch.parse_launch_args("")["weights_seed"] == 0
    with pytest.raises(ValueError):
        launch.LaunchedServer("--port 5")
    one, two = launch.LaunchedServer("--model tiny"), launch.LaunchedServer("--model tiny --tp 2", nproc=2)
    assert one.cmd[:3] == launch.SERVER_CMD and one.cmd[3:5] == ["--model", "tiny"]
    assert two.cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert two.cmd[4].startswith("--master_port=") and two.cmd[5:7] == ["-m", "moerun.serve"]
    assert two.cmd[7:] == ["--model", "tiny", "--tp", "2", "--host", "127.0.0.1", "--port", str(two.port)]
    for s in (one, two):
        os.unlink(s.log_path)
    assert bs.glue_launch(["--launch", "--model x", "--seed", "1"]) == ["--launch=--model x", "--seed", "1"]
    assert bs.redact_argv(["--api-key", "k", "--launch=--model x --api-key k2", "--api-key=k3"]) == [
        "--api-key", "<redacted>", "--launch=--model x --api-key '<redacted>'", "--api-key=<redacted>"]


# ====================================================================== the stub
def make_app(state: dict):
    """A /v1/completions that streams one chunk per requested token (text "a"), then a usage
    chunk and [DONE]. state["mode"]: "ok"; "fail" (request number k: k % 4 == 1 -> HTTP 500,
    k % 4 == 3 -> one token then an error chunk); "nousage" (no usage chunk); "slow" (0.3 s gaps)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()
    lock = threading.Lock()

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        with lock:
            k = state["count"]
            state["count"] += 1
            state["bodies"].append(body)
            state["auth"].append(req.headers.get("authorization"))
        mode = state["mode"]
        if mode == "fail" and k % 4 == 1:
            return JSONResponse({"error": {"message": "stub says no", "type": "InternalError"}}, status_code=500)
        n = body["max_tokens"]
        gap = 0.3 if mode == "slow" else GAP_SLEEP
        with lock:
            state["inflight"] += 1
            state["peak"] = max(state["peak"], state["inflight"])

        async def gen():
            try:
                async for chunk in chunks():
                    yield chunk
            finally:
                with lock:
                    state["inflight"] -= 1

        async def chunks():
            await asyncio.sleep(FIRST_SLEEP)
            for i in range(n):
                if i:
                    await asyncio.sleep(gap)
                if mode == "fail" and k % 4 == 3 and i == 1:
                    yield 'data: {"error": {"message": "engine fell over", "type": "EngineError"}}\n\n'
                    return
                yield "data: " + json.dumps({"id": f"c{k}", "object": "text_completion", "choices": [
                    {"index": 0, "text": "a", "finish_reason": "length" if i == n - 1 else None}]}) + "\n\n"
            with lock:
                state["sent"].append(n)
            if mode != "nousage":
                p = len(body["prompt"])
                yield "data: " + json.dumps({"id": f"c{k}", "choices": [], "usage": {
                    "prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.fixture
def stub():
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    state = {"mode": "ok", "count": 0, "bodies": [], "auth": [], "sent": [], "inflight": 0, "peak": 0}
    with serve_in_thread(make_app(state), log_level="warning") as url:
        state["url"] = url
        yield state


def run_script(*args, timeout=60, env=None):
    env = {**os.environ, "MOERUN_API_KEY": "", **(env or {})}
    p = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env=env)
    return p.returncode, p.stdout, p.stderr


# ============================================================== end-to-end runs
def test_end_to_end_against_stub(stub, tmp_path):
    out = tmp_path / "r.json"
    rc, so, se = run_script("--base-url", stub["url"], "--num-prompts", 8, "--request-rate", "inf",
                            "--max-concurrency", 4, "--random-input-len", 12, "--random-output-len", 6,
                            "--random-range-ratio", 0.5, "--seed", 7, "--save-result", out,
                            "--slo-ttft-ms", 10000, "--api-key", "sekrit")
    assert rc == 0, se + so
    assert "============ Serving Benchmark Result ============" in so
    for label in ("Successful requests:", "Failed requests:", "Benchmark duration (s):", "Total input tokens:",
                  "Total generated tokens:", "Request throughput (req/s):", "Output token throughput (tok/s):",
                  "Total token throughput (tok/s):", "Request goodput (req/s):", "Mean TTFT (ms):",
                  "Median TPOT (ms):", "P90 ITL (ms):", "P99 E2EL (ms):"):
        assert label in so, label
    assert f"measured against {stub['url']}" in so and "client machine:" in so

    r = json.loads(out.read_text())
    recs = r["requests"]
    assert len(recs) == 8 and all(x["success"] for x in recs)
    assert r["summary"]["completed"] == 8 and r["summary"]["failed"] == 0
    assert r["model"] == "stub-model" and r["date"] and "bench_serve.py" in r["command"]
    # 1 warm-up then 8 requests; every output count is what the stub streamed for it
    assert stub["count"] == 9 and len(stub["sent"]) == 9
    assert sorted(x["output_tokens"] for x in recs) == sorted(stub["sent"][1:])
    assert all(x["output_tokens"] == x["max_tokens"] and x["output_tokens_from"] == "usage" for x in recs)
    assert r["summary"]["total_output_tokens"] == sum(stub["sent"][1:])
    assert r["summary"]["total_input_tokens"] == sum(x["prompt_len"] for x in recs)
    assert r["summary"]["request_goodput"] == pytest.approx(8 / r["summary"]["duration_s"])
    for x in recs:
        assert x["ttft_s"] >= FIRST_SLEEP
        assert len(x["itl_s"]) == x["output_tokens"] - 1
        assert x["e2e_s"] >= x["ttft_s"] + (x["output_tokens"] - 1) * GAP_SLEEP * 0.9
        assert x["tpot_s"] == pytest.approx((x["e2e_s"] - x["ttft_s"]) / (x["output_tokens"] - 1))
    # what went over the wire
    body = stub["bodies"][-1]
    assert body["model"] == "stub-model" and body["stream"] is True and body["ignore_eos"] is True
    assert body["temperature"] == 0 and body["stream_options"] == {"include_usage": True}
    assert all(isinstance(t, int) and 0 <= t < 256 for b in stub["bodies"] for t in b["prompt"])
    assert set(stub["auth"]) == {"Bearer sekrit"}
    assert "sekrit" not in out.read_text()  # the key is redacted from the saved command line and config
    if os.path.exists("/proc/self/stat"):  # the client's CPU time; a server not launched is not seen
        assert "CPU time over the timed run" in so and "--launch" in so
        assert [row["process"] for row in r["cpu_s"]] == [cpu.CLIENT] and r["cpu_s"][0]["seconds"] >= 0


@pytest.mark.parametrize("conc", [4, 2])
def test_warmups_run_at_the_runs_concurrency(stub, conc):
    """--num-warmups W sends W untimed requests at once, up to --max-concurrency (as vLLM's bench
    serve does), so the timed run starts on open connections; none of them is a record."""
    rc, so, se = run_script("--base-url", stub["url"], "--num-prompts", 1, "--num-warmups", 4,
                            "--max-concurrency", conc, "--random-input-len", 4, "--random-output-len", 3)
    assert rc == 0, se + so
    assert stub["count"] == 5 and stub["peak"] == conc
    assert [b["max_tokens"] for b in stub["bodies"][:4]] == [3] * 4 and "Successful requests:" in so


def test_failed_requests_are_counted(stub, tmp_path):
    stub["mode"] = "fail"
    out = tmp_path / "r.json"
    rc, so, se = run_script("--base-url", stub["url"], "--num-prompts", 8, "--max-concurrency", 4,
                            "--random-input-len", 4, "--random-output-len", 4, "--save-result", out)
    assert rc == 0, se + so
    r = json.loads(out.read_text())
    s = r["summary"]
    # requests 1..8 after the warm-up: 1 and 5 get HTTP 500, 3 and 7 an error chunk
    assert s["completed"] == 4 and s["failed"] == 4
    errs = [x["error"] for x in r["requests"] if not x["success"]]
    assert sum("HTTP 500" in e and "stub says no" in e for e in errs) == 2
    assert sum("error chunk" in e and "engine fell over" in e for e in errs) == 2
    assert "Failed requests:" in so and "HTTP 500" in so
    assert s["total_output_tokens"] == 16


def test_token_count_falls_back_to_chunks(stub, tmp_path):
    stub["mode"] = "nousage"
    out = tmp_path / "r.json"
    rc, so, se = run_script("--base-url", stub["url"], "--model", "given", "--num-prompts", 3,
                            "--num-warmups", 0, "--request-rate", 50, "--random-output-len", 5,
                            "--save-result", out, env={"MOERUN_API_KEY": "from-env"})
    assert rc == 0, se + so
    assert set(stub["auth"]) == {"Bearer from-env"}
    recs = json.loads(out.read_text())["requests"]
    assert [(x["output_tokens"], x["output_tokens_from"]) for x in recs] == [(5, "chunks")] * 3
    assert {b["model"] for b in stub["bodies"]} == {"given"}


def test_timeout_and_max_duration_bound_the_run(stub, tmp_path):
    stub["mode"] = "slow"  # 5 tokens take 0.05 + 4 * 0.3 s
    rc, so, se = run_script("--base-url", stub["url"], "--num-prompts", 2, "--num-warmups", 0,
                            "--random-output-len", 5, "--timeout", 0.4)
    assert rc == 1
    assert "Failed requests:                        2" in so and "timeout" in so

    out = tmp_path / "r.json"
    t0 = time.perf_counter()
    rc, so, se = run_script("--base-url", stub["url"], "--num-prompts", 4, "--num-warmups", 0,
                            "--max-concurrency", 1, "--random-output-len", 20, "--max-duration", 0.6,
                            "--save-result", out)
    assert time.perf_counter() - t0 < 10
    assert rc == 1 and "Stopped early: --max-duration 0.6 s reached" in so
    s = json.loads(out.read_text())["summary"]
    assert s["failed"] == 1 and s["not_sent"] == 3 and s["completed"] == 0
    assert "aborted" in so


def test_plot_writes_pngs(stub, tmp_path):
    pytest.importorskip("matplotlib")
    d = tmp_path / "plots"
    rc, so, se = run_script("--base-url", stub["url"], "--num-prompts", 6, "--request-rate", 40,
                            "--random-output-len", 4, "--plot", d)
    assert rc == 0, se + so
    for name in ("latency_cdf.png", "output_throughput.png"):
        f = d / name
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


# ==================================================================== --launch
def test_launch_reports_a_server_that_dies(capsys):
    srv = launch.LaunchedServer("--model tiny", ready_timeout=20, cmd_prefix=[
        sys.executable, "-c", "import sys; print('boom: no such model', file=sys.stderr); sys.exit(3)"])
    with pytest.raises(launch.LaunchError, match="exited with code 3") as e:
        srv.start()
    assert "boom: no such model" in str(e.value)
    assert srv.stop() == 3


STANDALONE_STUB = """
import argparse, asyncio, json, time
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

ap = argparse.ArgumentParser()
ap.add_argument("--host"); ap.add_argument("--port", type=int); ap.add_argument("--model", default="tiny")
ap.add_argument("--seed", type=int, default=0)
a, _ = ap.parse_known_args()  # the engine flags are for moerun.serve
app, t0 = FastAPI(), time.time()

@app.get("/health")
def health():
    return JSONResponse({}, status_code=200 if time.time() - t0 > 0.3 else 503)

@app.get("/v1/models")
def models():
    return {"data": [{"id": a.model}]}

@app.post("/v1/completions")
async def completions(req: Request):
    body = await req.json()
    n = body["max_tokens"]
    async def gen():
        for i in range(n):
            await asyncio.sleep(0.002)
            yield "data: " + json.dumps({"choices": [{"index": 0, "text": "b", "finish_reason": None}]}) + "\\n\\n"
        yield "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": n,
                                                                "total_tokens": n + 1}}) + "\\n\\n"
        yield "data: [DONE]\\n\\n"
    return StreamingResponse(gen(), media_type="text/event-stream")

uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
"""


def test_launch_and_compare_offline(tmp_path, monkeypatch, capsys):
    """--launch starts the server (a stub standing in for moerun.serve), waits for /health,
    measures it, stops it; --compare-offline then times the tiny preset's engine."""
    pytest.importorskip("uvicorn")
    app = tmp_path / "stubserve.py"
    app.write_text(STANDALONE_STUB)
    monkeypatch.setattr(launch, "SERVER_CMD", [sys.executable, str(app)])
    out = tmp_path / "r.json"
    rc = bs.main(["--launch", "--model tiny --weights-seed 1 --block-size 16", "--compare-offline", "--num-prompts", 4,
                  "--random-input-len", 8, "--random-output-len", 4, "--launch-timeout", 30,
                  "--save-result", str(out)])
    so = capsys.readouterr().out
    assert rc == 0, so
    assert "Server ready at http://127.0.0.1:" in so and "Server stopped (exit code" in so
    assert "machine (client and launched server):" in so
    assert "Served / offline (%):" in so and "Offline output throughput (tok/s):" in so
    r = json.loads(out.read_text())
    assert r["model"] == "tiny" and r["base_url"].startswith("http://127.0.0.1:")
    assert r["summary"]["completed"] == 4
    off = r["offline"]
    assert off["output_tokens"] == 16 and off["weights_seed"] == 1 and off["engine_config"] == {"block_size": 16}
    if os.path.exists("/proc/self/stat"):  # the launched server's process is accounted beside the client
        assert "CPU time over the timed run" in so
        procs = [row["process"] for row in r["cpu_s"]]
        assert cpu.CLIENT in procs and any(p.endswith("stubserve.py") for p in procs), procs
    assert off["served_over_offline_pct"] == pytest.approx(
        100 * r["summary"]["output_throughput"] / off["output_throughput"])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="no /proc")
def test_cpu_of_a_process_tree(tmp_path):
    """A grandchild's CPU between two snapshots is counted against it, not its idle parent."""
    go, done = tmp_path / "go", tmp_path / "done"
    spin = (f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            f"t = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
            f"open({str(done)!r}, 'w').close()\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {spin!r}]); "
                               "time.sleep(60)"], env={**os.environ, "RANK": "3"})
    try:
        t_end = time.time() + 30
        while len(cpu.snapshot(parent.pid)) < 3:  # this process, the parent, the grandchild
            assert time.time() < t_end, "the grandchild did not start"
            time.sleep(0.05)
        before = cpu.snapshot(parent.pid)
        go.touch()
        while not done.exists():
            assert time.time() < t_end, "the grandchild did not finish spinning"
            time.sleep(0.05)
        used = dict(cpu.cpu_used(before, cpu.snapshot(parent.pid)))
    finally:
        kids = cpu._children(parent.pid)
        parent.kill()
        for k in kids:
            os.kill(k, 9)
        parent.wait()
    (child,) = [lab for lab in used if lab.startswith("pid ") and not lab.startswith(f"pid {parent.pid} ")]
    (mid,) = [lab for lab in used if lab.startswith(f"pid {parent.pid} ")]
    assert used[child] >= 0.25 and used[mid] < 0.1, used
    assert mid.endswith("(rank 3)")  # torchrun's RANK in a process's environment names it
    assert cpu.CLIENT in used
    assert "CPU time over the timed run" in cpu.format_cpu(list(used.items()), 1.0, launched=True)


def test_launch_waits_for_health_and_stops(tmp_path):
    pytest.importorskip("uvicorn")
    app = tmp_path / "stubserve.py"
    app.write_text(STANDALONE_STUB)
    srv = launch.LaunchedServer("--model tiny", ready_timeout=30, cmd_prefix=[sys.executable, str(app)])
    assert srv.cmd[-4:] == ["--host", "127.0.0.1", "--port", str(srv.port)]
    try:
        srv.start()
        import httpx

        assert httpx.get(srv.base_url + "/health", trust_env=False).status_code == 200
    finally:
        code = srv.stop()
    assert srv.proc.poll() is not None and code is not None
