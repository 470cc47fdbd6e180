"""Ahead-of-time compilation of every Triton launch the launchers make for CUDA-shaped problems.

No GPU is needed: the launchers' own ``*_plan`` functions are run on ``meta`` tensors (shapes,
strides and 16-byte-aligned "addresses", no memory) with a faked SM count, and each resulting
:class:`~datadam_fast.kernels.spatial_attention.Launch` is specialised exactly as
``kernel[grid](...)`` would specialise it (Triton's own binder) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. The triton wheel ships
``ptxas`` and ``cuobjdump``, so the cubin's registers, stack and shared memory and the PTX's
vector loads/stores are readable.

Used by ``tests/loss/test_gpu_codegen.py`` (asserts the budgets) and ``benchmarks/gpu_codegen.py``
(prints the table, writes JSON). Run as ``python -m datadam_fast.kernels.codegen --json PATH``;
``TRITON_INTERPRET`` must be unset (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton

from . import channel_statistics as CH
from . import characteristic_function as CF
from . import real_epilogue as RE
from . import spatial_attention as SA

ARCHS = (80, 90)
#: SM count faked for the block heuristics (H100 SXM / H200)
SM_COUNT = 132
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: per-thread register budgets of every kernel, from the kernel files
REG_BUDGET: Dict[str, int] = {**SA.REG_BUDGET, **RE.REG_BUDGET, **CF.REG_BUDGET, **CH.REG_BUDGET}
#: static + dynamic shared memory a launch may use without an opt-in (48 KB)
SHARED_BUDGET = 48 * 1024

_V4_LD = re.compile(r"\bld\.global(?:\.[a-zA-Z0-9_:]+)*\.v4\.")
_V4_ST = re.compile(r"\bst\.global(?:\.[a-zA-Z0-9_:]+)*\.v4\.")
_V2_LD = re.compile(r"\bld\.global(?:\.[a-zA-Z0-9_:]+)*\.v2\.")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


# --------------------------------------------------------------------------------------------
# cases: CUDA-shaped problems, built from meta tensors
# --------------------------------------------------------------------------------------------
def _feat(shape: Sequence[int], dtype: torch.dtype, fmt: str) -> torch.Tensor:
    """A meta tensor of ``shape`` in ``fmt``: nchw, cl (channels_last), slice (a channel slice of a
    wider NCHW tensor: HW-contiguous, not dense) or strided (every other column: no fast layout)."""
    N, C, H, W = shape
    if fmt == "nchw":
        return torch.empty(shape, dtype=dtype, device="meta")
    if fmt == "cl":
        return torch.empty(shape, dtype=dtype, device="meta").to(memory_format=torch.channels_last)
    if fmt == "slice":
        return torch.empty((N, C + 4, H, W), dtype=dtype, device="meta")[:, 4:]
    if fmt == "strided":
        return torch.empty((N, C, H, 2 * W), dtype=dtype, device="meta")[..., ::2]
    raise ValueError(f"unknown layout {fmt!r}")


# DataDAM's real shapes: ConvNet-3 on 32x32 (CIFAR) and ConvNet-4 on 64x64 (Tiny ImageNet)
# taps; N = 256 real images per class, N = 10 synthetic (IPC 10)
REAL_32 = [(256, 128, 32, 32), (256, 128, 16, 16)]
REAL_64 = [(256, 128, 64, 64), (256, 128, 32, 32), (256, 128, 16, 16)]
SYN_32 = [(10, 128, 32, 32), (10, 128, 16, 16), (10, 128, 8, 8)]
ODD = [(7, 13, 15, 17), (7, 13, 7, 9)]
DEPTH = [(64, 128, 32, 32), (64, 128, 16, 16), (64, 128, 8, 8), (64, 128, 4, 4)]


def attention_cases() -> Iterator[Tuple[str, List[Tuple[int, ...]], str, str, float]]:
    """(label, layer shapes, dtype, layout, p) of the spatial-attention problems compiled."""
    for dt in DTYPES:
        for fmt in ("nchw", "cl"):
            yield "real32", REAL_32, dt, fmt, 4.0
            yield "real64", REAL_64, dt, fmt, 4.0
    for fmt in ("nchw", "cl"):
        yield "syn32", SYN_32, "fp32", fmt, 4.0
        for p in (1.0, 2.0, 2.5):
            yield "real32", REAL_32, "fp32", fmt, p
        yield "odd", ODD, "fp32", fmt, 4.0
        yield "odd", ODD, "bf16", fmt, 2.5
    for fmt in ("slice", "strided"):
        yield "real32", REAL_32, "fp32", fmt, 4.0
        yield "real32", REAL_32, "bf16", fmt, 4.0
    for L in range(1, 5):
        yield f"depth{L}", DEPTH[:L], "fp32", "nchw", 4.0


def attention_launches() -> Iterator[Tuple[str, SA.Launch]]:
    for label, shapes, dt, fmt, p in attention_cases():
        feats = [_feat(s, DTYPES[dt], fmt) for s in shapes]
        config = f"{label} {dt} {fmt} p={p:g} L={len(shapes)}"
        maps, norms, fwd = SA.forward_plan(feats, p, sm_count=SM_COUNT)
        gmaps = [torch.empty_like(m) for m in maps]
        _, bwd = SA.backward_plan(feats, maps, norms, gmaps, p, sm_count=SM_COUNT)
        for ln in fwd + bwd:
            yield config, ln


def epilogue_cases() -> Iterator[Tuple[str, Tuple[int, ...], str, str, List[Tuple[str, str, float, bool]]]]:
    """(label, conv output shape, dtype, layout, [(act, pool, p, attention)]) compiled: every
    activation x pooling on the CIFAR-sized fp32 conv output in NCHW and channels_last, the
    default block (relu + avgpool, p = 4) elsewhere, and p = 2.5 / no attention map once each."""
    everything = [(a, p, 4.0, True) for a in RE.ACTS for p in RE.POOLS]
    default = [("relu", "avgpool", 4.0, True)]
    both_pools = default + [("relu", "maxpool", 4.0, True)]
    extras = [("relu", "avgpool", 2.5, True), ("relu", "avgpool", 4.0, False)]
    for fmt in ("nchw", "cl"):
        yield "conv32", (256, 128, 32, 32), "fp32", fmt, everything + extras
        for label, shape in (("conv64", (256, 128, 64, 64)), ("conv8", (256, 128, 8, 8)),
                             ("syn16", (10, 128, 16, 16)), ("odd", (6, 13, 15, 13))):
            yield label, shape, "fp32", fmt, both_pools
        for dt in ("bf16", "fp16"):
            yield "conv32", (256, 128, 32, 32), dt, fmt, both_pools
            yield "odd", (6, 13, 15, 13), dt, fmt, default
    yield "conv32", (256, 128, 32, 32), "fp32", "strided", both_pools + extras[:1]
    yield "conv32", (256, 128, 32, 32), "bf16", "strided", default
    yield "conv8", (256, 128, 8, 8), "fp32", "strided", default + extras[:1]


def epilogue_launches() -> Iterator[Tuple[str, SA.Launch]]:
    for label, shape, dt, fmt, combos in epilogue_cases():
        y = _feat(shape, DTYPES[dt], fmt)
        N, C = shape[:2]
        _, _, stats = RE.stats_plan(y, sm_count=SM_COUNT)
        for ln in stats:
            yield f"{label} {dt} {fmt}", ln
        scale = torch.empty((N, C), dtype=torch.float32, device="meta")
        for act, pool, power, att in combos:
            _, _, app = RE.apply_plan(y, scale, scale, act=act, pool=pool, power=power, attention=att,
                                      sm_count=SM_COUNT)
            for ln in app:
                yield f"{label} {dt} {fmt} {act} {pool} p={power:g}{'' if att else ' no-att'}", ln


# NCFM's shapes: the normalised ConvNet embedding (D = 2048 at 32 px, 2048 at 64 px with depth 4:
# 128 x 4 x 4) against F = 4096 frequencies per class; real side 256 rows per class (CIFAR-10,
# K = 10), synthetic side IPC 10 x 100 classes; and an odd problem
CF_CASES = [("cifar10-real", 10, 256, 2048, 4096, True), ("cifar100-syn", 100, 10, 2048, 4096, True),
            ("shared", 10, 256, 2048, 4096, False), ("odd", 3, 7, 33, 37, True)]


def statistics_launches() -> Iterator[Tuple[str, SA.Launch]]:
    for label, K, n, D, F, per_class in CF_CASES:
        N = K * n
        e = torch.empty((N, D), dtype=torch.float32, device="meta")
        t = torch.empty((K, F, D) if per_class else (F, D), dtype=torch.float32, device="meta")
        order = torch.empty((N,), dtype=torch.int32, device="meta")
        offs = torch.empty((K + 1,), dtype=torch.int32, device="meta")
        g = torch.empty((K, F), dtype=torch.float32, device="meta")
        for save in (False, True):
            for ln in CF.forward_plan(e, t, order, offs, K, save, SM_COUNT)[3]:
                yield f"cf {label} K={K} n={n} D={D} F={F}{' save' if save else ''}", ln
            proj = torch.empty((N, F) if save else (1,), dtype=torch.float32, device="meta")
            for ln in CF.backward_plans(e, t, order, offs, K, g, g, proj, True, True, SM_COUNT)[3]:
                yield f"cf {label} K={K} n={n} D={D} F={F}{' saved' if save else ''}", ln
    for shape in ((256, 128, 32, 32), (10, 128, 8, 8), (6, 13, 15, 13)):
        for dt in ("fp32", "bf16"):
            for fmt in ("nchw", "cl", "strided"):
                x = _feat(shape, DTYPES[dt], fmt)
                g = torch.empty(shape[:2], dtype=torch.float32, device="meta")
                for moments, p in ((False, 4.0), (False, 2.5), (True, 1.0)):
                    what = "moments" if moments else f"attention p={p:g}"
                    for ln in CH.forward_plan(x, moments, p, SM_COUNT)[2]:
                        yield f"channels {list(shape)} {dt} {fmt} {what}", ln
                    out = torch.empty_like(x, memory_format=torch.channels_last if fmt == "cl" else torch.contiguous_format)
                    for ln in CH.backward_plan(x, g, g if moments else None, out, moments, p, SM_COUNT):
                        yield f"channels {list(shape)} {dt} {fmt} {what}", ln


def all_launches() -> List[Tuple[str, SA.Launch]]:
    return list(attention_launches()) + list(epilogue_launches()) + list(statistics_launches())


# --------------------------------------------------------------------------------------------
# compilation and inspection
# --------------------------------------------------------------------------------------------
def _cuobjdump() -> str:
    import triton.backends.nvidia as nv
    path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.path.exists(path):  # pragma: no cover - other wheel layouts
        path = triton.knobs.nvidia.cuobjdump.path
    return path


def _specialise(ln: SA.Launch, arch: int):
    """(src, options, key): what ``ln.kernel[grid](*args, **kw)`` compiles on a GPU of ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(ln.constexprs, num_warps=ln.num_warps, enable_fp_fusion=True)
    binder = create_function_from_signature(ln.kernel.signature, ln.kernel.params, backend)
    bound, spec, options = binder(*ln.args, **kwargs)
    options, signature, constexprs, attrs = ln.kernel._pack_args(backend, kwargs, bound, spec, options)
    key = (ln.name, arch, tuple(sorted(signature.items())), tuple(sorted((str(k), str(v)) for k, v in constexprs.items())),
           tuple(sorted((str(k), str(v)) for k, v in attrs.items())), ln.num_warps)
    return ASTSource(ln.kernel, signature, constexprs, attrs), target, options, key


