"""``datadam-fast report RUN_DIR``: plots and a text summary of a distillation run.

Reads ``RUN_DIR/metrics.jsonl`` as ``distill`` writes it:

* a start line ``{"iteration": 0, "event": "start", "config": {...}, ...}``;
* step lines ``{"iteration", "loss", "loss_attention", "loss_embedding", "it_per_s", ...}``;
* eval lines ``{"iteration", "eval": {"mean", "std", "accuracies", "model", "epochs"}}``;

and tolerates anything else: unknown keys (``peak_memory_mb``, ``sec_per_it``, ``images_per_s`` are
plotted when present), other events (``"event": "plan"``, ...), and a last line cut by a kill.
Writes ``report_loss.png``, ``report_accuracy.png`` (when the run evaluated) and
``report_speed.png`` next to ``grid.png``, and ``report_profile.png`` (milliseconds per iteration
of each step phase) when the run was profiled (``profile_trace.json``, see ``distill --profile``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import UserError

LOSS_KEYS = ("loss", "loss_attention", "loss_embedding")
SPEED_KEYS = ("it_per_s", "sec_per_it", "images_per_s", "peak_memory_mb")


@dataclass
class RunMetrics:
    path: str
    steps: List[Dict] = field(default_factory=list)    # one per logged iteration (last record wins)
    evals: List[Dict] = field(default_factory=list)    # {"iteration", "mean", "std", ...}
    events: List[Dict] = field(default_factory=list)   # start / plan / other event lines
    config: Dict = field(default_factory=dict)
    skipped_lines: int = 0

    def series(self, key: str) -> Tuple[List[int], List[float]]:
        """(iterations, values) of the step records that carry a finite number under ``key``."""
        xs, ys = [], []
        for r in self.steps:
            v = r.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                xs.append(int(r["iteration"]))
                ys.append(float(v))
        return xs, ys


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics(run_dir: str) -> RunMetrics:
    """Parse ``run_dir/metrics.jsonl``; one-line :class:`UserError` when there is nothing to read."""
    if not os.path.isdir(run_dir):
        raise UserError(f"run directory {run_dir} does not exist (expected the --out directory of datadam-fast distill)")
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"no metrics.jsonl in {run_dir} (expected the --out directory of datadam-fast distill)")
    m = RunMetrics(path)
    steps: Dict[int, Dict] = {}
    evals: Dict[int, Dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                m.skipped_lines += 1  # typically the last line of a killed run
                continue
            if not isinstance(rec, dict) or not _is_number(rec.get("iteration")):
                m.skipped_lines += 1
                continue
            it = int(rec["iteration"])
            if "event" in rec:
                m.events.append(rec)
                if rec.get("event") == "start" and isinstance(rec.get("config"), dict):
                    m.config = rec["config"]
            if isinstance(rec.get("eval"), dict) and _is_number(rec["eval"].get("mean")):
                evals[it] = {"iteration": it, **rec["eval"]}
            if any(_is_number(rec.get(k)) for k in LOSS_KEYS + SPEED_KEYS):
                steps[it] = rec  # a resumed run rewrites lines after its checkpoint: keep the latest
    m.steps = [steps[k] for k in sorted(steps)]
    m.evals = [evals[k] for k in sorted(evals)]
    if not m.steps and not m.evals:
        raise UserError(f"{path} has no step or evaluation records (expected lines like "
                        f'{{"iteration": 1, "loss": ...}} written by datadam-fast distill)')
    return m


def summarize(m: RunMetrics) -> Dict:
    """The numbers the text summary prints (also returned for ``--json``)."""
    s: Dict = {"metrics": m.path, "skipped_lines": m.skipped_lines}
    c = m.config
    if c:
        s["run"] = {k: c.get(k) for k in ("dataset", "ipc", "preset", "model", "norm", "width", "depth", "iterations",
                                          "power", "task_balance", "method", "networks")}
        s["run"]["factor"] = int(c.get("factor") or 1)
        # what the set trains on: factor^2 decoded images per stored one (multi-formation)
        s["run"]["decoded_per_class"] = (c.get("ipc") or 0) * s["run"]["factor"] ** 2
    last_it = max([r["iteration"] for r in m.steps] + [e["iteration"] for e in m.evals])
    s["iterations"] = int(last_it)
    if m.steps:
        final = m.steps[-1]
        s["final_loss"] = {k: final.get(k) for k in LOSS_KEYS if _is_number(final.get(k))}
        s["final_loss_iteration"] = int(final["iteration"])
        speed = {}
        for k in ("it_per_s", "sec_per_it", "images_per_s"):
            xs, ys = m.series(k)
            if ys:
                speed[k] = ys[-1]
        xs, ys = m.series("peak_memory_mb")
        if ys:
            speed["peak_memory_mb"] = max(ys)
        s["speed"] = speed
    if m.evals:
        best = max(m.evals, key=lambda e: e["mean"])
        fin = m.evals[-1]
        keep = ("iteration", "mean", "std", "model", "epochs")
        s["final_accuracy"] = {k: fin.get(k) for k in keep}
        s["best_accuracy"] = {k: best.get(k) for k in keep}
        s["final_accuracy"]["runs"] = len(fin.get("accuracies") or [])
    return s


def format_summary(s: Dict, run_dir: str) -> str:
    lines = []
    r = s.get("run")
    if r:
        def val(k):  # None in the config means the network's own default
            return "default" if r.get(k) is None else r.get(k)
        net = f"{r.get('model')} (norm {val('norm')}, width {val('width')}, depth {val('depth')})"
        form = (f" (factor {r['factor']}: {r['decoded_per_class']} decoded images per class)"
                if r.get("factor", 1) > 1 else "")
        nets = f", networks {r['networks']}" if r.get("networks") not in (None, "random") else ""
        lines.append(f"run {run_dir}: {r.get('dataset')} IPC {r.get('ipc')}{form}, preset {r.get('preset')}, "
                     f"{net}{nets}")
    else:
        lines.append(f"run {run_dir} (no start line: configuration unknown)")
    planned = r.get("iterations") if r else None
    lines.append(f"iterations: {s['iterations']}" + (f" of {planned}" if planned else ""))
    fl = s.get("final_loss")
    if fl:
        parts = ", ".join(f"{k.replace('loss_', '')} {v:.4g}" for k, v in fl.items() if k != "loss")
        lines.append(f"final loss: {fl.get('loss', float('nan')):.4g}" + (f" ({parts})" if parts else "")
                     + f" at iteration {s['final_loss_iteration']}")
    if "final_accuracy" in s:
        f, b = s["final_accuracy"], s["best_accuracy"]
        lines.append(f"accuracy: final {f['mean']:.2f} ± {f['std']:.2f} % at iteration {f['iteration']}; "
                     f"best {b['mean']:.2f} ± {b['std']:.2f} % at iteration {b['iteration']} "
                     f"({f.get('model')}, {f.get('epochs')} epochs, {f.get('runs')} runs; best is picked on the test set)")
    else:
        lines.append("accuracy: no evaluation in this run")
    sp = s.get("speed") or {}
    bits = []
    if "it_per_s" in sp:
        bits.append(f"{sp['it_per_s']:.3g} it/s")
    if "sec_per_it" in sp:
        bits.append(f"{sp['sec_per_it']:.3g} s/it")
    if "images_per_s" in sp:
        bits.append(f"{sp['images_per_s']:.4g} images/s")
    if "peak_memory_mb" in sp:
        bits.append(f"peak memory {sp['peak_memory_mb']:.0f} MB")
    if bits:
        lines.append("speed (last logged): " + ", ".join(bits))
    if s.get("skipped_lines"):
        lines.append(f"skipped {s['skipped_lines']} unreadable line(s) in metrics.jsonl")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _integer_iterations(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no "iteration 2.5" ticks on short runs


def _title(m: RunMetrics, what: str) -> str:
    c = m.config
    if not c:
        return what
    return f"{what}: {c.get('dataset')} IPC {c.get('ipc')}, {c.get('preset')} preset, {c.get('model')} ({c.get('norm')})"


def plot_losses(m: RunMetrics, path: str) -> Optional[str]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    drawn = False
    for key, label in zip(LOSS_KEYS, ("total", "attention term", "embedding term")):
        xs, ys = m.series(key)
        pts = [(x, y) for x, y in zip(xs, ys) if y > 0]  # log axis: non-positive values cannot be drawn
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, lw=1.6 if key == "loss" else 1.1,
                    marker="o" if len(pts) < 30 else None, ms=3)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    _integer_iterations(ax)
    xs_all = sorted({x for key in LOSS_KEYS for x in m.series(key)[0]})
    if len(xs_all) == 1:  # one point: a range of whole iterations, not fractional ticks around it
        ax.set_xlim(xs_all[0] - 1, xs_all[0] + 1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (log scale)")
    ax.set_title(_title(m, "loss"), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy(m: RunMetrics, path: str) -> Optional[str]:
    if not m.evals:
        return None
    plt = _pyplot()
    xs = [e["iteration"] for e in m.evals]
    mu = [float(e["mean"]) for e in m.evals]
    sd = [float(e.get("std") or 0.0) for e in m.evals]
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    if any(v > 0 for v in sd):  # a band (and its legend entry) only where there is a spread to draw
        ax.fill_between(xs, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], alpha=0.25,
                        label="± std over runs")
    ax.plot(xs, mu, marker="o", ms=4, label="mean test accuracy")
    best = max(range(len(mu)), key=mu.__getitem__)
    ax.annotate(f"best {mu[best]:.2f}%", (xs[best], mu[best]), textcoords="offset points", xytext=(0, 8),
                ha="center", fontsize=9)
    e = m.evals[-1]
    _integer_iterations(ax)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(_title(m, f"accuracy ({e.get('model')}, {e.get('epochs')} epochs, "
                           f"{len(e.get('accuracies') or [])} runs)"), fontsize=10)
    lo, hi = min(a - b for a, b in zip(mu, sd)), max(a + b for a, b in zip(mu, sd))
    pad = max(1.0, 0.1 * (hi - lo))
    ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    if len(xs) == 1:
        ax.set_xlim(xs[0] - 1, xs[0] + 1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_speed(m: RunMetrics, path: str) -> Optional[str]:
    panels = []
    xs, ys = m.series("it_per_s")
    if not ys:  # newer logs may only carry seconds per iteration
        sx, sy = m.series("sec_per_it")
        xs, ys = sx, [1.0 / v for v in sy if v > 0]
        xs = [x for x, v in zip(sx, sy) if v > 0]
    if ys:
        panels.append(("iterations / s\n(as logged)", xs, ys))
    ix, iy = m.series("images_per_s")
    if iy:
        panels.append(("images / s", ix, iy))
    mx, my = m.series("peak_memory_mb")
    if my:
        panels.append(("peak memory (MB)", mx, my))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels) + 0.6), dpi=100, sharex=True, squeeze=False)
    for ax, (label, px, py) in zip(axes[:, 0], panels):
        ax.plot(px, py, marker="o" if len(px) < 30 else None, ms=3)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        lo, hi = min(py), max(py)
        # at least +-2 % of the value: a wobble of 0.1 MB in 471 MB must not look like a leak
        pad = max(0.1 * (hi - lo), 0.02 * abs(hi), 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    _integer_iterations(axes[-1, 0])
    axes[-1, 0].set_xlabel("iteration")
    axes[0, 0].set_title(_title(m, "speed"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_profile(run_dir: str, m: RunMetrics, path: str) -> Optional[str]:
    """Per-phase bar chart (ms per iteration; CPU and, on GPU runs, device time) from the trace."""
    from .trace import TRACE, phases_from_trace
    trace = os.path.join(run_dir, TRACE)
    if not os.path.isfile(trace):
        return None
    ph = phases_from_trace(trace)
    if not ph["phases"]:
        return None
    plt = _pyplot()
    names = [p.rsplit(".", 1)[-1] for p in ph["phases"]]
    series = [("CPU", ph["cpu"])] + ([("GPU", ph["gpu"])] if ph["gpu"] else [])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.6), dpi=100)
    h = 0.8 / len(series)
    for j, (label, vals) in enumerate(series):
        ys = [i + (j - (len(series) - 1) / 2) * h for i in range(len(names))]
        xs = [vals.get(p, 0.0) for p in ph["phases"]]
        bars = ax.barh(ys, xs, height=h, label=f"{label} time")
        for b, v in zip(bars, xs):
            ax.annotate(f"{v:.3g}", (b.get_width(), b.get_y() + b.get_height() / 2), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.invert_yaxis()  # step order, top to bottom
    ax.set_xlabel("ms per iteration")
    ax.set_title(_title(m, f"step phases ({ph['iterations']} profiled iterations)"), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def report(run_dir: str, out_dir: Optional[str] = None) -> Tuple[Dict, List[str]]:
    """Read the run, write the plots (into ``out_dir``, default ``run_dir``), return (summary, paths)."""
    m = read_metrics(run_dir)
    out = out_dir or run_dir
    os.makedirs(out, exist_ok=True)
    paths = [p for p in (plot_losses(m, os.path.join(out, "report_loss.png")),
                         plot_accuracy(m, os.path.join(out, "report_accuracy.png")),
                         plot_speed(m, os.path.join(out, "report_speed.png")),
                         plot_profile(run_dir, m, os.path.join(out, "report_profile.png"))) if p]
    s = summarize(m)
    s["plots"] = paths
    return s, paths
