"""DataDAM vs random real subsets on MNIST / Fashion-MNIST, on a CPU budget.

For each dataset and IPC: distill with ``--iterations N`` (and ``0`` = random real subset, same
seed so the same initial images), then evaluate both identically (``--runs`` fresh ConvNets,
official protocol at a reduced epoch budget). Results are appended to a JSON file as they finish
(re-running skips finished cells), and a Markdown table is printed.

    python benchmarks/cpu_results_table.py --data-root ../shared/datasets
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import torch

from datadam_fast.data import load_dataset
from datadam_fast.distill import DistillConfig, Distiller
from datadam_fast.evaluation.evaluate import EvalConfig, evaluate_synthetic


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--datasets", nargs="*", default=["mnist", "fashion_mnist"])
    ap.add_argument("--ipcs", nargs="*", type=int, default=[1, 10, 50])
    ap.add_argument("--presets", nargs="*", default=["paper"])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--batch-real", type=int, default=64)
    ap.add_argument("--width", type=int, default=32, help="ConvNet width for distillation and evaluation")
    ap.add_argument("--eval-model", default="ConvNet")
    ap.add_argument("--eval-epochs", type=int, default=100)
    ap.add_argument("--eval-runs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "cpu_results_table.json"))
    args = ap.parse_args(argv)
    done = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            done = {r["key"]: r for r in json.load(f)["cells"]}
    cells = list(done.values())

    def save():
        out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "args": vars(args), "cells": cells}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)

    for ds_name in args.datasets:
        train = load_dataset(ds_name, root=args.data_root, split="train")
        test = load_dataset(ds_name, root=args.data_root, split="test")
        for ipc in args.ipcs:
            for preset in ["random"] + list(args.presets):
                key = f"{ds_name}/ipc{ipc}/{preset}"
                if key in done:
                    continue
                iters = 0 if preset == "random" else args.iterations
                cfg = DistillConfig(dataset=ds_name, data_root=args.data_root, ipc=ipc, iterations=iters,
                                    batch_real=args.batch_real, preset="paper" if preset == "random" else preset,
                                    width=args.width, seed=args.seed, eval_every=-1, checkpoint_every=0)
                t0 = time.time()
                d = Distiller(cfg, None, progress=True, train_set=train, test_set=test)
                d.run()
                t_distill = time.time() - t0
                ecfg = EvalConfig(model=args.eval_model, epochs=args.eval_epochs, runs=args.eval_runs,
                                  width=args.width, norm="instancenorm")
                t0 = time.time()
                res = evaluate_synthetic(d.syn.detach(), d.labels_syn, test, ecfg, seed=args.seed)
                cell = {"key": key, "dataset": ds_name, "ipc": ipc, "method": preset, "iterations": iters,
                        "accuracies": res["accuracies"], "mean": res["mean"], "std": res["std"],
                        "distill_s": t_distill, "eval_s": time.time() - t0}
                print(json.dumps(cell))
                cells.append(cell)
                done[key] = cell
                save()
    print_table(cells)


def print_table(cells):
    by = {(c["dataset"], c["ipc"], c["method"]): c for c in cells}
    methods = sorted({c["method"] for c in cells}, key=lambda m: (m != "random", m))
    for ds in sorted({c["dataset"] for c in cells}):
        print(f"\n{ds}: " + " | ".join(methods))
        for ipc in sorted({c["ipc"] for c in cells if c["dataset"] == ds}):
            row = []
            for m in methods:
                c = by.get((ds, ipc, m))
                row.append(f"{c['mean']:.1f} ± {c['std']:.1f}" if c else "-")
            print(f"IPC {ipc}: " + " | ".join(row))


if __name__ == "__main__":
    main()
