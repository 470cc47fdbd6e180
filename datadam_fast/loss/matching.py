"""The DataDAM attention-matching loss: public function and ``nn.Module``."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._checks import (check_embedding, check_feature_list, check_label_values, check_num_classes,
                      check_pair, check_power, check_rows, check_same_device)
from .backends import check_backend_name
from ..errors import UserError, UserTypeError
from .ops import _run, prepare_backend
from .reference import acc_dtype, class_means
from .targets import ClassTargets, class_attention_means

RealInput = Union[Sequence[torch.Tensor], ClassTargets]
Terms = Dict[str, Union[torch.Tensor, List[torch.Tensor]]]


def _check_targets(targets: ClassTargets, real_emb, real_labels, syn_feats, K: int, power: float) -> None:
    if real_emb is not None:
        raise UserError("real_emb must be None when real targets (ClassTargets) are given; "
                        "put the embedding means in ClassTargets.embedding")
    if real_labels is not None:
        raise UserError("real_labels must be None when real targets (ClassTargets) are given: "
                        "targets are already per-class means")
    if targets.num_classes != K:
        raise UserError(f"targets have {targets.num_classes} classes but num_classes={K}")
    if len(targets.attention) != len(syn_feats):
        raise UserError(f"targets have {len(targets.attention)} layers but synthetic has {len(syn_feats)}")
    for i, (t, s) in enumerate(zip(targets.attention, syn_feats)):
        hw = s.shape[2] * s.shape[3]
        if tuple(t.shape) != (K, hw):
            raise UserError(f"layer {i}: target attention means {tuple(t.shape)}, expected [{K}, {hw}] "
                            f"for synthetic features {tuple(s.shape)}")
    if targets.power is not None and float(targets.power) != power:
        raise UserError(f"targets were computed with power={targets.power} but the loss uses power={power}")


def _check_layer_weights(layer_weights, num_layers: int) -> Optional[List[float]]:
    if layer_weights is None:
        return None
    if isinstance(layer_weights, torch.Tensor) or not isinstance(layer_weights, (list, tuple)):
        raise UserTypeError(f"layer_weights: expected a list of {num_layers} floats, got {type(layer_weights).__name__}")
    if len(layer_weights) != num_layers:
        raise UserError(f"layer_weights has {len(layer_weights)} entries but there are {num_layers} attention layers")
    return [float(w) for w in layer_weights]


def attention_matching_loss(real_feats: RealInput, syn_feats: Sequence[torch.Tensor],
                            real_emb: Optional[torch.Tensor] = None,
                            syn_emb: Optional[torch.Tensor] = None, *, num_classes: int,
                            power: float = 4.0, attention_weight: float = 100.0,
                            embedding_weight: float = 1.0, backend: str = "auto",
                            real_labels: Optional[torch.Tensor] = None,
                            syn_labels: Optional[torch.Tensor] = None,
                            layer_weights: Optional[Sequence[float]] = None,
                            return_terms: bool = False
                            ) -> Union[torch.Tensor, Tuple[torch.Tensor, Terms]]:
    """DataDAM loss (scalar float32), differentiable w.r.t. ``syn_feats`` and ``syn_emb``::

        sum_l attention_weight * w_l * sum_k || mean_real_k â_l - mean_syn_k â_l ||^2
      + embedding_weight * sum_k || mean_real_k e - mean_syn_k e ||^2

    ``real_feats``: list of ``[Nr, C_l, H_l, W_l]`` or a :class:`ClassTargets` (precomputed or
    streamed class means; then ``real_emb`` and ``real_labels`` must be None and the targets
    carry the embedding means). ``syn_feats``: list of ``[Ns, C_l, H_l, W_l]``.

    Rows: without labels, every layer and the embedding of a side are class-major with the same
    count per class (``N % num_classes != 0`` is an error). ``real_labels`` / ``syn_labels``
    (``[N]`` integer class indices) allow any row order and any per-class counts; the class means
    are then computed on the tensors' device (``index_add``; no host sync). CPU labels are also
    checked on the host (range, every class present); labels on an accelerator are not read back:
    an empty class there gives a NaN loss.

    ``layer_weights``: one multiplier ``w_l`` per layer (default 1). A layer whose weight
    ``attention_weight * w_l`` is 0 is skipped entirely (no kernel call, no gradient);
    ``attention_weight=0`` skips all attention work. ``return_terms=True`` returns
    ``(loss, terms)`` with ``terms["attention_layers"]`` (weighted per-layer terms),
    ``terms["attention"]`` (their sum) and ``terms["embedding"]`` (weighted), all 0-d tensors of
    the loss's dtype; ``loss == terms["attention"] + terms["embedding"]``.

    The real side never gets gradients. Non-finite inputs propagate to a non-finite loss.
    Traceable by ``torch.compile(fullgraph=True)`` and ``torch.export``.
    """
    K = check_num_classes(num_classes)
    power = check_power(power)
    check_backend_name(backend)
    attention_weight, embedding_weight = float(attention_weight), float(embedding_weight)
    syn_feats = check_feature_list(syn_feats, "synthetic", K if syn_labels is None else None)
    targets = real_feats if isinstance(real_feats, ClassTargets) else None
    if targets is not None:
        _check_targets(targets, real_emb, real_labels, syn_feats, K, power)
    else:
        real_feats = check_feature_list(real_feats, "real", K if real_labels is None else None)
        check_pair(real_feats, syn_feats)
    if syn_emb is not None:
        check_embedding(syn_emb, "synthetic", K if syn_labels is None else None)
        if targets is not None:
            if targets.embedding is None:
                raise UserError("syn_emb given but the targets carry no embedding means")
            real_w = targets.embedding.shape[-1]
        else:
            if real_emb is None:
                raise UserError("syn_emb given without real_emb")
            check_embedding(real_emb, "real", K if real_labels is None else None)
            real_w = real_emb.shape[1]
        if real_w != syn_emb.shape[1]:
            raise UserError(f"embedding width mismatch: real {real_w} vs synthetic {syn_emb.shape[1]}")
    elif real_emb is not None:
        raise UserError("real_emb given without syn_emb")
    if not syn_feats and syn_emb is None:
        raise UserError("nothing to match: no attention layers and no embedding")
    syn_labels = check_rows("synthetic", syn_feats, syn_emb, syn_labels, K, "syn_labels")
    if targets is None:
        real_labels = check_rows("real", real_feats, real_emb, real_labels, K, "real_labels")
    for name, lab in (("real_labels", real_labels), ("syn_labels", syn_labels)):
        if lab is not None:
            check_label_values(name, lab, K)
    weights = _check_layer_weights(layer_weights, len(syn_feats))
    layer_w = [attention_weight * (1.0 if weights is None else weights[i]) for i in range(len(syn_feats))]
    active = [i for i, w in enumerate(layer_w) if w != 0.0]

    tensors = list(syn_feats) + [syn_emb, real_emb]
    tensors += list(real_feats) if targets is None else list(targets.attention) + [targets.embedding]
    device = check_same_device(tensors, "real and synthetic tensors")
    if active:
        prepare_backend(backend, device)

    acc = torch.float64 if any(f.dtype == torch.float64 for f in syn_feats) else torch.float32
    zero = torch.zeros((), dtype=acc, device=device)
    layer_terms: List[torch.Tensor] = [zero] * len(syn_feats)
    if active:
        if targets is None:
            with torch.no_grad():
                real_att = class_attention_means([real_feats[i].detach() for i in active], num_classes=K,
                                                 power=power, backend=backend, labels=real_labels)
        else:
            real_att = [targets.attention[i].detach() for i in active]
        syn_maps = _run([syn_feats[i] for i in active], power, backend)
        for i, r, m in zip(active, real_att, syn_maps):
            d = r.to(m.dtype) - class_means(m, K, syn_labels, f"synthetic layer {i}")
            layer_terms[i] = layer_w[i] * (d * d).sum()
    emb_term = zero
    if syn_emb is not None and embedding_weight != 0.0:
        if targets is None:
            with torch.no_grad():
                real_mean = class_means(real_emb.detach().to(acc_dtype(real_emb)), K, real_labels, "real embedding")
        else:
            real_mean = targets.embedding.detach()
        s = class_means(syn_emb.to(acc_dtype(syn_emb)), K, syn_labels, "synthetic embedding")
        d = real_mean.to(s.dtype) - s
        emb_term = embedding_weight * (d * d).sum()
    att_term = zero
    for t in layer_terms:
        att_term = att_term + t.to(acc)
    loss = att_term + emb_term.to(acc)
    if return_terms:
        return loss, {"attention_layers": layer_terms, "attention": att_term, "embedding": emb_term}
    return loss


class AttentionMatchingLoss(torch.nn.Module):
    """``nn.Module`` form of :func:`attention_matching_loss` with the options fixed at construction."""

    def __init__(self, num_classes: int, *, power: float = 4.0, attention_weight: float = 100.0,
                 embedding_weight: float = 1.0, backend: str = "auto",
                 layer_weights: Optional[Sequence[float]] = None):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.power = check_power(power)
        self.attention_weight = float(attention_weight)
        self.embedding_weight = float(embedding_weight)
        self.backend = check_backend_name(backend)
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]

    def forward(self, real_feats: RealInput, syn_feats: Sequence[torch.Tensor],
                real_emb: Optional[torch.Tensor] = None, syn_emb: Optional[torch.Tensor] = None, *,
                real_labels: Optional[torch.Tensor] = None, syn_labels: Optional[torch.Tensor] = None,
                return_terms: bool = False):
        return attention_matching_loss(real_feats, syn_feats, real_emb, syn_emb, num_classes=self.num_classes,
                                       power=self.power, attention_weight=self.attention_weight,
                                       embedding_weight=self.embedding_weight, backend=self.backend,
                                       real_labels=real_labels, syn_labels=syn_labels,
                                       layer_weights=self.layer_weights, return_terms=return_terms)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, power={self.power}, attention_weight={self.attention_weight}, "
                f"embedding_weight={self.embedding_weight}, backend={self.backend!r}")
