"""Triton kernels for the MoE hot path, each with a plain-PyTorch reference beside it.

Importable without the rest of moerun (torch only; triton when installed):

    from moerun.kernels import topk_softmax, moe_align, fused_moe, dispatch, combine
    from moerun.kernels import paged_attention
    weights_TK, ids_TK = topk_softmax(router_logits_TE, k=2, renormalize=True)
    out_TH = fused_moe(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK)

Every kernel takes ``impl=None | "auto" | "triton" | "torch"``; None follows
``set_default_impl`` (initially "auto": Triton on CUDA tensors, else the reference). To run
the Triton kernels on CPU, set ``TRITON_INTERPRET=1`` before triton is first imported and
pass ``impl="triton"``.

Files: router.py (route: every family's router; topk_softmax), align.py (moe_align), fused_moe.py (fused_moe and the
per-expert loop baseline), dispatch.py (dispatch / combine around the EP all-to-all),
moe_config.py (tuned tiles in configs/), attention.py (paged_attention over the KV cache's
block tables), _common.py (triton guard, impl choice), cpu_ext.py (the optional C kernels of
the CPU path in csrc/moe_cpu.c: experts, paged attention, RoPE, add + RMSNorm).
"""
from . import cpu_ext
from ._common import HAS_TRITON, INTERPRETED, get_default_impl, set_default_impl, uses_triton
from .align import moe_align, reference_moe_align
from .attention import paged_attention, reference_paged_attention
from .dispatch import (DispatchMeta, combine, contiguous_expert_ranks, dispatch,
                       reference_combine, reference_dispatch)
from .fused_moe import ACTIVATIONS, ExpertAct, fused_moe, reference_fused_moe, reference_moe_loop
from .moe_config import MoeTileConfig
from .router import SCORINGS, reference_route, reference_topk_softmax, route, topk_softmax

__all__ = [
    "ACTIVATIONS", "HAS_TRITON", "cpu_ext", "INTERPRETED", "DispatchMeta", "ExpertAct", "MoeTileConfig",
    "combine", "contiguous_expert_ranks", "dispatch", "fused_moe", "get_default_impl",
    "moe_align", "paged_attention", "route", "set_default_impl", "topk_softmax", "uses_triton", "SCORINGS",
    "reference_combine", "reference_dispatch", "reference_fused_moe", "reference_moe_align",
    "reference_moe_loop", "reference_paged_attention", "reference_route", "reference_topk_softmax",
]
