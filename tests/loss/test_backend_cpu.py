"""The fused C++ CPU backend (``backend="cpu"``) against the PyTorch reference.

Skipped as a whole only when the extension cannot be built here (no C++ compiler ...).
"""
from __future__ import annotations


import pytest
import torch

import datadam_fast
from datadam_fast.loss import reference
from datadam_fast.loss.backends import BackendUnavailable, ReferenceBackend, get_backend
from conftest import assert_close_to_reference


@pytest.fixture(scope="module")
def cpu():
    try:
        return get_backend("cpu")
    except BackendUnavailable as e:  # pragma: no cover - depends on the toolchain
        pytest.skip(f"cpu extension cannot be built here: {e}")


REF = ReferenceBackend()
LOW = (torch.bfloat16, torch.float16)


def _feat(shape, dtype=torch.float32, layout="contiguous", dist="randn", seed=0):
    """A feature map with the requested memory layout (values drawn in float32, then cast)."""
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    if layout == "transposed":  # [N, C, H, W] view of a [N, H, C, W] tensor: neither layout
        base = torch.randn(N, H, C, W, generator=g)
        x = base.transpose(1, 2)
    elif layout == "sliced":  # every other channel of a wider tensor
        x = torch.randn(N, 2 * C, H, W, generator=g)[:, ::2]
    else:
        x = torch.randn(N, C, H, W, generator=g)
    if dist == "relu":
        x = x.relu()
    x = x.to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "contiguous":
        x = x.contiguous()
    return x


def _assert_close(actual, expected, rtol, atol_rel=None, what=""):
    """Elementwise ``rtol`` plus an absolute slack of ``atol_rel`` (default ``rtol``) times the largest reference value."""
    assert_close_to_reference(actual, expected, atol_rel if atol_rel is not None else rtol, what,
                              elementwise_rtol=rtol)


def _tols(dtype):
    """(maps rtol, grad rtol) per input dtype.

    Maps are float32 for every low-precision input and are compared with the reference computed
    from the same low-precision values upcast, so they agree to float32 rounding. Gradients are
    rounded to the input dtype: one rounding step of the same float32 value may differ by 1 ulp
    (bf16: 2^-8, fp16: 2^-11 relative).
    """
    return {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5),
            torch.bfloat16: (1e-5, 8e-3), torch.float16: (1e-5, 1e-3)}[dtype]


def _check_backend(cpu, feats, power, seed=1):
    maps, norms = cpu.forward(feats, power)
    rmaps, rnorms = REF.forward(feats, power)
    g = torch.Generator().manual_seed(seed)
    gms = [torch.randn(m.shape, generator=g, dtype=m.dtype) for m in rmaps]
    grads = cpu.backward(feats, maps, norms, gms, power)
    rgrads = REF.backward(feats, rmaps, rnorms, gms, power)
    for i, f in enumerate(feats):
        mt, gt = _tols(f.dtype)
        acc = torch.float64 if f.dtype == torch.float64 else torch.float32
        N, C, H, W = f.shape
        assert maps[i].dtype == acc and norms[i].dtype == acc
        assert maps[i].shape == (N, H * W) and maps[i].is_contiguous()
        assert norms[i].shape == (N,)
        _assert_close(maps[i], rmaps[i], mt, what=f"layer {i} maps")
        _assert_close(norms[i], rnorms[i], mt, what=f"layer {i} norms")
        assert grads[i].shape == f.shape and grads[i].dtype == f.dtype
        if f.is_contiguous(memory_format=torch.channels_last) and not f.is_contiguous():
            assert grads[i].is_contiguous(memory_format=torch.channels_last)
        else:
            assert grads[i].is_contiguous()
        _assert_close(grads[i], rgrads[i], gt, what=f"layer {i} grads")
        if f.dtype in LOW:  # against the unrounded float32 reference gradient as well
            exact = reference.spatial_attention_backward(f.float(), rmaps[i], rnorms[i], gms[i], power)
            _assert_close(grads[i], exact, gt, what=f"layer {i} grads vs float32")
    return maps, norms, grads


