"""The machine a GPU run measured on, and its measured ceilings, as JSON.

Records versions (Python, torch, CUDA, triton, driver), the device, the TF32 switches (cuDNN
convolutions default to TF32, which changes both timings and numerics), what the profiling stages
can use (the ``nvtx`` package, ninja, nvcc, nsys/ncu) and the clocks from ``nvidia-smi``. Then it
measures the two ceilings every later figure is held against, timed with CUDA events (medians):

* device-to-device copy bandwidth (``dst.copy_(src)`` of ``--copy-mib`` MiB; bytes read + written);
* a bf16 GEMM's TFLOP/s (``--gemm`` square, ``2 n^3`` flops).

On a CPU (``--device cpu``, for the suite's dry run) the same numbers are taken with wall clocks on
small sizes; they only prove the script.

    python benchmarks/gpu_env.py --json env.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001 - absent or broken: recorded as None
        return None


def _cmd(args, timeout=20):
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def timed(fn, device, repeat, warmup=2):
    """Median seconds of ``fn`` over ``repeat`` calls after ``warmup`` untimed ones (CUDA events on
    a GPU, wall clock on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def ceilings(device, copy_mib, gemm, repeat):
    n = copy_mib * 2 ** 20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sec = timed(lambda: dst.copy_(src), device, repeat)
    copy = {"bytes": 2 * n * 4, "median_s": sec, "gbs": 2 * n * 4 / sec / 1e9}
    del src, dst
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(gemm, gemm, device=device, dtype=dtype)
    b = torch.randn(gemm, gemm, device=device, dtype=dtype)
    sec = timed(lambda: a @ b, device, repeat)
    mm = {"n": gemm, "dtype": str(dtype).replace("torch.", ""), "median_s": sec, "tflops": 2 * gemm ** 3 / sec / 1e12}
    return {"copy_d2d": copy, "gemm": mm}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--copy-mib", type=int, default=None, help="copy size (default 2048 on a GPU, 64 on a CPU)")
    ap.add_argument("--gemm", type=int, default=None, help="GEMM size n (default 8192 on a GPU, 512 on a CPU)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", default=None, help="write the record here (it is also printed)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "triton": _version("triton"), "numpy": _version("numpy"),
           "nvtx_package": _version("nvtx"), "ninja": shutil.which("ninja"), "nvcc": shutil.which("nvcc"),
           "nsys": shutil.which("nsys"), "ncu": shutil.which("ncu"), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "device_type": device.type,
           "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST")}
    if gpu:
        p = torch.cuda.get_device_properties(device)
        doc.update({"device": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                    "memory_gib": p.total_memory / 2 ** 30, "cudnn": torch.backends.cudnn.version(),
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                    "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                    "float32_matmul_precision": torch.get_float32_matmul_precision(),
                    "driver": _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                    "clocks": _cmd(["nvidia-smi", "-q", "-d", "CLOCK"])})
    else:
        doc["device"] = platform.processor() or platform.machine()
    print(json.dumps({k: v for k, v in doc.items() if k != "clocks"}, indent=2), flush=True)
    if args.json:  # the versions are worth having even if the measurement below is cut
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    doc["ceilings"] = ceilings(device, args.copy_mib or (2048 if gpu else 64), args.gemm or (8192 if gpu else 512),
                               args.repeat if gpu else min(args.repeat, 5))
    c = doc["ceilings"]
    print(f"device-to-device copy: {c['copy_d2d']['gbs']:.0f} GB/s; {c['gemm']['dtype']} GEMM n={c['gemm']['n']}: "
          f"{c['gemm']['tflops']:.1f} TFLOP/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return doc


if __name__ == "__main__":
    main()
