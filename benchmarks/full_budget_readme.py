"""The full-budget results, generated from the committed cell JSONs of
``benchmarks/full_budget_table.py`` (the verdicts are computed, never written by hand): the
"Full-budget results (CPU)" and "Against the field" sections of ``docs/results.md`` and the
accuracy table of ``README.md`` (the field table).

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
from full_budget_table import MATCHING, POOL, SELECT_IPC, VARIANTS, cell_name  # noqa: E402
import full_budget_table  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "full_budget")
DATASETS = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}
IPCS = (1, 10)
COLUMNS = ("random", "datadam-paper", "random-official", "datadam-official", "dm", "ncfm")
BASELINE = {"datadam-paper": "random", "datadam-official": "random-official", "dm": "random", "ncfm": "random"}
PUBLISHED = {("mnist", 1): "91.7 / 88.7", ("mnist", 10): "97.4 / 97.8", ("fashion_mnist", 1): "70.5 / 70.6",
             ("fashion_mnist", 10): "82.3 / 84.6"}  # DC / DSA, DatasetCondensation README
START, END = "## Full-budget results (CPU)", "<!-- end of the generated full-budget section -->"
# README.md holds the table alone, between these two markers
TABLE_START, TABLE_END = "<!-- full-budget table: generated -->", "<!-- end of the full-budget table -->"
FIELD_START, FIELD_END = "## Against the field (CPU)", "<!-- end of the generated field section -->"
RESULTS_DOC = os.path.join(ROOT, "docs", "results.md")
FIELD_IPCS = (1, 10, 50)
#: the field's published hard-label accuracies (ConvNet, %), per (dataset, IPC): {method: value},
#: with where each comes from (SOURCES)
PUBLISHED_FIELD = {
    ("mnist", 1): {"DC": 91.7, "DSA": 88.7, "DM": 89.7},
    ("mnist", 10): {"DC": 97.4, "DSA": 97.8, "DM": 97.5},
    ("mnist", 50): {"DC": 98.8, "DSA": 99.2, "DM": 98.6},
    ("fashion_mnist", 1): {"DC": 70.5, "DSA": 70.6, "DM": 70.7, "IDC": 81.0},
    ("fashion_mnist", 10): {"DC": 82.3, "DSA": 84.6, "DM": 83.5, "IDC": 86.0},
    ("fashion_mnist", 50): {"DC": 83.6, "DSA": 88.7, "DM": 88.1, "IDC": 86.2},
}
SOURCES = {
    "mnist": "DC and DSA: the DatasetCondensation README; DM: the DM paper's MNIST row as recalled in this "
             "project's reference notes (not re-checked against the paper)",
    "fashion_mnist": "DC, DSA, DM and IDC: DANCE's Table 1 (Hansong-Zhang/DANCE, figs/low_res.png)",
}
COLUMN_NAMES = {"datadam-paper": "DataDAM `paper`", "dm": "DM", "ncfm": "NCFM"}
VARIANT_NAMES = {"f2": "factor 2", "pool": "pool", "f2pool": "factor 2 + pool"}
NOT_RUN_50 = ("IPC 50: not run. A width-128 IPC 50 cell is several hours of this 2-core CPU per method "
              "(the synthetic side is 5x IPC 10's); `--ipcs 50` runs them, on a GPU in minutes")
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
             "| DM | NCFM | DC / DSA (published) |", "|---|---|---|---|---|---|---|---|---|"]
    for d, name in DATASETS.items():
        for k in IPCS:
            vals = [fmt(cell(d, k, m)) for m in COLUMNS]
            if cell(d, k, "datadam-paper"):
                vals[1] = f"**{vals[1]}**"
            lines.append(f"| {name} | {k} | " + " | ".join(vals) + f" | {PUBLISHED[(d, k)]} |")
    return "\n".join(lines)


def cell_pairs(a: str, b: str, ipcs=IPCS):
    """(dataset, ipc, cell of ``a``, cell of ``b``) over the rows where both finished."""
    pairs = [(d, k, cell(d, k, a), cell(d, k, b)) for d in DATASETS for k in ipcs]
    return [(d, k, ca, cb) for d, k, ca, cb in pairs if ca and cb]


def diffs(a: str, b: str):
    """(dataset, ipc, mean of ``a`` - mean of ``b``) over the cells where both columns finished."""
    return [(d, k, ca["mean"] - cb["mean"]) for d, k, ca, cb in cell_pairs(a, b)]


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
               for m in ("random-official", "datadam-official", "dm", "ncfm") if not cell(d, k, m)]
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
- {verdict("ncfm")}
- {paper_vs("dm")} Both are evaluated on the same InstanceNorm ConvNet.
- {paper_vs("ncfm")} NCFM runs `--method ncfm --batch-real 256` with its own defaults (AdamW, lr 0.001,
  4096 frequencies), tuned by its authors for 20000 iterations, here 2000; same evaluation network.
- {paper_vs("datadam-official")} {official_ipc1_diagnosis()}
  (`datadam-fast evaluate --synthetic <run>/synthetic.pt --model ConvNet --width 128 --runs 5
  --epochs 1000`; JSON in `benchmarks/results/full_budget/cross/`). The official preset distils
  images about as good as `paper`'s; at IPC 1 its BatchNorm evaluation network is what loses.
{not_run_yet(missing)}
Published DC / DSA figures (DatasetCondensation README) are for context only: other methods, and
their own budgets. The published DM, IDC and other figures, with their sources, are in the next
section.

'''


def best_variant(d: str, k: int, m: str) -> Optional[Dict]:
    """The best finished cell of ``m`` with the field's ingredients (factor 2, pool, both)."""
    found = [(c["mean"], v, c) for v in VARIANTS if (c := cell(d, k, f"{m}-{v}"))]
    if not found:
        return None
    mean, v, c = max(found, key=lambda t: t[0])
    return {**c, "variant": v, "variants_run": len(found)}


