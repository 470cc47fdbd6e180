"""Opt-in NVTX ranges for Nsight Systems.

Off by default and free when off: :func:`nvtx_range` returns a shared null context without
formatting strings or touching CUDA. Turn on with ``DATADAM_FAST_NVTX=1`` or :func:`enable`.
Ranges go to the ``datadam_fast`` domain of the ``nvtx`` package when it is importable, else to
``torch.cuda.nvtx`` when CUDA is available; otherwise (CPU builds, where ``torch.cuda.nvtx``
raises) they are a no-op.
"""
from __future__ import annotations

import contextlib
import os

_NULL = contextlib.nullcontext()
_enabled = os.environ.get("DATADAM_FAST_NVTX", "0") not in ("", "0", "false", "False")
_impl = None  # resolved lazily: ("nvtx", domain) | ("torch", None) | ("none", None)


def enable() -> None:
    global _enabled
    _enabled = True


def disable() -> None:
    global _enabled
    _enabled = False


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


def nvtx_range(msg: str):
    """Context manager: an NVTX range named ``msg`` when profiling is enabled, else a no-op."""
    if not _enabled:
        return _NULL
    return _Range(msg)
