"""Broken checkpoints as users meet them: each one fails at load with one error that names
the file or the tensor and says what to do, never a raw traceback from safetensors or json."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moerun.build import build_model
from moerun.config import ModelConfig


def copy_of(hf_checkpoint, tmp_path):
    path, _ = hf_checkpoint("mixtral")
    d = tmp_path / "ck"
    shutil.copytree(path, d)
    return d


def truncate(d):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def empty(d):
    (d / "model.safetensors").write_bytes(b"")


def shard_missing(d):
    tensors = load_file(d / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    save_file({n: tensors[n] for n in names[:half]}, d / "model-00001-of-00002.safetensors")
    (d / "model.safetensors").unlink()
    index = {"weight_map": {n: "model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors"
                            for i, n in enumerate(names)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def bad_index_json(d):
    shard_missing(d)
    (d / "model.safetensors.index.json").write_text("{not json")


def bad_config_json(d):
    (d / "config.json").write_text('{"model_type": "mixtral",')


def config_wrong_type(d):
    raw = json.loads((d / "config.json").read_text())
    raw["num_hidden_layers"] = "3"
    (d / "config.json").write_text(json.dumps(raw))


def int_tensor(d):
    tensors = load_file(d / "model.safetensors")
    name = "model.norm.weight"
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def nan_tensor(d):
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors[name][0, 0] = float("nan")
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


CASES = [  # (breakage, words the error must contain)
    (truncate, ["model.safetensors", "truncated"]),
    (empty, ["model.safetensors", "not a readable safetensors file"]),
    (shard_missing, ["model-00002-of-00002.safetensors", "copy them"]),
    (bad_index_json, ["model.safetensors.index.json", "weight_map"]),
    (bad_config_json, ["config.json", "not valid JSON"]),
    (config_wrong_type, ["config.json", "num_hidden_layers = '3' must be an integer"]),
    (int_tensor, ["model.norm.weight: I32", "not floating point"]),
    (nan_tensor, ["model.layers.1.self_attn.o_proj.weight", "NaN or inf"]),
]


@pytest.mark.parametrize("breakage, words", CASES, ids=[c[0].__name__ for c in CASES])
def test_broken_checkpoint_is_named(breakage, words, hf_checkpoint, tmp_path):
    d = copy_of(hf_checkpoint, tmp_path)
    breakage(d)
    with pytest.raises(ValueError) as e:
        build_model(str(d))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_generation_config_eos_is_honoured(hf_checkpoint, tmp_path):
    d = copy_of(hf_checkpoint, tmp_path)
    assert ModelConfig.load(d).eos_token_ids == ()
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 11]}))
    assert ModelConfig.load(d).eos_token_ids == (7, 11)


def test_a_model_too_big_for_this_machine_is_refused_before_allocating(monkeypatch):
    import moerun.runtime as rt
    from moerun.options import ModelOptions

    monkeypatch.setattr(rt, "available_bytes", lambda device: 8 * 10**9)  # an 8 GB machine
    with pytest.raises(ValueError, match=r"seed-30b needs 119\.6 GB for its weights .* but 8\.0 GB is available; "
                                         r".*bfloat16 needs 59\.8 GB"):
        rt.Runtime.create(ModelOptions(model="seed-30b", device="cpu"))
