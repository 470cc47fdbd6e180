"""Every Triton launch the launchers make for CUDA-shaped problems, compiled ahead of time for
sm_80 and sm_90 on this CPU-only machine (``datadam_fast.kernels.codegen``), checked against the
budgets written next to the kernels: it compiles, no stack or local memory, registers within
``REG_BUDGET``, ``ld.global.v4`` (and ``st.global.v4`` for gradients) wherever the launcher
proved 16-byte alignment, shared memory within 48 KB.

The compilation runs in a subprocess without ``TRITON_INTERPRET`` (the suite runs under it, and
interpreted kernels cannot be compiled); it uses whichever triton is importable, so CI runs this
file a second time with triton 3.6 first on ``PYTHONPATH``.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from datadam_fast.kernels import codegen as CG  # noqa: E402
from datadam_fast.kernels import real_epilogue as RE  # noqa: E402
from datadam_fast.kernels import spatial_attention as SA  # noqa: E402

pytestmark = pytest.mark.slow  # GPU code generation, about a minute per triton version

STREAMING = ("fwd_accum", "bwd_grad", "real_epilogue_apply")


@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    """All records, compiled by one process per core (at most 4; each compile key once)."""
    d = tmp_path_factory.mktemp("codegen")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    n = max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, "-m", "datadam_fast.kernels.codegen", "--json", str(d / f"{i}.json"),
                               "--quiet", "--shard", f"{i}/{n}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    errs = [p.communicate(timeout=1500)[1] for p in procs]
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err[-4000:]
    return CG.merge([json.loads((d / f"{i}.json").read_text()) for i in range(n)])


def _fail(rows):
    return "\n".join(f"{r['kernel']} {r['arch']} [{r['config']}] {r.get('constexprs')}: {'; '.join(CG.violations(r))}"
                     for r in rows)


def test_ran_under_the_importable_triton(codegen):
    assert codegen["triton"] == triton.__version__
    assert codegen["records"] and codegen["unique_compiles"] > 20


def test_every_kernel_and_arch_is_covered(codegen):
    seen = {(r["kernel"], r["arch"]) for r in codegen["records"]}
    for name in CG.REG_BUDGET:
        for arch in CG.ARCHS:
            assert (name, f"sm_{arch}") in seen, f"{name} was never compiled for sm_{arch}"
    cfg = {r["config"] for r in codegen["records"]}
    for needle in ("fp32 nchw", "bf16 cl", "fp16 nchw", "strided", "slice", "p=1 ", "p=2 ", "p=2.5", "L=4",
                   "odd", "leakyrelu", "swish", "sigmoid", "maxpool", "none"):
        assert any(needle in c for c in cfg), needle


def test_everything_compiles(codegen):
    bad = [r for r in codegen["records"] if not r["compiled"]]
    assert not bad, _fail(bad)


def test_no_stack_or_local_memory(codegen):
    bad = [r for r in codegen["records"] if r["compiled"] and (r["stack"] or r["local"] or r["ptx_local"])]
    assert not bad, _fail(bad)


def test_registers_within_the_kernel_files_budgets(codegen):
    for name in STREAMING:
        assert CG.REG_BUDGET[name] <= 128
    bad = [r for r in codegen["records"] if r["compiled"] and r["registers"] > r["budget"]]
    assert not bad, _fail(bad)


def test_vector_accesses_where_alignment_is_proven(codegen):
    bad = [r for r in codegen["records"] if r["compiled"] and
           ((r["expect_v4_loads"] and not r["v4_loads"]) or (r["expect_v4_stores"] and not r["v4_stores"]))]
    assert not bad, _fail(bad)


def test_shared_memory_within_48kb(codegen):
    bad = [r for r in codegen["records"] if r["compiled"] and max(r["shared"], r["static_shared"]) > CG.SHARED_BUDGET]
    assert not bad, _fail(bad)


@pytest.mark.parametrize("kernel", ["fwd_accum", "bwd_grad"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_datadam_streaming_kernels_are_vectorised(codegen, kernel, dtype, fmt):
    """The acceptance rows: DataDAM's real shapes, aligned, so every one must have VEC > 1."""
    rows = [r for r in codegen["records"] if r["kernel"] == kernel and r["config"].startswith(f"real32 {dtype} {fmt} p=4")]
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in CG.ARCHS}
    for r in rows:
        assert r["expect_v4_loads"], r
        assert r["v4_loads"] and (kernel != "bwd_grad" or r["v4_stores"]), _fail([r])
        assert r["registers"] <= 128 and not r["stack"], _fail([r])


