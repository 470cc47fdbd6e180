"""Real-side targets: per-class mean attention maps and mean embeddings.

The loss only ever needs the *per-class means* of the real side, so real images can be streamed
through the network in chunks under ``no_grad`` while :class:`ClassMeanAccumulator` keeps running
sums; the real activations never have to be held at once. This is exact whenever the network
treats samples independently (instance/group/layer norm, or BatchNorm in eval mode); with
BatchNorm in train mode the batch statistics depend on the chunking. The accumulator cannot see
the network, so pass it: ``acc.update(feats, emb, labels=y, model=net)`` raises on a train-mode
BatchNorm (:func:`check_streaming_safe` is the same check as a function).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import nn

from ._checks import (check_embedding, check_feature_list, check_label_values, check_num_classes,
                      check_power, check_rows, check_same_device)
from .backends import check_backend_name
from ..errors import UserError, UserTypeError
from .reference import acc_dtype, class_means


@dataclass
class ClassTargets:
    """Precomputed real targets: ``attention[l]`` is ``[K, H_l*W_l]``, ``embedding`` is ``[K, D]``."""
    attention: List[torch.Tensor]
    embedding: Optional[torch.Tensor] = None
    power: Optional[float] = None
    counts: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        if self.attention:
            return self.attention[0].shape[0]
        return self.embedding.shape[0]

    def to(self, *args, **kwargs) -> "ClassTargets":
        return ClassTargets([a.to(*args, **kwargs) for a in self.attention],
                            None if self.embedding is None else self.embedding.to(*args, **kwargs),
                            self.power, self.counts)


def class_attention_means(feats: Sequence[torch.Tensor], *, num_classes: int, power: float = 4.0,
                          backend: str = "auto", labels: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Per-class mean normalised attention maps, one ``[K, H_l*W_l]`` float32 tensor per layer.

    Without ``labels`` the rows of each ``feats[l]`` are class-major with the same count per class
    (anything else is an error); with ``labels`` (``[N]`` class indices) any order and any
    per-class counts are exact. Differentiable if the features require grad.
    """
    from .ops import _run, prepare_backend
    num_classes = check_num_classes(num_classes)
    feats = check_feature_list(feats, "input", num_classes if labels is None else None)
    labels = check_rows("input", feats, None, labels, num_classes, "labels")
    if labels is not None:
        check_label_values("labels", labels, num_classes)
    power = check_power(power)
    check_backend_name(backend)
    device = check_same_device(feats, "feature maps")
    prepare_backend(backend, device)
    return [class_means(m, num_classes, labels, f"input layer {i}")
            for i, m in enumerate(_run(feats, power, backend))]


