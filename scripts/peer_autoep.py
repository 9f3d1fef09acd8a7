"""DeepSpeed AutoEP end to end beside moerun: the same Hugging Face checkpoint, the same
prompts, greedy; run by ``scripts/bench.py --section peers`` under torchrun:

    torchrun --nproc_per_node=EP scripts/peer_autoep.py CKPT OUT.json [--prompts 8] [--new-tokens 16]

Every rank loads the checkpoint with transformers and hands it to ``deepspeed.initialize``
with ``expert_parallel: {enabled, autoep_size: EP, preset_model: <model_type>}``: AutoEP
replaces each MoE block by its own expert-parallel layer (rank r keeps experts
[r E/EP, (r+1) E/EP) and routes tokens with an all-to-all). The prompts are split over the
ranks as data-parallel ranks split a batch (each rank generates its share, left-padded, with
``generate(do_sample=False)`` and a fixed number of new tokens, so every rank makes the same
number of forward calls and the all-to-alls line up). Rank 0 then runs moerun on the same
checkpoint in one process (``Engine.generate``, greedy, EOS ignored) and counts the prompts
whose new tokens are identical.

Rank 0 writes {ep, prompts, new_tokens, same, notes, autoep_s, moerun_s, versions,
conditions} to OUT.json. Wall times are one generate each, measured on this CPU on gloo; the
AutoEP time is the slowest rank's.

AutoEP needs a transformers whose ``output_capturing._CAN_RECORD_REGISTRY`` is a plain dict
(5.x up to 5.22; 5.23 made it a class whose ``get`` takes a model, and DeepSpeed 0.19.8's
AutoEP then fails with "_CanRecordRegistry.get() takes 2 positional arguments"): the
``deepspeed`` extra pins it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench import compare, left_pad, make_prompts, run_moerun  # this script runs from scripts/

CONDITIONS = ("deepspeed.initialize with expert_parallel.enabled, autoep_size = EP, preset_model = model_type",
              "prompts split over the EP ranks (each generates its share), left-padded, pad id 0",
              "generate(do_sample=False, max_new_tokens = min_new_tokens = N): EOS ignored like moerun's ignore_eos",
              "float32 weights and activations on CPU, gloo, one thread per rank",
              "moerun: one process, Engine.generate, greedy, ignore_eos")


@torch.inference_mode()
def main() -> None:
    import deepspeed
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", help="a Hugging Face checkpoint directory (safetensors)")
    ap.add_argument("out")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, ep = dist.get_rank(), dist.get_world_size()
    raw = json.loads((Path(args.ckpt) / "config.json").read_text())
    if args.prompts % ep:
        raise SystemExit(f"--prompts {args.prompts} must be a multiple of the EP size {ep}")
    prompts = make_prompts(args.prompts, args.seed, lo=4, hi=12, vocab=raw["vocab_size"])
    share = args.prompts // ep
    mine = prompts[rank * share:(rank + 1) * share]

    hf = transformers.AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32)
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "expert_parallel": {"enabled": True, "autoep_size": ep, "preset_model": raw["model_type"]}}
    engine, *_ = deepspeed.initialize(model=hf, config=ds_config)
    engine.module.eval()
    ids, mask = left_pad(mine)
    dist.barrier()
    t0 = time.perf_counter()
    out = engine.module.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, pad_token_id=0)
    autoep_s = time.perf_counter() - t0
    got: list = [None] * ep
    dist.all_gather_object(got, (out[:, ids.shape[1]:].tolist(), autoep_s))
    if rank == 0:
        theirs = [seq for part, _ in got for seq in part]
        from moerun.build import build_model

        moerun_s, ours = run_moerun(build_model(args.ckpt, dtype=torch.float32, device="cpu"), prompts,
                                    args.new_tokens)
        same, notes = compare(ours, theirs, set(), ref_name="AutoEP")
        Path(args.out).write_text(json.dumps({
            "ep": ep, "model_type": raw["model_type"], "prompts": args.prompts, "new_tokens": args.new_tokens,
            "same": same, "notes": notes, "autoep_s": max(s for _, s in got), "moerun_s": moerun_s,
            "deepspeed_version": deepspeed.__version__, "transformers_version": transformers.__version__,
            "conditions": list(CONDITIONS)}))
    dist.barrier()


if __name__ == "__main__":
    main()
