"""The distillation step's two network passes, compiled once per architecture.

A fresh random network every iteration would make ``torch.compile`` of the network itself
recompile every iteration (dynamo guards on the module). Here one *template* network of the
architecture is traced once with ``torch.func.functional_call`` and each iteration's weights go
in as inputs, so a new network is just new input tensors. What is traced is the method's
``compiled_real`` / ``compiled_synthetic`` (:mod:`.methods`) around the network.

For DataDAM, inside the compiled graphs the attention maps are written with plain tensor ops (the same
formula as the reference backend) rather than the fused op: inductor then fuses them into the
network's epilogue — norm statistics, normalise + ReLU, the channel-power sum and the pooling feeding
the next convolution in as few passes over each activation as it can — which is what a
hand-written real-side epilogue would do, and it also fuses the class sums. On the real side
(no_grad) the graph returns only what the loss needs: per-class *sums* of the L2-normalised maps
and of the embeddings. On the synthetic side it returns the loss terms, and AOTAutograd compiles
the backward.

DSA stays outside (eager): its op family is drawn per class, which would specialise the graph.
"""
from __future__ import annotations

import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn


class _Traced(nn.Module):
    """``forward(*args)`` = ``fn(self.net, *args)``: what functional_call calls with the weights."""

    def __init__(self, net: nn.Module, fn):
        super().__init__()
        self.net = net
        self.fn = fn

    def forward(self, *args):
        return self.fn(self.net, *args)


def weights_of(net: nn.Module, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The inputs a compiled pass takes for ``net``: its parameters and buffers (``dtype``: cast)."""
    w = {f"net.{k}": v for k, v in net.named_parameters()}
    w.update({f"net.{k}": v for k, v in net.named_buffers()})
    if dtype is not None:
        w = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in w.items()}
    return w


class MethodPasses:
    """A method's compiled real and synthetic passes for one architecture (see the module
    docstring): ``real`` returns the per-class sums of the method's statistics
    (:meth:`~datadam_fast.distill.methods.Method.compiled_real`), ``syn`` its loss and terms
    (:meth:`~datadam_fast.distill.methods.Method.compiled_synthetic`)."""

    weights_of = staticmethod(weights_of)

    def __init__(self, template: nn.Module, method, *, real_dtype: torch.dtype, dynamic: Optional[bool] = False,
                 backend="inductor", mode: Optional[str] = None):
        self._real_mod = _Traced(template, method.compiled_real)
        self._syn_mod = _Traced(template, method.compiled_synthetic)
        self.real_dtype = real_dtype
        self.compile_seconds = 0.0
        self._seen = set()
        # mode "reduce-overhead": CUDA graphs (cudagraph trees) on CUDA. Outputs of a replay are
        # overwritten by the next one: callers consume them at once (the loop adds the real class
        # sums to its accumulator and copies the synthetic gradient into its buffer) and call
        # step_begin() once per iteration.
        self.mode = None if mode in (None, "default") else mode
        opts = dict(dynamic=dynamic, backend=backend, mode=self.mode) if self.mode else \
            dict(dynamic=dynamic, backend=backend)
        self._real = torch.compile(self._real_impl, **opts)
        self._syn = torch.compile(self._syn_impl, **opts)

    # ------------------------------------------------------------------ traced bodies
    def _real_impl(self, weights: Dict[str, torch.Tensor], x: torch.Tensor, classes: int):
        return torch.func.functional_call(self._real_mod, weights, (x, classes))

    def _syn_impl(self, weights: Dict[str, torch.Tensor], x: torch.Tensor, classes: int,
                  targets: List[torch.Tensor]):
        return torch.func.functional_call(self._syn_mod, weights, (x, targets, classes))

    # ------------------------------------------------------------------ calls
    def step_begin(self) -> None:
        """Marks a new iteration for CUDA graph trees (earlier outputs may be overwritten now)."""
        if self.mode in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()

    def _timed(self, key, fn, *args):
        """Runs ``fn``; the first call per shape key is counted as compile time."""
        if key in self._seen:
            return fn(*args)
        t0 = time.perf_counter()
        out = fn(*args)
        self._seen.add(key)
        dt = time.perf_counter() - t0
        self.compile_seconds += dt
        print(f"datadam-fast: compiled the {key[0]} pass for {tuple(key[1])} in {dt:.1f} s (once per shape)",
              file=sys.stderr)
        return out

    def real(self, weights, x: torch.Tensor, classes: int) -> List[torch.Tensor]:
        with torch.no_grad():
            if x.dtype != self.real_dtype:
                x = x.to(self.real_dtype)
            return self._timed(("real", x.shape), self._real, weights, x, classes)

    def syn(self, weights, x: torch.Tensor, classes: int, targets: Sequence[torch.Tensor]):
        return self._timed(("synthetic", x.shape), self._syn, weights, x, classes, list(targets))
