"""The real side of a step for a ConvNet through a fused epilogue.

Per block: the convolution (ATen: cuDNN / oneDNN), then a fused epilogue that produces the next
block's pooled input and the block's attention map; the normalised activation is never written.
Two implementations of the same contract:

* ``triton`` (:mod:`datadam_fast.kernels.real_epilogue`): CUDA, or CPU under ``TRITON_INTERPRET=1``;
  one stats pass and one fused pass over the conv output.
* ``cpu`` (``csrc/real_epilogue_cpu.cpp``, ``torch.ops.datadam_fast.cpu_real_epilogue``): per
  sample, statistics and everything else while the sample's map is still in the core's L2; a
  first layer with few input channels is convolved inside the kernel (its output never exists),
  and the other 3x3 convolutions run as Winograd F(2x2, 3x3) (``csrc/winograd_cpu.cpp``: 2.25x
  fewer multiplications than oneDNN's direct convolution, which already runs at the FMA peak;
  :func:`use_winograd`).

The result is what the loss needs from the real side: per-class sums of the L2-normalised maps and of the embeddings, the
same quantities as ``features_and_embedding`` followed by :class:`~datadam_fast.loss.targets.ClassMeanAccumulator`
(tests/loss/test_real_epilogue.py pins them against that, for every supported norm and activation).

Norm statistics come from per-(n, c) moments: instance norm uses them directly; group norm and
train-mode batch norm combine them exactly (Chan et al.), in float64 on ``[N, C]`` numbers.
Train-mode BatchNorm updates its running statistics as ``nn.BatchNorm2d`` does.

Chosen by ``--real-epilogue`` in the distillation loop (see ``Distiller._resolve_real_epilogue``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .._constants import EPILOGUE_ACTS, EPILOGUE_POOLS, NORM_EPS
from ..errors import KERNEL_FAILURES, describe_failure

IMPLS = ("triton", "cpu")

# an implementation whose kernels failed at run time is in errors.KERNEL_FAILURES as
# "epilogue:<impl>" and reported unavailable (``unavailable_reason``) for the rest of the process

_ACT_NAMES = {nn.ReLU: "relu", nn.LeakyReLU: "leakyrelu", nn.Sigmoid: "sigmoid", nn.SiLU: "swish"}


@dataclass
class _Block:
    conv: nn.Conv2d
    norm: Optional[nn.Module]
    act: str
    slope: float
    pool: str
    tapped: bool


def _pool_kind(m: nn.Module) -> Optional[str]:
    def two(v):
        return v in (2, (2, 2))
    if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) and two(m.kernel_size) and two(m.stride or m.kernel_size) \
            and m.padding in (0, (0, 0)) and not m.ceil_mode:
        if isinstance(m, nn.MaxPool2d):
            return "maxpool" if m.dilation in (1, (1, 1)) and not m.return_indices else None
        return "avgpool" if m.divisor_override is None else None
    return None


def blocks_of(net: nn.Module) -> Tuple[Optional[List[_Block]], Optional[str]]:
    """The ConvNet blocks of ``net`` (conv -> [norm] -> act -> [2x2 pool]), or ``(None, reason)``."""
    from ..models.networks import ConvNet
    if not isinstance(net, ConvNet):
        return None, f"the fused real side takes ConvNet models, not {type(net).__name__}"
    taps = set(getattr(net, "_taps", ()))
    blocks: List[_Block] = []
    mods = list(net.features)
    i = 0
    while i < len(mods):
        conv = mods[i]
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
            return None, f"features.{i}: expected a zero-padded Conv2d, got {conv}"
        i += 1
        norm = None
        if i < len(mods) and isinstance(mods[i], (nn.GroupNorm, nn.BatchNorm2d)):
            norm = mods[i]
            i += 1
        elif i < len(mods) and isinstance(mods[i], nn.LayerNorm):
            return None, f"features.{i}: LayerNorm's per-pixel affine is not fused (use instancenorm/batchnorm/groupnorm)"
        if i >= len(mods) or type(mods[i]) not in _ACT_NAMES:
            return None, f"features.{i}: expected an activation in {[a.__name__ for a in _ACT_NAMES]}"
        act_i, act = i, mods[i]
        i += 1
        pool = "none"
        if i < len(mods) and not isinstance(mods[i], nn.Conv2d):
            pool = _pool_kind(mods[i])
            if pool is None:
                return None, f"features.{i}: only 2x2/stride-2 average or max pooling is fused, got {mods[i]}"
            i += 1
        blocks.append(_Block(conv, norm, _ACT_NAMES[type(act)], float(getattr(act, "negative_slope", 0.01)),
                             pool, act_i in taps))
    return blocks, None


def default_impl(device) -> str:
    """``cpu`` (the C++ kernels) for CPU tensors, ``triton`` otherwise."""
    return "cpu" if torch.device(device).type == "cpu" else "triton"


def unavailable_reason(net: nn.Module, device, impl: Optional[str] = None) -> Optional[str]:
    """Why the fused real side (``impl``, default :func:`default_impl`) cannot run ``net`` on
    ``device`` here (None: it can)."""
    _, why = blocks_of(net)
    if why:
        return why
    device = torch.device(device)
    impl = impl or default_impl(device)
    failed = KERNEL_FAILURES.reason(f"epilogue:{impl}", device.type)
    if failed:
        return failed
    if impl == "cpu":
        if device.type != "cpu":
            return f"the C++ epilogue runs on CPU tensors, not {device}"
        try:
            from ..loss.backends import get_backend
            get_backend("cpu")  # builds / loads the extension that registers the ops
        except Exception as e:  # noqa: BLE001 - no compiler, build failure
            return f"the C++ extension is unavailable: {e}"
        return None
    if impl != "triton":
        raise ValueError(f"unknown epilogue implementation {impl!r}; expected one of {IMPLS}")
    try:
        from ..kernels import real_epilogue as k
    except Exception as e:  # triton missing or failing to initialise
        return f"triton could not be loaded: {type(e).__name__}: {e}"
    if device.type == "cuda":
        return None if torch.cuda.is_available() and not k.interpreter_active() else \
            "CUDA tensors need compiled Triton kernels (unset TRITON_INTERPRET)"
    if device.type == "cpu":
        return None if k.interpreter_active() else "on CPU the Triton kernels run only under TRITON_INTERPRET=1"
    return f"no Triton kernels for device {device}"


def warn_fallback(impl: str, device, why: str) -> None:
    """The one warning (per process, implementation and device type) that ``--real-epilogue auto``
    gave up the fused ``impl`` and runs the real side through the network's own forward."""
    KERNEL_FAILURES.warn_once(("epilogue", impl, torch.device(device).type),
                              f"datadam_fast: {why}; the real side continues without the fused epilogue (the "
                              "network's own forward, same results) for the rest of this process", stacklevel=3)


