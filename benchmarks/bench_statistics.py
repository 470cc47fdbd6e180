"""The distribution-matching statistics, one operator at a time: fused (``backend=auto``: C++ on
CPU, Triton on CUDA) against the eager plain-PyTorch reference and ``torch.compile`` of that
reference, in the same run; medians of ``--repeat`` timed calls after ``--warmup``.

Cases (the embedding width D = 2048 is ConvNet-3's at 32 px and ConvNet-4's at 64 px, so CIFAR-10,
CIFAR-100 and TinyImageNet share the characteristic function's shapes; a 10-class chunk of the
larger sets is what the engine's memory plan feeds it):

* ``cf real``: the real side (no grad), K = 10 classes x 256 rows, D = 2048, F = 4096 per-class
  frequencies; also the bare ``torch.mm`` of the same shapes (one ``[256, 2048] x [2048, 4096]`` per
  class): the GEMM the statistic is bound by, and the peak extra memory of each (the largest
  single allocation, from the profiler; CPU) against the ``[N, F]`` projection's size;
* ``cf syn``: the synthetic side, forward + backward, K = 10 x IPC (1, 10, 50) rows;
* ``channel attention`` / ``channel moments``: forward + backward of a CIFAR block (``[256, 128, 32,
  32]``, real side, forward only), a TinyImageNet block (``[256, 128, 64, 64]``) and a synthetic
  block (``[100, 128, 32, 32]``, forward + backward).

The reference of the characteristic function is the class-major form a user writes for all classes
at once (``bmm`` of the class blocks, cos/sin, mean), which ``torch.compile`` can fuse; its eager run
materialises the projection.

    python benchmarks/bench_statistics.py --json benchmarks/results/bench_statistics_cpu_2026-12-02.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import datadam_fast as dd  # noqa: E402
from datadam_fast._io import atomic_write_text  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device, repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        xs.append(time.perf_counter() - t)
    return 1e3 * statistics.median(xs)


def biggest_allocation(fn, device) -> Optional[int]:
    """Largest single allocation of ``fn`` in bytes (CPU: profiler memory events; CUDA: peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def cf_reference(e: torch.Tensor, t: torch.Tensor, K: int):
    """Class-major per-class characteristic function in plain ops (normalised input given)."""
    p = torch.bmm(e.view(K, e.shape[0] // K, -1), t.transpose(1, 2))
    return p.cos().mean(1), p.sin().mean(1)


def cf_syn_loss_reference(real_re, real_im, s, t, K):
    s = torch.nn.functional.normalize(s, dim=1)
    re, im = cf_reference(s, t, K)
    return dd.loss.reference.cf_loss(real_re, real_im, re, im)


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="leave out torch.compile of the reference")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    rows: List[Dict] = []

    def add(case, **kw):
        rows.append({"case": case, **kw})
        r = rows[-1]
        parts = [f"{k} {v:.2f} ms" for k, v in r.items() if k.endswith("_ms") and v is not None]
        print(f"{case}: " + ", ".join(parts), flush=True)

    def compiled(fn):
        return None if args.no_compile else torch.compile(fn)

    # ------------------------------------------------------------------ characteristic function
    K, B, D, F = 10, 256, 2048, 4096
    e = torch.nn.functional.normalize(torch.randn(K * B, D, generator=g), dim=1).to(device)
    t = torch.randn(K, F, D, generator=g).to(device)
    lab = torch.arange(K, device=device).repeat_interleave(B)
    ev = e.view(K, B, D)
    with torch.no_grad():
        mm = timed(lambda: [torch.mm(ev[k], t[k].t()) for k in range(K)], device, args.repeat, args.warmup)
        fused = timed(lambda: dd.cf_class_sums(e, t, K, lab), device, args.repeat, args.warmup)
        eager = timed(lambda: cf_reference(e, t, K), device, args.repeat, args.warmup)
        cref = compiled(cf_reference)
        comp = timed(lambda: cref(e, t, K), device, args.repeat, args.warmup) if cref else None
        mem = {"fused": biggest_allocation(lambda: dd.cf_class_sums(e, t, K, lab), device),
               "mm": biggest_allocation(lambda: torch.mm(ev[0], t[0].t()), device),
               "reference": biggest_allocation(lambda: cf_reference(e, t, K), device)}
    add(f"cf real K={K} rows/class={B} D={D} F={F}", fused_ms=fused, bare_mm_ms=mm, eager_reference_ms=eager,
        compiled_reference_ms=comp, fused_vs_mm=fused / mm, projection_bytes=K * B * F * 4,
        largest_allocation_bytes=mem)
    rc, rs = cf_reference(e, t, K)
    for ipc in (1, 10, 50):
        s0 = torch.randn(K * ipc, D, generator=g).to(device)
        sl = torch.arange(K, device=device).repeat_interleave(ipc)

        def fused_step():
            s = s0.clone().requires_grad_(True)
            c, sn = dd.cf_class_sums(torch.nn.functional.normalize(s, dim=1), t, K, sl)
            dd.loss.reference.cf_loss(rc, rs, c / ipc, sn / ipc).backward()

        def ref_step(fn):
            def run():
                s = s0.clone().requires_grad_(True)
                fn(rc, rs, s, t, K).backward()
            return run
        cl = compiled(cf_syn_loss_reference)
        add(f"cf syn fwd+bwd K={K} ipc={ipc} D={D} F={F}", fused_ms=timed(fused_step, device, args.repeat, args.warmup),
            eager_reference_ms=timed(ref_step(cf_syn_loss_reference), device, args.repeat, args.warmup),
            compiled_reference_ms=timed(ref_step(cl), device, args.repeat, args.warmup) if cl else None)
    del e, t, ev

    # ------------------------------------------------------------------ channel statistics
    from datadam_fast.loss import reference as R

    def att_ref(f):
        return R.channel_attention(f, 4.0)

    def mom_ref(f):
        return R.channel_moments(f)

    for label, shape, grad in (("cifar real block", (256, 128, 32, 32), False),
                               ("tiny real block", (256, 128, 64, 64), False),
                               ("cifar syn block", (100, 128, 32, 32), True)):
        f0 = torch.randn(shape, generator=g).to(device).contiguous(memory_format=torch.channels_last)
        for what, fused_fn, ref_fn in (("channel attention p=4", lambda f: dd.channel_attention(f, power=4.0), att_ref),
                                       ("channel moments", lambda f: sum(x.sum() for x in dd.channel_moments(f)),
                                        lambda f: sum(x.sum() for x in mom_ref(f)))):
            def step(fn):
                def run():
                    if grad:
                        f = f0.detach().requires_grad_(True)
                        out = fn(f)
                        (out.sum() if out.dim() else out).backward()
                    else:
                        with torch.no_grad():
                            fn(f0)
                return run
            cfn = compiled(ref_fn)
            add(f"{what} {label} {list(shape)} channels_last {'fwd+bwd' if grad else 'fwd'}",
                fused_ms=timed(step(fused_fn), device, args.repeat, args.warmup),
                eager_reference_ms=timed(step(ref_fn), device, args.repeat, args.warmup),
                compiled_reference_ms=timed(step(cfn), device, args.repeat, args.warmup) if cfn else None)

    for r in rows:
        r["fused_vs_eager"] = r["eager_reference_ms"] / r["fused_ms"]
        if r.get("compiled_reference_ms"):
            r["fused_vs_compiled"] = r["compiled_reference_ms"] / r["fused_ms"]
    lines = ["| case | fused ms | eager ref ms | compiled ref ms | x eager | x compiled |", "|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("compiled_reference_ms")
        lines.append(f"| {r['case']} | {r['fused_ms']:.1f} | {r['eager_reference_ms']:.1f} | "
                     f"{'-' if c is None else f'{c:.1f}'} | {r['fused_vs_eager']:.2f} | "
                     f"{'-' if c is None else '{:.2f}'.format(r['fused_vs_compiled'])} |")
    real = rows[0]
    lines.append("")
    lines.append(f"cf real side: fused {real['fused_ms']:.1f} ms = {real['fused_vs_mm']:.2f}x the bare torch.mm "
                 f"({real['bare_mm_ms']:.1f} ms); largest allocation fused "
                 f"{real['largest_allocation_bytes']['fused'] / 2**20:.1f} MiB, reference "
                 f"{real['largest_allocation_bytes']['reference'] / 2**20:.1f} MiB, [N, F] projection "
                 f"{real['projection_bytes'] / 2**20:.1f} MiB")
    table = "\n".join(lines)
    print(table)
    out = {"benchmark": "bench_statistics", "date": datetime.date.today().isoformat(), "device": str(device),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args), "rows": rows,
           "table": table}
    path = args.json or os.path.join(ROOT, "benchmarks", "results",
                                     f"bench_statistics_{device.type}_{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
