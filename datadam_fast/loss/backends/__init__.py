"""Backend registry: which implementation runs, loaded on first use, and the fallback of ``auto``.

A backend computes the per-sample spatial attention maps of several layers at once and their
vector-Jacobian product. That is the only part of the loss that touches ``[N, C, H, W]`` data;
per-class means and the squared distances act on ``[K, H*W]`` and run in PyTorch on top.

Contract (every backend implements both, for a list of layers in one call):

``forward(feats, power) -> (maps, norms)``
    ``feats``: list of ``[N_l, C_l, H_l, W_l]`` tensors (fp32/bf16/fp16/fp64, any strides, same
    device).  ``maps[l]``: ``[N_l, H_l*W_l]`` L2-normalised attention, float32 (float64 for
    float64 input), contiguous.  ``norms[l]``: ``[N_l]`` the pre-normalisation L2 norms ``||a||``
    (same float dtype).  The feature map is read once; ``|f|^p`` is never materialised.

``backward(feats, maps, norms, grad_maps, power) -> grads``
    ``grad_maps[l]``: ``[N_l, H_l*W_l]`` gradient w.r.t. ``maps[l]``.  Returns ``dL/dfeats[l]`` with
    the shape and dtype of ``feats[l]``, channels_last when ``feats[l]`` is channels_last (and not
    also contiguous), contiguous otherwise (``_oplib.grad_memory_format``), reading
    ``feats[l]`` once and writing the gradient once.  Formula: ``reference.spatial_attention_backward``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Tuple, Union

import torch

from ...errors import KERNEL_FAILURES, BackendUnavailable, UserError, describe_failure
from .base import BACKEND_NAMES, DEVICE_TYPES, Backend, NativeOpBackend, ReferenceBackend


def _load_cpu() -> Backend:
    from .cpu import CPUBackend
    return CPUBackend()


def _load_cuda() -> Backend:
    from .cuda import CUDABackend
    return CUDABackend()


def _load_triton() -> Backend:
    from .triton import TritonBackend
    return TritonBackend()


_FACTORIES: Dict[str, Callable[[], Backend]] = {
    "reference": ReferenceBackend,
    "cpu": _load_cpu,
    "cuda": _load_cuda,
    "triton": _load_triton,
}
_CACHE: Dict[str, Backend] = {}
_FAILED: Dict[str, str] = {}  # backends that could not be loaded (no compiler, no triton ...)
# backends whose kernels failed at run time (compile / launch) are in errors.KERNEL_FAILURES as
# "backend:<name>"; ``auto`` skips such a backend on that device type for the rest of the process


def get_backend(name: str) -> Backend:
    """Return the named backend, building/importing it on first use.

    Raises :class:`BackendUnavailable` with the reason when it cannot run here.
    """
    check_backend_name(name, allow_auto=False)
    if name in _CACHE:
        return _CACHE[name]
    if name in _FAILED:
        raise BackendUnavailable(_FAILED[name])
    try:
        backend = _FACTORIES[name]()
    except BackendUnavailable as e:
        _FAILED[name] = str(e)
        raise
    except Exception as e:  # import error, compiler failure ...
        _FAILED[name] = f"backend {name!r} could not be loaded: {type(e).__name__}: {e}"
        raise BackendUnavailable(_FAILED[name]) from e
    _CACHE[name] = backend
    return backend


def check_backend_name(name, *, allow_auto: bool = True) -> str:
    """Validate a user's ``backend=`` string (pure Python: safe to run while tracing)."""
    names = (("auto",) if allow_auto else ()) + tuple(_FACTORIES)
    if not isinstance(name, str) or name not in names:
        raise UserError(f"unknown backend {name!r}; expected one of {names}")
    return name


def _auto_order(device: torch.device) -> Tuple[str, ...]:
    forced = os.environ.get("DATADAM_FAST_BACKEND")
    if forced:
        return (forced,)
    if device.type == "cuda":
        return ("triton", "cuda")
    if device.type == "cpu":
        return ("cpu",)
    return ()


