"""Shared plumbing of the kernels: the guarded triton import and the choice of implementation.

Every public kernel takes ``impl=None | "auto" | "triton" | "torch"``; ``None`` means the
process-wide default set with ``set_default_impl`` (initially ``"auto"``):

    from moerun.kernels import set_default_impl
    set_default_impl("torch")        # e.g. what `--kernels torch` does

``"auto"`` runs Triton when the tensors are on CUDA and triton imports, else the PyTorch
reference. ``"triton"`` on CPU runs only under the Triton interpreter, which must be switched
on (``TRITON_INTERPRET=1``) before triton is first imported, because ``triton.jit`` decides
at decoration time whether a kernel is compiled or interpreted.

Without triton installed this module still imports: ``tl`` becomes a stub whose only use is
the ``tl.constexpr`` annotations, ``jit`` leaves functions undecorated, and every kernel
resolves to its PyTorch reference.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    TRITON_IMPORT_ERROR = ""
except Exception as exc:  # not installed, or a broken install: the references still work
    triton = None
    HAS_TRITON = False
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

    class _TritonLanguageStub:
        constexpr = object

    tl = _TritonLanguageStub()

IMPLS = ("auto", "triton", "torch")
_default_impl = "auto"
_poison = False  # tests: fill fresh kernel outputs with garbage to catch unwritten elements


def jit(fn):
    """``triton.jit`` when triton is importable; otherwise the plain (never launched) function."""
    return triton.jit(fn) if HAS_TRITON else fn


def _probe_interpreter() -> bool:
    if not HAS_TRITON:
        return False

    @triton.jit
    def _probe():
        pass

    return type(_probe).__name__ == "InterpretedFunction"


# Fixed when this module is imported, exactly like the kernels decorated right after it.
INTERPRETED = _probe_interpreter()


@jit
def pre_round_bf16(x, ROUND_BF16: tl.constexpr):
    """Use as ``pre_round_bf16(x_f32, ROUND_BF16).to(out_dtype)``. ROUND_BF16 is for the
    interpreter, whose float32 -> bfloat16 cast truncates (triton 3.9): adding the rounding
    bias to the bits first makes that truncation round to nearest even like the GPU does.
    Zeros, subnormals, inf and NaN are left alone. Without the flag: x unchanged."""
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        exponent = (bits >> 23) & 0xFF
        normal = (exponent != 0) & (exponent != 0xFF)
        bits += tl.where(normal, 0x7FFF + ((bits >> 16) & 1), 0)
        x = bits.to(tl.float32, bitcast=True)
    return x


@jit
def dot(a, b, acc, IEEE_F32: tl.constexpr):
    """``tl.dot(a, b, acc)``; with IEEE_F32 in float32 without TF32 — for float32 inputs, and
    for bf16 / fp16 under the interpreter, whose low-precision dot is broken on CPU (triton
    3.9); float32 products of bf16 values are exact, so the result is the same."""
    if IEEE_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


def round_bf16_by_hand(dtype: torch.dtype) -> bool:
    """The ROUND_BF16 flag of ``pre_round_bf16`` for an output of this dtype."""
    return INTERPRETED and dtype == torch.bfloat16


def set_default_impl(impl: str) -> None:
    """Set what ``impl=None`` means for every kernel: "auto", "triton" or "torch"."""
    global _default_impl
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r}; use one of {IMPLS}")
    _default_impl = impl


def get_default_impl() -> str:
    return _default_impl


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """Turn a requested impl into the one that runs: "triton" or "torch"."""
    impl = _default_impl if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r}; use one of {IMPLS} (or None)")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "torch"
    if not HAS_TRITON:
        raise ValueError("impl='triton' needs the triton package, which did not import "
                         f"({TRITON_IMPORT_ERROR}); install it or use impl='torch'")
    if device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            f"impl='triton' got tensors on {device.type}: use CUDA tensors, or set "
            "TRITON_INTERPRET=1 before triton is first imported to run the kernels on CPU, "
            "or use impl='torch'")
    return "triton"


def uses_triton(device: torch.device, impl: str | None = None) -> bool:
    """Whether a kernel called with ``impl`` on this device runs Triton (callers that keep a
    different code path for the PyTorch case, e.g. the model's attention, ask this)."""
    return resolve_impl(impl, device) == "triton"


def set_debug_poison(enabled: bool) -> None:
    """Make ``alloc`` fill every buffer with NaN / -7777 (tests use it to catch gaps)."""
    global _poison
    _poison = bool(enabled)


def alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs, poisoned when ``set_debug_poison(True)``."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        t.fill_(float("nan") if dtype.is_floating_point else -7777)
    return t


def next_pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1) (Triton block shapes must be powers of two)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_index(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64 expert ids, got {t.dtype}")


def check_2d(name: str, t: torch.Tensor, legend: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D {legend}, got shape {tuple(t.shape)}")


def check_routed(x_TH: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor) -> None:
    """Shape and dtype checks shared by every kernel that takes routed tokens."""
    check_2d("x_TH", x_TH, "[tokens, hidden]")
    check_float("x_TH", x_TH)
    check_2d("weights_TK", weights_TK, "[tokens, top_k] routing weights")
    check_float("weights_TK", weights_TK)
    check_2d("ids_TK", ids_TK, "[tokens, top_k] expert ids")
    check_index("ids_TK", ids_TK)
