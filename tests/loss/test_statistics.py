"""The distribution-matching statistics beyond spatial attention, against written-out formulas:
the characteristic function (NCFM) and its drop-in loss, channel attention, channel moments.

Every implementation (``reference``, ``cpu`` = C++, ``triton``: under ``TRITON_INTERPRET=1`` on
CPU, compiled on a GPU) is checked for values and gradients, with shuffled labels, per-class and
shared frequencies, non-contiguous and channels_last inputs, odd shapes, and per dtype:

* float32: 1e-5 relative to the largest entry of the written-out value (computed in float64);
* float64: 1e-10;
* bfloat16 inputs (widened to float32 inside): the value to 1e-5 of the same widened input's
  formula; gradients come back in bfloat16, so within 2^-7 relative of their largest entry.
"""
import math

import pytest
import torch

import datadam_fast as dd
from datadam_fast.loss import backends as B
from datadam_fast.loss import reference as R
from conftest import assert_close_to_reference


def _impls():
    out = ["reference"]
    try:
        B.get_backend("cpu")
        out.append("cpu")
    except B.BackendUnavailable:  # pragma: no cover - depends on the toolchain
        pass
    try:
        be = B.get_backend("triton")
        if be.supports(torch.device("cpu")):
            out.append("triton")
    except B.BackendUnavailable:  # pragma: no cover
        pass
    return out


IMPLS = _impls()
if "cpu" not in IMPLS:  # pragma: no cover
    pytestmark = pytest.mark.skip("the C++ extension cannot be built here")
needs_triton = pytest.mark.skipif("triton" not in IMPLS, reason="triton kernels need TRITON_INTERPRET=1 on CPU")


# ------------------------------------------------------------------------------------------------
# the written-out NCFM loss (NCFM/NCFM.py: CFLossFunc x 300), per class, then summed
# ------------------------------------------------------------------------------------------------
def written_out_loss(real, syn, K, freqs, rl, sl, alpha=0.5, beta=0.5, weight=300.0, normalize=True):
    total = 0.0
    for k in range(K):
        r, s = real[rl == k].double(), syn[sl == k].double()
        if normalize:
            r = r / r.norm(dim=1, keepdim=True).clamp_min(1e-12)
            s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
        t = (freqs if freqs.dim() == 2 else freqs[k]).double()
        pr, ps = t @ r.t(), t @ s.t()                    # [F, n], as NCFM's torch.matmul(t, feat.t())
        r_re, r_im = pr.cos().mean(1), pr.sin().mean(1)
        s_re, s_im = ps.cos().mean(1), ps.sin().mean(1)
        r_n = torch.sqrt(r_re * r_re + r_im * r_im)
        s_n = torch.sqrt(s_re * s_re + s_im * s_im)
        amp = (r_n - s_n) ** 2
        pha = (2 * (r_n * s_n - s_re * r_re - s_im * r_im)).clamp(min=1e-12)
        total = total + weight * torch.sqrt(alpha * amp + beta * pha).mean()
    return total


