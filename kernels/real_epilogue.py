"""Fused real-side epilogue of a ConvNet block (Triton): norm statistics, normalise + activation,
pooling and the block's spatial-attention map, without ever writing the normalised activation.

The real side of a DataDAM step runs under ``no_grad`` and needs, per block, only two things from
the convolution output ``y`` ``[N, C, H, W]`` (any strides): the pooled activation that feeds the
next convolution, and ``a[n, h, w] = sum_c |act(norm(y))[n, c, h, w]|^p``. Eager PyTorch moves
``y`` through memory five or six times for that (norm statistics, normalise, activation, the
power, the channel sum, the pooling); here it is read twice and 1/4 of it is written:

    _stats_kernel          grid (N, SPLIT, cdiv(C, BLOCK_C))   reads y once: per (n, c) shifted
                                                               sums over SPLIT pixel ranges (mean
                                                               and M2 directly when SPLIT == 1)
    _stats_combine_kernel  grid (N, cdiv(C, BLOCK_C))          SPLIT > 1: adds the partial sums in
                                                               a fixed order, writes mean and M2
    host                   per (n, c) scale / shift            O(N*C): instance norm directly;
                                                               group and batch norm by Chan's
                                                               combination of the moments
    _apply_rows_kernel     grid (N*ceil(H/2), cdiv(W, BW))     NCHW and strided views,
    _apply_quads_kernel    grid (N, cdiv(QH*QW, BLOCK_Q))      channels_last; both read y once:
                                                               v = act(y*scale + shift), write
                                                               pool2x2(v) in y's dtype and
                                                               a (fp32 [N, H*W])

Launchers are split into ``stats_plan`` / ``apply_plan`` (outputs and :class:`Launch` records)
and ``run_launches`` (under the tensors' CUDA device guard); ``kernels/codegen.py`` compiles
the same plans ahead of time.

Statistics are accumulated in float32 around a per-(n, c) pivot (the plane's first element), so
a mean far from zero does not cancel the variance. ``v`` stays in float32 between the load of
``y`` and the store of the pooled value: with a bf16/fp16 ``y`` this rounds once where eager
rounds after every op (within the low-precision tolerances of the tests).

Memory access: every tile is contiguous along the tensor's unit-stride axis. The stats tile is
``[BLOCK_C, BLOCK_P]`` (pixels contiguous in NCHW; in channels_last ``BLOCK_C`` covers the whole
channel row of a pixel, up to 128 channels, and the pixel range is split over programs instead).
The NCHW apply program owns two input rows (one row of 2x2 quads) and a ``BW``-column segment:
it loads ``[BLOCK_C, BW]`` row tiles with unit stride and splits even/odd columns in registers
(``tl.reshape`` + ``tl.split``). The channels_last apply program loads, for each of the four
pixels of its quads, a row of contiguous channels. With ``VEC > 1`` the host has proven that
the unit-stride axis starts on, and steps by, multiples of 16 bytes; the kernels state it on
their integer arguments as ``x // VEC * VEC``: an identity for the proven values that Triton's
divisibility analysis sees through (``tl.multiple_of`` on a kernel argument, a value with no
defining operation, is not reliably kept).

Quads cover ceil(H/2) x ceil(W/2), so odd sizes keep their last row/column in the attention map;
the floor-mode pooled output drops it, as ``nn.AvgPool2d(2, 2)`` does.

NaN: NaN in, NaN out, as in eager PyTorch. ReLU and max-pool use ``propagate_nan=ALL`` (the
default ``tl.maximum`` lowers to ``max.f32``, which returns the non-NaN operand) and the M2
clamp is a NaN-preserving ``where``.

Register budgets (``REG_BUDGET``) are checked per compiled variant by ``tests/loss/test_gpu_codegen.py``
for sm_80 and sm_90 (no GPU needed; see docs/gpu.md).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._constants import EPILOGUE_ACTS, EPILOGUE_POOLS
from ._common import (Launch, abs_pow, elem_addr, flat_hw_stride, gpu_sm_count, interpreter_active, next_pow2,
                      power_mode, run_launches, vec_for)

ACTS = {name: code for code, name in enumerate(EPILOGUE_ACTS)}
POOLS = {name: code for code, name in enumerate(EPILOGUE_POOLS)}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: register budgets per thread (sm_80 / sm_90, every launcher configuration), asserted by
#: tests/loss/test_gpu_codegen.py: the apply kernels stream y like the spatial-attention kernels
#: (<= 128 keeps 16 warps per SM resident); the stats kernels hold two fp32 accumulator tiles
REG_BUDGET = {"real_epilogue_stats": 128, "real_epilogue_stats_combine": 64, "real_epilogue_apply": 128}

STATS_LAYOUT_HW, STATS_LAYOUT_CL, STATS_LAYOUT_GENERIC = 0, 1, 2


@triton.jit
def _nan_max(a, b):
    # max that returns NaN when either operand is NaN (torch.maximum / F.relu / max_pool2d do)
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _stats_kernel(y_ptr, s1_ptr, s2_ptr, C, HW, W, sN, sC, sH, sW, TILES,
                  LAYOUT: tl.constexpr, FINAL: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_P: tl.constexpr, VEC: tl.constexpr):
    """Shifted sums of one (sample, pixel range, channel block): s1 = sum(y - pivot),
    s2 = sum((y - pivot)^2) over pixels [split * TILES * BLOCK_P, +TILES * BLOCK_P); with FINAL
    (one range) it writes mean and M2 instead."""
    n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    if VEC > 1:  # host-proven: the unit-stride axis is 16-byte aligned at every step
        if LAYOUT == 0:
            HW = HW // VEC * VEC
            sC = sC // VEC * VEC
        else:
            C = C // VEC * VEC
            sW = sW // VEC * VEC
        sN = sN // VEC * VEC
    cm = c < C
    if LAYOUT == 1:  # channels_last: sC == 1, rows of contiguous channels
        c_off = c.to(tl.int64)
    else:
        c_off = c.to(tl.int64) * sC
    base = y_ptr + n * sN + c_off
    pivot = tl.load(base, mask=cm, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    p_lo = split * (TILES * BLOCK_P)
    for t in range(0, TILES):
        hw = p_lo + t * BLOCK_P + tl.arange(0, BLOCK_P)
        hm = hw < HW
        if LAYOUT == 0:  # H*W contiguous
            off = hw.to(tl.int64)
        elif LAYOUT == 1:  # flat pixel stride (C for a dense channels_last tensor)
            off = hw.to(tl.int64) * sW
        else:
            off = (hw // W).to(tl.int64) * sH + (hw % W).to(tl.int64) * sW
        m = cm[:, None] & hm[None, :]
        v = tl.load(base[:, None] + off[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, v - pivot[:, None], 0.0)
        s1 += d
        s2 += d * d
    S1 = tl.sum(s1, axis=1)
    S2 = tl.sum(s2, axis=1)
    # output offsets from the program ids again (int32: N*SPLIT*C is small): nothing 64-bit
    # stays live across the loop just for the final stores
    if FINAL:
        cnt = HW * 1.0
        mean = pivot + S1 / cnt
        m2 = S2 - S1 * (S1 / cnt)
        m2 = tl.where(m2 < 0.0, 0.0, m2)  # rounding guard that keeps NaN
        o = tl.program_id(0) * C + c
        tl.store(s1_ptr + o, mean, mask=cm)
        tl.store(s2_ptr + o, m2, mask=cm)
    else:
        o = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * C + c
        tl.store(s1_ptr + o, S1, mask=cm)
        tl.store(s2_ptr + o, S2, mask=cm)


@triton.jit
def _stats_combine_kernel(y_ptr, p1_ptr, p2_ptr, mean_ptr, m2_ptr, C, HW, sN, sC, SPLIT,
                          BLOCK_C: tl.constexpr):
    """mean and M2 of (n, c) from the SPLIT partial shifted sums (added in a fixed order)."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < C
    pivot = tl.load(y_ptr + n * sN + c.to(tl.int64) * sC, mask=cm, other=0.0).to(tl.float32)
    S1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    S2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k in range(0, SPLIT):
        o = (n * SPLIT + k) * C + c
        S1 += tl.load(p1_ptr + o, mask=cm, other=0.0)
        S2 += tl.load(p2_ptr + o, mask=cm, other=0.0)
    cnt = HW * 1.0
    mean = pivot + S1 / cnt
    m2 = S2 - S1 * (S1 / cnt)
    m2 = tl.where(m2 < 0.0, 0.0, m2)
    tl.store(mean_ptr + n * C + c, mean, mask=cm)
    tl.store(m2_ptr + n * C + c, m2, mask=cm)


