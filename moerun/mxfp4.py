"""MXFP4 weights (GPT-OSS's experts): FP4 e2m1 values in groups of 32 sharing one e8m0
exponent, dequantized at load into the run dtype.

A checkpoint stores a 3-D expert tensor ``W [E, K, N]`` (``gate_up_proj [E, H, 2F]``,
``down_proj [E, F, H]``) as two tensors over its transpose ``[E, N, K]``:

    <name>_blocks  uint8 [E, N, K/32, 16]   two FP4 codes a byte, low nibble first
    <name>_scales  uint8 [E, N, K/32]       the group's exponent + 127

    W_T[e, n, 32 g + 2 b]     = FP4[blocks[e, n, g, b] & 0xF] * 2 ** (scales[e, n, g] - 127)
    W_T[e, n, 32 g + 2 b + 1] = FP4[blocks[e, n, g, b] >> 4]  * 2 ** (scales[e, n, g] - 127)

(the layout of transformers' ``integrations/mxfp4.py``). ``dequantize`` returns ``W``;
``quantize`` writes such a pair (for tests and conversions).

Shape legend: E = experts, N = output rows, K = reduction, G = K / 32 groups.
"""
from __future__ import annotations

import torch

GROUP = 32
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


class MXFP4Error(ValueError):
    pass


def check(name: str, blocks_shape, scales_shape, want_EKN) -> str | None:
    """What is wrong with a blocks / scales pair meant to hold ``want_EKN`` (None = fine)."""
    E, K, N = want_EKN
    if K % GROUP:
        return f"{name}: reduction dim {K} is not a multiple of {GROUP}, so it cannot be MXFP4"
    want_b, want_s = (E, N, K // GROUP, GROUP // 2), (E, N, K // GROUP)
    if tuple(blocks_shape) != want_b or tuple(scales_shape) != want_s:
        return (f"{name}: MXFP4 blocks / scales must be {list(want_b)} / {list(want_s)} for a "
                f"{list(want_EKN)} tensor; found {list(blocks_shape)} / {list(scales_shape)}")
    return None


def dequantize(blocks_ENGB: torch.Tensor, scales_ENG: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``W [E, K, N]`` in ``dtype`` from its blocks [E, N, G, 16] and scales [E, N, G] (uint8)."""
    if blocks_ENGB.dtype != torch.uint8 or scales_ENG.dtype != torch.uint8:
        raise MXFP4Error(f"MXFP4 blocks and scales must be uint8; got {blocks_ENGB.dtype}, {scales_ENG.dtype}")
    lut = torch.tensor(FP4_E2M1, dtype=torch.float32, device=blocks_ENGB.device)
    codes = torch.stack((blocks_ENGB & 0x0F, blocks_ENGB >> 4), dim=-1).flatten(-2).long()  # [E, N, G, 32]
    vals = torch.ldexp(lut[codes], (scales_ENG.to(torch.int32) - 127)[..., None])
    return vals.flatten(-2).transpose(1, 2).to(dtype)  # [E, N, K] -> [E, K, N]


def quantize(w_EKN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of ``W [E, K, N]``: per group of 32 along K the exponent that puts the
    group's largest magnitude in [4, 8) (FP4's largest value is 6: larger values clamp),
    every value rounded to the nearest FP4 code."""
    w = w_EKN.float().transpose(1, 2)  # [E, N, K]
    E, N, K = w.shape
    if K % GROUP:
        raise MXFP4Error(f"reduction dim {K} is not a multiple of {GROUP}")
    g = w.reshape(E, N, K // GROUP, GROUP)
    amax = g.abs().amax(-1).clamp(min=2.0 ** -126)
    exp = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)
    scaled = g / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_E2M1[:8])
    mag = (scaled.abs()[..., None] - lut).abs().argmin(-1)  # nearest magnitude code 0..7
    codes = (mag + 8 * (scaled < 0)).to(torch.uint8)  # [E, N, G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exp + 127).to(torch.uint8).contiguous()
