"""Triton backend: grouped fused kernels from ``datadam_fast.kernels.spatial_attention``.

* CUDA tensors: compiled Triton kernels (the target: H100/H200).
* CPU tensors: only under Triton's interpreter (``TRITON_INTERPRET=1`` exported before triton /
  this package is imported) -- slow, for testing the kernels without a GPU.

All float32/bfloat16/float16 layers of one call go into one launch per kernel (forward: accumulate
+ normalise; backward: per-sample projection + gradient), grouped by (dtype, memory layout).
float64 layers are computed by the reference implementation (exact contract: float64 maps, norms
and gradients); they are a debugging path, not a performance path.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from . import Backend, BackendUnavailable, ReferenceBackend


class TritonBackend(Backend):
    name = "triton"

    def __init__(self):
        try:
            import triton  # noqa: F401
            from ..kernels import spatial_attention as _k
        except Exception as e:  # ImportError, or triton failing to initialise its driver
            raise BackendUnavailable(f"backend 'triton' could not be loaded: {type(e).__name__}: {e}") from e
        self._k = _k
        self._ref = ReferenceBackend()

    # ------------------------------------------------------------------------------------------
    def supports(self, device) -> bool:
        device = torch.device(device)
        interp = self._k.interpreter_active()
        if device.type == "cuda":
            # the interpreter copies each argument's storage to the host separately, which the
            # grouped kernels' cross-tensor addressing cannot survive: compiled kernels only
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

    def backward(self, feats, maps, norms, grad_maps, power):
        feats = list(feats)
        fast, slow = self._split(feats)
        out: List = [None] * len(feats)
        if fast:
            g = self._k.spatial_attention_backward([feats[i] for i in fast], [maps[i] for i in fast],
                                                   [norms[i] for i in fast],
                                                   [grad_maps[i] for i in fast], power)
            for j, i in enumerate(fast):
                out[i] = g[j]
        if slow:
            g = self._ref.backward([feats[i] for i in slow], [maps[i] for i in slow],
                                   [norms[i] for i in slow], [grad_maps[i] for i in slow], power)
            for j, i in enumerate(slow):
                out[i] = g[j]
        return out
