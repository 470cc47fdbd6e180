"""Triton kernels of the per-sample channel statistics (``datadam_fast.loss.channels``).

* ``ch_fwd``: one program per (sample, block of ``BLOCK_C`` channels); it walks the ``H x W``
  plane in ``BLOCK_HW`` steps and reduces it in registers: ``sum |f|^p`` (channel attention) or
  ``sum f`` and ``sum f^2`` (channel moments) in fp32, from any dtype and any strides (the feature
  map is read once; bf16/fp16 are widened in registers, never copied).
* ``ch_bwd``: one program per (sample, channel block, pixel block): ``dL/df = w[n, c] * d|f|^p/df``
  (attention; ``w`` the ``[N, C]`` gradient of the channel sums) or ``(g1 + 2 f g2) / HW``
  (moments), written once, in the layout the op contract names (``out`` strides).

The ``[N, C]`` parts (the L2 normalisation of the attention and its Jacobian) are tiny and run in
PyTorch on top.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import Launch, abs_pow, gpu_sm_count, power_mode, run_launches

REG_BUDGET = {"ch_fwd": 128, "ch_bwd": 128}


@triton.jit
def ch_fwd(X, S1, S2, C, H, W, sN, sC, sH, sW, power,
           MOMENTS: tl.constexpr, POWER_MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n = tl.program_id(0)
    cb = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    base = X + n.to(tl.int64) * sN + c[:, None].to(tl.int64) * sC
    # [BLOCK_C] accumulators, each pixel block reduced as it is read: a [BLOCK_C, BLOCK_HW]
    # accumulator pair would hold 2 x 32 registers a thread (and spill with strided addressing)
    a1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    a2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    HW = H * W
    for r0 in range(0, HW, BLOCK_HW):
        hw = r0 + tl.arange(0, BLOCK_HW)
        m = cmask[:, None] & (hw < HW)[None, :]
        h = hw // W
        w = hw - h * W
        x = tl.load(base + (h * sH + w * sW)[None, :], mask=m, other=0.0).to(tl.float32)
        if MOMENTS:
            a1 += tl.sum(x, axis=1)
            a2 += tl.sum(x * x, axis=1)
        else:
            a1 += tl.sum(abs_pow(tl.abs(x), power, POWER_MODE), axis=1)
    out = n.to(tl.int64) * C + c
    tl.store(S1 + out, a1, mask=cmask)
    if MOMENTS:
        tl.store(S2 + out, a2, mask=cmask)


@triton.jit
def ch_bwd(X, G1, G2, OUT, C, H, W, sN, sC, sH, sW, oN, oC, oH, oW, power, inv_hw,
           MOMENTS: tl.constexpr, POWER_MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    n = tl.program_id(0)
    cb = tl.program_id(1)
    pb = tl.program_id(2)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    HW = H * W
    hw = pb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    m = cmask[:, None] & (hw < HW)[None, :]
    h = hw // W
    w = hw - h * W
    x = tl.load(X + n.to(tl.int64) * sN + c[:, None].to(tl.int64) * sC + (h * sH + w * sW)[None, :], mask=m,
                other=0.0).to(tl.float32)
    g1 = tl.load(G1 + n.to(tl.int64) * C + c, mask=cmask, other=0.0)
    if MOMENTS:
        g2 = tl.load(G2 + n.to(tl.int64) * C + c, mask=cmask, other=0.0)
        g = (g1[:, None] + 2.0 * x * g2[:, None]) * inv_hw
    else:
        ax = tl.abs(x)
        sg = tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))
        if POWER_MODE == 1:
            d = sg
        elif POWER_MODE == 2:
            d = 2.0 * x
        elif POWER_MODE == 3:
            d = 3.0 * ax * x
        elif POWER_MODE == 4:
            d = 4.0 * ax * ax * x
        else:
            d = tl.where(ax == 0.0, 0.0, power * abs_pow(ax, power - 1.0, 0) * sg)
        g = d * g1[:, None]
    o = OUT + n.to(tl.int64) * oN + c[:, None].to(tl.int64) * oC + (h * oH + w * oW)[None, :]
    tl.store(o, g.to(OUT.dtype.element_ty), mask=m)


def _blocks(C: int, HW: int, sm_count: Optional[int]):
    if sm_count is None:
        return 8, 16, 4
    # a [16, 128] tile: 16 elements a thread at 4 warps (with strided addressing each one carries
    # a 64-bit address: a [32, 128] tile took ~230 registers there)
    return min(16, triton.next_power_of_2(max(C, 1))), min(128, triton.next_power_of_2(max(HW, 1))), 4


def forward_plan(x: torch.Tensor, moments: bool, power: float, sm_count: Optional[int]):
    N, C, H, W = x.shape
    BC, BHW, nw = _blocks(C, H * W, sm_count)
    s1 = x.new_empty((N, C), dtype=torch.float32)
    s2 = x.new_empty((N, C) if moments else (1,), dtype=torch.float32)
    sN, sC, sH, sW = x.stride()
    ln = Launch(ch_fwd, "ch_fwd", (N, triton.cdiv(C, BC)),
                (x, s1, s2, C, H, W, sN, sC, sH, sW, float(power)),
                dict(MOMENTS=bool(moments), POWER_MODE=power_mode(power) if not moments else 1, BLOCK_C=BC,
                     BLOCK_HW=BHW), nw)
    return s1, s2, [ln]


def backward_plan(x: torch.Tensor, g1: torch.Tensor, g2: Optional[torch.Tensor], out: torch.Tensor, moments: bool,
                  power: float, sm_count: Optional[int]):
    N, C, H, W = x.shape
    BC, BHW, nw = _blocks(C, H * W, sm_count)
    sN, sC, sH, sW = x.stride()
    oN, oC, oH, oW = out.stride()
    ln = Launch(ch_bwd, "ch_bwd", (N, triton.cdiv(C, BC), triton.cdiv(H * W, BHW)),
                (x, g1, g2 if g2 is not None else g1, out, C, H, W, sN, sC, sH, sW, oN, oC, oH, oW, float(power),
                 1.0 / max(H * W, 1)),
                dict(MOMENTS=bool(moments), POWER_MODE=power_mode(power) if not moments else 1, BLOCK_C=BC,
                     BLOCK_HW=BHW), nw)
    return [ln]


def channel_sums(x: torch.Tensor, moments: bool, power: float = 1.0):
    """``(sum |f|^p, None)`` or ``(sum f, sum f^2)`` over each plane: ``[N, C]`` float32."""
    s1, s2, launches = forward_plan(x, moments, power, gpu_sm_count(x.device))
    if x.numel():
        run_launches(launches, x.device)
    else:
        s1.zero_()
        s2.zero_()
    return s1, (s2 if moments else None)


def channel_grad(x: torch.Tensor, g1: torch.Tensor, g2: Optional[torch.Tensor], out: torch.Tensor, moments: bool,
                 power: float = 1.0) -> torch.Tensor:
    if x.numel():
        run_launches(backward_plan(x, g1.float().contiguous(), None if g2 is None else g2.float().contiguous(), out,
                                   moments, power, gpu_sm_count(x.device)), x.device)
    return out
