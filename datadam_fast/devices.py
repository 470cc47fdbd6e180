"""Which device a command runs on: ``--device auto`` (the default) picks the GPU when there is one.

``auto``: ``cuda`` when CUDA is available (under ``torchrun`` the distiller then takes the local
rank's GPU, ``cuda:LOCAL_RANK``), else ``cpu``. ``cpu``, ``cuda`` and ``cuda:N`` are taken as
given, with a clear error when CUDA is asked for but absent. :func:`resolve_device` also says
*why* a device was picked, so that the first log line of a run can state it: a user who expected
the GPU sees at once that the run went to the CPU.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

from .errors import UserError

AUTO = "auto"


def env_world_size() -> int:
    """``WORLD_SIZE`` of a ``torchrun`` job (1 outside one, or when it is not a number)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def resolve_device(spec: str = AUTO) -> Tuple[str, str]:
    """``(device, reason)`` for a ``--device`` value: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    spec = (spec or AUTO).strip()
    if spec.lower() == AUTO:
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            if env_world_size() > 1:
                rank = os.environ.get("LOCAL_RANK", "0")
                return "cuda", f"--device auto: CUDA is available, the local rank's GPU cuda:{rank} ({name})"
            return "cuda", f"--device auto: CUDA is available ({name})"
        return "cpu", "--device auto picked cpu because CUDA is not available"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: CUDA is not available here (use --device auto or cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: this machine has {torch.cuda.device_count()} GPU(s)")
        return spec, f"--device {spec} requested ({torch.cuda.get_device_name(dev)})"
    if dev.type != "cpu":
        raise UserError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    return spec, f"--device {spec} requested"


def device_line(spec: str = AUTO) -> Tuple[str, str]:
    """``(device, "device: cpu (--device auto picked cpu because CUDA is not available)")``."""
    dev, why = resolve_device(spec)
    return dev, f"device: {dev} ({why})"


__all__ = ["AUTO", "resolve_device", "device_line"]
