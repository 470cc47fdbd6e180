"""Per-sample channel statistics as registered operators: channel attention (ATOM's channel map:
``sum_hw |f|^p`` per channel, L2-normalised over channels) and channel moments (per-sample channel
means of ``f`` and ``f^2``, the statistic of BatchNorm-matching methods: IID, WMDD, EDC ...).

Ops (namespace ``datadam_fast``)::

    channel_attention_fwd(Tensor feat, float power, str backend="auto") -> (Tensor att, Tensor norms)
    channel_attention_bwd(Tensor feat, Tensor att, Tensor norms, Tensor grad_att, float power,
                          str backend="auto") -> Tensor
    channel_moments_fwd(Tensor feat, str backend="auto") -> (Tensor mean, Tensor sq_mean)
    channel_moments_bwd(Tensor feat, Tensor grad_mean, Tensor grad_sq_mean, str backend="auto") -> Tensor

Both read the ``[N, C, H, W]`` map once (C++ on CPU, Triton on CUDA; NCHW and channels_last in
place) and return ``[N, C]`` rows, one per sample: per-class means of them are what the engine's
``ClassSums`` streams, so chunks and shards add up exactly. Outputs are float32 (float64 for
float64 input); gradients have the input's dtype, channels_last when the input is.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference as R
from .._constants import NORM_EPS
from ..errors import UserTypeError
from ..profiling import nvtx_range
from ._checks import check_num_classes, check_power
from ._oplib import grad_memory_format
from .backends import check_backend_name, resolve_backend, run_with_fallback
from .characteristic import class_counts, implementation, row_labels
from .reference import acc_dtype


def _triton():
    from ..kernels import channel_statistics as K
    return K


def _native(feat: Tensor) -> Tensor:
    """The C++ kernels take float32/float64 NCHW or channels_last (other layouts: one copy)."""
    f = feat if feat.dtype in (torch.float32, torch.float64) else feat.float()
    return f


def _attention_norm(s: Tensor) -> Tuple[Tensor, Tensor]:
    n = s.norm(dim=1)
    return s / n.clamp_min(NORM_EPS).unsqueeze(1), n


def _attention_grad_sums(att: Tensor, norms: Tensor, grad: Tensor) -> Tensor:
    """dL/ds for s the channel sums, from dL/d(att): the projection off the unit sphere."""
    g = grad.to(att.dtype)
    dot = (att * g).sum(1, keepdim=True)
    n = norms.to(att.dtype).unsqueeze(1)
    return torch.where(n > NORM_EPS, (g - att * dot) / n.clamp_min(NORM_EPS), g / NORM_EPS)


@torch.library.custom_op("datadam_fast::channel_attention_fwd", mutates_args=())
def channel_attention_fwd(feat: Tensor, power: float, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    def call(be):
        impl = implementation(be.name)
        with nvtx_range(f"datadam_fast.channel_attention.{impl}.forward"):
            if impl == "cpu":
                a, n = torch.ops.datadam_fast.cpu_channel_attention(_native(feat), float(power))
                return a, n
            if impl == "triton" and feat.dtype != torch.float64:
                s, _ = _triton().channel_sums(feat, False, float(power))
                return _attention_norm(s)
            a, n = R.channel_attention_and_norms(feat, power)
            return a.contiguous(), n.contiguous()
    return run_with_fallback(backend, feat.device, "forward", call)


@torch.library.custom_op("datadam_fast::channel_attention_bwd", mutates_args=())
def channel_attention_bwd(feat: Tensor, att: Tensor, norms: Tensor, grad_att: Tensor, power: float,
                          backend: str = "auto") -> Tensor:
    fmt = grad_memory_format(feat)

    def call(be):
        impl = implementation(be.name)
        with nvtx_range(f"datadam_fast.channel_attention.{impl}.backward"):
            if impl == "cpu":
                return torch.ops.datadam_fast.cpu_channel_attention_bwd(_native(feat), att, norms, grad_att,
                                                                        float(power))
            if impl == "triton" and feat.dtype != torch.float64:
                out = torch.empty_like(feat, memory_format=fmt)
                return _triton().channel_grad(feat, _attention_grad_sums(att, norms, grad_att), None, out, False,
                                              float(power))
            return R.channel_attention_backward(feat, att, norms, grad_att, power)
    g = run_with_fallback(backend, feat.device, "backward", call)
    return g.to(feat.dtype).contiguous(memory_format=fmt)


@torch.library.custom_op("datadam_fast::channel_moments_fwd", mutates_args=())
def channel_moments_fwd(feat: Tensor, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    def call(be):
        impl = implementation(be.name)
        with nvtx_range(f"datadam_fast.channel_moments.{impl}.forward"):
            if impl == "cpu":
                m1, m2 = torch.ops.datadam_fast.cpu_channel_moments(_native(feat))
                return m1, m2
            if impl == "triton" and feat.dtype != torch.float64:
                s1, s2 = _triton().channel_sums(feat, True)
                hw = max(feat.shape[2] * feat.shape[3], 1)
                return s1 / hw, s2 / hw
            m1, m2 = R.channel_moments(feat)
            return m1.contiguous(), m2.contiguous()
    return run_with_fallback(backend, feat.device, "forward", call)


@torch.library.custom_op("datadam_fast::channel_moments_bwd", mutates_args=())
def channel_moments_bwd(feat: Tensor, grad_mean: Tensor, grad_sq_mean: Tensor, backend: str = "auto") -> Tensor:
    fmt = grad_memory_format(feat)

    def call(be):
        impl = implementation(be.name)
        with nvtx_range(f"datadam_fast.channel_moments.{impl}.backward"):
            if impl == "cpu":
                return torch.ops.datadam_fast.cpu_channel_moments_bwd(_native(feat), grad_mean, grad_sq_mean)
            if impl == "triton" and feat.dtype != torch.float64:
                out = torch.empty_like(feat, memory_format=fmt)
                return _triton().channel_grad(feat, grad_mean, grad_sq_mean, out, True)
            f = feat.to(acc_dtype(feat))
            hw = max(f.shape[2] * f.shape[3], 1)
            return (grad_mean.to(f.dtype)[:, :, None, None] + 2 * f * grad_sq_mean.to(f.dtype)[:, :, None, None]) / hw
    g = run_with_fallback(backend, feat.device, "backward", call)
    return g.to(feat.dtype).contiguous(memory_format=fmt)


@torch.library.register_fake("datadam_fast::channel_attention_fwd")
def _fake_att(feat, power, backend="auto"):
    N, C = feat.shape[:2]
    return feat.new_empty((N, C), dtype=acc_dtype(feat)), feat.new_empty((N,), dtype=acc_dtype(feat))


@torch.library.register_fake("datadam_fast::channel_attention_bwd")
def _fake_att_bwd(feat, att, norms, grad_att, power, backend="auto"):
    return torch.empty_like(feat, memory_format=grad_memory_format(feat))


@torch.library.register_fake("datadam_fast::channel_moments_fwd")
def _fake_mom(feat, backend="auto"):
    N, C = feat.shape[:2]
    return feat.new_empty((N, C), dtype=acc_dtype(feat)), feat.new_empty((N, C), dtype=acc_dtype(feat))


@torch.library.register_fake("datadam_fast::channel_moments_bwd")
def _fake_mom_bwd(feat, grad_mean, grad_sq_mean, backend="auto"):
    return torch.empty_like(feat, memory_format=grad_memory_format(feat))


def _att_setup(ctx, inputs, output):
    feat, power, *extra = inputs
    att, norms = output
    ctx.power, ctx.extra = power, tuple(extra)
    ctx.mark_non_differentiable(norms)
    ctx.save_for_backward(feat, att, norms)


def _att_backward(ctx, grad_att, _grad_norms):
    feat, att, norms = ctx.saved_tensors
    if grad_att is None:
        grad_att = torch.zeros_like(att)
    g = torch.ops.datadam_fast.channel_attention_bwd(feat, att, norms, grad_att, ctx.power, *ctx.extra)
    return (g,) + (None,) * (len(ctx.needs_input_grad) - 1)


def _mom_setup(ctx, inputs, output):
    feat, *extra = inputs
    ctx.extra = tuple(extra)
    ctx.shape = output[0].shape
    ctx.save_for_backward(feat)


def _mom_backward(ctx, g1, g2):
    (feat,) = ctx.saved_tensors
    acc = acc_dtype(feat)
    g1 = torch.zeros(ctx.shape, dtype=acc, device=feat.device) if g1 is None else g1
    g2 = torch.zeros(ctx.shape, dtype=acc, device=feat.device) if g2 is None else g2
    g = torch.ops.datadam_fast.channel_moments_bwd(feat, g1, g2, *ctx.extra)
    return (g,) + (None,) * (len(ctx.needs_input_grad) - 1)


torch.library.register_autograd("datadam_fast::channel_attention_fwd", _att_backward, setup_context=_att_setup)
torch.library.register_autograd("datadam_fast::channel_moments_fwd", _mom_backward, setup_context=_mom_setup)


# ---------------------------------------------------------------------------------------------
def _check_feat(feat) -> None:
    if not isinstance(feat, Tensor) or feat.dim() != 4 or not feat.dtype.is_floating_point:
        got = f"{tuple(feat.shape)} {feat.dtype}" if isinstance(feat, Tensor) else type(feat).__name__
        raise UserTypeError(f"feat: expected a floating [N, C, H, W] feature map, got {got}")


def _prepare(backend: str, device) -> None:
    check_backend_name(backend)
    if not torch.compiler.is_compiling():
        resolve_backend(backend, device)


def channel_attention(feat: Tensor, *, power: float = 4.0, backend: str = "auto") -> Tensor:
    """``[N, C]`` channel attention: ``s_c = sum_hw |f_c|^p``, L2-normalised over channels
    (``s / max(||s||, 1e-12)``). Differentiable; traceable by ``torch.compile(fullgraph=True)``."""
    _check_feat(feat)
    power = check_power(power)
    _prepare(backend, feat.device)
    return torch.ops.datadam_fast.channel_attention_fwd(feat, power, backend)[0]


def channel_moments(feat: Tensor, *, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Per-sample channel means of ``f`` and of ``f^2`` over ``H x W``: ``[N, C]`` each."""
    _check_feat(feat)
    _prepare(backend, feat.device)
    m1, m2 = torch.ops.datadam_fast.channel_moments_fwd(feat, backend)
    return m1, m2


def class_channel_moments(feat: Tensor, num_classes: int, labels: Optional[Tensor] = None, *,
                          backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Per-class channel mean and (biased) variance over the class's samples and pixels:
    ``[K, C]`` each; ``labels`` in any order (None: class-major rows, equal counts)."""
    K = check_num_classes(num_classes)
    m1, m2 = channel_moments(feat, backend=backend)
    lab = row_labels(feat.shape[0], K, labels, feat.device, "feat")
    n = class_counts(lab, K, m1.dtype).unsqueeze(1)
    mean = m1.new_zeros((K, m1.shape[1])).index_add(0, lab, m1) / n
    sq = m2.new_zeros((K, m2.shape[1])).index_add(0, lab, m2) / n
    return mean, sq - mean * mean
