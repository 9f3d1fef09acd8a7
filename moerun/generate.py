"""``moerun generate``: generate tokens for one or more prompts, in one process or under
a layout launched by torchrun.

    moerun generate --prompt "Hello" --max-new-tokens 16              # tiny preset, CPU
    moerun generate --model /ckpt --prompt-ids 1,2,3 --temperature 0 --json
    torchrun --nproc_per_node=8 -m moerun.generate --tp 2 --pp 2 --ep 4 --dp 2 \\
        --prompts-file prompts.jsonl --json

``--json`` prints one JSON object per prompt set on stdout: ``{"prompt_ids", "output_ids",
"text"}`` (a list of them when several prompts are given); logs go to stderr.

``--profile`` profiles every rank (``moerun.profile``); at the end rank 0 gathers the
ranks' reports and prints the tables of ``moerun profile-report`` on stderr, or with
``--profile-out DIR`` writes ``DIR/summary.json`` and ``DIR/trace.json`` (Perfetto).

The path: flags -> ``ModelOptions`` / ``ParallelConfig`` / ``EngineConfig`` /
``SamplingParams`` (moerun.args) -> ``Runtime`` (mesh + model stage) -> on rank 0 an
``Engine`` (schedulers, ticks), on the others ``follow_leader`` -> ``StageWorker`` ->
the model -> the kernels.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch.distributed as dist

from . import args as cli_args
from . import eplb
from .engine import Engine, follow_leader
from .engine.request import check_prompt
from .entry import run_command
from .mesh import gather_to_rank0, leader_decides
from .profile.summary import build_summary, check_out_dir
from .profile_report import publish
from .runtime import Runtime, gather_expert_load
from .serve.detok import TextStream
from .tokenizer import load_tokenizer

log = logging.getLogger("moerun")
Prompt = tuple[list[int], "int | None"]  # prompt ids, max_new_tokens override


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="moerun generate", description=__doc__,
                                 formatter_class=cli_args.HelpFormatter)
    cli_args.add_model_args(ap)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    src.add_argument("--prompt-ids", action="append", help="comma-separated token ids (repeatable)")
    src.add_argument("--prompts-file", help='JSONL: {"prompt_ids": [...], "max_new_tokens": n} per line')
    cli_args.add_sampling_args(ap)
    ap.add_argument("--json", action="store_true", help="print JSON on stdout")
    cli_args.add_layout_args(ap)
    cli_args.add_engine_args(ap)
    cli_args.add_eplb_args(ap)
    ap.add_argument("--stats", action="store_true", help="print steps, tokens/s, per-stage busy/wait, KV use")
    return ap


PROMPT_KEYS = ("prompt_ids", "prompt", "max_new_tokens")  # a prompts file line's keys


def _prompt_record(rec, where: str, tok) -> Prompt:
    """One line of a prompts file: {"prompt_ids": [...] | "prompt": "text", "max_new_tokens": n}."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    unknown = sorted(set(rec) - set(PROMPT_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; a line takes {', '.join(PROMPT_KEYS)} "
                         "(sampling is set for all prompts by the command line)")
    if ("prompt_ids" in rec) == ("prompt" in rec):
        raise ValueError(f"{where}: give exactly one of prompt_ids (token ids) and prompt (text)")
    if "prompt_ids" in rec:
        ids = rec["prompt_ids"]
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise ValueError(f"{where}: prompt_ids must be a list of integer token ids, got {json.dumps(ids)[:60]}")
    else:
        if not isinstance(rec["prompt"], str):
            raise ValueError(f"{where}: prompt must be text, got {json.dumps(rec['prompt'])[:60]}")
        if tok is None:
            raise ValueError(f"{where}: this checkpoint has no tokenizer.json: give prompt_ids instead of prompt")
        ids = tok.encode(rec["prompt"])
    n = rec.get("max_new_tokens")
    if n is not None and (type(n) is not int or n < 1):
        raise ValueError(f"{where}: max_new_tokens must be an integer >= 1, got {json.dumps(n)}")
    return ids, n


def read_prompts(prompt: list[str] | None, prompt_ids: list[str] | None, prompts_file: str | None,
                 tok) -> list[Prompt]:
    """(prompt ids, max_new_tokens override) for every prompt given."""
    if prompts_file:
        out = []
        try:
            f = open(prompts_file)
        except OSError as e:
            raise ValueError(f"cannot read --prompts-file: {e}") from e
        with f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise ValueError(f"{prompts_file}:{n}: not JSON: expected "
                                     f'{{"prompt_ids": [...], "max_new_tokens": n}}, got {line.strip()[:80]!r}') from None
                out.append(_prompt_record(rec, f"{prompts_file}:{n}", tok))
        if not out:
            raise ValueError(f"{prompts_file} holds no prompt")
        return out
    if prompt_ids:
        try:
            return [([int(t) for t in s.split(",") if t.strip()], None) for s in prompt_ids]
        except ValueError as e:
            raise ValueError(f"--prompt-ids takes comma-separated integers, e.g. 1,2,3 ({e})") from e
    if tok is None:
        raise ValueError("this checkpoint has no tokenizer.json: pass --prompt-ids instead of --prompt")
    return [(tok.encode(t), None) for t in (prompt or ["Hello, moerun!"])]


