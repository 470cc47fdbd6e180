"""One NCFM iteration: the package (``Distiller.step()`` with ``--method ncfm``) against NCFM's own
iteration structure (``official_ncfm_iteration.py``: per-class loop, per-class backward and AdamW
step, a host sync per class, four ``[F, B]`` projections per class) on the same data, network,
batch sizes and number of frequencies.

Rows (timed interleaved, one iteration of every row per repetition, so that a drift of the
machine's load hits every row alike):

* ``official``: the NCFM structure;
* ``package``: ``--method ncfm`` as a run uses it (fused ConvNet real side, fused characteristic
  function, channels_last);
* ``package:real_epilogue=off``: the same without the fused real side (the network's own forward);
* ``package:real_conv=direct``: the fused real side on oneDNN's direct 3x3 convolutions instead of
  Winograd F(2x2, 3x3) (``DATADAM_FAST_REAL_CONV=direct`` around that row's steps);
* ``package:backend=reference``: the characteristic function in plain PyTorch (materialised
  projection) inside the package's loop: what the fused operator alone is worth.

Prints a table (median / p20 / p80 ms per iteration, ratio to ``official``) and writes JSON::

    python benchmarks/bench_ncfm_iteration.py --shape 10,3,32 --batch-real 256 --ipc 10 \\
        --json benchmarks/results/bench_ncfm_iteration_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_iteration import machine, shaped_dataset  # noqa: E402
from official_ncfm_iteration import OfficialNCFMIteration  # noqa: E402
from datadam_fast._io import atomic_write_text  # noqa: E402
from datadam_fast.distill import DistillConfig, Distiller  # noqa: E402

VARIANTS = {"package": {}, "package:real_epilogue=off": {"real_epilogue": "off"},
            "package:real_conv=direct": {}, "package:backend=reference": {"backend": "reference"}}
#: environment of a row's steps (read by the package at every call)
ENVIRONMENTS = {"package:real_conv=direct": {"DATADAM_FAST_REAL_CONV": "direct"}}


def _with_environment(env: Dict[str, str], fn):
    if not env:
        return fn

    def run():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pct(xs: List[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="10,3,32", metavar="K,C,S", help="random images: classes, channels, pixels")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=256)
    ap.add_argument("--num-freqs", type=int, default=4096)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iterations", type=int, default=5, help="timed iterations per row")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rows", nargs="+", default=["official", *VARIANTS], choices=["official", *VARIANTS])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    train_set = shaped_dataset(args.shape, per_class=max(args.batch_real, args.ipc) + 1, seed=args.seed)
    steps = {}
    closers = []
    if "official" in args.rows:
        off = OfficialNCFMIteration(train_set, ipc=args.ipc, batch_real=args.batch_real, num_freqs=args.num_freqs,
                                    width=args.width, device=device, seed=args.seed)
        steps["official"] = off.step
    for name, kw in VARIANTS.items():
        if name not in args.rows:
            continue
        cfg = DistillConfig(dataset=train_set.name, method="ncfm", ipc=args.ipc, batch_real=args.batch_real,
                            num_freqs=args.num_freqs, width=args.width, device=args.device, seed=args.seed,
                            eval_every=-1, checkpoint_every=0, iterations=args.warmup + args.iterations + 1, **kw)
        d = Distiller(cfg, None, progress=False, train_set=train_set)
        closers.append(d)
        steps[name] = _with_environment(ENVIRONMENTS.get(name, {}), (lambda dd: lambda: float(dd.step()["loss"]))(d))
        steps[name + "#fused_real"] = d.fused_real
    ms: Dict[str, List[float]] = {n: [] for n in steps if "#" not in n}
    first_loss: Dict[str, float] = {}
    for rep in range(args.warmup + args.iterations):
        for name in ms:
            _sync(device)
            t = time.perf_counter()
            loss = steps[name]()
            _sync(device)
            if rep == 0:
                first_loss[name] = loss
            if rep >= args.warmup:
                ms[name].append(1e3 * (time.perf_counter() - t))
    for d in closers:
        d.close()
    base = statistics.median(ms["official"]) if "official" in ms else None
    rows = []
    for name, xs in ms.items():
        med = statistics.median(xs)
        rows.append({"row": name, "median_ms": med, "p20_ms": _pct(xs, 0.2), "p80_ms": _pct(xs, 0.8), "ms": xs,
                     "speedup_vs_official": (base / med) if base else None, "first_iteration_loss": first_loss[name],
                     "fused_real": steps.get(name + "#fused_real")})
    head = "| row | median ms/it | p20 | p80 | vs official |"
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup_vs_official']:.2f}x" if r["speedup_vs_official"] else "-"
        lines.append(f"| {r['row']} | {r['median_ms']:.0f} | {r['p20_ms']:.0f} | {r['p80_ms']:.0f} | {sp} |")
    table = "\n".join(lines)
    print(table)
    out = {"benchmark": "bench_ncfm_iteration", "date": datetime.date.today().isoformat(), "machine": machine(),
           "args": vars(args), "rows": rows, "table": table}
    path = args.json or os.path.join(ROOT, "benchmarks", "results",
                                     f"bench_ncfm_iteration_{args.device}_{datetime.date.today().isoformat()}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
