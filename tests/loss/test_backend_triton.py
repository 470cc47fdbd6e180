"""Triton backend vs the reference: on CPU through Triton's interpreter, on CUDA compiled.

The interpreter is chosen by the caller, never by this file: export ``TRITON_INTERPRET=1`` before
the process starts (the README's test command does)::

    TRITON_INTERPRET=1 python -m pytest tests/loss/test_backend_triton.py -q

On a CUDA machine with ``TRITON_INTERPRET`` unset or ``0`` the same tests run the compiled kernels
on the GPU; with neither they are skipped (and say why).
Shapes are tiny because the interpreter runs every program in Python.

Tolerances: maps/norms are float32 computed from the same (upcast) values as the reference, so
they are compared tightly for every input dtype (rtol 1e-5). Gradients are produced in the input
dtype: float32 tight (rtol 1e-5 of the largest entry), bfloat16/float16 within about one rounding
step of the output format (2^-7 / 2^-10 relative) since our float32 value and the reference's may
round to neighbouring representable numbers.
"""
import math
import os

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import datadam_fast  # noqa: E402
from datadam_fast.loss import reference  # noqa: E402
from datadam_fast.loss.backends import ReferenceBackend, get_backend  # noqa: E402
from datadam_fast.loss.backends.triton import TritonBackend  # noqa: E402
from datadam_fast.kernels import spatial_attention as K  # noqa: E402
from conftest import assert_close_to_reference

if torch.cuda.is_available() and not K.interpreter_active():
    DEVICE = torch.device("cuda")
else:
    DEVICE = torch.device("cpu")

_BACKEND = TritonBackend()
pytestmark = pytest.mark.skipif(
    not _BACKEND.supports(DEVICE),
    reason="Triton backend cannot run here: no CUDA and the Triton interpreter is off "
           "(export TRITON_INTERPRET=1 before starting pytest to run the kernels on CPU)")

REF = ReferenceBackend()
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}
POWERS = [1.0, 2.0, 4.0, 2.5]


def _close(actual, expected, rtol, what=""):
    """|a - e| <= rtol * max|e|, NaN and infinities where the reference has them."""
    assert_close_to_reference(actual, expected, rtol, what)


def _layout(t):
    """Strides of the dims that have more than one element (the rest are arbitrary)."""
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz > 1)


def _feat(shape, dtype, layout="contiguous", scale=1.0):
    """A feature map of ``shape`` ([N, C, H, W]) in the given memory layout."""
    N, C, H, W = shape
    if layout == "contiguous":
        t = torch.randn(N, C, H, W) * scale
    elif layout == "channels_last":
        t = (torch.randn(N, C, H, W) * scale).contiguous(memory_format=torch.channels_last)
    elif layout == "channel_slice":  # every other channel of a bigger map: H*W still contiguous
        t = (torch.randn(N, 2 * C, H, W) * scale)[:, ::2]
    elif layout == "w_slice":  # every other column: generic strides
        t = (torch.randn(N, C, H, 2 * W) * scale)[..., ::2]
    elif layout == "expanded":  # stride-0 batch (overlapping memory); grad comes out contiguous
        t = (torch.randn(1, C, H, W) * scale).expand(N, C, H, W)
    elif layout == "permuted":  # [N, H, C, W] storage, viewed as NCHW: generic strides
        t = (torch.randn(N, H, C, W) * scale).permute(0, 2, 1, 3)
    else:
        raise ValueError(layout)
    t = t.to(DEVICE, dtype)
    assert tuple(t.shape) == tuple(shape)
    return t


