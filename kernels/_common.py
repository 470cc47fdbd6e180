"""Helpers both Triton kernel files use: the element-wise ``|f|^p`` device function, the host-side
alignment and launch helpers, and the one launch record (:class:`Launch`) that the launchers run
and ``kernels/codegen.py`` compiles ahead of time."""
from __future__ import annotations

import collections
from typing import Any, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

#: launches per kernel name in this process (tests count them)
#: number of launches per kernel name since import (tests assert the grouping with it)
LAUNCH_COUNTS: "collections.Counter[str]" = collections.Counter()


@triton.jit
def abs_pow(ax, power, POWER_MODE: tl.constexpr):
    # |f|^p for ax = |f| >= 0 (or NaN). Integer powers by multiplication; otherwise
    # exp2(p*log2|f|) with 0 -> 0 (log2 is fed 1 there so no -inf is ever formed).
    # On a GPU tl.exp2 / tl.log2 lower to ex2.approx.ftz / lg2.approx.ftz: about 1e-7..1e-6
    # relative error per element and subnormal |f| flushed to 0 (the interpreter is exact), so
    # GPU comparisons with non-integer p allow >= 2e-6 relative error (docs/gpu.md).
    if POWER_MODE == 1:
        r = ax
    elif POWER_MODE == 2:
        r = ax * ax
    elif POWER_MODE == 3:
        r = ax * ax * ax
    elif POWER_MODE == 4:
        sq = ax * ax
        r = sq * sq
    else:
        is0 = ax == 0.0
        r = tl.where(is0, 0.0, tl.exp2(power * tl.log2(tl.where(is0, 1.0, ax))))
    return r


def interpreter_active() -> bool:
    """True when these kernels were decorated under ``TRITON_INTERPRET=1`` (they run on CPU)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - very old/new triton
        return False
    return isinstance(abs_pow, InterpretedFunction)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


_SM_COUNT: Dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def flat_hw_stride(H: int, W: int, sH: int, sW: int) -> Optional[int]:
    """Stride s with h*sH + w*sW == (h*W + w)*s for all valid (h, w), or None."""
    if H * W == 1:
        return 1
    if W == 1:
        return sH
    if H == 1 or sH == W * sW:
        return sW
    return None


def elem_addr(t: torch.Tensor) -> int:
    """Address in units of the element size: the alignment proofs (VEC/RV) divide these."""
    a, es = t.data_ptr(), t.element_size()
    if a % es:  # pragma: no cover - torch allocations and views are always element aligned
        raise RuntimeError("datadam_fast triton: tensor not aligned to its element size")
    return a // es


def power_mode(power: float) -> int:
    p = float(power)
    return int(p) if p in (1.0, 2.0, 3.0, 4.0) else 0


def vec_for(esize: int, values: Sequence[int]) -> int:
    """Largest power of two v <= 16 bytes / esize dividing every value (in elements)."""
    v = max(1, 16 // esize)
    while v > 1 and any(x % v for x in values):
        v //= 2
    return v


class Launch(NamedTuple):
    """One kernel launch exactly as a launcher makes it: ``kernel[grid](*args, **constexprs,
    num_warps=num_warps)``. The launchers build these with their ``*_plan`` functions and run
    them with :func:`run_launches`; ``datadam_fast.kernels.codegen`` compiles the same records
    ahead of time for a GPU target (so the block tables exist once)."""
    kernel: Any
    name: str
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any]
    num_warps: int
    #: tensors the kernel reaches only through addresses in the metadata table (workspaces,
    #: converted saved state): held here so that they outlive the launch
    keep: Tuple[Any, ...] = ()


def device_ctx(device: torch.device):
    # Triton launches on the *current* CUDA device: make it the tensors' device
    if device.type == "cuda":
        return torch.cuda.device(device)
    import contextlib
    return contextlib.nullcontext()


def run_launches(launches: Sequence[Launch], device: torch.device) -> None:
    """Launch ``launches`` in order on ``device`` (under its device guard)."""
    if not launches:
        return
    with device_ctx(device):
        for ln in launches:
            LAUNCH_COUNTS[ln.name] += 1
            # explicit FMA contraction (Triton 3.9 warns when it is left to the default, which
            # changes in 3.10); fusing a*b+c only removes roundings here
            ln.kernel[ln.grid](*ln.args, **ln.constexprs, num_warps=ln.num_warps, enable_fp_fusion=True)


def gpu_sm_count(device: torch.device) -> Optional[int]:
    """SM count the block heuristics size grids for; None selects the interpreter's blocks."""
    if interpreter_active() or device.type != "cuda":
        return None
    return sm_count(device)
