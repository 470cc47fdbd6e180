"""Triton kernels of the characteristic-function statistic (``datadam_fast.loss.characteristic``).

Rows are grouped by class on the device (a stable ``argsort`` of the labels and the class offsets:
no host sync); every kernel walks one class's rows, ``BLOCK_M`` at a time, through ``order``.

* ``cf_fwd``: one program per (block of ``BLOCK_F`` frequencies, class, split). For each tile of
  the class's rows it forms the projection tile ``E_tile @ t_k^T`` with ``tl.dot`` over ``D`` in
  ``BLOCK_D`` steps (fp32: IEEE in the interpreter, error-compensated TF32 on a GPU, see
  ``GPU_PRECISION``), then takes cos and sin and sums over the tile's rows in registers. Nothing
  ``[N, F]`` is written (unless the caller asked to keep the projection for the backward). The
  ``SPLIT`` programs of one class each own every SPLIT-th row tile and write a partial sum;
  the partials are added by the host in a fixed order (deterministic, no atomics).
* ``cf_bwd_g``: the same walk, writing ``G = g_sin[k] * cos(P) - g_cos[k] * sin(P)`` for the rows
  (the projection recomputed, or read back when the forward kept it).
* ``cf_bwd_emb``: ``dE[i] = G[i] @ t_k`` per class: one program per (row tile of a class, block of
  ``D``), ``tl.dot`` over ``F``.
* ``cf_bwd_freq``: ``dt_k = G_k^T @ E_k``: one program per (class, block of F, block of D), over the
  class's rows.

``G`` is the backward's only ``[N, F]`` buffer (transient, float32): the synthetic side's rows.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_COUNTS, Launch, gpu_sm_count, interpreter_active, next_pow2, run_launches  # noqa: F401

#: per-thread register budgets (kernels/codegen.py asserts them for sm_80 / sm_90)
#: a [32, 64] fp32 tile (phases or gradient) and its three-way TF32 operands at 8 warps take ~120;
#: an embedding width that is not a multiple of 4 (no 16-byte rows) adds scalar address arithmetic
#: (up to ~215 on the odd codegen case) but no spills: 224 leaves one 8-warp block per SM resident
REG_BUDGET = {"cf_fwd": 224, "cf_bwd_g": 224, "cf_bwd_emb": 224, "cf_bwd_freq": 224}


#: precision of the GEMMs on a GPU: three TF32 products per fp32 product (error-compensated: ~fp32
#: accuracy, on the tensor cores; plain TF32's 10-bit mantissa would show as ~1e-3 errors in the
#: phases fed to cos/sin, and "ieee" lowers to scalar FMAs that hold the whole tile in registers)
GPU_PRECISION = "tf32x3"


@triton.jit
def sincos(x):
    # sin(x) and cos(x) with one shared range reduction (Cephes sinf/cosf): k = round(x * 2/pi),
    # r = x - k * pi/2 in three Cody-Waite parts (exact products for |k| < 2^12, i.e. |x| up to
    # ~6000; the phases t . e of unit embeddings are O(sqrt(D))), then minimax polynomials on
    # [-pi/4, pi/4] (~1e-7 absolute) and the quadrant's sign/swap. libdevice's sinf/cosf carry a
    # Payne-Hanek path for huge arguments that costs a local-memory array and ~100 registers.
    k = tl.floor(x * 0.6366197723675814 + 0.5)
    r = x - k * 1.5703125
    r = r - k * 4.837512969970703125e-4
    r = r - k * 7.54978995489188216e-8
    z = r * r
    s = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    q = k.to(tl.int32) & 3
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    return sin, cos


@triton.jit
def projection_tile(E, t_base, idx, rmask, fo, fmask, D, sE0, sE1, sTf, sTd,
                    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    # P[rows, fo] = E[idx] @ t_k[fo]^T, over D in BLOCK_D steps (the forward and the recomputing
    # backward share it)
    dd = tl.arange(0, BLOCK_D)
    p = tl.zeros([BLOCK_M, BLOCK_F], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        do = d0 + dd
        dmask = do < D
        e = tl.load(E + idx[:, None] * sE0 + do[None, :] * sE1, mask=rmask[:, None] & dmask[None, :], other=0.0)
        t = tl.load(t_base + fo[None, :] * sTf + do[:, None] * sTd, mask=dmask[:, None] & fmask[None, :], other=0.0)
        p = tl.dot(e, t, acc=p, input_precision=PRECISION)
    return p


@triton.jit
def cf_fwd(E, T, ORDER, OFFS, PART_C, PART_S, PROJ, K, D, F, sE0, sE1, sTk, sTf, sTd,
           SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
           SAVE: tl.constexpr, PRECISION: tl.constexpr):
    pid_f = tl.program_id(0)
    k = tl.program_id(1)
    sp = tl.program_id(2)
    start = tl.load(OFFS + k)
    end = tl.load(OFFS + k + 1)
    fo = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = fo < F
    m = tl.arange(0, BLOCK_M)
    acc_c = tl.zeros([BLOCK_F], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_F], dtype=tl.float32)
    t_base = T + k.to(tl.int64) * sTk
    n_tiles = tl.cdiv(end - start, BLOCK_M)
    for j in range(sp, n_tiles, SPLIT):
        rows = start + j * BLOCK_M + m
        rmask = rows < end
        idx = tl.load(ORDER + rows, mask=rmask, other=0).to(tl.int64)
        p = projection_tile(E, t_base, idx, rmask, fo, fmask, D, sE0, sE1, sTf, sTd,
                            BLOCK_M, BLOCK_F, BLOCK_D, PRECISION)
        if SAVE:
            tl.store(PROJ + idx[:, None] * F + fo[None, :], p, mask=rmask[:, None] & fmask[None, :])
        sn, cs = sincos(p)
        acc_c += tl.sum(tl.where(rmask[:, None], cs, 0.0), axis=0)
        acc_s += tl.sum(tl.where(rmask[:, None], sn, 0.0), axis=0)
    out = (sp * K + k).to(tl.int64) * F + fo
    tl.store(PART_C + out, acc_c, mask=fmask)
    tl.store(PART_S + out, acc_s, mask=fmask)


@triton.jit
def cf_bwd_g(E, T, ORDER, OFFS, GC, GS, PROJ, G, D, F, sE0, sE1, sTk, sTf, sTd,
             SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
             SAVED: tl.constexpr, PRECISION: tl.constexpr):
    pid_f = tl.program_id(0)
    k = tl.program_id(1)
    sp = tl.program_id(2)
    start = tl.load(OFFS + k)
    end = tl.load(OFFS + k + 1)
    fo = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = fo < F
    m = tl.arange(0, BLOCK_M)
    gc = tl.load(GC + k.to(tl.int64) * F + fo, mask=fmask, other=0.0)
    gs = tl.load(GS + k.to(tl.int64) * F + fo, mask=fmask, other=0.0)
    t_base = T + k.to(tl.int64) * sTk
    n_tiles = tl.cdiv(end - start, BLOCK_M)
    for j in range(sp, n_tiles, SPLIT):
        rows = start + j * BLOCK_M + m
        rmask = rows < end
        idx = tl.load(ORDER + rows, mask=rmask, other=0).to(tl.int64)
        mask2 = rmask[:, None] & fmask[None, :]
        if SAVED:
            p = tl.load(PROJ + idx[:, None] * F + fo[None, :], mask=mask2, other=0.0)
        else:
            p = projection_tile(E, t_base, idx, rmask, fo, fmask, D, sE0, sE1, sTf, sTd,
                                BLOCK_M, BLOCK_F, BLOCK_D, PRECISION)
        sn, cs = sincos(p)
        g = gs[None, :] * cs - gc[None, :] * sn
        tl.store(G + idx[:, None] * F + fo[None, :], g, mask=mask2)


@triton.jit
def cf_bwd_emb(G, T, ORDER, OFFS, GE, D, F, sTk, sTf, sTd, MAX_TILES,
               BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_d = tl.program_id(0)
    k = tl.program_id(1)
    j = tl.program_id(2)
    start = tl.load(OFFS + k)
    end = tl.load(OFFS + k + 1)
    do = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = do < D
    ff = tl.arange(0, BLOCK_F)
    t_base = T + k.to(tl.int64) * sTk
    n_tiles = tl.cdiv(end - start, BLOCK_M)
    # a class has at most MAX_TILES row tiles; programs past the class's last tile idle
    for jj in range(j, n_tiles, MAX_TILES):
        rows = start + jj * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < end
        idx = tl.load(ORDER + rows, mask=rmask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            fo = f0 + ff
            fmask = fo < F
            g = tl.load(G + idx[:, None] * F + fo[None, :], mask=rmask[:, None] & fmask[None, :], other=0.0)
            t = tl.load(t_base + fo[:, None] * sTf + do[None, :] * sTd, mask=fmask[:, None] & dmask[None, :],
                        other=0.0)
            acc = tl.dot(g, t, acc=acc, input_precision=PRECISION)
        tl.store(GE + idx[:, None] * D + do[None, :], acc, mask=rmask[:, None] & dmask[None, :])


@triton.jit
def cf_bwd_freq(G, E, ORDER, OFFS, GT, D, F, sE0, sE1,
                BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_f = tl.program_id(0)
    pid_d = tl.program_id(1)
    k = tl.program_id(2)
    start = tl.load(OFFS + k)
    end = tl.load(OFFS + k + 1)
    fo = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = fo < F
    do = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = do < D
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + m
        rmask = rows < end
        idx = tl.load(ORDER + rows, mask=rmask, other=0).to(tl.int64)
        g = tl.load(G + idx[None, :] * F + fo[:, None], mask=fmask[:, None] & rmask[None, :], other=0.0)
        e = tl.load(E + idx[:, None] * sE0 + do[None, :] * sE1, mask=rmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(g, e, acc=acc, input_precision=PRECISION)
    tl.store(GT + (k.to(tl.int64) * F + fo[:, None]) * D + do[None, :], acc, mask=fmask[:, None] & dmask[None, :])


# --------------------------------------------------------------------------------------------
# launch plans (also compiled ahead of time by kernels/codegen.py on meta tensors)
# --------------------------------------------------------------------------------------------
#: (BLOCK_M, BLOCK_F, BLOCK_D, num_warps) per kernel on a GPU, sized by kernels/codegen.py's
#: register and shared-memory budgets (a [64, 64] fp32 accumulator is 32 registers a thread at 4
#: warps; the dot operands are staged in shared memory)
GPU_BLOCKS = {"cf_fwd": (32, 64, 32, 8), "cf_bwd_g": (32, 64, 32, 8), "cf_bwd_emb": (32, 32, 64, 8),
              "cf_bwd_freq": (32, 32, 64, 8)}


def _blocks(sm_count: Optional[int], kernel: str = "cf_fwd") -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_F, BLOCK_D, num_warps). The interpreter runs the smallest legal dot tiles."""
    if sm_count is None:
        return 16, 16, 16, 4
    return GPU_BLOCKS[kernel]


