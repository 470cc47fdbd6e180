import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# The distillation loop compiles its network passes by default (tens of seconds per new shape on
# a 2-core machine). Tests run the eager path unless they ask for compile=True explicitly (see
# tests/distill/test_compiled.py); subprocesses inherit this.
os.environ.setdefault("DATADAM_FAST_COMPILE", "0")
# Under pytest-xdist each worker is a process of its own: torch's default of one intra-op thread per
# core in every worker oversubscribes the cores, and the many small ops of the tests then wait on
# contended threads (an MNIST pool build ran 2.2x slower with 2 threads than with 1 on a busy 2-core
# machine). Each worker takes its share of the cores.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _XDIST_WORKERS))
# A native crash in a subprocess (torchrun ranks, the CLI) prints the Python stack of every thread.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

#: the repository root (subprocesses run from here, so ``-m datadam_fast`` is this checkout)
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def datasets_root():
    """The genuine MNIST / Fashion-MNIST beside the checkout (``$DATADAM_FAST_DATA`` first)."""
    root = shared_datasets()
    if not (root / "mnist" / "raw").is_dir():
        pytest.skip(f"real datasets not found at {root}")
    return root


def _one_thread_env(env=None):
    # two processes (or a test beside a run) on two cores: one thread each, no oversubscription
    return {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}


def cli(*args, timeout: float = 600, env=None, **kw) -> subprocess.CompletedProcess:
    """``python -m datadam_fast ARGS`` from the repository root, one thread, output captured."""
    return subprocess.run([sys.executable, "-m", "datadam_fast", *map(str, args)], capture_output=True, text=True,
                          cwd=str(ROOT), timeout=timeout, env=_one_thread_env(env), **kw)


def torchrun(*args, nproc: int = 2, timeout: float = 600, script=None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=NPROC`` of ``-m datadam_fast ARGS`` (or of ``script
    ARGS``), gloo on the CPU, one thread per process, output captured."""
    target = [str(script)] if script else ["-m", "datadam_fast"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *target, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT), env=_one_thread_env())


def synthetic_images(out):
    """The image tensor of ``OUT/synthetic.pt`` (as stored: for ``--factor F`` the encoded images)."""
    return torch.load(Path(out) / "synthetic.pt", weights_only=True)["images"]


def _cuda_compile_module(session):
    for item in session.items:
        if item.path.name == "test_cuda_compile.py":
            return item.getparent(pytest.Module).obj
    return None


def pytest_collection_finish(session):
    # the nvcc compile check's two units start now, in the background (see test_cuda_compile.py).
    # Under pytest-xdist every worker collects every test: the worker that runs the file starts
    # them instead (its fixture), while the other workers keep the cores busy.
    if session.config.option.collectonly or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    mod = _cuda_compile_module(session)
    if mod is not None:
        mod.start_in_background()


def pytest_sessionfinish(session):
    mod = _cuda_compile_module(session)
    jobs = getattr(mod, "_BACKGROUND", {}) if mod is not None else {}
    for name, j in jobs.items():
        if name != "_dir" and j.proc is not None and j.proc.poll() is None:
            j.proc.kill()  # an interrupted run leaves no nvcc behind
    if "_dir" in jobs:
        import shutil
        shutil.rmtree(jobs["_dir"], ignore_errors=True)
