"""The C kernel of the CPU expert path (``csrc/moe_cpu.c``), built at first use and loaded
with ctypes; optional: without a C compiler (or with ``MOERUN_CPU_EXT=0``) ``available()`` is
False and ``torch_fused_moe`` keeps its PyTorch paths.

    from moerun.kernels import cpu_ext
    if cpu_ext.available():
        out_TH = cpu_ext.moe_experts(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start, act)
        out_TND = cpu_ext.paged_attention(q_TND, k_cache, v_cache, table_BP, cu_q_B1, pos_T, max_len,
                                          scale=D ** -0.5, write=(slot_T, k_TND, v_TND))
        cpu_ext.rope_qk_(q_TND, k_TND, cos_TR, sin_TR)             # in place; False if not taken
        h_TH, x_TH = cpu_ext.add_rmsnorm(a_TH, b_TH, weight_H, eps)  # or None if not taken
        weights_TK, ids_TK = cpu_ext.route_softmax(x_TH, w_EH, b_E, k, renormalize, scaling)  # or None

Build: ``$CC`` (default ``cc``) ``-O3 -march=native -fopenmp -shared`` into
``$MOERUN_CACHE_DIR`` (default ``~/.cache/moerun``)/``moe_cpu-<hash>.so``, the hash over the
source, the compiler command and its binary (path, size, mtime), and the CPU's model and flags, so a changed
file, compiler or machine builds afresh. Each builder writes its own temporary file and
renames it into place, so ranks starting together on one host cannot read a half-written
library. The library links libgomp by its soname, which resolves to the copy PyTorch has
already loaded: its parallel regions run on PyTorch's OpenMP threads, as many as
``torch.get_num_threads()``.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("moerun.kernels")

SOURCE = Path(__file__).with_name("csrc") / "moe_cpu.c"
_ACT_CODES = {"silu": 0, "swiglu_oai": 1}
_lib = None
_error: str | None = None  # why the library is not available, once tried


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            keep = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(keep)))
    except OSError:
        return platform.processor() + platform.machine()


def _compiler() -> list[str] | None:
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    return cc.split() if cc else None


def cache_dir() -> Path:
    return Path(os.environ.get("MOERUN_CACHE_DIR") or Path.home() / ".cache" / "moerun")


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    flags = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c11"]
    exe = shutil.which(cc[0])
    if exe is None:
        raise RuntimeError(f"the C compiler {cc[0]!r} was not found (set CC, or install gcc)")
    st = os.stat(exe)  # the compiler's identity without running it (a cached load spawns nothing)
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(cc + flags), os.path.realpath(exe),
                                    f"{st.st_size}:{st.st_mtime_ns}", _cpu_signature()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"moe_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run(cc + flags + ["-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed on {SOURCE.name}: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


_sgemm: int | None = None


def _find_sgemm() -> int | None:
    """The address of the BLAS ``sgemm_`` (Fortran interface, 32-bit ints: the LP64 MKL of the
    x86-64 wheels, OpenBLAS elsewhere) that PyTorch's CPU library links and exports, or None.
    tests/test_cpu_fused.py checks its results against F.linear's on each machine."""
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                return ctypes.cast(ctypes.CDLL(path).sgemm_, ctypes.c_void_p).value
            except (OSError, AttributeError):
                return None
    return None


def sgemm() -> int | None:
    """The sgemm the fused decode step calls (None: not found; that path is then off)."""
    _load()
    return _sgemm


def decode_layers(step, layers, num_layers: int) -> int:
    """``decode_layers_f32`` on ctypes structures built by ``moerun.model.cpu_fused``."""
    return _load().decode_layers_f32(ctypes.byref(step), layers, num_layers)


