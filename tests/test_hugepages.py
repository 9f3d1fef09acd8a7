"""moerun.hugepages: tensors moved onto huge-page memory keep their values, shapes, strides,
storage offsets and identities (tied parameters stay tied), and the model computes the
same logits; the memory really is on huge pages where the system allows them."""
import re

import pytest
import torch

from moerun import hugepages as hp
from moerun.build import build_model, forward_logits


def anon_huge_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return int(re.search(r"AnonHugePages:\s+(\d+)", f.read()).group(1))


def test_rehome_keeps_values_layout_and_offset():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 40, 70, generator=g, dtype=torch.float64)
    for t in (base, base.transpose(1, 2), base[1:, 5:], base.view(torch.int64)[2]):
        new = hp.rehome(t)
        assert new.shape == t.shape and new.stride() == t.stride() and new.storage_offset() == t.storage_offset()
        assert new.dtype == t.dtype and torch.equal(new, t)
        assert new.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()


def test_huge_zeros():
    z = hp.huge_zeros((5, 3, 7), torch.float32)
    assert z.shape == (5, 3, 7) and z.dtype == torch.float32 and z.is_contiguous() and not z.any()
    z += 1  # writable
    assert z.sum().item() == 105


def test_module_parameters_move_in_place_and_ties_hold(monkeypatch):
    monkeypatch.setattr(hp, "enabled", lambda: True)
    lin = torch.nn.Linear(512, 4096, bias=True)  # 8 MiB of weight, 16 KiB of bias
    tied = torch.nn.Module()
    tied.a, tied.b = lin, torch.nn.Linear(512, 4096, bias=False)
    tied.b.weight = lin.weight  # the same Parameter in two modules
    w_before, w_obj, b_ptr = lin.weight.detach().clone(), lin.weight, lin.bias.data_ptr()
    moved, nbytes = hp.rehome_on_huge_pages(tied)
    assert (moved, nbytes) == (1, 4096 * 512 * 4)  # the weight once; the bias is below MIN_BYTES
    assert lin.weight is w_obj and tied.b.weight is lin.weight and torch.equal(lin.weight, w_before)
    assert lin.bias.data_ptr() == b_ptr


def test_switch_off(monkeypatch):
    monkeypatch.setenv("MOERUN_HUGEPAGES", "0")
    assert not hp.enabled()
    lin = torch.nn.Linear(2048, 2048)
    ptr = lin.weight.data_ptr()
    assert hp.rehome_on_huge_pages(lin) == (0, 0) and lin.weight.data_ptr() == ptr


def test_model_on_huge_pages_computes_the_same_logits(monkeypatch):
    prompts = [[5, 17, 3, 9, 100], [42, 7]]
    monkeypatch.setenv("MOERUN_HUGEPAGES", "0")
    ref = forward_logits(build_model("tiny", seed=3), prompts)
    monkeypatch.setenv("MOERUN_HUGEPAGES", "1")
    if not hp.enabled():
        pytest.skip(f"transparent huge pages are {hp.thp_mode()!r} here")
    before = anon_huge_kb()
    m = build_model("tiny", seed=3)
    assert anon_huge_kb() - before >= 256 * 1024  # most of the 400 MB of expert weights
    w13 = m.layers[0].mlp.w13
    assert w13.stride() == (w13.shape[1] * w13.shape[2], 1, w13.shape[1])  # still the K-major view
    for a, b in zip(forward_logits(m, prompts), ref):
        assert torch.equal(a, b)


def test_zeros_takes_huge_pages_only_where_they_pay(monkeypatch):
    made, real = [], hp.huge_zeros
    monkeypatch.setattr(hp, "huge_zeros", lambda shape, dtype: made.append(tuple(shape)) or real(shape, dtype))
    monkeypatch.setattr(hp, "enabled", lambda: True)
    small, big = hp.zeros((4, 16), torch.float32, "cpu"), hp.zeros((2, 1 << 20), torch.float32, "cpu")
    for t in (small, big):
        assert t.dtype == torch.float32 and not t.any()
    assert made == [(2, 1 << 20)]  # 8 MiB: on huge pages; 256 bytes: not
    monkeypatch.setattr(hp, "enabled", lambda: False)
    assert hp.zeros((2, 1 << 20), torch.float32, "cpu").shape == (2, 1 << 20) and made == [(2, 1 << 20)]
