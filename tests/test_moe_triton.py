"""The model with its MoE layers on the Triton kernels (interpreter on CPU) equals the
model on the PyTorch references, and both equal transformers."""
from __future__ import annotations

import pytest
import torch

from moerun import kernels
from moerun.build import build_model, forward_logits

# The model here lives on the CPU, so its Triton kernels can only run under the
# interpreter; on a GPU machine (no TRITON_INTERPRET) the GPU kernel tests cover them.
pytestmark = pytest.mark.skipif(not (kernels.HAS_TRITON and kernels.INTERPRETED),
                                reason="needs triton with TRITON_INTERPRET=1 (the model is on the CPU)")


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_model_on_triton_kernels_equals_reference(family, hf_checkpoint):
    path, hf = hf_checkpoint(family)
    model = build_model(str(path))
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (5, 1, 3)]
    try:
        kernels.set_default_impl("torch")
        ref = forward_logits(model, prompts)
        kernels.set_default_impl("triton")
        got = forward_logits(model, prompts)
    finally:
        kernels.set_default_impl("auto")
    with torch.no_grad():
        want = [hf(torch.tensor([p])).logits[0] for p in prompts]
    for g, r, w in zip(got, ref, want):
        assert (g - r).abs().max() <= 1e-4 and (g - w).abs().max() <= 1e-4