@triton.jit
def _act(x, slope, ACT: tl.constexpr):
    if ACT == 0:
        r = _nan_max(x, 0.0)
    elif ACT == 1:
        r = tl.where(x > 0.0, x, x * slope)
    elif ACT == 2:
        r = 1.0 / (1.0 + tl.exp(-x))
    else:
        r = x / (1.0 + tl.exp(-x))
    return r


@triton.jit
def _att_part(v, m, power, POWER_MODE: tl.constexpr):
    return tl.sum(tl.where(m, abs_pow(tl.abs(v), power, POWER_MODE), 0.0), axis=0)


@triton.jit
def _apply_rows_kernel(y_ptr, scale_ptr, shift_ptr, out_ptr, att_ptr, power, slope,
                       C, H, W, QH, PH, PW, sN, sC, sH, sW, oN, oC, oH, oW,
                       ACT: tl.constexpr, POOL: tl.constexpr, POWER_MODE: tl.constexpr, ATT: tl.constexpr,
                       BLOCK_C: tl.constexpr, BW: tl.constexpr, VEC: tl.constexpr, OVEC: tl.constexpr):
    """Rows h0 = 2*qi and h0 + 1 of sample n, columns [BW*pid1, +BW), all channels."""
    pid = tl.program_id(0)
    n = pid // QH
    qi = pid - n * QH
    if VEC > 1:  # host-proven (unit stride along w): rows and channel planes start 16-byte aligned
        sN = sN // VEC * VEC
        sC = sC // VEC * VEC
        sH = sH // VEC * VEC
        W = W // VEC * VEC
    if OVEC > 1:  # same for the pooled output (its own alignment: PW = W / 2)
        oN = oN // OVEC * OVEC
        oC = oC // OVEC * OVEC
        oH = oH // OVEC * OVEC
        PW = PW // OVEC * OVEC
    n64 = n.to(tl.int64)
    h0 = 2 * qi
    w = tl.program_id(1) * BW + tl.arange(0, BW)
    wm = w < W
    # row h0 + 1 exists (odd H), as a vector: the interpreter rejects scalar & block masks
    wm1 = wm & (w * 0 + h0 + 1 < H)
    w_off = w.to(tl.int64) * sW
    row0 = y_ptr + n64 * sN + h0.to(tl.int64) * sH
    QW: tl.constexpr = BW // 2
    pw = tl.program_id(1) * QW + tl.arange(0, QW)
    pool_ok = (pw < PW) & (pw * 0 + qi < PH)
    a0 = tl.zeros([BW], dtype=tl.float32)
    a1 = tl.zeros([BW], dtype=tl.float32)
    obase = out_ptr + n64 * oN
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        sc = tl.load(scale_ptr + n64 * C + c, mask=cm, other=0.0)
        sh = tl.load(shift_ptr + n64 * C + c, mask=cm, other=0.0)
        ptr0 = row0 + (c.to(tl.int64) * sC)[:, None] + w_off[None, :]
        m0 = cm[:, None] & wm[None, :]
        m1 = cm[:, None] & wm1[None, :]
        y0 = tl.load(ptr0, mask=m0, other=0.0).to(tl.float32)
        y1 = tl.load(ptr0 + sH, mask=m1, other=0.0).to(tl.float32)
        v0 = _act(y0 * sc[:, None] + sh[:, None], slope, ACT)
        v1 = _act(y1 * sc[:, None] + sh[:, None], slope, ACT)
        if ATT:
            a0 += _att_part(v0, m0, power, POWER_MODE)
            a1 += _att_part(v1, m1, power, POWER_MODE)
        oc = (c.to(tl.int64) * oC)[:, None]
        if POOL == 0:  # no pooling: the activation itself goes out
            o0 = obase + oc + h0.to(tl.int64) * oH + (w.to(tl.int64) * oW)[None, :]
            tl.store(o0, v0.to(out_ptr.dtype.element_ty), mask=m0)
            tl.store(o0 + oH, v1.to(out_ptr.dtype.element_ty), mask=m1)
        else:
            e0, d0 = tl.split(tl.reshape(v0, [BLOCK_C, QW, 2]))
            e1, d1 = tl.split(tl.reshape(v1, [BLOCK_C, QW, 2]))
            if POOL == 1:
                pooled = ((e0 + d0) + (e1 + d1)) * 0.25
            else:
                pooled = _nan_max(_nan_max(e0, d0), _nan_max(e1, d1))
            po = obase + oc + qi.to(tl.int64) * oH + (pw.to(tl.int64) * oW)[None, :]
            tl.store(po, pooled.to(out_ptr.dtype.element_ty), mask=cm[:, None] & pool_ok[None, :])
    if ATT:  # offsets from the program ids again (see _stats_kernel)
        r0 = tl.program_id(0) // QH
        h0e = 2 * (tl.program_id(0) - r0 * QH)
        we = tl.program_id(1) * BW + tl.arange(0, BW)
        abase = att_ptr + r0.to(tl.int64) * H * W + h0e * W + we
        tl.store(abase, a0, mask=wm)
        tl.store(abase + W, a1, mask=wm1)


