"""Evaluation speed: the N runs trained one after another, together (vmap), or one after another
through the compiled training step, same draws.

Trains ``--runs`` fresh networks per synthetic set (random real MNIST images, ``--ipcs`` per class)
with the evaluation protocol (DSA on, batch 256, ``--epochs``+1 epochs) once per ``--modes`` entry
(``sequential``, ``batched``, ``compiled``: sequential with ``CompiledTrainingLoss``), and tests
them on the first ``--test-limit`` test images. Reports wall seconds for training (after an
untimed warm-up epoch, which for ``compiled`` holds the compile, reported as ``compile_s``) and
testing, the speed-up over ``sequential``, and the largest accuracy difference to it (expected 0 up
to an image flipped by float rounding). JSON goes to ``benchmarks/results/``.

    python benchmarks/bench_eval.py --data-root ../shared/datasets
    python benchmarks/bench_eval.py --data-root ../shared/datasets --modes sequential compiled --ipcs 40
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
from datadam_fast.evaluation.evaluate import (CompiledTrainingLoss, EvalConfig, accuracies_batched, accuracy,  # noqa: E402
                                              build_eval_network, train_networks)


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
    ap.add_argument("--modes", nargs="+", default=["sequential", "batched"], choices=["sequential", "batched", "compiled"],
                    help="training modes to time (sequential first: the speed-ups divide by it)")
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
        modes = ["sequential"] + [m for m in args.modes if m != "sequential"]
        for mode in modes:
            b = mode == "batched"
            loss_fn = None
            if mode == "compiled":
                template = build_eval_network(cfg, x.shape[1], train.num_classes, tuple(x.shape[2:]),
                                              generator=torch.Generator().manual_seed(0)).to(device)
                loss_fn = CompiledTrainingLoss(template)
            # untimed warm-up (one epoch: every batch shape): first calls pay for oneDNN primitive
            # creation / vmap tracing / the compile
            t = time.perf_counter()
            train_networks(x, y, warm, [torch.Generator().manual_seed(r) for r in range(args.runs)],
                           num_classes=train.num_classes, device=device, batched=b, loss_fn=loss_fn)
            warm_s = time.perf_counter() - t
            gens = [torch.Generator().manual_seed(1000 + r) for r in range(args.runs)]
            nets, _, train_s = train_networks(x, y, cfg, gens, num_classes=train.num_classes, device=device,
                                              batched=b, loss_fn=loss_fn)
            t = time.perf_counter()
            if b:
                accs = accuracies_batched(nets, test, device)
            else:
                accs = [accuracy(n, test, device) for n in nets]
            test_s = time.perf_counter() - t
            res[mode] = {"train_s": train_s, "test_s": test_s, "total_s": train_s + test_s, "accuracies": accs,
                         "warmup_s": warm_s}
            if loss_fn is not None:
                res[mode]["compile_failed"] = loss_fn.failed
            print(f"ipc {ipc:3d} {mode:10s} train {train_s:7.2f} s  test {test_s:6.2f} s  warm-up {warm_s:6.2f} s  "
                  f"acc {sum(accs) / len(accs):.2f}", flush=True)
        s = res["sequential"]
        row = {"ipc": ipc, "images": int(x.shape[0]), **{f"{m}_{k}": v[k] for m, v in res.items()
                                                         for k in ("train_s", "test_s", "total_s", "accuracies")}}
        for m in modes[1:]:
            row[f"speedup_train_{m}"] = s["train_s"] / res[m]["train_s"]
            row[f"speedup_total_{m}"] = s["total_s"] / res[m]["total_s"]
            row[f"max_abs_accuracy_diff_{m}"] = max(abs(p - q) for p, q in zip(s["accuracies"], res[m]["accuracies"]))
            if m == "compiled":
                row["compile_s"] = res[m]["warmup_s"] - s["warmup_s"]
                row["compile_failed"] = res[m]["compile_failed"]
            print(f"ipc {ipc:3d} speed-up {m}/sequential: train x{row[f'speedup_train_{m}']:.2f}, "
                  f"total x{row[f'speedup_total_{m}']:.2f}", flush=True)
        rows.append(row)
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