def inspect_compiled(ck) -> Dict[str, Any]:
    """Registers, stack, local and shared memory (cubin), vector accesses (PTX) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(ck.asm["cubin"])
        path = fh.name
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = _RES.search(out)
    if not m:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{out}")
    ptx = ck.asm["ptx"]
    return dict(registers=int(m.group(1)), stack=int(m.group(2)), static_shared=int(m.group(3)),
                local=int(m.group(4)), shared=int(ck.metadata.shared),
                ptx_local=bool(re.search(r"\.local\s", ptx)),
                v4_loads=len(_V4_LD.findall(ptx)), v4_stores=len(_V4_ST.findall(ptx)),
                v2_loads=len(_V2_LD.findall(ptx)))


def expectations(ln: SA.Launch, esize: int, config: str = "") -> Dict[str, bool]:
    """Which vector accesses the launcher's alignment proof (VEC) promises for this launch; the
    channel kernels on a dense CIFAR-sized map (H*W and C multiples of 16: Triton's own alignment
    specialisation) read 16 bytes at a time in both layouts. (The CF kernels stage their GEMM
    operands through ``cp.async`` into shared memory, not ``ld.global``.)"""
    c = ln.constexprs
    v16 = c.get("VEC", 1) * esize == 16
    dense_channels = ln.name in ("ch_fwd", "ch_bwd") and "[256, 128, 32, 32] fp32" in config and \
        (" nchw " in config or " cl " in config)
    return dict(expect_v4_loads=(v16 and ln.name in ("fwd_accum", "bwd_grad", "real_epilogue_stats",
                                                      "real_epilogue_apply")) or dense_channels,
                expect_v4_stores=v16 and ln.name == "bwd_grad")


def _shard_of(key: tuple, n: int) -> int:
    import hashlib
    return int(hashlib.sha1(repr(key).encode()).hexdigest(), 16) % n


def run(archs: Sequence[int] = ARCHS, log=None, shard: Tuple[int, int] = (0, 1)) -> Dict[str, Any]:
    """Compile every launch of :func:`all_launches` for ``archs`` (identical compile keys once).
    ``shard=(i, n)``: only the launches whose compile key falls in shard i of n (the test runs
    the shards in parallel processes and concatenates the records)."""
    if SA.interpreter_active():
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    records: List[Dict[str, Any]] = []
    cache: Dict[tuple, Dict[str, Any]] = {}
    t0 = time.time()
    launches = all_launches()
    for config, ln in launches:
        esize = ln.args[0].element_size() if isinstance(ln.args[0], torch.Tensor) else 4
        if ln.name in ("fwd_normalize", "bwd_ga"):
            esize = 4
        for arch in archs:
            src, target, options, key = _specialise(ln, arch)
            if shard[1] > 1 and _shard_of(key, shard[1]) != shard[0]:
                continue
            res = cache.get(key)
            if res is None:
                t = time.time()
                try:
                    ck = triton.compile(src, target=target, options=options.__dict__)
                    res = dict(compiled=True, error="", **inspect_compiled(ck))
                except Exception as e:  # noqa: BLE001 - reported (and asserted) per kernel
                    res = dict(compiled=False, error=f"{type(e).__name__}: {e}"[:2000])
                res["compile_s"] = round(time.time() - t, 3)
                cache[key] = res
                if log:
                    log(f"{ln.name:28s} sm_{arch} {config:40s} {res.get('registers', '-')} regs "
                        f"({res['compile_s']:.2f} s)")
            consts = {k: (v if isinstance(v, (int, float, bool, str)) else str(v)) for k, v in ln.constexprs.items()}
            records.append(dict(kernel=ln.name, config=config, arch=f"sm_{arch}", grid=list(ln.grid),
                                num_warps=ln.num_warps, constexprs=consts, budget=REG_BUDGET[ln.name],
                                **expectations(ln, esize, config), **res))
    return dict(triton=triton.__version__, torch=torch.__version__, sm_count=SM_COUNT,
                unique_compiles=len(cache), seconds=round(time.time() - t0, 1), records=records)


def merge(parts: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One result from the shards' results."""
    out = dict(parts[0])
    out["records"] = [r for p in parts for r in p["records"]]
    out["unique_compiles"] = sum(p["unique_compiles"] for p in parts)
    out["seconds"] = max(p["seconds"] for p in parts)
    return out