def _check_layers(feats, power, grad_rtol, **blocks):
    if blocks:
        maps, norms = K.spatial_attention_forward(feats, power, **blocks)
    else:
        maps, norms = _BACKEND.forward(feats, power)
    rmaps, rnorms = REF.forward(feats, power)
    for i, (m, n, rm, rn) in enumerate(zip(maps, norms, rmaps, rnorms)):
        assert m.dtype == torch.float32 and m.is_contiguous() and n.dtype == torch.float32
        _close(m, rm, 1e-5, f"maps[{i}]")
        _close(n, rn, 1e-5, f"norms[{i}]")
    gmaps = [torch.randn_like(m) for m in rmaps]
    if blocks:
        grads = K.spatial_attention_backward(feats, maps, norms, gmaps, power, **blocks)
    else:
        grads = _BACKEND.backward(feats, maps, norms, gmaps, power)
    rgrads = REF.backward(feats, rmaps, rnorms, gmaps, power)
    for i, (g, rg, f) in enumerate(zip(grads, rgrads, feats)):
        assert g.shape == f.shape and g.dtype == f.dtype and g.device == f.device
        # the raw kernels keep a dense input's strides (preserve_format); the backend (the op)
        # follows the contract: channels_last or contiguous, like the reference
        want = _layout(torch.empty_like(f, memory_format=torch.preserve_format)) if blocks else _layout(rg)
        assert _layout(g) == want, f"grad[{i}] strides {g.stride()} vs {want}"
        _close(g, rg, grad_rtol, f"grad[{i}]")


# ------------------------------------------------------------------------------------------------
def test_import_failure_raises_backend_unavailable(monkeypatch):
    import sys
    from datadam_fast.loss.backends import BackendUnavailable
    monkeypatch.setitem(sys.modules, "triton", None)  # "import triton" now raises ImportError
    with pytest.raises(BackendUnavailable, match="triton"):
        TritonBackend()


def test_backend_registry_and_supports():
    be = get_backend("triton")
    assert be.name == "triton"
    assert be.supports(DEVICE)
    if K.interpreter_active():
        assert be.supports(torch.device("cpu"))
        assert not be.supports(torch.device("cuda"))
    else:
        assert not be.supports(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice", "w_slice"])
def test_forward_backward_vs_reference(dtype, power, layout):
    # several layers with different shapes in one call; odd H*W, C=1, N=1
    shapes = [(4, 3, 5, 7), (6, 8, 4, 4), (1, 1, 9, 9), (3, 5, 3, 2)]
    feats = [_feat(s, dtype, layout) for s in shapes]
    _check_layers(feats, power, GRAD_RTOL[dtype])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "w_slice", "permuted", "expanded"])
@pytest.mark.parametrize("power", [1.0, 3.0, 2.5])
def test_small_blocks_multi_tile_paths(layout, power):
    """Tiles that span samples, end mid-sample and loop over channel chunks; multi-pass rows."""
    shapes = [(5, 7, 5, 7), (3, 8, 4, 4), (2, 1, 9, 9)]
    feats = [_feat(s, torch.float32, layout) for s in shapes]
    _check_layers(feats, power, 1e-5, block_m=16, block_c=2, block_r=16)


def test_mixed_layouts_and_dtypes_in_one_call():
    feats = [_feat((4, 3, 5, 7), torch.float32, "contiguous"),
             _feat((2, 8, 4, 4), torch.float32, "channels_last"),
             _feat((3, 5, 3, 3), torch.bfloat16, "permuted"),
             _feat((2, 4, 4, 4), torch.float16, "contiguous")]
    maps, norms = _BACKEND.forward(feats, 4.0)
    rmaps, rnorms = REF.forward(feats, 4.0)
    for m, rm in zip(maps, rmaps):
        _close(m, rm, 1e-5)
    gmaps = [torch.randn_like(m) for m in maps]
    grads = _BACKEND.backward(feats, maps, norms, gmaps, 4.0)
    rgrads = REF.backward(feats, rmaps, rnorms, gmaps, 4.0)
    for g, rg, f in zip(grads, rgrads, feats):
        assert _layout(g) == _layout(rg)
        _close(g, rg, GRAD_RTOL[f.dtype])


