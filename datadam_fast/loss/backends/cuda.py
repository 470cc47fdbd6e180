"""CUDA extension backend (``backend="cuda"``): ``csrc/spatial_attention_cuda.cu``.

The kernels live in ``csrc/spatial_attention_kernels.cuh`` (torch-free CUDA C++ templates, see the
design notes at its top); ``spatial_attention_cuda.cu`` is the PyTorch glue. The extension
``_C_cuda`` is imported prebuilt (``DATADAM_FAST_BUILD_EXT=1 DATADAM_FAST_BUILD_CUDA=1 pip install
-e .``) or JIT-built with nvcc on first use (cached, see :mod:`datadam_fast.loss._build`). The JIT cache
key covers the ``.cu`` file; a fingerprint of the kernel header is passed as a define so that
editing the header also triggers a rebuild. Architectures follow PyTorch's rule
(``TORCH_CUDA_ARCH_LIST``, else the visible GPUs); compute capability >= 7.0 is required.

Each call handles all layers: per direction two grouped kernel launches per dtype present
(forward: channel reduction, then normalisation; backward: ``<m, g>`` partials, then the
gradient), for up to 16 layers per launch. Layouts: NCHW-contiguous and channels_last inputs are
read in place and get a gradient in the same memory format; other strides are made
NCHW-contiguous first (one copy). Results are deterministic (no atomics).
"""
from __future__ import annotations

import hashlib

import torch

from ... import _constants
from ...errors import BackendUnavailable
from .base import NativeOpBackend

_EXT_NAME = "_C_cuda"
_SOURCES = ["spatial_attention_cuda.cu"]
_HEADERS = ["spatial_attention_kernels.cuh"]
_REGISTERED = []


def _header_tag() -> str:
    """``-D`` flag carrying a hash of the headers the .cu includes (part of the JIT cache key)."""
    from .._build import csrc_dir
    h = hashlib.sha1()
    for name in _HEADERS:
        path = csrc_dir() / name
        if not path.is_file():
            raise BackendUnavailable(f"CUDA kernel header {path} not found")
        h.update(path.read_bytes())
    return f"-DDATADAM_FAST_KERNELS_SHA={h.hexdigest()[:12]}"


def _load_extension():
    from .._build import load_extension
    defines = _constants.native_defines()
    return load_extension(_EXT_NAME, _SOURCES, cuda=True, extra_cflags=[*_constants.CUDA_CXX_FLAGS, *defines],
                          extra_cuda_cflags=[*_constants.CUDA_NVCC_FLAGS, *defines, _header_tag()])


def _register_python_parts() -> None:
    if _REGISTERED:
        return
    from .._oplib import register_fake_and_autograd

    def bwd(ctx, feats, maps, norms, grad_maps):
        return torch.ops.datadam_fast.cuda_bwd(feats, maps, norms, grad_maps, ctx.power)

    register_fake_and_autograd("datadam_fast::cuda_fwd", "datadam_fast::cuda_bwd", bwd)
    _REGISTERED.append(True)


def unavailable_reason() -> str:
    """Why the CUDA backend cannot run in this process, or ``""`` when it can be tried."""
    if torch.version.cuda is None:
        hip = getattr(torch.version, "hip", None)
        return ("PyTorch was built without CUDA (torch.version.cuda is None"
                + (f"; this is a ROCm/HIP build {hip}" if hip else f"; torch {torch.__version__}")
                + "); install a CUDA build of PyTorch to use backend='cuda'")
    if not torch.cuda.is_available():
        return (f"no CUDA device is available (torch {torch.__version__} built for CUDA "
                f"{torch.version.cuda}; torch.cuda.is_available() is False)")
    return ""


class CUDABackend(NativeOpBackend):
    """Fused CUDA kernels for CUDA tensors; all layers of a call in one grouped launch per phase."""
    name = "cuda"
    device_type = "cuda"

    def __init__(self):
        reason = unavailable_reason()
        if reason:
            raise BackendUnavailable(f"backend 'cuda' unavailable: {reason}")
        self._ext = _load_extension()  # BackendUnavailable propagates (auto falls back)
        _register_python_parts()
