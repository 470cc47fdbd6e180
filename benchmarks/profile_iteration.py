"""Where the time of one distillation iteration goes (network forward, augmentation, loss, backward).

Runs a few warm-up iterations of the real loop (``Distiller.step``) and then times each phase over
``--iterations`` more, printing a table and writing JSON. Phases: sample (fresh network + real
batch + DSA parameters), augment (real and synthetic DSA), real_forward (no_grad, all classes),
syn_forward, loss (fused attention matching, forward), backward (through loss, network and DSA to
the pixels), update (SGD step).

    python benchmarks/profile_iteration.py --dataset mnist --data-root ../shared/datasets --ipc 10
"""
from __future__ import annotations

import sys
import argparse
import datetime
import json
import os
import platform
import tempfile

import torch

from datadam_fast.distill import DistillConfig, Distiller


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=64)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from datadam_fast.devices import device_line
    args.device, _line = device_line(args.device)  # auto: cuda when available, else cpu
    print(_line, file=sys.stderr, flush=True)
    cfg = DistillConfig(dataset=args.dataset, data_root=args.data_root, ipc=args.ipc, batch_real=args.batch_real,
                        preset=args.preset, backend=args.backend, device=args.device,
                        iterations=args.iterations + args.warmup, eval_every=-1)
    with tempfile.TemporaryDirectory() as tmp:
        d = Distiller(cfg, os.path.join(tmp, "out"), progress=False)
        for _ in range(args.warmup):
            d.step()
        timings = {}
        for _ in range(args.iterations):
            d.step(timings)
    total = sum(timings.values())
    rows = {k: {"ms_per_iteration": 1e3 * v / args.iterations, "fraction": v / total} for k, v in timings.items()}
    print(f"{args.dataset} ipc={args.ipc} batch_real={args.batch_real} preset={args.preset} "
          f"device={args.device} threads={torch.get_num_threads()}")
    print(f"{'phase':14s} {'ms/it':>9s} {'share':>7s}")
    for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["ms_per_iteration"]):
        print(f"{k:14s} {r['ms_per_iteration']:9.1f} {100 * r['fraction']:6.1f}%")
    print(f"{'total':14s} {1e3 * total / args.iterations:9.1f}")
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": args.device, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "config": vars(args), "phases": rows,
           "total_ms_per_iteration": 1e3 * total / args.iterations}
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"profile_iteration_{args.dataset}_ipc{args.ipc}_{args.device}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