def chosen_variant(d: str, m: str) -> Optional[str]:
    """The variant of ``m`` that IPC > :data:`SELECT_IPC` runs on ``d`` (the driver's own rule)."""
    return full_budget_table.chosen_variant(cell, d, m)


def required_variants(d: str, k: int, m: str):
    """The variant cells of ``m`` that the row (``d``, ``k``) needs: all three at :data:`SELECT_IPC`,
    the chosen one above it (None while it is not decided yet)."""
    if k == SELECT_IPC:
        return list(VARIANTS)
    v = chosen_variant(d, m)
    return [v] if v else None


def fmt_best(best: Optional[Dict], d: str = "", k: int = SELECT_IPC, m: str = "") -> str:
    """The best variant, named; at :data:`SELECT_IPC` while some of the three are unfinished, of
    how many it is the best; above it, whether it is the variant chosen at :data:`SELECT_IPC`."""
    if not best:
        if k != SELECT_IPC and m:
            v = chosen_variant(d, m)
            return f"not run yet ({VARIANT_NAMES[v]}, the best at IPC {SELECT_IPC})" if v else \
                f"not run yet (its best IPC {SELECT_IPC} variant, not decided yet)"
        return "not run yet"
    if k != SELECT_IPC and m and best["variants_run"] == 1 and best["variant"] == chosen_variant(d, m):
        return f"{fmt(best)} ({VARIANT_NAMES[best['variant']]}, the best at IPC {SELECT_IPC})"
    of = "" if best["variants_run"] == len(VARIANTS) else f"; {best['variants_run']} of {len(VARIANTS)} run"
    return f"{fmt(best)} ({VARIANT_NAMES[best['variant']]}{of})"