def violations(rec: Dict[str, Any]) -> List[str]:
    """What is wrong with one compiled launch (empty: within every budget)."""
    if not rec["compiled"]:
        return [f"does not compile: {rec['error']}"]
    out = []
    if rec["registers"] > rec["budget"]:
        out.append(f"{rec['registers']} registers > budget {rec['budget']}")
    if rec["stack"] or rec["local"] or rec["ptx_local"]:
        out.append(f"stack {rec['stack']} B / local {rec['local']} B (spills)")
    if max(rec["shared"], rec["static_shared"]) > SHARED_BUDGET:
        out.append(f"shared memory {rec['shared']} B > {SHARED_BUDGET}")
    if rec["expect_v4_loads"] and not rec["v4_loads"]:
        out.append("no ld.global.v4 although the launcher proved 16-byte alignment")
    if rec["expect_v4_stores"] and not rec["v4_stores"]:
        out.append("no st.global.v4 although the launcher proved 16-byte alignment")
    return out


def table(result: Dict[str, Any], rows: Optional[Sequence[Dict[str, Any]]] = None) -> str:
    rows = result["records"] if rows is None else rows
    head = f"{'kernel':28s} {'config':46s} {'arch':5s} {'regs':>4s} {'budget':>6s} {'stack':>5s} " \
           f"{'v4 ld':>5s} {'v4 st':>5s} {'shared':>6s}  ok"
    lines = [f"triton {result['triton']} (sm count {result['sm_count']}, {result['unique_compiles']} compiled variants)",
             head, "-" * len(head)]
    for r in rows:
        if not r["compiled"]:
            lines.append(f"{r['kernel']:28s} {r['config']:46s} {r['arch']:5s} COMPILE ERROR {r['error'][:60]}")
            continue
        lines.append(f"{r['kernel']:28s} {r['config']:46s} {r['arch']:5s} {r['registers']:4d} {r['budget']:6d} "
                     f"{r['stack']:5d} {r['v4_loads']:5d} {r['v4_stores']:5d} {r['shared']:6d}  "
                     f"{'yes' if not violations(r) else 'NO'}")
    return "\n".join(lines)