def _problem(K=3, n_real=11, n_syn=4, D=24, F=37, per_class=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(K * n_real, D, generator=g).to(dtype)
    syn = torch.randn(K * n_syn, D, generator=g).to(dtype)
    freqs = torch.randn(*((K,) if per_class else ()), F, D, generator=g).to(dtype)
    rl = torch.arange(K).repeat_interleave(n_real)[torch.randperm(K * n_real, generator=g)]
    sl = torch.arange(K).repeat_interleave(n_syn)[torch.randperm(K * n_syn, generator=g)]
    return real, syn, freqs, rl, sl


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_class", [True, False])
def test_cf_matching_loss_equals_the_written_out_formula(impl, per_class):
    real, syn, freqs, rl, sl = _problem(per_class=per_class)
    syn = syn.requires_grad_(True)
    loss = dd.cf_matching_loss(real, syn, 3, freqs=freqs, real_labels=rl, syn_labels=sl, backend=impl)
    (g,) = torch.autograd.grad(loss, syn)
    s64 = syn.detach().double().requires_grad_(True)
    want = written_out_loss(real, s64, 3, freqs, rl, sl)
    (wg,) = torch.autograd.grad(want, s64)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert_close_to_reference(g, wg, 1e-5, f"{impl} d/dsyn")


@pytest.mark.parametrize("impl", IMPLS)
def test_cf_matching_loss_non_contiguous_inputs_and_other_weights(impl):
    real, syn, freqs, rl, sl = _problem(D=20)
    wide_r = torch.randn(real.shape[0], 40)
    wide_r[:, ::2] = real
    real_nc = wide_r[:, ::2]                           # every other column: not contiguous
    freqs_nc = freqs.transpose(1, 2).contiguous().transpose(1, 2)  # [K, F, D] view with D-major strides
    syn_nc = syn.t().contiguous().t().requires_grad_(True)
    assert not real_nc.is_contiguous() and not freqs_nc.is_contiguous() and not syn_nc.is_contiguous()
    kw = dict(alpha=0.8, beta=0.2, weight=7.0, normalize=False)
    loss = dd.cf_matching_loss(real_nc, syn_nc, 3, freqs=freqs_nc, real_labels=rl, syn_labels=sl, backend=impl,
                               **kw)
    (g,) = torch.autograd.grad(loss, syn_nc)
    s64 = syn.detach().double().requires_grad_(True)
    want = written_out_loss(real, s64, 3, freqs, rl, sl, **kw)
    (wg,) = torch.autograd.grad(want, s64)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item())
    assert_close_to_reference(g, wg, 1e-5, f"{impl} d/dsyn")


@pytest.mark.parametrize("impl", IMPLS)
def test_cf_matching_loss_class_major_rows_without_labels(impl):
    real, syn, freqs, _, _ = _problem()
    rl, sl = torch.arange(3).repeat_interleave(11), torch.arange(3).repeat_interleave(4)
    loss = dd.cf_matching_loss(real, syn, 3, freqs=freqs, backend=impl)
    assert abs(loss.item() - written_out_loss(real, syn, 3, freqs, rl, sl).item()) <= 1e-5 * loss.item()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_class", [True, False])
def test_cf_class_sums_values_and_both_gradients(impl, per_class):
    """The op's sums and its gradients in the embeddings and the frequencies (a sampling
    network's ascent step differentiates the frequencies) against autograd of the plain code."""
    emb, _, freqs, lab, _ = _problem(per_class=per_class, F=19)
    e = emb.clone().requires_grad_(True)
    t = freqs.clone().requires_grad_(True)
    c, s = dd.cf_class_sums(e, t, 3, lab, backend=impl)
    wc, ws = torch.randn_like(c), torch.randn_like(s)
    ge, gt = torch.autograd.grad((c * wc).sum() + (s * ws).sum(), (e, t))
    e2, t2 = emb.double().requires_grad_(True), freqs.double().requires_grad_(True)
    rc, rs = R.cf_class_sums(e2, t2, lab, 3)
    rge, rgt = torch.autograd.grad((rc * wc.double()).sum() + (rs * ws.double()).sum(), (e2, t2))
    for got, want, what in ((c, rc, "cos sums"), (s, rs, "sin sums"), (ge, rge, "d/de"), (gt, rgt, "d/dt")):
        assert_close_to_reference(got, want, 1e-5, f"{impl} {what}")
    assert ge.dtype == emb.dtype and gt.dtype == freqs.dtype


