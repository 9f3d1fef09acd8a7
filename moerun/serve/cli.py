"""``moerun serve``: the OpenAI-compatible server, in one process or over a layout.

    moerun serve                                              # tiny preset on 127.0.0.1:8000
    moerun serve --model /ckpt --port 8080 --api-key secret
    torchrun --nproc_per_node=8 -m moerun.serve --tp 2 --pp 2 --ep 4 --dp 2 --model /ckpt

Rank 0 runs the engine leader in its main thread and spawns one HTTP process (uvicorn,
the routes, tokenizing and detokenizing), joined by a pipe, so HTTP work never holds the
engine's interpreter lock; every other rank follows the leader's ticks. The HTTP process
starts first, so /health answers 503 while the model loads. SIGTERM or SIGINT (on rank 0, or the torchrun
parent, which forwards it to every rank): /health turns 503, new requests get 503, the
requests in flight finish within --drain-timeout seconds (then they are aborted with an
error), and every rank exits 0. The other ranks ignore the signal and stop when the
leader says so. A dead rank or an engine error fails every request in flight with an
error and every rank exits non-zero.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from .. import args as cli_args
from .. import eplb
from ..build import resolve_device, resolve_dtype
from ..config import ModelConfig
from ..engine import Engine, follow_leader
from ..entry import run_command, setup_logging
from ..mesh import gather_to_rank0
from ..profile.summary import build_summary, check_out_dir
from ..profile_report import publish
from ..runtime import Runtime, gather_expert_load, launched_world
from ..tokenizer import load_tokenizer
from .app import ServerSettings, ServerState, build_app
from .asgi import RawSend
from .chat import load_chat_template
from .client import EngineClient
from .loop import EngineLoop
from .metrics import ServerMetrics

log = logging.getLogger("moerun")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moerun serve", description=__doc__, formatter_class=cli_args.HelpFormatter)
    cli_args.add_model_args(ap)
    cli_args.add_layout_args(ap)
    cli_args.add_engine_args(ap)
    cli_args.add_eplb_args(ap)
    g = ap.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (rank 0)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model as given)")
    g.add_argument("--max-waiting", type=int, default=256, help="requests queued before new ones get 503")
    g.add_argument("--api-key", default=os.environ.get("MOERUN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MOERUN_API_KEY, else none)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens per request (default: the model's max_position_embeddings, "
                        "capped by the KV cache)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM / SIGINT")
    g.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed chunk, as SGLang's flag: a request's first token goes at once, "
                        "then every Nth (and the rest when it ends). Larger values cut the HTTP side's CPU "
                        "per token, which matters where the engine shares the CPUs")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command("moerun serve", lambda: _serve(args))


def check_server_flags(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0..65535)")
    if args.max_waiting < 1:
        raise ValueError(f"--max-waiting must be >= 1, got {args.max_waiting}")
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.stream_interval < 1:
        raise ValueError(f"--stream-interval must be >= 1 token, got {args.stream_interval}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len must be >= 2, got {args.max_model_len}")


def _serve(args) -> int:
    opts, par, ecfg = cli_args.model_options(args), cli_args.parallel_config(args), cli_args.engine_config(args)
    check_server_flags(args)
    if args.profile_out is not None and launched_world()[0] == 0:
        check_out_dir(args.profile_out)  # before loading, not at the end of a long run
    rank, _ = launched_world()
    if rank != 0:  # followers: the leader decides when to stop
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        rt = Runtime.create(opts, par, args.timeout, cli_args.eplb_options(args))
        worker = follow_leader(rt.model, ecfg, rt.mesh)
        if ecfg.profile:  # the leader gathers every rank's profile after the drain
            gather_to_rank0(rt.mesh, {rt.rank: worker.profile_report()})
        if args.expert_load_out is not None:
            gather_expert_load(rt)
        return 0
    device = resolve_device(opts.device)
    http = HttpSpec(served_model_name=args.served_model_name or opts.model, max_waiting=args.max_waiting,
                    api_key=args.api_key or None, host=args.host, port=args.port, model=opts.model,
                    layout={"tp": par.tp, "pp": par.pp, "ep": par.ep, "dp": par.dp,
                            "dtype": str(resolve_dtype(opts.dtype, device)).removeprefix("torch."),
                            "device": device.type})
    conn, child_conn = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=http_main, args=(child_conn, http), name="moerun-http", daemon=True)
    proc.start()
    child_conn.close()
    try:
        return _lead(args, opts, par, ecfg, conn, proc)
    finally:
        try:
            conn.send(("stop",))
        except OSError:
            pass
        proc.join(10)
        if proc.is_alive():  # it ignores SIGTERM (the engine process drains for it): SIGKILL
            log.warning("the HTTP process did not exit within 10 s of the stop: killing it")
            proc.kill()
            proc.join(5)


def _lead(args, opts, par, ecfg, conn, proc) -> int:
    if not conn.poll(120):
        raise RuntimeError("the HTTP process did not start")
    kind, ok, detail = conn.recv()
    if not ok:
        raise ValueError(detail)
    port = detail  # /health is 503 until the engine below says ready

    stop = {"loop": None, "signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        if stop["loop"] is not None:
            stop["loop"].drain(args.drain_timeout)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    t0 = time.perf_counter()
    rt = Runtime.create(opts, par, args.timeout, cli_args.eplb_options(args))
    engine = Engine(rt.model, ecfg, rt.mesh)
    cache_tokens = engine.num_blocks * ecfg.block_size
    max_len = args.max_model_len or min(rt.cfg.max_position_embeddings, cache_tokens)
    if max_len > rt.cfg.max_position_embeddings:
        raise ValueError(f"--max-model-len {max_len} is beyond the model's max_position_embeddings "
                         f"({rt.cfg.max_position_embeddings})")
    if max_len > cache_tokens:
        raise ValueError(f"--max-model-len {max_len} does not fit the KV cache ({cache_tokens} tokens per replica): "
                         "raise --kv-cache-gb or lower --max-model-len")
    loop = stop["loop"] = EngineLoop(engine, conn, args.stream_interval)
    conn.send(("ready", rt.cfg.vocab_size, max_len))
    if stop["signal"] is not None:  # a signal came while loading
        loop.drain(args.drain_timeout)
    log.info("serving %s (%s, %s) on http://%s:%d in %.1fs; max model len %d",
             args.served_model_name or opts.model, rt.cfg.model_type, par, args.host, port,
             time.perf_counter() - t0, max_len)
    t_serve = time.perf_counter()
    loop.run()
    log.info("drained: stopping")
    engine.shutdown()
    if ecfg.profile:
        write_server_profile(args, opts, rt, engine, loop, time.perf_counter() - t_serve)
    if args.expert_load_out is not None:  # the whole run's expert load, every rank's summed
        eplb.write_load(args.expert_load_out, rt.cfg, gather_expert_load(rt), model=opts.model)
        log.info("wrote the expert load to %s", args.expert_load_out)
    return 0


def write_server_profile(args, opts, rt, engine, loop: EngineLoop, wall_s: float) -> None:
    """Every rank's profile of the whole serving run, gathered after the drain: the
    summary and trace under --profile-out, else the report on stderr."""
    mine = {0: engine.worker.profile_report()}
    reports = gather_to_rank0(rt.mesh, mine) if rt.mesh else mine
    workload = {"requests": loop.num_requests, "prompt_tokens": loop.prompt_tokens, "output_tokens": loop.output_tokens}
    summary = build_summary(reports, par=rt.par, model=opts.model, dtype=str(rt.model.dtype).removeprefix("torch."),
                            workload=workload, wall_s=wall_s, ticks=engine.tick,
                            placement=rt.model.comm.placement)
    publish(summary, reports, args.profile_out)


@dataclass(frozen=True)
class HttpSpec:
    """What the HTTP process needs to know (it loads no model, only the tokenizer)."""
    served_model_name: str
    max_waiting: int
    api_key: str | None
    host: str
    port: int
    model: str
    layout: dict


def http_main(conn, spec: HttpSpec) -> None:
    """The HTTP process: uvicorn, the routes and the tokenizer. It ignores SIGTERM / SIGINT
    (the engine process drains and tells it) and exits when the pipe to the engine closes."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    setup_logging()
    metrics = ServerMetrics(spec.served_model_name, **spec.layout)
    state = ServerState(ServerSettings(spec.served_model_name, spec.max_waiting, spec.api_key), metrics)
    seen = {"preemptions": 0}

    def on_stats(st) -> None:
        metrics.set_queue(st.running, st.waiting + len(client.unanswered), st.kv_usage)
        metrics.add_preemptions(st.preemptions - seen["preemptions"])
        seen["preemptions"] = st.preemptions

    def on_ready(vocab_size: int, max_model_len: int) -> None:
        cfg = ModelConfig.load(spec.model)
        tok = load_tokenizer(spec.model, cfg)
        template = load_chat_template(spec.model) if os.path.isdir(spec.model) else None
        state.ready(client, tok, template, vocab_size, max_model_len)
        # the ~200k objects loaded so far (FastAPI, pydantic, the tokenizer) live as long as the
        # process: out of the collector's sight, a full collection no longer walks them all
        # while streams are being written
        gc.freeze()

    client = EngineClient(conn, on_stats, on_ready)
    http = HttpThread(RawSend(build_app(state)), spec.host, spec.port)
    try:
        http.start()
    except (ValueError, RuntimeError) as e:
        conn.send(("http", False, str(e)))
        return
    conn.send(("http", True, http.port))
    client.attach(http.aio)  # the event loop reads the engine's pipe from now on
    while not client.wait(1.0):  # until the engine process closes the pipe
        if not http.thread.is_alive():
            log.error("the HTTP server's thread ended: the HTTP process exits")
            break
    http.stop()


class HttpThread:
    """uvicorn in a daemon thread, on an event loop of its own that ``aio`` names (uvloop
    when installed, as uvicorn picks): the engine's pipe is read in that loop too."""

    def __init__(self, app, host: str, port: int):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    lifespan="off", timeout_graceful_shutdown=5))
        self.aio = new_event_loop()
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self.port = port

    def _run(self) -> None:
        asyncio.set_event_loop(self.aio)
        try:
            self.aio.run_until_complete(self.server.serve())
        finally:
            self.aio.close()

    def start(self, timeout_s: float = 30.0) -> None:
        self.thread.start()
        t_end = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive():
                raise ValueError(f"the HTTP server could not listen on port {self.port} "
                                 "(in use, or not allowed): pick another --port")
            if time.monotonic() > t_end:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        if self.port == 0:
            self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    sys.exit(main())
