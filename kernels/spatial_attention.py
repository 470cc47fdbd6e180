"""Grouped Triton kernels for the channel-power spatial attention of DataDAM.

For every layer ``l`` of one call (``f_l``: ``[N_l, C_l, H_l, W_l]``, any strides)::

    a[n, hw] = sum_c |f[n, c, hw]|^p            (float32 accumulation)
    norm[n]  = ||a[n, :]||_2
    m[n, hw] = a[n, hw] / max(norm[n], eps)      (eps = 1e-12, as F.normalize)

and the vector-Jacobian product for ``g = dL/dm``::

    ga[n, hw]     = (g - m <m, g>) / norm       if norm > eps, else g / eps
    df[n, c, hw]  = p |f|^(p-1) sign(f) * ga[n, hw]

Launch plan (one group = the layers of one call that share dtype and layout; normally all of them)

    forward :  _fwd_accum_kernel      grid = sum_l cdiv(N_l*H_l*W_l, BLOCK_M)   reads f once, writes a
               _fwd_normalize_kernel  grid = sum_l N_l                           a -> m in place, norms
    backward:  _bwd_ga_kernel         grid = sum_l N_l                           <m,g>, writes ga (fp32)
               _bwd_grad_kernel       grid = sum_l cdiv(N_l*H_l*W_l, BLOCK_M)   reads f once, writes df

The big kernels (``accum`` / ``grad``) move ``N*C*H*W`` elements; the row kernels touch only
``O(N*H*W)`` float32 values (``1/C`` of the traffic), so splitting the per-sample reductions into
them costs a few percent of bandwidth and one launch, but lets the big kernels tile the flattened
``(n, hw)`` index space freely (a tile may span several samples or part of one), which keeps every
lane busy for every layer shape in a single grouped launch.

Grouping: all layers of one call go into ONE launch per kernel. Per-layer data lives in an int64
table with one row per layer and named columns (``_FIELDS``; rows are built by name with
:func:`_meta_row`): the layer's tensor addresses (the Triton grouped-GEMM pattern: each program
loads its layer's pointers and casts them with ``.to(tl.pointer_type(...))``, so no address is
ever formed across two allocations), its shapes, strides and first program ids. A program finds
its layer with an unrolled scan over the (few) layer start offsets. The kernel arguments
``f_ptr`` / ``out_ptr`` only carry the element type of the group.

Layouts (constexpr ``LAYOUT``): 0 = H*W contiguous (NCHW-like, incl. batch/channel slices),
1 = channels-contiguous (channels_last), 2 = anything else (h, w recovered by division). With
``VEC > 1`` the host has proven that every offset/stride on the contiguous axis is a multiple of
``VEC`` elements (16 bytes), and the kernel states that with ``tl.multiple_of``/``tl.max_contiguous``
so that loads/stores can be vectorised although shapes and strides come from a table.

Host side: ``forward_plan`` / ``backward_plan`` allocate the outputs and return the launches
(:class:`Launch`: kernel, grid, arguments, constexprs, ``num_warps``); ``run_launches`` runs them
under the tensors' device guard. ``kernels/codegen.py`` compiles the same plans ahead of time for
sm_80 / sm_90 and checks them against ``REG_BUDGET`` (tests/loss/test_gpu_codegen.py).

float64 is not handled here (``TypeError``); the backend sends float64 layers to the reference.
"""
from __future__ import annotations

import collections
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._constants import NORM_EPS  # one eps for every backend
from ._common import (LAUNCH_COUNTS, Launch, abs_pow, elem_addr, flat_hw_stride, gpu_sm_count, interpreter_active,
                      next_pow2, power_mode, run_launches, vec_for)

# --------------------------------------------------------------------------------------------
# per-layer metadata table: int64 [L, META_WIDTH], one named column per field
# --------------------------------------------------------------------------------------------
_FIELDS = (
    "f_ptr",      # address of feats[l]
    "grad_ptr",   # address of grad_feats[l] (backward)
    "map_ptr",    # address of maps[l] (fp32 [N, HW], contiguous)
    "norm_ptr",   # address of norms[l] (fp32 [N])
    "gmap_ptr",   # address of grad_maps[l] (fp32, backward)
    "ws_ptr",     # address of layer l's slice of the fp32 ga workspace (backward)
    "C", "HW", "W",
    "M",          # N * H * W
    "tile0",      # first program id of the layer in the tile kernels
    "row0",       # first program id of the layer in the row kernels
    "f_sN", "f_sC", "f_sH",
    "f_sW",       # LAYOUT 0: 1; LAYOUT 1: the flat H*W stride; LAYOUT 2: W stride
    "g_sN", "g_sC", "g_sH", "g_sW",
    "gm_sN",      # grad_maps row stride
    "gm_sHW",     # grad_maps column stride (0 for expanded gradients)
)
_COL = {name: i for i, name in enumerate(_FIELDS)}
META_WIDTH = len(_FIELDS)
META_STRIDE = tl.constexpr(META_WIDTH)
_M_F_PTR = tl.constexpr(_COL["f_ptr"])
_M_GRAD_PTR = tl.constexpr(_COL["grad_ptr"])
_M_MAP_PTR = tl.constexpr(_COL["map_ptr"])
_M_NORM_PTR = tl.constexpr(_COL["norm_ptr"])
_M_GMAP_PTR = tl.constexpr(_COL["gmap_ptr"])
_M_WS_PTR = tl.constexpr(_COL["ws_ptr"])
_M_C = tl.constexpr(_COL["C"])
_M_HW = tl.constexpr(_COL["HW"])
_M_W = tl.constexpr(_COL["W"])
_M_M = tl.constexpr(_COL["M"])
_M_TILE0 = tl.constexpr(_COL["tile0"])
_M_ROW0 = tl.constexpr(_COL["row0"])
_M_FSN = tl.constexpr(_COL["f_sN"])
_M_FSC = tl.constexpr(_COL["f_sC"])
_M_FSH = tl.constexpr(_COL["f_sH"])
_M_FSW = tl.constexpr(_COL["f_sW"])
_M_GSN = tl.constexpr(_COL["g_sN"])
_M_GSC = tl.constexpr(_COL["g_sC"])
_M_GSH = tl.constexpr(_COL["g_sH"])
_M_GSW = tl.constexpr(_COL["g_sW"])
_M_USN = tl.constexpr(_COL["gm_sN"])
_M_USHW = tl.constexpr(_COL["gm_sHW"])