def class_embedding_means(emb: torch.Tensor, *, num_classes: int,
                          labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-class mean embedding ``[N, D] -> [K, D]`` (float32 accumulation; float64 stays float64).

    Rows class-major with equal counts, or any order with ``labels``.
    """
    num_classes = check_num_classes(num_classes)
    check_embedding(emb, "input", num_classes if labels is None else None)
    labels = check_rows("input", [], emb, labels, num_classes, "labels")
    if labels is not None:
        check_label_values("labels", labels, num_classes)
    return class_means(emb.to(acc_dtype(emb)), num_classes, labels, "input embedding")


def _modules_of(model) -> "nn.Module":
    inner = getattr(model, "model", None)  # a FeatureExtractor: look at the wrapped network
    return inner if isinstance(inner, nn.Module) else model


def check_streaming_safe(model: nn.Module, *, error: bool = True) -> List[str]:
    """Names of the BatchNorm layers of ``model`` that are in training mode.

    Streaming the real side in chunks (:class:`ClassMeanAccumulator`) is exact only when the
    network treats samples independently; a train-mode BatchNorm normalises with the statistics of
    whichever chunk it sees, so chunked class means differ from one-pass ones. With ``error=True``
    (default) such layers raise :class:`~datadam_fast.errors.UserError`; with ``error=False``
    their names are returned (empty: safe). Eval-mode BatchNorm (running statistics) is safe.
    Accepts a :class:`~datadam_fast.FeatureExtractor` too.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"check_streaming_safe: expected an nn.Module, got {type(model).__name__}")
    bad = [n or type(m).__name__ for n, m in _modules_of(model).named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if bad and error:
        raise UserError(f"streaming real features in chunks is inexact with BatchNorm in training mode "
                        f"({', '.join(bad[:5])}{'...' if len(bad) > 5 else ''}): its batch statistics depend "
                        f"on the chunk. Pass the whole real batch at once, put the network in eval() mode, or "
                        f"use instance/group norm")
    return bad


class ClassMeanAccumulator:
    """Running per-class means of attention maps (and embeddings) over streamed chunks.

    >>> acc = ClassMeanAccumulator(num_classes=10, power=4.0)
    >>> for x, y in chunks:                       # any chunking, any class mix
    ...     with torch.no_grad():
    ...         feats, emb = extractor(x)
    ...     acc.update(feats, emb, labels=y)
    >>> targets = acc.targets()                   # pass as ``real_feats`` to the loss

    Sums are kept in float64 so that the result does not depend on the chunking beyond
    float32 rounding of each map.
    """

    def __init__(self, num_classes: int, *, power: float = 4.0, backend: str = "auto"):
        self.num_classes = check_num_classes(num_classes)
        self.power = check_power(power)
        self.backend = check_backend_name(backend)
        self._att: Optional[List[torch.Tensor]] = None
        self._emb: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None
        self._shapes = None

    def reset(self) -> None:
        self._att = self._emb = self._counts = self._shapes = None

    @torch.no_grad()
    def update(self, feats: Sequence[torch.Tensor], emb: Optional[torch.Tensor] = None, *,
               labels: torch.Tensor, model: Optional[nn.Module] = None) -> None:
        """Add one chunk. ``model`` (the network, or the FeatureExtractor, that produced the chunk):
        when given, a train-mode BatchNorm in it raises (see :func:`check_streaming_safe`); the
        accumulator cannot see the network otherwise."""
        from .ops import _run, prepare_backend
        if model is not None:
            check_streaming_safe(model)
        feats = check_feature_list(feats, "chunk", None)
        if emb is not None:
            check_embedding(emb, "chunk", None)
        if not isinstance(labels, torch.Tensor):
            raise UserTypeError("labels: expected a 1-d integer tensor with one class index per row, "
                                f"got {type(labels).__name__}")
        labels = check_rows("chunk", feats, emb, labels, self.num_classes, "labels")
        n = labels.shape[0]
        # validation and counts use a host copy of the labels: with CPU labels (as the distillation
        # loop passes them) nothing here waits for the GPU
        labels_cpu = labels.cpu()
        if n and (int(labels_cpu.min()) < 0 or int(labels_cpu.max()) >= self.num_classes):
            raise UserError(f"labels must lie in [0, {self.num_classes}), got range "
                            f"[{int(labels_cpu.min())}, {int(labels_cpu.max())}]")
        device = check_same_device(list(feats) + [emb], "chunk tensors")
        shapes = ([tuple(f.shape[1:]) for f in feats], None if emb is None else emb.shape[1])
        if self._shapes is None:
            self._shapes = shapes
            K = self.num_classes
            self._att = [torch.zeros(K, s[1] * s[2], dtype=torch.float64, device=device) for s in shapes[0]]
            self._emb = None if emb is None else torch.zeros(K, emb.shape[1], dtype=torch.float64, device=device)
            self._counts = torch.zeros(K, dtype=torch.float64)  # on the host, see above
        elif shapes != self._shapes:
            raise UserError(f"chunk shapes {shapes} differ from the first chunk's {self._shapes}")
        labels = labels.to(device)
        prepare_backend(self.backend, device)
        maps = _run(feats, self.power, self.backend)
        for acc, m in zip(self._att, maps):
            acc.index_add_(0, labels, m.to(torch.float64))
        if emb is not None:
            self._emb.index_add_(0, labels, emb.to(torch.float64))
        self._counts += torch.bincount(labels_cpu, minlength=self.num_classes).to(torch.float64)

    @torch.no_grad()
    def add_class_sums(self, att_sums: Sequence[torch.Tensor], emb_sums: Optional[torch.Tensor] = None, *,
                       first_class: int, count: int) -> None:
        """Add precomputed per-class *sums* of normalised maps (``[n, H*W]`` per layer) and of
        embeddings (``[n, D]``) over ``count`` samples per class, for classes ``first_class ..
        first_class + n - 1`` (what a compiled real pass returns instead of per-sample maps)."""
        ref = att_sums[0] if len(att_sums) else emb_sums
        if ref is None:
            raise UserError("add_class_sums: no attention sums and no embedding sums")
        n = ref.shape[0]
        if first_class < 0 or first_class + n > self.num_classes or count < 1:
            raise UserError(f"add_class_sums: classes {first_class}..{first_class + n - 1} with count {count} "
                            f"outside 0..{self.num_classes - 1}")
        shapes = ("sums", [int(a.shape[1]) for a in att_sums], None if emb_sums is None else int(emb_sums.shape[1]))
        if self._shapes is None:
            self._shapes = shapes
            K, device = self.num_classes, ref.device
            self._att = [torch.zeros(K, w, dtype=torch.float64, device=device) for w in shapes[1]]
            self._emb = None if emb_sums is None else torch.zeros(K, shapes[2], dtype=torch.float64, device=device)
            self._counts = torch.zeros(K, dtype=torch.float64)
        elif shapes != self._shapes:
            raise UserError(f"add_class_sums: shapes {shapes} differ from earlier additions {self._shapes}")
        rows = slice(first_class, first_class + n)
        for acc, a in zip(self._att, att_sums):
            acc[rows] += a.to(torch.float64)
        if emb_sums is not None:
            self._emb[rows] += emb_sums.to(torch.float64)
        self._counts[rows] += float(count)

    def targets(self, dtype: torch.dtype = torch.float32) -> ClassTargets:
        if self._counts is None:
            raise UserError("ClassMeanAccumulator.targets(): no chunk was added")
        empty = (self._counts == 0).nonzero().flatten().tolist()
        if empty:
            raise UserError(f"classes {empty[:10]}{'...' if len(empty) > 10 else ''} received no samples")
        c = self._counts.to(self._att[0].device if self._att else self._emb.device).unsqueeze(1)
        return ClassTargets([(a / c).to(dtype) for a in self._att],
                            None if self._emb is None else (self._emb / c).to(dtype),
                            self.power, self._counts.clone())
