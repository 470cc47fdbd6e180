"""The run loop: iterations to ``cfg.iterations``, progress bar, logging, the evaluation schedule,
periodic checkpoints, the final outputs and summary."""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Dict, Optional

import torch

from . import rundir
from .memory import GB, MB


def say(d, msg: str) -> None:
    if d.world.is_main and (d.progress or os.environ.get("DATADAM_FAST_QUIET") != "1"):
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)


def should_eval(d, it: int) -> bool:
    e = d.cfg.eval_every
    if e < 0 or d.cfg.eval_runs <= 0:
        return False
    return it == d.cfg.iterations or (e > 0 and it % e == 0)


def evaluate(d) -> Dict:
    """Evaluation networks trained on the whole synthetic set; the runs are split over ranks
    (run r on rank r mod world size, seeded by r alone, so any world size gives the same)."""
    from ..evaluation.evaluate import EvalConfig, evaluate_synthetic, evaluation_seed
    rundir.check_finite(d)  # never train evaluation networks on NaN images
    c = d.cfg
    images, labels = rundir.full_synthetic(d, to_all=True)
    from ..data.formation import decode, decode_labels
    images, labels = decode(images, d.factor), decode_labels(labels, d.factor)  # what the set trains on
    same = c.eval_model == c.model
    ecfg = EvalConfig(model=c.eval_model, epochs=c.eval_epochs, runs=c.eval_runs, dsa=c.dsa,
                      dsa_strategy=c.dsa_strategy, norm=c.norm if same else None,
                      width=c.width if same else None, depth=c.depth if same else None,
                      batch_size=c.eval_batch)
    mine = list(range(d.world.rank, c.eval_runs, d.world.size))
    seed = evaluation_seed(c.seed, d.iteration)
    res = evaluate_synthetic(images, labels, d.test_set(), ecfg, seed=seed, device=d.device,
                             run_ids=mine) if mine else {"accuracies": [], "network": None}
    parts = d.world.gather_objects(list(zip(mine, res["accuracies"])))
    accs = [a for _, a in sorted(p for part in parts for p in part)]
    t = torch.tensor(accs, dtype=torch.float64)
    return {"accuracies": accs, "mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(accs) > 1
            else 0.0, "model": ecfg.model, "network": res["network"], "epochs": ecfg.epochs,
            "num_images": int(images.shape[0]), "seed": seed, "runs": c.eval_runs, "batch_size": ecfg.batch_size,
            "dsa": ecfg.dsa}


def eval_and_log(d) -> Dict:
    c = d.cfg
    say(d, f"iteration {d.iteration}: evaluating ({c.eval_runs} x {c.eval_model} trained for {c.eval_epochs}+1 "
           f"epochs on the synthetic set)")
    res = evaluate(d)
    short = {k: res[k] for k in ("mean", "std", "accuracies", "model", "network", "epochs", "seed", "runs", "num_images")}
    rundir.log(d, {"iteration": d.iteration, "eval": short})
    if d.progress:
        from tqdm import tqdm
        tqdm.write(f"iteration {d.iteration}: {short['model']} accuracy {short['mean']:.2f} ± {short['std']:.2f} %")
    return short


def report_measured(d, seconds: float, iterations: int) -> None:
    if iterations <= 0:
        return
    sec = seconds / iterations
    peak = d.world.max_int(d.mem.process_peak())
    say(d, f"measured: {sec:.3g} s/iteration, peak memory {peak / GB:.2f} GB "
           f"(predicted {d.plan.predicted_peak / GB:.2f} GB, budget {d.budget / GB:.2f} GB)")
    rundir.log(d, {"iteration": d.iteration, "event": "plan_measured", "sec_per_it": sec,
                   "peak_memory_mb": peak / MB, "predicted_peak_mb": d.plan.predicted_peak / MB})


def _log_iteration(d, terms, it, sec, bar) -> None:
    names = list(terms)
    vals = d.world.sum_(torch.stack([terms[k] for k in names]))  # sums over ranks
    vals = [float(v) for v in vals]
    bad = [f"{k} = {v}" for k, v in zip(names, vals) if not math.isfinite(v)]
    if bad:
        raise rundir.nonfinite_error(d, f"the loss is not finite ({', '.join(bad)})")
    peak = d.world.max_int(d.mem.process_peak())
    images_per_it = d.K * (d.batch_real + d.cfg.ipc * d.factor ** 2)
    rec = {"iteration": it, **dict(zip(names, vals)), "it_per_s": 1.0 / max(sec, 1e-12),
           "sec_per_it": sec, "images_per_s": images_per_it / max(sec, 1e-12), "peak_memory_mb": peak / MB}
    if bar is not None:
        bar.set_postfix(loss=f"{vals[0]:.4g}", refresh=False)
    rundir.log(d, rec)


