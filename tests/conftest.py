import os
from pathlib import Path

import pytest
import torch

# The distillation loop compiles its network passes by default (tens of seconds per new shape on
# a 2-core machine). Tests run the eager path unless they ask for compile=True explicitly (see
# tests/test_compiled.py); subprocesses inherit this.
os.environ.setdefault("DATADAM_FAST_COMPILE", "0")
# A native crash in a subprocess (torchrun ranks, the CLI) prints the Python stack of every thread.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


def shared_datasets() -> Path:
    env = os.environ.get("DATADAM_FAST_DATA")
    if env and Path(env).is_dir():
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def datasets_root():
    root = shared_datasets()
    if not (root / "mnist" / "raw").is_dir():
        pytest.skip(f"real datasets not found at {root}")
    return root
