"""The characteristic-function statistic (NCFM, CVPR 2025) as a registered operator, and the
drop-in NCFM loss.

For embeddings ``e`` (``[N, D]``) and frequencies ``t`` (``[K, F, D]``: one matrix per class, or
``[F, D]`` shared by all classes) the statistic is, per class ``k``, the sums over the class's rows
of ``cos(t_k . e_i)`` and ``sin(t_k . e_i)`` (``[K, F]`` each); divided by the class counts they are
the real and imaginary parts of the class's empirical characteristic function at ``t_k``. Sums,
not means, are what the op returns: chunks of a class's rows and torchrun shards then add up to
the one-pass result (the engine's ``ClassSums``).

Ops (namespace ``datadam_fast``)::

    cf_class_sums_fwd(Tensor emb, Tensor freqs, Tensor labels, int num_classes, bool save_projection,
                      str backend="auto") -> (Tensor cos_sums, Tensor sin_sums, Tensor proj)
    cf_class_sums_bwd(Tensor emb, Tensor freqs, Tensor labels, int num_classes, Tensor grad_cos,
                      Tensor grad_sin, Tensor proj, bool need_emb, bool need_freqs,
                      str backend="auto") -> (Tensor grad_emb, Tensor grad_freqs)

The cost is the projection GEMM ``E @ t_k^T``; the fused paths (C++ on CPU, Triton on CUDA) take
cos/sin and the per-class reduction in its epilogue and never write the ``[N, F]`` projection. The
backward recomputes it; ``save_projection`` (chosen by :func:`cf_class_sums` when the rows need a
gradient and ``N * F`` is small, i.e. the synthetic side) keeps it instead, so that the backward
is one GEMM per direction, as autograd of the plain code would be. ``proj`` is saved state, not
a differentiable output. Accumulation is float32 (float64 for float64 input); gradients come back
in the inputs' dtypes.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import reference as R
from ..errors import UserError, UserTypeError
from ..profiling import nvtx_range
from ._checks import check_label_values, check_num_classes
from .backends import check_backend_name, resolve_backend, run_with_fallback

#: ``N * F`` up to which a forward whose rows need a gradient keeps the projection for the
#: backward (64 MB of float32): the synthetic side; the real side (no grad) never keeps it
SAVE_PROJECTION_MAX = 1 << 24


def acc_dtype(*ts: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def implementation(backend_name: str) -> str:
    """The statistic's implementation behind a loss backend's name: ``reference``, ``cpu`` (C++)
    or ``triton``; the ``cuda`` backend has no hand-written kernel for it and runs the Triton one."""
    return "triton" if backend_name in ("triton", "cuda") else backend_name


def _triton():
    from ..kernels import characteristic_function as K
    return K


@torch.library.custom_op("datadam_fast::cf_class_sums_fwd", mutates_args=())
def cf_class_sums_fwd(emb: Tensor, freqs: Tensor, labels: Tensor, num_classes: int, save_projection: bool,
                      backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    acc = acc_dtype(emb, freqs)
    e, t = emb.to(acc), freqs.to(acc)
    K = int(num_classes)

    def call(be):
        impl = implementation(be.name)
        with nvtx_range(f"datadam_fast.cf.{impl}.forward"):
            if impl == "cpu":
                c, s, p = torch.ops.datadam_fast.cpu_cf_class_sums(e, t, labels, K, bool(save_projection))
                return c, s, p
            if impl == "triton":
                return _triton().cf_class_sums_forward(e, t, labels, K, bool(save_projection))
            c, s = R.cf_class_sums(e, t, labels, K)
            p = R.cf_projection(e, t, labels, K) if save_projection else e.new_empty((0,))
            return c, s, p
    return run_with_fallback(backend, emb.device, "forward", call)


@torch.library.custom_op("datadam_fast::cf_class_sums_bwd", mutates_args=())
def cf_class_sums_bwd(emb: Tensor, freqs: Tensor, labels: Tensor, num_classes: int, grad_cos: Tensor,
                      grad_sin: Tensor, proj: Tensor, need_emb: bool, need_freqs: bool,
                      backend: str = "auto") -> Tuple[Tensor, Tensor]:
    acc = acc_dtype(emb, freqs)
    e, t = emb.to(acc), freqs.to(acc)
    gc, gs = grad_cos.to(acc), grad_sin.to(acc)
    K = int(num_classes)

    def call(be):
        impl = implementation(be.name)
        with nvtx_range(f"datadam_fast.cf.{impl}.backward"):
            if impl == "cpu":
                return torch.ops.datadam_fast.cpu_cf_class_sums_bwd(e, t, labels, K, gc, gs, proj.to(acc),
                                                                   bool(need_emb), bool(need_freqs))
            if impl == "triton":
                return _triton().cf_class_sums_backward(e, t, labels, K, gc, gs, proj.to(acc), bool(need_emb),
                                                        bool(need_freqs))
            ge, gf = R.cf_class_sums_backward(e, t, labels, K, gc, gs)
            return (ge if need_emb else e.new_empty((0,))), (gf if need_freqs else t.new_empty((0,)))
    ge, gf = run_with_fallback(backend, emb.device, "backward", call)
    ge = ge.to(emb.dtype) if need_emb else emb.new_empty((0,))
    gf = gf.to(freqs.dtype) if need_freqs else freqs.new_empty((0,))
    return ge, gf


@torch.library.register_fake("datadam_fast::cf_class_sums_fwd")
def _fake_fwd(emb, freqs, labels, num_classes, save_projection, backend="auto"):
    acc = acc_dtype(emb, freqs)
    F = freqs.shape[-2]
    proj = emb.new_empty((emb.shape[0], F) if save_projection else (0,), dtype=acc)
    return (emb.new_empty((num_classes, F), dtype=acc), emb.new_empty((num_classes, F), dtype=acc), proj)


@torch.library.register_fake("datadam_fast::cf_class_sums_bwd")
def _fake_bwd(emb, freqs, labels, num_classes, grad_cos, grad_sin, proj, need_emb, need_freqs, backend="auto"):
    return (emb.new_empty(emb.shape if need_emb else (0,)), freqs.new_empty(freqs.shape if need_freqs else (0,)))


def _setup_context(ctx, inputs, output):
    emb, freqs, labels, num_classes, _save, *extra = inputs
    _, _, proj = output
    ctx.num_classes = num_classes
    ctx.extra = tuple(extra)
    ctx.mark_non_differentiable(proj)
    ctx.save_for_backward(emb, freqs, labels, proj)


def _backward(ctx, grad_cos, grad_sin, _grad_proj):
    emb, freqs, labels, proj = ctx.saved_tensors
    need_emb, need_freqs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    K, F = ctx.num_classes, freqs.shape[-2]
    acc = acc_dtype(emb, freqs)
    if grad_cos is None:
        grad_cos = emb.new_zeros((K, F), dtype=acc)
    if grad_sin is None:
        grad_sin = emb.new_zeros((K, F), dtype=acc)
    ge, gf = torch.ops.datadam_fast.cf_class_sums_bwd(emb, freqs, labels, K, grad_cos, grad_sin, proj,
                                                      need_emb, need_freqs, *ctx.extra)
    return (ge if need_emb else None, gf if need_freqs else None) + (None,) * (len(ctx.needs_input_grad) - 2)


torch.library.register_autograd("datadam_fast::cf_class_sums_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------------
def _check_emb(emb, what: str) -> None:
    if not isinstance(emb, Tensor) or emb.dim() != 2 or not emb.dtype.is_floating_point:
        got = f"{tuple(emb.shape)} {emb.dtype}" if isinstance(emb, Tensor) else type(emb).__name__
        raise UserTypeError(f"{what}: expected a floating [N, D] tensor of embeddings, got {got}")


def check_freqs(freqs, D: int, K: int, device: torch.device) -> None:
    if not isinstance(freqs, Tensor) or freqs.dim() not in (2, 3) or not freqs.dtype.is_floating_point:
        got = f"{tuple(freqs.shape)} {freqs.dtype}" if isinstance(freqs, Tensor) else type(freqs).__name__
        raise UserTypeError(f"freqs: expected a floating [F, D] or [K, F, D] tensor of frequencies, got {got}")
    if freqs.shape[-1] != D:
        raise UserError(f"freqs {tuple(freqs.shape)}: the last dimension must be the embedding width {D}")
    if freqs.dim() == 3 and freqs.shape[0] != K:
        raise UserError(f"freqs {tuple(freqs.shape)}: per-class frequencies need one [F, D] matrix per class "
                        f"(num_classes={K})")
    if freqs.shape[-2] == 0:
        raise UserError("freqs: at least one frequency is needed")
    if freqs.device != device:
        raise UserError(f"freqs are on {freqs.device} but the embeddings on {device}; move them to one device")


def row_labels(n: int, num_classes: int, labels: Optional[Tensor], device, what: str) -> Tensor:
    """The rows' class indices: ``labels`` (checked), or class-major with equal counts when None."""
    if labels is None:
        if n % num_classes:
            raise UserError(f"{what}: {n} rows cannot be split evenly into num_classes={num_classes}; rows must "
                            f"be class-major with the same count per class, or pass labels")
        return torch.arange(num_classes, device=device).repeat_interleave(n // num_classes)
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point \
            or labels.dtype == torch.bool:
        raise UserTypeError(f"{what} labels: expected a 1-d integer tensor of class indices, one per row")
    if labels.shape[0] != n:
        raise UserError(f"{what} labels have {labels.shape[0]} entries but there are {n} rows")
    check_label_values(f"{what} labels", labels, num_classes)
    return labels.to(device=device, dtype=torch.long)


def _sums(emb: Tensor, freqs: Tensor, labels: Tensor, K: int, backend: str) -> Tuple[Tensor, Tensor]:
    save = torch.is_grad_enabled() and emb.requires_grad and emb.shape[0] * freqs.shape[-2] <= SAVE_PROJECTION_MAX
    if not torch.compiler.is_compiling():
        resolve_backend(backend, emb.device)  # build / load before the first call
    c, s, _ = torch.ops.datadam_fast.cf_class_sums_fwd(emb, freqs, labels, K, save, backend)
    return c, s


def cf_class_sums(emb: Tensor, freqs: Tensor, num_classes: int, labels: Optional[Tensor] = None, *,
                  backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Per-class sums of ``cos(t_k . e_i)`` and ``sin(t_k . e_i)``: ``[K, F]`` each (float32; float64
    for float64 input). Differentiable in ``emb`` and ``freqs``. ``labels``: ``[N]`` class indices in
    any order (None: class-major rows, equal counts)."""
    K = check_num_classes(num_classes)
    _check_emb(emb, "emb")
    check_freqs(freqs, emb.shape[1], K, emb.device)
    check_backend_name(backend)
    lab = row_labels(emb.shape[0], K, labels, emb.device, "emb")
    return _sums(emb, freqs, lab, K, backend)


def class_counts(labels: Tensor, num_classes: int, dtype) -> Tensor:
    return torch.zeros(num_classes, dtype=dtype, device=labels.device).index_add_(
        0, labels, torch.ones(labels.shape[0], dtype=dtype, device=labels.device))


def characteristic_function(emb: Tensor, freqs: Tensor, num_classes: int, labels: Optional[Tensor] = None, *,
                            normalize: bool = False, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Per-class empirical characteristic function at the frequencies: ``(Re, Im)``, ``[K, F]`` each,
    the class means of ``cos(t_k . e_i)`` and ``sin(t_k . e_i)``. ``normalize`` L2-normalises each
    embedding row first (as NCFM does). A class without rows gives NaN (0/0), never a silent 0."""
    K = check_num_classes(num_classes)
    _check_emb(emb, "emb")
    check_freqs(freqs, emb.shape[1], K, emb.device)
    check_backend_name(backend)
    lab = row_labels(emb.shape[0], K, labels, emb.device, "emb")
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=1)
    c, s = _sums(emb, freqs, lab, K, backend)
    n = class_counts(lab, K, c.dtype).unsqueeze(1)
    return c / n, s / n


def cf_loss(real_re: Tensor, real_im: Tensor, syn_re: Tensor, syn_im: Tensor, *, alpha: float = 0.5,
            beta: float = 0.5, weight: float = 300.0) -> Tensor:
    """NCFM's per-class loss between characteristic functions (``[K, F]`` each), summed over classes
    (:func:`datadam_fast.loss.reference.cf_loss`; the real side is detached).

    Computed in float64 and returned in the synthetic side's dtype: the phase term ``|r||s| - Re r
    Re s - Im r Im s`` cancels catastrophically where the two functions align, and its square root
    amplifies that error in the gradient (about 1e-5 of the largest entry in float32, against 4e-7
    widened). The operands are ``[K, F]``: widening them costs nothing next to the projections."""
    wide = torch.float64
    out = R.cf_loss(real_re.detach().to(wide), real_im.detach().to(wide), syn_re.to(wide), syn_im.to(wide),
                    alpha=alpha, beta=beta, weight=weight)
    return out.to(syn_re.dtype)


def _check_weights(alpha, beta, weight) -> Tuple[float, float, float]:
    out = []
    for name, v in (("alpha", alpha), ("beta", beta), ("weight", weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (float(v) >= 0 and float(v) < float("inf")):
            raise UserError(f"{name} must be a finite number >= 0, got {v!r}")
        out.append(float(v))
    if out[0] == 0 and out[1] == 0:
        raise UserError("alpha and beta are both 0: the loss would be constant")
    return out[0], out[1], out[2]


def cf_matching_loss(real_emb: Tensor, syn_emb: Tensor, num_classes: int, *, freqs: Tensor,
                     real_labels: Optional[Tensor] = None, syn_labels: Optional[Tensor] = None,
                     alpha: float = 0.5, beta: float = 0.5, weight: float = 300.0, normalize: bool = True,
                     backend: str = "auto") -> Tensor:
    """NCFM's matching loss, summed over classes, on the fused characteristic-function operator.

    ``sum_k weight * mean_f sqrt(alpha * (|phi_r| - |phi_s|)^2 + beta * max(2 (|phi_r| |phi_s| -
    Re phi_r Re phi_s - Im phi_r Im phi_s), 1e-12))`` with ``phi`` the class's empirical
    characteristic function at ``freqs[k]`` (``[K, F, D]``) or ``freqs`` (``[F, D]``, shared).
    ``normalize`` L2-normalises the embeddings first, as NCFM's ``match_loss`` does. Rows: class-major
    with equal counts, or ``*_labels`` in any order. The real side is not differentiated (NCFM runs
    it under ``no_grad``); the loss is differentiable in ``syn_emb`` (and in ``freqs``, for a
    sampling network's ascent step).
    """
    K = check_num_classes(num_classes)
    _check_emb(real_emb, "real_emb")
    _check_emb(syn_emb, "syn_emb")
    if real_emb.shape[1] != syn_emb.shape[1]:
        raise UserError(f"embedding width mismatch: real {real_emb.shape[1]} vs synthetic {syn_emb.shape[1]}")
    if real_emb.device != syn_emb.device:
        raise UserError(f"real_emb is on {real_emb.device} but syn_emb on {syn_emb.device}; move them to one device")
    alpha, beta, weight = _check_weights(alpha, beta, weight)
    check_freqs(freqs, syn_emb.shape[1], K, syn_emb.device)
    check_backend_name(backend)
    rl = row_labels(real_emb.shape[0], K, real_labels, real_emb.device, "real")
    sl = row_labels(syn_emb.shape[0], K, syn_labels, syn_emb.device, "synthetic")
    with torch.no_grad():
        r = real_emb.detach()
        r = torch.nn.functional.normalize(r, dim=1) if normalize else r
        rc, rs = _sums(r, freqs.detach(), rl, K, backend)
        n = class_counts(rl, K, rc.dtype).unsqueeze(1)
        rc, rs = rc / n, rs / n
    s = torch.nn.functional.normalize(syn_emb, dim=1) if normalize else syn_emb
    sc, ss = _sums(s, freqs, sl, K, backend)
    m = class_counts(sl, K, sc.dtype).unsqueeze(1)
    return cf_loss(rc, rs, sc / m, ss / m, alpha=alpha, beta=beta, weight=weight)


class CFMatchingLoss(torch.nn.Module):
    """:func:`cf_matching_loss` as a module (the settings fixed at construction)."""

    def __init__(self, num_classes: int, *, alpha: float = 0.5, beta: float = 0.5, weight: float = 300.0,
                 normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.alpha, self.beta, self.weight = _check_weights(alpha, beta, weight)
        self.normalize = bool(normalize)
        self.backend = check_backend_name(backend)

    def forward(self, real_emb: Tensor, syn_emb: Tensor, freqs: Tensor, real_labels: Optional[Tensor] = None,
                syn_labels: Optional[Tensor] = None) -> Tensor:
        return cf_matching_loss(real_emb, syn_emb, self.num_classes, freqs=freqs, real_labels=real_labels,
                                syn_labels=syn_labels, alpha=self.alpha, beta=self.beta, weight=self.weight,
                                normalize=self.normalize, backend=self.backend)
