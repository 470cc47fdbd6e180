"""The distillation step's two network passes, compiled once per architecture.

A fresh random network every iteration would make ``torch.compile`` of the network itself
recompile every iteration (dynamo guards on the module). Here one *template* network of the
architecture is traced once with ``torch.func.functional_call`` and each iteration's weights go
in as inputs, so a new network is just new input tensors.

Inside the compiled graphs the attention maps are written with plain tensor ops (the same
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
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .._constants import NORM_EPS


class _Features(nn.Module):
    """``forward`` = the network's ``features_and_embedding`` (what functional_call calls)."""

    def __init__(self, net: nn.Module, embedding_only: bool):
        super().__init__()
        self.net = net
        self.embedding_only = embedding_only

    def forward(self, x):
        if self.embedding_only:
            return [], self.net.embed(x)
        return self.net.features_and_embedding(x)


def _normalised_maps(f: torch.Tensor, power: float) -> torch.Tensor:
    f = f.float().abs()  # bf16/fp16 activations: the power and the sums in fp32 (fused, no copy)
    a = (f if power == 1.0 else f.pow(power)).sum(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def _class_sums(x: torch.Tensor, classes: int) -> torch.Tensor:
    return x.reshape(classes, x.shape[0] // classes, *x.shape[1:]).sum(1)


class CompiledPasses:
    """Compiled real and synthetic passes for one architecture (see the module docstring)."""

    def __init__(self, template: nn.Module, *, power: float, embedding_only: bool, real_dtype: torch.dtype,
                 dynamic: Optional[bool] = False, backend="inductor", mode: Optional[str] = None):
        self.module = _Features(template, embedding_only)
        self.power = float(power)
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
        feats, emb = torch.func.functional_call(self.module, weights, (x,))
        att = [_class_sums(_normalised_maps(f, self.power), classes) for f in feats]
        return att, _class_sums(emb.float(), classes)

    def _syn_impl(self, weights: Dict[str, torch.Tensor], x: torch.Tensor, classes: int,
                  target_att: List[torch.Tensor], target_emb: torch.Tensor, attention_weight: float,
                  embedding_weight: float):
        feats, emb = torch.func.functional_call(self.module, weights, (x,))
        att = x.new_zeros((), dtype=torch.float32)
        if attention_weight:
            for f, t in zip(feats, target_att):
                m = _class_sums(_normalised_maps(f, self.power), classes) / (f.shape[0] // classes)
                att = att + attention_weight * ((t - m) ** 2).sum()
        e = _class_sums(emb.float(), classes) / (emb.shape[0] // classes)
        return att, embedding_weight * ((target_emb - e) ** 2).sum()

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

    @staticmethod
    def weights_of(net: nn.Module, dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
        w = {f"net.{k}": v for k, v in net.named_parameters()}
        w.update({f"net.{k}": v for k, v in net.named_buffers()})
        if dtype is not None:
            w = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in w.items()}
        return w

    def real(self, weights, x: torch.Tensor, classes: int) -> Tuple[List[torch.Tensor], torch.Tensor]:
        with torch.no_grad():
            if x.dtype != self.real_dtype:
                x = x.to(self.real_dtype)
            return self._timed(("real", x.shape), self._real, weights, x, classes)

    def syn(self, weights, x: torch.Tensor, classes: int, target_att, target_emb, attention_weight: float,
            embedding_weight: float):
        return self._timed(("synthetic", x.shape), self._syn, weights, x, classes, list(target_att), target_emb,
                           float(attention_weight), float(embedding_weight))
