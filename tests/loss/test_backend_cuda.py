"""The CUDA extension backend against the reference oracle: maps, norms, gradients, full loss.

Every case runs on two targets:

* ``cuda``: the real extension on a GPU (skipped when ``torch.cuda.is_available()`` is False).
* ``emulated``: the same sources (``csrc/spatial_attention_cuda.cu`` + the kernel header) compiled
  by the host C++ compiler in ``DATADAM_FAST_HOST_EMULATION`` mode and run on CPU tensors, each
  block's 256 threads on CPU threads with real barriers and an emulated warp shuffle. It checks
  the kernels' indexing, tiling, channel splits, vector/scalar paths and reductions without a GPU
  (not timing, memory-model or occupancy questions). Needs the CUDA toolkit headers
  (``cuda_fp16.h``...) and a C++20 compiler; skipped otherwise. Cases are kept small because each
  emulated block costs milliseconds.

Tolerances (relative to the reference's largest magnitude where noted): fp32/fp64 maps and norms
1e-5 (fp64: 1e-10), general p 2e-5; gradients fp32 1e-4 (of max), fp16 2e-3, bf16 1.6e-2 (one
rounding of the output in the input dtype can land on either side).
"""
import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

import datadam_fast as dd
from datadam_fast.loss import backends as B
from datadam_fast.loss import reference as R
from datadam_fast.errors import UserError
from conftest import assert_close_to_reference

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
HAS_CUDA = torch.cuda.is_available()
NO_CUDA_REASON = "no CUDA device (torch.cuda.is_available() is False): GPU tests of backend='cuda' skipped"

# --------------------------------------------------------------------------------------------------
# Host emulation of the CUDA thread model (test-only build of the extension)
# --------------------------------------------------------------------------------------------------
_PRELUDE = r"""
// Host emulation of the CUDA execution model for datadam_fast's kernels (tests only).
#define DATADAM_FAST_HOST_EMULATION 1
#define __CUDA_NO_HALF_OPERATORS__ 1
#define __CUDA_NO_HALF_CONVERSIONS__ 1
#define __CUDA_NO_BFLOAT16_CONVERSIONS__ 1
#define __CUDA_NO_HALF2_OPERATORS__ 1
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cmath>
#include <thread>
#include <vector>
#undef __shared__
#define __shared__ static      /* blocks run one after another: a static is the block's smem */
#define __launch_bounds__(...)
thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
namespace dd_emu { inline std::barrier<>* bar = nullptr; }
inline void __syncthreads() { dd_emu::bar->arrive_and_wait(); }
// All 256 threads of the block call the shuffles together in these kernels.
template <class T> T __shfl_xor_sync(unsigned, T v, int lane_mask) {
  static T slots[256];
  slots[threadIdx.x] = v;
  __syncthreads();
  T r = slots[threadIdx.x ^ lane_mask];
  __syncthreads();
  return r;
}
inline uint4 __ldcs(const uint4* p) { return *p; }
inline void __stcs(uint4* p, uint4 v) { *p = v; }
template <class K, class P> void datadam_fast_emulated_launch(K kernel, unsigned grid, const P& p) {
  std::barrier<> bar(256);
  dd_emu::bar = &bar;
  std::vector<std::thread> ts;
  for (unsigned t = 0; t < 256; ++t) {
    ts.emplace_back([&, t] {
      threadIdx = dim3(t, 1, 1);
      for (unsigned b = 0; b < grid; ++b) {
        blockIdx = dim3(b, 1, 1);
        kernel(p);
        bar.arrive_and_wait();
      }
    });
  }
  for (auto& th : ts) th.join();
}
"""


def _cuda_include_dir():
    cands = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parents[1] / "include")
    cands.append(Path("/usr/local/cuda/include"))
    for c in cands:
        if (c / "cuda_fp16.h").is_file() and (c / "cuda_runtime.h").is_file():
            return c
    return None


_EMU = {}


