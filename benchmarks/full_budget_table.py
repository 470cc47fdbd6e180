"""Resumable driver for the full-budget results table (run it on a GPU machine; takes days on a CPU).

Cells: dataset x IPC x method, where a method is

* ``datadam-paper``    DataDAM, ``--preset paper`` (InstanceNorm ConvNet, p = 4)
* ``datadam-official`` DataDAM, ``--preset official`` (BatchNorm ConvNet, p = 1, official taps)
* ``dm``               Distribution Matching, ``distill --method dm`` (skipped, with a message, where this
                       version of ``distill`` has no ``--method``)
* ``ncfm``             NCFM's characteristic-function matching, ``distill --method ncfm --batch-real 256``
                       (NCFM's own 1024 real images per class is 4x the CPU time; 256 is DM's)
* ``<method>-f2``, ``<method>-pool``, ``<method>-f2pool`` for ``datadam-paper``, ``dm`` and ``ncfm``: the
                       same method with multi-formation (``--factor 2``), matching in a trained network
                       pool (``--networks`` :data:`POOL`, cached in ``--pool-dir`` and shared by every
                       cell of a dataset) or both: the field's two ingredients (see ``docs/usage.md``)
* ``<method>-best``     for ``datadam-paper``, ``dm`` and ``ncfm``: the three variants at IPC 1; above
                       it, the variant that was best at IPC 1 on the same dataset (read from the IPC 1
                       cells' JSON; skipped, with a message, until all three are finished)
* ``random``           the random real subset the runs start from (``--iterations 0``), evaluated on
                       the ``paper`` preset's network (InstanceNorm ConvNet)
* ``random-official``  the same real subset, evaluated on the ``official`` preset's network (BatchNorm
                       ConvNet): the baseline the ``datadam-official`` column is compared with

Every cell is its own run directory (``<runs-dir>/<dataset>_ipc<k>_<method>``): ``distill`` with
checkpoints, then ``evaluate`` (``--runs`` networks x ``--eval-epochs`` epochs, the fixed protocol:
SGD 0.01 / momentum 0.9 / wd 5e-4, lr x0.1 after epoch E//2+1, DSA, batch 256; the network is the one
recorded in the set - BatchNorm ConvNet for ``official`` - unless ``--eval-model`` fixes one for all
cells). A finished cell writes ``<results-dir>/<cell>.json`` at once; rerunning the script skips
finished cells, resumes a distillation from its checkpoint and an evaluation from its finished runs
(``eval.json.partial`` in the run directory), and only re-does what was lost.
``<results-dir>/table.md`` is rewritten from the cell files after every cell.

    python benchmarks/full_budget_table.py --data-root ../shared/datasets --device cuda
    python benchmarks/full_budget_table.py --ipcs 1 10 50 --iterations 8000 --device cuda
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from datadam_fast._io import atomic_write_text  # noqa: E402
#: the trained network pool of the ``-pool`` cells: 5 networks trained half an epoch each (partly
#: trained, as IDM's queue; one pool per dataset, built once and reused by all its cells)
POOL = "pool:5:0.5"
BASE_METHODS = {
    "datadam-paper": {"preset": "paper"},
    "datadam-official": {"preset": "official"},
    "dm": {"method": "dm"},
    "ncfm": {"method": "ncfm", "batch_real": 256},
    "random": {"iterations": 0},
    "random-official": {"preset": "official", "iterations": 0},
}
#: the field's ingredients on each matching method
VARIANTS = {"f2": {"factor": 2}, "pool": {"networks": POOL}, "f2pool": {"factor": 2, "networks": POOL}}
MATCHING = ("datadam-paper", "dm", "ncfm")
METHODS = dict(BASE_METHODS)
for _m in MATCHING:
    for _v, _extra in VARIANTS.items():
        METHODS[f"{_m}-{_v}"] = {**BASE_METHODS[_m], **_extra}
#: ``<method>-best``: at :data:`SELECT_IPC` all three variants of the method; above it, the one of
#: them that was best at :data:`SELECT_IPC` on the same dataset (the ablation runs on the cheap
#: cells, the chosen setting on the costly ones)
SELECT_IPC = 1
BEST = {f"{m}-best": m for m in MATCHING}
MIN_ITERATIONS = 2000
TABLE_ORDER = ["random", "datadam-paper", "random-official", "datadam-official", "dm", "ncfm"] + [
    f"{m}-{v}" for m in MATCHING for v in VARIANTS]  # each baseline first


def cell_name(dataset: str, ipc: int, method: str) -> str:
    return f"{dataset}_ipc{ipc}_{method}"


def chosen_variant(get, dataset: str, method: str) -> Optional[str]:
    """The variant of ``method`` that runs above :data:`SELECT_IPC` on ``dataset``: the best mean of
    the three at :data:`SELECT_IPC` (the first in :data:`VARIANTS` order on a tie), or None while
    one of them is unfinished. ``get(dataset, ipc, method)``: that cell's JSON or None."""
    found = [(c["mean"], v) for v in VARIANTS if (c := get(dataset, SELECT_IPC, f"{method}-{v}"))]
    if len(found) < len(VARIANTS):
        return None
    return max(found, key=lambda t: t[0])[1]


