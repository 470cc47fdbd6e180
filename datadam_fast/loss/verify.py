"""Self-check of the fused kernels on this machine: ``datadam-fast backends --verify``.

Every fused implementation that can run on the device is compared with the pure-PyTorch
reference on the same inputs:

* the loss backends (``cpu``, ``cuda``, ``triton``): attention maps (forward) and the feature
  gradient (backward), computed by the reference in float64 from the very same input values;
* the real-side epilogue (``cpu``, ``triton``; :mod:`datadam_fast.distill.real_side`): per-class attention
  sums and embeddings of a ConvNet, against the eager network in the same dtype followed by the
  reference maps;
* the statistics ops (``stats:cpu``, ``stats:triton``; :mod:`datadam_fast.loss.characteristic`,
  :mod:`datadam_fast.loss.channels`): the characteristic-function class sums and both their
  gradients (per-class frequencies, shuffled labels), channel attention and channel moments and
  their feature gradients, against the float64 reference of the same input values.

Cases: a small odd-sized problem and a DataDAM-sized one (``[N, 128, 32, 32] + [N, 128, 16, 16]``,
a 128-wide 3-block ConvNet on 32x32 images), float32 and bfloat16, NCHW and channels_last. N is
smaller on a CPU (the test suite runs this; Triton's interpreter executes every program in Python).

Error metric, per output: ``max abs err`` and ``max rel err = max abs err / max |reference|``
(relative to the output's scale, so that entries near zero do not dominate). A row passes when the
relative error is within its tolerance (see ``TOLERANCES``) and the outputs have the same NaN
pattern, shape and dtype. ``median us`` is the median wall time of the fused call (synchronised on
a GPU); under the Triton interpreter it measures the interpreter, not a kernel.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

#: relative tolerances (max abs err / max |reference|). Why these values:
#: * forward maps are accumulated in float32 from the exact input values in every implementation,
#:   so only summation order and, on a GPU, the hardware ``ex2.approx`` used for ``|f|^p`` with a
#:   non-integer ``p`` (about 1e-7 to 1e-6 relative per term, subnormals flushed) separate them
#:   from the float64 reference: 5e-5 leaves a wide margin over both;
#: * float32 gradients go through the normalisation's projection ``(g - m <m, g>) / ||a||`` whose
#:   cancellation amplifies float32 rounding: 1e-4;
#: * bfloat16 gradients are rounded once to bfloat16 (8 bits of mantissa; an output can land on
#:   either side of a rounding boundary): 1.6e-2;
#: * the real-side epilogue against the eager network: float32 2e-5 (same formulas, different
#:   summation order and a fused multiply-add); bfloat16 4e-2 (eager rounds to bfloat16 after every
#:   op, the fused pass once per block, compounded over three blocks).
TOLERANCES = {
    ("loss", "forward", torch.float32): 5e-5,
    ("loss", "forward", torch.bfloat16): 5e-5,
    ("loss", "backward", torch.float32): 1e-4,
    ("loss", "backward", torch.bfloat16): 1.6e-2,
    ("epilogue", "forward", torch.float32): 2e-5,
    ("epilogue", "forward", torch.bfloat16): 4e-2,
    # the statistics: float32 accumulation of the same values (the CF's phases t.e through a float32
    # GEMM, then cos/sin: ~1e-6 relative per phase); bfloat16 gradients are rounded once
    ("stats", "forward", torch.float32): 5e-5,
    ("stats", "forward", torch.bfloat16): 5e-5,
    ("stats", "backward", torch.float32): 1e-4,
    ("stats", "backward", torch.bfloat16): 1.6e-2,
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")


@dataclass
class Row:
    backend: str        # loss backend name, or "epilogue:<impl>"
    case: str           # problem, dtype, layout, direction
    max_abs_err: float
    max_rel_err: float
    tolerance: float
    passed: bool
    median_us: float
    error: Optional[str] = None  # an exception or a shape / dtype / NaN-pattern mismatch


# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeat: int) -> Tuple[object, float]:
    """(result of the first call, median microseconds over ``repeat`` calls). With ``repeat > 1``
    the first call (kernel compilation, allocator warm-up) is not timed; ``fn`` then runs
    ``repeat + 1`` times."""
    out = fn() if repeat > 1 else None
    times = []
    for _ in range(max(1, repeat)):
        _sync(device)
        t0 = time.perf_counter()
        r = fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e6)
        out = r if out is None else out
    return out, statistics.median(times)


def _compare(actual: torch.Tensor, expected: torch.Tensor) -> Tuple[float, float, Optional[str]]:
    """(max abs err, max rel err, mismatch or None); NaN must sit where the reference has NaN."""
    if tuple(actual.shape) != tuple(expected.shape):
        return float("inf"), float("inf"), f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        return float("nan"), float("nan"), "NaN pattern differs from the reference"
    ok = ~torch.isnan(e)
    if not ok.any():
        return 0.0, 0.0, None
    err = (a[ok] - e[ok]).abs().max().item()
    scale = max(e[ok].abs().max().item(), 1e-30)
    return err, err / scale, None


def _row(backend: str, case: str, tol: float, us: float, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]],
         dtype_expected: Optional[Sequence[torch.dtype]] = None) -> Row:
    worst_abs = worst_rel = 0.0
    for i, (a, e) in enumerate(pairs):
        if dtype_expected is not None and a.dtype != dtype_expected[i]:
            return Row(backend, case, float("inf"), float("inf"), tol, False, us,
                       f"output {i}: dtype {a.dtype}, expected {dtype_expected[i]}")
        ab, rel, why = _compare(a, e)
        if why:
            return Row(backend, case, ab, rel, tol, False, us, f"output {i}: {why}")
        worst_abs, worst_rel = max(worst_abs, ab), max(worst_rel, rel)
    return Row(backend, case, worst_abs, worst_rel, tol, worst_rel <= tol, us)


def _failed(backend: str, case: str, tol: float, e: BaseException) -> Row:
    from ..errors import describe_failure
    return Row(backend, case, float("nan"), float("nan"), tol, False, float("nan"), describe_failure(e, 500))


class _Rows(list):
    """A list of rows that reports each one as it is added (streamed output, incremental JSON)."""

    def __init__(self, on_row: Callable[[Row], None]):
        super().__init__()
        self._on_row = on_row

    def append(self, row: Row) -> None:
        super().append(row)
        self._on_row(row)


# ------------------------------------------------------------------------------------------------
# loss backends
# ------------------------------------------------------------------------------------------------
def loss_problems(device: torch.device) -> List[Tuple[str, List[Tuple[int, int, int, int]], float]]:
    """(name, layer shapes, power): an odd-sized multi-layer problem with a non-integer power (the
    GPU's approximate exp2 path) and DataDAM's own shapes at power 4."""
    n = 16 if device.type == "cuda" else 2
    return [("small p=2.5", [(3, 5, 9, 7), (3, 12, 6, 5)], 2.5),
            (f"datadam [{n},128,32,32]+[{n},128,16,16] p=4", [(n, 128, 32, 32), (n, 128, 16, 16)], 4.0)]


def _make_feats(shapes, dtype, layout, device, seed) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        f = torch.randn(s, generator=g).to(dtype)
        if layout == "channels_last":
            f = f.contiguous(memory_format=torch.channels_last)
        out.append(f.to(device))
    return out


def verify_loss_backend(name: str, device: torch.device, repeat: int,
                        on_row: Callable[[Row], None] = lambda r: None, quick: bool = False) -> List[Row]:
    from .backends import ReferenceBackend, get_backend
    be = get_backend(name)
    ref = ReferenceBackend()
    rows = _Rows(on_row)
    for pname, shapes, power in loss_problems(device)[:1 if quick else None]:
        for dname, dtype in DTYPES.items():
            for layout in LAYOUTS:
                case = f"{pname} {dname} {layout}"
                feats = _make_feats(shapes, dtype, layout, device, seed=len(rows))
                exact = [f.double() for f in feats]  # the same values, reference in float64
                rmaps, rnorms = ref.forward(exact, power)
                tol_f = TOLERANCES[("loss", "forward", dtype)]
                try:
                    (maps, norms), us = _timed(lambda: be.forward(feats, power), device, repeat)
                except Exception as e:  # noqa: BLE001 - every failure becomes a failing row
                    rows.append(_failed(name, f"{case} fwd", tol_f, e))
                    continue
                rows.append(_row(name, f"{case} fwd", tol_f, us, list(zip(maps, rmaps)) + list(zip(norms, rnorms)),
                                 [torch.float32] * (2 * len(feats))))
                g = torch.Generator().manual_seed(1000 + len(rows))
                gmaps = [torch.randn(m.shape, generator=g).to(device) for m in rmaps]
                rgrads = ref.backward(exact, rmaps, rnorms, [x.double() for x in gmaps], power)
                tol_b = TOLERANCES[("loss", "backward", dtype)]
                try:
                    grads, us = _timed(lambda: be.backward(feats, maps, norms, gmaps, power), device, repeat)
                except Exception as e:  # noqa: BLE001
                    rows.append(_failed(name, f"{case} bwd", tol_b, e))
                    continue
                rows.append(_row(name, f"{case} bwd", tol_b, us, list(zip(grads, rgrads)), [dtype] * len(feats)))
    return list(rows)


# ------------------------------------------------------------------------------------------------
# statistics ops
# ------------------------------------------------------------------------------------------------
def statistics_problems(device: torch.device, impl: str = "cpu"):
    """(name, CF shape (K, n per class, D, F), feature map shape): odd sizes, and NCFM's CIFAR-10
    real side per class (D = 2048, F = 4096) scaled down on a CPU. The Triton kernels on a CPU run
    under the interpreter (one Python call per program and op): there a medium problem with several
    tiles per axis stands in for the CIFAR-like one."""
    if device.type == "cuda":
        return [("small", (3, 7, 33, 37), (5, 7, 9, 6)), ("cifar", (10, 64, 2048, 4096), (64, 128, 32, 32))]
    if impl == "triton":
        return [("small", (3, 7, 33, 37), (5, 7, 9, 6)), ("medium", (2, 9, 80, 200), (4, 20, 9, 7))]
    return [("small", (3, 7, 33, 37), (5, 7, 9, 6)), ("cifar-ish", (4, 16, 256, 512), (8, 32, 16, 16))]


def verify_statistics(impl: str, device: torch.device, repeat: int,
                      on_row: Callable[[Row], None] = lambda r: None, quick: bool = False) -> List[Row]:
    from . import reference as R
    name = f"stats:{impl}"
    rows = _Rows(on_row)
    for pname, (K, n, D, F), fshape in statistics_problems(device, impl)[:1 if quick else None]:
        for dname, dtype in DTYPES.items():
            g = torch.Generator().manual_seed(len(rows))
            emb = torch.randn(K * n, D, generator=g).div_(D ** 0.5).to(dtype)
            freqs = torch.randn(K, F, D, generator=g).to(dtype)
            lab = torch.arange(K).repeat_interleave(n)[torch.randperm(K * n, generator=g)]
            gc, gs = torch.randn(K, F, generator=g), torch.randn(K, F, generator=g)
            e64, t64 = emb.double(), freqs.double()
            want = R.cf_class_sums(e64, t64, lab, K)
            wgrad = R.cf_class_sums_backward(e64, t64, lab, K, gc.double(), gs.double())
            e, t, lb = emb.to(device), freqs.to(device), lab.to(device)
            case = f"cf {pname} K={K} n={n} D={D} F={F} {dname}"
            tol = TOLERANCES[("stats", "forward", dtype)]
            try:
                (c, s, _), us = _timed(lambda: torch.ops.datadam_fast.cf_class_sums_fwd(e, t, lb, K, False, impl),
                                       device, repeat)
                rows.append(_row(name, f"{case} fwd", tol, us, [(c, want[0]), (s, want[1])]))
            except Exception as ex:  # noqa: BLE001 - every failure becomes a failing row
                rows.append(_failed(name, f"{case} fwd", tol, ex))
            tol = TOLERANCES[("stats", "backward", dtype)]
            try:
                none = e.new_empty((0,))
                (ge, gt), us = _timed(lambda: torch.ops.datadam_fast.cf_class_sums_bwd(
                    e, t, lb, K, gc.to(device), gs.to(device), none, True, True, impl), device, repeat)
                rows.append(_row(name, f"{case} bwd", tol, us, [(ge, wgrad[0]), (gt, wgrad[1])], [dtype, dtype]))
            except Exception as ex:  # noqa: BLE001
                rows.append(_failed(name, f"{case} bwd", tol, ex))
            for layout in LAYOUTS:
                f = _make_feats([fshape], dtype, layout, device, seed=len(rows))[0]
                f64 = f.double().cpu()
                w = torch.randn(fshape[:2], generator=g)
                ra, rn = R.channel_attention_and_norms(f64, 4.0)
                rga = R.channel_attention_backward(f64, ra, rn, w.double(), 4.0)
                m1, m2 = R.channel_moments(f64)
                rgm = (w.double()[:, :, None, None] + 2 * f64 * w.double()[:, :, None, None]) / (fshape[2] * fshape[3])
                fcase = f"channels {pname} {list(fshape)} {dname} {layout}"
                for what, fwd, wants, bwd, gwant in (
                        ("attention p=4", lambda: torch.ops.datadam_fast.channel_attention_fwd(f, 4.0, impl), (ra, rn),
                         lambda a: torch.ops.datadam_fast.channel_attention_bwd(f, a[0], a[1], w.to(device), 4.0,
                                                                                impl), rga),
                        ("moments", lambda: torch.ops.datadam_fast.channel_moments_fwd(f, impl), (m1, m2),
                         lambda a: torch.ops.datadam_fast.channel_moments_bwd(f, w.to(device), w.to(device), impl),
                         rgm)):
                    tol_f, tol_b = TOLERANCES[("stats", "forward", dtype)], TOLERANCES[("stats", "backward", dtype)]
                    try:
                        out, us = _timed(fwd, device, repeat)
                        rows.append(_row(name, f"{fcase} {what} fwd", tol_f, us, list(zip(out, wants))))
                        grad, us = _timed(lambda: bwd(out), device, repeat)
                        rows.append(_row(name, f"{fcase} {what} bwd", tol_b, us, [(grad, gwant)], [dtype]))
                    except Exception as ex:  # noqa: BLE001
                        rows.append(_failed(name, f"{fcase} {what}", tol_f, ex))
    return list(rows)


# ------------------------------------------------------------------------------------------------
# real-side epilogue
# ------------------------------------------------------------------------------------------------
def epilogue_problems(device: torch.device) -> List[Tuple[str, dict, int, Tuple[int, int, int]]]:
    """(name, ConvNet options, images per class, image [C, H, W]); two classes each."""
    per = 8 if device.type == "cuda" else 1
    return [("small convnet w8 d2 instancenorm/avgpool 13x11", dict(width=8, depth=2, norm="instancenorm",
                                                                    pooling="avgpool"), 2, (1, 13, 11)),
            (f"datadam convnet w128 d3 batchnorm/maxpool 32x32 N={2 * per}",
             dict(width=128, depth=3, norm="batchnorm", pooling="maxpool"), per, (3, 32, 32))]


def _eager_class_sums(net, x, classes: int, power: float):
    """The oracle of ``real_side.real_class_sums``: the eager network, then reference maps."""
    from .reference import spatial_attention
    feats, emb = net.features_and_embedding(x)
    per = x.shape[0] // classes
    att = [spatial_attention(f, power).view(classes, per, -1).sum(1) for f in feats]
    return att, emb.flatten(1).float().view(classes, per, -1).sum(1)


def verify_epilogue(impl: str, device: torch.device, repeat: int,
                    on_row: Callable[[Row], None] = lambda r: None, quick: bool = False) -> List[Row]:
    import copy
    from ..models.networks import get_network
    from ..distill.real_side import real_class_sums
    rows = _Rows(on_row)
    name = f"epilogue:{impl}"
    for pname, opts, per, (ch, H, W) in epilogue_problems(device)[:1 if quick else None]:
        for dname, dtype in DTYPES.items():
            for layout in LAYOUTS:
                case = f"{pname} {dname} {layout} fwd"
                tol = TOLERANCES[("epilogue", "forward", dtype)]
                with torch.random.fork_rng(devices=[]):  # leave the caller's random stream alone
                    torch.manual_seed(len(rows))
                    net = get_network("ConvNet", ch, 2, (H, W), act="relu", **opts)
                net = net.to(device=device, dtype=dtype).train()
                x = torch.randn(2 * per, ch, H, W, generator=torch.Generator().manual_seed(len(rows))).to(dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                    net = net.to(memory_format=torch.channels_last)
                x = x.to(device)
                with torch.no_grad():
                    ratt, remb = _eager_class_sums(copy.deepcopy(net), x, 2, 4.0)
                    # a fresh copy per call: train-mode BatchNorm updates its running statistics
                    nets = iter([copy.deepcopy(net) for _ in range(repeat + 1)])
                    try:
                        (att, emb), us = _timed(lambda: real_class_sums(next(nets), x, 2, 4.0, impl=impl),
                                                device, repeat)
                    except Exception as e:  # noqa: BLE001
                        rows.append(_failed(name, case, tol, e))
                        continue
                rows.append(_row(name, case, tol, us, list(zip(att, ratt)) + [(emb, remb)]))
    return list(rows)


# ------------------------------------------------------------------------------------------------
def _repeat(impl: str, device: torch.device, repeat: int) -> int:
    """Timed calls per case: one under Triton's interpreter (it times Python, not a kernel)."""
    return 1 if impl == "triton" and device.type == "cpu" else repeat


#: as ``loss.backends.DEVICE_TYPES``, for the real-side epilogue's implementations
_EPILOGUE_DEVICE_TYPES = {"cpu": ("cpu",), "triton": ("cuda", "cpu")}


def implementation_names() -> List[str]:
    """Every name ``verify`` checks: the fused loss backends, then ``epilogue:<impl>``."""
    from .backends import BACKEND_NAMES
    from ..distill.real_side import IMPLS
    return [n for n in BACKEND_NAMES if n != "reference"] + [f"epilogue:{i}" for i in IMPLS] + \
        [f"stats:{i}" for i in STATS_IMPLS]


#: the fused implementations of the statistics ops and the device types they run on
STATS_IMPLS = ("cpu", "triton")
_STATS_DEVICE_TYPES = {"cpu": ("cpu",), "triton": ("cuda", "cpu")}


def verify(device="cpu", repeat: Optional[int] = None, log: Callable[[str], None] = lambda s: None,
           on_row: Callable[[Row], None] = lambda r: None, quick: bool = False) -> Tuple[List[Row], List[str]]:
    """Run every fused implementation available on ``device``: (rows, lines ``"<name>: <why>"``
    naming each one that is not available here). ``on_row`` sees each row as it finishes.
    ``quick``: only the first (small, odd-sized) problem of each kind."""
    from .backends import BACKEND_NAMES, DEVICE_TYPES, BackendUnavailable, get_backend
    from ..models.networks import get_network
    from ..distill.real_side import IMPLS, unavailable_reason
    device = torch.device(device)
    if repeat is None:
        repeat = 20 if device.type == "cuda" else 2
    rows: List[Row] = []
    skipped: List[str] = []
    for name in BACKEND_NAMES:
        if name == "reference":
            continue
        if device.type not in DEVICE_TYPES.get(name, (device.type,)):
            skipped.append(f"{name}: does not run on {device.type} (not loaded)")
            continue
        try:
            ok = get_backend(name).supports(device)
            why = "" if ok else f"does not run on {device}"
        except BackendUnavailable as e:
            ok, why = False, str(e).splitlines()[0][:300]
        if not ok:
            skipped.append(f"{name}: {why}")
            continue
        log(f"verifying backend {name} on {device}")
        rows += verify_loss_backend(name, device, _repeat(name, device, repeat), on_row, quick)
    probe = get_network("ConvNet", 1, 2, (16, 16), width=4, depth=2)
    for impl in IMPLS:
        if device.type not in _EPILOGUE_DEVICE_TYPES.get(impl, (device.type,)):
            skipped.append(f"epilogue:{impl}: does not run on {device.type} (not loaded)")
            continue
        why = unavailable_reason(probe, device, impl)
        if why:
            skipped.append(f"epilogue:{impl}: {why}")
            continue
        log(f"verifying the {impl} real-side epilogue on {device}")
        rows += verify_epilogue(impl, device, _repeat(impl, device, repeat), on_row, quick)
    for impl in STATS_IMPLS:
        if device.type not in _STATS_DEVICE_TYPES[impl]:
            skipped.append(f"stats:{impl}: does not run on {device.type} (not loaded)")
            continue
        try:
            ok = get_backend(impl).supports(device)
            why = "" if ok else f"does not run on {device}"
        except BackendUnavailable as e:
            ok, why = False, str(e).splitlines()[0][:300]
        if not ok:
            skipped.append(f"stats:{impl}: {why}")
            continue
        log(f"verifying the {impl} statistics ops on {device}")
        rows += verify_statistics(impl, device, _repeat(impl, device, repeat), on_row, quick)
    return rows, skipped


def format_table(rows: Sequence[Row]) -> str:
    head = ("backend", "case", "max abs err", "max rel err", "rel tolerance", "pass", "median us")
    body = [(r.backend, r.case, f"{r.max_abs_err:.2e}", f"{r.max_rel_err:.2e}", f"{r.tolerance:.1e}",
             "yes" if r.passed else "NO", f"{r.median_us:.0f}") for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _row_line(r: Row) -> str:
    return (f"{r.backend} | {r.case} | abs {r.max_abs_err:.2e} rel {r.max_rel_err:.2e} (tol {r.tolerance:.1e}) | "
            f"{'pass' if r.passed else 'FAIL'} | {r.median_us:.0f} us" + (f" | {r.error}" if r.error else ""))


def _check_required(require: Sequence[str]) -> List[str]:
    from ..errors import UserError
    names = implementation_names()
    req = list(names) if list(require) == ["all"] else list(require)
    unknown = [r for r in req if r not in names]
    if unknown:
        raise UserError(f"--require: unknown implementation(s) {', '.join(unknown)}; expected 'all' or names "
                        f"from {', '.join(names)}")
    return req


def run(device="cpu", json_path: Optional[str] = None, out=print, require: Sequence[str] = (),
        quick: bool = False) -> int:
    """The ``backends --verify`` command: print the table, write JSON, 0 when every row passes and
    every implementation named in ``require`` (``["all"]``: every one) was verified.

    Each row goes to stderr as it finishes and, with ``json_path``, the JSON is rewritten after
    every row, so that a run stopped midway (a time limit, Ctrl-C) keeps the rows it measured."""
    import sys
    from ..errors import UserError
    from .._io import atomic_write_text
    given = device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {given}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    required = _check_required(require)
    t0 = time.perf_counter()
    done: List[Row] = []

    def write(rows, skipped, complete, missing=()):
        if not json_path:
            return
        failures = [r for r in rows if not r.passed]
        doc = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "torch": torch.__version__, "complete": complete, "rows": [asdict(r) for r in rows],
               "not_verified": skipped, "required": required, "required_not_verified": list(missing),
               "passed": complete and bool(rows) and not failures and not missing, "quick": quick}
        atomic_write_text(json_path, json.dumps(doc, indent=2))

    def on_row(r: Row) -> None:
        done.append(r)
        print(_row_line(r), file=sys.stderr, flush=True)
        write(done, [], False)

    rows, skipped = verify(device, log=lambda s: print(s, file=sys.stderr, flush=True), on_row=on_row, quick=quick)
    out(format_table(rows))
    for s in skipped:
        out(f"not verified (unavailable here): {s}")
    failures = [r for r in rows if not r.passed]
    for r in failures:
        out(f"FAILED: {r.backend} {r.case}: " + (r.error or f"max rel err {r.max_rel_err:.3e} > tolerance "
                                                                f"{r.tolerance:.1e}"))
    verified = {r.backend for r in rows}
    missing = [n for n in required if n not in verified]
    reasons = {s.split(": ", 1)[0]: s.split(": ", 1)[-1] for s in skipped}
    for n in missing:
        out(f"FAILED: {n} was required (--require) but not verified: {reasons.get(n, 'no rows')}")
    out(f"{len(rows) - len(failures)}/{len(rows)} checks passed on {device} in {time.perf_counter() - t0:.1f} s")
    write(rows, skipped, True, missing)
    if not rows:
        out("FAILED: no fused implementation could be verified on this device")
        return 1
    return 1 if failures or missing else 0