def _meta_row(**fields: int) -> List[int]:
    """One table row from named fields (missing fields are 0; an unknown name is an error)."""
    unknown = set(fields) - set(_COL)
    if unknown:
        raise KeyError(f"unknown metadata fields {sorted(unknown)}; known: {_FIELDS}")
    return [int(fields.get(name, 0)) for name in _FIELDS]


LAYOUT_HW_CONTIG, LAYOUT_CHANNELS_LAST, LAYOUT_GENERIC = 0, 1, 2

#: register budgets per thread for every launcher configuration on sm_80 / sm_90, asserted by
#: tests/loss/test_gpu_codegen.py (compiled ahead of time, no GPU needed). The streaming kernels move
#: N*C*H*W elements and must keep 16 warps per SM resident (65536 / (16 * 32) = 128); the row
#: kernels touch 1/C of the data.
REG_BUDGET = {"fwd_accum": 128, "bwd_grad": 128, "fwd_normalize": 128, "bwd_ga": 128}


# --------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _find_layer(pid, meta_ptr, START_FIELD: tl.constexpr, NUM_LAYERS: tl.constexpr):
    # Layers are laid out back to back in program-id space; count the starts we are past.
    # NUM_LAYERS is small (a network's tapped layers), so an unrolled scan of scalar loads
    # (the same few cache lines for every program) is cheaper than a per-program lookup table.
    layer = pid * 0
    for i in tl.static_range(1, NUM_LAYERS):
        start = tl.load(meta_ptr + i * META_STRIDE + START_FIELD)
        layer += (pid >= start).to(tl.int32)
    return layer


@triton.jit
def _layer_ptr(row, FIELD: tl.constexpr, carrier, ALIGN: tl.constexpr):
    # the address stored in column FIELD of a layer's row, typed like `carrier`; ALIGN (bytes)
    # is the alignment the host proved for it (1: none), which lets loads/stores vectorise
    p = tl.load(row + FIELD).to(tl.pointer_type(carrier.dtype.element_ty))
    if ALIGN > 1:
        p = tl.multiple_of(p, ALIGN)
    return p


@triton.jit
def _layer_ptr_f32(row, FIELD: tl.constexpr, ALIGN: tl.constexpr):
    p = tl.load(row + FIELD).to(tl.pointer_type(tl.float32))
    if ALIGN > 1:
        p = tl.multiple_of(p, ALIGN)
    return p


@triton.jit
def _sign(x):
    # torch.sign: +-1, 0 at 0, and 0 at NaN
    return (x > 0.0).to(tl.float32) - (x < 0.0).to(tl.float32)


@triton.jit
def _dabs_pow(x, power, POWER_MODE: tl.constexpr):
    # d|f|^p/df = p |f|^(p-1) sign(f), the reference's formula term by term (NaN/inf included)
    if POWER_MODE == 1:
        r = _sign(x)
    elif POWER_MODE == 2:
        r = 2.0 * x
    elif POWER_MODE == 3:
        r = 3.0 * x * tl.abs(x)
    elif POWER_MODE == 4:
        r = 4.0 * (x * x) * x
    else:
        ax = tl.abs(x)
        is0 = ax == 0.0
        mag = tl.where(is0, 0.0, tl.exp2((power - 1.0) * tl.log2(tl.where(is0, 1.0, ax))))
        r = power * mag * _sign(x)
    return r


@triton.jit
def _m_offsets(n, hw, W, sN, sH, sW, LAYOUT: tl.constexpr, VEC: tl.constexpr):
    # element offset of (n, c=0, hw) for a block of flattened (n, hw) indices, int64.
    # The alignment hints are applied here, on the values this function computes: a hint on
    # the *result* of a @triton.jit call is attached to the call and lost when it is inlined
    # (Triton 3.6), which silently costs the vector loads and doubles the registers.
    n64 = n.to(tl.int64)
    if LAYOUT == 0:
        off = n64 * sN + hw.to(tl.int64)
        if VEC > 1:
            # runs of VEC consecutive (n, hw) never cross a sample (HW % VEC == 0) and start
            # on a VEC-aligned element: 16-byte accesses along hw
            off = tl.max_contiguous(tl.multiple_of(off, VEC), VEC)
    elif LAYOUT == 1:
        off = n64 * sN + hw.to(tl.int64) * sW
        if VEC > 1:  # channels-contiguous: every (n, hw) row starts aligned
            off = tl.multiple_of(off, VEC)
    else:
        h = hw // W
        w = hw - h * W
        off = n64 * sN + h.to(tl.int64) * sH + w.to(tl.int64) * sW
    return off