def _emulated_ext():
    if "ext" in _EMU or "error" in _EMU:
        if "error" in _EMU:
            pytest.skip(_EMU["error"])
        return _EMU["ext"]
    inc = _cuda_include_dir()
    if inc is None:
        _EMU["error"] = "CUDA toolkit headers (cuda_fp16.h) not found: host emulation of the CUDA kernels skipped"
        pytest.skip(_EMU["error"])
    from torch.utils import cpp_extension
    from datadam_fast.loss._build import build_dir
    h = hashlib.sha1(_PRELUDE.encode())
    for f in ("spatial_attention_cuda.cu", "spatial_attention_kernels.cuh"):
        h.update((CSRC / f).read_bytes())
    tag = f"_C_cuda_emulated_{h.hexdigest()[:12]}"
    out = build_dir() / tag
    out.mkdir(parents=True, exist_ok=True)
    src = out / "emulated.cpp"
    text = _PRELUDE + f'#include "{CSRC / "spatial_attention_cuda.cu"}"\n'
    if not src.is_file() or src.read_text() != text:  # keep the mtime: ninja rebuilds otherwise
        src.write_text(text)
    try:
        from datadam_fast._constants import native_defines
        ext = cpp_extension.load(name=tag, sources=[str(src)], extra_include_paths=[str(inc), str(CSRC)],
                                 extra_cflags=["-O2", "-std=c++20", "-pthread", *native_defines()],
                                 extra_ldflags=["-pthread"],
                                 build_directory=str(out), verbose=False)
    except Exception as e:  # no C++20 compiler etc.: a CUDA compile problem would also show here
        msg = str(e)
        if "error:" in msg and "spatial_attention" in msg:
            raise  # our sources failed to compile: that is a test failure, not a skip
        _EMU["error"] = f"host emulation build unavailable: {type(e).__name__}: {msg[-500:]}"
        pytest.skip(_EMU["error"])
    assert ext.EMULATED
    _EMU["ext"] = ext
    return ext


class _EmulatedCUDABackend(B.Backend):
    """The CUDA extension's entry points, host-emulated (CPU tensors). The emulated build registers
    no dispatcher op (it would clash with the CPU backend's device), so it is called directly; the
    real build's ``datadam_fast::cuda_fwd/_bwd`` run the same two C++ functions."""
    name = "cuda_emulated"

    def __init__(self, ext):
        self._ext = ext

    def supports(self, device):
        return torch.device(device).type == "cpu"

    def forward(self, feats, power):
        maps, norms = self._ext.forward([f.detach() for f in feats], float(power))
        return list(maps), list(norms)

    def backward(self, feats, maps, norms, grad_maps, power):
        return list(self._ext.backward([f.detach() for f in feats], [m.detach() for m in maps],
                                       [n.detach() for n in norms], [g.detach() for g in grad_maps], float(power)))


@pytest.fixture(params=["cuda", "emulated"])
def target(request, monkeypatch):
    """(backend object, backend name for the public API, device)."""
    if request.param == "cuda":
        if not HAS_CUDA:
            pytest.skip(NO_CUDA_REASON)
        return B.get_backend("cuda"), "cuda", torch.device("cuda")
    ext = _emulated_ext()
    ext._set_emulated_num_sms(132)
    be = _EmulatedCUDABackend(ext)
    monkeypatch.setitem(B._FACTORIES, be.name, lambda: be)
    monkeypatch.setitem(B._CACHE, be.name, be)
    return be, be.name, torch.device("cpu")


def _set_sms(target, n):
    """Emulation only: pretend the device has n SMs (many -> channel splits, 1 -> none)."""
    be = target[0]
    if isinstance(be, _EmulatedCUDABackend):
        be._ext._set_emulated_num_sms(n)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
TOL = {  # (maps/norms rtol, grads rtol): comparisons use atol = rtol * max|reference|
    torch.float32: (1e-5, 1e-4),
    torch.float64: (1e-10, 1e-9),
    torch.float16: (1e-5, 2e-3),
    torch.bfloat16: (1e-5, 1.6e-2),
}


