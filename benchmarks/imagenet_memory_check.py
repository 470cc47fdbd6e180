"""ImageNet-1K-shaped memory check: 1000 classes at 64 px under a memory budget.

Writes a random data set in the official Downsampled-ImageNet ``.npz`` format (1000 classes,
``--per-class`` images each), then runs ``datadam-fast distill --dataset imagenet64`` (ConvNetD4,
paper preset) in a subprocess per configuration while a poller samples the child's resident set
every 20 ms, and records: the planner's chunks and predicted peak, the polled peak RSS, the
peak the run reports itself, seconds per iteration. Optionally compares the images of a chunked
run with an unchunked one (``--compare``: one chunk per side, where it fits in RAM).

    python benchmarks/imagenet_memory_check.py --ipcs 1 4 --budget 8 --compare 1 \\
        --json benchmarks/results/imagenet_memory_check_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def write_imagenet64(root: Path, per_class: int, seed: int = 0) -> None:
    base = root / "imagenet64"
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(1, 1001), per_class)
    rng.shuffle(labels)
    for i, part in enumerate(np.array_split(labels, 10), start=1):
        data = rng.integers(0, 256, (part.size, 3 * 64 * 64), dtype=np.uint8)
        np.savez(base / f"train_data_batch_{i}.npz", data=data, labels=part.tolist())
    val = np.arange(1, 1001)
    np.savez(base / "val_data.npz", data=rng.integers(0, 256, (val.size, 3 * 64 * 64), dtype=np.uint8),
             labels=val.tolist())


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_distill(args, root: Path, out: Path, ipc: int, budget: float, extra=()) -> dict:
    cmd = [sys.executable, "-m", "datadam_fast", "distill", "--dataset", "imagenet64", "--data-root", str(root),
           "--ipc", str(ipc), "--batch-real", str(args.batch_real), "--iterations", str(args.iterations),
           "--eval-every", "-1", "--log-every", "1", "--no-progress", "--out", str(out), "--overwrite",
           "--memory-budget", str(budget), "--device", args.device, *extra]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def poll():
        while proc.poll() is None:
            peak[0] = max(peak[0], _rss_kb(proc.pid))
            time.sleep(0.02)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"distill failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    plan = next(x["plan"] for x in lines if x.get("event") == "plan")
    steps = [x for x in lines if "sec_per_it" in x and "loss" in x]
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"ipc": ipc, "budget_gb": budget, "extra_flags": list(extra), "wall_s": time.time() - t0,
            "polled_peak_rss_gb": peak[0] / 2 ** 20, "reported_peak_gb": summary["peak_memory_mb"] / 1024,
            "predicted_peak_gb": plan["predicted_peak"] / 2 ** 30, "fixed_gb": plan["fixed"] / 2 ** 30,
            "real_mb_per_image": plan["real_per_image"] / 2 ** 20, "syn_mb_per_image": plan["syn_per_image"] / 2 ** 20,
            "real_chunk": plan["real_chunk"], "syn_chunk": plan["syn_chunk"],
            "real_chunks": plan["real_chunks"], "syn_chunks": plan["syn_chunks"],
            "sec_per_it": [x["sec_per_it"] for x in steps], "loss": [x["loss"] for x in steps],
            "stderr_tail": stderr.strip().splitlines()[-3:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ipcs", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--budget", type=float, default=8.0, help="GB")
    ap.add_argument("--batch-real", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=5, help="training images per class in the random set")
    ap.add_argument("--compare", type=int, nargs="*", default=[],
                    help="IPCs to also run unchunked (--real-chunk/--syn-chunk 1000) and compare images with")
    ap.add_argument("--unchunked-budget", type=float, default=22.0, help="GB for the unchunked runs")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--device", default="auto", help="distill --device (on cuda the budget and the reported peak "
                                                     "are device memory; the polled RSS is the host's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from datadam_fast.devices import device_line
    args.device, _line = device_line(args.device)  # auto: cuda when available, else cpu
    print(_line, file=sys.stderr, flush=True)
    import torch
    work = Path(args.work or tempfile.mkdtemp(prefix="in64check-"))
    if not (work / "imagenet64" / "val_data.npz").exists():
        write_imagenet64(work, args.per_class)
    rows = []
    for ipc in args.ipcs:
        r = run_distill(args, work, work / f"ipc{ipc}", ipc, args.budget)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "stderr_tail"}), flush=True)
        if ipc in args.compare:
            u = run_distill(args, work, work / f"ipc{ipc}_one", ipc, args.unchunked_budget,
                            ("--real-chunk", "1000", "--syn-chunk", "1000"))
            a = torch.load(work / f"ipc{ipc}" / "synthetic.pt", weights_only=True)["images"]
            b = torch.load(work / f"ipc{ipc}_one" / "synthetic.pt", weights_only=True)["images"]
            u["max_abs_diff_vs_chunked"] = float((a - b).abs().max())
            u["max_abs_value"] = float(b.abs().max())
            # torch.allclose's test: |a - b| <= atol + rtol * |b|, here with atol = rtol = 1e-5
            u["allclose_1e-5"] = bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5))
            rows.append(u)
            print(json.dumps({k: v for k, v in u.items() if k != "stderr_tail"}), flush=True)
    if args.json:
        meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.machine(),
                "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "command": " ".join(sys.argv), "per_class": args.per_class, "batch_real": args.batch_real,
                "iterations": args.iterations, "model": "ConvNetD4 (paper preset, 64 px)", "device": args.device,
                "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
        Path(args.json).write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