def _load():
    global _lib, _error, _sgemm
    if _lib is not None or _error is not None:
        return _lib
    if os.environ.get("MOERUN_CPU_EXT", "1") == "0":
        _error = "off (MOERUN_CPU_EXT=0)"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
        fn = lib.moe_experts_f32
        P, I, Fl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        fn.argtypes = [P, I, I, I, P, P, I, I, I, P, P, P, P, ctypes.c_int, Fl, Fl, P]
        fn.restype = ctypes.c_int
        att = lib.paged_attention_f32
        att.argtypes = [P, I, I, I, P, P, I, I, P, P, P, P, I, I, P, P, I, Fl, I, P, P]
        att.restype = ctypes.c_int
        lib.rope_qk_f32.argtypes = [P, I, I, P, I, I, I, I, P, P, I]
        lib.rope_qk_f32.restype = None
        lib.add_rmsnorm_f32.argtypes = [P, P, P, P, Fl, I, I, P]
        lib.add_rmsnorm_f32.restype = None
        lib.route_softmax_f32.argtypes = [P, I, I, P, P, I, I, ctypes.c_int, Fl, P, P]
        lib.route_softmax_f32.restype = None
        lib.moerun_set_sgemm.argtypes = [P]
        lib.moerun_set_sgemm.restype = None
        lib.linear_rows_f32.argtypes = [P, I, I, P, I, P]
        lib.linear_rows_f32.restype = None
        lib.argmax_rows_f32.argtypes = [P, I, I, P, P]
        lib.argmax_rows_f32.restype = None
        lib.decode_layers_f32.argtypes = [P, P, I]
        lib.decode_layers_f32.restype = ctypes.c_int
        lib.moerun_vector_width.argtypes = []
        lib.moerun_vector_width.restype = ctypes.c_int
        _sgemm = _find_sgemm()
        if _sgemm is not None:
            lib.moerun_set_sgemm(_sgemm)
        _lib = lib
    except Exception as exc:  # no compiler, a failed build or load: the PyTorch paths remain
        _error = f"{type(exc).__name__}: {exc}"
        log.warning("CPU expert kernel unavailable, using the PyTorch path: %s", _error)
    return _lib


def available() -> bool:
    """Whether the C kernel is built and loaded (builds it on the first call)."""
    return _load() is not None


_width: tuple | None = None  # (library, its vector width): asked once per loaded library


def vector_width() -> int | None:
    """Float lanes of the build's vector path (16: AVX-512, 8: AVX2 + FMA, 1: neither), or
    None when the kernel is not available. Cheap: ``torch_fused_moe`` asks on every call."""
    global _width
    lib = _load()
    if lib is None:
        return None
    if _width is None or _width[0] is not lib:
        _width = (lib, int(lib.moerun_vector_width()))
    return _width[1]


def unavailable_reason() -> str | None:
    _load()
    return _error


def _f32_cpu(*ts) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts)


def supports(x_TH, w13_EFH, w2_EHF, act) -> bool:
    """Inputs the kernel takes: CPU float32, K-major experts (``w.transpose(1, 2)``
    contiguous, the model's layout), an activation it knows, contiguous float32 biases."""
    if not _f32_cpu(x_TH) or act.kind not in _ACT_CODES:
        return False
    if not (w13_EFH.transpose(1, 2).is_contiguous() and w2_EHF.transpose(1, 2).is_contiguous()):
        return False
    return all(b is None or (b.dtype == torch.float32 and b.is_contiguous()) for b in (act.w13_bias, act.w2_bias))


