"""Large CPU tensors on transparent huge pages (2 MiB) instead of 4 KiB pages.

A decode step on the CPU streams every routed expert's weights from memory. On 4 KiB pages
that is a page-table walk every 64 cache lines, and the expert kernel reads several weight
rows at once, each in its own page; on 2 MiB pages the walks all but vanish. On the 2-core
Intel Xeon of docs/perf.md this made decoding 8-9% faster on the cpu-1024 preset and 5-7%
on tiny.

    n, nbytes = rehome_on_huge_pages(model)   # after the weights are in; CPU tensors only
    t = zeros(shape, dtype, device)            # torch.zeros, on huge pages where that pays
    thp_mode()                                 # "always" / "madvise" / "never" / None

Linux gives huge pages to anonymous memory marked MADV_HUGEPAGE when the system's mode
(/sys/kernel/mm/transparent_hugepage/enabled) is "madvise" or "always"; PyTorch's allocator
does not mark its memory. Here a tensor's storage is moved into an anonymous mapping that
is marked before it is first touched, rounded up to whole 2 MiB pages, and the tensor keeps
its shape, strides and identity (``param.data`` is replaced), so tied parameters follow.
Nothing is moved with the mode "never", on a system without the file (not Linux), or with
``MOERUN_HUGEPAGES=0``; below ``MIN_BYTES`` a tensor is left where it is.
"""
from __future__ import annotations

import math
import mmap
import os

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 << 20  # a tensor of at least two huge pages is moved
_THP_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode() -> str | None:
    """The system's transparent-huge-page mode, or None where there is none to read."""
    try:
        with open(_THP_FILE) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def enabled() -> bool:
    return (os.environ.get("MOERUN_HUGEPAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")
            and thp_mode() in ("madvise", "always"))


def huge_bytes(nbytes: int) -> torch.Tensor:
    """A zeroed uint8 tensor of ``nbytes`` in a fresh anonymous mapping marked for huge pages
    (the tensor keeps the mapping alive; it is unmapped when the tensor's storage goes)."""
    size = max(HUGE_PAGE, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)  # before any page is touched: the faults then take 2 MiB pages
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes)


def huge_zeros(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.zeros(shape, dtype=dtype)`` on huge pages (anonymous memory comes zeroed; its
    pages are only faulted in when first touched)."""
    n = math.prod(shape)
    return huge_bytes(max(n * dtype.itemsize, 1)).view(dtype)[:n].view(tuple(shape))


def zeros(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.zeros``, on huge pages for a CPU tensor of at least ``MIN_BYTES`` when enabled,
    written through at once as torch.zeros is (no page faults later, in a step)."""
    if torch.device(device).type == "cpu" and math.prod(shape) * dtype.itemsize >= MIN_BYTES and enabled():
        return huge_zeros(shape, dtype).zero_()
    return torch.zeros(shape, dtype=dtype, device=device)


def rehome(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (same shape, strides and storage offset) whose storage is on huge pages."""
    st = t.untyped_storage()
    buf = huge_bytes(st.nbytes())
    buf.copy_(torch.empty(0, dtype=torch.uint8).set_(st))
    return torch.empty(0, dtype=t.dtype).set_(buf.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def rehome_on_huge_pages(module: torch.nn.Module, min_bytes: int = MIN_BYTES) -> tuple[int, int]:
    """Move every CPU parameter and buffer of ``module`` of at least ``min_bytes`` onto huge
    pages, in place (``.data``). Returns (tensors moved, their bytes); (0, 0) when not enabled."""
    if not enabled():
        return 0, 0
    moved, nbytes, seen = 0, 0, set()
    for mod in module.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is None or id(t) in seen or t.device.type != "cpu" or t.is_sparse:
                continue
            seen.add(id(t))
            size = t.untyped_storage().nbytes()
            if size < min_bytes:
                continue
            t.data = rehome(t.data)
            moved, nbytes = moved + 1, nbytes + size
    return moved, nbytes