def run(d, *, stop_after: Optional[int] = None) -> Dict:
    """Run to ``cfg.iterations``; ``stop_after`` (testing) returns early after that many iterations."""
    c = d.cfg
    rundir.truncate_metrics(d)
    if d.out_dir and d.world.is_main:  # the fully resolved config.toml: `distill --config RUN/config.toml` repeats the run
        rundir.write_run_config(d.out_dir, c, d.run_flags)
    prof = None
    if c.profile:  # a torch.profiler window over c.profile iterations after warm-up
        from .trace import ProfileSession
        prof = ProfileSession(c.profile, c.iterations - d.iteration, d.device,
                              d.out_dir if d.world.is_main else None, lambda msg: say(d, msg))
    plan = {**d.plan.as_dict(), "world_size": d.world.size, "device": str(d.device),
            "classes_total": d.K, "real_cached_on_device": d.real_all is not None}
    say(d, f"{d.plan.summary()}" + (f"; {d.world.size} processes, {d.Kl} classes on rank 0"
                                    if d.world.distributed else ""))
    if d.iteration >= c.iterations and d.iteration > 0:
        say(d, f"the checkpoint is already at iteration {d.iteration} of {c.iterations}: nothing left to distill "
               f"(raise --iterations to continue); writing the outputs again")
    elif d.iteration > 0:
        say(d, f"resuming from iteration {d.iteration} of {c.iterations}")
    if d.iteration == 0:
        rundir.log(d, {"iteration": 0, "event": "start", "config": dataclasses.asdict(c),
                       "batch_real": d.batch_real, "num_classes": d.K})
    rundir.log(d, {"iteration": d.iteration, "event": "plan", "plan": plan})
    d.networks.prepare(d)  # a trained pool: built (or read from its cache) before the first iteration
    last_eval = None
    if d.iteration == 0 and should_eval(d, 0):
        last_eval = eval_and_log(d)
    bar = None
    if d.progress:
        from tqdm import tqdm
        bar = tqdm(total=c.iterations, initial=d.iteration, desc=f"distill {c.dataset} ipc={c.ipc}",
                   unit="it", dynamic_ncols=True)
    t_last, it_last = time.perf_counter(), d.iteration
    done = 0
    try:
        while d.iteration < c.iterations:
            terms = d.step() if prof is None else prof.step(d.step)
            done += 1
            it = d.iteration
            if bar is not None:
                bar.update(1)
            if done == 1:
                t_first = time.perf_counter()  # the first iteration compiles: not a typical one
                if d.compile_seconds is not None:
                    say(d, f"compiled the network passes in {d.compile_seconds:.1f} s (first iteration)")
                    rundir.log(d, {"iteration": it, "event": "compile", "seconds": d.compile_seconds})
            if done == 3 or (done < 3 and it == c.iterations):
                if done == 1:
                    report_measured(d, time.perf_counter() - t_last, 1)
                else:
                    report_measured(d, time.perf_counter() - t_first, done - 1)
            if it % c.log_every == 0 or it == c.iterations:
                now = time.perf_counter()
                sec = (now - t_last) / max(it - it_last, 1)
                t_last, it_last = now, it
                _log_iteration(d, terms, it, sec, bar)
            if should_eval(d, it):
                last_eval = eval_and_log(d)
                t_last, it_last = time.perf_counter(), it  # it/s counts distillation only, not evaluation
            if c.checkpoint_every > 0 and (it % c.checkpoint_every == 0) and it < c.iterations:
                rundir.save_checkpoint(d)
            if stop_after is not None and done >= stop_after:
                return {"stopped": True, "iteration": it}
    finally:
        if bar is not None:
            bar.close()
        if prof is not None:
            prof.finish()
    rundir.save_checkpoint(d)
    rundir.write_outputs(d)
    summary = {"iteration": d.iteration, "dataset": c.dataset, "ipc": c.ipc, "preset": c.preset,
               "eval": last_eval, "world_size": d.world.size,
               "peak_memory_mb": d.world.max_int(d.mem.process_peak()) / MB,
               "predicted_peak_mb": d.plan.predicted_peak / MB, "memory_budget_mb": d.budget / MB}
    rundir.write_summary(d, summary)
    return summary