def test_channels_last_grad_is_channels_last_and_noncontiguous_grad_is_contiguous():
    f_cl = _feat((2, 4, 3, 5), torch.float32, "channels_last")
    f_nc = _feat((2, 4, 3, 5), torch.float32, "w_slice")
    maps, norms = _BACKEND.forward([f_cl, f_nc], 2.0)
    grads = _BACKEND.backward([f_cl, f_nc], maps, norms, [torch.ones_like(m) for m in maps], 2.0)
    assert grads[0].is_contiguous(memory_format=torch.channels_last) and not grads[0].is_contiguous()
    assert grads[1].is_contiguous()


def test_expanded_and_low_precision_grad_maps():
    """grad_maps may be expanded (stride 0, as from a mean's backward) or not float32."""
    feats = [_feat((4, 3, 3, 5), torch.float32), _feat((2, 2, 4, 4), torch.float32)]
    maps, norms = _BACKEND.forward(feats, 4.0)
    gmaps = [torch.randn(1, 15, device=DEVICE).expand(4, 15),
             torch.randn(2, 16, device=DEVICE).to(torch.bfloat16)]
    grads = _BACKEND.backward(feats, maps, norms, gmaps, 4.0)
    rgrads = REF.backward(feats, maps, norms, gmaps, 4.0)
    for g, rg in zip(grads, rgrads):
        _close(g, rg, 1e-5)


@pytest.mark.parametrize("power", POWERS)
def test_zero_and_tiny_maps_norm_below_eps(power):
    """A zero sample gives a zero map, norm 0 and a zero gradient; a sample whose norm is below
    eps takes the ``g / eps`` branch (no projection)."""
    f = _feat((3, 4, 3, 3), torch.float32)
    f[0] = 0.0
    tiny = 1e-15 ** (1.0 / power)  # |f|^p <= 2^p * 1e-15, so ||a|| <= sqrt(9) * 4 * 16e-15 < 1e-12
    f[1] = torch.rand(4, 3, 3, device=DEVICE) * tiny + tiny
    maps, norms = _BACKEND.forward([f], power)
    rmaps, rnorms = REF.forward([f], power)
    assert norms[0][0].item() == 0.0 and torch.all(maps[0][0] == 0)
    assert 0.0 < rnorms[0][1].item() <= reference.NORM_EPS
    _close(maps[0], rmaps[0], 1e-5)
    _close(norms[0], rnorms[0], 1e-5)
    g = [torch.randn_like(maps[0])]
    grads = _BACKEND.backward([f], maps, norms, g, power)
    rgrads = REF.backward([f], rmaps, rnorms, g, power)
    assert torch.all(grads[0][0] == 0)
    assert grads[0][1].abs().max() > 0
    _close(grads[0], rgrads[0], 1e-5)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("power", [1.0, 4.0, 2.5])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_propagate(power, bad):
    f = _feat((3, 4, 3, 3), torch.float32)
    f[1, 2, 1, 1] = bad
    maps, norms = _BACKEND.forward([f], power)
    rmaps, rnorms = REF.forward([f], power)
    assert not torch.isfinite(maps[0][1]).all()
    assert torch.isfinite(maps[0][0]).all() and torch.isfinite(maps[0][2]).all()
    _close(maps[0], rmaps[0], 1e-5)
    _close(norms[0], rnorms[0], 1e-5)
    g = [torch.randn_like(maps[0])]
    grads = _BACKEND.backward([f], maps, norms, g, power)
    rgrads = REF.backward([f], rmaps, rnorms, g, power)
    _close(grads[0], rgrads[0], 1e-5)


def test_float64_goes_to_reference():
    feats = [_feat((2, 3, 4, 4), torch.float64), _feat((2, 3, 4, 4), torch.float32)]
    maps, norms = _BACKEND.forward(feats, 4.0)
    assert maps[0].dtype == torch.float64 and norms[0].dtype == torch.float64
    assert maps[1].dtype == torch.float32
    rmaps, _ = REF.forward(feats, 4.0)
    _close(maps[0], rmaps[0], 1e-12)
    grads = _BACKEND.backward(feats, maps, norms, [torch.ones_like(m) for m in maps], 4.0)
    assert grads[0].dtype == torch.float64 and grads[1].dtype == torch.float32


