"""One distillation iteration, and nothing else (no file I/O, no printing, no process groups).

    sample   a fresh network (``new_network``), one DSA draw per class, the real batch
    real     real chunks (no_grad) -> per-class sums of the method's statistics -> class targets
    syn      synthetic chunks: forward + method loss + backward -> one pixel-gradient buffer
    update   one optimiser step on the synthetic pixels

``d`` is the :class:`~datadam_fast.distill.engine.Distiller`: the step reads its parts (config,
method, plan, data side, compiled passes) and advances its :class:`~.engine.RunState`. The real
side takes one of three paths, chosen once per run by :class:`RealSide`: the fused ConvNet real
side (:mod:`.real_side`), the compiled pass (:mod:`.compiled`) or the method's eager statistics;
the synthetic side is compiled or eager.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..errors import UserError
from ..profiling import nvtx_range
from .config import REAL_DTYPES
from .methods import class_kwargs, overrides


class ClassSums:
    """Per-class float64 sums of per-sample statistics (and counts) over streamed chunks: chunks
    and shards add up exactly, and the means are the real side's targets."""

    def __init__(self, num_classes: int):
        self.K = num_classes
        self.sums: Optional[List[torch.Tensor]] = None
        self.counts = torch.zeros(num_classes, dtype=torch.float64)  # on the host: no device sync

    def _start(self, widths: Sequence[int], device) -> None:
        if self.sums is None:
            self.sums = [torch.zeros(self.K, w, dtype=torch.float64, device=device) for w in widths]
        elif [s.shape[1] for s in self.sums] != list(widths):
            raise UserError(f"statistics of widths {list(widths)} differ from the first chunk's "
                            f"{[s.shape[1] for s in self.sums]}")

    def add(self, stats: Sequence[torch.Tensor], labels_cpu: torch.Tensor) -> None:
        """Per-sample statistics (``[N, d_i]`` each) of rows with local class ``labels_cpu``."""
        if not stats:
            raise UserError("the method returned no real statistics")
        self._start([s.shape[1] for s in stats], stats[0].device)
        labels = labels_cpu.to(stats[0].device)
        for acc, s in zip(self.sums, stats):
            acc.index_add_(0, labels, s.to(torch.float64))
        self.counts += torch.bincount(labels_cpu, minlength=self.K).to(torch.float64)

    def add_class_sums(self, sums: Sequence[torch.Tensor], first: int, count: int) -> None:
        """Per-class sums (``[n, d_i]`` each) of classes ``first .. first+n-1``, ``count`` samples each."""
        self._start([s.shape[1] for s in sums], sums[0].device)
        rows = slice(first, first + sums[0].shape[0])
        for acc, s in zip(self.sums, sums):
            acc[rows] += s.to(torch.float64)
        self.counts[rows] += float(count)

    def means(self) -> List[torch.Tensor]:
        c = self.counts.to(self.sums[0].device).unsqueeze(1)
        return [(s / c).to(torch.float32) for s in self.sums]


class RealSide:
    """The path of the real side for the whole run: ``"fused"`` (the epilogue kernels, ``fused``
    names the implementation), ``"compiled"`` (the compiled real pass) or ``"eager"`` (the method's
    :meth:`~.methods.Method.real_statistics`), chosen once. A fused CPU epilogue replaces the
    compiled real pass; a fused Triton one runs only where nothing is compiled (inductor fuses
    the compiled pass itself). The fallback chain is fused -> compiled -> eager: a fused kernel
    that fails under ``--real-epilogue auto`` (:meth:`fused_failed`) or a compiler that fails
    (:meth:`compile_failed`) moves the rest of the run one step down, once."""

    def __init__(self, fused: Optional[str], mode: str = "auto", compiled: bool = False):
        self.fused = fused       # "cpu" / "triton" / None
        self.mode = mode         # --real-epilogue (auto: a kernel failure falls back instead of raising)
        self.compiled = compiled  # set once the compiled passes exist (after the memory plan)

    @property
    def path(self) -> str:
        if self.fused and (not self.compiled or self.fused == "cpu"):
            return "fused"
        return "compiled" if self.compiled else "eager"

    def path_without_compiled(self) -> str:
        """The path of a pass run without compiled weights (the memory probe, the timing of --plan-only)."""
        return "fused" if self.fused else "eager"

    def fused_failed(self) -> None:
        self.fused = None

    def compile_failed(self) -> None:
        self.compiled = False


def real_side_copy(net, dtype):
    """``net`` in the real side's dtype: itself when it already is (the step casts once, not per chunk)."""
    p = next(net.parameters(), None)
    if p is None or p.dtype == dtype:
        return net
    return copy.deepcopy(net).to(dtype)


