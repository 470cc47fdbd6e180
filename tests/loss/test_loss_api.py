"""Public loss API on the reference backend: formula, gradients, validation errors, module form."""
import math

import pytest
import torch

from datadam_fast.errors import KERNEL_FAILURES

import datadam_fast as dd
from datadam_fast.loss import reference as R


def _official_loss(real, syn, re, se, K, p, aw=100.0, ew=1.0):
    """The official code's arithmetic written independently (get_attention + MSE_B, summed)."""
    total = 0.0
    for r, s in zip(real, syn):
        def att(f):
            a = f.double().abs().pow(p).sum(1).reshape(f.shape[0], -1)
            return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
        ar, as_ = att(r), att(s)
        for k in range(K):
            mr = ar[k * (r.shape[0] // K):(k + 1) * (r.shape[0] // K)].mean(0)
            ms = as_[k * (s.shape[0] // K):(k + 1) * (s.shape[0] // K)].mean(0)
            total += aw * float(((mr - ms) ** 2).sum().detach())
    if se is not None:
        for k in range(K):
            br, bs = re.shape[0] // K, se.shape[0] // K
            total += ew * float(((re[k * br:(k + 1) * br].double().mean(0) - se[k * bs:(k + 1) * bs].double().mean(0)) ** 2).sum().detach())
    return total


def _make(K=3, Br=4, Bs=2, shapes=((5, 7, 7), (4, 3, 5)), D=6, dtype=torch.float32, relu=True):
    real = [torch.randn(K * Br, *s, dtype=dtype) for s in shapes]
    syn = [torch.randn(K * Bs, *s, dtype=dtype) for s in shapes]
    if relu:
        real = [r.relu() for r in real]
        syn = [s.relu() for s in syn]
    syn = [s.requires_grad_() for s in syn]
    re = torch.randn(K * Br, D, dtype=dtype)
    se = torch.randn(K * Bs, D, dtype=dtype, requires_grad=True)
    return real, syn, re, se


@pytest.mark.parametrize("p", [1.0, 2.0, 4.0, 2.5])
def test_loss_matches_official_arithmetic(p):
    real, syn, re, se = _make()
    loss = dd.attention_matching_loss(real, syn, re, se, num_classes=3, power=p, backend="reference")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    expect = _official_loss(real, syn, re, se, 3, p)
    assert math.isclose(loss.item(), expect, rel_tol=1e-5)
    ref = R.attention_matching_loss(real, syn, re, se, num_classes=3, power=p)
    assert torch.allclose(loss, ref, rtol=1e-6)


def test_weights_and_no_embedding():
    real, syn, re, se = _make()
    a = dd.attention_matching_loss(real, syn, num_classes=3, backend="reference")
    b = dd.attention_matching_loss(real, syn, num_classes=3, attention_weight=1.0, backend="reference")
    assert torch.allclose(a, 100 * b, rtol=1e-6)
    e = dd.attention_matching_loss([], [], re, se, num_classes=3, backend="reference")
    full = dd.attention_matching_loss(real, syn, re, se, num_classes=3, embedding_weight=2.0, backend="reference")
    assert torch.allclose(full, a + 2 * e, rtol=1e-5)


def test_gradcheck_reference_float64():
    real, syn, re, se = _make(dtype=torch.float64)
    f = lambda a, b, c: 0.7 * dd.attention_matching_loss(real, [a, b], re, c, num_classes=3, power=2.5,
                                                         backend="reference")
    assert torch.autograd.gradcheck(f, (syn[0], syn[1], se))


def test_spatial_attention_gradcheck_reference():
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 20, dtype=torch.float64)
    for p in (1.0, 2.0, 4.0, 2.5):
        assert torch.autograd.gradcheck(
            lambda t: (dd.spatial_attention([t], power=p, backend="reference")[0] * w).sum(), (x,))


def test_closed_form_backward_equals_autograd():
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 30, dtype=torch.float64)
    for p in (1.0, 2.0, 2.5, 4.0):
        m = R.spatial_attention(x, p)
        (auto,) = torch.autograd.grad(m, x, g)
        a = x.detach().abs().pow(p).sum(1).flatten(1)
        closed = R.spatial_attention_backward(x.detach(), m.detach(), a.norm(dim=1), g, p)
        assert torch.allclose(auto, closed, atol=1e-12)


def test_zero_map_gradient_is_finite():
    x = torch.zeros(2, 3, 4, 4, requires_grad=True)
    real = [torch.rand(2, 3, 4, 4)]
    loss = dd.attention_matching_loss(real, [x], num_classes=2, backend="reference")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_real_side_gets_no_gradient():
    real, syn, re, se = _make()
    real = [r.requires_grad_() for r in real]
    re.requires_grad_()
    loss = dd.attention_matching_loss(real, syn, re, se, num_classes=3, backend="reference")
    loss.backward()
    assert all(r.grad is None for r in real) and re.grad is None
    assert all(s.grad is not None for s in syn) and se.grad is not None


def test_module_form():
    real, syn, re, se = _make()
    mod = dd.AttentionMatchingLoss(num_classes=3, power=2.0, backend="reference")
    assert "power=2.0" in repr(mod)
    a = mod(real, syn, re, se)
    b = dd.attention_matching_loss(real, syn, re, se, num_classes=3, power=2.0, backend="reference")
    assert torch.equal(a, b)


def test_nan_propagates():
    real, syn, re, se = _make()
    with torch.no_grad():
        syn[0][0, 0, 0, 0] = float("nan")
    loss = dd.attention_matching_loss(real, syn, re, se, num_classes=3, backend="reference")
    assert torch.isnan(loss)


@pytest.mark.parametrize("case,exc,match", [
    ("layers", ValueError, "real has 2 layers but synthetic has 1"),
    ("divisible", ValueError, "not divisible by num_classes=3"),
    ("channels", ValueError, "layer 0: real features"),
    ("emb_width", ValueError, "embedding width mismatch"),
    ("int_dtype", TypeError, "floating tensor"),
    ("empty", ValueError, "empty tensor"),
    ("power", ValueError, "power must be a finite float >= 1"),
    ("ndim", ValueError, r"expected a 4-d tensor \[N, C, H, W\]"),
    ("emb_missing", ValueError, "syn_emb given without real_emb"),
    ("classes", ValueError, "num_classes must be a positive int"),
    ("backend", ValueError, "unknown backend"),
])
def test_bad_input_errors(case, exc, match):
    real, syn, re, se = _make()
    kw = dict(num_classes=3, backend="reference")
    args = [real, syn, re, se]
    if case == "layers":
        args[1] = syn[:1]
    elif case == "divisible":
        args[0] = [torch.rand(7, 5, 7, 7), real[1]]
    elif case == "channels":
        args[1] = [torch.rand(6, 2, 7, 7), syn[1]]
    elif case == "emb_width":
        args[3] = torch.rand(6, 5)
    elif case == "int_dtype":
        args[0] = [torch.ones(12, 5, 7, 7, dtype=torch.int64), real[1]]
    elif case == "empty":
        args[1] = [torch.rand(0, 5, 7, 7), syn[1]]
    elif case == "power":
        kw["power"] = 0.5
    elif case == "ndim":
        args[1] = [torch.rand(6, 5, 49), syn[1]]
    elif case == "emb_missing":
        args[2] = None
    elif case == "classes":
        kw["num_classes"] = 0
    elif case == "backend":
        kw["backend"] = "nope"
    with pytest.raises(exc, match=match):
        dd.attention_matching_loss(*args, **kw)


def test_mixed_devices_error():
    real, syn, re, se = _make()
    meta = [torch.empty(6, 5, 7, 7, device="meta"), syn[1]]
    with pytest.raises(ValueError, match="different devices"):
        dd.attention_matching_loss(real, meta, re, se, num_classes=3, backend="reference")


def test_explicit_unavailable_backend_raises_and_auto_falls_back(monkeypatch):
    from datadam_fast.loss import backends
    real, syn, re, se = _make()
    monkeypatch.setitem(backends._FACTORIES, "cpu", lambda: (_ for _ in ()).throw(backends.BackendUnavailable("no compiler")))
    monkeypatch.setattr(backends, "_CACHE", {})
    monkeypatch.setattr(backends, "_FAILED", {})
    monkeypatch.setattr(KERNEL_FAILURES, "warned", set())
    with pytest.raises(dd.BackendUnavailable, match="no compiler"):
        dd.attention_matching_loss(real, syn, re, se, num_classes=3, backend="cpu")
    monkeypatch.setattr(backends, "_FAILED", {})
    with pytest.warns(RuntimeWarning, match="falling back to the reference backend"):
        a = dd.attention_matching_loss(real, syn, re, se, num_classes=3, backend="auto")
    b = dd.attention_matching_loss(real, syn, re, se, num_classes=3, backend="reference")
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# labels, return_terms, layer weights, skipping
# ------------------------------------------------------------------------------------------------
def _per_class_official(real, syn, re, se, rl, sl, K, p, aw=100.0, ew=1.0, lw=None):
    """Independent per-class loop over boolean masks (any order, any counts), in float64."""
    def att(f):
        a = f.detach().double().abs().pow(p).sum(1).reshape(f.shape[0], -1)
        return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    total = 0.0
    re, se = re.detach(), se.detach()
    for i, (r, s) in enumerate(zip(real, syn)):
        ar, as_ = att(r), att(s)
        w = 1.0 if lw is None else lw[i]
        for k in range(K):
            total += aw * w * float(((ar[rl == k].mean(0) - as_[sl == k].mean(0)) ** 2).sum())
    for k in range(K):
        total += ew * float(((re[rl == k].double().mean(0) - se[sl == k].double().mean(0)) ** 2).sum())
    return total


def test_labels_any_order_any_counts_match_official():
    K = 3
    real, syn, re, se = _make(K=K, Br=4, Bs=2)
    rl = torch.tensor([2, 0, 1, 1, 0, 2, 2, 2, 1, 0, 0, 2])          # counts 4, 3, 5
    sl = torch.tensor([1, 2, 0, 0, 1, 2])
    loss = dd.attention_matching_loss(real, syn, re, se, num_classes=K, real_labels=rl, syn_labels=sl,
                                      backend="reference")
    assert math.isclose(loss.item(), _per_class_official(real, syn, re, se, rl, sl, K, 4.0), rel_tol=1e-5)
    ref = R.attention_matching_loss(real, syn, re, se, num_classes=K, real_labels=rl, syn_labels=sl)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


def test_labels_in_class_major_order_equal_no_labels():
    K = 3
    real, syn, re, se = _make(K=K)
    rl = torch.arange(K).repeat_interleave(4)
    sl = torch.arange(K).repeat_interleave(2)
    a = dd.attention_matching_loss(real, syn, re, se, num_classes=K, backend="reference")
    perm = torch.randperm(12)
    b = dd.attention_matching_loss([r[perm] for r in real], syn, re[perm], se, num_classes=K,
                                   real_labels=rl[perm], syn_labels=sl, backend="reference")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a, syn + [se])
    gb = torch.autograd.grad(b, syn + [se])
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_return_terms_and_layer_weights():
    real, syn, re, se = _make()
    loss, terms = dd.attention_matching_loss(real, syn, re, se, num_classes=3, backend="reference",
                                             layer_weights=[2.0, 0.5], return_terms=True)
    assert set(terms) == {"attention_layers", "attention", "embedding"}
    torch.testing.assert_close(loss, terms["attention"] + terms["embedding"])
    torch.testing.assert_close(terms["attention"], terms["attention_layers"][0] + terms["attention_layers"][1])
    single = [dd.attention_matching_loss([r], [s], num_classes=3, backend="reference") for r, s in zip(real, syn)]
    torch.testing.assert_close(terms["attention_layers"][0], 2.0 * single[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(terms["attention_layers"][1], 0.5 * single[1], rtol=1e-6, atol=0)
    emb_only = dd.attention_matching_loss([], [], re, se, num_classes=3, backend="reference")
    torch.testing.assert_close(terms["embedding"], emb_only)
    expect = _per_class_official(real, syn, re, se, torch.arange(3).repeat_interleave(4),
                                 torch.arange(3).repeat_interleave(2), 3, 4.0, lw=[2.0, 0.5])
    assert math.isclose(loss.item(), expect, rel_tol=1e-5)
    with pytest.raises(ValueError, match="layer_weights has 1 entries but there are 2 attention layers"):
        dd.attention_matching_loss(real, syn, re, se, num_classes=3, layer_weights=[1.0])


def test_zero_attention_weight_skips_the_kernel(monkeypatch):
    from datadam_fast.loss import backends
    calls = []
    orig = backends.ReferenceBackend.forward
    monkeypatch.setattr(backends.ReferenceBackend, "forward",
                        lambda self, feats, power: calls.append(len(feats)) or orig(self, feats, power))
    real, syn, re, se = _make()
    loss, terms = dd.attention_matching_loss(real, syn, re, se, num_classes=3, attention_weight=0.0,
                                             backend="reference", return_terms=True)
    assert calls == []
    assert terms["attention"].item() == 0.0 and loss.item() == terms["embedding"].item() > 0
    dd.attention_matching_loss(real, syn, re, se, num_classes=3, layer_weights=[0.0, 1.0], backend="reference")
    assert calls == [1, 1]                     # real and synthetic side: only the weighted layer
    dd.attention_matching_loss(real, syn, re, se, num_classes=3, backend="reference")
    assert calls == [1, 1, 2, 2]


@pytest.mark.parametrize("case,exc,match", [
    ("uneven", ValueError, "batch 7 is not divisible by num_classes=3"),
    ("rows_differ", ValueError, "synthetic embedding has 9 rows but synthetic layer 0 has 6"),
    ("label_len", ValueError, "real_labels has 11 entries but the real features have 12 rows"),
    ("label_range", ValueError, r"syn_labels must lie in \[0, 3\), got values in \[0, 3\]"),
    ("label_missing", ValueError, r"syn_labels: classes \[2\] have no rows"),
    ("label_float", TypeError, "expected a 1-d integer tensor of class indices"),
    ("targets_and_labels", ValueError, "real_labels must be None when real targets"),
])
def test_row_and_label_errors(case, exc, match):
    real, syn, re, se = _make()
    kw = dict(num_classes=3, backend="reference")
    args = [real, syn, re, se]
    if case == "uneven":
        args[1] = [torch.rand(7, 5, 7, 7), torch.rand(7, 4, 3, 5)]
        args[3] = torch.rand(7, 6)
    elif case == "rows_differ":
        args[3] = torch.rand(9, 6)
    elif case == "label_len":
        kw["real_labels"] = torch.zeros(11, dtype=torch.long)
    elif case == "label_range":
        kw["syn_labels"] = torch.tensor([0, 1, 2, 3, 0, 1])
    elif case == "label_missing":
        kw["syn_labels"] = torch.tensor([0, 1, 0, 1, 0, 1])
    elif case == "label_float":
        kw["syn_labels"] = torch.zeros(6)
    elif case == "targets_and_labels":
        acc = dd.ClassMeanAccumulator(3, backend="reference")
        acc.update(real, re, labels=torch.arange(3).repeat_interleave(4))
        args[0], args[2] = acc.targets(), None
        kw["real_labels"] = torch.arange(3).repeat_interleave(4)
    with pytest.raises(exc, match=match):
        dd.attention_matching_loss(*args, **kw)


def test_uneven_rows_are_fine_with_labels():
    real = [torch.rand(7, 5, 7, 7)]
    syn = [torch.rand(5, 5, 7, 7, requires_grad=True)]
    rl, sl = torch.tensor([0, 1, 2, 0, 0, 1, 2]), torch.tensor([2, 2, 1, 0, 2])
    loss = dd.attention_matching_loss(real, syn, num_classes=3, real_labels=rl, syn_labels=sl, backend="reference")
    expect = _per_class_official(real, syn, torch.zeros(7, 1), torch.zeros(5, 1), rl, sl, 3, 4.0)
    assert math.isclose(loss.item(), expect, rel_tol=1e-5)