def test_grouped_launches(monkeypatch):
    """Several layers of different shapes: one launch per kernel per direction (2 + 2)."""
    calls = []
    for name in ("_fwd_accum_kernel", "_fwd_normalize_kernel", "_bwd_ga_kernel", "_bwd_grad_kernel"):
        kern = getattr(K, name)
        orig = kern.run

        def run(*args, _orig=orig, _name=name, **kwargs):
            calls.append(_name)
            return _orig(*args, **kwargs)
        monkeypatch.setattr(kern, "run", run)
    feats = [_feat(s, torch.float32).requires_grad_() for s in
             [(4, 8, 8, 8), (4, 6, 5, 5), (4, 3, 3, 3), (4, 1, 2, 7)]]
    before = dict(K.LAUNCH_COUNTS)
    maps = datadam_fast.spatial_attention(feats, power=4.0, backend="triton")
    assert sorted(calls) == ["_fwd_accum_kernel", "_fwd_normalize_kernel"]
    assert K.LAUNCH_COUNTS["fwd_accum"] - before.get("fwd_accum", 0) == 1
    calls.clear()
    sum((m * torch.randn_like(m)).sum() for m in maps).backward()
    assert sorted(calls) == ["_bwd_ga_kernel", "_bwd_grad_kernel"]
    assert all(f.grad is not None for f in feats)


# ------------------------------------------------------------------------------------------------
def _loss_inputs(K_, Br, Bs, shapes, dtype, layout="contiguous", emb_dim=5):
    real = [_feat((K_ * Br, *s), dtype, layout) for s in shapes]
    syn = [_feat((K_ * Bs, *s), dtype, layout).requires_grad_() for s in shapes]
    real_emb = torch.randn(K_ * Br, emb_dim, device=DEVICE).to(dtype)
    syn_emb = torch.randn(K_ * Bs, emb_dim, device=DEVICE).to(dtype).requires_grad_()
    return real, syn, real_emb, syn_emb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("K_,Br,Bs", [(3, 2, 2), (1, 3, 1), (2, 1, 1)])
def test_attention_matching_loss_vs_reference(dtype, power, K_, Br, Bs):
    shapes = [(4, 5, 5), (6, 3, 3), (1, 4, 2)]
    layout = "channels_last" if K_ == 2 else "contiguous"
    real, syn, real_emb, syn_emb = _loss_inputs(K_, Br, Bs, shapes, dtype, layout)
    loss = datadam_fast.attention_matching_loss(real, syn, real_emb, syn_emb, num_classes=K_,
                                                power=power, backend="triton")
    grads = torch.autograd.grad(loss, [*syn, syn_emb])

    syn_r = [s.detach().clone().requires_grad_() for s in syn]
    emb_r = syn_emb.detach().clone().requires_grad_()
    ref = reference.attention_matching_loss(real, syn_r, real_emb, emb_r, num_classes=K_, power=power)
    rgrads = torch.autograd.grad(ref, [*syn_r, emb_r])

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5, abs_tol=1e-6), (loss.item(), ref.item())
    for i, (g, rg) in enumerate(zip(grads, rgrads)):
        assert g.dtype == rg.dtype
        _close(g, rg, GRAD_RTOL[dtype], f"grad[{i}]")


def test_loss_non_finite_syn_gives_non_finite_loss():
    real, syn, _, _ = _loss_inputs(2, 2, 2, [(3, 3, 3)], torch.float32)
    with torch.no_grad():
        syn[0][1, 0, 0, 0] = float("nan")
    loss = datadam_fast.attention_matching_loss(real, syn, num_classes=2, power=4.0, backend="triton")
    assert not math.isfinite(loss.item())
    (g,) = torch.autograd.grad(loss, syn)
    assert g.shape == syn[0].shape