def missing_cells():
    """(dataset, ipc, method) of every cell the field table still needs: the plain methods, all three
    variants at :data:`SELECT_IPC` and the chosen one above it (a method whose choice is not made
    yet: ``<method>-best``)."""
    out = []
    for d in DATASETS:
        for k in IPCS:
            for m in MATCHING:
                if not cell(d, k, m):
                    out.append((d, k, m))
                req = required_variants(d, k, m)
                if req is None:
                    out.append((d, k, f"{m}-best"))
                else:
                    out += [(d, k, f"{m}-{v}") for v in req if not cell(d, k, f"{m}-{v}")]
    return out


def fill_commands(missing) -> str:
    """The driver commands that produce the missing cells that can be run now, one per dataset and IPC."""
    lines = []
    for d in DATASETS:
        for k in IPCS:
            ms = [m for dd, kk, m in missing if dd == d and kk == k and not m.endswith("-best")]
            if ms:
                lines.append("python benchmarks/full_budget_table.py --data-root ../shared/datasets --runs-dir "
                             f"benchmarks/results/full_budget/runs --datasets {d} --ipcs {k} --methods {' '.join(ms)}")
    return "\n".join(lines)


def best_published(d: str, k: int):
    pub = PUBLISHED_FIELD[(d, k)]
    name = max(pub, key=pub.get)
    return name, pub[name]


def judge(c: Optional[Dict], d: str, k: int) -> str:
    """above / within one std / below the best published number (by how much)."""
    if not c:
        return ""
    name, best = best_published(d, k)
    gap = c["mean"] - best
    if gap > 0:
        return f"above {name} ({gap:+.2f})"
    if -gap <= c["std"]:
        return f"within one std of {name} ({gap:+.2f})"
    return f"below {name} ({gap:+.2f})"