@pytest.mark.parametrize("impl", IMPLS)
def test_cf_float64_and_bfloat16(impl):
    emb, _, freqs, lab, _ = _problem(dtype=torch.float64)
    e = emb.clone().requires_grad_(True)
    c, s = dd.cf_class_sums(e, freqs, 3, lab, backend=impl)
    (ge,) = torch.autograd.grad(c.sum() + 2 * s.sum(), e)
    rc, rs = R.cf_class_sums(emb, freqs, lab, 3)
    e2 = emb.clone().requires_grad_(True)
    rc2, rs2 = R.cf_class_sums(e2, freqs, lab, 3)
    (rge,) = torch.autograd.grad(rc2.sum() + 2 * rs2.sum(), e2)
    assert c.dtype == torch.float64
    assert_close_to_reference(c, rc, 1e-10, "fp64 cos")
    assert_close_to_reference(ge, rge, 1e-10, "fp64 d/de")
    eb = emb.to(torch.bfloat16).requires_grad_(True)
    fb = freqs.to(torch.bfloat16)
    c, s = dd.cf_class_sums(eb, fb, 3, lab, backend=impl)
    (gb,) = torch.autograd.grad(c.sum() + 2 * s.sum(), eb)
    w = eb.detach().float().requires_grad_(True)
    rc, rs = R.cf_class_sums(w, fb.float(), lab, 3)
    (rgb,) = torch.autograd.grad(rc.sum() + 2 * rs.sum(), w)
    assert c.dtype == torch.float32 and gb.dtype == torch.bfloat16
    assert_close_to_reference(c, rc, 1e-5, "bf16 cos")
    assert_close_to_reference(gb, rgb, 2 ** -7, "bf16 d/de")


@pytest.mark.parametrize("impl", IMPLS)
def test_cf_odd_shapes_and_uneven_classes(impl):
    """F and D not multiples of any block, one class with a single row, one with many."""
    g = torch.Generator().manual_seed(7)
    lab = torch.tensor([2] * 41 + [0] + [1] * 3)[torch.randperm(45, generator=g)]
    emb = torch.randn(45, 33, generator=g)
    freqs = torch.randn(3, 5, 33, generator=g)
    c, s = dd.cf_class_sums(emb, freqs, 3, lab, backend=impl)
    rc, rs = R.cf_class_sums(emb, freqs, lab, 3)
    assert_close_to_reference(c, rc, 1e-5, "cos")
    assert_close_to_reference(s, rs, 1e-5, "sin")
    re, im = dd.characteristic_function(emb, freqs, 3, lab, backend=impl)
    counts = torch.bincount(lab, minlength=3).unsqueeze(1).float()
    assert_close_to_reference(re, rc / counts, 1e-5, "Re phi")
    assert_close_to_reference(im, rs / counts, 1e-5, "Im phi")


