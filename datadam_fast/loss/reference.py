"""Plain-PyTorch oracle for everything the fused backends compute.

Every fused path is tested against these functions. They favour clarity over speed: they
materialise ``|f|^p`` and the ``[N, H*W]`` maps exactly as the official DataDAM code does
(``utils.py:get_attention`` with ``norm='l2'``, ``main_DataDAM.py`` ``MSE_B``), but accumulate
in float32 (or float64 when given float64) so that bf16/fp16 inputs have a well-defined target.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .._constants import NORM_EPS  # F.normalize's default eps, as used by the official code
from ..errors import UserError


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of every backend: float64 for float64 input, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attention_maps_and_norms(feat: torch.Tensor, power: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The spatial-attention formula, written once in plain tensor ops: ``a = sum_c |f_c|^p`` in the
    accumulation dtype, returned as ``(a / max(||a||_2, 1e-12), ||a||_2)``, ``[N, H*W]`` and ``[N]``.

    The reference, the reference backend and the compiled passes (where inductor fuses it into the
    network's epilogue: a bf16 activation is read once, the power and sums taken in fp32) all call
    this. ``power == 1`` skips the power (exact either way; one op fewer in a traced graph).
    """
    f = feat.to(acc_dtype(feat)).abs()
    a = (f if power == 1.0 else f.pow(power)).sum(dim=1).flatten(1)
    n = a.norm(dim=1, keepdim=True)
    return a / n.clamp_min(NORM_EPS), n.squeeze(1)


def spatial_attention(feat: torch.Tensor, power: float = 4.0) -> torch.Tensor:
    """L2-normalised channel-power attention ``a / max(||a||_2, 1e-12)`` with ``a = sum_c |f_c|^p``.

    ``feat`` is ``[N, C, H, W]`` (any strides); returns ``[N, H*W]`` (row-major h, w) in float32
    (float64 for float64 input).
    """
    return attention_maps_and_norms(feat, power)[0]


def class_means(x: torch.Tensor, num_classes: int, labels: Optional[torch.Tensor] = None,
                what: str = "input") -> torch.Tensor:
    """Per-class mean of rows: ``[N, ...] -> [K, ...]``; the one class-mean function of the package.

    Without ``labels`` the rows are class-major with the same count per class (``N % K == 0`` is
    required: anything else is an error, never a silent reshape). With ``labels`` (``[N]``
    integer class indices, any order, any per-class counts) the means are exact sums over each
    class divided by its count, computed on ``x``'s device with ``index_add`` (no host sync; a
    class with no row gets 0/0 = NaN, which propagates to the loss rather than being hidden).
    """
    N = x.shape[0]
    if labels is None:
        if N % num_classes:
            raise UserError(f"{what}: {N} rows cannot be split evenly into num_classes={num_classes}; rows must "
                            f"be class-major with the same count per class, or pass labels")
        return x.reshape(num_classes, N // num_classes, *x.shape[1:]).mean(dim=1)
    labels = labels.to(x.device)
    sums = x.new_zeros((num_classes, *x.shape[1:])).index_add(0, labels, x)
    counts = x.new_zeros((num_classes,)).index_add(0, labels, x.new_ones((N,)))
    return sums / counts.view(num_classes, *([1] * (x.dim() - 1)))


def class_attention_means(feats: Sequence[torch.Tensor], num_classes: int,
                          power: float = 4.0, labels: Optional[torch.Tensor] = None) -> list:
    return [class_means(spatial_attention(f, power), num_classes, labels) for f in feats]


def attention_matching_loss(real_feats: Sequence[torch.Tensor], syn_feats: Sequence[torch.Tensor],
                            real_emb: Optional[torch.Tensor] = None,
                            syn_emb: Optional[torch.Tensor] = None, *, num_classes: int,
                            power: float = 4.0, attention_weight: float = 100.0,
                            embedding_weight: float = 1.0,
                            real_attention_means: Optional[Sequence[torch.Tensor]] = None,
                            real_embedding_means: Optional[torch.Tensor] = None,
                            real_labels: Optional[torch.Tensor] = None,
                            syn_labels: Optional[torch.Tensor] = None,
                            layer_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """The DataDAM loss, written out term by term.

    ``real_attention_means`` / ``real_embedding_means`` replace the real features / embedding
    when given (precomputed or streamed targets). ``*_labels``: per-row class indices (any order).
    """
    if real_attention_means is None:
        real_attention_means = class_attention_means(real_feats, num_classes, power, real_labels)
    syn_means = class_attention_means(syn_feats, num_classes, power, syn_labels)
    lw = [1.0] * len(syn_means) if layer_weights is None else list(layer_weights)
    ref = syn_feats[0] if syn_feats else syn_emb
    loss = torch.zeros((), dtype=torch.float64 if any(f.dtype == torch.float64 for f in syn_feats)
                       else torch.float32, device=ref.device)
    for r, s, w in zip(real_attention_means, syn_means, lw):
        loss = loss + attention_weight * w * (r.detach().to(s.dtype) - s).pow(2).sum()
    if syn_emb is not None:
        if real_embedding_means is None:
            real_embedding_means = class_means(real_emb.to(acc_dtype(real_emb)), num_classes, real_labels)
        s = class_means(syn_emb.to(acc_dtype(syn_emb)), num_classes, syn_labels)
        loss = loss + embedding_weight * (real_embedding_means.detach().to(s.dtype) - s).pow(2).sum()
    return loss


def spatial_attention_backward(feat: torch.Tensor, maps: torch.Tensor, norms: torch.Tensor,
                               grad_maps: torch.Tensor, power: float) -> torch.Tensor:
    """Closed-form VJP of :func:`spatial_attention`, written out for the backends to mirror.

    With ``n = ||a||``, ``m = a / max(n, eps)`` and ``g = dL/dm``::

        dL/da = (g - m * <m, g>) / n      if n > eps   (projection off the unit sphere)
              =  g / eps                   otherwise    (the clamp is constant in a)
        dL/df = p * |f|^(p-1) * sign(f) * dL/da          (broadcast over channels)

    ``maps``/``norms`` are the forward's saved ``m`` and ``n`` (float32); nothing ``[N,C,H,W]`` is saved.
    """
    N, C, H, W = feat.shape
    g = grad_maps.to(maps.dtype)
    dot = (maps * g).sum(dim=1, keepdim=True)
    n = norms.to(maps.dtype).unsqueeze(1)
    ga = torch.where(n > NORM_EPS, (g - maps * dot) / n.clamp_min(NORM_EPS), g / NORM_EPS)
    f = feat.to(maps.dtype)
    if power == 1.0:
        df = torch.sign(f)
    else:
        df = power * f.abs().pow(power - 1) * torch.sign(f)
    return (df * ga.view(N, 1, H, W)).to(feat.dtype)
