"""Fused C++ CPU backend (``backend="cpu"``): ``csrc/spatial_attention_cpu.cpp``.

The extension registers the dispatcher ops ``torch.ops.datadam_fast.cpu_fwd`` / ``cpu_bwd``
(``TORCH_LIBRARY_FRAGMENT`` + ``TORCH_LIBRARY_IMPL(datadam_fast, CPU, ...)``); loading it here adds
their fake kernels and autograd formula (:mod:`datadam_fast.loss._oplib`). It is imported prebuilt
(``DATADAM_FAST_BUILD_EXT=1 pip install -e .``: portable flags) or JIT-built on first use (cached,
see :mod:`datadam_fast.loss._build`). The JIT build adds ``-march=native`` so that the inner loops
auto-vectorise for the host (AVX2/AVX-512 ...), and keys its cache by a fingerprint of the host
CPU so that a cache directory shared between machines never hands an AVX-512 build to a CPU
without it; if the compiler rejects ``-march=native`` the build is retried with the portable
flags. The flag lists live in :mod:`datadam_fast._constants` (shared with setup.py). The extension
links the ``libgomp`` PyTorch has loaded, so it shares PyTorch's thread pool and honours
``torch.set_num_threads``.

Layouts: NCHW-contiguous and channels_last inputs are read in place; any other strides are made
NCHW-contiguous first (one copy) and get an NCHW-contiguous gradient. A channels_last input gets
a channels_last gradient.
"""
from __future__ import annotations

import hashlib
import os
import platform

import torch

from ... import _constants
from ...errors import BackendUnavailable
from .base import NativeOpBackend

_EXT_NAME = "_C_cpu"
_SOURCES = ["spatial_attention_cpu.cpp", "real_epilogue_cpu.cpp", "statistics_cpu.cpp", "winograd_cpu.cpp"]
_REGISTERED = []


def _host_fingerprint() -> str:
    """Short hash of the machine type and CPU feature flags (part of the JIT cache key)."""
    h = hashlib.sha1(platform.machine().encode())
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features", "model name")):
                    h.update(line.encode())
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        h.update(platform.processor().encode())
    return h.hexdigest()[:10]


def _load_extension():
    from .._build import load_extension
    native = os.environ.get("DATADAM_FAST_CPU_NATIVE", "1") != "0"
    portable = [*_constants.CPU_CFLAGS, *_constants.native_defines()]
    attempts = []
    if native:
        attempts.append([*portable, *_constants.CPU_JIT_NATIVE_CFLAGS, f"-DDATADAM_FAST_HOST={_host_fingerprint()}"])
    attempts.append(portable)
    errors = []
    for cflags in attempts:
        try:
            return load_extension(_EXT_NAME, _SOURCES, extra_cflags=cflags,
                                  extra_ldflags=list(_constants.CPU_LDFLAGS))
        except BackendUnavailable as e:
            errors.append(str(e))
    raise BackendUnavailable(errors[-1] if len(errors) == 1 else
                             "building the cpu extension failed with and without -march=native: "
                             + " | ".join(errors))


def _register_python_parts() -> None:
    if _REGISTERED:
        return
    from .._oplib import register_fake_and_autograd

    def bwd(ctx, feats, maps, norms, grad_maps):
        return torch.ops.datadam_fast.cpu_bwd(feats, maps, norms, grad_maps, ctx.power, *ctx.extra)

    register_fake_and_autograd("datadam_fast::cpu_fwd", "datadam_fast::cpu_bwd", bwd)
    _register_statistics_fakes()
    _REGISTERED.append(True)


def _register_statistics_fakes() -> None:
    """Fake kernels of the C++ statistics ops (``csrc/statistics_cpu.cpp``): float32/float64 in,
    the same dtype out; gradients in the feature map's layout. And of the real side's Winograd
    convolution (float32, channels_last out)."""
    from .._oplib import grad_memory_format
    lib = "datadam_fast::"

    def cf(emb, freqs, labels, num_classes, save_projection):
        F = freqs.shape[-2]
        return (emb.new_empty((num_classes, F)), emb.new_empty((num_classes, F)),
                emb.new_empty((emb.shape[0], F) if save_projection else (0,)))

    def cf_bwd(emb, freqs, labels, num_classes, grad_cos, grad_sin, proj, need_emb, need_freqs):
        return (emb.new_empty(emb.shape if need_emb else (0,)), freqs.new_empty(freqs.shape if need_freqs else (0,)))

    def rows(feat, *_):
        return feat.new_empty(feat.shape[:2]), feat.new_empty(feat.shape[:2])

    def att(feat, power):
        return feat.new_empty(feat.shape[:2]), feat.new_empty(feat.shape[:1])

    def grad(feat, *_):
        return torch.empty_like(feat, memory_format=grad_memory_format(feat))

    def winograd(x, u, bias):  # csrc/winograd_cpu.cpp: the real side's 3x3 convolution (no autograd)
        return torch.empty((x.shape[0], u.shape[2], x.shape[2], x.shape[3]), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    for name, fn in (("cpu_cf_class_sums", cf), ("cpu_cf_class_sums_bwd", cf_bwd), ("cpu_channel_attention", att),
                     ("cpu_channel_attention_bwd", grad), ("cpu_channel_moments", rows),
                     ("cpu_channel_moments_bwd", grad), ("cpu_winograd_conv3x3", winograd)):
        torch.library.register_fake(lib + name)(fn)


class CPUBackend(NativeOpBackend):
    """Fused C++ kernels for CPU tensors; all layers of a call in one C++ call."""
    name = "cpu"
    device_type = "cpu"

    def __init__(self):
        self._ext = _load_extension()  # BackendUnavailable propagates (auto falls back)
        if not hasattr(torch.ops.datadam_fast, "cpu_fwd"):  # pragma: no cover - stale prebuilt module
            raise BackendUnavailable("the cpu extension loaded but registered no datadam_fast::cpu_fwd op "
                                     "(a prebuilt datadam_fast._C_cpu from an older version?)")
        _register_python_parts()
        # Advise transparent huge pages for large gradient buffers (see the C++ source);
        # DATADAM_FAST_CPU_THP=0 turns the advice off.
        self._huge_pages = os.environ.get("DATADAM_FAST_CPU_THP", "1") != "0"

    def _bwd_extra_args(self) -> tuple:
        return (self._huge_pages,)