def test_saved_and_recomputed_projection_give_the_same_gradient():
    """The synthetic side keeps the projection for the backward, the real side recomputes it."""
    from datadam_fast.loss import characteristic as C
    emb, _, freqs, lab, _ = _problem()
    grads = []
    for limit in (C.SAVE_PROJECTION_MAX, 0):
        old, C.SAVE_PROJECTION_MAX = C.SAVE_PROJECTION_MAX, limit
        try:
            e = emb.clone().requires_grad_(True)
            c, s = dd.cf_class_sums(e, freqs, 3, lab, backend="cpu")
            grads.append(torch.autograd.grad(c.sum() - s.sum(), e)[0])
        finally:
            C.SAVE_PROJECTION_MAX = old
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_cpu_forward_allocates_no_projection_buffer():
    """The fused CPU forward works in row tiles: no allocation of N x F floats (the profiler's
    memory events), while the plain code allocates one."""
    N, D, F, K = 8192, 8, 1024, 4
    emb = torch.randn(N, D)
    freqs = torch.randn(K, F, D)
    lab = torch.arange(K).repeat_interleave(N // K)
    B.get_backend("cpu")

    def biggest(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)

    projection = N * F * 4
    with torch.no_grad():
        fused = biggest(lambda: dd.cf_class_sums(emb, freqs, K, lab, backend="cpu"))
        plain = biggest(lambda: R.cf_projection(emb, freqs, lab, K).cos())
    assert plain >= projection
    assert fused <= projection // 8, fused


def test_cf_errors_say_what_was_expected():
    real, syn, freqs, rl, sl = _problem()
    with pytest.raises(dd.UserError, match=r"\[F, D\] or \[K, F, D\]"):
        dd.cf_matching_loss(real, syn, 3, freqs=freqs[0, 0])
    with pytest.raises(dd.UserError, match="embedding width"):
        dd.cf_matching_loss(real, syn, 3, freqs=freqs[..., :5])
    with pytest.raises(dd.UserError, match="one \\[F, D\\] matrix per class"):
        dd.cf_matching_loss(real, syn, 3, freqs=freqs[:2])
    with pytest.raises(dd.UserError, match="cannot be split evenly"):
        dd.cf_matching_loss(real[:-1], syn, 3, freqs=freqs)
    with pytest.raises(dd.UserError, match="must lie in"):
        dd.cf_matching_loss(real, syn, 3, freqs=freqs, real_labels=rl + 1, syn_labels=sl)
    with pytest.raises(dd.UserError, match="alpha"):
        dd.cf_matching_loss(real, syn, 3, freqs=freqs, alpha=float("nan"))
    with pytest.raises(dd.UserError, match="unknown backend"):
        dd.cf_matching_loss(real, syn, 3, freqs=freqs, backend="gpu")


def test_cf_module_and_meta_shapes():
    real, syn, freqs, rl, sl = _problem()
    m = dd.CFMatchingLoss(3)
    assert abs(m(real, syn, freqs, rl, sl).item() - written_out_loss(real, syn, 3, freqs, rl, sl).item()) < 1e-3
    e = torch.empty(12, 24, device="meta")
    c, s, p = torch.ops.datadam_fast.cf_class_sums_fwd(e, torch.empty(3, 37, 24, device="meta"),
                                                       torch.zeros(12, dtype=torch.long, device="meta"), 3, True)
    assert c.shape == s.shape == (3, 37) and p.shape == (12, 37)


def _assert_opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_opcheck_statistics_ops(impl):
    emb, _, freqs, lab, _ = _problem(F=9, D=7)
    e = emb.requires_grad_(True)
    for save in (True, False):
        _assert_opcheck(torch.ops.datadam_fast.cf_class_sums_fwd.default, (e, freqs, lab, 3, save, impl))
    gc = torch.randn(3, 9)
    _assert_opcheck(torch.ops.datadam_fast.cf_class_sums_bwd.default,
                    (emb.detach(), freqs, lab, 3, gc, gc, emb.new_empty((0,)), True, True, impl))
    f = torch.randn(3, 4, 5, 6, requires_grad=True)
    _assert_opcheck(torch.ops.datadam_fast.channel_attention_fwd.default, (f, 2.5, impl))
    _assert_opcheck(torch.ops.datadam_fast.channel_moments_fwd.default, (f, impl))
    att, norms = torch.ops.datadam_fast.channel_attention_fwd(f.detach(), 4.0, impl)
    _assert_opcheck(torch.ops.datadam_fast.channel_attention_bwd.default,
                    (f.detach(), att, norms, torch.randn_like(att), 4.0, impl))
    _assert_opcheck(torch.ops.datadam_fast.channel_moments_bwd.default,
                    (f.detach(), torch.randn(3, 4), torch.randn(3, 4), impl))


def test_native_cpu_ops_opcheck():
    emb, _, freqs, lab, _ = _problem(F=9, D=7)
    _assert_opcheck(torch.ops.datadam_fast.cpu_cf_class_sums.default, (emb, freqs, lab, 3, False))
    _assert_opcheck(torch.ops.datadam_fast.cpu_channel_moments.default, (torch.randn(2, 3, 4, 5),))


def test_compile_fullgraph_has_no_graph_break():
    real, syn, freqs, rl, sl = _problem()
    f = torch.randn(6, 4, 5, 5)

    def fn(r, s, t, x):
        return (dd.cf_matching_loss(r, s, 3, freqs=t, real_labels=rl, syn_labels=sl, backend="cpu")
                + dd.channel_attention(x, power=4.0, backend="cpu").sum()
                + dd.channel_moments(x, backend="cpu")[1].sum())

    explain = torch._dynamo.explain(fn)(real, syn.clone().requires_grad_(), freqs, f.clone().requires_grad_())
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    s1, s2 = syn.clone().requires_grad_(), syn.clone().requires_grad_()
    a, b = compiled(real, s1, freqs, f), fn(real, s2, freqs, f)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(s1.grad, s2.grad)


# ------------------------------------------------------------------------------------------------
# channel attention and channel moments
# ------------------------------------------------------------------------------------------------
def _layouts(dtype):
    g = torch.Generator().manual_seed(11)
    f = torch.randn(5, 7, 9, 6, generator=g).to(dtype)             # odd C and H*W
    wide = torch.randn(5, 10, 9, 6, generator=g).to(dtype)
    return {"nchw": f, "channels_last": f.to(memory_format=torch.channels_last),
            "channel_slice": wide[:, 3:], "strided": torch.randn(5, 7, 9, 12, generator=g).to(dtype)[..., ::2]}


def _tol(dtype):
    return {torch.float32: (1e-5, 1e-5), torch.float64: (1e-10, 1e-10), torch.bfloat16: (1e-5, 2 ** -7)}[dtype]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("power", [1.0, 2.0, 4.0, 2.5])
def test_channel_attention_against_the_formula(impl, dtype, power):
    vtol, gtol = _tol(dtype)
    for name, f in _layouts(dtype).items():
        x = f.clone().requires_grad_(True) if f.is_contiguous() else f.detach().requires_grad_(True)
        a = dd.channel_attention(x, power=power, backend=impl)
        w = torch.randn(a.shape, generator=torch.Generator().manual_seed(2), dtype=a.dtype)
        (g,) = torch.autograd.grad((a * w).sum(), x)
        # written out: s_c = sum_hw |f|^p, normalised over channels, in float64
        x64 = f.detach().double().requires_grad_(True)
        s = x64.abs().pow(power).sum(dim=(2, 3))
        want = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
        (wg,) = torch.autograd.grad((want * w.double()).sum(), x64)
        assert a.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close_to_reference(a, want, vtol, f"{impl} {name} attention")
        assert_close_to_reference(g, wg, gtol, f"{impl} {name} d/df")
        assert g.dtype == dtype
        fmt = torch.channels_last if name == "channels_last" else torch.contiguous_format
        assert g.is_contiguous(memory_format=fmt), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_channel_moments_against_the_formula(impl, dtype):
    vtol, gtol = _tol(dtype)
    for name, f in _layouts(dtype).items():
        x = f.detach().requires_grad_(True)
        m1, m2 = dd.channel_moments(x, backend=impl)
        w1 = torch.randn(m1.shape, generator=torch.Generator().manual_seed(3), dtype=m1.dtype)
        w2 = torch.randn(m1.shape, generator=torch.Generator().manual_seed(4), dtype=m1.dtype)
        (g,) = torch.autograd.grad((m1 * w1).sum() + (m2 * w2).sum(), x)
        x64 = f.detach().double().requires_grad_(True)
        r1, r2 = x64.mean(dim=(2, 3)), (x64 * x64).mean(dim=(2, 3))
        (wg,) = torch.autograd.grad((r1 * w1.double()).sum() + (r2 * w2.double()).sum(), x64)
        assert_close_to_reference(m1, r1, vtol, f"{impl} {name} mean")
        assert_close_to_reference(m2, r2, vtol, f"{impl} {name} mean of squares")
        assert_close_to_reference(g, wg, gtol, f"{impl} {name} d/df")


@pytest.mark.parametrize("impl", IMPLS)
def test_class_channel_moments_are_per_class_mean_and_variance(impl):
    g = torch.Generator().manual_seed(5)
    f = torch.randn(12, 4, 3, 5, generator=g)
    lab = torch.arange(3).repeat_interleave(4)[torch.randperm(12, generator=g)]
    mean, var = dd.class_channel_moments(f, 3, lab, backend=impl)
    for k in range(3):
        x = f[lab == k].double().transpose(0, 1).reshape(4, -1)   # [C, samples * pixels]
        torch.testing.assert_close(mean[k].double(), x.mean(1), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(var[k].double(), x.var(1, unbiased=False), rtol=1e-4, atol=1e-6)


def test_zero_feature_map_gives_zero_attention_not_nan():
    for impl in IMPLS:
        a = dd.channel_attention(torch.zeros(2, 3, 4, 4), backend=impl)
        assert torch.equal(a, torch.zeros(2, 3)), impl
    assert not math.isnan(dd.channel_moments(torch.zeros(1, 2, 3, 3))[1].sum().item())
