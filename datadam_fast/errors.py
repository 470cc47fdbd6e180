"""The package's error hierarchy.

Every error datadam_fast raises on purpose derives from :class:`DatadamError`, so a caller (the
CLI included) can catch them all with one ``except``; each also derives from the builtin type a
caller would expect (``ValueError`` for bad input, ``RuntimeError`` for an environment problem),
so code written against the builtins keeps working.

``datadam_fast.data.DatasetError`` should derive from :class:`UserError` (it is bad input: a
missing or corrupt dataset).
"""
from __future__ import annotations


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


__all__ = ["DatadamError", "UserError", "UserTypeError", "BackendUnavailable", "is_kernel_failure",
           "describe_failure"]
