"""Plain-PyTorch oracle for everything the fused backends compute.

Every fused path is tested against these functions. They favour clarity over speed: they
materialise ``|f|^p`` and the ``[N, H*W]`` maps exactly as the official DataDAM code does
(``utils.py:get_attention`` with ``norm='l2'``, ``main_DataDAM.py`` ``MSE_B``), but accumulate
in float32 (or float64 when given float64) so that bf16/fp16 inputs have a well-defined target.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # F.normalize's default eps, as used by the official code


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def spatial_attention(feat: torch.Tensor, power: float = 4.0) -> torch.Tensor:
    """L2-normalised channel-power attention ``a / max(||a||_2, 1e-12)`` with ``a = sum_c |f_c|^p``.

    ``feat`` is ``[N, C, H, W]`` (any strides); returns ``[N, H*W]`` (row-major h, w) in float32
    (float64 for float64 input).
    """
    f = feat.to(_acc_dtype(feat))
    a = f.abs().pow(power).sum(dim=1).flatten(1)
    return F.normalize(a, p=2, dim=1, eps=NORM_EPS)


def class_means(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class mean of class-major rows: ``[K*B, ...] -> [K, ...]``."""
    return x.reshape(num_classes, x.shape[0] // num_classes, *x.shape[1:]).mean(dim=1)


def class_attention_means(feats: Sequence[torch.Tensor], num_classes: int,
                          power: float = 4.0) -> list:
    return [class_means(spatial_attention(f, power), num_classes) for f in feats]


def attention_matching_loss(real_feats: Sequence[torch.Tensor], syn_feats: Sequence[torch.Tensor],
                            real_emb: Optional[torch.Tensor] = None,
                            syn_emb: Optional[torch.Tensor] = None, *, num_classes: int,
                            power: float = 4.0, attention_weight: float = 100.0,
                            embedding_weight: float = 1.0,
                            real_attention_means: Optional[Sequence[torch.Tensor]] = None,
                            real_embedding_means: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The DataDAM loss, written out term by term.

    ``real_attention_means`` / ``real_embedding_means`` replace the real features / embedding
    when given (precomputed or streamed targets).
    """
    if real_attention_means is None:
        real_attention_means = class_attention_means(real_feats, num_classes, power)
    syn_means = class_attention_means(syn_feats, num_classes, power)
    loss = syn_means[0].new_zeros(())
    for r, s in zip(real_attention_means, syn_means):
        loss = loss + attention_weight * (r.detach().to(s.dtype) - s).pow(2).sum()
    if syn_emb is not None:
        if real_embedding_means is None:
            real_embedding_means = class_means(real_emb.to(_acc_dtype(real_emb)), num_classes)
        s = class_means(syn_emb.to(_acc_dtype(syn_emb)), num_classes)
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