@triton.jit
def _layer_geometry(row, pid, LAYOUT: tl.constexpr, VEC: tl.constexpr):
    # one layer's row of the metadata table: sizes, feature strides, and this program's tile
    # index, with the host-proven divisibility (VEC > 1) stated on the loaded values here (see
    # _m_offsets for why not on the returned ones)
    C = tl.load(row + _M_C).to(tl.int32)
    HW = tl.load(row + _M_HW).to(tl.int32)
    W = tl.load(row + _M_W).to(tl.int32)
    M = tl.load(row + _M_M).to(tl.int32)
    sN = tl.load(row + _M_FSN)
    sC = tl.load(row + _M_FSC)
    sH = tl.load(row + _M_FSH)
    sW = tl.load(row + _M_FSW)
    if VEC > 1:
        if LAYOUT == 0:
            sC = tl.multiple_of(sC, VEC)
            M = tl.multiple_of(M, VEC)
        else:
            C = tl.multiple_of(C, VEC)
    tile = pid - tl.load(row + _M_TILE0).to(tl.int32)
    return C, HW, W, M, sN, sC, sH, sW, tile


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_accum_kernel(f_ptr, meta_ptr, power,
                      NUM_LAYERS: tl.constexpr, LAYOUT: tl.constexpr, POWER_MODE: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, VEC: tl.constexpr,
                      ALIGN: tl.constexpr):
    """a[l][n, hw] = sum_c |f_l[n, c, hw]|^p for one BLOCK_M slice of layer l's flat (n, hw) range."""
    pid = tl.program_id(0)
    layer = _find_layer(pid, meta_ptr, _M_TILE0, NUM_LAYERS)
    row = meta_ptr + layer * META_STRIDE
    f_base = _layer_ptr(row, _M_F_PTR, f_ptr, ALIGN)
    C, HW, W, M, sN, sC, sH, sW, tile = _layer_geometry(row, pid, LAYOUT, VEC)

    idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    n = idx // HW
    hw = idx - n * HW
    off = _m_offsets(n, hw, W, sN, sH, sW, LAYOUT, VEC)
    mask_m = idx < M

    # elementwise [BLOCK_C, BLOCK_M] accumulator, reduced over channels once after the loop:
    # no cross-warp reduction (shared memory + barrier) inside the streaming loop
    acc = tl.zeros([BLOCK_C, BLOCK_M], dtype=tl.float32)
    cr = tl.arange(0, BLOCK_C)
    for ci in range(0, tl.cdiv(C, BLOCK_C)):
        c = ci * BLOCK_C + cr
        if LAYOUT == 1:
            c_off = c.to(tl.int64)
        else:
            c_off = c.to(tl.int64) * sC
        mask = (c < C)[:, None] & mask_m[None, :]
        x = tl.load(f_base + (c_off[:, None] + off[None, :]), mask=mask, other=0.0).to(tl.float32)
        acc += abs_pow(tl.abs(x), power, POWER_MODE)
    # the map address is read only now: a 64-bit pointer live across the channel loop is what
    # ptxas otherwise parks on the stack (8 B) in some configurations
    row = meta_ptr + layer * META_STRIDE
    if LAYOUT == 0:  # the host proved the map address VEC-aligned too (it is stored along hw)
        a_base = _layer_ptr_f32(row, _M_MAP_PTR, 4 * VEC)
    else:
        a_base = _layer_ptr_f32(row, _M_MAP_PTR, 4)
    tl.store(a_base + idx, tl.sum(acc, axis=0), mask=mask_m)


@triton.jit
def _fwd_normalize_kernel(meta_ptr, eps,
                          NUM_LAYERS: tl.constexpr, BLOCK_R: tl.constexpr, ONE_PASS: tl.constexpr,
                          RV: tl.constexpr):
    """One sample row: norm = ||a||, m = a / max(norm, eps) in place."""
    pid = tl.program_id(0)
    layer = _find_layer(pid, meta_ptr, _M_ROW0, NUM_LAYERS)
    row = meta_ptr + layer * META_STRIDE
    HW = tl.load(row + _M_HW).to(tl.int32)
    n = pid - tl.load(row + _M_ROW0).to(tl.int32)
    # host proved (RV > 1): HW and every map address are multiples of RV -> 16-byte accesses
    a_base = _layer_ptr_f32(row, _M_MAP_PTR, 4 * RV)
    if RV > 1:
        HW = tl.multiple_of(HW, RV)
    base = a_base + n.to(tl.int64) * HW
    r = tl.arange(0, BLOCK_R)
    if ONE_PASS:
        a = tl.load(base + r, mask=r < HW, other=0.0)
        nrm = tl.sqrt_rn(tl.sum(a * a, axis=0))
        # NaN-propagating clamp (max(nan, eps) would silently give eps)
        den = tl.where(nrm < eps, eps, nrm)
        tl.store(base + r, a / den, mask=r < HW)
    else:
        ss = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, HW, BLOCK_R):
            a = tl.load(base + r0 + r, mask=r0 + r < HW, other=0.0)
            ss += a * a
        nrm = tl.sqrt_rn(tl.sum(ss, axis=0))
        den = tl.where(nrm < eps, eps, nrm)
        for r0 in range(0, HW, BLOCK_R):
            a = tl.load(base + r0 + r, mask=r0 + r < HW, other=0.0)
            tl.store(base + r0 + r, a / den, mask=r0 + r < HW)
    tl.store(_layer_ptr_f32(row, _M_NORM_PTR, 1) + n, nrm)


