"""The C expert kernel of the CPU path (kernels/csrc/moe_cpu.c via kernels/cpu_ext.py)
equals the readable reference and a float64 computation on fresh random inputs: both
activations, expert biases, expert-parallel slices, widths on and off the vector path (16
floats with AVX-512, 8 with AVX2), experts with more slots than one pass takes, gate values
far into both tails of the silu; the softmax router likewise; and it is optional: without a
compiler the PyTorch paths run."""
import importlib
import math
import os

import pytest
import torch

from moerun.kernels import ExpertAct

fm = importlib.import_module("moerun.kernels.fused_moe")
cpu_ext = importlib.import_module("moerun.kernels.cpu_ext")

needs_ext = pytest.mark.skipif(not cpu_ext.available(), reason=f"no C kernel: {cpu_ext.unavailable_reason()}")


def experts(n, H, F):
    """K-major w13 [n, 2F, H] and w2 [n, H, F], the model's layout."""
    return (torch.randn(n, H, 2 * F) * 0.2).transpose(1, 2), (torch.randn(n, F, H) * 0.2).transpose(1, 2)


def float64_moe(x, w13, w2, weights, ids, start, act):
    T, H = x.shape
    n, F = w13.shape[0], w13.shape[1] // 2
    want = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for k in range(ids.shape[1]):
            e = int(ids[t, k]) - start
            if not 0 <= e < n:
                continue
            gu = w13[e].double() @ x[t].double()
            if act.w13_bias is not None:
                gu = gu + act.w13_bias[e].double()
            g, u = gu[:F], gu[F:]
            if act.kind == "silu":
                h = torch.nn.functional.silu(g) * u
            else:
                g, u = g.clamp(max=act.limit), u.clamp(-act.limit, act.limit)
                h = g * torch.sigmoid(act.alpha * g) * (u + 1)
            y = w2[e].double() @ h
            if act.w2_bias is not None:
                y = y + act.w2_bias[e].double()
            want[t] += weights[t, k].double() * y
    return want


