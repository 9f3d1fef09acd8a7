"""``moerun generate``: generate tokens for one or more prompts.

    moerun generate --prompt "Hello" --max-new-tokens 16              # tiny preset, CPU
    moerun generate --model /ckpt --prompt-ids 1,2,3 --temperature 0 --json
    python -m moerun.generate --prompts-file prompts.jsonl --json

``--json`` prints one JSON object per prompt set on stdout: ``{"prompt_ids", "output_ids",
"text"}`` (a list of them when several prompts are given); logs go to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time


from .config import ModelConfig
from .engine import Engine
from .runner import build_model, default_device, resolve_dtype
from .sampling import SamplingParams
from .tokenizer import load_tokenizer

log = logging.getLogger("moerun")


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="tiny", help="checkpoint directory or preset name (default: tiny)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--seed", type=int, default=0, help="seed for a preset's random weights and for sampling")
    ap.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                    help="auto = Triton on CUDA, PyTorch references on CPU")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moerun generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    src.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeatable)")
    src.add_argument("--prompts-file", help='JSONL: {"prompt_ids": [...], "max_new_tokens": n} per line')
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's EOS token")
    ap.add_argument("--json", action="store_true", help="print JSON on stdout")
    lay = ap.add_argument_group("layout (under torchrun; tp*pp*dp = processes)")
    for axis, what in (("tp", "tensor"), ("pp", "pipeline"), ("ep", "expert"), ("dp", "data")):
        lay.add_argument(f"--{axis}", type=int, default=1, help=f"{what}-parallel degree")
    lay.add_argument("--timeout", type=float, default=180.0,
                     help="seconds a collective may wait before a dead peer becomes an error")
    eng = ap.add_argument_group("engine")
    eng.add_argument("--max-batch-tokens", type=int, default=2048,
                     help="tokens one micro-batch step may compute (prefill chunks + decodes)")
    eng.add_argument("--kv-cache-gb", type=float, default=None,
                     help="KV cache per rank (default: 256 MiB on CPU, 90%% of free GPU memory)")
    eng.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    eng.add_argument("--micro-batches", type=int, default=None, help="micro-batches per replica (default: pp)")
    eng.add_argument("--stats", action="store_true", help="print steps, tokens/s, per-stage busy/wait, KV use")
    return ap


def engine_config(args):
    from .engine import EngineConfig

    if args.max_batch_tokens < 1 or args.block_size < 1:
        raise ValueError("--max-batch-tokens and --block-size must be >= 1")
    return EngineConfig(max_batch_tokens=args.max_batch_tokens, kv_cache_gb=args.kv_cache_gb,
                        block_size=args.block_size, micro_batches=args.micro_batches)


def print_stats(engine, traces: dict[int, list], seconds: float, tokens: int) -> None:
    """Per-stage compute and wait time from every rank's schedule trace (stderr)."""
    err = sys.stderr
    print(f"[stats] ticks {engine.tick}, generated tokens {tokens}, {seconds:.2f}s, "
          f"{tokens / seconds if seconds else 0:.1f} tokens/s (measured)", file=err)
    print(f"[stats] KV cache: {engine.num_blocks} blocks x {engine.cfg.block_size} tokens per replica, "
          f"peak use {engine.peak_blocks_used} blocks ({100 * engine.peak_blocks_used / engine.num_blocks:.1f}%)",
          file=err)
    by_stage: dict[int, list] = {}
    for trace in traces.values():
        for tick, stage, mb, ntok, busy, wait in trace:
            by_stage.setdefault(stage, []).append((mb, busy, wait, ntok))
    ranks_per_stage = max(1, len(traces) // max(len(by_stage), 1))
    for stage, rows in sorted(by_stage.items()):
        busy = sum(r[1] for r in rows) / ranks_per_stage
        wait = sum(r[2] for r in rows) / ranks_per_stage
        idle = sum(1 for r in rows if r[0] is None or r[3] == 0) // ranks_per_stage
        print(f"[stats] stage {stage}: compute {busy:.3f}s, waiting for input {wait:.3f}s, "
              f"idle ticks (no tokens) {idle} of {len(rows) // ranks_per_stage} (per rank, averaged)", file=err)


def read_prompts(args, tok) -> list[tuple[list[int], int | None]]:
    """(prompt ids, max_new_tokens override) for every prompt given."""
    if args.prompts_file:
        out = []
        try:
            f = open(args.prompts_file)
        except OSError as e:
            raise ValueError(f"cannot read --prompts-file: {e}") from e
        with f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    out.append(([int(t) for t in rec["prompt_ids"]], rec.get("max_new_tokens")))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{args.prompts_file}:{n}: expected "
                                     f'{{"prompt_ids": [...], "max_new_tokens": n}}, got {line.strip()[:80]!r}') from e
        return out
    if args.prompt_ids:
        try:
            return [([int(t) for t in s.split(",") if t.strip()], None) for s in args.prompt_ids]
        except ValueError as e:
            raise ValueError(f"--prompt-ids takes comma-separated integers, e.g. 1,2,3 ({e})") from e
    if tok is None:
        raise ValueError(f"{args.model} has no tokenizer.json: pass --prompt-ids instead of --prompt")
    return [(tok.encode(t), None) for t in (args.prompt or ["Hello, moerun!"])]