@triton.jit
def _bwd_ga_kernel(meta_ptr, eps,
                   NUM_LAYERS: tl.constexpr, BLOCK_R: tl.constexpr, ONE_PASS: tl.constexpr,
                   RV: tl.constexpr, G_CONTIG: tl.constexpr):
    """One sample row: ga = (g - m <m, g>) / norm (norm > eps) or g / eps, into the workspace."""
    pid = tl.program_id(0)
    layer = _find_layer(pid, meta_ptr, _M_ROW0, NUM_LAYERS)
    row = meta_ptr + layer * META_STRIDE
    HW = tl.load(row + _M_HW).to(tl.int32)
    n = pid - tl.load(row + _M_ROW0).to(tl.int32)
    n64 = n.to(tl.int64)
    g_sN = tl.load(row + _M_USN)
    if G_CONTIG:  # grad_maps rows have unit column stride (the usual case)
        g_shw = 1
    else:
        g_shw = tl.load(row + _M_USHW)
    if RV > 1:
        HW = tl.multiple_of(HW, RV)
        if G_CONTIG:
            g_sN = tl.multiple_of(g_sN, RV)
    m_base = _layer_ptr_f32(row, _M_MAP_PTR, 4 * RV) + n64 * HW
    if G_CONTIG:
        g_base = _layer_ptr_f32(row, _M_GMAP_PTR, 4 * RV) + n64 * g_sN
    else:
        g_base = _layer_ptr_f32(row, _M_GMAP_PTR, 4) + n64 * g_sN
    w_base = _layer_ptr_f32(row, _M_WS_PTR, 4 * RV) + n64 * HW
    nrm = tl.load(_layer_ptr_f32(row, _M_NORM_PTR, 1) + n)
    big = nrm > eps
    # one division; the divisor is never 0 (the unselected branch must not form inf/NaN either)
    den = tl.where(big, nrm, eps)
    r = tl.arange(0, BLOCK_R)
    if ONE_PASS:
        mask = r < HW
        m = tl.load(m_base + r, mask=mask, other=0.0)
        g = tl.load(g_base + r * g_shw, mask=mask, other=0.0)
        dot = tl.sum(m * g, axis=0)
        ga = tl.where(big, g - m * dot, g) / den
        tl.store(w_base + r, ga, mask=mask)
    else:
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for r0 in range(0, HW, BLOCK_R):
            mask = r0 + r < HW
            m = tl.load(m_base + r0 + r, mask=mask, other=0.0)
            g = tl.load(g_base + (r0 + r) * g_shw, mask=mask, other=0.0)
            acc += m * g
        dot = tl.sum(acc, axis=0)
        for r0 in range(0, HW, BLOCK_R):
            mask = r0 + r < HW
            m = tl.load(m_base + r0 + r, mask=mask, other=0.0)
            g = tl.load(g_base + (r0 + r) * g_shw, mask=mask, other=0.0)
            ga = tl.where(big, g - m * dot, g) / den
            tl.store(w_base + r0 + r, ga, mask=mask)


@triton.jit
def _bwd_grad_kernel(f_ptr, out_ptr, meta_ptr, power,
                     NUM_LAYERS: tl.constexpr, LAYOUT: tl.constexpr, POWER_MODE: tl.constexpr,
                     SAME_STRIDES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
                     VEC: tl.constexpr, ALIGN: tl.constexpr):
    """df_l[n, c, hw] = p |f|^(p-1) sign(f) * ga[n, hw] for one BLOCK_M slice, all channels."""
    pid = tl.program_id(0)
    layer = _find_layer(pid, meta_ptr, _M_TILE0, NUM_LAYERS)
    row = meta_ptr + layer * META_STRIDE
    f_base = _layer_ptr(row, _M_F_PTR, f_ptr, ALIGN)
    o_base = _layer_ptr(row, _M_GRAD_PTR, out_ptr, ALIGN)
    if LAYOUT == 0:
        ws_base = _layer_ptr_f32(row, _M_WS_PTR, 4 * VEC)
    else:
        ws_base = _layer_ptr_f32(row, _M_WS_PTR, 4)
    C, HW, W, M, sN, sC, sH, sW, tile = _layer_geometry(row, pid, LAYOUT, VEC)

    idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    n = idx // HW
    hw = idx - n * HW
    off = _m_offsets(n, hw, W, sN, sH, sW, LAYOUT, VEC)
    if SAME_STRIDES:
        oC = sC
        ooff = off
    else:
        oC = tl.load(row + _M_GSC)
        if VEC > 1:
            if LAYOUT == 0:
                oC = tl.multiple_of(oC, VEC)
        ooff = _m_offsets(n, hw, W, tl.load(row + _M_GSN), tl.load(row + _M_GSH),
                          tl.load(row + _M_GSW), LAYOUT, VEC)
    mask_m = idx < M
    # ga is read once per tile and reused for every channel
    ga = tl.load(ws_base + idx, mask=mask_m, other=0.0)
    if POWER_MODE == 2:
        ga = ga + ga  # d|f|^2/df * ga = f * 2ga: the exact factor 2 leaves the loop

    cr = tl.arange(0, BLOCK_C)
    for ci in range(0, tl.cdiv(C, BLOCK_C)):
        c = ci * BLOCK_C + cr
        c64 = c.to(tl.int64)
        if LAYOUT == 1:
            c_in = c64
            c_out = c64
        else:
            c_in = c64 * sC
            c_out = c64 * oC
        mask = (c < C)[:, None] & mask_m[None, :]
        x = tl.load(f_base + (c_in[:, None] + off[None, :]), mask=mask, other=0.0)
        if POWER_MODE == 2:
            d = x.to(tl.float32) * ga[None, :]
        else:
            d = _dabs_pow(x.to(tl.float32), power, POWER_MODE) * ga[None, :]
        tl.store(o_base + (c_out[:, None] + ooff[None, :]), d.to(x.dtype), mask=mask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT32_MAX = 2 ** 31 - 1


def _clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, x))


