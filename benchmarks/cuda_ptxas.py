"""Registers, stack and spills of every CUDA kernel in csrc/, per GPU architecture, from ptxas.

No GPU needed: compiles csrc/spatial_attention_kernels.cuh (every dtype x power instantiation)
with ``nvcc -Xptxas -v`` exactly as tests/loss/test_cuda_compile.py does (same translation unit, flags
and parser, imported from it) and writes one row per (kernel, arch).

    python benchmarks/cuda_ptxas.py [--archs 80,90] [--json benchmarks/results/cuda_ptxas.json]

Exit code 1 if any kernel spills.
"""
import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _test_module():
    spec = importlib.util.spec_from_file_location("test_cuda_compile", ROOT / "tests" / "test_cuda_compile.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90", help="comma-separated compute capabilities")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "cuda_ptxas.json"))
    args = ap.parse_args(argv)
    t = _test_module()
    if t.NVCC is None:
        print("nvcc not found (PATH, CUDA_HOME, CUDA_PATH)", file=sys.stderr)
        return 2
    archs = [int(a) for a in args.archs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tu = Path(tmp) / "kernels_check.cu"
        tu.write_text(t._kernels_tu())
        cmd = [t.NVCC, "-c", "-I", str(t.CSRC), *t._torch_nvcc_flags(), "-std=c++17", "-O3", "-Xptxas", "-v",
               *t._gencode(archs), str(tu), "-o", str(Path(tmp) / "kernels_check.o")]
        p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        print(p.stdout + p.stderr, file=sys.stderr)
        return p.returncode
    rows = t.parse_ptxas(p.stdout + p.stderr)
    for r, name in zip(rows, t.demangle([r["kernel"] for r in rows])):
        r["name"] = name
    rows.sort(key=lambda r: (r["name"], r["arch"]))
    version = [line for line in subprocess.run([t.NVCC, "--version"], capture_output=True, text=True).stdout.splitlines()
               if "release" in line]
    doc = {"date": datetime.date.today().isoformat(), "nvcc": version[0].strip() if version else None, "archs": [f"sm_{a}" for a in archs],
           "flags": cmd[4:-3], "kernels": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    for r in rows:
        print(f"{r['arch']}  {r['registers']:3d} regs  stack {r['stack_bytes']:3d} B  spill st/ld "
              f"{r['spill_store_bytes']}/{r['spill_load_bytes']} B  smem {r['smem_bytes']:5d} B  {r['name']}")
    spills = [r for r in rows if r["spill_store_bytes"] or r["spill_load_bytes"]]
    print(f"{len(rows)} kernels x arch, {len(spills)} with spills; wrote {args.json}")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
