"""``distill --profile N``: a ``torch.profiler`` trace of N iterations and a per-phase table.

The step's named ranges (:data:`datadam_fast.profiling.STEP_PHASES`, the same names Nsight sees
with ``--nvtx``) become ``torch.profiler.record_function`` ranges while the profiler records, so
the Chrome/Perfetto trace (``profile_trace.json`` in the run directory; open it in
https://ui.perfetto.dev or ``chrome://tracing``) shows every phase with the operators and kernels
inside it, on CPU and GPU alike. Outside the profiled window the ranges are off, and with
``profile = 0`` (the default) nothing here runs at all.

Which iterations: the first one of the run is skipped when there is room (it compiles and makes
first-call allocations), then one warm-up iteration (the profiler's own start-up cost), then N
recorded ones. A run with fewer iterations left than N is refused before it starts.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional

import torch

from .. import profiling
from ..errors import UserError

TRACE = "profile_trace.json"
TOP_OPERATORS = 10


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class ProfileSession:
    """Wraps the run loop's calls of ``step``: ``session.step(fn)`` instead of ``fn()``."""

    def __init__(self, iterations: int, remaining: int, device: torch.device, out_dir: Optional[str] = None,
                 say: Callable[[str], None] = print):
        if iterations < 1:
            raise UserError(f"profile must be >= 1 iterations (0 = off), got {iterations}")
        if iterations > remaining:
            raise UserError(f"profile {iterations}: only {remaining} iteration(s) left to run; profile fewer "
                            f"or raise --iterations")
        self.n = iterations
        self.skip = 1 if remaining >= iterations + 2 else 0
        self.warm = 1 if remaining - self.skip >= iterations + 1 else 0
        self.device = torch.device(device)
        self.out_dir = out_dir
        self.say = say
        self.done = 0
        self.recorded = 0
        self.seconds: List[float] = []  # wall time of each recorded iteration
        self.prof = None
        self.trace_path: Optional[str] = None
        self.table: Optional[Dict] = None

    # ------------------------------------------------------------------ the window
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _start(self) -> None:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=acts, record_shapes=True, profile_memory=True,
            schedule=torch.profiler.schedule(wait=0, warmup=self.warm, active=self.n, repeat=1),
            on_trace_ready=self._ready)
        self.prof.__enter__()
        profiling.enable_record()

    def _ready(self, prof) -> None:
        if self.out_dir:
            self.trace_path = os.path.join(self.out_dir, TRACE)
            prof.export_chrome_trace(self.trace_path)
        self.table = phase_table(prof.key_averages(), self.seconds, self.device.type == "cuda")

    def _stop(self) -> None:
        profiling.disable_record()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)

    def step(self, fn):
        if self.done == self.skip and self.prof is None and self.recorded == 0:
            self._start()
        if self.prof is None:
            self.done += 1
            return fn()
        self._sync()
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        if self.recorded >= self.warm:
            self.seconds.append(time.perf_counter() - t0)
        self.recorded += 1
        self.prof.step()  # the step that completes the active window calls _ready
        self.done += 1
        if self.recorded >= self.warm + self.n:
            self._stop()
            self.report()
        return out

    def finish(self) -> None:
        """End of the run loop (also when it stops early): close a window that is still open."""
        if self.prof is not None:
            self._stop()
            if self.table is None and self.seconds:
                self.say(f"profile: the run stopped after {len(self.seconds)} of {self.n} recorded iterations")

    def report(self) -> None:
        if self.table is None:
            return
        self.say(format_phase_table(self.table))
        if self.trace_path:
            self.say(f"profile: wrote {self.trace_path} (open in https://ui.perfetto.dev or chrome://tracing)")


def _device_total(evt) -> float:
    for attr in ("device_time_total", "cuda_time_total"):
        v = getattr(evt, attr, None)
        if v:
            return float(v)
    return 0.0