def _layouts_ok(t: torch.Tensor) -> set:
    N, C, H, W = t.shape
    sN, sC, sH, sW = t.stride()
    s_hw = flat_hw_stride(H, W, sH, sW)
    ok = {LAYOUT_GENERIC}
    if s_hw is not None:
        if s_hw == 1 or H * W == 1:
            ok.add(LAYOUT_HW_CONTIG)
        if sC == 1 or C == 1:
            ok.add(LAYOUT_CHANNELS_LAST)
    return ok


def _strides_for(t: torch.Tensor, layout: int) -> Tuple[int, int, int, int]:
    """(sN, sC, sH, sW) normalised for the kernel's addressing in ``layout``."""
    N, C, H, W = t.shape
    sN, sC, sH, sW = t.stride()
    # strides of size-1 dims are never multiplied by a non-zero index: store 0 so that they
    # neither break the alignment proof (VEC) nor the same-strides test
    sN = sN if N > 1 else 0
    sC = sC if C > 1 else 0
    if layout == LAYOUT_HW_CONTIG:
        return sN, sC, 0, 1
    if layout == LAYOUT_CHANNELS_LAST:
        return sN, 1, 0, (flat_hw_stride(H, W, sH, sW) if H * W > 1 else 0)
    return sN, sC, (sH if H > 1 else 0), (sW if W > 1 else 0)


def _addr(t: torch.Tensor) -> int:
    """Address of ``t``'s first element (a table entry the kernels cast back to a typed pointer)."""
    return t.data_ptr()


