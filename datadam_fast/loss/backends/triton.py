"""Triton backend: grouped fused kernels from ``datadam_fast.kernels.spatial_attention``.

* CUDA tensors: compiled Triton kernels (the target: H100/H200).
* CPU tensors: only under Triton's interpreter (``TRITON_INTERPRET=1`` exported before triton /
  this package is imported) -- slow, for testing the kernels without a GPU.

All float32/bfloat16/float16 layers of one call go into one launch per kernel (forward: accumulate
+ normalise; backward: per-sample projection + gradient), grouped by (dtype, memory layout).
float64 layers are computed by the reference implementation (exact contract: float64 maps, norms
and gradients); they are a debugging path, not a performance path.

The kernels are reached through the dispatcher ops ``torch.ops.datadam_fast.triton_fwd`` /
``triton_bwd`` (``torch.library.custom_op``, CUDA and CPU kernels, fake kernels and autograd from
:mod:`datadam_fast.loss._oplib`), registered when the backend is first loaded.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from ...errors import BackendUnavailable
from .base import Backend, ReferenceBackend

_OPS: list = []


def _register_ops(impl: "TritonBackend") -> None:
    """Define ``datadam_fast::triton_fwd`` / ``triton_bwd`` once per process."""
    if _OPS:
        return
    from .._oplib import register_fake_and_autograd

    @torch.library.custom_op("datadam_fast::triton_fwd", mutates_args=(), device_types=("cuda", "cpu"))
    def triton_fwd(feats: List[Tensor], power: float) -> Tuple[List[Tensor], List[Tensor]]:
        return impl._forward_impl(list(feats), power)

    @torch.library.custom_op("datadam_fast::triton_bwd", mutates_args=(), device_types=("cuda", "cpu"))
    def triton_bwd(feats: List[Tensor], maps: List[Tensor], norms: List[Tensor], grad_maps: List[Tensor],
                   power: float) -> List[Tensor]:
        return impl._backward_impl(list(feats), list(maps), list(norms), list(grad_maps), power)

    register_fake_and_autograd(
        "datadam_fast::triton_fwd", "datadam_fast::triton_bwd",
        lambda ctx, feats, maps, norms, grad_maps: torch.ops.datadam_fast.triton_bwd(
            feats, maps, norms, grad_maps, ctx.power))
    _OPS.extend([triton_fwd, triton_bwd])


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        try:
            import triton  # noqa: F401
            from ...kernels import spatial_attention as _k
        except Exception as e:  # ImportError, or triton failing to initialise its driver
            raise BackendUnavailable(f"backend 'triton' could not be loaded: {type(e).__name__}: {e}") from e
        self._k = _k
        self._ref = ReferenceBackend()
        _register_ops(self)

    # ------------------------------------------------------------------------------------------
    def supports(self, device) -> bool:
        device = torch.device(device)
        interp = self._k.interpreter_active()
        if device.type == "cuda":
            # the interpreter copies each argument's storage to the host, but the grouped kernels
            # read the layers' device addresses from a table: compiled kernels only
            return not interp and torch.cuda.is_available()
        if device.type == "cpu":
            return interp
        return False

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _split(feats: Sequence[torch.Tensor]) -> Tuple[List[int], List[int]]:
        fast = [i for i, f in enumerate(feats) if f.dtype in (torch.float32, torch.bfloat16, torch.float16)]
        slow = [i for i in range(len(feats)) if i not in set(fast)]
        return fast, slow

    def forward(self, feats, power):
        maps, norms = torch.ops.datadam_fast.triton_fwd([f.detach() for f in feats], float(power))
        return list(maps), list(norms)

    def backward(self, feats, maps, norms, grad_maps, power):
        return list(torch.ops.datadam_fast.triton_bwd([f.detach() for f in feats], [m.detach() for m in maps],
                                                      [n.detach() for n in norms],
                                                      [g.detach() for g in grad_maps], float(power)))

    def _forward_impl(self, feats, power):
        feats = list(feats)
        fast, slow = self._split(feats)
        maps: List = [None] * len(feats)
        norms: List = [None] * len(feats)
        if fast:
            m, n = self._k.spatial_attention_forward([feats[i] for i in fast], power)
            for j, i in enumerate(fast):
                maps[i], norms[i] = m[j], n[j]
        if slow:
            m, n = self._ref.forward([feats[i] for i in slow], power)
            for j, i in enumerate(slow):
                maps[i], norms[i] = m[j], n[j]
        return maps, norms

    def _backward_impl(self, feats, maps, norms, grad_maps, power):
        from .._oplib import grad_memory_format
        feats = list(feats)
        fast, slow = self._split(feats)
        out: List = [None] * len(feats)
        if fast:
            g = self._k.spatial_attention_backward([feats[i] for i in fast], [maps[i] for i in fast],
                                                   [norms[i] for i in fast],
                                                   [grad_maps[i] for i in fast], power)
            for j, i in enumerate(fast):
                # the kernels write a permuted dense input's gradient with its own strides; the
                # contract (and the ops' fake kernels) say contiguous unless channels_last
                out[i] = g[j].contiguous(memory_format=grad_memory_format(feats[i]))
        if slow:
            g = self._ref.backward([feats[i] for i in slow], [maps[i] for i in slow],
                                   [norms[i] for i in slow], [grad_maps[i] for i in slow], power)
            for j, i in enumerate(slow):
                out[i] = g[j]
        return out