@triton.jit
def _quad_pixel(ybase, c_off, cm, pix_off, pm, sc, sh, slope, ACT: tl.constexpr):
    m = cm[:, None] & pm[None, :]
    y = tl.load(ybase + c_off[:, None] + pix_off[None, :], mask=m, other=0.0).to(tl.float32)
    return _act(y * sc[:, None] + sh[:, None], slope, ACT), m


@triton.jit
def _apply_quads_kernel(y_ptr, scale_ptr, shift_ptr, out_ptr, att_ptr, power, slope,
                        C, H, W, QW, NQ, PH, PW,
                        sN, sC, sH, sW, oN, oC, oH, oW,
                        ACT: tl.constexpr, POOL: tl.constexpr, POWER_MODE: tl.constexpr, ATT: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, VEC: tl.constexpr):
    """BLOCK_Q 2x2 quads of sample n (channels_last: each pixel a row of contiguous channels)."""
    if VEC > 1:  # host-proven: every pixel's channel row starts 16-byte aligned (in and out)
        C = C // VEC * VEC
        sN = sN // VEC * VEC
        sH = sH // VEC * VEC
        sW = sW // VEC * VEC
        oN = oN // VEC * VEC
        oH = oH // VEC * VEC
        oW = oW // VEC * VEC
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
                pooled = _nan_max(_nan_max(v00, v01), _nan_max(v10, v11))
            po = qi.to(tl.int64) * oH + qj.to(tl.int64) * oW
            tl.store(obase + oc[:, None] + po[None, :], pooled.to(out_ptr.dtype.element_ty),
                     mask=cm[:, None] & pool_ok[None, :])
    if ATT:  # offsets and masks from the program ids again (see _stats_kernel)
        q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        qm = q < NQ
        qi = q // QW
        h0 = 2 * qi
        w0 = 2 * (q - qi * QW)
        m00 = qm & (h0 < H) & (w0 < W)
        m01 = qm & (h0 < H) & (w0 + 1 < W)
        m10 = qm & (h0 + 1 < H) & (w0 < W)
        m11 = qm & (h0 + 1 < H) & (w0 + 1 < W)
        abase = att_ptr + tl.program_id(0).to(tl.int64) * H * W
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



