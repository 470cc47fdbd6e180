"""The synthetic set as an artefact: :mod:`.formats` (every file format a synthetic set is read
from or written to), :mod:`.evaluate` (train fresh networks on it, test on real data),
:mod:`.frozen_model` (test an official trained network as it is), :mod:`.export` (write it for
other tools)."""
from .evaluate import EvalConfig, evaluate_synthetic
from .formats import load_synthetic

__all__ = ["EvalConfig", "evaluate_synthetic", "load_synthetic"]
