"""Atomic file writes: write a temporary file next to the target, fsync it, then rename.

A reader (or a resumed run after a crash) sees either the old file or the complete new one, never
a torn write. The temporary name carries the process id so that concurrent writers never share
one. Used for checkpoints, synthetic sets, metrics summaries and images.
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
