"""One distillation iteration, timed three ways in one run on the same data and machine.

Rows:

* ``official``: a re-implementation of the official ``main_DataDAM.py`` iteration's structure
  (``official_iteration.py``: fresh BN ConvNet, per-class sampling and 2K seeded DSA calls, ReLU
  hooks with clones, loss assembled on the CPU, one backward, SGD step);
* ``package:<variant>``: the package's ``Distiller.step()`` with a preset plus ``key=value``
  ``DistillConfig`` overrides (``--variants "paper" "paper,compile=1,real_dtype=bf16"``); an
  override naming a field ``DistillConfig`` does not have gives a ``skipped`` row, not a crash;
* ``limit``: the convolutions alone of the paper-preset network on the same shapes: the real
  side's forward convs (no_grad, K*batch_real images) and the synthetic side's forward convs plus
  their input-gradient convs (weights frozen), each conv as one ``conv2d`` /
  ``aten.convolution_backward`` call on random tensors of the right shapes and memory format.

Rows are interleaved (A B C A B C ...) so that a slow drift of the machine's load hits every row
alike. Per row: median and p20/p80 ms per iteration over ``--iterations`` after ``--warmup``, the
first iteration's time (compile cost shows there), per-phase medians for package rows
(``Distiller.step(timings)``), speed-ups vs ``official`` and vs ``package:paper``, and for package
rows ``real_forward / real convs alone`` (the goal: within 1.3x; the package's real_forward
phase includes reducing the real features into class means).

    python benchmarks/bench_iteration.py --data-root ../shared/datasets --json out.json
    taskset -c 0 python benchmarks/bench_iteration.py --data-root ../shared/datasets --threads 1
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_iteration import OfficialIteration  # noqa: E402

from datadam_fast.distill import DistillConfig, Distiller  # noqa: E402
from datadam_fast.errors import DatadamError  # noqa: E402

DEFAULT_VARIANTS = ["official", "paper", "paper,compile=1", "paper,compile=1,real_dtype=bf16", "official,compile=1"]
GOAL_RATIO = 1.3          # the real forward within 1.3x of its convolutions alone
BASE_PRESET = "paper"     # the "vs paper" column compares with this variant, no overrides
PERCENTILES = (20, 80)
PHASES = ("sample", "load", "augment", "real_forward", "syn_forward", "loss", "backward", "update")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# ------------------------------------------------------------------------------------ variants
def _convert(text: str, annotation) -> object:
    """A command-line value for a ``DistillConfig`` field, typed by the field's annotation (a
    string under ``from __future__ import annotations``); untyped: int, float, bool words, str."""
    v = text.strip()
    ann = str(annotation)
    if v.lower() in ("none", "null"):
        return None
    if "bool" in ann:
        if v.lower() in _TRUE:
            return True
        if v.lower() in _FALSE:
            return False
        raise ValueError(f"{v!r} is not a boolean (use one of {_TRUE + _FALSE})")
    if "float" in ann:
        return float(v)
    if "int" in ann:
        return int(v)
    if "str" in ann:
        return v
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    if v.lower() in _TRUE + _FALSE:
        return v.lower() in _TRUE
    return v


def parse_variant(spec: str) -> Tuple[Dict[str, object], List[str]]:
    """``"paper,compile=1,real_dtype=bf16"`` -> (DistillConfig overrides, unknown field names).

    A leading item without ``=`` is the preset. Values of fields that ``DistillConfig`` lacks are
    kept as strings (they are only reported)."""
    known = {f.name: f.type for f in dataclasses.fields(DistillConfig)}
    kw: Dict[str, object] = {}
    missing: List[str] = []
    for i, item in enumerate(p.strip() for p in spec.split(",")):
        if not item:
            continue
        if "=" not in item:
            if i != 0:
                raise ValueError(f"variant {spec!r}: {item!r} must be key=value (only the first item may be a preset)")
            kw["preset"] = item
            continue
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in known:
            missing.append(key)
            kw[key] = value
            continue
        kw[key] = _convert(value, known[key])
    return kw, missing


def shaped_dataset(shape: str, per_class: int, seed: int = 0):
    """Random uint8 images shaped like a real dataset (``"K,C,S"``), for timing only."""
    from datadam_fast.data import ImageDataset
    try:
        K, C, S = (int(v) for v in shape.split(","))
    except ValueError:
        raise SystemExit(f"--shape must be K,C,S (classes, channels, pixels), got {shape!r}")
    if min(K, C, S) < 1:
        raise SystemExit(f"--shape values must be >= 1, got {shape!r}")
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (K * per_class, C, S, S), dtype=torch.uint8, generator=gen)
    labels = torch.arange(K).repeat_interleave(per_class)
    return ImageDataset(f"random{K}x{C}x{S}", images, labels, [str(k) for k in range(K)], [0.5] * C, [0.25] * C)


# ------------------------------------------------------------------------------------ rows
def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Row:
    kind = ""

    def __init__(self, name: str):
        self.name = name
        self.status = "ok"
        self.reason: Optional[str] = None
        self.first_ms: Optional[float] = None
        self.ms: List[float] = []
        self.phases: List[Dict[str, float]] = []
        self.parts: List[Dict[str, float]] = []
        self.info: Dict[str, object] = {}
        # what fixes the convolutions' shapes: the real-forward / convs-alone ratio needs equal keys
        self.conv_key: Optional[Tuple] = None
        self.first_loss: Optional[float] = None
        self.peak_bytes: Optional[int] = None  # CUDA: max_memory_allocated over the row's iterations
        self.phase_ms: List[float] = []        # iterations timed with per-phase syncs (GPU blocks)

    @property
    def active(self) -> bool:
        return self.status == "ok"

    def once(self, phases: bool = True) -> Tuple[float, Optional[Dict[str, float]]]:
        """Seconds of one iteration and an optional per-part breakdown (seconds)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class OfficialRow(Row):
    kind = "official"

    def __init__(self, train_set, args, device):
        super().__init__("official")
        self.device = device
        self.it = OfficialIteration(train_set, ipc=args.ipc, batch_real=args.batch_real, width=args.width,
                                    device=device, seed=args.seed)
        self.info = {"model": self.it.model, "depth": self.it.depth, "batch_real": self.it.batch_real,
                     "layout": "NCHW", "dsa_calls_per_iteration": 2 * self.it.K}

    def once(self, phases: bool = True):
        _sync(self.device)
        t = time.perf_counter()
        loss = self.it.step()
        _sync(self.device)
        if self.first_loss is None:
            self.first_loss = float(loss)
            self.info["first_iteration_loss"] = self.first_loss
        return time.perf_counter() - t, None