def _precision(sm_count: Optional[int]) -> str:
    return "ieee" if sm_count is None else GPU_PRECISION


def _split(n_rows: int, K: int, F: int, block_m: int, block_f: int, sm_count: Optional[int]) -> int:
    """Row-tile splits per class so that the grid fills the GPU (about 4 programs per SM)."""
    if sm_count is None:
        return 2
    programs = K * triton.cdiv(F, block_f)
    tiles = max(1, triton.cdiv(max(n_rows // max(K, 1), 1), block_m))
    return int(max(1, min(tiles, triton.cdiv(4 * sm_count, max(programs, 1)), 16)))


def _freq_strides(t: torch.Tensor) -> Tuple[int, int, int]:
    if t.dim() == 2:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def grouping(labels: torch.Tensor, K: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): rows sorted by class (stable) and the class boundaries, on the device."""
    lab = labels.to(torch.long)
    order = torch.argsort(lab, stable=True).to(torch.int32)
    offs = torch.zeros(K + 1, dtype=torch.int32, device=labels.device)
    offs[1:] = torch.cumsum(torch.bincount(lab, minlength=K)[:K], 0).to(torch.int32)
    return order, offs


def forward_plan(e, t, order, offs, K: int, save: bool, sm_count: Optional[int]):
    N, D = e.shape
    F = t.shape[-2]
    BM, BF, BD, nw = _blocks(sm_count)
    split = _split(N, K, F, BM, BF, sm_count)
    part_c = e.new_empty((split, K, F), dtype=torch.float32)
    part_s = e.new_empty((split, K, F), dtype=torch.float32)
    proj = e.new_empty((N, F) if save else (1,), dtype=torch.float32)
    sTk, sTf, sTd = _freq_strides(t)
    ln = Launch(cf_fwd, "cf_fwd", (triton.cdiv(F, BF), K, split),
                (e, t, order, offs, part_c, part_s, proj, K, D, F, e.stride(0), e.stride(1), sTk, sTf, sTd),
                dict(SPLIT=split, BLOCK_M=BM, BLOCK_F=BF, BLOCK_D=BD, SAVE=bool(save), PRECISION=_precision(sm_count)),
                nw)
    return part_c, part_s, proj, [ln]


def backward_plans(e, t, order, offs, K: int, gc, gs, proj, need_emb: bool, need_freqs: bool,
                   sm_count: Optional[int], max_class_rows: Optional[int] = None):
    """The three backward launches. ``max_class_rows`` bounds the rows of one class (the grid of
    ``cf_bwd_emb``); None: all ``N`` rows."""
    N, D = e.shape
    F = t.shape[-2]
    BM, BF, BD, nw = _blocks(sm_count, "cf_bwd_g")
    split = _split(N, K, F, BM, BF, sm_count)
    saved = proj.dim() == 2 and proj.shape[0] == N and N > 0
    sTk, sTf, sTd = _freq_strides(t)
    G = e.new_empty((N, F), dtype=torch.float32)
    launches = [Launch(cf_bwd_g, "cf_bwd_g", (triton.cdiv(F, BF), K, split),
                       (e, t, order, offs, gc, gs, proj, G, D, F, e.stride(0), e.stride(1), sTk, sTf, sTd),
                       dict(SPLIT=split, BLOCK_M=BM, BLOCK_F=BF, BLOCK_D=BD, SAVED=bool(saved),
                            PRECISION=_precision(sm_count)), nw)]
    ge = gt = None
    if need_emb:
        ge = e.new_empty((N, D), dtype=torch.float32)
        # programs per class: enough for the average class; a larger class's extra tiles are taken
        # by the same programs (the kernel strides over its tiles), so any label counts are exact
        BM, BF, BD, nw = _blocks(sm_count, "cf_bwd_emb")
        rows = max_class_rows if max_class_rows is not None else triton.cdiv(N, K)
        tiles = max(1, min(triton.cdiv(rows, BM), 4096))
        launches.append(Launch(cf_bwd_emb, "cf_bwd_emb", (triton.cdiv(D, BD), K, tiles),
                               (G, t, order, offs, ge, D, F, sTk, sTf, sTd, tiles),
                               dict(BLOCK_M=BM, BLOCK_F=BF, BLOCK_D=BD, PRECISION=_precision(sm_count)), nw))
    if need_freqs:
        # per class [K, F, D]; a shared [F, D] matrix sums the classes' parts afterwards
        gt = e.new_empty((K, F, D), dtype=torch.float32)
        BM, BF, BD, nw = _blocks(sm_count, "cf_bwd_freq")
        launches.append(Launch(cf_bwd_freq, "cf_bwd_freq", (triton.cdiv(F, BF), triton.cdiv(D, BD), K),
                               (G, e, order, offs, gt, D, F, e.stride(0), e.stride(1)),
                               dict(BLOCK_M=BM, BLOCK_F=BF, BLOCK_D=BD, PRECISION=_precision(sm_count)), nw))
    return G, ge, gt, launches


# --------------------------------------------------------------------------------------------
# entry points (float32 inputs; float64 goes to the reference in the op)
# --------------------------------------------------------------------------------------------
def cf_class_sums_forward(e: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, K: int, save: bool):
    if e.dtype == torch.float64:
        from datadam_fast.loss import reference as R
        c, s = R.cf_class_sums(e, t, labels, K)
        return c, s, (R.cf_projection(e, t, labels, K) if save else e.new_empty((0,)))
    N = e.shape[0]
    F = t.shape[-2]
    if N == 0:
        z = e.new_zeros((K, F))
        return z, z.clone(), e.new_empty((N, F) if save else (0,))
    order, offs = grouping(labels, K)
    part_c, part_s, proj, launches = forward_plan(e, t, order, offs, K, save, gpu_sm_count(e.device))
    run_launches(launches, e.device)
    return part_c.sum(0), part_s.sum(0), (proj if save else e.new_empty((0,)))


def cf_class_sums_backward(e, t, labels, K: int, gc, gs, proj, need_emb: bool, need_freqs: bool):
    if e.dtype == torch.float64:
        from datadam_fast.loss import reference as R
        ge, gf = R.cf_class_sums_backward(e, t, labels, K, gc, gs)
        return (ge if need_emb else e.new_empty((0,))), (gf if need_freqs else t.new_empty((0,)))
    N, D = e.shape
    if N == 0 or not (need_emb or need_freqs):
        return (e.new_zeros((N, D)) if need_emb else e.new_empty((0,))), \
            (torch.zeros_like(t) if need_freqs else t.new_empty((0,)))
    order, offs = grouping(labels, K)
    _, ge, gt, launches = backward_plans(e, t, order, offs, K, gc.contiguous(), gs.contiguous(), proj, need_emb,
                                         need_freqs, gpu_sm_count(e.device))
    run_launches(launches, e.device)
    gf = None
    if need_freqs:
        gf = gt if t.dim() == 3 else gt.sum(0)
    return (ge if need_emb else e.new_empty((0,))), (gf if need_freqs else t.new_empty((0,)))