def implementation_failed(impl: str, device, error: BaseException) -> None:
    """A fused epilogue kernel of ``impl`` failed to compile or launch on ``device``: remember it
    (``unavailable_reason`` reports it from now on) and warn once."""
    device = torch.device(device)
    why = f"the {impl} real-side epilogue failed on {device}: {describe_failure(error)}"
    KERNEL_FAILURES.record(f"epilogue:{impl}", device.type, why)
    warn_fallback(impl, device, why)


def _combine(mean: torch.Tensor, m2: torch.Tensor, count: int, dim: int):
    """Chan's exact combination of equal-count groups along ``dim``: (mean, M2, total count)."""
    k = mean.shape[dim]
    mu = mean.mean(dim, keepdim=True)
    M2 = m2.sum(dim, keepdim=True) + count * (mean - mu).pow(2).sum(dim, keepdim=True)
    return mu, M2, count * k


def _batch_stats(norm: Optional[nn.Module]) -> bool:
    """Whether ``norm`` normalises with the statistics of the batch (``nn.BatchNorm2d``'s rule)."""
    return isinstance(norm, nn.BatchNorm2d) and (norm.training or norm.running_mean is None)


def _conv_out_hw(conv: nn.Conv2d, H: int, W: int) -> Tuple[int, int]:
    if isinstance(conv.padding, str):  # "same" (stride 1 by PyTorch's rule) or "valid"
        if conv.padding == "same":
            return H, W
        pad = (0, 0)
    else:
        pad = conv.padding
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                 for n, p, d, k, s in zip((H, W), pad, conv.dilation, conv.kernel_size, conv.stride))


def check_batch_statistics(blocks: List[_Block], shape: Tuple[int, ...]) -> None:
    """Raise what eager ``nn.BatchNorm2d`` raises when a batch-statistics BatchNorm would see one
    value per channel (N*H*W == 1): its variance is undefined, and the fused kernels would divide
    by 1 instead. Checked once here, for every block and before any implementation runs, from the
    input ``shape`` alone."""
    N, _, H, W = shape
    for b in blocks:
        H, W = _conv_out_hw(b.conv, H, W)
        if _batch_stats(b.norm):
            size = torch.Size([N, b.conv.out_channels, H, W])
            verify = getattr(F, "_verify_batch_size", None)
            if verify is not None:
                verify(size)  # torch's own check: the same error, word for word
            elif N * H * W == 1:  # pragma: no cover - a PyTorch without the private helper
                raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
        if b.pool != "none":
            H, W = H // 2, W // 2