def _tile_blocks(layout: int, Ms: Sequence[int], Cs: Sequence[int], esize: int,
                 sm_count: Optional[int], block_m: Optional[int], block_c: Optional[int]
                 ) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for the N*C*H*W kernels.

    The tile [BLOCK_C, BLOCK_M] is what one iteration of the channel loop loads: 4096 elements
    (16 KB fp32, 8 KB 16-bit) over 8 warps, 16 per thread. Several such programs per SM keep
    enough bytes in flight for a purely bandwidth-bound kernel, and 16 elements per thread leave
    room for the non-integer power's temporaries: every launcher configuration stays within
    REG_BUDGET without stack under triton 3.6 and 3.9 (tests/loss/test_gpu_codegen.py). The flat (n, hw) axis is shrunk until the
    grouped grid has a few programs per SM (no split-C, so parallelism comes from N*H*W only).
    On the interpreter (``sm_count`` None), big blocks simply mean fewer (slow, Python-level)
    programs.
    """
    maxC = max(Cs)
    maxM = max(Ms)
    tile_elems = 4096
    if sm_count is None:
        bm = _clamp(next_pow2(maxM), 16, 1024)
        bc = _clamp(next_pow2(maxC), 1, 64)
    elif layout == LAYOUT_CHANNELS_LAST:
        # the contiguous axis is C: give it up to 64 lanes-worth (coalesced rows of channels)
        bc = _clamp(next_pow2(maxC), 8, 64)
        want_programs = 4 * sm_count
        bm = next_pow2(max(1, sum(Ms) // want_programs))
        bm = _clamp(bm, 16, max(16, tile_elems // bc))
    elif layout == LAYOUT_GENERIC:
        # no vector loads: every element carries its own 64-bit address, so a tile of 1024
        # (8 per thread) keeps the backward (two address sets) within the register budget
        want_programs = 4 * sm_count
        bm = next_pow2(max(1, sum(Ms) // want_programs))
        bm = _clamp(bm, 32, 256)
        bc = _clamp(1024 // bm, 1, next_pow2(maxC))
    else:
        want_programs = 4 * sm_count
        bm = next_pow2(max(1, sum(Ms) // want_programs))
        bm = _clamp(bm, 64, 1024)
        bc = _clamp(tile_elems // bm, 1, next_pow2(maxC))
    if block_m is not None:
        bm = int(block_m)
    if block_c is not None:
        bc = int(block_c)
    elems = bm * bc
    num_warps = 8 if elems >= 4096 else 4
    return bm, bc, num_warps


def _group_blocks(fs, layout: int, sm_count: int, block_m, block_c, block_r):
    """Sizes of one (dtype, layout) group and its block choices, shared by the forward and the
    backward plans: (M per layer, H*W per layer, element size, tile blocks, row blocks)."""
    Ms = [f.shape[0] * f.shape[2] * f.shape[3] for f in fs]
    Cs = [f.shape[1] for f in fs]
    HWs = [f.shape[2] * f.shape[3] for f in fs]
    esize = fs[0].element_size()
    return (Ms, HWs, esize, _tile_blocks(layout, Ms, Cs, esize, sm_count, block_m, block_c),
            _row_blocks(HWs, block_r))


def _row_blocks(HWs: Sequence[int], block_r: Optional[int]) -> Tuple[int, bool, int]:
    """(BLOCK_R, ONE_PASS, num_warps) for the per-sample O(H*W) kernels."""
    maxHW = max(HWs)
    br = _clamp(next_pow2(maxHW), 16, 4096) if block_r is None else int(block_r)
    num_warps = 1 if br <= 256 else (2 if br <= 1024 else 4)
    return br, br >= maxHW, num_warps


_META_CACHE: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()
_META_CACHE_SIZE = 64
#: (host table, device table) of every table made while a CUDA graph was being captured: the
#: graph's copy node reads the host buffer and its kernels read the device table at every replay,
#: so both live as long as the process (a few hundred bytes per captured launch group)
_CAPTURED_TABLES: List[Tuple[torch.Tensor, torch.Tensor]] = []


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _meta_tensor(rows: List[List[int]], device: torch.device) -> torch.Tensor:
    """int64 [L, META_STRIDE] table on ``device``; cached by content so that a training loop
    (same shapes, allocator usually returning the same addresses) does no host->device copy.

    Under CUDA-graph capture (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``)
    the copy is recorded into the graph and replayed later: the host buffer must then outlive the
    graph (a freed pinned block would be recycled and replayed as garbage pointers), and a cached
    table made before the capture must never be evicted and freed while a graph reads it. So
    during capture a table is always made fresh from a plain (unpinned: ``pin_memory`` may not
    be called while capturing) host buffer, and both tensors are kept for the process's life."""
    def host():
        return torch.tensor(rows, dtype=torch.int64).view(len(rows), META_WIDTH)

    if device.type in ("cpu", "meta"):  # interpreter / planning only: nothing to copy or cache
        return host().to(device)
    if _capturing(device):
        h = host()
        t = h.to(device, non_blocking=True)
        _CAPTURED_TABLES.append((h, t))
        return t
    key = (str(device), tuple(tuple(r) for r in rows))
    t = _META_CACHE.get(key)
    if t is not None:
        _META_CACHE.move_to_end(key)
        return t
    # pinned + non_blocking: a pageable copy would block the host until the GPU queue drains
    t = host().pin_memory().to(device, non_blocking=True)
    _META_CACHE[key] = t
    if len(_META_CACHE) > _META_CACHE_SIZE:
        _META_CACHE.popitem(last=False)
    return t


def _check_feats(feats: Sequence[torch.Tensor]) -> torch.device:
    dev = None
    for i, f in enumerate(feats):
        if f.dim() != 4:
            raise ValueError(f"layer {i}: expected [N, C, H, W], got shape {tuple(f.shape)}")
        if f.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"layer {i}: the Triton kernels take float32/bfloat16/float16, got {f.dtype} "
                            "(the Triton backend routes float64 to the reference implementation)")
        if dev is None:
            dev = f.device
        elif f.device != dev:
            raise ValueError(f"layer {i}: on {f.device}, expected {dev}")
        N, C, H, W = f.shape
        if N * H * W > _INT32_MAX - 65536:
            raise ValueError(f"layer {i}: N*H*W = {N * H * W} exceeds the kernels' int32 index range")
    return dev


def _groups(keys: Sequence[tuple]) -> List[Tuple[tuple, List[int]]]:
    out: "collections.OrderedDict[tuple, List[int]]" = collections.OrderedDict()
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.items())


def _pick_layouts(ok_sets: Sequence[set]) -> List[int]:
    """One layout per layer: a single common fast layout when there is one (-> one launch)."""
    for lay in (LAYOUT_HW_CONTIG, LAYOUT_CHANNELS_LAST):
        if all(lay in s for s in ok_sets):
            return [lay] * len(ok_sets)
    out = []
    for s in ok_sets:
        out.append(LAYOUT_HW_CONTIG if LAYOUT_HW_CONTIG in s else
                   LAYOUT_CHANNELS_LAST if LAYOUT_CHANNELS_LAST in s else LAYOUT_GENERIC)
    return out


