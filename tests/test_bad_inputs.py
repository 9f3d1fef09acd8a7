"""Bad input to ``moerun generate``, as a user types it: each case exits 2 with one line
that names the input and the fix, before the model loads where it can, and the same on
every rank under torchrun."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from moerun.generate import main as generate_main

from test_layouts import free_port


@pytest.fixture(scope="module")
def ckpt(hf_checkpoint):
    return str(hf_checkpoint("mixtral")[0])


def prompts_file(tmp_path, *records) -> str:
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(f)


CASES = [  # (id, args builder(tmp_path, ckpt), words the one error line must contain)
    ("max_new_tokens 0", lambda t, c: ["--prompts-file", prompts_file(t, {"prompt_ids": [1], "max_new_tokens": 0})],
     "max_new_tokens must be an integer >= 1, got 0"),
    ("max_new_tokens string", lambda t, c: ["--prompts-file", prompts_file(t, {"prompt_ids": [1], "max_new_tokens": "5"})],
     'max_new_tokens must be an integer >= 1, got "5"'),
    ("prompt_ids string", lambda t, c: ["--prompts-file", prompts_file(t, {"prompt_ids": "1,2"})],
     "prompt_ids must be a list of integer token ids"),
    ("prompt_ids floats", lambda t, c: ["--prompts-file", prompts_file(t, {"prompt_ids": [1.0, 2.0]})],
     "prompt_ids must be a list of integer token ids"),
    ("unknown key", lambda t, c: ["--prompts-file", prompts_file(t, {"prompt_ids": [1], "temp": 1})],
     "unknown key(s) temp"),
    ("not json", lambda t, c: ["--prompts-file", prompts_file(t, "{oops")], "p.jsonl:1: not JSON"),
    ("tp 0", lambda t, c: ["--tp", "0"], "tp = 0 must be a positive integer"),
    ("tp -1", lambda t, c: ["--tp", "-1"], "tp = -1 must be a positive integer"),
    ("ep 0", lambda t, c: ["--ep", "0"], "ep = 0 must be a positive integer"),
    ("ep 2 alone", lambda t, c: ["--ep", "2"], "ep (2) must divide a stage's dp*tp = 1*1 = 1 ranks"),
    ("pp 2 alone", lambda t, c: ["--pp", "2"], "needs 2 processes; launch with torchrun --nproc_per_node=2"),
    ("timeout 0", lambda t, c: ["--timeout", "0"], "--timeout must be > 0 seconds"),
    ("device meta", lambda t, c: ["--device", "meta"], "moerun runs on cpu or cuda"),
    ("temperature nan", lambda t, c: ["--temperature", "nan"], "temperature must be a finite number"),
    ("top_p 0", lambda t, c: ["--top-p", "0"], "top_p must be in (0, 1]"),
    ("past max_position_embeddings", lambda t, c: ["--model", c, "--prompt-ids", "1,2", "--max-new-tokens", "600"],
     "beyond the model's max_position_embeddings (512)"),
    ("stop without tokenizer", lambda t, c: ["--model", c, "--prompt-ids", "1,2", "--stop", "x"],
     "--stop needs a tokenizer"),
    ("id outside vocab", lambda t, c: ["--model", c, "--prompt-ids", "1,999"], "outside the vocabulary (0..159)"),
]
if not torch.cuda.is_available():
    CASES.append(("cuda without gpu", lambda t, c: ["--device", "cuda"], "no CUDA GPU is visible"))


@pytest.mark.parametrize("name, build, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(name, build, words, ckpt, tmp_path, capsys):
    args = build(tmp_path, ckpt)
    if "--model" not in args:
        args = ["--model", ckpt, *([] if "--prompts-file" in args else ["--prompt-ids", "1,2"]), *args]
    assert generate_main([*args, "--max-new-tokens", "2"] if "--max-new-tokens" not in args else args) == 2
    err = capsys.readouterr().err
    assert err.startswith("moerun generate: error: ") and words in err, err


def test_corrupt_tokenizer_warns_with_ids_and_fails_with_text(ckpt, tmp_path, capsys, caplog):
    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    (d / "tokenizer.json").write_text("{ this is not a tokenizer")
    assert generate_main(["--model", str(d), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--json"]) == 0
    assert "tokenizer.json cannot be read" in caplog.text and json.loads(capsys.readouterr().out)["text"] is None
    assert generate_main(["--model", str(d), "--prompt", "hello"]) == 2
    assert "tokenizer.json cannot be read" in capsys.readouterr().err


def test_stop_strings_cut_the_text(ckpt, tmp_path, capsys):
    """A word-level tokenizer: the output is cut before the first stop text, which is left out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    d = tmp_path / "ck"
    shutil.copytree(ckpt, d)
    tok = Tokenizer(models.WordLevel({"<unk>": 0, **{f"w{i}": i for i in range(1, 160)}}, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Whitespace(), decoders.WordPiece(prefix="##")
    tok.save(str(d / "tokenizer.json"))
    base = ["--model", str(d), "--prompt", "w5 w6 w7", "--max-new-tokens", "12", "--json"]
    assert generate_main(base) == 0
    full = json.loads(capsys.readouterr().out)
    stop = f" w{full['output_ids'][4]}"  # the fifth word, as it appears in the text
    assert generate_main([*base, "--stop", stop]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["text"] == full["text"][: full["text"].index(stop)] and stop not in cut["text"]
    assert len(cut["output_ids"]) <= 5 and full["output_ids"][: len(cut["output_ids"])] == cut["output_ids"]


def test_sampling_is_random_per_request_unless_seeded(ckpt, capsys):
    args = ["--model", ckpt, "--prompt-ids", "1,2,3", "--temperature", "1.0", "--max-new-tokens", "12", "--json"]
    runs = []
    for extra in ([], [], ["--seed", "5"], ["--seed", "5"]):
        assert generate_main([*args, *extra]) == 0
        runs.append(json.loads(capsys.readouterr().out)["output_ids"])
    assert runs[0] != runs[1] and runs[2] == runs[3]


def test_a_bad_value_under_torchrun_fails_alike_on_every_rank(ckpt):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", "-m", "moerun.generate", "--model", ckpt, "--pp", "2",
                        "--prompt-ids", "1,2", "--temperature", "nan"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert p.stderr.count("temperature must be a finite number") == 1  # rank 0 says it, once
    assert "Connection closed" not in p.stderr and "failed:" not in p.stderr


def test_non_finite_logits_are_an_error_not_token_0(ckpt):
    from moerun.build import build_model
    from moerun.engine import Engine
    from moerun.options import SamplingParams

    model = build_model(ckpt)
    model.lm_head.weight.data[3, 0] = float("nan")  # one NaN row of logits
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        Engine(model).generate([[1, 2, 3]], SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("args, words", [
    (["--model", "seed-30b", "--hardware", "seed", "--gpus", "0"], "--gpus 0 must be >= 1"),
    (["--model", "seed-30b", "--hardware", "seed", "--gpus", "-4"], "--gpus -4 must be >= 1"),
    (["--model", "seed-30b", "--hardware", "seed", "--gpus", "16", "--search", "--top", "-2"], "--top -2 must be >= 1"),
    (["--claims", "seed", "--measured", "/nonexistent/m.json"], "cannot read it"),
])
def test_plan_flags_are_checked(args, words, capsys):
    from moerun.plan.cli import main as plan_main

    assert plan_main(args) == 2
    assert words in capsys.readouterr().err
