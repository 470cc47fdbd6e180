"""Evaluation speed: the N runs trained one after another vs together (vmap), same draws.

Trains ``--runs`` fresh networks per synthetic set (random real MNIST images, ``--ipcs`` per class)
with the evaluation protocol (DSA on, batch 256, ``--epochs``+1 epochs) once sequentially and once
batched, and tests them on the first ``--test-limit`` test images. Reports wall seconds for
training and testing, the speed-up, and the largest accuracy difference between the two modes
(expected 0 up to an image flipped by float rounding). JSON goes to ``benchmarks/results/``.

    python benchmarks/bench_eval.py --data-root ../shared/datasets
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from datadam_fast.data import load_dataset  # noqa: E402
from datadam_fast.evaluation.evaluate import EvalConfig, accuracies_batched, accuracy, train_networks  # noqa: E402


class _Subset:
    """The first ``n`` images of a dataset, with the interface ``accuracy`` needs."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, min(n, len(ds)) if n > 0 else len(ds)
        self.labels = ds.labels[: self.n]

    def __len__(self):
        return self.n

    def batch(self, idx, device="cpu"):
        return self.ds.batch(idx, device=device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--model", default="ConvNet")
    ap.add_argument("--test-limit", type=int, default=500, help="test images (0 = all); small to keep the run short")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/bench_eval_<device>_<date>.json)")
    args = ap.parse_args(argv)
    from datadam_fast.devices import device_line
    args.device, _line = device_line(args.device)  # auto: cuda when available, else cpu
    print(_line, file=sys.stderr, flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train = load_dataset(args.dataset, root=args.data_root, split="train")
    test = _Subset(load_dataset(args.dataset, root=args.data_root, split="test"), args.test_limit)
    rows = []
    load_start = os.getloadavg()
    for ipc in args.ipcs:
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.cat([ix[torch.randperm(len(ix), generator=g)[:ipc]] for ix in train.class_indices()])
        x, y = train.batch(idx), train.labels[idx].long()
        cfg = EvalConfig(model=args.model, width=args.width, epochs=args.epochs, runs=args.runs)
        warm = EvalConfig(model=args.model, width=args.width, epochs=0, runs=args.runs)
        res = {}
        for mode in ("sequential", "batched"):
            b = mode == "batched"
            # untimed warm-up: first calls pay for oneDNN primitive creation / vmap tracing
            train_networks(x, y, warm, [torch.Generator().manual_seed(r) for r in range(args.runs)],
                           num_classes=train.num_classes, device=device, batched=b)
            gens = [torch.Generator().manual_seed(1000 + r) for r in range(args.runs)]
            nets, _, train_s = train_networks(x, y, cfg, gens, num_classes=train.num_classes, device=device,
                                              batched=b)
            t = time.perf_counter()
            if b:
                accs = accuracies_batched(nets, test, device)
            else:
                accs = [accuracy(n, test, device) for n in nets]
            test_s = time.perf_counter() - t
            res[mode] = {"train_s": train_s, "test_s": test_s, "total_s": train_s + test_s, "accuracies": accs}
            print(f"ipc {ipc:3d} {mode:10s} train {train_s:7.2f} s  test {test_s:6.2f} s  "
                  f"acc {sum(accs) / len(accs):.2f}", flush=True)
        s, b = res["sequential"], res["batched"]
        rows.append({"ipc": ipc, "images": int(x.shape[0]), **{f"{m}_{k}": v[k] for m, v in res.items()
                                                                for k in ("train_s", "test_s", "total_s", "accuracies")},
                     "speedup_train": s["train_s"] / b["train_s"], "speedup_total": s["total_s"] / b["total_s"],
                     "max_abs_accuracy_diff": max(abs(p - q) for p, q in zip(s["accuracies"], b["accuracies"]))})
        print(f"ipc {ipc:3d} speed-up batched/sequential: train x{rows[-1]['speedup_train']:.2f}, "
              f"total x{rows[-1]['speedup_total']:.2f}", flush=True)
    out = {"benchmark": "bench_eval", "date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "device": str(device), "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                                              "threads": torch.get_num_threads(), "platform": platform.platform(),
                                              "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
           "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
           "command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
           "settings": {"dataset": args.dataset, "runs": args.runs, "epochs": args.epochs, "width": args.width,
                        "model": args.model, "test_images": len(test), "batch": cfg.batch_size, "dsa": cfg.dsa},
           "results": rows}
    path = args.json or os.path.join(ROOT, "benchmarks", "results",
                                     f"bench_eval_{device.type}_{out['date']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
