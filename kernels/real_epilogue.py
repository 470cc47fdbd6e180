"""Fused real-side epilogue of a ConvNet block (Triton): norm statistics, normalise + activation,
pooling and the block's spatial-attention map, without ever writing the normalised activation.

The real side of a DataDAM step runs under ``no_grad`` and needs, per block, only two things from
the convolution output ``y`` ``[N, C, H, W]`` (any strides): the pooled activation that feeds the
next convolution, and ``a[n, h, w] = sum_c |act(norm(y))[n, c, h, w]|^p``. Eager PyTorch moves
``y`` through memory five or six times for that (norm statistics, normalise, activation, the
power, the channel sum, the pooling); here it is read twice and 1/4 of it is written:

    _stats_kernel   grid (N, cdiv(C, BLOCK_C))      reads y once: per (n, c) mean and M2
    host            per (n, c) scale / shift        O(N*C): instance norm directly; group and batch
                                                    norm by Chan's combination of the (n, c) moments
    _apply_kernel   grid (N, cdiv(QH*QW, BLOCK_Q))  reads y once: v = act(y*scale + shift); writes
                                                    pool2x2(v) in y's dtype and a (fp32 [N, H*W])

Statistics are accumulated in float32 around a per-(n, c) pivot (the plane's first element), so
a mean far from zero does not cancel the variance. ``v`` stays in float32 between the load of
``y`` and the store of the pooled value: with a bf16/fp16 ``y`` this rounds once where eager
rounds after every op (within the low-precision tolerances of the tests).

Each apply program owns ``BLOCK_Q`` 2x2 quads of one sample (quads cover ceil(H/2) x ceil(W/2),
so odd sizes keep their last row/column in the attention map; the floor-mode pooled output drops
it, as ``nn.AvgPool2d(2, 2)`` does) and loops over channel blocks; the four pixels of a quad are
four strided loads of a ``[BLOCK_C, BLOCK_Q]`` tile, which works for NCHW and channels_last alike.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._constants import EPILOGUE_ACTS, EPILOGUE_POOLS
from .spatial_attention import _abs_pow, _power_mode, interpreter_active, _next_pow2, _launch

ACTS = {name: code for code, name in enumerate(EPILOGUE_ACTS)}
POOLS = {name: code for code, name in enumerate(EPILOGUE_POOLS)}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _stats_kernel(y_ptr, mean_ptr, m2_ptr, C, HW, W, sN, sC, sH, sW,
                  BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    base = y_ptr + n * sN + c.to(tl.int64) * sC
    pivot = tl.load(base, mask=cm, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        hm = hw < HW
        off = (hw // W).to(tl.int64) * sH + (hw % W).to(tl.int64) * sW
        m = cm[:, None] & hm[None, :]
        v = tl.load(base[:, None] + off[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, v - pivot[:, None], 0.0)
        s1 += d
        s2 += d * d
    S1 = tl.sum(s1, axis=1)
    S2 = tl.sum(s2, axis=1)
    cnt = HW * 1.0  # (HW == 1 arrives as a constexpr int)
    mean = pivot + S1 / cnt
    m2 = tl.maximum(S2 - S1 * (S1 / cnt), 0.0)
    tl.store(mean_ptr + n * C + c, mean, mask=cm)
    tl.store(m2_ptr + n * C + c, m2, mask=cm)


@triton.jit
def _act(x, slope, ACT: tl.constexpr):
    if ACT == 0:
        r = tl.maximum(x, 0.0)
    elif ACT == 1:
        r = tl.where(x > 0.0, x, x * slope)
    elif ACT == 2:
        r = 1.0 / (1.0 + tl.exp(-x))
    else:
        r = x / (1.0 + tl.exp(-x))
    return r


@triton.jit
def _quad_pixel(ybase, c_off, cm, pix_off, pm, sc, sh, slope, ACT: tl.constexpr):
    m = cm[:, None] & pm[None, :]
    y = tl.load(ybase + c_off[:, None] + pix_off[None, :], mask=m, other=0.0).to(tl.float32)
    return _act(y * sc[:, None] + sh[:, None], slope, ACT), m


@triton.jit
def _att_part(v, m, power, POWER_MODE: tl.constexpr):
    return tl.sum(tl.where(m, _abs_pow(tl.abs(v), power, POWER_MODE), 0.0), axis=0)


@triton.jit
def _apply_kernel(y_ptr, scale_ptr, shift_ptr, out_ptr, att_ptr, power, slope,
                  C, H, W, QW, NQ, PH, PW,
                  sN, sC, sH, sW, oN, oC, oH, oW,
                  ACT: tl.constexpr, POOL: tl.constexpr, POWER_MODE: tl.constexpr, ATT: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qm = q < NQ
    qi = q // QW
    qj = q % QW
    h0 = 2 * qi
    w0 = 2 * qj
    # which of the quad's pixels exist (odd H / W), and whether its pooled output exists
    ok_h0 = qm & (h0 < H)
    ok_h1 = qm & (h0 + 1 < H)
    ok_w0 = w0 < W
    ok_w1 = w0 + 1 < W
    m00 = ok_h0 & ok_w0
    m01 = ok_h0 & ok_w1
    m10 = ok_h1 & ok_w0
    m11 = ok_h1 & ok_w1
    pool_ok = qm & (qi < PH) & (qj < PW)
    p00 = h0.to(tl.int64) * sH + w0.to(tl.int64) * sW
    p01 = p00 + sW
    p10 = p00 + sH
    p11 = p10 + sW
    ybase = y_ptr + n * sN
    obase = out_ptr + n * oN
    a00 = tl.zeros([BLOCK_Q], dtype=tl.float32)
    a01 = tl.zeros([BLOCK_Q], dtype=tl.float32)
    a10 = tl.zeros([BLOCK_Q], dtype=tl.float32)
    a11 = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        sc = tl.load(scale_ptr + n * C + c, mask=cm, other=0.0)
        sh = tl.load(shift_ptr + n * C + c, mask=cm, other=0.0)
        c_off = c.to(tl.int64) * sC
        v00, k00 = _quad_pixel(ybase, c_off, cm, p00, m00, sc, sh, slope, ACT)
        v01, k01 = _quad_pixel(ybase, c_off, cm, p01, m01, sc, sh, slope, ACT)
        v10, k10 = _quad_pixel(ybase, c_off, cm, p10, m10, sc, sh, slope, ACT)
        v11, k11 = _quad_pixel(ybase, c_off, cm, p11, m11, sc, sh, slope, ACT)
        if ATT:
            a00 += _att_part(v00, k00, power, POWER_MODE)
            a01 += _att_part(v01, k01, power, POWER_MODE)
            a10 += _att_part(v10, k10, power, POWER_MODE)
            a11 += _att_part(v11, k11, power, POWER_MODE)
        oc = c.to(tl.int64) * oC
        if POOL == 0:  # no pooling: the activation itself goes out
            o00 = qi.to(tl.int64) * 2 * oH + qj.to(tl.int64) * 2 * oW
            ob = obase + oc[:, None]
            tl.store(ob + o00[None, :], v00.to(out_ptr.dtype.element_ty), mask=k00)
            tl.store(ob + (o00 + oW)[None, :], v01.to(out_ptr.dtype.element_ty), mask=k01)
            tl.store(ob + (o00 + oH)[None, :], v10.to(out_ptr.dtype.element_ty), mask=k10)
            tl.store(ob + (o00 + oH + oW)[None, :], v11.to(out_ptr.dtype.element_ty), mask=k11)
        else:
            if POOL == 1:
                pooled = (v00 + v01 + v10 + v11) * 0.25
            else:
                pooled = tl.maximum(tl.maximum(v00, v01), tl.maximum(v10, v11))
            po = qi.to(tl.int64) * oH + qj.to(tl.int64) * oW
            tl.store(obase + oc[:, None] + po[None, :], pooled.to(out_ptr.dtype.element_ty),
                     mask=cm[:, None] & pool_ok[None, :])
    if ATT:
        abase = att_ptr + n * H * W
        r00 = h0 * W + w0
        tl.store(abase + r00, a00, mask=m00)
        tl.store(abase + r00 + 1, a01, mask=m01)
        tl.store(abase + r00 + W, a10, mask=m10)
        tl.store(abase + r00 + W + 1, a11, mask=m11)


# --------------------------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------------------------
def _check(y: torch.Tensor) -> None:
    if y.dim() != 4:
        raise ValueError(f"expected a conv output [N, C, H, W], got shape {tuple(y.shape)}")
    if y.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused epilogue takes float32/bfloat16/float16 conv outputs, got {y.dtype}")
    if y.device.type == "cpu" and not interpreter_active():
        raise RuntimeError("the fused epilogue runs on CUDA (or on CPU under TRITON_INTERPRET=1), "
                           f"got a tensor on {y.device}")


def plane_moments(y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) mean and M2 (sum of squared deviations) of ``y`` over H*W, float32 [N, C]."""
    _check(y)
    N, C, H, W = y.shape
    mean = torch.empty((N, C), dtype=torch.float32, device=y.device)
    m2 = torch.empty_like(mean)
    if N == 0 or C == 0:
        return mean, m2
    interp = interpreter_active()
    block_c = min(_next_pow2(C), 64 if interp else 8)
    block_hw = min(_next_pow2(H * W), 1024 if interp else 256)
    _launch(_stats_kernel, "real_epilogue_stats", (N, triton.cdiv(C, block_c)),
            y, mean, m2, C, H * W, W, *y.stride(), BLOCK_C=block_c, BLOCK_HW=block_hw)
    return mean, m2