def moe_experts(x_TH, w13_EFH, w2_EHF, weights_TK, ids_TK, expert_start, act) -> torch.Tensor:
    """``reference_fused_moe``'s result from one C call (caller checked ``supports``)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU expert kernel is not available: {_error}")
    x = x_TH.contiguous()
    T, H = x.shape
    E, F = w13_EFH.shape[0], w13_EFH.shape[1] // 2
    K = ids_TK.shape[1]
    ids = ids_TK.contiguous().long()
    w = weights_TK.contiguous().float()
    out = torch.empty((T, H), dtype=torch.float32)
    b13, b2 = act.w13_bias, act.w2_bias
    rc = lib.moe_experts_f32(x.data_ptr(), T, H, F, ids.data_ptr(), w.data_ptr(), K, expert_start, E,
                             w13_EFH.data_ptr(), w2_EHF.data_ptr(),
                             None if b13 is None else b13.data_ptr(), None if b2 is None else b2.data_ptr(),
                             _ACT_CODES[act.kind], float(act.alpha), float(act.limit), out.data_ptr())
    if rc != 0:
        raise MemoryError(f"the CPU expert kernel could not allocate its scratch (T={T}, H={H}, F={F})")
    return out



def attention_supports(q_TND, k_cache, v_cache, sinks_N=None) -> bool:
    """Inputs ``paged_attention`` takes: CPU float32, contiguous caches [blocks, block_size,
    N_kv, D], N_q a multiple of N_kv with at most 64 query heads per KV head."""
    if not _f32_cpu(q_TND, k_cache):
        return False
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or v_cache.shape != k_cache.shape:
        return False
    Nq, Nkv = q_TND.shape[1], k_cache.shape[2]
    return Nq % Nkv == 0 and Nq // Nkv <= 64 and (sinks_N is None or sinks_N.dtype == torch.float32)


def paged_attention(q_TND, k_cache, v_cache, table_BP, cu_q_B1, pos_T, max_len: int, *, scale: float,
                    window: int = 0, sinks_N=None, write=None) -> torch.Tensor:
    """``kernels.paged_attention``'s result (same arguments; ``max_len`` = the longest
    sequence's length after this step) from one C call. ``write = (slot_T, k_TND, v_TND)``
    first stores the step's new keys and values in their flat cache slots (what
    ``KVCache.write`` does). The caller checked ``attention_supports``."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are not available: {_error}")
    q = q_TND.contiguous()
    T, Nq, D = q.shape
    Nkv, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty((T, Nq, D), dtype=torch.float32)
    table = table_BP.contiguous().long()
    cu = cu_q_B1.contiguous().long()
    pos = pos_T.contiguous().long()
    if write is not None:
        slot, k_new, v_new = write[0].contiguous().long(), write[1].contiguous(), write[2].contiguous()
        wk, wv, ws = k_new.data_ptr(), v_new.data_ptr(), slot.data_ptr()
    else:
        wk = wv = ws = None
    sinks = None if sinks_N is None else sinks_N.detach().contiguous()
    rc = lib.paged_attention_f32(q.data_ptr(), T, Nq, D, k_cache.data_ptr(), v_cache.data_ptr(), block_size, Nkv,
                                 wk, wv, ws, table.data_ptr(), table.shape[0], table.shape[1], cu.data_ptr(),
                                 pos.data_ptr(), max_len, float(scale), int(window),
                                 None if sinks is None else sinks.data_ptr(), out.data_ptr())
    if rc != 0:
        raise MemoryError(f"the CPU attention kernel could not allocate its scratch (max_len={max_len})")
    return out