def generate_with_stops(engine: Engine, prompts: list[list[int]], params: list, tok, stops: list[str]):
    """Every prompt to the end, each cut at the first of ``stops`` in its text (the stop
    text left out, the request aborted there). Returns (output ids, texts) in input order."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    outs = {rid: [] for rid in ids}
    # no prompt context: the text is decode(output ids), as without --stop
    texts = {rid: TextStream(tok, stops) for rid in ids}
    while engine.has_unfinished():
        for ev in engine.step():
            ts = texts[ev.req_id]
            if ev.token is not None and not ts.stopped:
                outs[ev.req_id].append(ev.token)
                ts.add(ev.token)
                if ts.stopped:
                    engine.abort(ev.req_id)
            if ev.finished and not ts.stopped:
                ts.finish()
    return [outs[r] for r in ids], [texts[r].text for r in ids]


def print_stats(engine: Engine, traces: dict[int, list], seconds: float, tokens: int) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command("moerun generate", lambda: _generate(args))


def _generate(args) -> int:
    # Every flag becomes a settings object first, on every rank: a bad value fails
    # everywhere with the same message before the model loads.
    opts, par = cli_args.model_options(args), cli_args.parallel_config(args)
    ecfg, base_sp = cli_args.engine_config(args), cli_args.sampling_params(args)
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if any(not s for s in args.stop):
        raise ValueError("--stop takes a non-empty text")
    t0 = time.perf_counter()
    eo = cli_args.eplb_options(args)
    rt = Runtime.create(opts, par, args.timeout, eo)
    tok = load_tokenizer(opts.model, rt.cfg, required=bool(args.prompt) or bool(args.stop))
    if args.stop and tok is None:
        raise ValueError("--stop needs a tokenizer and this checkpoint has no tokenizer.json")

    def checked_prompts() -> list[Prompt]:
        prompts = read_prompts(args.prompt, args.prompt_ids, args.prompts_file, tok)
        for i, (p, _) in enumerate(prompts):
            try:
                check_prompt(p, rt.cfg.vocab_size)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        return prompts
    prompts = leader_decides(rt.mesh, checked_prompts)  # every rank exits alike on a bad prompt
    if args.profile_out is not None:
        leader_decides(rt.mesh, lambda: check_out_dir(args.profile_out))  # before the run, not after it
    params = [base_sp if n is None else cli_args.sampling_params(args, n) for _, n in prompts]
    where = f"{par}, {rt.mesh.device.type}" if rt.mesh else str(next(rt.model.parameters()).device)
    log.info("loaded %s (%s, %.1fM params) on %s in %.1fs", opts.model, rt.cfg.model_type,
             rt.cfg.num_params() / 1e6, where, time.perf_counter() - t0)
    if not rt.is_leader:
        worker = follow_leader(rt.model, ecfg, rt.mesh)
        gather_to_rank0(rt.mesh, {rt.rank: list(worker.trace)})
        if ecfg.profile:
            gather_to_rank0(rt.mesh, {rt.rank: worker.profile_report()})
        if eo.load_out is not None:
            gather_expert_load(rt)
        dist.barrier(group=rt.mesh.ctrl)
        return 0
    engine = Engine(rt.model, ecfg, rt.mesh)
    t0 = time.perf_counter()
    texts = None
    if args.stop:
        outputs, texts = generate_with_stops(engine, [p for p, _ in prompts], params, tok, args.stop)
    else:
        outputs = engine.generate([p for p, _ in prompts], params)
    dt = time.perf_counter() - t0
    if rt.mesh:
        engine.shutdown()
        traces = gather_to_rank0(rt.mesh, {0: list(engine.worker.trace)})
    else:
        traces = {0: list(engine.worker.trace)}
    profiles = None
    if ecfg.profile:
        mine = {0: engine.worker.profile_report()}
        profiles = gather_to_rank0(rt.mesh, mine) if rt.mesh else mine
    if eo.load_out is not None:
        eplb.write_load(eo.load_out, rt.cfg, gather_expert_load(rt), model=opts.model)
        log.info("wrote the expert load to %s", eo.load_out)
    n = sum(len(o) for o in outputs)
    log.info("generated %d tokens for %d prompt(s) in %.2fs (%.1f tokens/s, measured on %s)",
             n, len(prompts), dt, n / dt if dt else 0.0, where)
    if args.stats:
        print_stats(engine, traces, dt, n)
    if profiles is not None:
        workload = {"requests": len(prompts), "prompt_tokens": sum(len(p) for p, _ in prompts), "output_tokens": n}
        summary = build_summary(profiles, par=rt.par, model=opts.model,
                                dtype=str(rt.model.dtype).removeprefix("torch."), workload=workload,
                                wall_s=dt, ticks=engine.tick, placement=rt.model.comm.placement)
        publish(summary, profiles, args.profile_out)
    texts = texts or [tok.decode(o) if tok else None for o in outputs]
    if args.json:
        res = [{"prompt_ids": p, "output_ids": o, "text": t} for (p, _), o, t in zip(prompts, outputs, texts)]
        print(json.dumps(res[0] if len(res) == 1 else res), flush=True)
    else:
        if not os.path.isdir(opts.model):
            print(f"# {opts.model} is a preset with random weights (--weights-seed {opts.weights_seed}): "
                  "its text is noise; point --model at a checkpoint for a real model", flush=True)
        for (p, _), o, t in zip(prompts, outputs, texts):
            print(f"prompt ids {p}" + (f"  text {tok.decode(p)!r}" if tok else ""), flush=True)
            print(f"output ids {o}" + (f"  text {t!r}" if t is not None else ""), flush=True)
    if rt.mesh:
        dist.barrier(group=rt.mesh.ctrl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