def pooled_shape(H: int, W: int, pool: str) -> Tuple[int, int]:
    return (H, W) if pool == "none" else (H // 2, W // 2)


def apply_epilogue(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, act: str = "relu",
                   slope: float = 0.01, pool: str = "avgpool", power: float = 4.0, attention: bool = True,
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``out = pool(act(y * scale + shift))`` (y's dtype and memory format) and, when ``attention``,
    ``a = sum_c |act(y * scale + shift)|^p`` (float32 ``[N, H*W]``, not normalised).
    ``scale`` / ``shift``: float32 ``[N, C]``."""
    _check(y)
    if act not in ACTS:
        raise ValueError(f"unsupported activation {act!r}; the fused epilogue takes {tuple(ACTS)}")
    if pool not in POOLS:
        raise ValueError(f"unsupported pooling {pool!r}; the fused epilogue takes {tuple(POOLS)}")
    N, C, H, W = y.shape
    if scale.shape != (N, C) or shift.shape != (N, C):
        raise ValueError(f"scale and shift must be [N, C] = {(N, C)}, got {tuple(scale.shape)} / {tuple(shift.shape)}")
    scale = scale.to(device=y.device, dtype=torch.float32).contiguous()
    shift = shift.to(device=y.device, dtype=torch.float32).contiguous()
    PH, PW = pooled_shape(H, W, pool)
    fmt = torch.channels_last if (y.is_contiguous(memory_format=torch.channels_last)
                                  and not y.is_contiguous()) else torch.contiguous_format
    out = torch.empty((N, C, PH, PW), dtype=y.dtype, device=y.device, memory_format=fmt)
    att = torch.empty((N, H * W), dtype=torch.float32, device=y.device) if attention else None
    if N == 0 or C == 0 or H == 0 or W == 0:
        return out, att
    QH, QW = (H + 1) // 2, (W + 1) // 2
    interp = interpreter_active()
    block_c = min(_next_pow2(C), 64 if interp else 16)
    block_q = min(_next_pow2(QH * QW), 1024 if interp else 64)
    _launch(_apply_kernel, "real_epilogue_apply", (N, triton.cdiv(QH * QW, block_q)),
            y, scale, shift, out, att if attention else scale, float(power), float(slope),
            C, H, W, QW, QH * QW, PH, PW, *y.stride(), *out.stride(),
            ACT=ACTS[act], POOL=POOLS[pool], POWER_MODE=_power_mode(power), ATT=bool(attention),
            BLOCK_C=block_c, BLOCK_Q=block_q)
    return out, att