# --- the plans are what the launchers run ---------------------------------------------------
def test_vector_expectation_follows_the_alignment_proof():
    """A tensor one element off a 16-byte boundary must not claim vectors; an aligned one must."""
    off = torch.empty(4 * 8 * 32 * 32 + 1, device="meta")[1:].view(4, 8, 32, 32)
    aligned = torch.empty((4, 8, 32, 32), device="meta")
    for f, v16 in ((off, False), (aligned, True)):
        acc = [ln for ln in SA.forward_plan([f], 4.0, sm_count=CG.SM_COUNT)[2] if ln.name == "fwd_accum"][0]
        assert CG.expectations(acc, 4)["expect_v4_loads"] is v16, acc.constexprs


def test_cuda_plan_differs_from_the_interpreter_plan():
    f = torch.empty((256, 128, 32, 32), device="meta")
    gpu = SA.forward_plan([f], 4.0, sm_count=132)[2][0]
    interp = SA.forward_plan([f], 4.0, sm_count=None)[2][0]
    assert gpu.constexprs["BLOCK_M"] * gpu.constexprs["BLOCK_C"] <= 8192
    assert (gpu.constexprs["BLOCK_M"], gpu.constexprs["BLOCK_C"]) != (interp.constexprs["BLOCK_M"], interp.constexprs["BLOCK_C"])


class _Guard:
    """Stands in for torch.cuda.device: records which device is current while kernels launch."""
    current = None
    entered = []

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        _Guard.entered.append(self.device)
        _Guard.current = self.device

    def __exit__(self, *exc):
        _Guard.current = None


class _FakeKernel:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *a, **k: self.log.append(_Guard.current)


@pytest.mark.parametrize("launcher", ["stats", "apply", "attention"])
def test_launches_run_on_the_tensors_device(monkeypatch, launcher):
    """Triton launches on the *current* device: every launcher must enter the tensors' device
    (cuda:1 here) around its launches. Plans are built for meta tensors; the kernels are fakes
    that record the current device (no GPU needed)."""
    log = []
    monkeypatch.setattr(torch.cuda, "device", _Guard)
    _Guard.entered = []
    y = torch.empty((4, 8, 6, 6), device="meta")
    if launcher == "stats":
        _, _, launches = RE.stats_plan(y, sm_count=132)
    elif launcher == "apply":
        s = torch.empty((4, 8), device="meta")
        _, _, launches = RE.apply_plan(y, s, s, sm_count=132)
    else:
        _, _, launches = SA.forward_plan([y], 4.0, sm_count=132)
    assert launches
    fake = [ln._replace(kernel=_FakeKernel(log)) for ln in launches]
    SA.run_launches(fake, torch.device("cuda", 1))
    assert _Guard.entered == [torch.device("cuda", 1)]
    assert log == [torch.device("cuda", 1)] * len(fake)


def test_epilogue_launchers_go_through_the_guarded_runner(monkeypatch):
    """plane_moments / apply_epilogue hand their plans to run_launches with y's device."""
    seen = []
    monkeypatch.setattr(RE, "run_launches", lambda launches, device: seen.append((len(launches), device)))
    monkeypatch.setattr(RE, "_check", lambda y: None)
    y = torch.empty((2, 4, 6, 6), device="meta")
    RE.plane_moments(y)
    RE.apply_epilogue(y, torch.ones(2, 4, device="meta"), torch.zeros(2, 4, device="meta"))
    assert [d for _, d in seen] == [y.device, y.device] and all(n >= 1 for n, _ in seen)


def test_tensors_reached_only_through_the_table_outlive_the_launch():
    """The backward's workspace and converted saved state are addressed only through the
    metadata table: the launch records must hold them, or they are freed before the kernel runs."""
    f = torch.randn(2, 3, 4, 4)
    maps, norms, _ = SA.forward_plan([f], 4.0, sm_count=None)
    gmaps = [torch.randn(2, 16).t().contiguous().t()]  # column-major: converted inside the plan
    _, launches = SA.backward_plan([f], maps, norms, gmaps, 4.0, sm_count=None)
    for ln in launches:
        meta = ln.args[list(ln.kernel.arg_names).index("meta_ptr")]
        held = []
        for x in ln.keep:
            held += list(x) if isinstance(x, (list, tuple)) else [x]
        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in held]
        for col in ("ws_ptr", "map_ptr", "norm_ptr", "gmap_ptr", "f_ptr", "grad_ptr"):
            for addr in meta[:, SA._COL[col]].tolist():
                assert any(lo <= addr < hi for lo, hi in spans), f"{ln.name}: {col} {addr:#x} not held"
