import os
from pathlib import Path

import pytest
import torch

# The distillation loop compiles its network passes by default (tens of seconds per new shape on
# a 2-core machine). Tests run the eager path unless they ask for compile=True explicitly (see
# tests/distill/test_compiled.py); subprocesses inherit this.
os.environ.setdefault("DATADAM_FAST_COMPILE", "0")
# A native crash in a subprocess (torchrun ranks, the CLI) prints the Python stack of every thread.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


#: the small digits run the engine tests share: IPC 2, 6 real images per class, a width-16 ConvNet,
#: no evaluation (tests add what they vary)
SMALL_RUN = dict(dataset="digits", ipc=2, batch_real=6, width=16, eval_every=-1)


def run_small(out=None, *, iterations: int = 3, method=None, **overrides):
    """Distill :data:`SMALL_RUN` (with ``overrides``) for ``iterations`` into ``out`` (None: no
    files); returns the finished :class:`~datadam_fast.distill.Distiller`."""
    from datadam_fast.distill import DistillConfig, Distiller
    cfg = DistillConfig(iterations=iterations, **{**SMALL_RUN, **overrides})
    with Distiller(cfg, None if out is None else str(out), progress=False, method=method) as d:
        d.run()
    return d


def assert_close_to_reference(actual, expected, rtol: float, what: str = "", *, elementwise_rtol: float = 0.0,
                              floor: float = 1e-30) -> None:
    """The package's one "close to the reference" metric (as ``backends --verify`` reports it):
    the shapes agree, NaN and +-inf sit exactly where the reference has them, and on the finite
    entries ``|a - e| <= rtol * max|e| + elementwise_rtol * |e|`` (``max|e|`` at least ``floor``)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} vs reference {tuple(e.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(e)), (
        f"{what}: NaN at {int(torch.isnan(a).sum())} entries, the reference at {int(torch.isnan(e).sum())}")
    fin = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), fin) and torch.equal(a[torch.isinf(e)], e[torch.isinf(e)]), (
        f"{what}: infinities differ from the reference")
    if not fin.any():
        return
    a, e = a[fin], e[fin]
    scale = max(e.abs().max().item(), floor)
    err = (a - e).abs()
    bad = err > rtol * scale + elementwise_rtol * e.abs()
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{e.numel()} elements off; max abs err {err.max().item():.3e} "
                           f"vs max |reference| {scale:.3e} (rtol {rtol}, elementwise {elementwise_rtol})")


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
