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


# ---------------------------------------------------------------------------------------------
# the other per-class statistics of the distribution-matching family (see loss/characteristic.py
# and loss/channels.py for the fused operators)
# ---------------------------------------------------------------------------------------------
def class_rows(labels: torch.Tensor, num_classes: int):
    """``[(k, row indices of class k)]`` for the classes that have rows (host-side, reference only)."""
    lab = labels.detach().cpu()
    return [(k, (lab == k).nonzero().flatten().to(labels.device)) for k in range(num_classes)
            if bool((lab == k).any())]


def cf_class_sums(emb: torch.Tensor, freqs: torch.Tensor, labels: torch.Tensor,
                  num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of ``cos(t_k . e_i)`` and ``sin(t_k . e_i)`` over the rows ``i`` of class ``k``:
    ``[K, F]`` each, in the accumulation dtype. ``freqs``: ``[F, D]`` (shared) or ``[K, F, D]``.
    Materialises each class's ``[n_k, F]`` projection (the oracle, not the fast path)."""
    acc = torch.float64 if torch.float64 in (emb.dtype, freqs.dtype) else torch.float32
    e, t = emb.to(acc), freqs.to(acc)
    F = t.shape[-2]
    cos_s = e.new_zeros((num_classes, F))
    sin_s = e.new_zeros((num_classes, F))
    for k, rows in class_rows(labels, num_classes):
        p = e[rows] @ (t if t.dim() == 2 else t[k]).t()
        cos_s = cos_s.index_add(0, torch.full((1,), k, device=e.device), p.cos().sum(0, keepdim=True))
        sin_s = sin_s.index_add(0, torch.full((1,), k, device=e.device), p.sin().sum(0, keepdim=True))
    return cos_s, sin_s


def cf_loss(real_re: torch.Tensor, real_im: torch.Tensor, syn_re: torch.Tensor, syn_im: torch.Tensor, *,
            alpha: float = 0.5, beta: float = 0.5, weight: float = 300.0) -> torch.Tensor:
    """NCFM's loss (``NCFM/NCFM.py`` ``CFLossFunc`` times ``match_loss``'s 300), per class, summed over
    classes: ``weight * mean_f sqrt(alpha * (|r| - |s|)^2 + beta * max(2 (|r||s| - Re r Re s - Im r
    Im s), 1e-12))`` for the characteristic functions ``r`` (real) and ``s`` (synthetic), ``[K, F]``."""
    rn = torch.sqrt(real_re * real_re + real_im * real_im)
    sn = torch.sqrt(syn_re * syn_re + syn_im * syn_im)
    amp = (rn - sn) ** 2
    pha = (2 * (rn * sn - syn_re * real_re - syn_im * real_im)).clamp(min=1e-12)
    return (weight * torch.sqrt(alpha * amp + beta * pha).mean(dim=1)).sum()


def channel_attention_and_norms(feat: torch.Tensor, power: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Channel attention (ATOM): ``s_c = sum_hw |f_c|^p``, returned as ``(s / max(||s||_2, 1e-12),
    ||s||_2)``, ``[N, C]`` and ``[N]``, in the accumulation dtype."""
    f = feat.to(acc_dtype(feat)).abs()
    s = (f if power == 1.0 else f.pow(power)).sum(dim=(2, 3))
    n = s.norm(dim=1, keepdim=True)
    return s / n.clamp_min(NORM_EPS), n.squeeze(1)


def channel_attention(feat: torch.Tensor, power: float = 4.0) -> torch.Tensor:
    return channel_attention_and_norms(feat, power)[0]


def channel_moments(feat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample channel means of ``f`` and ``f^2`` over ``H x W``: ``[N, C]`` each (accumulation
    dtype). Per-class channel mean and variance follow from their class means:
    ``mean = E[m1]``, ``var = E[m2] - mean^2`` (over the class's samples and pixels)."""
    f = feat.to(acc_dtype(feat))
    return f.mean(dim=(2, 3)), (f * f).mean(dim=(2, 3))


def cf_projection(emb: torch.Tensor, freqs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``P[i, f] = t_{k(i)} . e_i`` (``[N, F]``, in the given dtype): what the fused paths never store."""
    if freqs.dim() == 2:
        return emb @ freqs.t()
    p = emb.new_zeros((emb.shape[0], freqs.shape[1]))
    for k, rows in class_rows(labels, num_classes):
        p[rows] = emb[rows] @ freqs[k].t()
    return p


def cf_class_sums_backward(emb: torch.Tensor, freqs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                           grad_cos: torch.Tensor, grad_sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Closed-form VJP of :func:`cf_class_sums` (for the backends to mirror). With ``P`` the
    projection and ``k(i)`` row i's class::

        G[i, f]   = g_sin[k(i), f] * cos(P[i, f]) - g_cos[k(i), f] * sin(P[i, f])
        dL/de_i   = sum_f G[i, f] t_{k(i), f}          (G @ t_k per class)
        dL/dt_k   = sum_{i in k} G[i, :]^T e_i          (G_k^T @ E_k; summed over classes when shared)
    """
    p = cf_projection(emb, freqs, labels, num_classes)
    lab = labels.to(emb.device)
    g = grad_sin.to(p.dtype)[lab] * p.cos() - grad_cos.to(p.dtype)[lab] * p.sin()
    if freqs.dim() == 2:
        return g @ freqs, g.t() @ emb
    ge = torch.zeros_like(emb)
    gf = torch.zeros_like(freqs)
    for k, rows in class_rows(labels, num_classes):
        ge[rows] = g[rows] @ freqs[k]
        gf[k] = g[rows].t() @ emb[rows]
    return ge, gf


def channel_attention_backward(feat: torch.Tensor, att: torch.Tensor, norms: torch.Tensor,
                               grad_att: torch.Tensor, power: float) -> torch.Tensor:
    """Closed-form VJP of :func:`channel_attention` (the spatial formula with channels and pixels
    exchanged): ``dL/ds = (g - a <a, g>) / n`` (``g / eps`` when ``n <= eps``), then
    ``dL/df = p |f|^(p-1) sign(f) * dL/ds`` broadcast over ``H x W``."""
    g = grad_att.to(att.dtype)
    dot = (att * g).sum(dim=1, keepdim=True)
    n = norms.to(att.dtype).unsqueeze(1)
    gs = torch.where(n > NORM_EPS, (g - att * dot) / n.clamp_min(NORM_EPS), g / NORM_EPS)
    f = feat.to(att.dtype)
    df = torch.sign(f) if power == 1.0 else power * f.abs().pow(power - 1) * torch.sign(f)
    return df * gs[:, :, None, None]
