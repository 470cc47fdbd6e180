"""Compile every Triton launch of datadam-fast for sm_80 and sm_90 without a GPU and print the
table (kernel, config, arch, registers, budget, stack, vector loads/stores, shared memory).

    python benchmarks/gpu_codegen.py            # -> benchmarks/results/gpu_codegen_<triton>.json
    PYTHONPATH=.venv/triton36 python benchmarks/gpu_codegen.py   # the same under triton 3.6
    python benchmarks/gpu_codegen.py --markdown  # docs/gpu.md's table from both JSON files

Machinery: ``datadam_fast.kernels.codegen`` (also used by tests/loss/test_gpu_codegen.py).
"""
import argparse
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/gpu_codegen_<triton version>.json)")
    ap.add_argument("--all", action="store_true", help="print every record (default: one row per compiled variant)")
    ap.add_argument("--markdown", action="store_true",
                    help="compile nothing: print docs/gpu.md's table from the committed gpu_codegen_*.json")
    a = ap.parse_args()
    import triton
    if a.markdown:
        import glob

        from datadam_fast.kernels import codegen as CG
        paths = sorted(glob.glob(os.path.join(HERE, "results", "gpu_codegen_*.json")))
        print(CG.summary_markdown([json.load(open(p)) for p in paths]))
        return 0

    from datadam_fast.kernels import codegen as CG
    res = CG.run(log=lambda s: print(s, file=sys.stderr, flush=True))
    out = a.out or os.path.join(HERE, "results", f"gpu_codegen_{triton.__version__}.json")
    for r in res["records"]:
        r.pop("compile_s", None)  # depends on the triton cache: not a property of the kernel
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    rows, seen = [], set()
    for r in res["records"]:
        key = (r["kernel"], r["arch"], json.dumps(r["constexprs"], sort_keys=True), r["num_warps"])
        if a.all or key not in seen:
            rows.append(r)
        seen.add(key)
    print(CG.table(res, rows))
    bad = [r for r in res["records"] if CG.violations(r)]
    print(f"\n{len(res['records'])} launches, {res['unique_compiles']} compiled variants, "
          f"{len(bad)} outside their budgets; {res['seconds']} s; JSON: {os.path.relpath(out)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
