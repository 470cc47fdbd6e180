"""Compile check of the CUDA sources with nvcc: no GPU needed, nothing is run.

Two translation units are compiled concurrently (``nvcc -c``):

1. ``kernels``: a torch-free unit that includes ``csrc/spatial_attention_kernels.cuh`` and
   explicitly instantiates both launchers (hence every kernel: 4 dtypes x powers {1, 2, 3, 4,
   general}, plus the normalise/dot kernels for float and double) and the host tiling planner, for
   sm_80 and sm_90 (``DATADAM_FAST_NVCC_ARCHS``, e.g. ``"80,90"``), with PyTorch's nvcc flags
   (``-D__CUDA_NO_HALF_CONVERSIONS__`` ...). ptxas' report must list every kernel for every arch;
   register use and spills are printed (``-s``).
2. ``extension``: the real ``csrc/spatial_attention_cuda.cu`` against the installed PyTorch's
   headers, with the flags ``torch.utils.cpp_extension`` uses (C++ standard, ABI, extension
   defines) for sm_90 only. A CPU-only PyTorch wheel ships the c10/ATen CUDA headers but not the
   CMake-generated ``c10/cuda/impl/cuda_cmake_macros.h``; then ``-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE``
   (a switch c10 provides for exactly this) stands in for it.

The test fails if nvcc is present and either unit does not compile, or if ptxas reports any
spill store or load for any kernel of unit 1 on any arch (a spill turns a streaming kernel's
register traffic into local-memory traffic). Registers, stack and spills per kernel are printed;
``benchmarks/cuda_ptxas.py`` writes them to ``benchmarks/results/cuda_ptxas.json``. It skips only
when nvcc is absent (or, for unit 2 alone, when PyTorch's or Python's headers are missing). Each
unit is compiled once per test run (about 40 s for unit 1 on two cores), started in the background
as soon as the suite is collected.
"""
import inspect
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
DTYPES = ("float", "double", "__half", "__nv_bfloat16")
POWERS = (0, 1, 2, 3, 4)


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _find_nvcc()
pytestmark = [pytest.mark.slow,  # nvcc compiles
              pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, CUDA_PATH): "
                                                     "CUDA compile check skipped")]


def _supported_archs():
    try:
        out = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
        return {int(m) for m in re.findall(r"compute_(\d+)", out.stdout)}
    except Exception:
        return set()


def _archs():
    wanted = [int(a) for a in re.findall(r"\d+", os.environ.get("DATADAM_FAST_NVCC_ARCHS", "80,90"))]
    have = _supported_archs()
    if not have:
        return wanted
    chosen = [a for a in wanted if a in have]
    return chosen or [max(have)]


def _gencode(archs):
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def _torch_nvcc_flags():
    from torch.utils import cpp_extension
    from datadam_fast._constants import native_defines  # what the real builds pass (NORM_EPS)
    return list(getattr(cpp_extension, "COMMON_NVCC_FLAGS",
                        ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                         "--expt-relaxed-constexpr"])) + native_defines()


def _torch_cxx_std():
    from torch.utils import cpp_extension
    try:
        src = inspect.getsource(cpp_extension)
    except (OSError, TypeError):
        src = ""
    return "-std=c++20" if "-std=c++20" in src else "-std=c++17"


def _kernels_tu() -> str:
    lines = ['#include "spatial_attention_kernels.cuh"', "namespace ddk = datadam_fast::cuda;"]
    for t in DTYPES:
        lines.append(f"template cudaError_t ddk::launch_forward<{t}>(const ddk::Params&, cudaStream_t);")
        lines.append(f"template cudaError_t ddk::launch_backward<{t}>(const ddk::Params&, cudaStream_t);")
        lines.append(f"template void ddk::plan_layer<{t}>(ddk::LayerDesc&, int64_t, int64_t, int64_t, "
                     "int, bool, int, bool);")
    return "\n".join(lines) + "\n"


