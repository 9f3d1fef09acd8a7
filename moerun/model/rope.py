"""Rotary embedding frequencies: the inverse frequencies of each RoPE scaling type and the
attention factor that multiplies cos and sin, as pure functions of the config's numbers.

    inv_freq_R, factor = rope_parameters(cfg)          # cfg: a ModelConfig
    cos_TD, sin_TD = rope_cos_sin(pos_T, inv_freq_R, dtype, factor)   # moerun.model.layers

Types (Hugging Face ``rope_type``), all over ``dim`` rotary dims with base ``theta``:
- ``default``: inv_freq[i] = theta ** (-2i / dim).
- ``linear``: default / factor (positions interpolated by ``factor``).
- ``llama3``: long wavelengths (> original / low_freq_factor) divided by ``factor``, short
  ones (< original / high_freq_factor) kept, a smooth blend between.
- ``yarn``: per dim a blend of the interpolated (/ factor) and the original frequency,
  ramping linearly between the correction dims of ``beta_fast`` and ``beta_slow`` rotations
  over ``original_max_position_embeddings`` (floored / ceiled when ``truncate``); cos and sin
  are multiplied by the attention factor, 0.1 * mscale * ln(factor) + 1 (the ratio of two
  such terms with ``mscale`` / ``mscale_all_dim``), unless the config gives one.

Shape legend: R = dim / 2 rotary frequencies.
"""
from __future__ import annotations

import math

import torch

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """[dim / 2] float32: theta ** (-2i / dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def linear_inv_freq(theta: float, dim: int, factor: float) -> torch.Tensor:
    return default_inv_freq(theta, dim) / factor


def llama3_inv_freq(theta: float, dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position: int) -> torch.Tensor:
    inv_freq = default_inv_freq(theta, dim)
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, mscale: float = 0.0, mscale_all_dim: float = 0.0) -> float:
    """The factor cos and sin are multiplied by (mscale / mscale_all_dim: 0 = not given)."""
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def yarn_inv_freq(theta: float, dim: int, factor: float, original_max_position: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp_R = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation_R = 1 - ramp_R  # 1 = keep the original frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation_R) + (1.0 / pos_freqs) * extrapolation_R


def rope_parameters(cfg, dim: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim / 2] float32 on the CPU, attention factor) for a ModelConfig's RoPE
    fields; ``dim`` = the rotary dims (default ``cfg.head_dim``)."""
    dim = dim or cfg.head_dim
    kind, theta, factor = cfg.rope_type, cfg.rope_theta, cfg.rope_factor
    original = cfg.rope_original_max_position or cfg.max_position_embeddings
    if kind == "default":
        return default_inv_freq(theta, dim), 1.0
    if kind == "linear":
        return linear_inv_freq(theta, dim, factor), 1.0
    if kind == "llama3":
        return llama3_inv_freq(theta, dim, factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                               original), 1.0
    if kind == "yarn":
        attn = cfg.rope_attention_factor
        if attn is None:
            attn = yarn_attention_factor(factor, cfg.rope_mscale, cfg.rope_mscale_all_dim)
        return yarn_inv_freq(theta, dim, factor, original, cfg.rope_beta_fast, cfg.rope_beta_slow,
                             cfg.rope_truncate), float(attn)
    raise ValueError(f"rope type {kind!r} is not one of {', '.join(ROPE_TYPES)}")
