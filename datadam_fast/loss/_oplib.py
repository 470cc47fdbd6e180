"""Shared ``torch.library`` plumbing of the spatial-attention ops.

Every forward op has the schema ``(Tensor[] feats, float power, ...) -> (Tensor[] maps, Tensor[]
norms)`` and every backward op ``(Tensor[] feats, Tensor[] maps, Tensor[] norms, Tensor[]
grad_maps, float power, ...) -> Tensor[]``; the fake (meta) kernels and the autograd formula are
therefore the same for all of them and live here, once:

* fake forward: ``maps[l]`` ``[N, H*W]``, ``norms[l]`` ``[N]``, float32 (float64 for float64 input);
* fake backward: the gradient has the input's shape and dtype, channels_last when the input is
  channels_last (and not also contiguous), contiguous otherwise (:func:`grad_memory_format`);
* autograd: ``norms`` are saved state, not a differentiable output (marked non-differentiable);
  the backward op is called only for the layers that need a gradient.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch

from .reference import acc_dtype


def grad_memory_format(f: torch.Tensor) -> torch.memory_format:
    """The memory format every backend returns ``dL/df`` in (the contract, also for fake tensors)."""
    if f.dim() == 4 and not f.is_contiguous() and f.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def fake_forward(feats: Sequence[torch.Tensor]):
    maps, norms = [], []
    for f in feats:
        N, _, H, W = f.shape
        maps.append(f.new_empty((N, H * W), dtype=acc_dtype(f)))
        norms.append(f.new_empty((N,), dtype=acc_dtype(f)))
    return maps, norms


def fake_backward(feats: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    return [torch.empty_like(f, memory_format=grad_memory_format(f)) for f in feats]


def register_fake_and_autograd(fwd_qualname: str, bwd_qualname: str,
                               bwd_call: Callable[..., List[torch.Tensor]]) -> None:
    """Register the fake kernels of a forward/backward op pair and the forward's autograd formula.

    ``bwd_call(ctx, feats, maps, norms, grad_maps)`` calls the backward op (it knows the op's
    extra arguments, saved on ``ctx`` by the forward's inputs: ``ctx.power``, ``ctx.extra``).
    """
    torch.library.register_fake(fwd_qualname)(lambda feats, power, *extra: fake_forward(feats))
    torch.library.register_fake(bwd_qualname)(
        lambda feats, maps, norms, grad_maps, power, *extra: fake_backward(feats))

    def setup_context(ctx, inputs, output):
        feats, power, *extra = inputs
        maps, norms = output
        ctx.power = power
        ctx.extra = tuple(extra)
        ctx.num_layers = len(feats)
        ctx.mark_non_differentiable(*norms)
        ctx.save_for_backward(*feats, *maps, *norms)

    def backward(ctx, grad_maps, _grad_norms):
        L = ctx.num_layers
        saved = ctx.saved_tensors
        feats, maps, norms = saved[:L], saved[L:2 * L], saved[2 * L:]
        need = ctx.needs_input_grad[0]
        idx = [i for i in range(L) if need[i]]
        grads: list = [None] * L
        if idx:
            gm = [grad_maps[i] if grad_maps[i] is not None else torch.zeros_like(maps[i]) for i in idx]
            out = bwd_call(ctx, [feats[i] for i in idx], [maps[i] for i in idx],
                           [norms[i] for i in idx], gm)
            for i, g in zip(idx, out):
                grads[i] = g
        # one entry per argument the dispatcher passed (it drops arguments equal to their default,
        # so this is not always len(inputs) of setup_context)
        return (grads,) + (None,) * (len(ctx.needs_input_grad) - 1)

    torch.library.register_autograd(fwd_qualname, backward, setup_context=setup_context)
