"""Scale plan: measured per-image cost of the two phases of a step, projected to ImageNet-1K.

Measures on the current device, for ConvNet@32 (CIFAR-shaped) and ConvNetD4@64 (ImageNet-64
shaped), with the distillation step's own code (``Distiller.real_pass`` / ``syn_pass``: DSA,
network, fused loss):
  * real side: forward under no_grad into the class means — time and peak memory per image;
  * synthetic side: forward + loss + backward — time and peak memory per image.
Time is the median over ``--repeat`` runs at a fixed batch, divided by the batch; memory is the
slope of the peak between two batch sizes (the planner's probe).

From those it prints (and writes as JSON) seconds per iteration, hours for 8000 iterations and
peak memory per device for ImageNet-1K (1000 classes, 64 px) at IPC 1/10/50/100 on 1 and 8
devices, with the assumptions stated in the output. Nothing in the projection is hard-coded
except the assumptions listed there.

    python benchmarks/scale.py --json benchmarks/results/scale_cpu.json
    python benchmarks/scale.py --device cuda --json benchmarks/results/scale_<gpu>.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datadam_fast.data._base import IMAGENET_MEAN, IMAGENET_STD, ImageDataset  # noqa: E402
from datadam_fast.distill import DistillConfig, Distiller  # noqa: E402
from datadam_fast.distill.memory import GB, MB, linear_fit  # noqa: E402
from datadam_fast.distill.step import ClassSums  # noqa: E402

SHAPES = {"ConvNet@32": 32, "ConvNetD4@64": 64}


def _random_set(size: int, classes: int = 10, per_class: int = 4) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (classes * per_class, 3, size, size), generator=g, dtype=torch.uint8)
    return ImageDataset(f"random{size}", imgs, torch.arange(classes).repeat_interleave(per_class),
                        [str(i) for i in range(classes)], IMAGENET_MEAN, IMAGENET_STD)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(size: int, device: str, batch: int, repeat: int, memory_budget: float) -> dict:
    ds = _random_set(size)
    cfg = DistillConfig(dataset="random", iterations=1, ipc=1, batch_real=1, device=device, eval_every=-1,
                        real_chunk=10, syn_chunk=10, memory_budget=memory_budget)
    d = Distiller(cfg, None, progress=False, train_set=ds, test_set=ds)
    dev = d.device
    gen = torch.Generator().manual_seed(1)
    net = d.new_network(gen)
    params = d.dsa.sample(1, gen, dev, (size, size))

    def inputs(n):
        x = d.layout(torch.randn(n, 3, size, size, generator=gen).to(dev))
        return x, torch.zeros(n, dtype=torch.long, device=dev)

    def real_fn(x, y):
        return lambda: d.real_pass(net, x, y, params, ClassSums(1), y.cpu())

    def syn_fn(x, y):
        with torch.no_grad():
            tg = [torch.zeros_like(s[:1], dtype=torch.float32) for s in d.method.real_statistics(net, x[:1])]
        xs = x.contiguous()
        return lambda: d.syn_pass(net, xs, y, params, tg, 1)

    out = {"image_size": size, "depth": d.cfg.depth, "width": 128, "norm": d.cfg.norm, "power": d.cfg.power,
           "batch": batch}
    for side, make in (("real", real_fn), ("syn", syn_fn)):
        x, y = inputs(batch)
        fn = make(x, y)
        fn()
        fn()
        times = []
        for _ in range(repeat):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        out[f"{side}_ms_per_image"] = 1e3 * statistics.median(times) / batch
        n1, n2 = max(batch // 2, 1), batch
        peaks = []
        for n in (n1, n2):
            xn, yn = inputs(n)
            f = make(xn, yn)
            f()
            peaks.append(d.mem.measure(f))
        slope, base = linear_fit((n1, n2), peaks, 3 * size * size * 4.0)
        out[f"{side}_mb_per_image"] = slope / MB
        out[f"{side}_base_mb"] = base / MB
    out["process_baseline_gb"] = d.mem.current() / GB
    d.close()
    return out


def project(m: dict, *, ipc: int, devices: int, classes: int, batch_real: int, iterations: int,
            device_memory_gb: float) -> dict:
    k = math.ceil(classes / devices)  # classes on the busiest device
    sec = k * (batch_real * m["real_ms_per_image"] + ipc * m["syn_ms_per_image"]) / 1e3
    img_mb = 3 * m["image_size"] ** 2 * 4 / MB
    syn_state_gb = k * ipc * img_mb * 3 / 1024  # images + gradient + momentum
    fixed_gb = m["process_baseline_gb"] + syn_state_gb
    one_pass_gb = fixed_gb + max(k * batch_real * m["real_mb_per_image"], k * ipc * m["syn_mb_per_image"]) / 1024
    room_gb = device_memory_gb * 0.92 - 0.125 - fixed_gb
    one_class_gb = max(batch_real * m["real_mb_per_image"], ipc * m["syn_mb_per_image"]) / 1024
    fits = room_gb >= one_class_gb
    chunks = math.ceil((one_pass_gb - fixed_gb) / room_gb) if fits and room_gb > 0 else None
    return {"ipc": ipc, "devices": devices, "classes_per_device": k, "sec_per_it": sec,
            "hours": sec * iterations / 3600, "one_pass_peak_gb": one_pass_gb,
            "planned_peak_gb": min(one_pass_gb, device_memory_gb * 0.92 - 0.125) if fits else None,
            "synthetic_state_gb": syn_state_gb, "chunks_per_side": max(chunks or 1, 1) if fits else None,
            "fits": fits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch32", type=int, default=64, help="images per timed call at 32 px")
    ap.add_argument("--batch64", type=int, default=32, help="images per timed call at 64 px")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch-real", type=int, default=64, help="real images per class per iteration (official 64)")
    ap.add_argument("--iterations", type=int, default=8000)
    ap.add_argument("--device-memory-gb", type=float, default=None,
                    help="memory of one device for the plan (default: this device's total: RAM or GPU memory)")
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50, 100])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from datadam_fast.devices import device_line
    args.device, _line = device_line(args.device)  # auto: cuda when available, else cpu
    print(_line, file=sys.stderr, flush=True)
    dev = torch.device(args.device)
    if args.device_memory_gb is None:
        if dev.type == "cuda":
            args.device_memory_gb = torch.cuda.get_device_properties(dev).total_memory / GB
        else:
            import os
            args.device_memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    measured = {}
    for name, size in SHAPES.items():
        m = measure(size, args.device, args.batch32 if size == 32 else args.batch64, args.repeat,
                    memory_budget=args.device_memory_gb * 0.8)
        measured[name] = m
        print(f"{name}: real {m['real_ms_per_image']:.3f} ms/img {m['real_mb_per_image']:.2f} MB/img | "
              f"synthetic fwd+bwd {m['syn_ms_per_image']:.3f} ms/img {m['syn_mb_per_image']:.2f} MB/img", flush=True)
    m64 = measured["ConvNetD4@64"]
    rows = [project(m64, ipc=i, devices=n, classes=args.classes, batch_real=args.batch_real,
                    iterations=args.iterations, device_memory_gb=args.device_memory_gb)
            for n in args.devices for i in args.ipcs]
    assumptions = [
        f"ImageNet-1K: {args.classes} classes at 64x64, ConvNetD4 width 128, InstanceNorm, p=4 (paper preset), DSA on",
        f"batch_real = {args.batch_real} real images per class per iteration, {args.iterations} iterations",
        "time per iteration = classes per device x (batch_real x real ms/img + IPC x synthetic ms/img); sampling, "
        "the optimiser step and data loading (overlapped by the prefetcher) are not counted",
        "devices shard the classes (torchrun); per-device time is that of the busiest device; "
        "no communication is counted (only scalars and checkpoints cross devices)",
        f"one device has {args.device_memory_gb:.0f} GB; the planner keeps 8% + 128 MB headroom; fixed memory = this "
        "process's baseline + synthetic images, gradient and momentum of the device's classes",
        "per-image costs measured on this device by benchmarks/scale.py at the shapes above; multi-device rows are "
        "projected, not measured",
    ]
    print(f"\nImageNet-1K projection on {args.device} ({args.device_memory_gb:.0f} GB per device):")
    print("| devices | IPC | s/iteration | hours (8000 it) | one-pass peak GB | planned peak GB | chunks/side |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        pk = "does not fit" if not r["fits"] else f"{r['planned_peak_gb']:.1f}"
        print(f"| {r['devices']} | {r['ipc']} | {r['sec_per_it']:.1f} | {r['hours']:.1f} | {r['one_pass_peak_gb']:.1f} "
              f"| {pk} | {r['chunks_per_side'] or '-'} |")
    print("\nAssumptions:\n" + "\n".join(f"- {a}" for a in assumptions))
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "device": str(dev),
                "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
                or platform.machine(), "threads": torch.get_num_threads(), "command": " ".join(sys.argv)}
        try:
            import triton
            meta["triton"] = triton.__version__
        except ImportError:
            meta["triton"] = None
        Path(args.json).write_text(json.dumps({"meta": meta, "measured": measured, "projection": rows,
                                               "assumptions": assumptions}, indent=2))


if __name__ == "__main__":
    main()
