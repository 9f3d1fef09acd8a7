"""Online serving benchmark for an OpenAI-compatible completions server (after vLLM's
``vllm bench serve``): send N streaming requests with Poisson arrivals (or all at once),
optionally capped in concurrency, and report throughput and latency as the client saw them.

    # against a server that is already running (moerun serve, vLLM, ...)
    python scripts/bench_serve.py --base-url http://127.0.0.1:8000 --num-prompts 100 \\
        --request-rate 8 --max-concurrency 16 --save-result out.json --plot plots/

    # start `python -m moerun.serve ARGS --host 127.0.0.1 --port <free>` itself, benchmark
    # it, stop it, then run the same prompts through the offline engine for a ratio
    python scripts/bench_serve.py --launch "--model tiny --weights-seed 0" --compare-offline

    # a layout: the launched server under torchrun with N processes
    python scripts/bench_serve.py --launch "--model tiny --tp 2" --launch-nproc 2

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
    CPU time                 (Linux) CPU seconds over the timed run of this client and, with
                             --launch, of every process the server runs (engine, HTTP process,
                             ranks), from /proc: on a machine the client and the server share,
                             where a served / offline gap goes.

Bounds: at most --num-prompts requests, each at most --timeout s, the whole run at most
--max-duration s; when that hits, requests not yet sent are not sent, those in flight are
aborted and counted failed, and the output says so. The only traffic is to --base-url (or
the launched server on 127.0.0.1); proxy environment variables are ignored.

The streams are read by serve_bench/wire.py: keep-alive connections as asyncio protocols with
httptools' parser, on uvloop when installed (both in the serve and dev extras). On a small
machine the client shares the CPUs with the server it measures; this takes about half the CPU
per streamed chunk that aiohttp does (docs/perf.md), which took half of httpx's.

Exit status: 0 when at least one request succeeded; 1 when none did, every warm-up request
failed, or the launched server did not come up; 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the serve_bench package beside this file
from serve_bench.client import WARMUP_FAILED, resolve_model, run_benchmark  # noqa: E402
from serve_bench.cpu import format_cpu  # noqa: E402
from serve_bench.cpu import snapshot as cpu_snapshot  # noqa: E402
from serve_bench.datasets import jsonl_dataset, random_dataset  # noqa: E402
from serve_bench.launch import LaunchedServer, LaunchError, parse_launch_args, run_offline  # noqa: E402
from serve_bench.report import machine, write_plots  # noqa: E402
from serve_bench.stats import fmt, format_table, summarize  # noqa: E402

DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def _run_loop(coro):
    """``asyncio.run(coro)`` on uvloop when it is installed (the serve extra), else on asyncio's
    own loop. The main task returns None: at its end, Python 3.11's asyncio.Runner formats the
    task's repr (and with it the whole result) while it restores the SIGINT handler, which for
    a run of a few thousand requests took over a second."""
    try:
        from uvloop import new_event_loop
    except ImportError:
        new_event_loop = None  # asyncio's own
    out = []

    async def main():
        out.append(await coro)
    with asyncio.Runner(loop_factory=new_event_loop) as r:
        r.run(main())
    return out[0]


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
    la.add_argument("--launch-nproc", type=int, default=1, metavar="N",
                    help="run the launched server under torchrun with N processes (a layout: --tp/--pp/--ep/--dp "
                         "in --launch); torchrun, stopped by SIGTERM after the run, exits 1 by design")
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
    if a.launch_nproc < 1:
        ap.error("--launch-nproc must be >= 1")
    if a.launch_nproc > 1 and a.launch is None:
        ap.error("--launch-nproc needs --launch")
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
        server = (LaunchedServer(a.launch, ready_timeout=a.launch_timeout, log_path=a.server_log,
                                 nproc=a.launch_nproc)
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
              f"request rate {fmt(float(a.request_rate))} req/s, max concurrency {a.max_concurrency or 'none'}, "
              f"dataset {a.dataset}, seed {a.seed}, --timeout {a.timeout:g} s, --max-duration {a.max_duration:g} s",
              flush=True)
        done = [0]
        step = max(1, len(prompts) // 10)

        def progress(rec):
            done[0] += 1
            if done[0] % step == 0 or done[0] == len(prompts):
                print(f"  {done[0]}/{len(prompts)} requests done", flush=True)

        run = _run_loop(run_benchmark(
            url, prompts, model=model, temperature=a.temperature, request_rate=a.request_rate,
            max_concurrency=a.max_concurrency, seed=a.seed, timeout=a.timeout, max_duration=a.max_duration,
            api_key=a.api_key, num_warmups=a.num_warmups, progress=progress,
            cpu_probe=lambda: cpu_snapshot(server.proc.pid if server is not None else None)))
    finally:
        if server is not None and server.proc is not None:
            server_code = server.stop()
            how = (" (torchrun's own code when a signal stops it; the ranks' exits are in the server's output)"
                   if server.nproc > 1 and server_code == 1 else "")
            print(f"Server stopped (exit code {server_code}){how}", flush=True)

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
    cpu = run.cpu_s
    if cpu is not None:
        print(format_cpu(cpu, summary["duration_s"], launched=server is not None))
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
                  "cpu_s": None if cpu is None else [{"process": lab, "seconds": v} for lab, v in cpu],
                  "server_exit_code": server_code, "warmup_errors": run.warmup_errors,
                  "requests": [asdict(r) for r in run.records]}
        Path(a.save_result).parent.mkdir(parents=True, exist_ok=True)
        with open(a.save_result, "w") as f:
            json.dump(jsonable(result), f, indent=1, allow_nan=False)
        print(f"Wrote {a.save_result}")
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
