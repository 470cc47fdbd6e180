"""Speed and memory of the attention-matching loss, per backend, on DataDAM step shapes.

Prints a table and writes JSON (device, versions, date, per-shape/per-provider medians, ratios).
Providers: the eager reference, ``torch.compile(reference)`` and every fused backend that runs on
the device. Times are medians over ``--repeat`` runs after warm-up; forward = the loss value
(synthetic side building its graph), fwd+bwd = loss + ``backward()``.

Memory: on CUDA, peak ``max_memory_allocated`` above the inputs; on CPU, the peak of the
process's resident set above the inputs, sampled every 0.5 ms by a thread (an approximation).

    python benchmarks/bench_loss.py                      # CPU: the 32x32 step shapes
    python benchmarks/bench_loss.py --shapes all --device cuda
    python benchmarks/bench_loss.py --user-step          # torch.compile(network + loss): fused op vs reference

``--user-step`` times a whole user step instead of the loss alone: a ConvNet-3 (InstanceNorm)
forward of the real batch (no_grad) and of the synthetic batch, the attention-matching loss and
``backward()`` to the synthetic images, under ``torch.compile`` with the fused op
(``attention_matching_loss``, traced as ``torch.ops.datadam_fast.*``) and with the reference
loss, plus both eagerly. The first (compiling) call is reported separately; the timed runs go
round-robin over the providers so that load from other processes is shared between them.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch

import datadam_fast
from datadam_fast.loss import reference
from datadam_fast.loss.backends import BACKEND_NAMES, DEVICE_TYPES, BackendUnavailable, get_backend

# name: (K, Br, Bs, [(C, H, W), ...] matched layers, D embedding)
SHAPES = {
    # ConvNet-3 (width 128) on 32x32, CIFAR-10 step: 10 classes, 64 real / 10 synthetic per class
    "convnet3-32px-K10": (10, 64, 10, [(128, 32, 32), (128, 16, 16)], 2048),
    # the same at IPC 50
    "convnet3-32px-K10-ipc50": (10, 64, 50, [(128, 32, 32), (128, 16, 16)], 2048),
    # CIFAR-100 at IPC 10
    "convnet3-32px-K100": (100, 64, 10, [(128, 32, 32), (128, 16, 16)], 2048),
    # ConvNetD4 on 64x64 (TinyImageNet, 200 classes) at IPC 10
    "convnetd4-64px-K200": (200, 64, 10, [(128, 64, 64), (128, 32, 32), (128, 16, 16)], 2048),
    # ImageNet-1K 64x64 at IPC 10; 16 real per class so one step fits an 80 GB GPU (stream for more)
    "convnetd4-64px-K1000-Br16": (1000, 16, 10, [(128, 64, 64), (128, 32, 32), (128, 16, 16)], 2048),
    # the same 64x64 depth-4 layer shapes with per-class counts cut to fit a 24 GB CPU machine
    "convnetd4-64px-K200-Br4-Bs1": (200, 4, 1, [(128, 64, 64), (128, 32, 32), (128, 16, 16)], 2048),
    "convnetd4-64px-K1000-Br1-Bs1": (1000, 1, 1, [(128, 64, 64), (128, 32, 32), (128, 16, 16)], 2048),
    # small shape for smoke tests
    "tiny": (3, 4, 2, [(8, 9, 7), (8, 5, 3)], 16),
}
CPU_DEFAULT = ["convnet3-32px-K10", "convnetd4-64px-K200-Br4-Bs1", "convnetd4-64px-K1000-Br1-Bs1"]
GPU_DEFAULT = ["convnet3-32px-K10", "convnet3-32px-K10-ipc50", "convnet3-32px-K100", "convnetd4-64px-K200",
               "convnetd4-64px-K1000-Br16"]
PEAK_BW_GBS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H200": 4800.0, "A100": 2039.0}


def peak_bandwidth(name: str):
    for k, v in PEAK_BW_GBS.items():
        if all(part in name for part in k.split()):
            return v
    if "H100" in name:
        return 3350.0
    return None


class RSSPeak:
    """Peak resident-set growth of this process while the context is open (CPU memory)."""

    def __init__(self, interval=0.0005):
        self.interval = interval
        self.peak = 0

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base = self.rss()
        self.peak = self.base
        self._stop = False

        def run():
            while not self._stop:
                self.peak = max(self.peak, self.rss())
                time.sleep(self.interval)
        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self.rss())
        self.delta = self.peak - self.base


def make_inputs(shape, device, dtype, seed=0):
    """Random inputs drawn on ``device`` itself (a host generator would spend minutes drawing the
    GPU shapes' tens of GB and then copy them over)."""
    K, Br, Bs, layers, D = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def t(*s):  # post-ReLU-like features: half zeros
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).relu_().to(dtype)
    real = [t(K * Br, *l) for l in layers]
    syn = [t(K * Bs, *l).requires_grad_() for l in layers]
    re = torch.randn(K * Br, D, generator=g, device=device).to(dtype)
    se = torch.randn(K * Bs, D, generator=g, device=device).to(dtype).requires_grad_()
    return real, syn, re, se


