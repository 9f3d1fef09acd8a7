"""Triton kernels for the MoE hot path, each with a plain-PyTorch reference."""