def read_cell(results_dir: str, dataset: str, ipc: int, method: str) -> Optional[Dict]:
    path = os.path.join(results_dir, cell_name(dataset, ipc, method) + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def expand_method(results_dir: str, dataset: str, ipc: int, method: str) -> List[str]:
    """The concrete cells that ``method`` names at (``dataset``, ``ipc``): itself, or for
    ``<m>-best`` the three variants at :data:`SELECT_IPC` and the chosen one above it (none, with a
    message, while the choice is not made)."""
    if method not in BEST:
        return [method]
    base = BEST[method]
    if ipc == SELECT_IPC:
        return [f"{base}-{v}" for v in VARIANTS]
    v = chosen_variant(lambda d, k, m: read_cell(results_dir, d, k, m), dataset, base)
    if v is None:
        print(f"[{cell_name(dataset, ipc, method)}] skipped: {method} at IPC {ipc} runs the variant of {base} "
              f"that was best at IPC {SELECT_IPC}, and its three IPC {SELECT_IPC} cells are not all finished "
              f"(run --ipcs {SELECT_IPC} --methods {method} first)", flush=True)
        return []
    print(f"[{cell_name(dataset, ipc, method)}] is {base}-{v}: the best of {base}'s variants at IPC "
          f"{SELECT_IPC} on {dataset}", flush=True)
    return [f"{base}-{v}"]


def _atomic_json(obj, path: str) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _cli(args: List[str]) -> subprocess.CompletedProcess:
    """``datadam-fast ARGS`` in a child process: a crash or OOM in one cell does not end the table."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "datadam_fast", *args], capture_output=True, text=True, env=env)


def distill_state(run_dir: str, iterations: int) -> str:
    """'done' (synthetic set of the requested length), 'resume' (a checkpoint), 'fresh' or 'overwrite'."""
    summary = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary) and os.path.isfile(os.path.join(run_dir, "synthetic.pt")):
        try:
            with open(summary) as f:
                if int(json.load(f).get("iteration", -1)) == iterations:
                    return "done"
        except (OSError, ValueError, AttributeError):
            pass
    if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")):
        return "resume"
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        return "overwrite"  # killed before its first checkpoint: nothing worth keeping
    return "fresh"


def run_cell(args, dataset: str, ipc: int, method: str) -> Optional[Dict]:
    name = cell_name(dataset, ipc, method)
    out_json = os.path.join(args.results_dir, f"{name}.json")
    if os.path.isfile(out_json):
        print(f"[{name}] done already ({out_json}); skipped", flush=True)
        return None
    spec = METHODS[method]
    iterations = spec.get("iterations", args.iterations)
    run_dir = os.path.join(args.runs_dir, name)
    flags = ["--dataset", dataset, "--ipc", str(ipc), "--iterations", str(iterations), "--width", str(args.width),
             "--seed", str(args.seed), "--device", args.device, "--eval-every", "-1",
             "--checkpoint-every", str(args.checkpoint_every), "--no-progress", "--log-every", str(args.log_every),
             "--out", run_dir]
    if args.data_root:
        flags += ["--data-root", args.data_root]
    if "preset" in spec:
        flags += ["--preset", spec["preset"]]
    if "method" in spec:
        flags += ["--method", spec["method"]]
    if "batch_real" in spec:
        flags += ["--batch-real", str(spec["batch_real"])]
    if "factor" in spec:
        flags += ["--factor", str(spec["factor"])]
    if "networks" in spec:
        flags += ["--networks", spec["networks"], "--pool-dir", args.pool_dir]
    state = distill_state(run_dir, iterations)
    t0 = time.time()
    if state != "done":
        extra = {"resume": ["--resume"], "overwrite": ["--overwrite"], "fresh": []}[state]
        print(f"[{name}] distill ({'resuming from its checkpoint' if state == 'resume' else state}): "
              f"{iterations} iterations", flush=True)
        proc = _cli(["distill", *flags, *extra])
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            print(f"[{name}] FAILED: distill exited with {proc.returncode}: {tail}", flush=True)
            return None
    else:
        print(f"[{name}] distillation finished earlier; evaluating", flush=True)
    distill_s = time.time() - t0
    eval_json = os.path.join(run_dir, "eval.json")
    ev = ["evaluate", "--synthetic", os.path.join(run_dir, "synthetic.pt"), "--runs", str(args.runs), "--epochs",
          str(args.eval_epochs), "--seed", str(args.seed), "--device", args.device, "--json", eval_json]
    if args.data_root:
        ev += ["--data-root", args.data_root]
    if args.eval_model:
        ev += ["--model", args.eval_model]
        if args.eval_model.startswith("ConvNet"):
            ev += ["--width", str(args.width)]
    print(f"[{name}] evaluate: {args.runs} runs x {args.eval_epochs} epochs", flush=True)
    t1 = time.time()
    proc = _cli(ev)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        print(f"[{name}] FAILED: evaluate exited with {proc.returncode}: {tail}", flush=True)
        return None
    with open(eval_json) as f:
        res = json.load(f)
    cell = {"cell": name, "dataset": dataset, "ipc": ipc, "method": method, "iterations": iterations,
            "mean": res["mean"], "std": res["std"], "accuracies": res["accuracies"], "network": res["network"],
            "network_source": res.get("network_source"), "eval_epochs": args.eval_epochs, "eval_runs": args.runs,
            "distill_width": args.width, "seed": args.seed, "device": args.device,
            "distill_seconds": round(distill_s, 1), "eval_seconds": round(time.time() - t1, 1),
            "resumed": state == "resume", "eval_resumed_runs": res.get("resumed_runs", 0),
            "eval_compiled": res.get("compiled"), "run_dir": run_dir,
            "distill_command": "datadam-fast distill " + " ".join(flags),
            "evaluate_command": "datadam-fast " + " ".join(ev),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": _git_commit()}
    try:
        import torch
        cell["torch"] = torch.__version__
        cell["gpu"] = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    except Exception:  # informational only
        pass
    _atomic_json(cell, out_json)
    print(f"[{name}] {res['mean']:.2f} ± {res['std']:.2f} % ({res['network']['model']}, "
          f"norm {res['network']['norm']}) -> {out_json}", flush=True)
    return cell


def write_table(results_dir: str, datasets: List[str], ipcs: List[int], methods: List[str]) -> str:
    cells = {}
    for fn in sorted(os.listdir(results_dir)):
        if fn.endswith(".json"):
            try:
                with open(os.path.join(results_dir, fn)) as f:
                    c = json.load(f)
                cells[c["cell"]] = c
            except (OSError, ValueError, KeyError):
                continue
    # every finished cell appears, not only the ones this invocation asked for (the table is the
    # union of all runs so far; columns in TABLE_ORDER)
    for c in cells.values():
        if c.get("dataset") is not None and c["dataset"] not in datasets:
            datasets = list(datasets) + [c["dataset"]]
        if c.get("ipc") is not None and c["ipc"] not in ipcs:
            ipcs = list(ipcs) + [c["ipc"]]
        if c.get("method") in METHODS and c["method"] not in methods:
            methods = list(methods) + [c["method"]]
    ipcs = sorted(ipcs)
    known = ["mnist", "fashion_mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet"]
    datasets = sorted(datasets, key=lambda d: (known.index(d) if d in known else len(known), d))
    methods = [m for m in TABLE_ORDER if m in methods]
    head = "| dataset | IPC | " + " | ".join(methods) + " |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    for d in datasets:
        for k in ipcs:
            row = []
            for m in methods:
                c = cells.get(cell_name(d, k, m))
                row.append(f"{c['mean']:.2f} ± {c['std']:.2f}" if c else "")
            lines.append(f"| {d} | {k} | " + " | ".join(row) + " |")
    path = os.path.join(results_dir, "table.md")
    with open(path, "w") as f:
        f.write("Test accuracy (%), mean ± std over the evaluation runs; one JSON per cell in this folder "
                "(commands, network, seeds, times).\n\n" + "\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Resumable full-budget results table (see the module docstring).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"])
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 10], help="add 50 for the optional column")
    ap.add_argument("--methods", nargs="+", default=list(BASE_METHODS), choices=[*METHODS, *BEST],
                    help="cells to run (the -f2 / -pool / -f2pool variants only when named; <method>-best: all "
                         f"three at IPC {SELECT_IPC}, above it the one that was best at IPC {SELECT_IPC})")
    ap.add_argument("--iterations", type=int, default=MIN_ITERATIONS,
                    help=f"distillation iterations (>= {MIN_ITERATIONS} for the table; less only with --tiny)")
    ap.add_argument("--eval-epochs", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5, help="evaluation networks per cell")
    ap.add_argument("--width", type=int, default=128, help="ConvNet width (distillation and --eval-model)")
    ap.add_argument("--eval-model", default=None,
                    help="evaluate every cell with this network (default: the one recorded in each set)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--runs-dir", default=os.path.join(ROOT, "runs", "full_budget"))
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results", "full_budget"))
    ap.add_argument("--pool-dir", default=os.path.join(ROOT, "benchmarks", "results", "full_budget", "pools"),
                    help="where the -pool cells' trained networks are cached (committed: the cells resume without "
                         "training them again)")
    ap.add_argument("--tiny", action="store_true", help="allow a budget below the table's (smoke tests)")
    args = ap.parse_args(argv)
    from datadam_fast.devices import device_line
    args.device, _line = device_line(args.device)  # auto: cuda when available, else cpu
    print(_line, file=sys.stderr, flush=True)
    if not args.tiny and (args.iterations < MIN_ITERATIONS or args.eval_epochs < 1000 or args.runs < 5):
        ap.error(f"the full-budget table needs --iterations >= {MIN_ITERATIONS}, --eval-epochs >= 1000 and "
                 f"--runs >= 5 (got {args.iterations}, {args.eval_epochs}, {args.runs}); pass --tiny for a smoke test")
    os.makedirs(args.results_dir, exist_ok=True)
    os.makedirs(args.runs_dir, exist_ok=True)
    done = skipped = 0
    for d in args.datasets:
        for k in args.ipcs:
            for m in [c for name in args.methods for c in expand_method(args.results_dir, d, k, name)]:
                cell = run_cell(args, d, k, m)
                if cell is not None:
                    done += 1
                else:
                    skipped += 1
                write_table(args.results_dir, args.datasets, args.ipcs, [m for m in args.methods if m in METHODS])
    print(f"finished {done} cell(s) this time, {skipped} skipped/failed/already done; "
          f"table: {os.path.join(args.results_dir, 'table.md')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