def summary_markdown(results: Sequence[Dict[str, Any]]) -> str:
    """The docs' table: DataDAM's real shapes (CIFAR taps, p = 4; epilogue: conv32, relu +
    avgpool) per kernel, dtype and layout; registers sm_80/sm_90, stack, v4 loads/stores, per
    triton version; and the count of all launches outside their budgets."""
    wanted = []
    for k in ("fwd_accum", "bwd_grad", "fwd_normalize", "bwd_ga"):
        for dt in ("fp32", "bf16", "fp16"):
            for fmt in ("nchw", "cl", "strided"):
                wanted.append((k, f"real32 {dt} {fmt} p=4 L=2"))
    for k in ("real_epilogue_stats", "real_epilogue_stats_combine"):
        for dt in ("fp32", "bf16"):
            for fmt in ("nchw", "cl", "strided"):
                wanted.append((k, f"conv32 {dt} {fmt}"))
    for dt in ("fp32", "bf16"):
        for fmt in ("nchw", "cl", "strided"):
            wanted.append(("real_epilogue_apply", f"conv32 {dt} {fmt} relu avgpool p=4"))
    head = "| kernel | config |" + "".join(f" triton {r['triton']}: regs sm_80/90, stack, v4 ld/st |" for r in results)
    lines = [head, "|---|---|" + "---|" * len(results)]
    for k, cfg in wanted:
        cells = []
        for res in results:
            rs = {r["arch"]: r for r in res["records"] if r["kernel"] == k and r["config"] == cfg}
            if not rs:
                cells.append(None)
                continue
            a, b = rs.get("sm_80"), rs.get("sm_90")
            if not (a and b and a["compiled"] and b["compiled"]):
                cells.append("compile error")
                continue
            cells.append(f"{a['registers']}/{b['registers']}, {max(a['stack'], b['stack'])} B, "
                         f"{b['v4_loads']}/{b['v4_stores']}" + ("" if not (CG_bad := violations(a) + violations(b))
                                                               else " **" + "; ".join(CG_bad) + "**"))
        if all(c is None for c in cells):
            continue
        lines.append(f"| `{k}` | {cfg} |" + "".join(f" {c or '-'} |" for c in cells))
    lines.append("")
    for res in results:
        bad = sum(1 for r in res["records"] if violations(r))
        lines.append(f"- triton {res['triton']}: {len(res['records'])} launches, {res['unique_compiles']} compiled "
                     f"variants, {bad} outside their budgets.")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 80 and 90)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--shard", default="0/1", help="I/N: compile only shard I of N of the compile keys")
    a = ap.parse_args(argv)
    i, n = (int(x) for x in a.shard.split("/"))
    res = run(a.arch or ARCHS, log=None if a.quiet else (lambda s: print(s, file=sys.stderr, flush=True)),
              shard=(i, n))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    if not a.quiet:
        print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
