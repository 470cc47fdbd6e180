"""The package's error hierarchy.

Every error datadam_fast raises on purpose derives from :class:`DatadamError`, so a caller (the
CLI included) can catch them all with one ``except``; each also derives from the builtin type a
caller would expect (``ValueError`` for bad input, ``RuntimeError`` for an environment problem),
so code written against the builtins keeps working (``datadam_fast.data.DatasetError``, a
missing or corrupt dataset, is a :class:`UserError`).

:data:`KERNEL_FAILURES` is the one record of fused implementations (loss backends, real-side
epilogues) whose kernels failed to compile or launch on a device type in this process, and of the
fallback notices already given: every fallback warns once and skips what failed from then on.
"""
from __future__ import annotations

import warnings
from typing import Dict, Hashable, Optional, Set, Tuple


class DatadamError(Exception):
    """Base class of every error datadam_fast raises deliberately."""


class UserError(DatadamError, ValueError):
    """Bad input from the user (arguments, files, checkpoints); the message says what was expected."""


class UserTypeError(UserError, TypeError):
    """Bad input of the wrong type (not a tensor, integer features, float labels ...)."""


class BackendUnavailable(DatadamError, RuntimeError):
    """A named backend cannot run here (no compiler, no GPU, no Triton ...); the message says why."""


def is_kernel_failure(error: BaseException) -> bool:
    """Whether ``error``, raised while a fused kernel ran, means "this kernel cannot run here" (a
    compiler or ptxas error, an unsupported architecture, a launch out of registers or shared
    memory, a lazily built extension that failed) rather than bad input or a full device.

    Bad input (``ValueError`` / ``TypeError``, :class:`UserError` included) is the caller's to fix
    and would fail the same way in every implementation; ``torch.OutOfMemoryError`` is not cured
    by a fallback (the next implementation needs more memory, not less); ``KeyboardInterrupt`` and
    other ``BaseException`` are never swallowed.
    """
    if not isinstance(error, Exception) or isinstance(error, (ValueError, TypeError)):
        return False
    try:
        import torch
        if isinstance(error, torch.OutOfMemoryError):
            return False
    except (ImportError, AttributeError):  # pragma: no cover - torch is a dependency
        pass
    return True


def describe_failure(error: BaseException, limit: int = 1500) -> str:
    """``Type: message`` of a kernel failure, long compiler logs cut to their last ``limit`` characters
    (a compiler's verdict is at the end of its log)."""
    text = str(error).strip()
    if len(text) > limit:
        text = "..." + text[-limit:]
    return f"{type(error).__name__}: {text}"


class KernelFailures:
    """What failed where (``(implementation, device type) -> why``) and which notices were given.

    Implementations are named by kind, e.g. ``"backend:triton"``, ``"epilogue:cpu"`` (the names
    ``backends --verify`` prints)."""

    def __init__(self):
        self.failed: Dict[Tuple[str, str], str] = {}
        self.warned: Set[Hashable] = set()

    def record(self, impl: str, device_type: str, why: str) -> None:
        self.failed[(impl, device_type)] = why

    def reason(self, impl: str, device_type: str) -> Optional[str]:
        """Why ``impl`` failed on ``device_type`` in this process (None: it has not)."""
        return self.failed.get((impl, device_type))

    def mark_warned(self, key: Hashable) -> bool:
        """Note that the notice ``key`` was given; False if it already was."""
        if key in self.warned:
            return False
        self.warned.add(key)
        return True

    def warn_once(self, key: Hashable, message: str, *, stacklevel: int = 3) -> None:
        if self.mark_warned(key):
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)

    def clear(self) -> None:
        self.failed.clear()
        self.warned.clear()


KERNEL_FAILURES = KernelFailures()


__all__ = ["DatadamError", "UserError", "UserTypeError", "BackendUnavailable", "is_kernel_failure",
           "describe_failure", "KernelFailures", "KERNEL_FAILURES"]
