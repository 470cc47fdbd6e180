"""Fused C++ CPU backend (``backend="cpu"``): ``csrc/spatial_attention_cpu.cpp``.

The extension ``_C_cpu`` is imported prebuilt (``DATADAM_FAST_BUILD_EXT=1 pip install -e .``) or
JIT-built on first use (cached, see :mod:`datadam_fast._build`). It is compiled with
``-O3 -march=native -fno-trapping-math`` so that the inner loops auto-vectorise for the host
(AVX2/AVX-512 ...; no fast-math: NaN/Inf semantics and IEEE rounding are kept); the
JIT cache key includes a fingerprint of the host CPU so that a cache directory shared between
different machines never hands an AVX-512 build to a CPU without it. If the compiler rejects
``-march=native`` the build is retried with portable flags. ``-fopenmp`` is required: PyTorch's
``at::parallel_for`` is a header template that is serial unless the extension is compiled with
OpenMP (PyTorch's own intra-op backend); the extension links the ``libgomp`` PyTorch has loaded,
so it shares PyTorch's thread pool and honours ``torch.set_num_threads``.

Layouts: NCHW-contiguous and channels_last inputs are read in place; any other strides are made
NCHW-contiguous first (one copy) and get an NCHW-contiguous gradient. A channels_last input gets
a channels_last gradient.
"""
from __future__ import annotations

import hashlib
import os
import platform
import torch

from . import BackendUnavailable, ExtensionBackend

_EXT_NAME = "_C_cpu"
_SOURCES = ["spatial_attention_cpu.cpp"]
_BASE_CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


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
    tag = f"-DDATADAM_FAST_HOST={_host_fingerprint()}"
    attempts = []
    if native:
        attempts.append([*_BASE_CFLAGS, "-march=native", tag])
    attempts.append(list(_BASE_CFLAGS))
    errors = []
    for cflags in attempts:
        try:
            return load_extension(_EXT_NAME, _SOURCES, extra_cflags=cflags, extra_ldflags=_LDFLAGS)
        except BackendUnavailable as e:
            errors.append(str(e))
    raise BackendUnavailable(errors[-1] if len(errors) == 1 else
                             "building the cpu extension failed with and without -march=native: "
                             + " | ".join(errors))


class CPUBackend(ExtensionBackend):
    """Fused C++ kernels for CPU tensors; all layers of a call in one C++ call."""
    name = "cpu"

    def __init__(self):
        self._ext = _load_extension()  # BackendUnavailable propagates (auto falls back)
        # Advise transparent huge pages for large gradient buffers (see the C++ source);
        # DATADAM_FAST_CPU_THP=0 turns the advice off.
        self._huge_pages = os.environ.get("DATADAM_FAST_CPU_THP", "1") != "0"

    def supports(self, device) -> bool:
        return torch.device(device).type == "cpu"

    def _backward_extra_args(self) -> tuple:
        return (self._huge_pages,)
