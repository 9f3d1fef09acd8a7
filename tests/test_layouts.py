"""Real multi-process runs on gloo: every layout computes what one process computes.

Each case launches torchrun on this machine's CPU. Covered: world sizes 2, 4 and 8;
TP, PP, EP and DP each > 1 somewhere; ep < dp*tp (replicated experts); tp > KV heads;
uneven pipeline stages; more DP replicas than prompts; the tiny preset and HF
checkpoints of several families (one FP8 block-quantized, read slice by slice).
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moerun.build import build_model
from moerun.engine import Engine, EngineConfig
from moerun.options import SamplingParams

WORKER = Path(__file__).with_name("dist_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args, env=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def random_prompts(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def one_process_logprobs(model, prompts, n_new=8, top=5):
    """i -> [(token, logprob, [[id, logprob] * top])] from one process's engine."""
    engine = Engine(model, EngineConfig(num_blocks=64))
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n_new, ignore_eos=True, logprobs=top))
           for p in prompts]
    got = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for ev in engine.step():
            got[ev.req_id].append((ev.token, ev.logprob, [list(t) for t in ev.top_logprobs]))
    return [got[rid] for rid in ids]


def assert_same_top(top, wtop, tol, where):
    """The top-n (id, logprob) lists agree: logprobs rank by rank within tol, and ids equal
    except where candidates tie within tol (float32 sums in another order may swap them):
    an id out of place sits at a rank of the other list with a logprob within tol of its
    own, or at the last rank, where the other list's next candidate is not shown."""
    assert len(top) == len(wtop), f"{where}: {len(top)} vs {len(wtop)} top logprobs"
    assert max(abs(a - b) for (_, a), (_, b) in zip(top, wtop)) <= tol, f"{where}: top logprobs differ"
    wlp = {t: lp for t, lp in wtop}
    for rank, ((t, lp), (wt, _)) in enumerate(zip(top, wtop)):
        if t != wt:
            tie = abs(wlp[t] - lp) <= tol if t in wlp else rank == len(top) - 1
            assert tie, f"{where}: top ids differ at rank {rank} ({[t for t, _ in top]} vs {[t for t, _ in wtop]})"


CASES = [  # (model, tp, pp, ep, dp, prompts)
    pytest.param("tiny", 2, 1, 2, 1, 3, id="w2-tiny-tp2-ep2"),
    pytest.param("mixtral", 1, 2, 1, 1, 2, id="w2-mixtral-pp2-uneven"),
    pytest.param("olmoe", 4, 1, 2, 1, 3, id="w4-olmoe-tp4>kv-ep2<tp"),
    pytest.param("qwen2_moe", 1, 1, 4, 4, 2, id="w4-qwen2-dp4>prompts-ep4"),
    pytest.param("tiny", 2, 2, 4, 2, 5, id="w8-tiny-tp2-pp2-ep4-dp2"),
    pytest.param("qwen3_moe", 2, 2, 2, 2, 3, id="w8-qwen3-replicated-experts"),
    pytest.param("olmoe", 1, 3, 1, 1, 2, id="w3-olmoe-pp3"),
    # sigmoid-routed families (groups, correction bias, partial rotary, dense first layers)
    pytest.param("glm4_moe-fp8", 2, 1, 2, 1, 3, id="w2-glm4-fp8-blocks-mtp-tp2-ep2"),
    pytest.param("dots1", 2, 1, 2, 1, 3, id="w2-dots1-sliding-tp2-ep2"),
    pytest.param("minimax_m2", 2, 1, 2, 1, 3, id="w2-minimax-full-qknorm-tp2-ep2"),
    # sinks, yarn, fused biased experts stored as MXFP4, dequantized rank by rank
    pytest.param("gpt_oss_mxfp4", 2, 1, 2, 1, 3, id="w2-gpt_oss-mxfp4-tp2-ep2"),
]


@pytest.mark.parametrize("model, tp, pp, ep, dp, n_prompts", CASES)
def test_layout_equals_one_process(model, tp, pp, ep, dp, n_prompts, hf_checkpoint, tmp_path, request):
    """Every sampled token, its log probability and the top 5 of every step (prefill and
    decode) equal one process's."""
    if model == "gpt_oss_mxfp4":
        model = str(request.getfixturevalue("gpt_oss_mxfp4")[0])
    elif model != "tiny":
        model = str(hf_checkpoint(model)[0])
    ref = build_model(model)
    seed = 1000 + tp * 100 + pp * 10 + ep + dp
    prompts = random_prompts(n_prompts, ref.cfg.vocab_size, seed)
    out = tmp_path / "out.json"
    spec = {"prompts": prompts, "sampling": {"logprobs": 5}}
    p = torchrun(tp * pp * dp, WORKER, model, tp, pp, ep, dp, json.dumps(spec), out)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(out.read_text())
    for i, want in enumerate(one_process_logprobs(ref, prompts)):
        assert got["outputs"][str(i)] == [t for t, _, _ in want], f"prompt {i} (seed {seed})"
        for step, ((lp, top), (_, wlp, wtop)) in enumerate(zip(got["logprobs"][str(i)], want)):
            assert abs(lp - wlp) <= 1e-4, f"prompt {i} step {step}: logprob {lp} vs {wlp}"
            assert_same_top(top, wtop, 1e-4, f"prompt {i} step {step}")


def test_generate_cli_under_torchrun_matches_one_process(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("mixtral")
    lines = [{"prompt_ids": [3, 1, 4, 1, 5], "max_new_tokens": 6}, {"prompt_ids": [9, 2, 6], "max_new_tokens": 3},
             {"prompt_ids": [5, 3, 5, 8, 9, 7], "max_new_tokens": 5}]
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    args = ["--model", str(path), "--prompts-file", f, "--json", "--ignore-eos"]
    p = torchrun(4, "-m", "moerun.generate", "--tp", 2, "--pp", 1, "--ep", 4, "--dp", 2, *args)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    single = subprocess.run([sys.executable, "-m", "moerun.generate", *map(str, args)], capture_output=True,
                            text=True, timeout=120)
    assert got == json.loads(single.stdout) and [len(r["output_ids"]) for r in got] == [6, 3, 5]


def test_invalid_layout_fails_fast_on_every_rank():
    p = torchrun(4, "-m", "moerun.generate", "--tp", 4, "--pp", 1, "--ep", 3, "--dp", 1, "--max-new-tokens", 2,
                 timeout=120)
    assert p.returncode != 0
    assert "ep (3) must divide a stage's dp*tp = 1*4 = 4 ranks" in p.stderr
    assert "experts: num_experts (64) must be divisible by ep (3)" in p.stderr
    assert "valid layouts for this model and world size: TP4 EP" in p.stderr


def test_killed_rank_makes_the_others_exit(hf_checkpoint):
    """Launched without torchrun's agent, so only moerun's own handling stops the peers."""
    import os
    import time

    path, _ = hf_checkpoint("mixtral")
    port, world = free_port(), 4
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MOERUN_TEST_KILL": "3:4"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "moerun.generate", "--model", str(path), "--tp", "2", "--pp", "2",
             "--prompt-ids", "1,2,3", "--max-new-tokens", "20", "--ignore-eos", "--timeout", "30"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0 = time.time()
    codes = [p.wait(timeout=150) for p in procs]
    assert codes[3] == 3, codes
    assert all(c != 0 for c in codes), codes
    assert time.time() - t0 < 120
    errs = [p.stderr.read() for p in procs[:3]]
    assert all("failed" in e for e in errs), errs