def rope_qk_(q_TND: torch.Tensor, k_TND: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> bool:
    """``apply_rope`` on q and k in place, in one C call, when it can (CPU float32, heads
    contiguous in each row, cos/sin [T, R] contiguous, R even and at most D): returns
    whether it did; if not, nothing was touched."""
    if not _f32_cpu(q_TND, k_TND, cos_TR, sin_TR) or q_TND.dim() != 3 or k_TND.dim() != 3:
        return False
    T, Nq, D = q_TND.shape
    R = cos_TR.shape[-1]
    ok = (k_TND.shape[0] == T and k_TND.shape[2] == D and R % 2 == 0 and R <= D
          and tuple(cos_TR.shape) == (T, R) and sin_TR.shape == cos_TR.shape
          and cos_TR.is_contiguous() and sin_TR.is_contiguous()
          and q_TND.stride()[1:] == (D, 1) and k_TND.stride()[1:] == (D, 1))
    lib = _load() if ok else None
    if lib is None:
        return False
    lib.rope_qk_f32(q_TND.data_ptr(), Nq, q_TND.stride(0), k_TND.data_ptr(), k_TND.shape[1], k_TND.stride(0), T, D,
                    cos_TR.data_ptr(), sin_TR.data_ptr(), R)
    return True


def add_rmsnorm(a_TH: torch.Tensor, b_TH: torch.Tensor | None, weight_H: torch.Tensor, eps: float):
    """``h = a + b`` (or a) and ``RMSNorm(h) * weight`` in one C call, when it can (CPU
    float32, contiguous): ``(h, x)``, or None when it cannot (nothing computed then)."""
    ts = (a_TH, weight_H) if b_TH is None else (a_TH, b_TH, weight_H)
    if not _f32_cpu(*ts) or a_TH.dim() != 2 or not all(t.is_contiguous() for t in ts):
        return None
    T, H = a_TH.shape
    if (b_TH is not None and b_TH.shape != a_TH.shape) or tuple(weight_H.shape) != (H,):
        return None
    lib = _load()
    if lib is None:
        return None
    h = torch.empty_like(a_TH) if b_TH is not None else a_TH
    x = torch.empty_like(a_TH)
    lib.add_rmsnorm_f32(a_TH.data_ptr(), None if b_TH is None else b_TH.data_ptr(),
                        h.data_ptr(), weight_H.data_ptr(), float(eps), T, H, x.data_ptr())
    return h, x


MAX_ROUTED_EXPERTS = 1024  # route_softmax_f32's per-token buffer


def route_softmax(x_TH: torch.Tensor, weight_EH: torch.Tensor, bias_E: torch.Tensor | None, k: int,
                  renormalize: bool, scaling: float = 1.0):
    """The router linear and ``route(..., scoring="softmax")`` in one C call, when it can (CPU
    float32, contiguous, E <= 1024): ``(weights_TK float32, ids_TK int32)``, or None when it
    cannot (nothing computed then)."""
    ts = (x_TH, weight_EH) if bias_E is None else (x_TH, weight_EH, bias_E)
    if not _f32_cpu(*ts) or x_TH.dim() != 2 or weight_EH.dim() != 2 or not all(t.is_contiguous() for t in ts):
        return None
    T, H = x_TH.shape
    E = weight_EH.shape[0]
    if weight_EH.shape[1] != H or E > MAX_ROUTED_EXPERTS or not 1 <= k <= E or (
            bias_E is not None and tuple(bias_E.shape) != (E,)):
        return None
    lib = _load()
    if lib is None:
        return None
    w = torch.empty((T, k), dtype=torch.float32)
    ids = torch.empty((T, k), dtype=torch.int32)
    lib.route_softmax_f32(x_TH.data_ptr(), T, H, weight_EH.data_ptr(), None if bias_E is None else bias_E.data_ptr(),
                          E, k, int(bool(renormalize)), float(scaling), w.data_ptr(), ids.data_ptr())
    return w, ids


def linear_rows(x_TK: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor | None:
    """``x @ weight.T`` (``F.linear`` without a bias) in one C call, for a few rows of x (a
    decode step's LM head), when it can (CPU float32, both contiguous 2-D, same K): the
    [T, N] result, or None when it cannot (nothing computed then)."""
    if not _f32_cpu(x_TK, weight_NK) or x_TK.dim() != 2 or weight_NK.dim() != 2:
        return None
    if not (x_TK.is_contiguous() and weight_NK.is_contiguous()) or x_TK.shape[1] != weight_NK.shape[1]:
        return None
    lib = _load()
    if lib is None:
        return None
    T, K = x_TK.shape
    N = weight_NK.shape[0]
    out = torch.empty((T, N), dtype=torch.float32)
    lib.linear_rows_f32(x_TK.data_ptr(), T, K, weight_NK.data_ptr(), N, out.data_ptr())
    return out


def argmax_rows(x_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(``torch.max(x, dim=-1).indices``, whether each row is all finite) in one C call over
    a CPU float32 contiguous [B, V] (V >= 1): the int64 [B] indices and the bool [B] flags, or
    None when it cannot (nothing computed then). torch's max with its index is a scalar loop
    on the CPU: 1.2 ms for 32 x 32000 logits against about 0.1 ms here."""
    if not _f32_cpu(x_BV) or x_BV.dim() != 2 or not x_BV.is_contiguous() or x_BV.shape[1] == 0:
        return None
    lib = _load()
    if lib is None:
        return None
    B, V = x_BV.shape
    idx = torch.empty(B, dtype=torch.int64)
    finite = torch.empty(B, dtype=torch.bool)
    lib.argmax_rows_f32(x_BV.data_ptr(), B, V, idx.data_ptr(), finite.data_ptr())
    return idx, finite