# ------------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r'''
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from datadam_fast.kernels import spatial_attention as K
assert not K.interpreter_active()
ALIGNED = [["tt.divisibility", 16]]

def ptx(fn, sig, consts, num_warps):
    attrs = {(fn.arg_names.index(a),): ALIGNED for a, t in sig.items() if t.startswith("*")}
    full = dict(sig)
    full.update({k: "constexpr" for k in consts})
    k = triton.compile(ASTSource(fn, full, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "enable_fp_fusion": True})
    return k.asm["ptx"]

out = []
for dt in ("bf16", "fp32"):
    for layout, bm, bc in ((0, 256, 16), (1, 64, 64), (2, 256, 16)):
        vec = (8 if dt == "bf16" else 4) if layout != 2 else 1
        for pm in (4, 0):
            align = vec * (2 if dt == "bf16" else 4) if vec > 1 else 1
            a = ptx(K._fwd_accum_kernel, {"f_ptr": "*" + dt, "meta_ptr": "*i64", "power": "fp32"},
                    dict(NUM_LAYERS=3, LAYOUT=layout, POWER_MODE=pm, BLOCK_C=bc, BLOCK_M=bm, VEC=vec,
                         ALIGN=align), 4)
            b = ptx(K._bwd_grad_kernel, {"f_ptr": "*" + dt, "out_ptr": "*" + dt, "meta_ptr": "*i64", "power": "fp32"},
                    dict(NUM_LAYERS=3, LAYOUT=layout, POWER_MODE=pm, SAME_STRIDES=(pm == 4), BLOCK_C=bc,
                         BLOCK_M=bm, VEC=vec, ALIGN=align), 4)
            out.append(f"{dt} {layout} {pm} fwd_v4={'ld.global.v4' in a} bwd_ldv4={'ld.global.v4' in b} "
                       f"bwd_stv4={'st.global.v4' in b}")
for one in (True, False):
    n = ptx(K._fwd_normalize_kernel, {"meta_ptr": "*i64", "eps": "fp32"},
            dict(NUM_LAYERS=2, BLOCK_R=1024, ONE_PASS=one, RV=4), 4)
    g = ptx(K._bwd_ga_kernel, {"meta_ptr": "*i64", "eps": "fp32"},
            dict(NUM_LAYERS=2, BLOCK_R=256, ONE_PASS=one, RV=4 if one else 1, G_CONTIG=one), 2)
    out.append(f"fp32 row {int(one)} norm_v4={'ld.global.v4' in n} ga_v4={('st.global.v4' in g) or not one}")