def bytes_moved(real, syn, re, se, with_backward: bool) -> int:
    """Minimum HBM/DRAM traffic of the op: read every input once (+ read syn and write its grad)."""
    n = sum(x.numel() * x.element_size() for x in real + syn + [re, se])
    if with_backward:
        n += 2 * sum(x.numel() * x.element_size() for x in syn + [se])
    return n


def _ratios(rows: dict) -> None:
    """Speed-ups of every row of one shape against its eager and compiled-reference rows (filled in
    as those arrive: compile is timed last, after the fused rows, so a cut run keeps those)."""
    for r in rows.values():
        if "eager" in rows:
            r["speedup_vs_eager_fwd_bwd"] = rows["eager"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        if "compile" in rows:
            r["speedup_vs_compile_fwd_bwd"] = rows["compile"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["speedup_vs_compile_fwd"] = rows["compile"]["forward_ms"] / r["forward_ms"]


def compiled_reference():
    """``torch.compile`` of the reference with static shapes: built afresh for every shape, so that
    each shape is timed against a graph specialised to it (with one compiled function reused, the
    second shape would already get a dynamic-shape graph)."""
    torch._dynamo.reset()
    return torch.compile(reference.attention_matching_loss, dynamic=False)


def providers(device, names=None, with_compile=True):
    """name -> loss function; ``"compile"`` maps to :func:`compiled_reference` (called per shape)."""
    out = {"eager": lambda *a, **k: reference.attention_matching_loss(*a, **k)}
    for n in BACKEND_NAMES:
        if n == "reference" or device.type not in DEVICE_TYPES.get(n, (device.type,)):
            continue  # never load one device's extension only to skip it
        if n == "triton" and device.type == "cpu":
            continue  # the Triton interpreter is a correctness tool, not a CPU backend
        if names and n not in names:
            continue
        try:
            b = get_backend(n)
        except BackendUnavailable as e:
            print(f"[skip] backend {n}: {str(e).splitlines()[0][:160]}", file=sys.stderr)
            continue
        if not b.supports(device):
            continue
        out[n] = (lambda name: (lambda *a, **k: datadam_fast.attention_matching_loss(*a, backend=name, **k)))(n)
    if with_compile:  # last: its compile takes the longest, and a cut run then keeps the fused rows
        out["compile"] = compiled_reference
    if names:
        out = {k: v for k, v in out.items() if k in names}
    return out


def _call_once(fn, args, K, device):
    real, syn, re, se = args
    fn(real, syn, re, se, num_classes=K, power=4.0).backward()
    for s in syn + [se]:
        s.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(fn, args, K, device, repeat, warmup, backward):
    real, syn, re, se = args
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run():
        loss = fn(real, syn, re, se, num_classes=K, power=4.0)
        if backward:
            loss.backward()
            for s in syn + [se]:
                s.grad = None
        return loss

    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        sync()
        mem = torch.cuda.max_memory_allocated() - base
    else:
        with RSSPeak() as m:
            run()
        mem = m.delta
    return statistics.median(times), mem


USER_STEP = {"K": 10, "Br": 16, "Bs": 10, "width": 128, "depth": 3, "im": 32}


def bench_user_step(device, repeat, warmup, K, Br, Bs, width, depth, im):
    from datadam_fast.models.networks import ConvNet
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = ConvNet(3, K, width=width, depth=depth, norm="instancenorm", im_size=(im, im)).to(device)
    for p in net.parameters():
        p.requires_grad_(False)
    real = torch.randn(K * Br, 3, im, im, generator=g).to(device)
    syn = torch.randn(K * Bs, 3, im, im, generator=g).to(device).requires_grad_()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def make(loss_fn):
        def step(real_x, syn_x):
            with torch.no_grad():
                rf, re = net.features_and_embedding(real_x)
            sf, se = net.features_and_embedding(syn_x)
            return loss_fn(rf, sf, re, se, num_classes=K, power=4.0)
        return step

    fused = make(datadam_fast.attention_matching_loss)
    ref = make(reference.attention_matching_loss)
    provs = {"compile(step, fused op)": torch.compile(fused, fullgraph=True),
             "compile(step, reference)": torch.compile(ref, fullgraph=True),
             "eager(step, fused op)": fused, "eager(step, reference)": ref}
    def run(fn):
        loss = fn(real, syn)
        loss.backward()
        syn.grad = None
        return loss

    first = {}
    for name, fn in provs.items():
        t0 = time.perf_counter()
        run(fn)
        sync()
        first[name] = time.perf_counter() - t0
        for _ in range(warmup):
            run(fn)
    # round-robin: on a shared machine, load from other processes then hits every provider alike
    times = {name: [] for name in provs}
    for _ in range(repeat):
        for name, fn in provs.items():
            sync()
            t0 = time.perf_counter()
            run(fn)
            sync()
            times[name].append(time.perf_counter() - t0)
    rows = {}
    for name in provs:
        ts = times[name]
        rows[name] = {"fwd_bwd_ms": statistics.median(ts) * 1e3, "first_call_s": first[name],
                      "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3}
        print(f"{name:28s} {rows[name]['fwd_bwd_ms']:10.1f} ms (min {rows[name]['min_ms']:.1f}, "
              f"max {rows[name]['max_ms']:.1f}; first call {first[name]:.1f} s)", flush=True)
    base = rows["compile(step, reference)"]["fwd_bwd_ms"]
    for r in rows.values():
        r["speedup_vs_compile_reference"] = base / r["fwd_bwd_ms"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="*", default=None, help=f"names from {list(SHAPES)} or 'all'")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--providers", nargs="*", default=None, help="subset of eager, compile, cpu, cuda, triton")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for ~15 s per shape)")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--user-step", action="store_true",
                    help="time torch.compile(network + loss + backward) with the fused op vs the reference loss")
    for k, v in USER_STEP.items():
        ap.add_argument(f"--step-{k.lower()}", type=int, default=v, help=f"--user-step: {k} (default {v})")
    ap.add_argument("--json", default=None, help="output JSON path (default benchmarks/results/bench_loss_<device>_<date>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape_names = args.shapes or (GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT)
    if shape_names == ["all"]:
        shape_names = [s for s in SHAPES if s != "tiny" and (device.type == "cuda" or s in CPU_DEFAULT)]
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    peak_bw = peak_bandwidth(dev_name) if device.type == "cuda" else None
    if args.user_step:
        return _main_user_step(args, argv, device)
    provs = providers(device, args.providers, with_compile=not args.no_compile)
    results = []
    out = {**_run_meta(device, dev_name, args, argv), "dtype": args.dtype, "peak_bandwidth_gbs": peak_bw,
           "complete": False, "results": results}
    path = _results_path(args.json, f"bench_loss_{device.type}")
    print(f"device: {dev_name} | torch {torch.__version__} | threads {torch.get_num_threads()} | dtype {args.dtype}")
    hdr = f"{'shape':28s} {'provider':9s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'peak MB':>9s} {'x eager':>8s} {'x compile':>9s}"
    if peak_bw:
        hdr += f" {'GB/s':>7s} {'%peak':>6s}"
    print(hdr, flush=True)
    for sname in shape_names:
        shape = SHAPES[sname]
        try:
            inputs = make_inputs(shape, device, dtype)
        except (RuntimeError, MemoryError) as e:
            print(f"{sname:28s} [skipped: inputs do not fit: {str(e).splitlines()[0][:80]}]", flush=True)
            results.append({"shape": sname, "status": "skipped", "reason": str(e).splitlines()[0][:300]})
            _write_json(out, path)
            continue
        rows = {}
        for pname, fn in provs.items():
            extra = {}
            try:
                if pname == "compile":
                    t0 = time.perf_counter()
                    fn = fn()
                    _call_once(fn, inputs, shape[0], device)  # compiles the forward and the backward
                    extra["compile_seconds"] = time.perf_counter() - t0
                fwd, _ = bench_one(fn, inputs, shape[0], device, args.repeat, args.warmup, backward=False)
                full, mem = bench_one(fn, inputs, shape[0], device, args.repeat, args.warmup, backward=True)
            except (RuntimeError, MemoryError) as e:
                print(f"{sname:28s} {pname:9s} [failed: {str(e).splitlines()[0][:100]}]", flush=True)
                results.append({"shape": sname, "provider": pname, "status": "failed",
                                "reason": str(e).splitlines()[0][:300]})
                _write_json(out, path)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            r = {"shape": sname, "K": shape[0], "Br": shape[1], "Bs": shape[2], "layers": shape[3], "D": shape[4],
                 "provider": pname, "status": "ok", "forward_ms": fwd * 1e3, "fwd_bwd_ms": full * 1e3,
                 "peak_extra_mb": mem / 2 ** 20, **extra}
            moved = bytes_moved(*inputs, with_backward=True)
            r["bytes_moved_fwd_bwd"] = moved
            r["achieved_gbs_fwd_bwd"] = moved / (r["fwd_bwd_ms"] / 1e3) / 1e9
            if peak_bw:
                r["fraction_of_peak_bw"] = r["achieved_gbs_fwd_bwd"] / peak_bw
            rows[pname] = r
            results.append(r)
            print(f"[{sname}] {pname}: fwd {r['forward_ms']:.3f} ms, fwd+bwd {r['fwd_bwd_ms']:.3f} ms",
                  file=sys.stderr, flush=True)
            _ratios(rows)
            _write_json(out, path)  # after every row: a run cut midway keeps what it measured
        for pname, r in rows.items():
            line = (f"{sname:28s} {pname:9s} {r['forward_ms']:9.2f} {r['fwd_bwd_ms']:11.2f} {r['peak_extra_mb']:9.1f} "
                    f"{r.get('speedup_vs_eager_fwd_bwd', float('nan')):8.2f} {r.get('speedup_vs_compile_fwd_bwd', float('nan')):9.2f}")
            if peak_bw:
                line += f" {r['achieved_gbs_fwd_bwd']:7.0f} {100 * r['fraction_of_peak_bw']:5.1f}%"
            print(line, flush=True)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["complete"] = True
    out["load_average_end"] = os.getloadavg()
    _write_json(out, path)
    print(f"wrote {path}")
    return out


def _run_meta(device, dev_name, args, argv) -> dict:
    """Machine, versions, date and command line: what every results file records."""
    return {"device": dev_name, "device_type": device.type, "cpu": _cpu_model(), "torch": torch.__version__,
            "triton": _version("triton"), "datadam_fast": datadam_fast.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "repeat": args.repeat,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/bench_loss.py"] + (argv or sys.argv[1:]))}


def _results_path(path, stem: str) -> str:
    return path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"{stem}_{datetime.date.today().isoformat()}.json")


def _write_json(out: dict, path: str) -> None:
    """Atomic rewrite (a reader, or a run killed mid-write, never sees half a file)."""
    from datadam_fast._io import atomic_write_text
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2))


def _write_results(out: dict, path, stem: str) -> dict:
    path = _results_path(path, stem)
    _write_json(out, path)
    print(f"wrote {path}")
    return out


def _main_user_step(args, argv, device):
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    cfg = {k: getattr(args, f"step_{k.lower()}") for k in USER_STEP}
    print(f"device: {dev_name} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"user step: ConvNet-{cfg['depth']} width {cfg['width']} {cfg['im']}px, K={cfg['K']}, "
          f"Br={cfg['Br']}, Bs={cfg['Bs']}, fp32, p=4, fwd+bwd medians of {args.repeat}")
    load_before = os.getloadavg()
    rows = bench_user_step(device, args.repeat, args.warmup, **cfg)
    out = {"benchmark": "user_step", **_run_meta(device, dev_name, args, argv),
           "load_average_before_after": [load_before, os.getloadavg()],
           "resolved_backend": datadam_fast.resolved_backend(device), "config": cfg, "results": rows}
    return _write_results(out, args.json, f"bench_user_step_{device.type}")


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a time limit's SIGINT: every finished row is already on disk
        print("interrupted: the JSON holds the rows finished so far", file=sys.stderr, flush=True)
        sys.exit(130)
