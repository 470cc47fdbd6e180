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


__all__ = ["DatadamError", "UserError", "UserTypeError", "BackendUnavailable"]