class _Job:
    def __init__(self, name, cmd, skip_reason=None, notes=()):
        self.name, self.cmd, self.skip_reason, self.notes = name, cmd, skip_reason, list(notes)
        self.proc = None
        self.t0 = 0.0
        self.result = None

    def start(self):
        if self.skip_reason is None:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True)

    def wait(self):
        if self.result is None and self.proc is not None:
            try:
                out, _ = self.proc.communicate(timeout=900)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
                out += "\n[timed out after 900 s]"
            self.result = (self.proc.returncode, out, time.monotonic() - self.t0)
        return self.result


def start_jobs(out: Path) -> dict:
    """Both nvcc units, started (nvcc is single-threaded per unit: they compile at once)."""
    archs = _archs()
    common = [NVCC, "-c", "-I", str(CSRC), *_torch_nvcc_flags()]

    tu = out / "kernels_check.cu"
    tu.write_text(_kernels_tu())
    kernels = _Job("kernels", [*common, "-std=c++17", "-O3", "-Xptxas", "-v", *_gencode(archs),
                               str(tu), "-o", str(out / "kernels_check.o")],
                   notes=[f"archs sm_{', sm_'.join(map(str, archs))}"])
    kernels.archs = archs

    from torch.utils import cpp_extension
    inc = [Path(p) for p in cpp_extension.include_paths()]
    py_inc = sysconfig.get_paths().get("include")
    skip, notes, defs = None, [], []
    if not any((p / "c10" / "cuda" / "CUDAGuard.h").is_file() for p in inc):
        skip = f"PyTorch {torch.__version__} ships no c10/cuda headers in {inc[0]}"
    elif not py_inc or not (Path(py_inc) / "Python.h").is_file():
        skip = f"Python.h not found (sysconfig include {py_inc})"
    if not any((p / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file() for p in inc):
        defs.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
        notes.append("c10/cuda/impl/cuda_cmake_macros.h absent (CPU-only PyTorch): "
                     "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    arch = max(archs)
    cmd = [*common, _torch_cxx_std(), "-w", *[f"-I{p}" for p in inc], f"-I{py_inc}",
           "-DTORCH_EXTENSION_NAME=_C_cuda_compile_check", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *defs,
           "--compiler-options", "-fPIC", *_gencode([arch]),
           str(CSRC / "spatial_attention_cuda.cu"), "-o", str(out / "extension_check.o")]
    ext = _Job("extension", cmd, skip_reason=skip, notes=[f"sm_{arch}", *notes])
    jobs = {"kernels": kernels, "extension": ext}
    for j in jobs.values():
        j.start()
    return jobs


#: the units started when the suite's collection finished (``tests/conftest.py`` calls
#: :func:`start_in_background`): they compile while the tests before this file run, mostly
#: single-threaded subprocesses that leave a core idle, instead of holding the suite ~80 s here
_BACKGROUND: dict = {}


def start_in_background() -> None:
    if NVCC is not None and not _BACKGROUND:
        out = Path(tempfile.mkdtemp(prefix="datadam_fast_cuda_compile_"))
        _BACKGROUND.update(start_jobs(out), _dir=out)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    if _BACKGROUND:
        jobs, out = {k: v for k, v in _BACKGROUND.items() if k != "_dir"}, _BACKGROUND["_dir"]
    else:
        jobs, out = start_jobs(tmp_path_factory.mktemp("cuda_compile")), None
    yield jobs
    for j in jobs.values():
        if j.proc is not None and j.proc.poll() is None:
            j.proc.kill()
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)


def _report(job, rc, out, secs):
    return (f"nvcc {job.name} ({'; '.join(job.notes)}): rc={rc} in {secs:.1f} s\n"
            f"command: {' '.join(job.cmd)}\n--- output (tail) ---\n{out[-6000:]}")


def test_kernels_compile_for_every_dtype_and_power(jobs):
    job = jobs["kernels"]
    rc, out, secs = job.wait()
    assert rc == 0, _report(job, rc, out, secs)
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", out)
    per_arch = {}
    for name, arch in entries:
        per_arch.setdefault(int(arch), set()).add(name)
    expect = 2 * len(DTYPES) * len(POWERS) + 2 * 2  # reduce+grad per (dtype, power); normalise+dot per acc type
    for arch in job.archs:
        names = per_arch.get(arch, set())
        assert len(names) == expect, (f"sm_{arch}: expected {expect} kernels, ptxas compiled {len(names)}: "
                                      f"{sorted(names)}\n" + _report(job, rc, out, secs))
        for kind in ("fwd_reduce_kernel", "fwd_normalize_kernel", "bwd_dot_kernel", "bwd_grad_kernel"):
            assert any(kind in n for n in names), f"sm_{arch}: no {kind} compiled"
    spills = sum(int(s) for s in re.findall(r"(\d+) bytes spill stores", out))
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", out)]
    print(f"[cuda compile] kernels: {expect} kernels x sm_{', sm_'.join(map(str, job.archs))} in {secs:.1f} s; "
          f"registers {min(regs, default=0)}-{max(regs, default=0)}, spill stores {spills} bytes in total")


def parse_ptxas(out: str) -> list:
    """Per kernel and arch from ``-Xptxas -v``: registers, stack frame, spill stores / loads (bytes),
    static shared memory. ptxas prints, per entry function: "Compiling entry function 'NAME' for
    'sm_XX'", then "N bytes stack frame, N bytes spill stores, N bytes spill loads" and "Used N
    registers, ... N bytes smem"."""
    rows, cur = [], None
    for line in out.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if m:
            cur = {"kernel": m.group(1), "arch": f"sm_{m.group(2)}", "registers": None, "stack_bytes": None,
                   "spill_store_bytes": None, "spill_load_bytes": None, "smem_bytes": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur["stack_bytes"] is None:
            cur["stack_bytes"], cur["spill_store_bytes"], cur["spill_load_bytes"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m and cur["registers"] is None:
            cur["registers"] = int(m.group(1))
            sm = re.search(r"(\d+) bytes smem", line)
            cur["smem_bytes"] = int(sm.group(1)) if sm else 0
    return rows


def demangle(names):
    """Readable kernel names through c++filt when it exists (else the mangled names)."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return list(names)
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
        lines = out.splitlines()
        return lines if len(lines) == len(names) else list(names)
    except Exception:
        return list(names)


def test_no_kernel_spills_registers_recorded(jobs):
    job = jobs["kernels"]
    rc, out, secs = job.wait()
    assert rc == 0, _report(job, rc, out, secs)
    rows = parse_ptxas(out)
    assert rows and all(r["registers"] is not None and r["spill_store_bytes"] is not None for r in rows), \
        "ptxas' -v report did not parse:\n" + out[-3000:]
    names = demangle([r["kernel"] for r in rows])
    lines = [f"{r['arch']} {r['registers']:3d} regs  stack {r['stack_bytes']:3d} B  spill st/ld "
             f"{r['spill_store_bytes']}/{r['spill_load_bytes']} B  smem {r['smem_bytes']:5d} B  {n}"
             for r, n in zip(rows, names)]
    print("[cuda compile] ptxas per kernel:\n" + "\n".join(sorted(lines)))
    spilled = [line for r, line in zip(rows, lines) if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilled, "kernels spill registers to local memory:\n" + "\n".join(spilled)


def test_extension_compiles_against_torch_headers(jobs):
    job = jobs["extension"]
    if job.skip_reason:
        pytest.skip(job.skip_reason)
    rc, out, secs = job.wait()
    assert rc == 0, _report(job, rc, out, secs)
    print(f"[cuda compile] extension ({'; '.join(job.notes)}) in {secs:.1f} s")
