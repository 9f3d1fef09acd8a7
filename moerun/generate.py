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

import torch

from .config import ModelConfig
from .runner import build_model, default_device, generate_batch, resolve_dtype
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
    return ap


def read_prompts(args, tok) -> list[tuple[list[int], int | None]]:
    """(prompt ids, max_new_tokens override) for every prompt given."""
    if args.prompts_file:
        out = []
        with open(args.prompts_file) as f:
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
    t0 = time.perf_counter()
    outputs = generate_batch(model, [p for p, _ in prompts], [sampling_for(args, m) for _, m in prompts])
    dt = time.perf_counter() - t0
    n = sum(len(o) for o in outputs)
    log.info("generated %d tokens for %d prompt(s) in %.2fs (%.1f tokens/s, measured on %s)",
             n, len(prompts), dt, n / dt if dt else 0.0, device)
    if args.json:
        print(json.dumps(results_json(prompts, outputs, tok)))
    else:
        for (p, _), o in zip(prompts, outputs):
            print(tok.decode(o) if tok else " ".join(map(str, o)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
