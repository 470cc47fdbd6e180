"""Opt-in named ranges of the distillation step: NVTX for Nsight Systems, ``record_function`` for
``torch.profiler``.

Off by default and free when off: :func:`nvtx_range` tests one module flag and returns a shared
null context without formatting strings or touching CUDA. NVTX: turn on with
``DATADAM_FAST_NVTX=1`` or :func:`enable`; ranges go to the ``datadam_fast`` domain of the
``nvtx`` package when it is importable, else to ``torch.cuda.nvtx`` when CUDA is available;
otherwise (CPU builds, where ``torch.cuda.nvtx`` raises) they are a no-op. ``torch.profiler``:
:func:`enable_record` (done by ``distill --profile``, see :mod:`datadam_fast.distill.trace`) makes the
same ranges ``torch.profiler.record_function`` ranges of the same names; both can be on at once.
"""
from __future__ import annotations

import contextlib
import os

_NULL = contextlib.nullcontext()
_enabled = os.environ.get("DATADAM_FAST_NVTX", "0") not in ("", "0", "false", "False")
_record = False  # torch.profiler.record_function ranges (distill --profile)
_active = _enabled  # _enabled or _record: the only test made when profiling is off
_impl = None  # resolved lazily: ("nvtx", domain) | ("torch", None) | ("none", None)


def enable() -> None:
    global _enabled, _active
    _enabled = True
    _active = True


def disable() -> None:
    global _enabled, _active
    _enabled = False
    _active = _record


def enable_record() -> None:
    """Also open a ``torch.profiler.record_function`` range of the same name for every range."""
    global _record, _active
    _record = True
    _active = True


def disable_record() -> None:
    global _record, _active
    _record = False
    _active = _enabled


def is_recording() -> bool:
    return _record


def is_enabled() -> bool:
    return _enabled


def _resolve():
    global _impl
    if _impl is None:
        try:
            import nvtx  # type: ignore
            _impl = ("nvtx", nvtx.get_domain("datadam_fast"))
        except Exception:
            import torch
            if torch.cuda.is_available():
                _impl = ("torch", None)
            else:
                _impl = ("none", None)
    return _impl


def backend_name() -> str:
    """Which NVTX implementation ranges go to: 'nvtx', 'torch' or 'none'."""
    return _resolve()[0]


class _Range:
    __slots__ = ("msg", "_handle")

    def __init__(self, msg):
        self.msg = msg

    def __enter__(self):
        kind, dom = _resolve()
        if kind == "nvtx":
            self._handle = dom.push_range(dom.get_event_attributes(message=self.msg))
        elif kind == "torch":
            import torch
            torch.cuda.nvtx.range_push(self.msg)
        return self

    def __exit__(self, *exc):
        kind, dom = _resolve()
        if kind == "nvtx":
            dom.pop_range()
        elif kind == "torch":
            import torch
            torch.cuda.nvtx.range_pop()
        return False


class _Both:
    """An NVTX range and a ``record_function`` range of the same name."""
    __slots__ = ("_nvtx", "_rf")

    def __init__(self, msg):
        import torch
        self._nvtx = _Range(msg)
        self._rf = torch.profiler.record_function(msg)

    def __enter__(self):
        self._nvtx.__enter__()
        self._rf.__enter__()
        return self

    def __exit__(self, *exc):
        self._rf.__exit__(*exc)
        self._nvtx.__exit__(*exc)
        return False


def nvtx_range(msg: str):
    """Context manager: a range named ``msg`` (NVTX and/or ``record_function``, whichever is
    enabled), else a no-op."""
    if not _active:
        return _NULL
    if not _record:
        return _Range(msg)
    if not _enabled:
        import torch
        return torch.profiler.record_function(msg)
    return _Both(msg)


# Every range of the distillation step, in step order. ``distill --profile`` reports these phases;
# a test checks that this list and the ranges in the code agree.
STEP_PHASES = ("datadam_fast.step.sample", "datadam_fast.step.load", "datadam_fast.step.augment_real",
               "datadam_fast.step.real_forward", "datadam_fast.step.augment_syn", "datadam_fast.step.syn_forward",
               "datadam_fast.step.loss", "datadam_fast.step.backward", "datadam_fast.step.update")
