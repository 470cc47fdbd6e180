"""Public loss API on the reference backend: formula, gradients, validation errors, module form."""
import math

import pytest
import torch

import datadam_fast as dd
from datadam_fast import reference as R


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
    from datadam_fast import backends
    real, syn, re, se = _make()
    monkeypatch.setitem(backends._FACTORIES, "cpu", lambda: (_ for _ in ()).throw(backends.BackendUnavailable("no compiler")))
    monkeypatch.setattr(backends, "_CACHE", {})
    monkeypatch.setattr(backends, "_FAILED", {})
    monkeypatch.setattr(backends, "_WARNED", set())
    with pytest.raises(dd.BackendUnavailable, match="no compiler"):
        dd.attention_matching_loss(real, syn, re, se, num_classes=3, backend="cpu")
    monkeypatch.setattr(backends, "_FAILED", {})
    with pytest.warns(RuntimeWarning, match="falling back to the reference backend"):
        a = dd.attention_matching_loss(real, syn, re, se, num_classes=3, backend="auto")
    b = dd.attention_matching_loss(real, syn, re, se, num_classes=3, backend="reference")
    assert torch.equal(a, b)
