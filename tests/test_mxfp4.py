"""MXFP4 experts (GPT-OSS): the dequantization equals transformers', and a checkpoint written
in that format (blocks + scales, quantization_config) runs like transformers on the same
dequantized weights, with each EP rank reading and dequantizing only its experts."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moerun import mxfp4
from moerun.build import build_model, forward_logits
from moerun.comm import Comm
from moerun.engine import Engine
from moerun.model import MoEModel
from moerun.options import SamplingParams
from moerun.parallel import ParallelConfig
from moerun.weights import CheckpointError, load_checkpoint

from conftest import hf_dequantize


@pytest.fixture
def mxfp4_checkpoint(gpt_oss_mxfp4):
    return gpt_oss_mxfp4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_transformers(dtype):
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8)
    scales = torch.randint(118, 136, (3, 5, 2), dtype=torch.uint8)
    got = mxfp4.dequantize(blocks, scales, dtype)
    want = hf_dequantize(blocks, scales, dtype)
    assert got.shape == (3, 64, 5) and got.dtype == dtype
    assert torch.equal(got, want)


def test_quantize_is_nearest_and_stable():
    w = torch.randn(2, 64, 6) * torch.logspace(-3, 1, 6)  # [E, K, N], columns of very different scales
    blocks, scales = mxfp4.quantize(w)
    dq = mxfp4.dequantize(blocks, scales)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1).transpose(1, 2)  # [E, K, N]
    # each value is the nearest point of its group's grid FP4 * 2**e, and e puts the group's
    # largest magnitude in [4, 8) grid units (above 6 it clamps to 6)
    grid = torch.tensor(mxfp4.FP4_E2M1)
    nearest = ((w[..., None] - grid * step[..., None]).abs()).amin(-1)
    assert torch.allclose((dq - w).abs(), nearest, rtol=0, atol=1e-12)
    amax_units = (w.abs() / step).view(2, 2, 32, 6).amax(2)
    assert ((amax_units >= 4) & (amax_units < 8)).all()
    again = mxfp4.dequantize(*mxfp4.quantize(dq))
    assert torch.equal(again, dq)  # representable values are kept exactly


def test_mxfp4_checkpoint_matches_transformers(mxfp4_checkpoint):
    path, hf = mxfp4_checkpoint
    model = build_model(str(path))
    gen = torch.Generator().manual_seed(torch.seed())
    prompts = [torch.randint(0, 160, (n,), generator=gen).tolist() for n in (3, 11)]
    with torch.no_grad():
        for p, ours in zip(prompts, forward_logits(model, prompts)):
            assert (ours - hf(torch.tensor([p])).logits[0]).abs().max().item() <= 1e-4, p
    for p, out in zip(prompts, Engine(model).generate(prompts, SamplingParams(max_new_tokens=8))):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              do_sample=False, max_new_tokens=8, pad_token_id=0)[0, len(p):]
        assert out == ref.tolist(), p


def test_transformers_reads_the_written_file_alike(mxfp4_checkpoint):
    """The test's MXFP4 file is one transformers itself reads (dequantizing on the CPU)."""
    import transformers

    path, _ = mxfp4_checkpoint
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32).eval()
    ids = torch.randint(0, 160, (9,)).tolist()
    with torch.no_grad():
        ref = theirs(torch.tensor([ids])).logits[0]
    assert (forward_logits(build_model(str(path)), [ids])[0] - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("quantized", [True, False], ids=["mxfp4", "fused"])
@pytest.mark.parametrize("layout", [(2, 1, 2, 1), (1, 1, 4, 4)])
def test_each_ep_rank_reads_only_its_experts(layout, quantized, mxfp4_checkpoint, hf_checkpoint):
    """Every rank's shard (built in this process: loading needs no collectives) equals the
    matching slice of the one-process model, and reads fewer bytes than the whole file: the
    fused tensors sliced by expert rows and de-interleaved, MXFP4 ones dequantized likewise."""
    path = mxfp4_checkpoint[0] if quantized else hf_checkpoint("gpt_oss")[0]
    whole = build_model(str(path))
    tp, pp, ep, dp = layout
    par = ParallelConfig(tp=tp, pp=pp, ep=ep, dp=dp)
    cfg = whole.cfg
    for rank in range(par.world_size):
        comm = Comm(par, rank)
        model = MoEModel(cfg, comm, range(cfg.num_layers))
        read = load_checkpoint(model, path).bytes_read
        assert read < whole.load_report.bytes_read
        for full, part in zip(whole.layers, model.layers):
            mine = slice(part.mlp.expert_start, part.mlp.expert_start + part.mlp.num_local)
            assert part.mlp.num_local == cfg.num_experts // ep
            for name in ("w13", "w2", "w13_bias", "w2_bias"):
                assert torch.equal(getattr(part.mlp, name), getattr(full.mlp, name)[mine]), (rank, name)
            heads = part.self_attn.heads
            assert torch.equal(part.self_attn.sinks, full.self_attn.sinks[heads.start:heads.stop])


def test_bad_mxfp4_tensor_is_named(mxfp4_checkpoint, tmp_path):
    path, _ = mxfp4_checkpoint
    shutil.copytree(path, tmp_path / "ck")
    tensors = load_file(tmp_path / "ck" / "model.safetensors")
    name = "model.layers.1.mlp.experts.down_proj"
    tensors[f"{name}_scales"] = tensors[f"{name}_scales"][:, :, :0].contiguous()
    save_file(tensors, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.down_proj: MXFP4 blocks / scales must be "
                                              r"\[8, 64, 1, 16\] / \[8, 64, 1\]"):
        build_model(str(tmp_path / "ck"))
