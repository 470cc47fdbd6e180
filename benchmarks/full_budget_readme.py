"""The full-budget results, generated from the committed cell JSONs of
``benchmarks/full_budget_table.py`` (the verdicts are computed, never written by hand): the
"Full-budget results (CPU)" section of ``docs/results.md`` and the accuracy table of ``README.md``.

    python benchmarks/full_budget_readme.py            # print the section
    python benchmarks/full_budget_readme.py --write    # and put it into docs/results.md and README.md
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_budget_table import cell_name  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "full_budget")
DATASETS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
IPCS = (1, 10)
COLUMNS = ("random", "datadam-paper", "random-official", "datadam-official", "dm")
BASELINE = {"datadam-paper": "random", "datadam-official": "random-official", "dm": "random"}
PUBLISHED = {("mnist", 1): "91.7 / 88.7", ("mnist", 10): "97.4 / 97.8", ("fashion_mnist", 1): "70.5 / 70.6",
             ("fashion_mnist", 10): "82.3 / 84.6"}  # DC / DSA, DatasetCondensation README
START, END = "## Full-budget results (CPU)", "<!-- end of the generated full-budget section -->"
# README.md holds the table alone, between these two markers
TABLE_START, TABLE_END = "<!-- full-budget table: generated -->", "<!-- end of the full-budget table -->"
RESULTS_DOC = os.path.join(ROOT, "docs", "results.md")
README = os.path.join(ROOT, "README.md")


def _json(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def cell(d: str, k: int, m: str) -> Optional[Dict]:
    return _json(os.path.join(RESULTS, cell_name(d, k, m) + ".json"))


def fmt(c: Optional[Dict]) -> str:
    return f"{c['mean']:.2f} ± {c['std']:.2f}" if c else "not run yet"


def table() -> str:
    lines = ["| dataset | IPC | random real (IN net) | **DataDAM `paper`** | random real (BN net) | DataDAM `official` "
             "| DM | DC / DSA (published) |", "|---|---|---|---|---|---|---|---|"]
    for d, name in DATASETS.items():
        for k in IPCS:
            vals = [fmt(cell(d, k, m)) for m in COLUMNS]
            if cell(d, k, "datadam-paper"):
                vals[1] = f"**{vals[1]}**"
            lines.append(f"| {name} | {k} | " + " | ".join(vals) + f" | {PUBLISHED[(d, k)]} |")
    return "\n".join(lines)


def diffs(a: str, b: str):
    """(dataset, ipc, mean of ``a`` - mean of ``b``) over the cells where both columns finished."""
    pairs = [(d, k, cell(d, k, a), cell(d, k, b)) for d in DATASETS for k in IPCS]
    return [(d, k, ca["mean"] - cb["mean"]) for d, k, ca, cb in pairs if ca and cb]


def verdict(method: str) -> str:
    """How often ``method`` beats its own random baseline, over the cells where both finished."""
    ds = diffs(method, BASELINE[method])
    if not ds:
        return f"`{method}`: no finished cell pair yet."
    below = [f"{DATASETS[d]} IPC {k} ({x:+.2f})" for d, k, x in ds if x <= 0]
    return (f"`{method}`: above its random baseline in {sum(x > 0 for _, _, x in ds)} of {len(ds)} finished "
            f"cells" + (f"; below in {', '.join(below)}." if below else "."))


def paper_vs(method: str) -> str:
    """``paper`` against another column, cell by cell, over the cells where both finished."""
    ds = diffs("datadam-paper", method)
    per_cell = ", ".join(f"{DATASETS[d]} IPC {k} {x:+.2f}" for d, k, x in ds)
    return (f"`paper` is above `{method}` in {sum(x > 0 for _, _, x in ds)} of {len(ds)} cells where both "
            f"finished ({per_cell}).")


def official_ipc1_diagnosis() -> str:
    """The IPC 1 official sets: their pixel spread and their accuracy on the InstanceNorm ConvNet."""
    import torch
    stds, cross = [], []
    for d, name in DATASETS.items():
        off = cell(d, 1, "datadam-official")
        if off is None:
            continue
        syn = os.path.join(RESULTS, "runs", cell_name(d, 1, "datadam-official"), "synthetic.pt")
        stds.append(float(torch.load(syn, weights_only=False)["images"].std()))
        on_in = _json(os.path.join(RESULTS, "cross", cell_name(d, 1, "datadam-official") + "_on_instancenorm.json"))
        if on_in:
            runs = ", ".join(f"{a:.1f}" for a in off["accuracies"])
            cross.append(f"{name} {fmt(on_in)} (`paper`'s set: {fmt(cell(d, 1, 'datadam-paper'))}; the official set "
                         f"on its BatchNorm network: {fmt(off)}, runs {runs})")
    std_txt = f"{min(stds):.1f}-{max(stds):.1f}" if stds else "(no official IPC 1 set yet)"
    return f'''At IPC 1 the official cells vary widely from run to run. The BatchNorm network is trained
  on the 10 synthetic images (one batch), so its running statistics come from images whose pixel std
  is {std_txt} (the normalised real data: about 1). The same official sets evaluated on the InstanceNorm
  ConvNet: {"; ".join(cross) if cross else "not run yet"}'''


def not_run_yet(missing) -> str:
    if not missing:
        return ""
    return ("- Not run yet (each IPC 10 cell is 30-60 min of this CPU; the same command resumes and "
            "fills them):\n  " + ", ".join(missing) + ".\n")


def section() -> str:
    missing = [f"{DATASETS[d]} IPC {k} {m}" for d in DATASETS for k in IPCS
               for m in ("random-official", "datadam-official", "dm") if not cell(d, k, m)]
    return f'''{START}

The full-budget protocol on a 2-core CPU machine: width-128 ConvNet, 2000 distillation iterations, 5
evaluation runs x 1000 epochs with the corrected official schedule, seed 0, 2026-11-26. Every cell is
evaluated on its preset's own network: InstanceNorm ConvNet for `paper`, DM and the first random
column; BatchNorm ConvNet (the official `ConvNet`) for `official` and for its random baseline, which
is the same real subset as the first random column. Produced by
`python benchmarks/full_budget_table.py --data-root ../shared/datasets --runs-dir benchmarks/results/full_budget/runs`
(this section and the README table: `python benchmarks/full_budget_readme.py --write`; resumable: finished cells are skipped, unfinished ones resume from the committed checkpoints in
`benchmarks/results/full_budget/runs/`; one JSON per cell (commands, network, per-run accuracies,
times) and `table.md` in `benchmarks/results/full_budget/`; report PNGs of the MNIST IPC 1 run are in
its run folder). The MNIST `paper` cells were distilled with compiled passes, the rest with the C++
fused real side (same results up to float32 rounding). Test accuracy %, mean ± std:

{table()}

- {verdict("datadam-paper")}
- {verdict("datadam-official")}
- {verdict("dm")}
- {paper_vs("dm")} Both are evaluated on the same InstanceNorm ConvNet.
- {paper_vs("datadam-official")} {official_ipc1_diagnosis()}
  (`datadam-fast evaluate --synthetic <run>/synthetic.pt --model ConvNet --width 128 --runs 5
  --epochs 1000`; JSON in `benchmarks/results/full_budget/cross/`). The official preset distils
  images about as good as `paper`'s; at IPC 1 its BatchNorm evaluation network is what loses.
{not_run_yet(missing)}
Published DC / DSA figures (DatasetCondensation README) are for context only: other methods, and
their own budgets. The DM paper's own MNIST / Fashion-MNIST figures are not in the reference
material available here, so none are quoted for the DM column.

'''


def readme_table() -> str:
    return f"{TABLE_START}\n{table()}\n{TABLE_END}"


def _replace(path: str, start: str, end: str, new: str, keep_end: bool) -> None:
    with open(path) as f:
        s = f.read()
    a, b = s.index(start), s.index(end)
    if not keep_end:
        b += len(end)
    with open(path, "w") as f:
        f.write(s[:a] + new + s[b:])
    print(f"written into {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the section in docs/results.md and the README table")
    args = ap.parse_args(argv)
    sec = section()
    print(sec)
    if args.write:
        _replace(RESULTS_DOC, START, END, sec, keep_end=True)
        _replace(README, TABLE_START, TABLE_END, readme_table(), keep_end=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
