"""Kernel-level memory bandwidth: each fused kernel's bytes moved / time, against the copy
bandwidth measured in the same run.

The loss benchmark (``bench_loss.py``) times the whole loss, whose GB/s is diluted by Python, the
embedding term and the per-class means. Here each streaming pass is timed alone (CUDA events,
medians) on DataDAM's real-side tensors, large enough to stream from HBM rather than sit in L2:

* ``spatial_attention`` forward (read the features once, write the maps) and backward (read the
  features, write the gradient) of every fused loss backend that runs here (``triton``, ``cuda``;
  ``cpu`` on a CPU);
* the Triton real-side epilogue's two passes over a conv output ``y``: the statistics pass
  (``plane_moments``: read ``y``) and the apply pass (``apply_epilogue`` with ReLU + 2x2 average
  pooling + the attention map: read ``y``, write the quarter-size pooled output and the map).

Each row: bytes moved (the minimum traffic: every input read once, every output written once),
median ms, GB/s, and that as a fraction of ``dst.copy_(src)`` of the same number of bytes measured
in this run (and of the datasheet bandwidth where the device is known). The JSON is rewritten
after every row.

    python benchmarks/bench_kernels.py --json out.json               # GPU defaults
    python benchmarks/bench_kernels.py --problems tiny --device cpu  # smoke run
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_loss import _write_json, peak_bandwidth  # noqa: E402
from gpu_env import timed as _timed  # noqa: E402

# name: layer shapes [N, C, H, W] of one call
PROBLEMS = {
    # CIFAR-10 real side of one class chunk: 10 classes x 64 images, ConvNet-3 taps
    "cifar-real-640": [(640, 128, 32, 32), (640, 128, 16, 16)],
    # TinyImageNet-shaped: 2000 images of a 64 px ConvNetD4's taps (5.5 GB in fp32)
    "tiny-imagenet-real-2000": [(2000, 128, 64, 64), (2000, 128, 32, 32), (2000, 128, 16, 16)],
    # smoke runs (CPU, interpreter)
    "tiny": [(6, 16, 12, 10), (6, 16, 6, 5)],
}
GPU_DEFAULT = ["cifar-real-640", "tiny-imagenet-real-2000"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class Copy:
    """Copy bandwidth of ``n`` bytes (read + write), cached by size."""

    def __init__(self, device, repeat):
        self.device, self.repeat, self.cache = device, repeat, {}

    def gbs(self, nbytes):
        n = max(nbytes // 2 // 4, 1)  # the copy reads and writes: half the bytes each way
        if n not in self.cache:
            src = torch.empty(n, dtype=torch.float32, device=self.device).uniform_()
            dst = torch.empty_like(src)
            sec = _timed(lambda: dst.copy_(src), self.device, self.repeat)
            self.cache[n] = 2 * n * 4 / sec / 1e9
            del src, dst
        return self.cache[n]


def _feats(shapes, dtype, layout, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for s in shapes:
        f = torch.randn(s, generator=g, device=device, dtype=torch.float32).relu_().to(dtype)
        if layout == "channels_last":
            f = f.contiguous(memory_format=torch.channels_last)
        out.append(f)
    return out


def loss_kernel_rows(backend, shapes, dtype, layout, device, repeat):
    feats = _feats(shapes, dtype, layout, device, 0)
    maps, norms = backend.forward(feats, 4.0)
    gmaps = [torch.randn_like(m) for m in maps]
    fwd = _timed(lambda: backend.forward(feats, 4.0), device, repeat)
    fwd_bytes = _nbytes(feats) + _nbytes(maps) + _nbytes(norms)
    grads = backend.backward(feats, maps, norms, gmaps, 4.0)
    bwd = _timed(lambda: backend.backward(feats, maps, norms, gmaps, 4.0), device, repeat)
    bwd_bytes = _nbytes(feats) + _nbytes(grads) + _nbytes(maps) + _nbytes(norms) + _nbytes(gmaps)
    return [("spatial_attention_forward", fwd, fwd_bytes), ("spatial_attention_backward", bwd, bwd_bytes)]


def epilogue_rows(shape, dtype, layout, device, repeat):
    from datadam_fast.kernels import real_epilogue as E
    y = _feats([shape], dtype, layout, device, 1)[0]
    N, C = shape[:2]
    mean, m2 = E.plane_moments(y)
    stats = _timed(lambda: E.plane_moments(y), device, repeat)
    scale = torch.rand(N, C, device=device) + 0.5
    shift = torch.randn(N, C, device=device)
    out, att = E.apply_epilogue(y, scale, shift, act="relu", pool="avgpool", power=4.0, attention=True)
    apply = _timed(lambda: E.apply_epilogue(y, scale, shift, act="relu", pool="avgpool", power=4.0,
                                            attention=True), device, repeat)
    return [("epilogue_stats", stats, _nbytes([y, mean, m2])),
            ("epilogue_apply", apply, _nbytes([y, scale, shift, out, att]))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--problems", nargs="*", default=None, help=f"names from {list(PROBLEMS)}")
    ap.add_argument("--backends", nargs="*", default=None,
                    help="loss backends to time (default: triton and cuda on a GPU, cpu on a CPU) and 'epilogue'")
    ap.add_argument("--dtypes", nargs="*", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    names = args.problems or (GPU_DEFAULT if gpu else ["tiny"])
    wanted = args.backends or (["triton", "cuda", "epilogue"] if gpu else ["cpu"])
    dev_name = torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine())
    datasheet = peak_bandwidth(dev_name) if gpu else None
    from datadam_fast.loss.backends import BackendUnavailable, get_backend
    backends = {}
    for n in wanted:
        if n == "epilogue":
            continue
        try:
            b = get_backend(n)
            if b.supports(device):
                backends[n] = b
            else:
                print(f"[skip] {n}: does not run on {device}", file=sys.stderr)
        except BackendUnavailable as e:
            print(f"[skip] {n}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
    copy = Copy(device, args.repeat)
    rows = []
    out = {"benchmark": "kernels", "device": dev_name, "torch": torch.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python", "benchmarks/bench_kernels.py"] + (argv if argv is not None else sys.argv[1:])),
           "datasheet_gbs": datasheet, "complete": False, "rows": rows}
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"bench_kernels_{device.type}_{datetime.date.today().isoformat()}.json")
    print(f"{'provider':9s} {'kernel':27s} {'problem':24s} {'dtype':5s} {'layout':13s} {'MB':>8s} {'ms':>8s} "
          f"{'GB/s':>7s} {'x copy':>7s}", flush=True)

    def add(provider, problem, dname, layout, measured):
        for kernel, sec, nbytes in measured:
            ceiling = copy.gbs(nbytes)
            gbs = nbytes / sec / 1e9
            r = {"provider": provider, "kernel": kernel, "problem": problem, "dtype": dname, "layout": layout,
                 "bytes": nbytes, "median_ms": sec * 1e3, "gbs": gbs, "copy_gbs_same_bytes": ceiling,
                 "fraction_of_copy": gbs / ceiling,
                 "fraction_of_datasheet": gbs / datasheet if datasheet else None}
            rows.append(r)
            print(f"{provider:9s} {kernel:27s} {problem:24s} {dname:5s} {layout:13s} {nbytes / 1e6:8.1f} "
                  f"{sec * 1e3:8.3f} {gbs:7.0f} {gbs / ceiling:7.2f}", flush=True)
        _write_json(out, path)

    for problem in names:
        shapes = PROBLEMS[problem]
        for dname in args.dtypes:
            for layout in LAYOUTS:
                for bname, be in backends.items():
                    try:
                        add(bname, problem, dname, layout,
                            loss_kernel_rows(be, shapes, DTYPES[dname], layout, device, args.repeat))
                    except (RuntimeError, MemoryError) as e:
                        rows.append({"provider": bname, "problem": problem, "dtype": dname, "layout": layout,
                                     "status": "failed", "reason": str(e).splitlines()[0][:300]})
                        _write_json(out, path)
                if "epilogue" in wanted:
                    try:
                        add("triton", problem, dname, layout,
                            epilogue_rows(shapes[0], DTYPES[dname], layout, device, args.repeat))
                    except (RuntimeError, MemoryError, ImportError) as e:
                        rows.append({"provider": "triton", "kernel": "epilogue", "problem": problem, "dtype": dname,
                                     "layout": layout, "status": "failed", "reason": str(e).splitlines()[0][:300]})
                        _write_json(out, path)
                if gpu:
                    torch.cuda.empty_cache()
    out["complete"] = True
    out["copy_gbs_by_bytes"] = {str(2 * n * 4): v for n, v in copy.cache.items()}
    _write_json(out, path)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: the JSON holds the rows finished so far", file=sys.stderr, flush=True)
        sys.exit(130)