class PackageRow(Row):
    kind = "package"

    def __init__(self, spec: str, train_set, args, device):
        super().__init__(f"package:{spec}")
        self.spec = spec
        self.device = device
        self.d: Optional[Distiller] = None
        kw, missing = parse_variant(spec)
        self.overrides = kw
        if missing:
            self.status = "skipped"
            self.reason = "; ".join(f"DistillConfig has no field {m}" for m in missing)
            return
        base = dict(dataset=args.dataset, data_root=args.data_root, ipc=args.ipc, batch_real=args.batch_real,
                    width=args.width, device=args.device, seed=args.seed, eval_every=-1, checkpoint_every=0,
                    iterations=args.warmup + args.iterations)
        base.update(kw)
        try:
            self.d = Distiller(DistillConfig(**base), None, progress=False, train_set=train_set)
        except (DatadamError, TypeError, ValueError) as e:  # a bad value of a new option must not sink the run
            self.status = "failed"
            self.reason = f"{type(e).__name__}: {e}"
            return
        c = self.d.cfg
        self.info = {"config": {k: v for k, v in dataclasses.asdict(c).items() if k != "data_opts"},
                     "plan": self.d.plan.summary(), "batch_real": self.d.batch_real}
        self.conv_key = (c.model, c.width, c.depth, c.channels_last, self.d.batch_real, c.ipc)

    def once(self, phases: bool = True):
        """One step; with ``phases`` the step syncs the device at each phase boundary and returns
        the per-phase seconds (free on a CPU, on a GPU it costs the CPU/GPU overlap: headline
        GPU figures are timed with ``phases=False``)."""
        timings: Optional[Dict[str, float]] = {} if phases else None
        _sync(self.device)
        t = time.perf_counter()
        out = self.d.step(timings)
        _sync(self.device)
        sec = time.perf_counter() - t
        if self.first_loss is None:
            self.first_loss = float(out["loss"])  # a numerical cross-check between rows (same seed)
        return sec, timings

    def record(self) -> None:
        """What really ran: a compile that failed falls back to eager, a fused real side that failed
        to launch falls back too; the row says so instead of keeping its label."""
        d = self.d
        if d is None:
            return
        self.info["compiled"] = d.passes is not None
        self.info["compile_seconds"] = d.compile_seconds
        self.info["fused_real"] = d.fused_real or None
        self.info["predicted_peak_bytes"] = d.plan.predicted_peak
        self.info["first_iteration_loss"] = self.first_loss

    def close(self):
        self.record()
        if self.d is not None:
            self.d.close()
            self.d = None