def resolve_backend(name: str, device: torch.device) -> Backend:
    """Map a user's ``backend=`` argument to a backend object for tensors on ``device``.

    ``"auto"`` tries the fastest backend for the device and falls back to ``"reference"`` with a
    one-time warning naming the reason. An explicit name raises if it cannot run.
    """
    if name != "auto":
        backend = get_backend(name)
        if not backend.supports(device):
            raise BackendUnavailable(
                f"backend {name!r} cannot run on device {device} "
                + ("(set TRITON_INTERPRET=1 before importing triton to run Triton kernels on CPU)"
                   if name == "triton" else ""))
        return backend
    backend, reasons = _auto_pick(device)
    if backend.name == "reference" and reasons:
        KERNEL_FAILURES.warn_once((device.type, tuple(reasons)), "datadam_fast: falling back to the reference "
                                  f"backend on {device.type}: " + "; ".join(reasons), stacklevel=3)
    return backend


def _auto_pick(device: torch.device) -> Tuple[Backend, List[str]]:
    """The first backend of ``auto``'s order that loads, supports ``device`` and has not failed
    on it, else the reference; and why each one before it was passed over."""
    reasons = []
    for cand in _auto_order(device):
        failed = KERNEL_FAILURES.reason(f"backend:{cand}", device.type)
        if failed:
            reasons.append(failed)
            continue
        try:
            backend = get_backend(cand)
        except BackendUnavailable as e:
            reasons.append(str(e))
            continue
        if backend.supports(device):
            return backend, reasons
        reasons.append(f"backend {cand!r} does not support device {device}")
    return get_backend("reference"), reasons


def kernel_failed(name: str, device: torch.device, error: BaseException) -> Backend:
    """A kernel of backend ``name`` failed to compile or launch on ``device`` under ``auto``:
    remember it (``auto`` skips that backend on this device type from now on), warn once per
    process naming the error, and return the backend to continue with."""
    msg = f"backend {name!r} failed on {device}: {describe_failure(error)}"
    KERNEL_FAILURES.record(f"backend:{name}", device.type, msg)
    backend, reasons = _auto_pick(device)
    # one warning: the fallback's own "falling back to the reference" notice is folded in here
    KERNEL_FAILURES.mark_warned((device.type, tuple(reasons)))
    others = [r for r in reasons if r != msg]
    KERNEL_FAILURES.warn_once(("kernel failure", name, device.type),
                              f"datadam_fast: {msg}; continuing with backend {backend.name!r} for the rest of this "
                              "process" + (f" ({'; '.join(others)})" if others else ""), stacklevel=4)
    return backend


def run_with_fallback(backend: str, device: torch.device, direction: str, call: Callable[[Backend], object]):
    """``call(resolved backend)``, where a kernel failure (see ``errors.is_kernel_failure``) under
    ``backend="auto"`` moves on to the next backend (one warning per process) and the same call is
    repeated there; with an explicit backend it raises :class:`BackendUnavailable` carrying the
    compiler's / driver's message. The reference backend's errors always propagate."""
    from ...errors import is_kernel_failure
    be = resolve_backend(backend, device)
    while True:
        try:
            return call(be)
        except Exception as e:
            if be.name == "reference" or not is_kernel_failure(e):
                raise
            if backend != "auto":
                raise BackendUnavailable(f"backend {be.name!r} failed in its {direction} kernels on {device}: "
                                         f"{describe_failure(e, limit=20000)}") from e
            be = kernel_failed(be.name, device, e)


def resolved_backend(device: Union[str, torch.device] = "cpu", backend: str = "auto") -> str:
    """Name of the backend that ``backend`` (default ``"auto"``) runs on ``device``.

    Loads (and, the first time, builds) the candidates exactly as a loss call would, so it also
    answers "did auto fall back to the reference, and why" (the fallback warning is issued here
    if it has not been yet).
    """
    return resolve_backend(check_backend_name(backend), torch.device(device)).name


def available_backends(device: torch.device) -> List[str]:
    """Names of the backends that load and support ``device`` (builds extensions if needed)."""
    names = []
    for n in BACKEND_NAMES:
        try:
            if get_backend(n).supports(device):
                names.append(n)
        except BackendUnavailable:
            pass
    return names