def routing(T, K, E_total, hot=None):
    ids = torch.stack([torch.randperm(E_total)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    if hot is not None and T:  # many slots on one expert: more than one pass of the kernel
        ids[:, 0] = hot
    return torch.rand(T, K), ids.to(torch.int32)


@needs_ext
@pytest.mark.parametrize("T, K, E, start, n, H, F", [
    (0, 2, 8, 0, 8, 32, 48),
    (1, 2, 8, 0, 8, 32, 48),
    (13, 3, 8, 0, 8, 48, 40),       # H = 48: the vector path; F = 40 (2F = 80): its 16-float steps
    (9, 2, 16, 4, 4, 24, 20),       # an EP slice: experts 4..7 of 16, widths off the vector path
    (40, 1, 6, 0, 6, 16, 8),        # ~7 slots per expert, 8 + rows per pass elsewhere
    (5, 4, 12, 8, 4, 37, 11),       # odd widths, most choices on other ranks
    (71, 2, 4, 0, 4, 64, 96),       # a prefill: dozens of slots per expert (one hot: over 64, two
                                    # items), 2F and H multiples of 64: AVX-512's register tiles
    (47, 3, 6, 2, 4, 128, 32),      # tiles with 1-6 slots left over, an EP slice
])
@pytest.mark.parametrize("kind", ["silu", "swiglu_oai", "swiglu_oai+bias", "silu+bias"])
def test_c_kernel_equals_reference_and_float64(T, K, E, start, n, H, F, kind):
    w13, w2 = experts(n, H, F)
    bias = kind.endswith("+bias")
    act = ExpertAct(kind=kind.split("+")[0], alpha=1.3, limit=0.4,
                    w13_bias=torch.randn(n, 2 * F) * 0.3 if bias else None,
                    w2_bias=torch.randn(n, H) * 0.3 if bias else None)
    weights, ids = routing(T, K, E, hot=start if T > 20 else None)
    x = torch.randn(T, H)
    out = fm.torch_fused_moe(x, w13, w2, weights, ids, expert_start=start, path="ext", act=act)
    ref = fm.reference_fused_moe(x, w13, w2, weights, ids, expert_start=start, act=act)
    assert out.shape == (T, H) and out.dtype == torch.float32 and not out.isnan().any()
    if T:
        assert (out - ref).abs().max().item() <= 1e-5
        want = float64_moe(x, w13, w2, weights, ids, start, act)  # float32's rounding, relative to the sizes
        assert (out.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


@needs_ext
def test_c_kernel_results_do_not_depend_on_threads():
    """Each slot is computed by one thread in a fixed order, so 1 and 2 threads agree bit for bit."""
    w13, w2 = experts(8, 64, 96)
    weights, ids = routing(30, 2, 8)
    x = torch.randn(30, 64)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(fm.torch_fused_moe(x, w13, w2, weights, ids, path="ext"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


@needs_ext
def test_vector_width_is_the_machines(monkeypatch):
    """The kernel is built with -march=native: its vector path is this CPU's widest."""
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    if any(t.startswith("-m") for t in os.environ.get("CC", "").split()):
        pytest.skip("CC sets machine flags: the build's ISA is the user's choice")
    want = 16 if "avx512f" in flags else 8 if {"avx2", "fma"} <= flags else 1
    assert cpu_ext.vector_width() == want


@needs_ext
def test_auto_choice_takes_the_c_kernel_for_few_slots(monkeypatch):
    calls = []
    real = cpu_ext.moe_experts
    monkeypatch.setattr(cpu_ext, "moe_experts", lambda *a: calls.append(1) or real(*a))
    E, K, H, F = 4, 2, 16, 32
    w13, w2 = experts(E, H, F)
    bound = fm.ext_max_slots_per_expert()  # no bound with the AVX-512 build (register tiles)
    n = fm.GEMV_MAX_SLOTS_PER_EXPERT * E // K
    for T, ext in ((1, True), (n - 1, True), (n, bound > fm.GEMV_MAX_SLOTS_PER_EXPERT), (4 * n, bound == math.inf)):
        calls.clear()
        weights, ids = routing(T, K, E)
        x = torch.randn(T, H)
        out = fm.torch_fused_moe(x, w13, w2, weights, ids)
        assert bool(calls) == ext, T
        assert (out - fm.reference_fused_moe(x, w13, w2, weights, ids)).abs().max().item() <= 1e-5
    # layouts and dtypes it does not take go to the PyTorch paths
    calls.clear()
    weights, ids = routing(3, K, E)
    std13, std2 = w13.contiguous(), w2.contiguous()
    x = torch.randn(3, H)
    out = fm.torch_fused_moe(x, std13, std2, weights, ids)
    assert not calls and (out - fm.reference_fused_moe(x, std13, std2, weights, ids)).abs().max().item() <= 1e-5


def test_without_a_compiler_the_pytorch_path_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_ext, "_lib", None)
    monkeypatch.setattr(cpu_ext, "_error", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("MOERUN_CACHE_DIR", str(tmp_path / "cache"))
    assert not cpu_ext.available()
    assert "no-such-cc" in cpu_ext.unavailable_reason()
    w13, w2 = experts(4, 16, 8)
    weights, ids = routing(3, 2, 4)
    x = torch.randn(3, 16)
    out = fm.torch_fused_moe(x, w13, w2, weights, ids)
    assert (out - fm.reference_fused_moe(x, w13, w2, weights, ids)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="no-such-cc"):
        fm.torch_fused_moe(x, w13, w2, weights, ids, path="ext")


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setattr(cpu_ext, "_lib", None)
    monkeypatch.setattr(cpu_ext, "_error", None)
    monkeypatch.setenv("MOERUN_CPU_EXT", "0")
    assert not cpu_ext.available() and "MOERUN_CPU_EXT=0" in cpu_ext.unavailable_reason()


@needs_ext
def test_a_fresh_cache_builds_the_library(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_ext, "_lib", None)
    monkeypatch.setattr(cpu_ext, "_error", None)
    monkeypatch.setenv("MOERUN_CACHE_DIR", str(tmp_path))
    assert cpu_ext.available()
    built = list(tmp_path.glob("moe_cpu-*.so"))
    assert len(built) == 1 and list(tmp_path.iterdir()) == built  # no temporary file left behind


@needs_ext
@pytest.mark.parametrize("T, Nq, Nkv, D, R", [(1, 4, 2, 32, 32), (9, 6, 2, 24, 24), (5, 4, 1, 40, 20), (0, 2, 2, 8, 8)])
def test_rope_in_place_equals_apply_rope(T, Nq, Nkv, D, R):
    """q and k as the model has them (views of one fused projection, rows wider than the
    heads), R = D or a partial rotary dim; v, beside them in memory, untouched."""
    from moerun.model.layers import apply_rope, rope_cos_sin
    qkv = torch.randn(T, (Nq + 2 * Nkv) * D)
    q, k, v = qkv.split([Nq * D, Nkv * D, Nkv * D], dim=-1)
    q, k = q.view(T, Nq, D), k.view(T, Nkv, D)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
    cos, sin = rope_cos_sin(torch.randint(0, 500, (T,)), inv_freq, torch.float32)
    want_q, want_k, v0 = apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.clone()
    assert cpu_ext.rope_qk_(q, k, cos, sin)
    if T:
        assert (q - want_q).abs().max().item() <= 1e-6 and (k - want_k).abs().max().item() <= 1e-6
    assert torch.equal(v, v0)
    assert not cpu_ext.rope_qk_(q.double(), k.double(), cos.double(), sin.double())  # not taken: float64


@needs_ext
@pytest.mark.parametrize("T, H", [(1, 128), (7, 96), (33, 1000), (0, 16)])
def test_add_rmsnorm_equals_rmsnorm_and_float64(T, H):
    from moerun.model.layers import RMSNorm
    norm = RMSNorm(H, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    a, b = torch.randn(T, H) * 3, torch.randn(T, H)
    h, x = cpu_ext.add_rmsnorm(a, b, norm.weight, 1e-5)
    assert torch.equal(h, a + b)
    hd = a.double() + b.double()
    exact = norm.weight.double() * hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + 1e-5)
    if T:
        assert (x.double() - exact).abs().max().item() <= 1e-5
        h2, x2 = norm.add_forward(a, b)
        assert torch.equal(h2, h) and torch.equal(x2, x)
        only = cpu_ext.add_rmsnorm(a, None, norm.weight, 1e-5)
        ad = a.double()
        exact_a = norm.weight.double() * ad * torch.rsqrt(ad.pow(2).mean(-1, keepdim=True) + 1e-5)
        assert only[0] is a and (only[1].double() - exact_a).abs().max().item() <= 1e-5
    if T > 1:  # a non-contiguous input is not taken (the caller falls back to PyTorch)
        assert cpu_ext.add_rmsnorm(torch.randn(H, T).t(), None, norm.weight, 1e-5) is None


@needs_ext
@pytest.mark.parametrize("kind", ["silu", "swiglu_oai"])
def test_c_kernel_activation_over_a_wide_range(kind):
    """Gate values from -90 to 90 (the vector exp's clamped tails and every range between):
    still the float64 result, relative to the output's size."""
    n, H, F = 4, 32, 64
    w13, w2 = experts(n, H, F)
    w13 = w13 * 40  # |gate| up to ~90 for unit x
    act = ExpertAct(kind=kind, alpha=1.7, limit=7.0)
    weights, ids = routing(24, 2, n)
    x = torch.randn(24, H)
    g = torch.einsum("eoh,th->teo", w13, x)[..., :F]
    assert g.max() > 80 and g.min() < -80
    out = fm.torch_fused_moe(x, w13, w2, weights, ids, path="ext", act=act)
    exact = float64_moe(x, w13, w2, weights, ids, 0, act)
    assert torch.isfinite(out).all()
    assert (out.double() - exact).abs().max().item() <= 2e-6 * exact.abs().max().item()


def float64_route(x, w, b, k, renormalize, scaling):
    logits = x.double() @ w.double().t() + (b.double() if b is not None else 0)
    p = torch.softmax(logits, dim=-1)
    top, ids = torch.topk(p, k, dim=-1)
    if renormalize:
        top = top / top.sum(-1, keepdim=True)
    return top * scaling, ids


@needs_ext
@pytest.mark.parametrize("T, H, E, k", [(1, 128, 64, 2), (32, 128, 64, 2), (13, 37, 8, 8), (70, 96, 128, 8),
                                        (5, 64, 1024, 4), (0, 16, 8, 2), (300, 128, 64, 2)])
@pytest.mark.parametrize("renormalize, scaling, bias", [(True, 1.0, False), (False, 1.0, True),
                                                        (False, 2.5, False)])
def test_route_softmax_equals_reference_and_float64(T, H, E, k, renormalize, scaling, bias):
    """The router linear + softmax + top-k in one C call equals F.linear then the reference
    router (ids exactly, weights to 1e-5 relative) and a float64 computation (to a few float32
    ulps of the scaled weights); ids by descending weight."""
    from moerun.kernels.router import reference_route
    x, w = torch.randn(T, H), torch.randn(E, H) * 0.3
    b = torch.randn(E) if bias else None
    got = cpu_ext.route_softmax(x, w, b, k, renormalize, scaling)
    assert got is not None
    weights, ids = got
    assert weights.shape == ids.shape == (T, k) and weights.dtype == torch.float32 and ids.dtype == torch.int32
    ref_w, ref_ids = reference_route(torch.nn.functional.linear(x, w, b), k, scoring="softmax",
                                     renormalize=renormalize, scaling=scaling)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)
    ex_w, ex_ids = float64_route(x, w, b, k, renormalize, scaling)
    assert torch.equal(ids.long(), ex_ids)
    # a few float32 ulps of the scaled weights (2.5 at most here: its ulp is 2.4e-7)
    assert (weights.double() - ex_w).abs().max().item() <= 2e-6 * max(1.0, scaling) if T else True


@needs_ext
def test_route_softmax_ties_take_the_lower_id_and_rules():
    x = torch.ones(3, 16)
    w = torch.zeros(6, 16)
    w[[1, 4]] = 1.0  # experts 1 and 4 tie on top, the rest tie below
    weights, ids = cpu_ext.route_softmax(x, w, None, 3, True)
    assert ids.tolist() == [[1, 4, 0]] * 3
    # not taken (None, nothing computed): float64, non-contiguous, more than 1024 experts, bad k
    assert cpu_ext.route_softmax(x.double(), w.double(), None, 2, True) is None
    assert cpu_ext.route_softmax(torch.randn(16, 3).t(), w, None, 2, True) is None
    assert cpu_ext.route_softmax(x, torch.randn(1025, 16), None, 2, True) is None
    assert cpu_ext.route_softmax(x, w, None, 7, True) is None


@needs_ext
def test_moe_block_routes_through_the_c_router_like_the_reference(monkeypatch):
    """MoE.route on CPU float32 under inference takes the C router, and equals the PyTorch one."""
    from moerun.comm import Comm
    from moerun.config import ModelConfig
    from moerun.model.moe import MoE
    cfg = ModelConfig(model_type="mixtral", vocab_size=32, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=32, num_experts=16, top_k=4, moe_ffn=32, norm_topk_prob=True)
    moe = MoE(cfg, Comm(), 0)
    with torch.no_grad():
        moe.gate.weight.normal_()
    x = torch.randn(20, 64)
    calls = []
    real = cpu_ext.route_softmax
    monkeypatch.setattr(cpu_ext, "route_softmax", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        w, ids = moe.route(x)
    assert calls
    monkeypatch.setattr(cpu_ext, "route_softmax", lambda *a: None)
    with torch.inference_mode():
        ref_w, ref_ids = moe.route(x)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


@needs_ext
@pytest.mark.parametrize("T, K, N", [(1, 128, 512), (32, 1024, 1000), (7, 37, 101), (4, 8, 3), (65, 96, 50),
                                     (5, 1, 7), (0, 16, 9), (3, 24, 0)])
def test_linear_rows_equals_float64_and_torch(T, K, N):
    """x W^T from the C kernel on fresh random inputs: within float32 rounding of the float64
    product (every register-block edge: T not a multiple of 4, N of 3 or of a thread's chunk,
    K of the vector width), and the same rows whatever the thread count."""
    x, W = torch.randn(T, K), torch.randn(N, K)
    out = cpu_ext.linear_rows(x, W)
    exact = x.double() @ W.double().t()
    assert out.shape == (T, N) and out.dtype == torch.float32
    bound = 1e-6 * K ** 0.5 * (exact.abs().max().item() if exact.numel() else 0) + 1e-6
    assert (out.double() - exact).abs().max().item() <= bound if out.numel() else True
    assert torch.allclose(out, torch.nn.functional.linear(x, W), rtol=1e-4, atol=1e-4 * K ** 0.5)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_ext.linear_rows(x, W), out)  # each output by one thread, one order
    finally:
        torch.set_num_threads(before)
    assert cpu_ext.linear_rows(x, W.t().contiguous().t()) is None if N > 1 and K > 1 else True  # not contiguous
    assert cpu_ext.linear_rows(x.double(), W.double()) is None


@needs_ext
def test_lm_head_takes_the_c_kernel_for_a_decode_step(monkeypatch):
    """The LM head of a decode step (few rows, no grad) is the C kernel's x W^T; with more rows
    than it takes, or with grad, it is PyTorch's; all agree with float64."""
    from moerun.comm import Comm
    from moerun.model.layers import LM_HEAD_C_MAX_ROWS, LMHead

    head = LMHead(300, 64, Comm(), None)
    with torch.no_grad():
        head.weight.normal_()
    calls = []
    real = cpu_ext.linear_rows
    monkeypatch.setattr(cpu_ext, "linear_rows", lambda x, w: calls.append(x.shape[0]) or real(x, w))
    for T in (1, 32, LM_HEAD_C_MAX_ROWS + 1):
        x = torch.randn(T, 64)
        exact = x.double() @ head.weight.double().t()
        with torch.no_grad():
            out = head(x)
        assert (out.double() - exact).abs().max().item() <= 1e-4
    assert calls == [1, 32]
    out = head(torch.randn(2, 64))  # grad on: the autograd path
    assert out.requires_grad and calls == [1, 32]


@needs_ext
@pytest.mark.parametrize("B, V", [(1, 1), (3, 7), (32, 512), (5, 1000), (2, 32000), (33, 65)])
def test_argmax_rows_equals_torch_max(B, V):
    """The greedy argmax: torch.max's index (its first maximum; a row's first NaN) and
    torch.isfinite(...).all per row, on random rows, rows of many ties, rows with inf, -inf,
    NaN and -0.0 put in, and a row of -inf only."""
    g = torch.Generator().manual_seed(B * 1000 + V)
    for trial in range(40):
        x = torch.randn(B, V, generator=g) if trial % 2 else torch.randint(-2, 3, (B, V), generator=g).float()
        if trial % 3 == 0:
            for _ in range(3):
                b, v = (int(torch.randint(0, n, (), generator=g)) for n in (B, V))
                x[b, v] = (math.inf, -math.inf, math.nan, -0.0)[int(torch.randint(0, 4, (), generator=g))]
        if trial % 5 == 0:
            x[B - 1] = -math.inf
        idx, finite = cpu_ext.argmax_rows(x)
        assert idx.dtype == torch.int64 and finite.dtype == torch.bool
        assert torch.equal(idx, torch.max(x, dim=-1).indices), trial
        assert torch.equal(finite, torch.isfinite(x).all(dim=-1)), trial
    assert cpu_ext.argmax_rows(x.double()) is None  # not float32, not contiguous, no columns: not taken
    if B > 1 and V > 1:
        assert cpu_ext.argmax_rows(x.t()) is None
    assert cpu_ext.argmax_rows(torch.zeros(2, 0)) is None


@needs_ext
def test_greedy_sampling_takes_the_c_argmax(monkeypatch):
    """sample_step's greedy tokens and finite check come from the C argmax on CPU float32, and
    equal the torch path's (the C call switched off), logprobs included; NaN rows still raise."""
    from moerun import sampling
    from moerun.options import SamplingParams

    calls = []
    real = cpu_ext.argmax_rows
    monkeypatch.setattr(cpu_ext, "argmax_rows", lambda x: calls.append(x.shape) or real(x))
    x = torch.randn(6, 300)
    ps = [SamplingParams(max_new_tokens=4, temperature=0.0, logprobs=2 if b % 2 else None) for b in range(6)]
    got = sampling.sample_step(x, ps, [None] * 6)
    assert calls == [(6, 300)]
    monkeypatch.setattr(cpu_ext, "argmax_rows", lambda x: None)
    assert sampling.sample_step(x, ps, [None] * 6) == got
    assert [t for t, _, _ in got] == torch.max(x, dim=-1).indices.tolist()
    monkeypatch.setattr(cpu_ext, "argmax_rows", real)
    x[4, 7] = math.nan
    with pytest.raises(FloatingPointError, match=r"request\(s\) \[4\]"):
        sampling.sample_step(x, ps, [None] * 6)