def forward_plan(feats: Sequence[torch.Tensor], power: float, *, sm_count: Optional[int],
                 block_m: Optional[int] = None, block_c: Optional[int] = None,
                 block_r: Optional[int] = None
                 ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[Launch]]:
    """Outputs (allocated on the feats' device, which may be ``meta``) and the launches of
    :func:`spatial_attention_forward`. ``sm_count``: the CUDA device's SM count (None: the
    interpreter's blocks)."""
    feats = list(feats)
    if not feats:
        return [], [], []
    device = _check_feats(feats)
    power = float(power)
    maps: List[Optional[torch.Tensor]] = [None] * len(feats)
    norms: List[Optional[torch.Tensor]] = [None] * len(feats)
    live = []
    for i, f in enumerate(feats):
        N, C, H, W = f.shape
        maps[i] = torch.empty((N, H * W), dtype=torch.float32, device=device)
        norms[i] = torch.empty((N,), dtype=torch.float32, device=device)
        if N * H * W == 0:
            continue
        live.append(i)
    launches: List[Launch] = []
    if not live:
        return maps, norms, launches

    layouts = _pick_layouts([_layouts_ok(feats[i]) for i in live])
    keys = [(feats[i].dtype, lay) for i, lay in zip(live, layouts)]
    pmode = power_mode(power)
    for (dtype, layout), members in _groups(keys):
        idxs = [live[j] for j in members]
        fs = [feats[i] for i in idxs]
        ms = [maps[i] for i in idxs]
        ns = [norms[i] for i in idxs]
        Ms, HWs, esize, (bm, bc, warps), (br, one_pass, rwarps) = _group_blocks(
            fs, layout, sm_count, block_m, block_c, block_r)
        rows, tile0, row0 = [], 0, 0
        vec_vals, row_vals = [], []
        for f, m, nr, M, HW in zip(fs, ms, ns, Ms, HWs):
            N, C, H, W = f.shape
            sN, sC, sH, sW = _strides_for(f, layout)
            rows.append(_meta_row(f_ptr=_addr(f), map_ptr=_addr(m), norm_ptr=_addr(nr), C=C, HW=HW, W=W,
                                  M=M, tile0=tile0, row0=row0, f_sN=sN, f_sC=sC, f_sH=sH, f_sW=sW))
            tile0 += triton.cdiv(M, bm)
            row0 += N
            row_vals += [HW, elem_addr(m)]
            if layout == LAYOUT_HW_CONTIG:
                vec_vals += [elem_addr(f), HW, sN, sC, elem_addr(m)]
            elif layout == LAYOUT_CHANNELS_LAST:
                vec_vals += [elem_addr(f), C, sN, sW]
        vec = min(vec_for(esize, vec_vals), bm) if layout != LAYOUT_GENERIC else 1
        meta = _meta_tensor(rows, device)
        L = len(fs)
        keep = (fs, ms, ns)
        launches.append(Launch(_fwd_accum_kernel, "fwd_accum", (tile0,), (fs[0], meta, power),
                               dict(NUM_LAYERS=L, LAYOUT=layout, POWER_MODE=pmode, BLOCK_C=bc, BLOCK_M=bm,
                                    VEC=vec, ALIGN=vec * esize if vec > 1 else 1), warps, keep))
        rv = min(vec_for(4, row_vals), br)
        launches.append(Launch(_fwd_normalize_kernel, "fwd_normalize", (row0,), (meta, NORM_EPS),
                               dict(NUM_LAYERS=L, BLOCK_R=br, ONE_PASS=one_pass, RV=rv), rwarps, keep))
    return maps, norms, launches


