"""Module names from before the loss and the engine became sub-packages, kept importable.

``import datadam_fast.targets`` gives the very module object ``datadam_fast.loss.targets`` (not a
second copy), resolved on first import so that ``import datadam_fast`` stays light.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

ALIASES = {f"datadam_fast.{old}": f"datadam_fast.{new}" for old, new in {
    "ops": "loss.ops", "_oplib": "loss._oplib", "reference": "loss.reference", "targets": "loss.targets",
    "extractor": "loss.extractor", "_checks": "loss._checks", "backends": "loss.backends",
    "backends.cpu": "loss.backends.cpu", "backends.cuda": "loss.backends.cuda",
    "backends.triton": "loss.backends.triton",
    "real_side": "distill.real_side", "compiled": "distill.compiled", "memory": "distill.memory",
    "parallel": "distill.parallel", "prefetch": "distill.prefetch", "augment": "models.augment",
    "networks": "models.networks",
}.items()}


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in ALIASES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(ALIASES[spec.name])
        self._spec = module.__spec__  # the import system overwrites __spec__ of what we return
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