def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    # strides of size-1 dims are never multiplied by a non-zero index: 0 keeps them out of the
    # alignment proofs (and a stride of 1 there would be specialised away by Triton)
    return tuple(s if d > 1 else 0 for s, d in zip(t.stride(), t.shape))


def stats_plan(y: torch.Tensor, *, sm_count: Optional[int]
               ) -> Tuple[torch.Tensor, torch.Tensor, List[Launch]]:
    """``(mean, m2, launches)`` of :func:`plane_moments` (outputs allocated on y's device, which
    may be ``meta``). ``sm_count``: the CUDA device's SM count; None: interpreter blocks."""
    N, C, H, W = y.shape
    HW = H * W
    dev = y.device
    mean = torch.empty((N, C), dtype=torch.float32, device=dev)
    m2 = torch.empty_like(mean)
    if N == 0 or C == 0 or HW == 0:
        return mean, m2, []
    sN, sC, sH, sW = _strides(y)
    es = y.element_size()
    s_hw = flat_hw_stride(H, W, *y.stride()[2:])
    if HW == 1 or s_hw == 1:
        layout = STATS_LAYOUT_HW
        sW = 1
        vec = vec_for(es, [elem_addr(y), HW, sN, sC])
    elif s_hw is not None and (sC == 1 or C == 1):
        layout = STATS_LAYOUT_CL
        sC, sW = 1, s_hw  # channels contiguous; flat pixel stride (C for a dense tensor)
        vec = vec_for(es, [elem_addr(y), C, sN, sW])
    else:
        layout, vec = STATS_LAYOUT_GENERIC, 1
    if sm_count is None:  # interpreter: few, big programs
        bc = min(next_pow2(C), 64)
        bp = min(next_pow2(HW), 1024)
        split = 1
    else:
        if layout == STATS_LAYOUT_CL:
            # a whole channel row (up to 128 channels) per pixel: full 32-byte sectors, and no
            # sibling channel block of the same pixel N programs away
            bc = min(next_pow2(C), 128)
            bp = max((4096 if vec > 1 else 1024) // bc, 8)
        else:
            bc = min(next_pow2(C), 8)
            # no vectors (strided view): every element has its own 64-bit address, keep the
            # tile at 1024 elements (8 per thread) next to the two fp32 accumulators
            bp = min(max(next_pow2(HW), 16), 512 if vec > 1 else 128)
        cblocks = triton.cdiv(C, bc)
        # enough programs to fill the GPU (4 per SM) without ranges shorter than two tiles
        want = triton.cdiv(4 * sm_count, N * cblocks)
        split = max(1, min(want, triton.cdiv(HW, 2 * bp)))
    vec = min(vec, bc if layout == STATS_LAYOUT_CL else bp)
    tiles = triton.cdiv(triton.cdiv(HW, split), bp)
    split = triton.cdiv(HW, tiles * bp)  # no empty ranges
    grid = (N, split, triton.cdiv(C, bc))
    launches: List[Launch] = []
    if split == 1:
        launches.append(Launch(_stats_kernel, "real_epilogue_stats", grid,
                               (y, mean, m2, C, HW, W, sN, sC, sH, sW, tiles),
                               dict(LAYOUT=layout, FINAL=True, BLOCK_C=bc, BLOCK_P=bp, VEC=vec), 4))
    else:
        p1 = torch.empty((N, split, C), dtype=torch.float32, device=dev)
        p2 = torch.empty_like(p1)
        launches.append(Launch(_stats_kernel, "real_epilogue_stats", grid,
                               (y, p1, p2, C, HW, W, sN, sC, sH, sW, tiles),
                               dict(LAYOUT=layout, FINAL=False, BLOCK_C=bc, BLOCK_P=bp, VEC=vec), 4))
        bc2 = min(next_pow2(C), 128)
        launches.append(Launch(_stats_combine_kernel, "real_epilogue_stats_combine", (N, triton.cdiv(C, bc2)),
                               (y, p1, p2, mean, m2, C, HW, sN, sC, split), dict(BLOCK_C=bc2), 4))
    return mean, m2, launches


def plane_moments(y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-(n, c) mean and M2 (sum of squared deviations) of ``y`` over H*W, float32 [N, C]."""
    _check(y)
    mean, m2, launches = stats_plan(y, sm_count=gpu_sm_count(y.device))
    run_launches(launches, y.device)
    return mean, m2


def pooled_shape(H: int, W: int, pool: str) -> Tuple[int, int]:
    return (H, W) if pool == "none" else (H // 2, W // 2)


def apply_plan(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, act: str = "relu",
               slope: float = 0.01, pool: str = "avgpool", power: float = 4.0, attention: bool = True,
               sm_count: Optional[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor], List[Launch]]:
    """``(out, att, launches)`` of :func:`apply_epilogue`; ``sm_count`` as in :func:`stats_plan`."""
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
        return out, att, []
    interp = sm_count is None
    QH, QW = (H + 1) // 2, (W + 1) // 2
    es = y.element_size()
    common = dict(ACT=ACTS[act], POOL=POOLS[pool], POWER_MODE=power_mode(power), ATT=bool(attention))
    att_arg = att if attention else scale
    sN, sC, sH, sW = _strides(y)
    oN, oC, oH, oW = _strides(out)
    if sC == 1 and sW != 1:  # channels contiguous: each pixel of a quad is a row of channels
        vec = vec_for(es, [elem_addr(y), elem_addr(out), C, sN, sH, sW, oN, oH, oW])
        if interp:
            bc, bq, warps = min(next_pow2(C), 64), min(next_pow2(QH * QW), 1024), 4
        elif vec > 1:
            # four pixel tiles of bc x bq live at once: 4096 elements over 8 warps (16 per
            # thread, 4 contiguous channels each: one 16-byte access per pixel)
            bc = min(next_pow2(C), 64)
            bq, warps = min(next_pow2(QH * QW), max(1024 // bc, 8)), 8
        else:
            # no vectors: every element carries its own 64-bit address, 1024 in all
            bc = min(next_pow2(C), 32)
            bq, warps = min(next_pow2(QH * QW), max(256 // bc, 8)), 4
        vec = min(vec, bc)
        launch = Launch(_apply_quads_kernel, "real_epilogue_apply", (N, triton.cdiv(QH * QW, bq)),
                        (y, scale, shift, out, att_arg, float(power), float(slope),
                         C, H, W, QW, QH * QW, PH, PW, sN, sC, sH, sW, oN, oC, oH, oW),
                        dict(**common, BLOCK_C=bc, BLOCK_Q=bq, VEC=vec), warps)
        return out, att, [launch]
    bw = max(2, min(next_pow2(W), 1024 if interp else 64))
    vec = oVec = 1
    if sW == 1 or W == 1:
        sW = 1
        vec = min(vec_for(es, [elem_addr(y), W, sN, sC, sH]), bw)
        oVec = min(vec_for(es, [elem_addr(out), PW, oN, oC, oH]), max(1, bw // 2))
    # two row tiles of bc x bw live at once: 2048 elements (1024 without vectors, where every
    # element carries its own 64-bit address)
    bc = min(next_pow2(C), 64 if interp else max(1, (1024 if vec > 1 else 512) // bw))
    launch = Launch(_apply_rows_kernel, "real_epilogue_apply", (N * QH, triton.cdiv(W, bw)),
                    (y, scale, shift, out, att_arg, float(power), float(slope),
                     C, H, W, QH, PH, PW, sN, sC, sH, sW, oN, oC, oH, oW),
                    dict(**common, BLOCK_C=bc, BW=bw, VEC=vec, OVEC=oVec), 4)
    return out, att, [launch]


def apply_epilogue(y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, act: str = "relu",
                   slope: float = 0.01, pool: str = "avgpool", power: float = 4.0, attention: bool = True,
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``out = pool(act(y * scale + shift))`` (y's dtype and memory format) and, when ``attention``,
    ``a = sum_c |act(y * scale + shift)|^p`` (float32 ``[N, H*W]``, not normalised).
    ``scale`` / ``shift``: float32 ``[N, C]``."""
    _check(y)
    out, att, launches = apply_plan(y, scale, shift, act=act, slope=slope, pool=pool, power=power,
                                    attention=attention, sm_count=gpu_sm_count(y.device))
    run_launches(launches, y.device)
    return out, att