print("\n".join(out))
'''


@pytest.mark.slow
@pytest.mark.skipif(not K.interpreter_active(), reason="compile check is for CPU-only machines")
def test_kernels_compile_for_sm90_with_vectorised_access(tmp_path):
    """Compile (no GPU needed) every kernel variant for sm_90 in a fresh process without the
    interpreter; the alignment hints must turn the H*W- and channel-contiguous streams into
    16-byte loads/stores."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True,
                       env=env, timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr.lower() and "not found" in r.stderr.lower()):
        pytest.skip("no ptxas for the NVIDIA backend: " + r.stderr[-300:])
    assert r.returncode == 0, r.stderr[-3000:]
    for line in r.stdout.strip().splitlines():
        dt, layout, pm, *flags = line.split()
        if layout != "2":
            assert all(f.endswith("True") for f in flags), line


@pytest.mark.skipif(DEVICE.type != "cpu", reason="opcheck of the interpreted kernels (CPU); on a GPU see the CUDA run")
def test_opcheck_triton_ops_under_interpreter():
    """datadam_fast::triton_fwd / triton_bwd (custom ops) and the router with backend='triton':
    schema, autograd registration, fake kernels, AOT dispatch -- the kernels run in the interpreter."""
    feats = [_feat((2, 3, 3, 5), torch.float32).requires_grad_(),
             _feat((2, 4, 2, 2), torch.bfloat16, "channels_last").requires_grad_(),
             _feat((2, 2, 3, 3), torch.float32, "w_slice").requires_grad_(),
             _feat((2, 3, 2, 3), torch.float32, "permuted").requires_grad_()]
    for op, args in ((torch.ops.datadam_fast.triton_fwd.default, (feats, 4.0)),
                     (torch.ops.datadam_fast.spatial_attention_fwd.default, (feats, 2.5, "triton"))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    detached = [f.detach() for f in feats]
    maps, norms = _BACKEND.forward(detached, 4.0)
    gmaps = [torch.randn_like(m) for m in maps]
    result = torch.library.opcheck(torch.ops.datadam_fast.triton_bwd.default, (detached, maps, norms, gmaps, 4.0))
    assert all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------------------------
# CUDA graphs: a user step with the fused op captured whole (the layer table's host-to-device
# copy is recorded into the graph, so its host buffer must outlive the graph)
# ------------------------------------------------------------------------------------------------
def _graph_problem(seed):
    g = torch.Generator().manual_seed(seed)
    real = [torch.randn(6, 8, 9, 7, generator=g).relu().to(DEVICE),
            torch.randn(6, 8, 5, 4, generator=g).relu().to(DEVICE)]
    syn = [torch.randn(4, 8, 9, 7, generator=g).to(DEVICE), torch.randn(4, 8, 5, 4, generator=g).to(DEVICE)]
    return real, syn


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (compiled Triton kernels)")
def test_user_step_captured_in_a_cuda_graph_equals_eager():
    real, syn = _graph_problem(0)
    static_real = [r.clone() for r in real]
    static_syn = [s.clone().requires_grad_() for s in syn]

    def step():
        loss = datadam_fast.attention_matching_loss(static_real, static_syn, num_classes=2, power=4.0,
                                                    backend="triton")
        return (loss, *torch.autograd.grad(loss, static_syn))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    K._META_CACHE.clear()
    before = len(K._CAPTURED_TABLES)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    assert len(K._CAPTURED_TABLES) > before, "tables made during capture must be kept alive"
    for seed in (1, 2):
        new_real, new_syn = _graph_problem(seed)
        for dst, src in zip(static_real + static_syn, new_real + new_syn):
            with torch.no_grad():
                dst.copy_(src)
        churn = [torch.randn(1 << 16, device=DEVICE) for _ in range(8)]  # recycle freed blocks
        K._META_CACHE.clear()
        graph.replay()
        torch.cuda.synchronize()
        del churn
        syn_r = [s.clone().requires_grad_() for s in new_syn]
        ref = reference.attention_matching_loss(new_real, syn_r, num_classes=2, power=4.0)
        ref_grads = torch.autograd.grad(ref, syn_r)
        _close(captured[0], ref, 1e-5, f"replay {seed}: loss")
        for i, (g, rg) in enumerate(zip(captured[1:], ref_grads)):
            _close(g, rg, 1e-4, f"replay {seed}: grad[{i}]")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU (compiled Triton kernels)")
def test_user_step_under_reduce_overhead_equals_eager():
    torch._dynamo.reset()
    fn = torch.compile(lambda r, s: datadam_fast.attention_matching_loss(r, s, num_classes=2, power=4.0,
                                                                         backend="triton"),
                       mode="reduce-overhead", fullgraph=True)
    for seed in range(4):  # warm-up, recording, then replays of the recorded graph
        real, syn = _graph_problem(seed)
        s1 = [s.clone().requires_grad_() for s in syn]
        loss = fn(real, s1)
        loss.backward()
        s2 = [s.clone().requires_grad_() for s in syn]
        ref = reference.attention_matching_loss(real, s2, num_classes=2, power=4.0)
        ref.backward()
        _close(loss.detach(), ref.detach(), 1e-5, f"call {seed}: loss")
        for i, (a, b) in enumerate(zip(s1, s2)):
            _close(a.grad, b.grad, 1e-4, f"call {seed}: grad[{i}]")
