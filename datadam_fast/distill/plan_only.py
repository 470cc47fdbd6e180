"""``distill --plan-only``: what a run will cost before it starts, with nothing written.

The distiller is set up exactly as for a run (configuration resolved, dataset header and class
indices read, synthetic set initialised, the memory planner's probe run when the run is big
enough to need it) but without an output directory, then the step's two passes are *timed* on
random data at two batch sizes (each after a warm-up call) and the per-image slope and per-call
intercept of each are scaled to one iteration: ``classes x batch_real`` real images in the plan's
real chunks, ``classes x ipc`` synthetic images in its synthetic chunks, plus one fresh network
and one DSA draw per iteration. With a streamed (not cached) training set the time to read a
chunk's rows is measured too; with the prefetcher on it overlaps the compute. The passes are
timed eagerly: a run with ``--compile`` pays its compile time on the first iteration and may be
faster afterwards. Evaluation time is not included.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from .memory import GB, MB
from .planner import probe_sizes
from .step import ClassSums


def _timed(fn: Callable[[], object], device: torch.device, repeats: int = 2) -> float:
    """Best of ``repeats`` wall times of ``fn`` (after the caller's warm-up)."""
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _fit(sizes: Tuple[int, int], secs: List[float]) -> Tuple[float, float]:
    """(seconds per image, seconds per call) through the two points. Timing noise on a busy
    machine can make the difference of two short timings tiny or negative, so the slope is kept
    at least at half the average cost per image of the larger batch; neither is negative."""
    (n1, n2), (t1, t2) = sizes, secs
    slope = max((t2 - t1) / max(n2 - n1, 1), t2 / n2 * 0.5, 0.0)
    return slope, max(t2 - slope * n2, 0.0)


def time_passes(d) -> Dict[str, float]:
    """Seconds per image and per call of the real and synthetic passes of distiller ``d`` (the
    code the step runs, on random data; the run's generator is not touched)."""
    ds, dev = d.train_set, d.device
    gen = torch.Generator().manual_seed(4321)
    net = d.new_network(gen)
    params = d.dsa.sample(1, gen, dev, tuple(ds.image_size)) if d.dsa else None
    n1, n2 = probe_sizes(d, net)
    n1, n2 = max(1, min(n1, 32)), max(2, min(n2, 64))  # timing needs no large batches
    out: Dict[str, float] = {"sizes": [n1, n2]}
    for side in ("real", "syn"):
        secs = []
        for n in (n1, n2):
            x = d.layout(torch.randn(n, ds.channels, *ds.image_size, generator=gen).to(dev))
            lab = torch.zeros(n, dtype=torch.long, device=dev)
            if side == "real":
                sums = ClassSums(1)
                fn = lambda: d.real_pass(net, x, lab, params, sums, lab.cpu())  # noqa: E731
            else:
                with torch.no_grad():  # one real image's statistics stand in for the class targets
                    targets = [s.float() for s in d.method.real_statistics(net, x[:1])]
                xs = x.contiguous()
                fn = lambda: d.syn_pass(net, xs, lab, params, targets, 1)  # noqa: E731
            fn()  # warm-up (first-call allocations, kernel selection)
            secs.append(_timed(fn, dev))
        out[f"{side}_per_image"], out[f"{side}_per_call"] = _fit((n1, n2), secs)
    out["network_and_dsa"] = _timed(lambda: (d.new_network(gen), d.dsa.sample(d.K, gen, dev, tuple(ds.image_size))
                                             if d.dsa else None), dev)
    out["load_per_image"] = 0.0
    if d.real_all is None:
        B = min(d.batch_real, 64)
        idx = torch.cat([ix[:B] for ix in d.class_idx[:max(1, min(d.Kl, 8))]])
        out["load_per_image"] = _timed(lambda: d.finish_rows(d.load_rows(idx)), dev) / max(len(idx), 1)
    return out


def predict(d, t: Dict[str, float]) -> Dict[str, float]:
    """Seconds per iteration from the timings ``t`` and the distiller's memory plan."""
    p, c = d.plan, d.cfg
    real_imgs, syn_imgs = d.Kl * d.batch_real, d.Kl * c.ipc
    real = t["real_per_image"] * real_imgs + t["real_per_call"] * p.real_chunks
    syn = t["syn_per_image"] * syn_imgs + t["syn_per_call"] * p.syn_chunks
    compute = real + syn + t["network_and_dsa"]
    load = t["load_per_image"] * real_imgs
    overlapped = d.prefetcher.enabled and d.prefetcher.lookahead > 0
    total = compute + (max(0.0, load - compute) if overlapped else load)
    return {"real_s": real, "syn_s": syn, "network_and_dsa_s": t["network_and_dsa"], "load_s": load,
            "load_overlapped": overlapped, "sec_per_it": total}


@contextlib.contextmanager
def _nothing_written(cfg):
    """--plan-only writes nothing beside the data: a dataset that would write its decoded copy on
    first load (imagenet64's packed copy) decodes into a temporary folder, deleted after the plan, or
    (tinyimagenet) decodes in memory."""
    from ..data import CACHED_DATASETS
    from ..data._base import default_data_root
    from ..data._packed import is_packed
    opts = dict(cfg.data_opts)

    def packed_in_root():  # imagenet64 packed beside its npz files already: nothing would be written
        root = Path(cfg.data_root).expanduser() if cfg.data_root else default_data_root()
        return all(is_packed(root / "imagenet64" / "packed" / s) for s in ("train", "val"))

    if cfg.dataset in CACHED_DATASETS and "cache_dir" not in opts and not os.environ.get("DATADAM_FAST_CACHE") \
            and not (cfg.dataset == "imagenet64" and packed_in_root()):
        if cfg.dataset == "tinyimagenet":
            yield dataclasses.replace(cfg, data_opts={**opts, "cache": False})
            return
        with tempfile.TemporaryDirectory(prefix="datadam_fast_plan_") as tmp:
            print(f"--plan-only: a missing packed copy of {cfg.dataset} is decoded into {tmp} (deleted after the "
                  f"plan; --cache-dir keeps it)", file=sys.stderr, flush=True)
            yield dataclasses.replace(cfg, data_opts={**opts, "cache_dir": tmp})
        return
    yield cfg


def make_plan(cfg, world=None) -> Dict:
    """Set up the run without an output directory, time its passes, and return the plan."""
    from .engine import Distiller
    t0 = time.perf_counter()
    with _nothing_written(cfg) as cfg:
        d = Distiller(cfg, None, progress=False, world=world)
        try:
            c, ds, p = d.cfg, d.train_set, d.plan
            timing = time_passes(d)
            pred = predict(d, timing)
            networks = d.networks.describe(d)
            if networks.get("to_train"):  # the pool is built before the first iteration: its cost, measured
                from .networks import time_training_step
                share = -(-networks["to_train"] // d.world.size)  # networks per process
                step_s = time_training_step(d)
                networks.update(step_seconds=step_s,
                                build_seconds=step_s * networks["steps_per_network"] * share)
            hours = pred["sec_per_it"] * c.iterations / 3600.0
            return {
                "dataset": ds.name, "num_classes": d.K, "image_shape": [ds.channels, *ds.image_size],
                "train_images": len(ds), "model": c.model, "norm": c.norm, "depth": c.depth, "method": d.method.name,
                "ipc": c.ipc, "factor": c.factor, "batch_real": d.batch_real, "iterations": c.iterations,
                "device": str(d.device), "networks": networks,
                "zca": c.zca, "processes": d.world.size, "classes_per_process": d.Kl,
                "real_cached_on_device": d.real_all is not None, "compile": bool(c.compile),
                "memory": {**p.as_dict(), "predicted_peak_gb": p.predicted_peak / GB, "budget_gb": p.budget / GB},
                "timing": timing, "predicted": pred, "predicted_hours": hours,
                "plan_seconds": time.perf_counter() - t0,
            }
        finally:
            d.close()


def format_plan(pl: Dict) -> str:
    m, pr = pl["memory"], pl["predicted"]
    C, H, W = pl["image_shape"]
    lines = [
        f"plan for {pl['dataset']} ({pl['num_classes']} classes, {C}x{H}x{W}, {pl['train_images']} training images), "
        f"{pl['method']} with {pl['model']} (norm {pl['norm']}, depth {pl['depth']}), ipc {pl['ipc']}, "
        f"batch_real {pl['batch_real']}, {pl['iterations']} iterations on {pl['device']}"
        + (f", factor {pl['factor']} ({pl['ipc'] * pl['factor'] ** 2} decoded images per class)"
           if pl["factor"] > 1 else "")
        + (", ZCA" if pl["zca"] else ""),
        f"  processes: {pl['processes']}, {pl['classes_per_process']} classes per process",
        f"  networks: {pl['networks']['summary']}" + (
            f"; training them takes about {pl['networks']['build_seconds'] / 60:.3g} min before the first iteration "
            f"({pl['networks']['step_seconds']:.3g} s per step, measured)" if pl["networks"].get("build_seconds")
            is not None else ""),
        f"  real side: {m['real_chunks']} chunk(s) of {m['real_chunk']} classes; synthetic side: {m['syn_chunks']} "
        f"chunk(s) of {m['syn_chunk']} classes; training set "
        + ("cached on the device" if pl["real_cached_on_device"] else "streamed in chunks"),
        f"  memory: predicted peak {m['predicted_peak_gb']:.2f} GB of a {m['budget_gb']:.2f} GB budget "
        f"(fixed {m['fixed'] / GB:.2f} GB, {m['real_per_image'] / MB:.2f} MB per real image, "
        f"{m['syn_per_image'] / MB:.2f} MB per synthetic image)",
        f"  time: predicted {pr['sec_per_it']:.3g} s/iteration (real side {pr['real_s']:.3g} s, synthetic side "
        f"{pr['syn_s']:.3g} s, network + DSA {pr['network_and_dsa_s']:.3g} s, loading {pr['load_s']:.3g} s"
        + (" overlapped" if pr["load_overlapped"] else "") + f"), {pl['predicted_hours']:.3g} hours for "
        f"{pl['iterations']} iterations (evaluation not included; passes timed eagerly"
        + (", --compile may be faster after its first iteration" if pl["compile"] else "") + ")",
    ]
    for note in m.get("notes", []):
        lines.append(f"  note: {note}")
    lines.append(f"  (planned in {pl['plan_seconds']:.1f} s; no run directory written)")
    return "\n".join(lines)


def plan_only(cfg, world=None) -> Dict:
    """The CLI's ``--plan-only``: print the plan (stderr) and its JSON (stdout)."""
    pl = make_plan(cfg, world)
    if world is None or world.is_main:
        print(format_plan(pl), file=sys.stderr, flush=True)
        print(json.dumps({"plan": pl}, default=float))
    return pl


__all__ = ["make_plan", "format_plan", "plan_only", "time_passes", "predict"]