@torch.no_grad()
def norm_scale_shift(norm: Optional[nn.Module], mean: Optional[torch.Tensor], m2: Optional[torch.Tensor],
                     hw: int, N: int, C: int, device, pending: Optional[list] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) ``scale``, ``shift`` (float32 [N, C]) with ``norm(y) = y * scale + shift``.

    ``pending``: when given, a train-mode BatchNorm's running-statistics update is appended to it
    as a callable instead of being applied (the caller applies them once the whole pass has
    succeeded, so a pass that fails and is redone by another implementation counts once)."""
    if norm is None:
        one = torch.ones((N, C), dtype=torch.float32, device=device)
        return one, torch.zeros_like(one)
    if mean is not None:
        mean, m2 = mean.double(), m2.double()
    if isinstance(norm, nn.GroupNorm):
        G = norm.num_groups
        mg, M2g, cnt = _combine(mean.view(N, G, C // G), m2.view(N, G, C // G), hw, 2)
        mu = mg.expand(N, G, C // G).reshape(N, C)
        var = (M2g / cnt).expand(N, G, C // G).reshape(N, C)
    elif isinstance(norm, nn.BatchNorm2d):
        if norm.training or norm.running_mean is None:
            mc, M2c, cnt = _combine(mean, m2, hw, 0)
            mu, var = mc.expand(N, C), (M2c / cnt).expand(N, C)
            if norm.training and norm.track_running_stats and norm.running_mean is not None:
                # cnt >= 2 here: check_batch_statistics refused one value per channel
                update = functools.partial(_update_running_stats, norm, mc.view(C), (M2c / (cnt - 1)).view(C))
                if pending is None:
                    update()
                else:
                    pending.append(update)
        else:
            mu = norm.running_mean.double().view(1, C).expand(N, C)
            var = norm.running_var.double().view(1, C).expand(N, C)
    else:  # pragma: no cover - blocks_of admits only these
        raise TypeError(f"unsupported norm {type(norm).__name__}")
    rstd = (var + norm.eps).rsqrt()
    w = norm.weight.double().view(1, C) if getattr(norm, "weight", None) is not None else 1.0
    b = norm.bias.double().view(1, C) if getattr(norm, "bias", None) is not None else 0.0
    scale = rstd * w
    shift = b - mu * scale
    return scale.float().contiguous(), shift.float().contiguous()


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    bn.num_batches_tracked.add_(1)
    f = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - f).add_(mean.to(bn.running_mean.dtype), alpha=f)
    bn.running_var.mul_(1 - f).add_(unbiased_var.to(bn.running_var.dtype), alpha=f)


#: a first layer with at most this many input channels is convolved inside the C++ epilogue
#: (oneDNN writes its huge, cheap output at memory speed; the fused kernel never writes it)
FUSED_CONV_MAX_IN = 4


def _fusable_conv(conv: nn.Conv2d, h: torch.Tensor) -> bool:
    return (conv.in_channels <= FUSED_CONV_MAX_IN and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and isinstance(conv.padding, tuple) and h.dtype == torch.float32
            and conv.weight.dtype == torch.float32)


#: Winograd needs enough input channels for its GEMMs to run near peak (measured: 1.5x oneDNN's direct
#: convolution at 128 channels on 14x14 maps, 1.1x on 7x7, where a quarter of the 2x2 tiles is padding)
WINOGRAD_MIN_IN = 16

#: ``G`` of F(2x2, 3x3): the filter transform ``G g G^T`` (its 1/2 entries are exact in binary)
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def use_winograd(conv: nn.Conv2d, h: torch.Tensor) -> bool:
    """Whether the C++ real side runs ``conv`` on ``h`` as Winograd F(2x2, 3x3): a float32 3x3
    convolution, stride 1, padding 1, no dilation or groups, with at least :data:`WINOGRAD_MIN_IN`
    input channels. ``DATADAM_FAST_REAL_CONV=direct`` keeps oneDNN's direct convolution (the
    results differ by float rounding only; tests/loss/test_winograd.py)."""
    return (os.environ.get("DATADAM_FAST_REAL_CONV", "winograd") != "direct"
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and conv.in_channels >= WINOGRAD_MIN_IN and h.dtype == torch.float32
            and conv.weight.dtype == torch.float32 and h.device.type == "cpu")


def winograd_filters(weight: torch.Tensor) -> torch.Tensor:
    """``U = G g G^T`` of 3x3 filters ``[Cout, Cin, 3, 3]`` as ``[16, Cin, Cout]`` float32 (computed in
    float64, so the transform adds one rounding)."""
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.detach().double(), g)
    return u.reshape(16, weight.shape[1], weight.shape[0]).float().contiguous()


def _winograd(x: torch.Tensor, u: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.datadam_fast.cpu_winograd_conv3x3(x, u, bias)


def _block(b: _Block, h: torch.Tensor, power: float, tap: bool, impl: str, pending: list):
    """(pooled output, attention sums or None, conv output H, W) of one block from its input ``h``."""
    per_sample = isinstance(b.norm, nn.GroupNorm)
    bn_eval = isinstance(b.norm, nn.BatchNorm2d) and not b.norm.training and b.norm.running_mean is not None
    if impl == "cpu":
        from ..loss.backends import get_backend
        get_backend("cpu")  # loads (once) the extension that registers the ops
        ops = torch.ops.datadam_fast
        act, pool = EPILOGUE_ACTS.index(b.act), EPILOGUE_POOLS.index(b.pool)
        if _fusable_conv(b.conv, h):
            y, conv = h, dict(conv_weight=b.conv.weight, conv_bias=b.conv.bias, conv_padding=list(b.conv.padding))
            N, C = h.shape[0], b.conv.out_channels
            H = h.shape[2] + 2 * b.conv.padding[0] - b.conv.kernel_size[0] + 1
            W = h.shape[3] + 2 * b.conv.padding[1] - b.conv.kernel_size[1] + 1
        elif use_winograd(b.conv, h):
            bias = b.conv.bias.detach() if b.conv.bias is not None else None
            y, conv = _winograd(h, winograd_filters(b.conv.weight), bias), {}
            N, C, H, W = y.shape
        else:
            y, conv = b.conv(h), {}
            N, C, H, W = y.shape
        if per_sample:  # instance / group norm: statistics inside the kernel, per sample
            out, a = ops.cpu_real_epilogue(y, None, None, b.norm.weight, b.norm.bias, b.norm.num_groups,
                                           float(b.norm.eps), act, b.slope, pool, float(power), tap, **conv)
        else:
            mean, m2 = ops.cpu_plane_moments(y, **conv) if b.norm is not None and not bn_eval else (None, None)
            scale, shift = norm_scale_shift(b.norm, mean, m2, H * W, N, C, y.device, pending)
            out, a = ops.cpu_real_epilogue(y, scale, shift, None, None, 1, 0.0, act, b.slope, pool, float(power), tap,
                                           **conv)
        return out, (a if tap else None), H, W
    from ..kernels import real_epilogue as k
    y = b.conv(h)
    N, C, H, W = y.shape
    mean = m2 = None
    if b.norm is not None and not bn_eval:
        mean, m2 = k.plane_moments(y)
    scale, shift = norm_scale_shift(b.norm, mean, m2, H * W, N, C, y.device, pending)
    out, a = k.apply_epilogue(y, scale, shift, act=b.act, slope=b.slope, pool=b.pool, power=power, attention=tap)
    return out, a, H, W


@torch.no_grad()
def real_class_sums(net: nn.Module, x: torch.Tensor, classes: int, power: float, *,
                    attention: bool = True, impl: Optional[str] = None) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Per-class sums of the L2-normalised attention maps of ``net``'s tapped blocks (float32
    ``[classes, H*W]`` each; empty when ``attention`` is False) and of the embeddings (float32
    ``[classes, D]``). ``x``: class-major rows, ``len(x) // classes`` per class. ``impl``:
    ``triton`` or ``cpu`` (default: :func:`default_impl` of ``x``'s device)."""
    N = x.shape[0]
    if classes <= 0 or N % classes:
        raise ValueError(f"{N} rows do not split into {classes} classes of equal size")
    att_sums, emb = _fused_forward(net, x, power, attention, impl, classes)
    return att_sums, emb.view(classes, N // classes, -1).sum(1)


def real_embeddings(net: nn.Module, x: torch.Tensor, impl: Optional[str] = None) -> torch.Tensor:
    """The per-sample embeddings ``[N, D]`` (float32) of the fused real side: for methods whose
    statistic is a non-linear function of each embedding (NCFM's characteristic function)."""
    return _fused_forward(net, x, 1.0, False, impl, 1)[1]


def _fused_forward(net, x, power: float, attention: bool, impl: Optional[str], classes: int):
    blocks, why = blocks_of(net)
    if why:
        raise ValueError(why)
    impl = impl or default_impl(x.device)
    if impl not in IMPLS:
        raise ValueError(f"unknown epilogue implementation {impl!r}; expected one of {IMPLS}")
    if x.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(x.shape)}")
    per = x.shape[0] // classes
    check_batch_statistics(blocks, tuple(x.shape))
    att_sums: List[torch.Tensor] = []
    pending: list = []
    h = x
    for b in blocks:
        tap = attention and b.tapped
        h, a, H, W = _block(b, h, power, tap, impl, pending)
        if tap:
            a = a / a.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
            att_sums.append(a.view(classes, per, H * W).sum(1))
    for update in pending:  # BatchNorm running statistics: only once the whole pass succeeded
        update()
    return att_sums, h.flatten(1).float()
