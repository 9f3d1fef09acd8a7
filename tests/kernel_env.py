"""Shared by the kernel tests: the device and the skip marker for Triton runs (the kernel
tests' ``seed`` fixture is in conftest.py).

The Triton interpreter must be chosen before triton is first imported; tests/conftest.py
does that, and so does this module, so a kernel test file also runs on its own."""
import os

if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import moerun.kernels as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not (K.HAS_TRITON and (DEVICE == "cuda" or K.INTERPRETED)),
    reason="no triton, or triton was imported before TRITON_INTERPRET=1 was set")