def test_backend_registration(cpu):
    assert cpu.name == "cpu"
    assert cpu.supports(torch.device("cpu"))
    assert not cpu.supports(torch.device("meta"))
    assert not cpu.supports(torch.device("cuda", 0))
    assert "cpu" in datadam_fast.available_backends(torch.device("cpu"))


@pytest.mark.parametrize("power", [1.0, 2.0, 4.0, 2.5, 3.0, 2.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_reference_dtypes_powers(cpu, dtype, power):
    feats = [_feat((6, 5, 7, 5), dtype, seed=1),                         # HW=35: vector tails
             _feat((4, 16, 8, 8), dtype, "channels_last", seed=2),
             _feat((2, 1, 3, 3), dtype, seed=3)]                         # C=1
    _check_backend(cpu, feats, power)


@pytest.mark.parametrize("power", [2.3, 1.7, 1.01, 6.0, 3.5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_general_power_wide_magnitudes(cpu, power, layout):
    # non-special p uses a vectorised exp(p log|f|); check it over many orders of magnitude
    g = torch.Generator().manual_seed(int(power * 100))
    mag = 10.0 ** (torch.rand(6, 9, 7, 6, generator=g) * 8 - 6)          # 1e-6 .. 1e2
    sign = torch.where(torch.rand(6, 9, 7, 6, generator=g) < 0.5, -1.0, 1.0)
    f = (mag * sign).float()
    f[0, 0, 0, :3] = torch.tensor([0.0, -0.0, 1e-40])                    # zeros and a subnormal
    if layout == "channels_last":
        f = f.contiguous(memory_format=torch.channels_last)
    _check_backend(cpu, [f], power)
    _check_backend(cpu, [f.double()], power)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 7, 5), (3, 17, 5, 3), (5, 33, 4, 4), (2, 8, 1, 9),
                                   (8, 5, 50, 45)])  # H*W > the 2048-pixel chunk
def test_shapes_and_layouts(cpu, shape, layout):
    for power in (4.0, 1.0):
        _check_backend(cpu, [_feat(shape, torch.float32, layout, seed=sum(shape))], power)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_layers_mixed_layouts(cpu, dtype):
    feats = [_feat((8, 12, 16, 16), dtype, "contiguous", "relu", seed=4),
             _feat((8, 24, 8, 8), dtype, "channels_last", "relu", seed=5),
             _feat((8, 48, 4, 4), dtype, "sliced", seed=6),
             _feat((8, 7, 3, 5), dtype, "transposed", seed=7)]
    _check_backend(cpu, feats, 4.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_single_sample_large_map_is_split(cpu, layout):
    # N=1 with a large map: the H*W range is cut into blocks and normalised in a second pass.
    _check_backend(cpu, [_feat((1, 6, 96, 80), torch.float32, layout, "relu", seed=8)], 4.0)
    _check_backend(cpu, [_feat((2, 3, 64, 64), torch.float64, layout, seed=9)], 2.5)


@pytest.mark.parametrize("threads", [1, 3])
def test_split_and_whole_layers_in_one_call(cpu, threads):
    # one call mixes layers cut into pixel blocks (N small) with whole-sample layers and dtypes;
    # the units of all layers are shared out in one parallel region
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        feats = [_feat((1, 4, 64, 64), torch.float32, "contiguous", "relu", seed=15),
                 _feat((16, 8, 8, 8), torch.float32, "channels_last", seed=16),
                 _feat((2, 3, 40, 40), torch.float64, "channels_last", seed=17),
                 _feat((3, 5, 33, 31), torch.bfloat16, "contiguous", seed=18)]
        _check_backend(cpu, feats, 4.0)
        _check_backend(cpu, feats[::-1], 2.3)
    finally:
        torch.set_num_threads(old)


def test_large_gradient_buffer(cpu):
    # > 8 MiB gradient: exercises the huge-page advice on the output buffer
    f = _feat((4, 64, 96, 96), torch.float32, "contiguous", "relu", seed=10)
    _check_backend(cpu, [f], 4.0)


@pytest.mark.parametrize("power", [1.0, 4.0, 2.5])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_zero_maps_take_the_eps_branch(cpu, power, layout):
    f = _feat((4, 3, 5, 5), torch.float32, layout, seed=11)
    f[1].zero_()
    f[3].zero_()
    maps, norms, grads = _check_backend(cpu, [f], power)
    assert torch.all(maps[0][1] == 0) and norms[0][1] == 0
    assert torch.all(grads[0][1] == 0) and torch.all(grads[0][3] == 0)  # |f|^(p-1) sign(f) = 0 at 0
    # a tiny (but non-zero) map: the grad is g / eps times the local derivative
    t = torch.full((1, 2, 2, 2), 1e-20, dtype=torch.float64)
    _check_backend(cpu, [t], power)


@pytest.mark.parametrize("power", [1.0, 4.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_non_finite_inputs_propagate(cpu, dtype, power):
    f = _feat((3, 4, 5, 5), dtype, seed=12)
    f[0, 2, 1, 3] = float("nan")
    f[2, 1, 0, 0] = float("inf")
    maps, norms = cpu.forward([f], power)
    assert torch.isnan(maps[0][0]).all() and torch.isnan(norms[0][0])
    assert torch.isfinite(maps[0][1]).all() and torch.isfinite(norms[0][1])
    assert not torch.isfinite(maps[0][2]).all()
    rmaps, rnorms = REF.forward([f], power)
    _assert_close(maps[0], rmaps[0], 1e-5, what="maps")
    gm = [torch.randn_like(maps[0])]
    grads = cpu.backward([f], maps, norms, gm, power)
    rgrads = REF.backward([f], rmaps, rnorms, gm, power)
    # as in the reference, a NaN norm fails `n > eps` and takes the g / eps branch; the NaN element
    # itself gets |NaN|^(p-1) = NaN (for p == 1, torch.sign(NaN) == 0)
    if power != 1.0:
        assert torch.isnan(grads[0][0, 2, 1, 3])
    assert torch.isfinite(grads[0][1]).all()
    _assert_close(grads[0], rgrads[0], _tols(dtype)[1], what="grads")


def test_bad_inputs_raise(cpu):
    with pytest.raises(RuntimeError, match="dtype"):
        cpu.forward([torch.ones(2, 3, 4, 4, dtype=torch.int32)], 4.0)
    with pytest.raises(RuntimeError, match="4-d"):
        cpu.forward([torch.ones(2, 3, 4)], 4.0)
    with pytest.raises(RuntimeError, match="power"):
        cpu.forward([torch.ones(2, 3, 4, 4)], 0.5)
    f = torch.ones(2, 3, 4, 4)
    maps, norms = cpu.forward([f], 4.0)
    with pytest.raises(RuntimeError, match="grad_maps"):
        cpu.backward([f], maps, norms, [torch.ones(2, 15)], 4.0)


def test_grad_maps_any_strides_and_dtype(cpu):
    f = _feat((4, 6, 5, 5), torch.float32, seed=13)
    maps, norms = cpu.forward([f], 4.0)
    g = torch.randn(25, 4, dtype=torch.float64).t()  # transposed float64 view
    out = cpu.backward([f], maps, norms, [g], 4.0)[0]
    ref = REF.backward([f], maps, norms, [g.float()], 4.0)[0]
    _assert_close(out, ref, 1e-5)
    # expanded (stride 0) gradient, as from .sum().backward()
    out = cpu.backward([f], maps, norms, [torch.ones(()).expand(4, 25)], 4.0)[0]
    ref = REF.backward([f], maps, norms, [torch.ones(4, 25)], 4.0)[0]
    _assert_close(out, ref, 1e-5)


def test_spatial_attention_op_and_channels_last_grad(cpu):
    f = _feat((4, 8, 6, 6), torch.float32, "channels_last", "relu", seed=14).requires_grad_()
    (m,) = datadam_fast.spatial_attention([f], power=4.0, backend="cpu")
    w = torch.randn_like(m)
    (m * w).sum().backward()
    assert f.grad.is_contiguous(memory_format=torch.channels_last)
    f2 = f.detach().clone().requires_grad_()
    m2 = reference.spatial_attention(f2, 4.0)
    (m2 * w).sum().backward()
    _assert_close(m, m2, 1e-5)
    _assert_close(f.grad, f2.grad, 1e-5)


def _loss_inputs(K, Br, Bs, shapes, dtype, layout="contiguous", seed=0, emb=16):
    g = torch.Generator().manual_seed(seed)

    def t(*s):
        return torch.randn(*s, generator=g).relu().to(dtype)

    real = [t(K * Br, *s) for s in shapes]
    syn = [t(K * Bs, *s) for s in shapes]
    if layout == "channels_last":
        real = [r.contiguous(memory_format=torch.channels_last) for r in real]
        syn = [s.contiguous(memory_format=torch.channels_last) for s in syn]
    real_emb = t(K * Br, emb)
    syn_emb = t(K * Bs, emb)
    return real, syn, real_emb, syn_emb


@pytest.mark.parametrize("K,Br,Bs,power,layout", [
    (10, 4, 2, 4.0, "contiguous"),
    (3, 2, 1, 1.0, "channels_last"),   # Bs = 1
    (1, 3, 1, 2.5, "contiguous"),      # K = 1, N = 1
    (4, 2, 3, 2.0, "channels_last"),
])
def test_loss_matches_reference(cpu, K, Br, Bs, power, layout):
    shapes = [(16, 8, 8), (32, 4, 4), (5, 7, 5)]
    real, syn, real_emb, syn_emb = _loss_inputs(K, Br, Bs, shapes, torch.float32, layout, seed=K + Bs)
    scale = 3.7  # grad_output != 1

    def run(fn, **kw):
        s = [x.detach().clone().requires_grad_() for x in syn]
        e = syn_emb.detach().clone().requires_grad_()
        loss = fn(real, s, real_emb, e, num_classes=K, power=power, **kw)
        (loss * scale).backward()
        return loss.detach(), [x.grad for x in s], e.grad

    l1, g1, e1 = run(datadam_fast.attention_matching_loss, backend="cpu")
    l2, g2, e2 = run(reference.attention_matching_loss)
    _assert_close(l1, l2, 1e-5, what="loss")
    for i, (a, b) in enumerate(zip(g1, g2)):
        _assert_close(a, b, 2e-5, 1e-5, what=f"syn layer {i} grad")
        if layout == "channels_last":
            assert a.is_contiguous(memory_format=torch.channels_last)
    _assert_close(e1, e2, 1e-5, what="syn emb grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_loss_low_precision_and_double(cpu, dtype):
    K = 5
    real, syn, real_emb, syn_emb = _loss_inputs(K, 2, 2, [(8, 6, 6), (16, 3, 3)], dtype, seed=21)

    def run(fn, feats_dtype, **kw):
        s = [x.detach().to(feats_dtype).requires_grad_() for x in syn]
        e = syn_emb.detach().to(feats_dtype).requires_grad_()
        loss = fn([r.to(feats_dtype) for r in real], s, real_emb.to(feats_dtype), e,
                  num_classes=K, power=4.0, **kw)
        loss.backward()
        return loss.detach(), [x.grad for x in s], e.grad

    l1, g1, e1 = run(datadam_fast.attention_matching_loss, dtype, backend="cpu")
    # reference from the same low-precision values upcast (float64 stays float64)
    up = torch.float64 if dtype == torch.float64 else torch.float32
    l2, g2, e2 = run(reference.attention_matching_loss, up)
    mt, gt = _tols(dtype)
    assert l1.dtype == up
    _assert_close(l1, l2, max(mt, 1e-6), what="loss")
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert a.dtype == dtype
        _assert_close(a, b, gt, what=f"syn layer {i} grad")
    _assert_close(e1, e2.to(e1.dtype), gt, what="syn emb grad")


@pytest.mark.parametrize("power", [4.0, 2.5, 1.0])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_spatial_attention(cpu, power, layout):
    f1 = _feat((3, 4, 3, 5), torch.float64, layout, seed=31)
    f2 = _feat((2, 3, 4, 2), torch.float64, "contiguous", seed=32)
    if power == 1.0:  # keep clear of the kink of |f| at 0
        f1 = f1 + 0.2 * f1.sign()
        f2 = f2 + 0.2 * f2.sign()
    f1.requires_grad_()
    f2.requires_grad_()
    fn = lambda a, b: tuple(datadam_fast.spatial_attention([a, b], power=power, backend="cpu"))
    assert torch.autograd.gradcheck(fn, (f1, f2), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_loss(cpu):
    K = 3
    real, syn, real_emb, syn_emb = _loss_inputs(K, 2, 2, [(4, 3, 3), (2, 4, 2)], torch.float64, seed=41, emb=5)
    syn = [s + 0.05 for s in syn]  # away from the ReLU zeros
    syn[1] = syn[1].contiguous(memory_format=torch.channels_last)
    inputs = tuple(x.detach().requires_grad_() for x in (*syn, syn_emb))

    def fn(s0, s1, e):
        return 2.5 * datadam_fast.attention_matching_loss(real, [s0, s1], real_emb, e, num_classes=K,
                                                          power=4.0, backend="cpu")

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_auto_backend_picks_cpu(cpu):
    from datadam_fast.loss.backends import resolve_backend
    import os
    if os.environ.get("DATADAM_FAST_BACKEND"):
        pytest.skip("DATADAM_FAST_BACKEND forces a backend")
    assert resolve_backend("auto", torch.device("cpu")).name == "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_loss_with_labels_matches_reference(cpu, dtype, layout):
    """Labels in any order with uneven per-class counts: fused loss and gradients vs the reference
    (same tolerances as the class-major loss tests above, per dtype)."""
    K = 4
    g = torch.Generator().manual_seed(51)
    real = [_feat((13, 6, 5, 7), dtype, layout, "relu", seed=52), _feat((13, 8, 3, 3), dtype, layout, seed=53)]
    syn0 = [_feat((9, 6, 5, 7), dtype, layout, "relu", seed=54), _feat((9, 8, 3, 3), dtype, layout, seed=55)]
    rl = torch.cat([torch.arange(K), torch.randint(0, K, (9,), generator=g)])[torch.randperm(13, generator=g)]
    sl = torch.cat([torch.arange(K), torch.randint(0, K, (5,), generator=g)])[torch.randperm(9, generator=g)]
    re, se0 = torch.randn(13, 5, generator=g).to(dtype), torch.randn(9, 5, generator=g).to(dtype)

    def run(fn, up, **kw):
        s = [x.detach().to(up).requires_grad_() for x in syn0]
        e = se0.detach().to(up).requires_grad_()
        loss = fn([r.to(up) for r in real], s, re.to(up), e, num_classes=K, power=4.0,
                  real_labels=rl, syn_labels=sl, **kw)
        loss.backward()
        return loss.detach(), [x.grad for x in s], e.grad

    l1, g1, e1 = run(datadam_fast.attention_matching_loss, dtype, backend="cpu", layer_weights=[1.0, 0.5])
    up = torch.float64 if dtype == torch.float64 else torch.float32
    l2, g2, e2 = run(reference.attention_matching_loss, up, layer_weights=[1.0, 0.5])
    mt, gt = _tols(dtype)
    _assert_close(l1, l2, max(mt, 1e-6), what="loss")
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert a.dtype == dtype
        _assert_close(a, b, max(gt, 1e-5), what=f"grad {i}")
    _assert_close(e1, e2.to(e1.dtype), max(gt, 1e-5), what="emb grad")
