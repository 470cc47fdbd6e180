"""The distillation engine.

``datadam_fast.distill`` is both this package and a function: ``datadam_fast.distill(cfg, out_dir)``
calls :func:`distill`.
"""
import sys
import types

from .engine import (CHECKPOINT, CHECKPOINT_FORMAT, DEFAULT_PRESET, METHODS, PRESETS, REAL_DTYPES, DistillConfig,
                     Distiller, distill)

__all__ = ["distill", "DistillConfig", "Distiller", "PRESETS", "DEFAULT_PRESET", "METHODS", "REAL_DTYPES",
           "CHECKPOINT", "CHECKPOINT_FORMAT"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return self.distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