def _close(actual, expected, rtol, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    assert_close_to_reference(actual, expected, rtol, what, elementwise_rtol=rtol)


def _check_against_reference(be, feats, power, seed=0):
    ref = B.ReferenceBackend()
    maps, norms = be.forward(feats, power)
    rmaps, rnorms = ref.forward(feats, power)
    assert len(maps) == len(feats) and len(norms) == len(feats)
    for i, f in enumerate(feats):
        rt, gt = TOL[f.dtype]
        if power not in (1.0, 2.0, 3.0, 4.0):
            rt = max(rt, 2e-5)
        acc = torch.float64 if f.dtype == torch.float64 else torch.float32
        assert maps[i].dtype == acc and norms[i].dtype == acc
        assert maps[i].is_contiguous() and maps[i].device == f.device
        _close(maps[i], rmaps[i], rt, f"layer {i} {tuple(f.shape)} {f.dtype} p={power}: maps")
        _close(norms[i], rnorms[i], rt, f"layer {i}: norms")
    gen = torch.Generator().manual_seed(seed)
    gmaps = [torch.randn(m.shape, generator=gen, dtype=m.dtype).to(m.device) for m in rmaps]
    grads = be.backward(feats, maps, norms, gmaps, power)
    rgrads = ref.backward(feats, rmaps, rnorms, gmaps, power)
    for i, f in enumerate(feats):
        rt, gt = TOL[f.dtype]
        if power not in (1.0, 2.0, 3.0, 4.0):
            gt = max(gt, 5e-5)
        g = grads[i]
        assert g.shape == f.shape and g.dtype == f.dtype and g.device == f.device
        if f.is_contiguous():
            assert g.is_contiguous(), f"layer {i}: contiguous input, gradient strides {g.stride()}"
        elif f.is_contiguous(memory_format=torch.channels_last):
            assert g.is_contiguous(memory_format=torch.channels_last), f"layer {i}: channels_last lost"
        else:
            assert g.is_contiguous(), f"layer {i}: other strides should give a contiguous gradient"
        _close(g, rgrads[i], gt, f"layer {i} {tuple(f.shape)} {f.dtype} p={power}: grad")
    return maps, norms, grads


def _randn(shape, dtype, device, relu=False, channels_last=False):
    t = torch.randn(shape, dtype=torch.float32)
    if relu:
        t = t.relu()
    t = t.to(dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.to(device)


# --------------------------------------------------------------------------------------------------
# availability (runs everywhere)
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA error path; a CUDA device is present")
def test_unavailable_without_cuda_names_the_reason():
    with pytest.raises(B.BackendUnavailable, match="CUDA|cuda"):
        B.get_backend("cuda")
    with pytest.raises(B.BackendUnavailable):
        B.resolve_backend("cuda", torch.device("cpu"))


def test_supports_only_cuda_devices():
    from datadam_fast.loss.backends.cuda import CUDABackend
    be = CUDABackend.__new__(CUDABackend)  # no build needed for supports()
    assert be.name == "cuda"
    assert be.supports(torch.device("cuda", 0)) and be.supports("cuda")
    assert not be.supports(torch.device("cpu")) and not be.supports("meta")


# --------------------------------------------------------------------------------------------------
# forward/backward against the reference backend
# --------------------------------------------------------------------------------------------------
SHAPES = {
    "odd_hw_scalar_path": [(6, 5, 7, 7)],
    "vector_path": [(4, 8, 8, 8)],
    "several_layers": [(6, 16, 8, 8), (6, 3, 5, 7), (6, 32, 4, 4), (6, 1, 3, 3)],
    "C1": [(3, 1, 9, 9)],
    "N1": [(1, 4, 6, 6)],
    "HW1": [(5, 7, 1, 1)],
    "multi_map_tiles": [(2, 3, 48, 50)],  # HW > 2048: several normalisation/dot blocks per sample
}


@pytest.mark.parametrize("power", [1.0, 2.0, 4.0, 2.5])
@pytest.mark.parametrize("case", list(SHAPES))
def test_matches_reference_fp32(target, case, power):
    feats = [_randn(s, torch.float32, target[2]) for s in SHAPES[case]]
    _check_against_reference(target[0], feats, power)


@pytest.mark.parametrize("power", [3.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_matches_reference_low_precision_and_double(target, dtype, power):
    feats = [_randn(s, dtype, target[2]) for s in [(4, 16, 8, 8), (4, 5, 7, 7), (4, 8, 5, 5)]]
    feats.append(_randn((4, 16, 4, 4), dtype, target[2], channels_last=True))
    _check_against_reference(target[0], feats, power)


@pytest.mark.parametrize("power", [1.0, 4.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [16, 5, 64])
def test_channels_last(target, dtype, C, power):
    f = _randn((3, C, 6, 5), dtype, target[2], channels_last=True)
    assert not f.is_contiguous()
    _check_against_reference(target[0], [f], power)


def test_non_contiguous_and_misaligned(target):
    dev = target[2]
    base = torch.randn(4, 9, 8, 8, device=dev)
    sliced = base[:, 2:7]                                  # channel slice: neither layout
    transposed = torch.randn(4, 6, 8, 8, device=dev).transpose(2, 3)
    flat = torch.randn(4 * 8 * 8 * 8 + 1, device=dev)
    misaligned = flat[1:].view(4, 8, 8, 8)                 # contiguous, 4-byte offset: scalar loads
    cl_slice = torch.randn(4, 8, 6, 6, device=dev).contiguous(memory_format=torch.channels_last)[1:]
    for f in (sliced, transposed, misaligned, cl_slice):
        _check_against_reference(target[0], [f], 4.0)


@pytest.mark.parametrize("power", [1.0, 2.0, 4.0, 2.5])
def test_zero_maps(target, power):
    dev = target[2]
    f = torch.randn(4, 6, 5, 5, device=dev)
    f[1] = 0                                   # a sample whose attention is all zero: norm 0
    g = torch.randn(3, 4, 4, 4, device=dev).relu()
    g[:, :, :2] = 0                            # zero positions inside non-zero samples
    maps, norms, grads = _check_against_reference(target[0], [f, g], power)
    assert norms[0][1].item() == 0 and maps[0][1].abs().sum().item() == 0
    assert grads[0][1].abs().sum().item() == 0 and torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("sms", [1, 132])
def test_nan_norm_propagates_like_the_reference(target, channels_last, sms):
    """A NaN feature makes its sample's norm NaN; F.normalize's clamp keeps it NaN, so the whole
    map row is NaN (a clamp that turned it into eps would leave the other pixels finite and huge).
    Other samples stay finite. With 132 SMs the channels are split and the norm is summed from
    partials (the other normalise path). The backward takes the reference's `n > eps` test:
    a NaN norm gives g / eps, NaN only at the NaN feature."""
    _set_sms(target, sms)
    dev = target[2]
    f = _randn((3, 48, 7, 6), torch.float32, dev, channels_last=channels_last)
    f[1, 5, 2, 3] = float("nan")
    maps, norms = target[0].forward([f], 4.0)
    rmaps, rnorms = B.ReferenceBackend().forward([f], 4.0)
    assert torch.isnan(norms[0][1]) and torch.isnan(maps[0][1]).all()
    assert torch.equal(torch.isnan(maps[0]), torch.isnan(rmaps[0]))
    for n in (0, 2):
        _close(maps[0][n], rmaps[0][n], 1e-5, f"maps of finite sample {n}")
    gm = [torch.randn(maps[0].shape, dtype=torch.float32).to(dev)]
    grads = target[0].backward([f], maps, norms, gm, 4.0)
    rgrads = B.ReferenceBackend().backward([f], rmaps, rnorms, gm, 4.0)
    assert torch.equal(torch.isnan(grads[0]), torch.isnan(rgrads[0])) and int(torch.isnan(grads[0]).sum()) == 1
    ok = ~torch.isnan(rgrads[0])
    _close(grads[0][ok], rgrads[0][ok], 1e-4, "grads")


def test_channel_split_and_tiles(target):
    """Few samples and many channels: the planner splits channels across blocks."""
    dev = target[2]
    _set_sms(target, 1000)
    try:
        # with 1000 "SMs" the planner splits (NCHW) 256 -> 4 x 64, 96 -> 2 x 48, 201 -> 101 + 100,
        # 128 at HW=2304 -> 4 chunks (per-sample normalisation block, HW > one map tile);
        # (channels_last) 1100 -> 384 + 384 + 332, 1024 -> 4 x 256; the bf16/odd ones stay whole
        feats = [_randn((2, 256, 8, 8), torch.float32, dev), _randn((1, 96, 9, 9), torch.float32, dev),
                 _randn((1, 201, 6, 6), torch.float32, dev), _randn((1, 128, 48, 48), torch.float32, dev),
                 _randn((2, 1100, 3, 3), torch.float32, dev, channels_last=True),
                 _randn((1, 1024, 2, 3), torch.float32, dev, channels_last=True),
                 _randn((2, 128, 4, 4), torch.bfloat16, dev, channels_last=True),
                 _randn((2, 100, 5, 3), torch.float32, dev, channels_last=True)]
        for p in (1.0, 4.0, 2.5):
            _check_against_reference(target[0], feats, p)
    finally:
        _set_sms(target, 132)


def test_mixed_dtypes_and_many_layers(target):
    dev = target[2]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    feats = [_randn((2, 3 + i % 4, 4 + i % 3, 5), dtypes[i % 4], dev, channels_last=(i % 5 == 0))
             for i in range(37)]                     # > 16 layers of one dtype: several launches
    _check_against_reference(target[0], feats, 2.0)


def test_deterministic(target):
    dev = target[2]
    _set_sms(target, 1000)
    try:
        feats = [_randn((3, 64, 7, 9), torch.float32, dev), _randn((3, 32, 4, 4), torch.float16, dev)]
        m1, n1 = target[0].forward(feats, 2.5)
        m2, n2 = target[0].forward(feats, 2.5)
        g = [torch.randn_like(m) for m in m1]
        g1 = target[0].backward(feats, m1, n1, g, 2.5)
        g2 = target[0].backward(feats, m2, n2, g, 2.5)
        for a, b in zip(m1 + n1 + g1, m2 + n2 + g2):
            assert torch.equal(a, b)
    finally:
        _set_sms(target, 132)


def test_expanded_grad_maps(target):
    """grad_maps may be a stride-0 view (gradient of a sum)."""
    dev = target[2]
    f = torch.randn(3, 4, 5, 5, device=dev)
    maps, norms = target[0].forward([f], 4.0)
    g = torch.ones((), device=dev).expand(3, 25)
    out = target[0].backward([f], maps, norms, [g], 4.0)[0]
    ref = B.ReferenceBackend().backward([f], maps, norms, [g.contiguous()], 4.0)[0]
    _close(out, ref, 1e-4, "expanded grad_maps")


def test_bad_arguments_raise(target):
    be, _, dev = target
    f = torch.randn(2, 3, 4, 4, device=dev)
    maps, norms = be.forward([f], 2.0)
    with pytest.raises(RuntimeError, match="maps has shape"):
        be.backward([f], [maps[0][:, :5]], norms, [maps[0]], 2.0)
    with pytest.raises(RuntimeError, match="norms has shape"):
        be.backward([f], maps, [norms[0][:1]], maps, 2.0)
    with pytest.raises(RuntimeError, match="4-d"):
        be.forward([f[0]], 2.0)
    with pytest.raises(RuntimeError, match="power"):
        be.forward([f], 0.5)
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16 or float64"):
        be.forward([f.to(torch.int32)], 2.0)
    assert be.forward([], 2.0) == ([], [])
    if dev.type == "cuda":
        # checked by the backend before the dispatcher (which would name its 'CPU' backend instead)
        with pytest.raises(UserError, match="backend 'cuda' takes CUDA tensors, but feats\\[0\\] is on cpu"):
            be.forward([f.cpu()], 2.0)
        with pytest.raises(UserError, match="maps\\[0\\] is on cpu"):
            be.backward([f], [maps[0].cpu()], norms, maps, 2.0)


def test_device_checked_before_the_dispatcher():
    """A CPU tensor given to the CUDA backend gets the backend's own error, naming the argument,
    on any machine: the check runs before the op is looked up (no extension needed)."""
    from datadam_fast.loss.backends.cuda import CUDABackend
    be = CUDABackend.__new__(CUDABackend)  # no __init__: nothing is built or loaded
    f = torch.randn(2, 3, 4, 4)
    with pytest.raises(UserError, match=r"backend 'cuda' takes CUDA tensors, but feats\[0\] is on cpu"):
        be.forward([f], 2.0)
    with pytest.raises(UserError, match=r"grad_maps\[0\] is on cpu"):
        be.backward([], [], [], [torch.zeros(2, 16)], 2.0)


# --------------------------------------------------------------------------------------------------
# the public op and the full loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("power", [1.0, 4.0, 2.5])
@pytest.mark.parametrize("K,Br,Bs", [(3, 4, 2), (1, 3, 1), (2, 2, 1)])
def test_full_loss_matches_reference(target, dtype, power, K, Br, Bs):
    _, name, dev = target
    shapes = [(8, 6, 6), (5, 3, 5), (1, 4, 4)]
    real = [torch.randn(K * Br, *s).relu().to(dtype).to(dev) for s in shapes]
    syn0 = [torch.randn(K * Bs, *s).relu().to(dtype).to(dev) for s in shapes]
    syn0[0] = syn0[0].contiguous(memory_format=torch.channels_last)
    re = torch.randn(K * Br, 6).to(dtype).to(dev)
    se0 = torch.randn(K * Bs, 6).to(dtype).to(dev)

    syn = [s.clone().requires_grad_() for s in syn0]
    se = se0.clone().requires_grad_()
    loss = dd.attention_matching_loss(real, syn, re, se, num_classes=K, power=power, backend=name)
    loss.backward()

    syn_r = [s.clone().requires_grad_() for s in syn0]
    se_r = se0.clone().requires_grad_()
    ref = R.attention_matching_loss(real, syn_r, re, se_r, num_classes=K, power=power)
    ref.backward()

    rt = 1e-5 if dtype == torch.float32 else 1e-4
    assert loss.dtype == torch.float32
    assert torch.allclose(loss.detach().float(), ref.detach().float(), rtol=rt, atol=1e-6), (loss.item(), ref.item())
    gt = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for i, (a, b) in enumerate(zip(syn, syn_r)):
        _close(a.grad, b.grad, gt, f"loss grad layer {i}")
    _close(se.grad, se_r.grad, 1e-5 if dtype == torch.float32 else 1e-2, "loss grad embedding")


def test_spatial_attention_op_autograd(target):
    _, name, dev = target
    f = torch.randn(4, 6, 7, 5, device=dev, requires_grad=True)
    h = torch.randn(4, 3, 3, 3, device=dev, requires_grad=True)
    w = torch.randn(4, 9, device=dev)  # (not ||m||^2: its gradient is 0 up to rounding)
    maps = dd.spatial_attention([f, h], power=4.0, backend=name)
    (maps[0] * torch.arange(35, device=dev)).sum().add((maps[1] - w).pow(2).sum()).backward()
    f2, h2 = f.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    ref = [R.spatial_attention(f2, 4.0), R.spatial_attention(h2, 4.0)]
    (ref[0] * torch.arange(35, device=dev)).sum().add((ref[1] - w).pow(2).sum()).backward()
    _close(maps[0], ref[0], 1e-5, "op maps")
    _close(f.grad, f2.grad, 1e-4, "op grad f")
    _close(h.grad, h2.grad, 1e-4, "op grad h")


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gpu_large_shapes_and_stream():
    """Realistic sizes on the GPU (not emulated): ConvNet-3 real batch, bf16 and fp32, on a side stream."""
    be = B.get_backend("cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        feats = [torch.randn(512, 128, 32, 32, device="cuda").relu(),
                 torch.randn(512, 128, 16, 16, device="cuda", dtype=torch.bfloat16).relu(),
                 torch.randn(512, 128, 8, 8, device="cuda").relu().contiguous(memory_format=torch.channels_last)]
        _check_against_reference(be, feats, 4.0)
    s.synchronize()
