"""Atomic file writes: write a temporary file next to the target, fsync it, then rename.

A reader (or a resumed run after a crash) sees either the old file or the complete new one, never
a torn write. The temporary name carries the process id so that concurrent writers never share
one. Used for checkpoints, synthetic sets, metrics summaries and images. The ``check_writable_*``
functions say before any work whether an output path can be written (nothing is created).
"""
from __future__ import annotations

import os
from typing import Any, Callable, IO, Union

PathLike = Union[str, "os.PathLike[str]"]


def atomic_write(path: PathLike, writer: Callable[[IO], Any], *, binary: bool = True) -> None:
    """Call ``writer(fh)`` on a temporary file beside ``path`` and rename it over ``path``."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def atomic_write_text(path: PathLike, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), binary=False)


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    import torch
    atomic_write(path, lambda fh: torch.save(obj, fh))


__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save"]


def check_writable_dir(path: str, what: str) -> None:
    """``path`` is a directory that exists and is writable, or can be created: checked before any work
    (nothing is created here)."""
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        from .errors import UserError
        raise UserError(f"{what} {path} cannot be created: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        from .errors import UserError
        raise UserError(f"{what} {path} cannot be written: no write permission in {probe}")


def check_writable_file(path: str, what: str) -> None:
    """``path`` can be written as a file: not a directory, in a folder that exists and is writable."""
    from .errors import UserError
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a directory; expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"{what} {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: no write permission in {folder}")
