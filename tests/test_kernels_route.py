"""route: the Triton router kernels against reference_route and a float64 computation by hand.

    python -m pytest tests/test_kernels_route.py -q

Runs under the Triton interpreter when there is no GPU. Every mode of ``route``: softmax
(plain, renormalised, scaled), sigmoid with and without the correction bias, group-limited
(n_group 4 / 8 and one expert per group), top-k-then-softmax; float32 and bfloat16 logits.

Random logits: a row whose choice would hang on float32 rounding (two deciding scores
within 1e-5 relative: a near-tie, which float32 and float64 may order differently) is
drawn again; exact ties and their rule (the lower expert / group id) have their own test.
Shape legend: T = tokens, E = experts, K = top-k, G = groups.
"""
import importlib
import math

import pytest
import torch

from kernel_env import DEVICE, needs_triton

import moerun.kernels as K

NEAR_TIE = 1e-5  # relative gap below which a random row is drawn again


def _gap(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if math.isinf(a) or math.isinf(b):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def route_by_hand(row, k, scoring="softmax", renormalize=False, bias=None, num_groups=1,
                  topk_groups=None, scaling=1.0):
    """One token's route in Python floats (float64), ties to the lower id: (weights, ids,
    margin), margin the smallest relative gap between scores that decide the choice."""
    E = len(row)
    if scoring == "softmax":
        m = max(row)
        ex = [math.exp(v - m) for v in row]
        score = [v / sum(ex) for v in ex]
        choice = list(score)
    elif scoring == "sigmoid":
        score = [1 / (1 + math.exp(-v)) for v in row]
        choice = [s + (bias[e] if bias is not None else 0.0) for e, s in enumerate(score)]
    else:
        score, choice = list(row), list(row)
    margin = math.inf
    groups = num_groups if topk_groups is None else topk_groups
    if num_groups > 1 and groups < num_groups:
        per = E // num_groups
        gscore = [sum(sorted(choice[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(num_groups)]
        order = sorted(range(num_groups), key=lambda g: (-gscore[g], g))
        margin = min(_gap(gscore[a], gscore[b]) for a, b in zip(order[:groups], order[1:groups + 1]))
        kept = set(order[:groups])
        choice = [c if e // per in kept else -math.inf for e, c in enumerate(choice)]
    order = sorted(range(E), key=lambda e: (-choice[e], e))
    ids = order[:k]
    margin = min([margin] + [_gap(choice[a], choice[b]) for a, b in zip(order[:k], order[1:k + 1])])
    w = [score[e] for e in ids]
    if scoring == "topk_softmax":
        ex = [math.exp(v - w[0]) for v in w]
        w = [v / sum(ex) for v in ex]
    elif renormalize:
        total = sum(w) + (1e-20 if scoring == "sigmoid" else 0.0)
        w = [v / total for v in w]
    return [v * scaling for v in w], ids, margin


def by_hand(logits_TE, k, **opts):
    """route_by_hand over the rows: (weights_TK float64, ids_TK int64, margin_T)."""
    if "bias_E" in opts:
        opts["bias"] = opts.pop("bias_E")
    if opts.get("bias") is not None:
        opts["bias"] = opts["bias"].double().tolist()
    rows = [route_by_hand(r, k, **opts) for r in logits_TE.double().tolist()]
    T = len(rows)
    return (torch.tensor([r[0] for r in rows], dtype=torch.float64).reshape(T, k),
            torch.tensor([r[1] for r in rows], dtype=torch.int64).reshape(T, k),
            torch.tensor([r[2] for r in rows], dtype=torch.float64))


def draw_logits(T, E, k, dtype, **opts):
    """Fresh random logits [T, E] in dtype, rows with a near-tie drawn again."""
    logits_TE = (2 * torch.randn(T, E)).to(dtype)
    for _ in range(100):
        bad_T = by_hand(logits_TE, k, **opts)[2] < NEAR_TIE
        if not bad_T.any():
            return logits_TE.to(DEVICE)
        logits_TE[bad_T] = (2 * torch.randn(int(bad_T.sum()), E)).to(dtype)
    raise AssertionError("could not draw logits without near-ties")


def check_route(seed, logits_TE, k, **opts):
    w_TK, ids_TK = K.route(logits_TE, k, impl="triton", **opts)
    w_ref, ids_ref = K.reference_route(logits_TE, k, **opts)
    w64, ids64, _ = by_hand(logits_TE.cpu(), k, **{n: (v.cpu() if torch.is_tensor(v) else v)
                                                    for n, v in opts.items()})
    T = logits_TE.shape[0]
    assert w_TK.dtype == torch.float32 and ids_TK.dtype == torch.int32, f"seed={seed}"
    assert w_TK.shape == ids_TK.shape == (T, k), f"seed={seed}"
    assert torch.equal(ids_TK, ids_ref), f"triton ids != reference, seed={seed}"
    assert torch.equal(ids_TK.cpu().long(), ids64), f"triton ids != by hand, seed={seed}"
    torch.testing.assert_close(w_TK, w_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed={seed} {m}")
    torch.testing.assert_close(w_TK.cpu().double(), w64, rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"seed={seed} vs by hand: {m}")


MODES = {
    "softmax": dict(scoring="softmax"),
    "softmax_renorm_scaled": dict(scoring="softmax", renormalize=True, scaling=2.5),
    "sigmoid": dict(scoring="sigmoid"),
    "sigmoid_bias_renorm_scaled": dict(scoring="sigmoid", renormalize=True, scaling=2.5, bias_E="random"),
    "topk_softmax": dict(scoring="topk_softmax"),
}


def with_bias(opts, E):
    if opts.get("bias_E") == "random":
        return {**opts, "bias_E": (0.1 * torch.randn(E)).to(DEVICE)}
    return dict(opts)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (16, 4), (60, 4), (64, 8), (128, 1), (128, 8)])
def test_route_modes(seed, dtype, mode, T, E, k):
    opts = with_bias(MODES[mode], E)
    check_route(seed, draw_logits(T, E, k, dtype, **opts), k, **opts)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("T", [0, 1, 7, 33])
@pytest.mark.parametrize("E,k,n_group,topk_group", [
    (8, 2, 4, 2), (16, 4, 4, 1), (60, 4, 4, 2), (64, 8, 8, 4), (64, 4, 8, 1), (128, 8, 8, 4),
    (128, 1, 8, 3),
    (8, 2, 8, 3),     # one expert per group: a group's score is that expert's
    (64, 8, 4, 4),    # every group kept: the same as no groups
    (16, 4, 1, 1),    # n_group = 1
])
def test_route_group_limited(seed, dtype, renormalize, T, E, k, n_group, topk_group):
    opts = dict(scoring="sigmoid", renormalize=renormalize, scaling=2.5, num_groups=n_group,
                topk_groups=topk_group, bias_E=(0.1 * torch.randn(E)).to(DEVICE))
    check_route(seed, draw_logits(T, E, k, dtype, **opts), k, **opts)


@needs_triton
def test_route_strided_logits_and_float16_bias(seed):
    """Logits with a row stride wider than E and a float16 correction bias."""
    opts = dict(scoring="sigmoid", renormalize=True, num_groups=4, topk_groups=2,
                bias_E=(0.1 * torch.randn(16)).half().to(DEVICE))
    logits_TE = draw_logits(9, 24, 4, torch.float32)[:, 4:20]
    check_route(seed, logits_TE, 4, **opts)


@needs_triton
def test_route_hand_examples():
    """A few routes worked out by hand in float64, independent of any torch reference."""
    logits = [[0.5, -1.0, 2.0, 0.25, 1.5, -0.5, 0.0, 1.0]]
    bias = [0.0, 0.0, -0.3, 0.2, 0.0, 0.5, 0.1, -0.2]
    x = torch.tensor(logits, device=DEVICE)
    sig = [1 / (1 + math.exp(-v)) for v in logits[0]]
    # sigmoid + bias, 4 groups of 2, keep 2 groups, k = 3, renormalised, scaled by 2.
    choice = [s + b for s, b in zip(sig, bias)]
    gscore = [choice[2 * g] + choice[2 * g + 1] for g in range(4)]  # two experts: the sum
    kept = sorted(range(4), key=lambda g: -gscore[g])[:2]
    ids = sorted([e for e in range(8) if e // 2 in kept], key=lambda e: -choice[e])[:3]
    w = [2 * sig[e] / (sum(sig[i] for i in ids) + 1e-20) for e in ids]
    got_w, got_ids = K.route(x, 3, scoring="sigmoid", renormalize=True, scaling=2.0,
                             bias_E=torch.tensor(bias, device=DEVICE), num_groups=4, topk_groups=2,
                             impl="triton")
    assert got_ids.tolist() == [ids]
    torch.testing.assert_close(got_w.double().cpu(), torch.tensor([w], dtype=torch.float64), rtol=1e-6, atol=0)
    # top-k of the logits (2.0, 1.5), then a softmax over the two
    got_w, got_ids = K.route(x, 2, scoring="topk_softmax", impl="triton")
    assert got_ids.tolist() == [[2, 4]]
    e = math.exp(1.5 - 2.0)
    torch.testing.assert_close(got_w.double().cpu(), torch.tensor([[1 / (1 + e), e / (1 + e)]],
                                                                   dtype=torch.float64), rtol=1e-6, atol=0)
    # softmax over all 8, top-2 probabilities, times 1.5
    z = sum(math.exp(v) for v in logits[0])
    got_w, got_ids = K.route(x, 2, scoring="softmax", scaling=1.5, impl="triton")
    assert got_ids.tolist() == [[2, 4]]
    torch.testing.assert_close(got_w.double().cpu(), torch.tensor([[1.5 * math.exp(2.0) / z, 1.5 * math.exp(1.5) / z]],
                                                                   dtype=torch.float64), rtol=1e-6, atol=0)


@needs_triton
@pytest.mark.parametrize("opts", [
    dict(scoring="softmax"),
    dict(scoring="topk_softmax"),
    dict(scoring="sigmoid", renormalize=True),
    dict(scoring="sigmoid", num_groups=4, topk_groups=1),
    dict(scoring="sigmoid", num_groups=4, topk_groups=2),
], ids=["softmax", "topk_softmax", "sigmoid", "groups_keep1", "groups_keep2"])
def test_route_exact_ties_pick_lower_ids(opts):
    """Equal scores (and equal group scores): the kernel takes the lower expert and group
    ids, as the by-hand rule does. The reference uses torch.topk, whose order among equal
    scores is unspecified; its weights and the scores of what it chose are the same."""
    x = torch.zeros(4, 16)
    x[1, [3, 9, 12]] = 1.0       # three equal maxima in three groups
    x[2, [5, 6, 13, 14]] = 2.0   # groups 1 and 3 tie on their top-2 sums
    x[3, ::2] = -1.0
    x = x.to(DEVICE)
    w_TK, ids_TK = K.route(x, 3, impl="triton", **opts)
    w64, ids64, _ = by_hand(x.cpu(), 3, **opts)
    assert ids_TK.cpu().long().tolist() == ids64.tolist()
    torch.testing.assert_close(w_TK.cpu().double(), w64, rtol=1e-6, atol=1e-7)
    w_ref, ids_ref = K.reference_route(x, 3, **opts)
    torch.testing.assert_close(w_ref, w_TK, rtol=1e-6, atol=1e-7)
    if opts["scoring"] != "softmax":  # softmax: choice and weight are the same number
        score = torch.sigmoid(x) if opts["scoring"] == "sigmoid" else x
        torch.testing.assert_close(score.gather(1, ids_ref.long()), score.gather(1, ids_TK.long()))


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=needs_triton), "torch"])
def test_route_bad_input(impl):
    x = torch.randn(3, 8, device=DEVICE)
    cases = [
        (dict(k=2, scoring="tanh"), "scoring='tanh' is not one of"),
        (dict(k=9), "must be an int in"),
        (dict(k=2, bias_E=torch.zeros(8, device=DEVICE)), "only used with scoring='sigmoid'"),
        (dict(k=2, scoring="sigmoid", bias_E=torch.zeros(7, device=DEVICE)), r"bias_E must be \[E=8\]"),
        (dict(k=2, scoring="sigmoid", bias_E=torch.zeros(8, dtype=torch.int32, device=DEVICE)),
         "bias_E must be float32"),
        (dict(k=2, scoring="sigmoid", num_groups=3, topk_groups=1), "n_group=3 must divide"),
        (dict(k=2, scoring="sigmoid", num_groups=4, topk_groups=5), "topk_group=5 must be in"),
        (dict(k=4, scoring="sigmoid", num_groups=4, topk_groups=1), "raise topk_group"),
        (dict(k=2, num_groups=4, topk_groups=2), "needs scoring='sigmoid'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            K.route(x, impl=impl, **kwargs)
    with pytest.raises(ValueError, match="2-D"):
        K.route(x[0], 2, impl=impl)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        K.route(x.double(), 2, impl=impl)


@needs_triton
@pytest.mark.parametrize("mode", ["sigmoid_bias_renorm_scaled", "topk_softmax", "softmax_renorm_scaled"])
def test_route_runs_the_triton_kernel(seed, mode, monkeypatch):
    """Every mode takes the Triton path (impl="auto" on a GPU), not the torch reference."""
    router = importlib.import_module("moerun.kernels.router")

    def reference(*args, **kwargs):
        raise AssertionError("the torch reference ran")

    opts = with_bias(MODES[mode], 16)
    logits_TE = draw_logits(5, 16, 4, torch.float32, **opts)
    want = K.reference_route(logits_TE, 4, **opts)
    monkeypatch.setattr(router, "reference_route", reference)
    got = K.route(logits_TE, 4, impl="auto" if DEVICE == "cuda" else "triton", **opts)
    assert torch.equal(got[1], want[1]), f"seed={seed}"
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
