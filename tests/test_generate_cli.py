"""``moerun generate`` as a user runs it: a subprocess, JSON on stdout, logs on stderr."""
from __future__ import annotations

import json
import subprocess
import sys

import torch


def run_generate(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "moerun.generate", *args], capture_output=True, text=True,
                       timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_checkpoint_greedy_json_matches_transformers(hf_checkpoint):
    path, hf = hf_checkpoint("qwen2_moe")
    ids = [7, 3, 99, 42, 5]
    out = json.loads(run_generate("--model", str(path), "--prompt-ids", ",".join(map(str, ids)),
                                  "--max-new-tokens", "12", "--temperature", "0", "--json").stdout)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 5, dtype=torch.long), do_sample=False,
                          max_new_tokens=12, pad_token_id=0)[0, 5:].tolist()
    assert out["prompt_ids"] == ids and out["output_ids"] == ref and out["text"] is None


def test_default_preset_text_and_several_prompts():
    p = run_generate("--prompt", "Hi", "--prompt", "MoE", "--max-new-tokens", "4", "--ignore-eos", "--json")
    res = json.loads(p.stdout)
    assert [r["prompt_ids"] for r in res] == [[256, 72, 105], [256, 77, 111, 69]]
    assert all(len(r["output_ids"]) == 4 and isinstance(r["text"], str) for r in res)
    assert "tokens/s" in p.stderr


def test_sampling_is_reproducible_with_a_seed(hf_checkpoint):
    path, _ = hf_checkpoint("olmoe")
    args = ("--model", str(path), "--prompt-ids", "1,2,3", "--temperature", "1.0", "--top-p", "0.9",
            "--max-new-tokens", "10", "--json")
    a = json.loads(run_generate(*args, "--seed", "11").stdout)["output_ids"]
    b = json.loads(run_generate(*args, "--seed", "11").stdout)["output_ids"]
    assert a == b and len(a) == 10


def test_tokenizer_json_is_used(hf_checkpoint, tmp_path):
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    path, _ = hf_checkpoint("mixtral")
    d = tmp_path / "ck"
    shutil.copytree(path, d)
    vocab = {w: i for i, w in enumerate(["<unk>", "hello", "world", "moe"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))
    out = json.loads(run_generate("--model", str(d), "--prompt", "hello moe world", "--max-new-tokens", "3",
                                  "--json").stdout)
    assert out["prompt_ids"] == [1, 3, 2] and isinstance(out["text"], str)


def test_bad_requests_fail_clearly(hf_checkpoint):
    path, _ = hf_checkpoint("mixtral")
    p = run_generate("--model", str(path), "--prompt-ids", "1,2,500", check=False)
    assert p.returncode == 2 and "outside the vocabulary (0..159)" in p.stderr
    p = run_generate("--model", str(path), "--prompt", "text", check=False)
    assert p.returncode == 2 and "pass --prompt-ids" in p.stderr
    p = run_generate("--prompt-ids", "1,x", check=False)
    assert p.returncode == 2 and "comma-separated integers" in p.stderr
