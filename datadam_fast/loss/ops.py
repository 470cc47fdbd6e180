"""The spatial-attention op: ``torch.library`` ops and the public ``spatial_attention`` function.

Ops (namespace ``datadam_fast``; all take and return lists so that one call covers every layer
and a GPU backend can launch one grouped kernel per direction)::

    spatial_attention_fwd(Tensor[] feats, float power, str backend="auto") -> (Tensor[] maps, Tensor[] norms)
    spatial_attention_bwd(Tensor[] feats, Tensor[] maps, Tensor[] norms, Tensor[] grad_maps,
                          float power, str backend="auto") -> Tensor[]

These two are what user code (and ``torch.compile`` / ``torch.export`` graphs) call. Their kernels
pick the backend for the tensors' device at run time (``backend="auto"``: the fused one, or the
reference with one warning naming why; a fused kernel that fails to compile or launch there is
replaced by the next backend, again with one warning, see ``backends.run_with_fallback``) and
call its native op, registered with the dispatcher
by the backend itself: ``datadam_fast::cpu_fwd/_bwd`` (C++, ``TORCH_LIBRARY_IMPL`` CPU),
``datadam_fast::cuda_fwd/_bwd`` (CUDA, ``TORCH_LIBRARY_IMPL`` CUDA), ``datadam_fast::triton_fwd/_bwd``
(``torch.library.custom_op``). Because the choice happens inside the op, a traced graph holds no
backend decision and never triggers a build; the eager wrappers resolve (and build) before the
first call so that errors and the build message come at a predictable point.

Forward reads each feature map once and returns L2-normalised ``[N, H*W]`` maps (float32; float64
for float64 input). ``norms`` (``[N]``) are saved state for the backward, not a differentiable
output. Every op has a fake kernel (shapes for meta/FakeTensor inputs) and the forward ops an
autograd formula (:mod:`datadam_fast.loss._oplib`).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from . import _oplib
from ._checks import check_feature_list, check_power, check_same_device
from .backends import check_backend_name, resolve_backend, run_with_fallback
from ..profiling import nvtx_range


def _device_of(feats: Sequence[Tensor]) -> torch.device:
    return feats[0].device if feats else torch.device("cpu")


@torch.library.custom_op("datadam_fast::spatial_attention_fwd", mutates_args=())
def spatial_attention_fwd(feats: List[Tensor], power: float, backend: str = "auto"
                          ) -> Tuple[List[Tensor], List[Tensor]]:
    if not feats:
        return [], []

    def call(be):
        with nvtx_range(f"datadam_fast.{be.name}.forward"):
            return be.forward(list(feats), power)
    return run_with_fallback(backend, _device_of(feats), "forward", call)


@torch.library.custom_op("datadam_fast::spatial_attention_bwd", mutates_args=())
def spatial_attention_bwd(feats: List[Tensor], maps: List[Tensor], norms: List[Tensor],
                          grad_maps: List[Tensor], power: float, backend: str = "auto") -> List[Tensor]:
    if not feats:
        return []

    def call(be):
        with nvtx_range(f"datadam_fast.{be.name}.backward"):
            return be.backward(list(feats), list(maps), list(norms), list(grad_maps), power)
    grads = run_with_fallback(backend, _device_of(feats), "backward", call)
    # one memory-format contract whatever the backend (the fake kernel promises it): a permuted
    # dense input may come back with its own strides from some backends
    out = []
    for f, g in zip(feats, grads):
        fmt = _oplib.grad_memory_format(f)
        out.append(g if g.is_contiguous(memory_format=fmt) else g.contiguous(memory_format=fmt))
    return out


_oplib.register_fake_and_autograd(
    "datadam_fast::spatial_attention_fwd", "datadam_fast::spatial_attention_bwd",
    lambda ctx, feats, maps, norms, grad_maps: torch.ops.datadam_fast.spatial_attention_bwd(
        feats, maps, norms, grad_maps, ctx.power, *ctx.extra))


def prepare_backend(backend: str, device: torch.device) -> None:
    """Eager only: load (build) and check the backend before the first op call.

    Under ``torch.compile`` / ``torch.export`` this does nothing: the op resolves at run time.
    """
    if not torch.compiler.is_compiling():
        resolve_backend(backend, device)


def _run(feats: List[Tensor], power: float, backend: str) -> List[Tensor]:
    """Maps of every layer through the op (differentiable when an input requires grad)."""
    if not feats:
        return []
    return list(torch.ops.datadam_fast.spatial_attention_fwd(list(feats), float(power), backend)[0])


def spatial_attention_maps(feats: Sequence[Tensor], power: float, backend: str = "auto") -> List[Tensor]:
    """:func:`spatial_attention` for callers that checked their inputs already (the engine's real
    side, every chunk of every iteration): the backend is prepared, the arguments are not re-checked."""
    feats = list(feats)
    if feats:
        prepare_backend(backend, feats[0].device)
    return _run(feats, power, backend)


def spatial_attention(feats: Sequence[Tensor], *, power: float = 4.0,
                      backend: str = "auto") -> List[Tensor]:
    """Per-sample L2-normalised channel-power attention of each layer: ``[N, H*W]`` float32 maps.

    Differentiable with respect to every input that requires grad; traceable by
    ``torch.compile(fullgraph=True)`` and ``torch.export``.
    """
    feats = check_feature_list(feats, "input", None)
    power = check_power(power)
    check_backend_name(backend)
    device = check_same_device(feats, "feature maps")
    prepare_backend(backend, device)
    return _run(feats, power, backend)
