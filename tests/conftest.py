import os
from pathlib import Path

import pytest
import torch


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
