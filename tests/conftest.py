"""Shared fixtures: tiny random Hugging Face checkpoints of each MoE family, built with
transformers and saved with save_pretrained, so moerun is always checked against the
reference implementation on the same weights.

``hf_checkpoint("glm4_moe")`` also holds a multi-token-prediction layer past the last one
(as GLM-4.5's files do); ``hf_checkpoint("glm4_moe-fp8")`` is that checkpoint with its
linear weights stored as FP8 e4m3 with 128 x 128 block scales, and its transformers model
holds the dequantized weights."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where kernels/ (installed as
# moerun.kernels) would stand in for the `kernels` package that transformers (5.25 on) imports.
# The tests reach the kernels as moerun.kernels, as an installed moerun does: the root goes.
_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]

# The Triton interpreter must be chosen before triton is first imported.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fixed_seed(request):
    """Every test draws from torch's global RNG seeded by its own name: a failure
    reproduces by running the same test again (the seed is in the report)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    request.node.user_properties.append(("torch_seed", seed))
    return seed

@pytest.fixture
def seed():
    """The kernel tests' fresh seed per run (reported in their failure messages), with kernel
    outputs poisoned: buffers start as NaN (or -7777 for ints), so rows a kernel never writes
    show up."""
    from moerun.kernels import _common
    s = random.randrange(2**31)
    torch.manual_seed(s)
    _common.set_debug_poison(True)
    yield s
    _common.set_debug_poison(False)


COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=160, max_position_embeddings=512)

# Each family with the options that make it differ from the others.
FAMILIES = {
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, intermediate_size=48, clip_qkv=8.0,
                  norm_topk_prob=False, rope_theta=5000.0),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, sliding_window=6),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, intermediate_size=80,
                      shared_expert_intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=False,
                      qkv_bias=True, tie_word_embeddings=True),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=80,
                      head_dim=24, norm_topk_prob=True, attention_bias=True, decoder_sparse_step=1),
    # DeepSeek-V3's router: sigmoid scores + correction bias; groups, no renormalisation,
    # scaling, partial rotary, a dense first layer, an ungated shared expert
    "glm4_moe": dict(n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, moe_intermediate_size=32,
                     intermediate_size=80, n_group=4, topk_group=2, first_k_dense_replace=1, norm_topk_prob=False,
                     routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True, head_dim=32,
                     partial_rotary_factor=0.5, num_nextn_predict_layers=1),
    "dots1": dict(n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=32,
                  intermediate_size=80, n_group=2, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                  routed_scaling_factor=1.5, attention_bias=True, sliding_window=6, max_window_layers=1),
    "minimax_m2": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, head_dim=16, rotary_dim=8,
                       bos_token_id=1),
    # yarn RoPE (a factor and an attention factor that matter at these lengths), sinks with
    # sliding windows on alternate layers, a SwiGLU limit low enough to clamp, ids in the vocab
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16,
                    sliding_window=4, swiglu_limit=1.5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}),
}