def spatial_attention_forward(feats: Sequence[torch.Tensor], power: float, *,
                              block_m: Optional[int] = None, block_c: Optional[int] = None,
                              block_r: Optional[int] = None
                              ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Maps ``[N_l, H_l*W_l]`` (fp32, contiguous, L2-normalised) and norms ``[N_l]`` (fp32).

    Two launches per (dtype, layout) group of layers; normally one group. ``block_*`` override
    the heuristics (tests use them to force multi-tile / multi-chunk paths).
    """
    feats = list(feats)
    if not feats:
        return [], []
    device = _check_feats(feats)
    maps, norms, launches = forward_plan(feats, power, sm_count=gpu_sm_count(device),
                                         block_m=block_m, block_c=block_c, block_r=block_r)
    run_launches(launches, device)
    return maps, norms


def backward_plan(feats: Sequence[torch.Tensor], maps: Sequence[torch.Tensor],
                  norms: Sequence[torch.Tensor], grad_maps: Sequence[torch.Tensor],
                  power: float, *, sm_count: Optional[int], block_m: Optional[int] = None,
                  block_c: Optional[int] = None, block_r: Optional[int] = None
                  ) -> Tuple[List[torch.Tensor], List[Launch]]:
    """Gradients (allocated, still to be written) and the launches of
    :func:`spatial_attention_backward`; ``sm_count`` as in :func:`forward_plan`."""
    feats = list(feats)
    if not feats:
        return [], []
    device = _check_feats(feats)
    power = float(power)
    if not (len(maps) == len(norms) == len(grad_maps) == len(feats)):
        raise ValueError("feats, maps, norms and grad_maps must have one entry per layer")
    grads: List[torch.Tensor] = []
    ms, ns, gs = [], [], []
    live = []
    for i, f in enumerate(feats):
        N, C, H, W = f.shape
        # preserve_format: same strides as a dense input (contiguous, channels_last, permuted
        # views), contiguous otherwise -- what the reference's elementwise math produces
        grads.append(torch.empty_like(f, memory_format=torch.preserve_format))
        # saved state is produced by the forward (fp32 contiguous): these are no-ops then
        m = maps[i].to(device=device, dtype=torch.float32).reshape(N, H * W).contiguous()
        nr = norms[i].to(device=device, dtype=torch.float32).reshape(N).contiguous()
        g = grad_maps[i].to(device=device, dtype=torch.float32).reshape(N, H * W)
        ms.append(m)
        ns.append(nr)
        gs.append(g)
        if N * H * W == 0:
            continue
        if C == 0:
            continue
        live.append(i)
    launches: List[Launch] = []
    if not live:
        return grads, launches

    ok_sets = [_layouts_ok(feats[i]) & _layouts_ok(grads[i]) for i in live]
    layouts = _pick_layouts(ok_sets)
    keys = [(feats[i].dtype, lay) for i, lay in zip(live, layouts)]
    pmode = power_mode(power)
    total_m = sum(feats[i].shape[0] * feats[i].shape[2] * feats[i].shape[3] for i in live)
    ws = torch.empty((total_m,), dtype=torch.float32, device=device)
    ws_cursor = 0
    for (dtype, layout), members in _groups(keys):
        idxs = [live[j] for j in members]
        fs = [feats[i] for i in idxs]
        os_ = [grads[i] for i in idxs]
        mg = [ms[i] for i in idxs]
        ng = [ns[i] for i in idxs]
        ug = [gs[i] for i in idxs]
        Ms, HWs, esize, (bm, bc, warps), (br, one_pass, rwarps) = _group_blocks(
            fs, layout, sm_count, block_m, block_c, block_r)
        rows, tile0, row0 = [], 0, 0
        vec_vals, row_vals = [], []
        g_contig = all(u.stride(1) == 1 or u.shape[1] == 1 for u in ug)
        same = True
        for f, o, m, nr, u, M, HW in zip(fs, os_, mg, ng, ug, Ms, HWs):
            N, C, H, W = f.shape
            fsN, fsC, fsH, fsW = _strides_for(f, layout)
            gsN, gsC, gsH, gsW = _strides_for(o, layout)
            same = same and (fsN, fsC, fsH, fsW) == (gsN, gsC, gsH, gsW)
            usN, usHW = u.stride()
            w = ws[ws_cursor:ws_cursor + M]
            rows.append(_meta_row(f_ptr=_addr(f), grad_ptr=_addr(o), map_ptr=_addr(m), norm_ptr=_addr(nr),
                                  gmap_ptr=_addr(u), ws_ptr=_addr(w), C=C, HW=HW, W=W, M=M,
                                  tile0=tile0, row0=row0, f_sN=fsN, f_sC=fsC, f_sH=fsH, f_sW=fsW,
                                  g_sN=gsN, g_sC=gsC, g_sH=gsH, g_sW=gsW, gm_sN=usN, gm_sHW=usHW))
            row_vals += [HW, elem_addr(m), elem_addr(w)] + (
                [elem_addr(u), usN if N > 1 else 0] if g_contig else [])
            ws_cursor += M
            tile0 += triton.cdiv(M, bm)
            row0 += N
            if layout == LAYOUT_HW_CONTIG:
                vec_vals += [elem_addr(f), elem_addr(o), HW, fsN, gsN, fsC, gsC, elem_addr(w)]
            elif layout == LAYOUT_CHANNELS_LAST:
                vec_vals += [elem_addr(f), elem_addr(o), C, fsN, gsN, fsW, gsW]
        vec = min(vec_for(esize, vec_vals), bm) if layout != LAYOUT_GENERIC else 1
        meta = _meta_tensor(rows, device)
        L = len(fs)
        rv = min(vec_for(4, row_vals), br)
        # ws and the converted saved state are reached only through the table
        keep = (ws, fs, os_, mg, ng, ug)
        launches.append(Launch(_bwd_ga_kernel, "bwd_ga", (row0,), (meta, NORM_EPS),
                               dict(NUM_LAYERS=L, BLOCK_R=br, ONE_PASS=one_pass, RV=rv, G_CONTIG=g_contig),
                               rwarps, keep))
        launches.append(Launch(_bwd_grad_kernel, "bwd_grad", (tile0,), (fs[0], os_[0], meta, power),
                               dict(NUM_LAYERS=L, LAYOUT=layout, POWER_MODE=pmode, SAME_STRIDES=same,
                                    BLOCK_C=bc, BLOCK_M=bm, VEC=vec, ALIGN=vec * esize if vec > 1 else 1),
                               warps, keep))
    return grads, launches


def spatial_attention_backward(feats: Sequence[torch.Tensor], maps: Sequence[torch.Tensor],
                               norms: Sequence[torch.Tensor], grad_maps: Sequence[torch.Tensor],
                               power: float, *, block_m: Optional[int] = None,
                               block_c: Optional[int] = None, block_r: Optional[int] = None
                               ) -> List[torch.Tensor]:
    """``dL/dfeats`` with each input's shape, dtype and memory format (contiguous/channels_last)."""
    feats = list(feats)
    if not feats:
        return []
    device = _check_feats(feats)
    grads, launches = backward_plan(feats, maps, norms, grad_maps, power, sm_count=gpu_sm_count(device),
                                    block_m=block_m, block_c=block_c, block_r=block_r)
    run_launches(launches, device)
    return grads