class ConvLimitRow(Row):
    """The paper-preset network's convolutions of one iteration, alone."""
    kind = "limit"

    def __init__(self, train_set, args, device):
        super().__init__("limit:convs")
        from datadam_fast.models.networks import get_network
        ds = train_set
        cfg = DistillConfig(dataset=args.dataset, ipc=args.ipc, batch_real=args.batch_real, width=args.width,
                            preset=BASE_PRESET).resolved(ds.image_size)
        K = ds.num_classes
        B = min(cfg.batch_real, min(ds.counts()))
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        net = get_network(cfg.model, ds.channels, K, tuple(ds.image_size), width=cfg.width, depth=cfg.depth,
                          norm=cfg.norm, taps=cfg.taps).to(device).to(memory_format=fmt)
        net.requires_grad_(False)
        self.device = device
        self.convs = []   # (module, input shape without batch, output shape without batch)
        hooks = [m.register_forward_hook(lambda m, i, o: self.convs.append((m, tuple(i[0].shape[1:]),
                                                                            tuple(o.shape[1:]))))
                 for m in net.modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            net.features_and_embedding(torch.zeros(1, ds.channels, *ds.image_size, device=device)
                                       .contiguous(memory_format=fmt))
        for h in hooks:
            h.remove()
        gen = torch.Generator().manual_seed(args.seed)

        def rand(n, shape):
            return torch.randn(n, *shape, generator=gen).to(device).contiguous(memory_format=fmt)

        self.real_in = [rand(K * B, i) for _, i, _ in self.convs]
        self.syn_in = [rand(K * cfg.ipc, i) for _, i, _ in self.convs]
        self.syn_gout = [rand(K * cfg.ipc, o) for _, _, o in self.convs]
        self.info = {"model": cfg.model, "norm": cfg.norm, "depth": cfg.depth, "width": cfg.width,
                     "memory_format": "channels_last" if cfg.channels_last else "NCHW", "batch_real": B,
                     "convs": [{"in": list(i), "out": list(o), "stride": list(m.stride), "padding": list(m.padding)}
                               for m, i, o in self.convs],
                     "real_images": K * B, "syn_images": K * cfg.ipc}
        self.conv_key = (cfg.model, cfg.width, cfg.depth, cfg.channels_last, B, cfg.ipc)

    def _conv(self, m, x):
        return F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)

    def once(self, phases: bool = True):
        dev = self.device
        _sync(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            for (m, _, _), x in zip(self.convs, self.real_in):
                y = self._conv(m, x)
                del y
        _sync(dev)
        t1 = time.perf_counter()
        with torch.no_grad():
            for (m, _, _), x in zip(self.convs, self.syn_in):
                y = self._conv(m, x)
                del y
        _sync(dev)
        t2 = time.perf_counter()
        # what autograd runs for a conv whose weight and bias are frozen: the input gradient only
        for (m, _, _), x, g in zip(self.convs, self.syn_in, self.syn_gout):
            gi = torch.ops.aten.convolution_backward(g, x, m.weight, None, list(m.stride), list(m.padding),
                                                     list(m.dilation), False, [0, 0], m.groups,
                                                     [True, False, False])[0]
            del gi
        _sync(dev)
        t3 = time.perf_counter()
        return t3 - t0, {"real_forward_convs": t1 - t0, "syn_forward_convs": t2 - t1,
                         "syn_backward_convs": t3 - t2, "syn_convs": t3 - t1}


# ------------------------------------------------------------------------------------ stats
def _pct(xs: List[float], q: float) -> Optional[float]:
    return float(np.percentile(xs, q)) if xs else None


def _med(xs: List[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


def summarize(rows: List[Row], base: str = BASE_PRESET) -> List[Dict]:
    """``base``: the variant of the "vs package before" column (``speedup_vs_paper``)."""
    by_name = {r.name: r for r in rows}
    official = _med(by_name["official"].ms) if "official" in by_name else None
    paper_row = by_name.get(f"package:{base}")
    paper = _med(paper_row.ms) if paper_row is not None else None
    limit = next((r for r in rows if r.kind == "limit" and r.parts), None)
    limit_real = _med([p["real_forward_convs"] for p in limit.parts]) * 1e3 if limit else None
    out = []
    for r in rows:
        med = _med(r.ms)
        rec = {"name": r.name, "kind": r.kind, "status": r.status, "reason": r.reason, "iterations": len(r.ms),
               "median_ms": med, "p20_ms": _pct(r.ms, PERCENTILES[0]), "p80_ms": _pct(r.ms, PERCENTILES[1]),
               "first_iteration_ms": r.first_ms, "all_ms": r.ms, "info": r.info,
               "peak_memory_bytes": r.peak_bytes}
        if med and r.kind != "limit":  # the limit is a bound, not an iteration: no speed-up
            rec["speedup_vs_official"] = official / med if official else None
            rec["speedup_vs_paper"] = paper / med if paper else None
        if r.phases:
            keys = sorted({k for p in r.phases for k in p}, key=lambda k: (PHASES.index(k) if k in PHASES else 99, k))
            rec["phases_median_ms"] = {k: _med([1e3 * p.get(k, 0.0) for p in r.phases]) for k in keys}
            totals = r.phase_ms or r.ms  # the iterations the phases were measured in
            rec["unaccounted_median_ms"] = _med([m - 1e3 * sum(p.values()) for m, p in zip(totals, r.phases)])
            if r.phase_ms:
                rec["phase_timed_median_ms"] = _med(r.phase_ms)
            rf = rec["phases_median_ms"].get("real_forward")
            same = limit is not None and limit.conv_key == r.conv_key
            rec["real_forward_over_real_convs"] = rf / limit_real if (rf and limit_real and same) else None
            if limit is not None and not same:
                rec["real_forward_over_real_convs_note"] = "not computed: its convolutions differ from the limit row's"
        if r.parts:
            keys = list(r.parts[0])
            rec["parts_median_ms"] = {k: _med([1e3 * p[k] for p in r.parts]) for k in keys}
        out.append(rec)
    return out


def _f(x, fmt="{:.1f}"):
    return "" if x is None else fmt.format(x)


def markdown(summary: List[Dict]) -> str:
    lines = ["| row | median ms/it | p20 | p80 | first it ms | vs official | vs base | note |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary:
        if s["status"] != "ok":
            lines.append(f"| {s['name']} | | | | | | | {s['status']}: {s['reason']} |")
            continue
        note = ""
        if s["kind"] == "limit" and s.get("parts_median_ms"):
            p = s["parts_median_ms"]
            note = (f"real fwd convs {p['real_forward_convs']:.1f} + syn convs {p['syn_convs']:.1f} "
                    f"(fwd {p['syn_forward_convs']:.1f}, input-grad {p['syn_backward_convs']:.1f})")
        info = s.get("info") or {}
        if s["kind"] == "package":
            bits = [("compiled" + (f" in {info['compile_seconds']:.0f} s" if info.get("compile_seconds") else ""))
                    if info.get("compiled") else "eager",
                    f"fused real side: {info.get('fused_real') or 'off'}"]
            if s.get("peak_memory_bytes"):
                bits.append(f"peak {s['peak_memory_bytes'] / 2 ** 30:.2f} GiB (planned "
                            f"{(info.get('predicted_peak_bytes') or 0) / 2 ** 30:.2f})")
            if info.get("first_iteration_loss") is not None:
                bits.append(f"first loss {info['first_iteration_loss']:.6g}")
            note = "; ".join(bits)
        elif s["kind"] == "official" and info.get("first_iteration_loss") is not None:
            note = f"first loss {info['first_iteration_loss']:.6g}"
        lines.append(f"| {s['name']} | {_f(s['median_ms'])} | {_f(s['p20_ms'])} | {_f(s['p80_ms'])} | "
                     f"{_f(s['first_iteration_ms'])} | {_f(s.get('speedup_vs_official'), '{:.2f}x')} | "
                     f"{_f(s.get('speedup_vs_paper'), '{:.2f}x')} | {note} |")
    pk = [s for s in summary if s.get("phases_median_ms")]
    if pk:
        keys = [k for k in PHASES if any(k in s["phases_median_ms"] for s in pk)]
        lines += ["", "| row | " + " | ".join(keys) + " | other | real fwd / real convs |",
                  "|---|" + "---|" * (len(keys) + 2)]
        for s in pk:
            ph = s["phases_median_ms"]
            lines.append(f"| {s['name']} | " + " | ".join(_f(ph.get(k)) for k in keys) +
                         f" | {_f(s['unaccounted_median_ms'])} | {_f(s['real_forward_over_real_convs'], '{:.2f}x')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ metadata
def machine() -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # not installed, or broken on this machine: just not recorded
        triton_version = None
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "cpu_model": cpu, "logical_cpus": os.cpu_count(), "affinity": affinity,
            "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable)] + sys.argv)}


def _loadavg() -> Optional[List[float]]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="mnist", help="mnist (default), or digits for quick smoke runs")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--shape", default=None, metavar="K,C,S",
                    help="time on random uint8 images of K classes, C channels, S x S pixels instead of --dataset "
                         "(speed only: e.g. 10,3,32 for CIFAR-10 shapes, 1000,3,64 for ImageNet-1K at 64 px); "
                         "each class holds max(batch_real, ipc) + 1 images")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                    help="package rows: 'PRESET[,key=value...]' with DistillConfig fields as keys")
    ap.add_argument("--base", default=BASE_PRESET,
                    help="the variant the 'vs package before' column divides by (e.g. "
                         "'paper,compile=0,real_epilogue=off': no compiled passes, no fused real side); it must be one of "
                         "--variants. The real-forward goal is always checked on the plain 'paper' row")
    ap.add_argument("--iterations", type=int, default=10, help="timed iterations per row")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations per row first (compile, caches)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-official", action="store_true", help="leave out the official re-implementation row")
    ap.add_argument("--no-limit", action="store_true", help="leave out the convolutions-alone row")
    ap.add_argument("--order", choices=("auto", "interleaved", "blocks"), default="auto",
                    help="interleaved: one iteration of every row per repetition (a drift of a shared machine's "
                         "load hits every row alike; the CPU default); blocks: each row's warm-up and iterations "
                         "in turn, its Distiller built when its block starts and closed after it (a row plans its "
                         "memory from what is really free, a cut run keeps every finished row, and the official "
                         "row's per-iteration empty_cache cannot slow the next row's timed iterations; the CUDA "
                         "default)")
    ap.add_argument("--phase-iterations", type=int, default=None,
                    help="extra iterations per package row timed with per-phase syncs; the headline iterations "
                         "then run without them (default: 3 on CUDA, where the syncs cost the CPU/GPU overlap; "
                         "0 on a CPU, where the phases come from the headline iterations at no cost)")
    ap.add_argument("--note", default=None, help="free text stored in the JSON (e.g. what else ran on the machine)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from datadam_fast.devices import device_line
    args.device, _line = device_line(args.device)  # auto: cuda when available, else cpu
    print(_line, file=sys.stderr, flush=True)
    if args.iterations < 1 or args.warmup < 0:
        ap.error("--iterations must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for spec in args.variants:  # a malformed spec is a usage error, before any work
        try:
            parse_variant(spec)
        except ValueError as e:
            ap.error(str(e))
    order = args.order if args.order != "auto" else ("blocks" if device.type == "cuda" else "interleaved")
    phase_its = args.phase_iterations if args.phase_iterations is not None else (3 if device.type == "cuda" else 0)
    args.order, args.phase_iterations = order, phase_its

    if args.shape:
        train_set = shaped_dataset(args.shape, per_class=max(args.batch_real, args.ipc) + 1, seed=args.seed)
        args.dataset = train_set.name
    else:
        from datadam_fast.data import load_dataset
        train_set = load_dataset(args.dataset, root=args.data_root, split="train")
    load_start = _loadavg()
    makers = []  # (name, factory): in blocks mode a row is built when its block starts
    if not args.no_official:
        makers.append(("official", lambda: OfficialRow(train_set, args, device)))
    makers += [(f"package:{spec}", (lambda sp: lambda: PackageRow(sp, train_set, args, device))(spec))
               for spec in args.variants]
    if not args.no_limit:
        makers.append(("limit:convs", lambda: ConvLimitRow(train_set, args, device)))
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"bench_iteration_{args.device}_{datetime.date.today().isoformat()}.json")
    meta = machine()
    rows: List[Row] = []
    state = {"complete": False}

    def write():
        placeholders = []
        for name, _ in makers[len(rows):]:
            r = Row(name)
            r.status, r.reason = "not reached", "the run ended before this row"
            placeholders.append(r)
        out = {"machine": meta, "loadavg_start": load_start, "loadavg_end": _loadavg(), "note": args.note,
               "args": vars(args), "complete": state["complete"], "goal": state.get("goal"),
               "rows": summarize(rows + placeholders, args.base)}
        from datadam_fast._io import atomic_write_text
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, json.dumps(out, indent=2))
        return out

    def iterate(r: Row, rep: int, phases: bool) -> bool:
        """One iteration of ``r`` recorded as repetition ``rep``; False if the row failed."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            sec, parts = r.once(phases=phases)
        except Exception as e:  # one broken variant (say a new option) must not lose the other rows
            r.status, r.reason = "failed", f"{type(e).__name__}: {e}"
            print(f"{r.name}: failed at repetition {rep}: {r.reason}", file=sys.stderr, flush=True)
            r.close()
            return False
        if device.type == "cuda":
            r.peak_bytes = max(r.peak_bytes or 0, torch.cuda.max_memory_allocated(device))
        if rep == 0:
            r.first_ms = 1e3 * sec
        if rep >= args.warmup:
            r.ms.append(1e3 * sec)
            if r.kind == "package" and parts is not None:
                r.phases.append(parts)
            elif parts:
                r.parts.append(parts)
        return True

    def phase_block(r: Row) -> None:
        for _ in range(phase_its if r.kind == "package" else 0):
            if not r.active:
                return
            try:
                sec, parts = r.once(phases=True)
            except Exception as e:  # noqa: BLE001
                r.status, r.reason = "failed", f"{type(e).__name__}: {e}"
                r.close()
                return
            r.phase_ms.append(1e3 * sec)
            r.phases.append(parts)

    headline_phases = phase_its == 0
    try:
        if order == "blocks":
            for name, make in makers:
                r = make()
                rows.append(r)
                if not r.active:
                    print(f"{r.name}: {r.status}: {r.reason}", file=sys.stderr, flush=True)
                    write()
                    continue
                for rep in range(args.warmup + args.iterations):
                    if not iterate(r, rep, headline_phases):
                        break
                    gc.collect()
                phase_block(r)
                r.close()
                print(f"{r.name}: median {_f(_med(r.ms))} ms over {len(r.ms)} iterations"
                      + (f" ({r.status}: {r.reason})" if not r.active else ""), file=sys.stderr, flush=True)
                write()
                del r
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        else:
            rows += [make() for _, make in makers]
            for r in rows:
                if not r.active:
                    print(f"{r.name}: {r.status}: {r.reason}", file=sys.stderr)
            # interleaved: one iteration of every row per repetition
            for rep in range(args.warmup + args.iterations):
                for r in rows:
                    if r.active:
                        iterate(r, rep, headline_phases)
                    gc.collect()  # free the previous row's garbage outside the next row's timed region
                write()
            for r in rows:
                phase_block(r)
            for r in rows:
                r.close()
    except KeyboardInterrupt:  # a time limit's SIGINT: keep every row measured so far
        for r in rows:
            try:
                r.close()
            except Exception:  # noqa: BLE001 - interrupted mid-step: the record is what counts
                pass
        write()
        print(f"interrupted: {path} holds the rows measured so far", file=sys.stderr, flush=True)
        raise

    summary = summarize(rows, args.base)
    print(f"{args.dataset} ipc={args.ipc} batch_real={args.batch_real} width={args.width} device={args.device} "
          f"threads={torch.get_num_threads()} affinity={meta['affinity']} iterations={args.iterations} "
          f"warmup={args.warmup} order={order} phase_iterations={phase_its}")
    print(markdown(summary))
    paper = next((s for s in summary if s["name"] == f"package:{BASE_PRESET}"), None)
    limit = next((s for s in summary if s["kind"] == "limit" and s.get("parts_median_ms")), None)
    goal = None
    if paper and limit and paper.get("real_forward_over_real_convs"):
        ratio = paper["real_forward_over_real_convs"]
        goal = {"real_forward_ms": paper["phases_median_ms"]["real_forward"],
                "real_convs_ms": limit["parts_median_ms"]["real_forward_convs"], "ratio": ratio,
                "goal_ratio": GOAL_RATIO, "met": ratio <= GOAL_RATIO}
        print(f"\npackage:{BASE_PRESET} real forward {goal['real_forward_ms']:.1f} ms / real convs alone "
              f"{goal['real_convs_ms']:.1f} ms = {ratio:.2f}x (goal <= {GOAL_RATIO}x: "
              f"{'met' if goal['met'] else 'not met'})")
    state["complete"], state["goal"] = True, goal
    out = write()
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