def make_hf_model(family: str, seed: int = 0, **overrides):
    import transformers

    cls = {"olmoe": transformers.OlmoeConfig, "mixtral": transformers.MixtralConfig,
           "qwen2_moe": transformers.Qwen2MoeConfig, "qwen3_moe": transformers.Qwen3MoeConfig,
           "glm4_moe": transformers.Glm4MoeConfig, "dots1": transformers.Dots1Config,
           "minimax_m2": transformers.MiniMaxM2Config, "gpt_oss": transformers.GptOssConfig}[family]
    kw = {**COMMON, **FAMILIES[family], **overrides}
    kw.setdefault("eos_token_id", None)
    cfg = cls(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 default: peaked logits, no greedy near-ties
        for name, p in model.named_parameters():
            if p.dim() > 1 or "bias" in name:
                p.normal_(0, 0.15)
            else:
                p.normal_(1.0, 0.2)
        for name, b in model.named_buffers():  # a buffer, loaded from the checkpoint
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return model


def add_mtp_layer(path, num_layers: int) -> None:
    """Append a multi-token-prediction layer (index ``num_layers``) to a saved checkpoint:
    a copy of the last layer's tensors plus GLM-4.5's MTP-only ones."""
    from safetensors.torch import load_file, save_file

    fn = path / "model.safetensors"
    t = load_file(fn)
    last = f"model.layers.{num_layers - 1}."
    extra = {k.replace(last, f"model.layers.{num_layers}."): v.clone() for k, v in t.items() if k.startswith(last)}
    H = t["model.embed_tokens.weight"].shape[1]
    for n, shape in (("eh_proj.weight", (H, 2 * H)), ("enorm.weight", (H,)), ("hnorm.weight", (H,)),
                     ("shared_head.norm.weight", (H,))):
        extra[f"model.layers.{num_layers}.{n}"] = torch.randn(shape)
    save_file({**t, **extra}, fn, metadata={"format": "pt"})


FP8_BLOCK = 128


def fp8_block_quantize(w_RC: torch.Tensor):
    """(float8_e4m3fn weight, float32 scale_inv [ceil(R/128), ceil(C/128)], dequantized):
    each 128 x 128 block scaled so its largest magnitude is e4m3's 448."""
    R, C = w_RC.shape
    nr, nc = -(-R // FP8_BLOCK), -(-C // FP8_BLOCK)
    pad = torch.zeros(nr * FP8_BLOCK, nc * FP8_BLOCK)
    pad[:R, :C] = w_RC.float()
    blocks = pad.view(nr, FP8_BLOCK, nc, FP8_BLOCK)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)  # [nr, nc]
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = (q.float() * scale[:, None, :, None]).view(nr * FP8_BLOCK, nc * FP8_BLOCK)[:R, :C]
    return q.view(nr * FP8_BLOCK, nc * FP8_BLOCK)[:R, :C].contiguous(), scale.float(), deq.contiguous()


def _is_quantized(name: str, t: torch.Tensor) -> bool:
    """The linear weights FP8 checkpoints store quantized (not embeddings, norms or the router)."""
    return (t.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name and "norm" not in name
            and not name.endswith("mlp.gate.weight"))


def write_fp8_copy(src, dst):
    """Copy checkpoint ``src`` to ``dst`` with its linear weights as FP8 + block scales.
    Returns transformers' model of the dequantized weights (what moerun must compute),
    loaded by from_pretrained from a dequantized copy beside ``dst``."""
    import json
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    out, deq = {}, {}
    for name, w in t.items():
        if _is_quantized(name, w):
            out[name], out[name + "_scale_inv"], deq[name] = fp8_block_quantize(w)
        else:
            out[name] = deq[name] = w
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    ref = dst.with_name(dst.name + "-dequantized")
    shutil.copytree(src, ref)
    save_file(deq, ref / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (dst / "config.json").write_text(json.dumps(cfg))
    return transformers.AutoModelForCausalLM.from_pretrained(ref).eval()


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """family -> (directory, transformers model) built once per session."""
    made = {}

    def get(family: str):
        if family not in made and family.endswith("-fp8"):
            base = family.removesuffix("-fp8")
            d = tmp_path_factory.mktemp(f"hf_{family}") / "ckpt"
            made[family] = (d, write_fp8_copy(get(base)[0], d))
        elif family not in made:
            d = tmp_path_factory.mktemp(f"hf_{family}")
            model = make_hf_model(family)
            model.save_pretrained(d)
            if family == "glm4_moe":  # GLM-4.5's files hold its MTP layer past num_hidden_layers
                add_mtp_layer(d, model.config.num_hidden_layers)
            made[family] = (d, model)
        return made[family]
    return get


def edited_copy(src, dst, edit):
    """A copy of the checkpoint at ``src`` in ``dst`` whose tensors ``edit(tensors)`` changed
    in place (a tensor dropped, added or reshaped): for tests of a broken checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def hf_dequantize(blocks, scales, dtype=torch.float32):
    """transformers' own MXFP4 dequantization (the reference moerun's is checked against)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


def quantized_copy(src, dst):
    """The checkpoint at ``src`` with every fused expert tensor as MXFP4, the way GPT-OSS
    ships: ``<name>_blocks`` / ``<name>_scales`` and a quantization_config in config.json.
    Returns the expert tensors as transformers dequantizes them."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from moerun import mxfp4

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    dequantized = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = mxfp4.quantize(tensors.pop(name))
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        dequantized[name] = hf_dequantize(blocks, scales)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((dst / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(raw))
    return dequantized


@pytest.fixture(scope="session")
def gpt_oss_mxfp4(tmp_path_factory):
    """(directory of a GPT-OSS checkpoint with MXFP4 experts, transformers model holding the
    dequantized experts), built once per session."""
    src = tmp_path_factory.mktemp("gpt_oss_unquantized")
    hf = make_hf_model("gpt_oss", seed=5)
    hf.save_pretrained(src)
    dst = tmp_path_factory.mktemp("gpt_oss_mxfp4") / "ckpt"
    dequantized = quantized_copy(src, dst)
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, t in dequantized.items():
            assert not torch.equal(params[name], t)  # quantizing changed the weights
            params[name].copy_(t)
    return dst, hf