def field_table() -> str:
    head = ["dataset", "IPC", "random real"]
    for m in MATCHING:
        head += [COLUMN_NAMES[m], f"{COLUMN_NAMES[m]}, best with the field's parts"]
    head += ["published (hard labels)", "our best vs the best published"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d, name in DATASETS.items():
        for k in FIELD_IPCS:
            row = [name, str(k)]
            if k == 50 and not any(cell(d, k, m) for m in ("random", *MATCHING)):
                lines.append("| " + " | ".join(row + ["not run"] * (1 + 2 * len(MATCHING))) + " | "
                             + ", ".join(f"{a} {v}" for a, v in PUBLISHED_FIELD[(d, k)].items()) + " | not run |")
                continue
            row.append(fmt(cell(d, k, "random")))
            ours = []
            for m in MATCHING:
                plain, best = cell(d, k, m), best_variant(d, k, m)
                row.append(fmt(plain))
                row.append(fmt_best(best, d, k, m))
                ours += [c for c in (plain, best) if c]
            pub = PUBLISHED_FIELD[(d, k)]
            row.append(", ".join(f"{a} {v}" for a, v in pub.items()))
            top = max(ours, key=lambda c: c["mean"]) if ours else None
            row.append(judge(top, d, k) if top else "no cell yet")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def field_verdicts() -> str:
    """Every finished cell of ours against the best published number of its row."""
    out = []
    for d, name in DATASETS.items():
        for k in FIELD_IPCS:
            pub_name, pub = best_published(d, k)
            cells = [(m, cell(d, k, m)) for m in MATCHING] + [
                (f"{m}-{v}", cell(d, k, f"{m}-{v}")) for m in MATCHING for v in VARIANTS]
            done = [(m, c) for m, c in cells if c]
            if not done:
                continue
            out.append(f"- {name} IPC {k} (best published: {pub_name} {pub}): " + "; ".join(
                f"`{m}` {c['mean']:.2f} ± {c['std']:.2f} {judge(c, d, k).split(' (')[0]}" for m, c in done) + ".")
    return "\n".join(out) if out else "- No cell finished yet."


EFFECTS = (("factor 2 over plain", "", "f2"), ("the pool over plain", "", "pool"),
           ("the pool on top of factor 2", "f2", "f2pool"))


def ingredient_effects() -> str:
    """What each ingredient adds, read from every pair of finished cells that differ by it (same
    dataset, IPC and method): the difference of means, and whether it is larger than the larger of
    the two standard deviations."""
    out = []
    for label, base, with_ in EFFECTS:
        found = [(d, k, m, a, b) for m in MATCHING
                 for d, k, b, a in cell_pairs(f"{m}-{with_}", f"{m}-{base}" if base else m, FIELD_IPCS)]
        found.sort(key=lambda t: (list(DATASETS).index(t[0]), t[1]))  # the table's row order
        pairs = [(f"{DATASETS[d]} IPC {k} `{m}`", b["mean"] - a["mean"], max(a["std"], b["std"]))
                 for d, k, m, a, b in found]
        if not pairs:
            continue
        up = sum(diff > spread for _, diff, spread in pairs)
        down = sum(-diff > spread for _, diff, spread in pairs)
        out.append(f"- {label}: " + ", ".join(f"{diff:+.2f} {where}" for where, diff, _ in pairs)
                   + f" (higher by more than one std in {up} of {len(pairs)}, lower in {down}).")
    return "\n".join(out) if out else "- No pair of cells finished yet."


def field_section() -> str:
    missing = missing_cells()
    named = [f"{DATASETS[d]} IPC {k} `{m}`" if not m.endswith("-best") else
             f"{DATASETS[d]} IPC {k} `{m[:-5]}` with its best IPC {SELECT_IPC} variant (not decided yet)"
             for d, k, m in missing]
    commands = fill_commands(missing)
    return f'''{FIELD_START}

The same protocol as above (width-128 ConvNet, 2000 distillation iterations, 5 evaluation runs x
1000 epochs, seed 0; the published methods ran 1000-20000 iterations on their own budgets), for
DataDAM `paper`, DM and NCFM (batch-real 256), each plain and with the field's two ingredients:
multi-formation (`--factor 2`) and matching in a trained network pool (`--networks {POOL}`: five
networks trained half an epoch each, one pool per dataset in `benchmarks/results/full_budget/pools/`),
alone and together. At IPC {SELECT_IPC} all three are run and the column shows the best with its
name (until all three are finished, of how many it is the best); at IPC 10 each method runs the
variant that was best at IPC {SELECT_IPC} on the same dataset (the ablation on the cheap cells,
the chosen setting on the ones that cost 3-5 hours of this CPU each), and the column names it. Produced by
`python benchmarks/full_budget_table.py --data-root ../shared/datasets --runs-dir benchmarks/results/full_budget/runs --ipcs {SELECT_IPC} 10 --methods datadam-paper dm ncfm datadam-paper-best dm-best ncfm-best`
(`<method>-best`: the three variants at IPC {SELECT_IPC}, the chosen one above it; resumable, one JSON
per cell); this section and the README table by
`python benchmarks/full_budget_readme.py --write`. Test accuracy %, mean ± std; the verdict compares
our best cell of the row with the best published hard-label number (above; within one std, ours;
below):

{field_table()}

Published numbers: {SOURCES["mnist"]}. Fashion-MNIST: {SOURCES["fashion_mnist"]}. {NOT_RUN_50}.

What each ingredient changes, from the pairs of finished cells that differ only by it:

{ingredient_effects()}

Every finished cell against the best published number of its row:

{field_verdicts()}
{("- Not run yet: " + ", ".join(named) + ".") if named else ""}
{(chr(10) + "The cells that can be run now (resumable; each writes its JSON as it finishes):" + chr(10) + chr(10) + "    " + commands.replace(chr(10), chr(10) + "    ") + chr(10)) if commands else ""}

'''


def readme_table() -> str:
    return f"{TABLE_START}\n{field_table()}\n{TABLE_END}"


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
    sec, field = section(), field_section()
    print(sec)
    print(field)
    if args.write:
        _replace(RESULTS_DOC, START, END, sec, keep_end=True)
        _replace(RESULTS_DOC, FIELD_START, FIELD_END, field, keep_end=True)
        _replace(README, TABLE_START, TABLE_END, readme_table(), keep_end=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
