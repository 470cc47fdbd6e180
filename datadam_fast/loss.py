"""The DataDAM attention-matching loss: public function and ``nn.Module``."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._checks import (check_embedding, check_feature_list, check_num_classes, check_pair,
                      check_power, check_same_device)
from .backends import resolve_backend
from .ops import _run
from .targets import ClassTargets, _class_mean_rows, class_attention_means

RealInput = Union[Sequence[torch.Tensor], ClassTargets]


def attention_matching_loss(real_feats: RealInput, syn_feats: Sequence[torch.Tensor],
                            real_emb: Optional[torch.Tensor] = None,
                            syn_emb: Optional[torch.Tensor] = None, *, num_classes: int,
                            power: float = 4.0, attention_weight: float = 100.0,
                            embedding_weight: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """DataDAM loss (scalar float32), differentiable w.r.t. ``syn_feats`` and ``syn_emb``::

        attention_weight * sum_l sum_k || mean_real_k â_l - mean_syn_k â_l ||^2
      + embedding_weight * sum_k || mean_real_k e - mean_syn_k e ||^2

    ``real_feats``: list of ``[K*Br, C_l, H_l, W_l]`` (class-major) or a :class:`ClassTargets`
    (precomputed/streamed class means; then ``real_emb`` must be None and the targets carry the
    embedding means). ``syn_feats``: list of ``[K*Bs, C_l, H_l, W_l]``. The real side never gets
    gradients. Non-finite inputs propagate to a non-finite loss; no kernel traps on them.
    """
    K = check_num_classes(num_classes)
    power = check_power(power)
    syn_feats = check_feature_list(syn_feats, "synthetic", K)
    targets = real_feats if isinstance(real_feats, ClassTargets) else None
    if targets is not None:
        if real_emb is not None:
            raise ValueError("real_emb must be None when real targets (ClassTargets) are given; "
                             "put the embedding means in ClassTargets.embedding")
        if targets.num_classes != K:
            raise ValueError(f"targets have {targets.num_classes} classes but num_classes={K}")
        if len(targets.attention) != len(syn_feats):
            raise ValueError(f"targets have {len(targets.attention)} layers but synthetic has {len(syn_feats)}")
        for i, (t, s) in enumerate(zip(targets.attention, syn_feats)):
            hw = s.shape[2] * s.shape[3]
            if tuple(t.shape) != (K, hw):
                raise ValueError(f"layer {i}: target attention means {tuple(t.shape)}, expected [{K}, {hw}] "
                                 f"for synthetic features {tuple(s.shape)}")
        if targets.power is not None and float(targets.power) != power:
            raise ValueError(f"targets were computed with power={targets.power} but the loss uses power={power}")
    else:
        real_feats = check_feature_list(real_feats, "real", K)
        check_pair(real_feats, syn_feats)
    if syn_emb is not None:
        check_embedding(syn_emb, "synthetic", K)
        if targets is not None:
            if targets.embedding is None:
                raise ValueError("syn_emb given but the targets carry no embedding means")
            real_w = targets.embedding.shape[-1]
        else:
            if real_emb is None:
                raise ValueError("syn_emb given without real_emb")
            check_embedding(real_emb, "real", K)
            real_w = real_emb.shape[1]
        if real_w != syn_emb.shape[1]:
            raise ValueError(f"embedding width mismatch: real {real_w} vs synthetic {syn_emb.shape[1]}")
    elif real_emb is not None:
        raise ValueError("real_emb given without syn_emb")
    if not syn_feats and syn_emb is None:
        raise ValueError("nothing to match: no attention layers and no embedding")
    tensors = list(syn_feats) + [syn_emb, real_emb]
    if targets is None:
        tensors += list(real_feats)
    else:
        tensors += list(targets.attention) + [targets.embedding]
    device = check_same_device(tensors, "real and synthetic tensors")
    be = resolve_backend(backend, device)

    if targets is None:
        with torch.no_grad():
            real_att = class_attention_means([f.detach() for f in real_feats], num_classes=K,
                                             power=power, backend=be.name) if real_feats else []
            real_emb_mean = None if real_emb is None else _class_mean_rows(
                real_emb.detach().to(torch.float64 if real_emb.dtype == torch.float64 else torch.float32), K)
    else:
        real_att = [t.detach() for t in targets.attention]
        real_emb_mean = None if targets.embedding is None else targets.embedding.detach()

    acc = torch.float64 if any(f.dtype == torch.float64 for f in syn_feats) else torch.float32
    loss = torch.zeros((), dtype=acc, device=device)
    if syn_feats:
        syn_maps = _run(syn_feats, power, be)
        for r, m in zip(real_att, syn_maps):
            d = r.to(m.dtype) - _class_mean_rows(m, K)
            loss = loss + attention_weight * (d * d).sum()
    if syn_emb is not None:
        s = _class_mean_rows(syn_emb.to(torch.float64 if syn_emb.dtype == torch.float64 else torch.float32), K)
        d = real_emb_mean.to(s.dtype) - s
        loss = loss + embedding_weight * (d * d).sum()
    return loss


class AttentionMatchingLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`attention_matching_loss` with the options fixed at construction."""

    def __init__(self, num_classes: int, *, power: float = 4.0, attention_weight: float = 100.0,
                 embedding_weight: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.power = check_power(power)
        self.attention_weight = float(attention_weight)
        self.embedding_weight = float(embedding_weight)
        self.backend = backend

    def forward(self, real_feats: RealInput, syn_feats: Sequence[torch.Tensor],
                real_emb: Optional[torch.Tensor] = None, syn_emb: Optional[torch.Tensor] = None) -> torch.Tensor:
        return attention_matching_loss(real_feats, syn_feats, real_emb, syn_emb, num_classes=self.num_classes,
                                       power=self.power, attention_weight=self.attention_weight,
                                       embedding_weight=self.embedding_weight, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, power={self.power}, attention_weight={self.attention_weight}, "
                f"embedding_weight={self.embedding_weight}, backend={self.backend!r}")
