"""``spatial_attention``: the fused op and its ``torch.autograd.Function``.

Forward reads each feature map once and returns L2-normalised ``[N, H*W]`` maps (float32); the
saved state for backward is those maps plus the per-sample norms, O(N*H*W), never O(N*C*H*W).
All layers of one call are handed to the backend together so that a GPU backend can launch one
grouped kernel per direction.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from ._checks import check_feature_list, check_power, check_same_device
from .backends import Backend, resolve_backend
from .profiling import nvtx_range


class SpatialAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, backend: Backend, power: float, *feats):
        with nvtx_range(f"datadam_fast.{backend.name}.forward"):
            maps, norms = backend.forward(list(feats), power)
        ctx.backend = backend
        ctx.power = power
        ctx.num_layers = len(feats)
        ctx.save_for_backward(*feats, *maps, *norms)
        return tuple(maps)

    @staticmethod
    def backward(ctx, *grad_maps):
        L = ctx.num_layers
        saved = ctx.saved_tensors
        feats, maps, norms = saved[:L], saved[L:2 * L], saved[2 * L:]
        need = ctx.needs_input_grad[2:]
        idx = [i for i in range(L) if need[i]]
        grads: List = [None] * L
        if idx:
            gm = [grad_maps[i] if grad_maps[i] is not None else torch.zeros_like(maps[i]) for i in idx]
            with nvtx_range(f"datadam_fast.{ctx.backend.name}.backward"):
                out = ctx.backend.backward([feats[i] for i in idx], [maps[i] for i in idx],
                                           [norms[i] for i in idx], gm, ctx.power)
            for i, g in zip(idx, out):
                grads[i] = g
        return (None, None, *grads)


def _run(feats: List[torch.Tensor], power: float, backend: Backend) -> List[torch.Tensor]:
    if torch.is_grad_enabled() and any(f.requires_grad for f in feats):
        return list(SpatialAttentionFunction.apply(backend, power, *feats))
    with nvtx_range(f"datadam_fast.{backend.name}.forward"):
        return backend.forward(feats, power)[0]


def spatial_attention(feats: Sequence[torch.Tensor], *, power: float = 4.0,
                      backend: str = "auto") -> List[torch.Tensor]:
    """Per-sample L2-normalised channel-power attention of each layer: ``[N, H*W]`` float32 maps.

    Differentiable with respect to every input that requires grad.
    """
    feats = check_feature_list(feats, "input", None)
    power = check_power(power)
    device = check_same_device(feats, "feature maps")
    return _run(feats, power, resolve_backend(backend, device))