def real_pass(d, net, x, labels, params, sums: ClassSums, local_cpu, mark=None, weights=None) -> None:
    """One real chunk (no_grad; class-major rows, equal counts) into the per-class sums.
    ``weights``: the network's weights for the compiled pass (None: a pass without them)."""
    path = d.real_side.path if weights is not None else d.real_side.path_without_compiled()
    with torch.no_grad():
        if params is not None:
            with nvtx_range("datadam_fast.step.augment_real"):
                x = d.dsa.apply(x, params, labels)
            if mark:
                mark("augment")
        with nvtx_range("datadam_fast.step.real_forward"):
            dtype = REAL_DTYPES[d.cfg.real_dtype]
            first = int(local_cpu[0])
            classes = int(local_cpu[-1]) - first + 1
            if path != "compiled":
                net = real_side_copy(net, dtype)
            # (a fused pass whose kernels fail under auto returns False: this chunk and the rest of
            # the run take the next path of the chain)
            if path == "fused" and _fused_real_pass(d, net, x.to(dtype), classes, first, sums):
                pass
            elif weights is not None and d.real_side.path == "compiled":
                sums.add_class_sums(d.passes.real(weights, x, classes), first, x.shape[0] // classes)
            elif overrides(d.method, "real_class_sums"):
                kw = class_kwargs(d.method, d.k_lo + first)
                sums.add_class_sums(d.method.real_class_sums(net, x.to(dtype), classes, **kw), first,
                                    x.shape[0] // classes)
            else:
                sums.add(d.method.real_statistics(net, x.to(dtype)), local_cpu)
        if mark:
            mark("real_forward")


def _fused_real_pass(d, net, x, classes: int, first: int, sums: ClassSums) -> bool:
    """One real chunk through the fused epilogue into ``sums``. False when the epilogue's kernels
    failed to compile or launch here under ``--real-epilogue auto``: then the real side leaves
    the fused path for the rest of the run (one warning) and the caller runs the next path;
    nothing was added to ``sums`` (and no BatchNorm statistics were updated)."""
    from ..errors import BackendUnavailable, describe_failure, is_kernel_failure
    from .real_side import implementation_failed
    side = d.real_side
    try:
        stats = d.method.fused_real_sums(net, x, classes, side.fused, **class_kwargs(d.method, d.k_lo + first))
    except Exception as e:
        if not is_kernel_failure(e):
            raise
        if side.mode != "auto":
            raise BackendUnavailable(f"--real-epilogue {side.mode}: its kernels failed on "
                                     f"{d.device}: {describe_failure(e, limit=20000)}") from e
        implementation_failed(side.fused, d.device, e)
        side.fused_failed()
        return False
    sums.add_class_sums(stats, first, x.shape[0] // classes)
    return True


def syn_pass(d, net, rows, labels, params, targets: Sequence[torch.Tensor], classes: int, mark=None, weights=None,
             first_class: int = 0):
    """Forward, loss and backward of one synthetic chunk: (grad of rows, {term: detached value}).
    ``first_class``: the chunk's first global class (for class-aware methods)."""
    kw = class_kwargs(d.method, first_class)
    leaf = rows.detach().requires_grad_(True)
    x = leaf
    if d.factor > 1:  # multi-formation: every stored image -> factor^2 full-size images, class-major
        from ..data.formation import decode, decode_labels
        x, labels = decode(leaf, d.factor), decode_labels(labels, d.factor)
    if params is not None:
        with nvtx_range("datadam_fast.step.augment_syn"):
            x = d.dsa.apply(x, params, labels)
        if mark:
            mark("augment")
    split = weights is None and d.method.splits_synthetic_loss()
    with nvtx_range("datadam_fast.step.syn_forward"):
        if weights is not None:  # compiled: forward and loss are one graph
            loss, terms = d.passes.syn(weights, d.layout(x), classes, targets)
        elif split:
            features = d.method.synthetic_features(net, x)
        else:
            loss, terms = d.method.synthetic_loss(net, x, targets, classes, **kw)
    if mark:
        mark("syn_forward")
    if split:
        with nvtx_range("datadam_fast.step.loss"):
            loss, terms = d.method.features_loss(features, targets, classes, **kw)
        if mark:
            mark("loss")
    with nvtx_range("datadam_fast.step.backward"):
        loss.backward()
    if mark:
        mark("backward")
    return leaf.grad, {k: v.detach().float() for k, v in terms.items()}


def step(d, timings: Optional[Dict[str, float]] = None) -> Dict[str, torch.Tensor]:
    """One iteration; ``timings`` (optional) receives seconds per phase. Returns this rank's loss
    terms as 0-d tensors (converting them is a host sync: the caller does it only when it logs)."""
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    clock = [time.perf_counter()]

    def mark(name):
        if timings is not None:
            sync()
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - clock[0]
            clock[0] = now

    with nvtx_range("datadam_fast.step.sample"):
        net = d.networks.draw(d)  # a fresh network, or one of the trained pool
        params = d.dsa.sample(d.K, d.gen, d.device, tuple(d.train_set.image_size)) if d.dsa else None
        if overrides(d.method, "start_iteration"):
            d.method.start_iteration(int(torch.randint(0, 1 << 62, (1,), generator=d.gen)))
        state = d.state
        real_idx = state.next_real_idx
        # the next iteration's real batch is drawn now, so that it loads while this one computes
        state.next_real_idx = d.draw_real_indices()
        d.schedule_real(state.iteration + 1, state.next_real_idx)
    mark("sample")
    mark = mark if timings is not None else None
    if d.passes is not None:
        return _step_compiled(d, net, params, real_idx, mark)
    return _finish(d, net, params, real_idx, mark, None, None)


def _step_compiled(d, net, params, real_idx, mark):
    from .compiled import weights_of
    d.passes.step_begin()
    weights = weights_of(net)
    dtype = REAL_DTYPES[d.cfg.real_dtype]
    real_weights = weights if dtype == torch.float32 else weights_of(net, dtype)
    if d.compile_seconds is not None:
        return _finish(d, net, params, real_idx, mark, weights, real_weights)
    # first compiled step: it compiles (timed); a toolchain without a working compiler falls
    # back to eager for the rest of the run, with one warning
    state = (d.syn.detach().clone(), {k: v.clone() for k, v in d.opt.state.get(d.syn, {}).items()})
    t0 = time.perf_counter()
    try:
        out = _finish(d, net, params, real_idx, mark, weights, real_weights)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path is exact
        import warnings
        warnings.warn(f"torch.compile of the network passes failed ({type(e).__name__}: {str(e)[:200]}); "
                      f"running eagerly (pass --no-compile to skip trying)")
        d.passes = None
        d.real_side.compile_failed()
        with torch.no_grad():
            d.syn.copy_(state[0])
        d.opt.state[d.syn] = state[1]
        d.prefetcher.clear()  # the failed attempt consumed this iteration's chunks: load them again
        d.schedule_real(d.iteration, real_idx)
        d.schedule_real(d.iteration + 1, d.state.next_real_idx)
        return _finish(d, net, params, real_idx, mark, None, None)
    d.compile_seconds = time.perf_counter() - t0
    return out


def real_targets(d, net, params, real_idx, mark, weights) -> List[torch.Tensor]:
    """The real side: only per-class means enter the loss, so it is reduced chunk by chunk."""
    B = d.batch_real
    sums = ClassSums(d.Kl)
    if weights is None or d.real_side.path != "compiled":
        net = real_side_copy(net, REAL_DTYPES[d.cfg.real_dtype])  # once per step, not per chunk
    for j, (a, b) in enumerate(d.real_chunks()):
        with nvtx_range("datadam_fast.step.load"):
            if d.real_all is not None:
                x = d.real_all[real_idx[(d.k_lo + a) * B:(d.k_lo + b) * B].to(d.real_all.device)]
            else:
                x = d.finish_rows(d.prefetcher.get((d.iteration, j)))
        if mark:
            mark("load")
        glob = torch.arange(d.k_lo + a, d.k_lo + b, device=d.device).repeat_interleave(B)
        local = torch.arange(a, b).repeat_interleave(B)
        real_pass(d, net, x, glob, params, sums, local, mark, weights)
        del x
    return sums.means()


def _finish(d, net, params, real_idx, mark, weights, real_weights):
    targets = real_targets(d, net, params, real_idx, mark, real_weights)
    # Synthetic side: forward + loss + backward per class chunk; gradients land in one buffer.
    if d.syn.grad is None:
        d.syn.grad = torch.zeros_like(d.syn)
    grad = d.syn.grad
    totals: Dict[str, torch.Tensor] = {}
    ipc = d.cfg.ipc
    for a, b in d.syn_chunks():
        rows = slice(a * ipc, b * ipc)
        g, terms = syn_pass(d, net, d.syn[rows], d.labels_syn[rows], params, [t[a:b] for t in targets], b - a,
                            mark, weights, first_class=d.k_lo + a)
        grad[rows].copy_(g)
        for k, v in terms.items():
            totals[k] = totals[k] + v if k in totals else torch.zeros((), device=d.device) + v
        del g
    with nvtx_range("datadam_fast.step.update"):
        d.opt.step()
    if mark:
        mark("update")
    d.state.iteration += 1
    loss = sum(totals.values()) if totals else torch.zeros((), device=d.device)
    return {"loss": loss, **{f"loss_{k}": v for k, v in totals.items()}}
