"""The distillation engine: :mod:`.config` (settings, validation), :mod:`.methods` (the
``Method`` plug-in interface; DataDAM, DM, NCFM), :mod:`.step` (one iteration), :mod:`.real_side` (fused
ConvNet real side), :mod:`.compiled` (compiled passes), :mod:`.planner` + :mod:`.memory` (memory
plan), :mod:`.parallel` (class sharding), :mod:`.prefetch`, :mod:`.rundir` (checkpoint, outputs),
:mod:`.loop` (the run), :mod:`.engine` (:class:`Distiller`, :func:`distill`).

``datadam_fast.distill`` is both this package and a function: ``datadam_fast.distill(cfg, out_dir)``
calls :func:`distill`.
"""
import sys
import types

from .config import DEFAULT_PRESET, PRESETS, REAL_DTYPES, DistillConfig
from .engine import Distiller, distill
from .methods import DM, METHODS, NCFM, DataDAM, Method, class_sums
from .rundir import CHECKPOINT, CHECKPOINT_FORMAT

__all__ = ["distill", "DistillConfig", "Distiller", "Method", "DataDAM", "DM", "NCFM", "METHODS", "class_sums", "PRESETS",
           "DEFAULT_PRESET", "REAL_DTYPES", "CHECKPOINT", "CHECKPOINT_FORMAT"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return self.distill(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
