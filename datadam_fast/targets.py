"""Real-side targets: per-class mean attention maps and mean embeddings.

The loss only ever needs the *per-class means* of the real side, so real images can be streamed
through the network in chunks under ``no_grad`` while :class:`ClassMeanAccumulator` keeps running
sums; the real activations never have to be held at once. This is exact whenever the network
treats samples independently (instance/group/layer norm, or BatchNorm in eval mode); with
BatchNorm in train mode the batch statistics depend on the chunking.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from ._checks import (check_embedding, check_feature_list, check_num_classes, check_power,
                      check_same_device)
from .backends import resolve_backend


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


def _class_mean_rows(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    return x.reshape(num_classes, x.shape[0] // num_classes, *x.shape[1:]).mean(dim=1)


def class_attention_means(feats: Sequence[torch.Tensor], *, num_classes: int, power: float = 4.0,
                          backend: str = "auto") -> List[torch.Tensor]:
    """Per-class mean normalised attention maps, one ``[K, H_l*W_l]`` float32 tensor per layer.

    Rows of each ``feats[l]`` are class-major with the same count per class. Differentiable if
    the features require grad.
    """
    from .ops import _run
    num_classes = check_num_classes(num_classes)
    feats = check_feature_list(feats, "input", num_classes)
    power = check_power(power)
    device = check_same_device(feats, "feature maps")
    maps = _run(feats, power, resolve_backend(backend, device))
    return [_class_mean_rows(m, num_classes) for m in maps]


def class_embedding_means(emb: torch.Tensor, *, num_classes: int) -> torch.Tensor:
    """Per-class mean of class-major embeddings ``[K*B, D] -> [K, D]`` (float32 accumulation)."""
    num_classes = check_num_classes(num_classes)
    check_embedding(emb, "input", num_classes)
    acc = torch.float64 if emb.dtype == torch.float64 else torch.float32
    return _class_mean_rows(emb.to(acc), num_classes)


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
        self.backend = backend
        self._att: Optional[List[torch.Tensor]] = None
        self._emb: Optional[torch.Tensor] = None
        self._counts: Optional[torch.Tensor] = None
        self._shapes = None

    def reset(self) -> None:
        self._att = self._emb = self._counts = self._shapes = None

    @torch.no_grad()
    def update(self, feats: Sequence[torch.Tensor], emb: Optional[torch.Tensor] = None, *,
               labels: torch.Tensor) -> None:
        from .ops import _run
        feats = check_feature_list(feats, "chunk", None)
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point:
            raise TypeError("labels: expected a 1-d integer tensor with one class index per row")
        n = labels.shape[0]
        for i, f in enumerate(feats):
            if f.shape[0] != n:
                raise ValueError(f"chunk layer {i}: {f.shape[0]} rows but {n} labels")
        if emb is not None:
            check_embedding(emb, "chunk", None)
            if emb.shape[0] != n:
                raise ValueError(f"chunk embedding: {emb.shape[0]} rows but {n} labels")
        # validation and counts use a host copy of the labels: with CPU labels (as the distillation
        # loop passes them) nothing here waits for the GPU
        labels_cpu = labels.cpu()
        if n and (int(labels_cpu.min()) < 0 or int(labels_cpu.max()) >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range "
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
            raise ValueError(f"chunk shapes {shapes} differ from the first chunk's {self._shapes}")
        labels = labels.to(device)
        maps = _run(feats, self.power, resolve_backend(self.backend, device))
        for acc, m in zip(self._att, maps):
            acc.index_add_(0, labels, m.to(torch.float64))
        if emb is not None:
            self._emb.index_add_(0, labels, emb.to(torch.float64))
        self._counts += torch.bincount(labels_cpu, minlength=self.num_classes).to(torch.float64)

    def targets(self, dtype: torch.dtype = torch.float32) -> ClassTargets:
        if self._counts is None:
            raise RuntimeError("ClassMeanAccumulator.targets(): no chunk was added")
        empty = (self._counts == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"classes {empty[:10]}{'...' if len(empty) > 10 else ''} received no samples")
        c = self._counts.to(self._att[0].device if self._att else self._emb.device).unsqueeze(1)
        return ClassTargets([(a / c).to(dtype) for a in self._att],
                            None if self._emb is None else (self._emb / c).to(dtype),
                            self.power, self._counts.clone())