def _self_device(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v:
            return float(v)
    return 0.0


def phase_table(averages, seconds: List[float], cuda: bool) -> Dict:
    """Per-phase ms per iteration and share of the iteration, plus the top operators.

    ``averages``: ``prof.key_averages()`` of the recorded iterations; ``seconds``: their wall
    times. Times are totals of each range (children included) divided by the iterations."""
    n = max(len(seconds), 1)
    wall_ms = 1e3 * sum(seconds) / n
    by_name = {e.key: e for e in averages}
    phases = []
    for name in profiling.STEP_PHASES:
        e = by_name.get(name)
        if e is None:
            continue
        row = {"phase": name, "calls_per_it": e.count / n, "cpu_ms": e.cpu_time_total / 1e3 / n}
        if cuda:
            row["device_ms"] = _device_total(e) / 1e3 / n
        row["share"] = row["cpu_ms"] / wall_ms if wall_ms > 0 else 0.0
        phases.append(row)
    ops = [e for e in averages if not e.key.startswith(("datadam_fast.", "ProfilerStep"))]
    key = _self_device if cuda else (lambda e: float(e.self_cpu_time_total))
    ops.sort(key=key, reverse=True)
    top = [{"name": e.key, "calls_per_it": e.count / n, "self_ms": key(e) / 1e3 / n} for e in ops[:TOP_OPERATORS]]
    return {"iterations": len(seconds), "wall_ms_per_it": wall_ms, "phases": phases, "top_operators": top,
            "time_axis": "device" if cuda else "cpu"}


def format_phase_table(t: Dict) -> str:
    cuda = t["time_axis"] == "device"
    lines = [f"profile: {t['iterations']} iterations, {t['wall_ms_per_it']:.2f} ms per iteration (wall, profiler on)",
             f"  {'phase':<14}{'calls/it':>9}{'cpu ms/it':>11}" + (f"{'gpu ms/it':>11}" if cuda else "")
             + f"{'share':>8}"]
    covered = 0.0
    for r in t["phases"]:
        covered += r["cpu_ms"]
        lines.append(f"  {_short(r['phase']):<14}{r['calls_per_it']:>9.3g}{r['cpu_ms']:>11.3f}"
                     + (f"{r['device_ms']:>11.3f}" if cuda else "") + f"{100 * r['share']:>7.1f}%")
    rest = t["wall_ms_per_it"] - covered
    if t["wall_ms_per_it"] > 0:
        lines.append(f"  {'(outside)':<14}{'':>9}{rest:>11.3f}" + ("" if not cuda else f"{'':>11}")
                     + f"{100 * rest / t['wall_ms_per_it']:>7.1f}%")
    lines.append(f"  top operators by self {'GPU' if cuda else 'CPU'} time:")
    for o in t["top_operators"]:
        lines.append(f"    {o['self_ms']:>9.3f} ms/it  {o['calls_per_it']:>7.3g} calls/it  {o['name']}")
    return "\n".join(lines)


def phases_from_trace(path: str) -> Dict:
    """Per-phase ms per iteration read back from a ``profile_trace.json`` (for ``report``):
    ``{"iterations", "cpu": {phase: ms}, "gpu": {phase: ms}}`` (``gpu`` empty on CPU runs)."""
    try:
        with open(path) as f:
            trace = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read profiler trace {path}: {e}") from None
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else []
    steps = set()
    cpu: Dict[str, float] = {}
    gpu: Dict[str, float] = {}
    names = set(profiling.STEP_PHASES)
    for ev in events:
        if not isinstance(ev, dict) or ev.get("ph") != "X":
            continue
        name = ev.get("name", "")
        if name.startswith("ProfilerStep#"):
            steps.add(name)
        elif name in names:
            side = gpu if ev.get("cat") == "gpu_user_annotation" else cpu
            side[name] = side.get(name, 0.0) + float(ev.get("dur", 0.0)) / 1e3
    n = max(len(steps), 1)
    order = [p for p in profiling.STEP_PHASES if p in cpu or p in gpu]
    return {"iterations": len(steps), "phases": order, "cpu": {k: cpu.get(k, 0.0) / n for k in order},
            "gpu": {k: gpu[k] / n for k in order if k in gpu}}


__all__ = ["ProfileSession", "phase_table", "format_phase_table", "phases_from_trace", "TRACE"]