def sampling_for(args, max_new: int | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new or args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)


def results_json(prompts, outputs, tok):
    res = [{"prompt_ids": p, "output_ids": o, "text": tok.decode(o) if tok else None}
           for (p, _), o in zip(prompts, outputs)]
    return res[0] if len(res) == 1 else res


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[moerun] %(message)s", stream=sys.stderr)
    args = parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        from .dist_generate import main as dist_main
        return dist_main(args)
    if args.tp * args.pp * args.dp > 1:
        n = args.tp * args.pp * args.dp
        print(f"moerun generate: error: layout tp={args.tp} pp={args.pp} dp={args.dp} needs {n} processes; "
              f"launch with torchrun --nproc_per_node={n} -m moerun.generate ...", file=sys.stderr)
        return 2
    try:
        return _run_local(args)
    except ValueError as e:
        print(f"moerun generate: error: {e}", file=sys.stderr)
        return 2


def _run_local(args) -> int:
    from . import kernels

    kernels.set_default_impl(args.kernels)
    device = args.device or default_device()
    dtype = resolve_dtype(args.dtype, device)
    cfg = ModelConfig.load(args.model)
    tok = load_tokenizer(args.model, cfg)
    prompts = read_prompts(args, tok)
    t0 = time.perf_counter()
    model = build_model(args.model, dtype=dtype, device=device, seed=args.seed, cfg=cfg)
    log.info("loaded %s (%s, %.1fM params) on %s/%s in %.1fs", args.model, cfg.model_type,
             cfg.num_params() / 1e6, device, str(dtype).replace("torch.", ""), time.perf_counter() - t0)
    serve_prompts(Engine(model, engine_config(args)), prompts, args, tok, f"on {device}")
    return 0


def serve_prompts(engine, prompts, args, tok, where: str, finish=None) -> None:
    """Run every prompt through the engine, log the measured rate, print the results.
    ``finish(engine)`` (under torchrun) stops the workers and returns every rank's trace."""
    t0 = time.perf_counter()
    outputs = engine.generate([p for p, _ in prompts], [sampling_for(args, m) for _, m in prompts])
    dt = time.perf_counter() - t0
    traces = finish(engine) if finish else {0: engine.worker.trace}
    n = sum(len(o) for o in outputs)
    log.info("generated %d tokens for %d prompt(s) in %.2fs (%.1f tokens/s, measured %s)",
             n, len(prompts), dt, n / dt if dt else 0.0, where)
    if args.stats:
        print_stats(engine, traces, dt, n)
    if args.json:
        print(json.dumps(results_json(prompts, outputs, tok)), flush=True)
    else:
        for o in outputs:
            print(tok.decode(o) if tok else " ".join(map(str, o)), flush=True)

if __name__ == "__main__":
    sys.exit(main())
