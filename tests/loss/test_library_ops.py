"""The ops as ``torch.library`` ops: opcheck, fake/meta shapes, torch.compile(fullgraph) of a user
step, torch.export, the first-build message and the public backend resolution.

Triton's opcheck is in ``test_backend_triton.py`` (it needs the interpreter set up before triton is
imported). Compile tests are few and tiny: compiling on 2 shared cores takes ~30 s each.
"""
import os
from pathlib import Path

import pytest
import torch

from datadam_fast.errors import KERNEL_FAILURES
from torch import nn

import datadam_fast as dd
from datadam_fast.loss import backends as B
from datadam_fast.loss import reference as R


@pytest.fixture(scope="module")
def cpu_built():
    try:
        B.get_backend("cpu")
    except B.BackendUnavailable as e:  # pragma: no cover - depends on the toolchain
        pytest.skip(f"cpu extension cannot be built here: {e}")
    return True


def _feats(requires_grad=True):
    g = torch.Generator().manual_seed(3)
    f1 = torch.randn(3, 4, 5, 6, generator=g)                                         # odd H*W
    f2 = torch.randn(3, 8, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    f3 = torch.randn(3, 2 * 3, 4, 4, generator=g)[:, ::2]                            # strided view
    f4 = torch.randn(2, 3, 2, 2, generator=g, dtype=torch.float64)
    return [f.requires_grad_(requires_grad) for f in (f1, f2, f3, f4)]


def _bwd_args(feats, backend="reference"):
    feats = [f.detach() for f in feats]
    with torch.no_grad():
        maps, norms = torch.ops.datadam_fast.spatial_attention_fwd(feats, 4.0, backend)
    g = torch.Generator().manual_seed(5)
    gm = [torch.randn(m.shape, generator=g, dtype=m.dtype) for m in maps]
    return feats, list(maps), list(norms), gm


def _assert_opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert result and all(v == "SUCCESS" for v in result.values()), result


# ------------------------------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake kernels, AOT dispatch (static and dynamic shapes)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpu", "auto"])
def test_opcheck_router_ops(backend, cpu_built):
    _assert_opcheck(torch.ops.datadam_fast.spatial_attention_fwd.default, (_feats(), 4.0, backend))
    _assert_opcheck(torch.ops.datadam_fast.spatial_attention_fwd.default, (_feats(), 2.5, backend))
    _assert_opcheck(torch.ops.datadam_fast.spatial_attention_bwd.default, (*_bwd_args(_feats()), 4.0, backend))


def test_opcheck_native_cpu_ops(cpu_built):
    """The C++ kernels registered with TORCH_LIBRARY_IMPL(datadam_fast, CPU) themselves."""
    _assert_opcheck(torch.ops.datadam_fast.cpu_fwd.default, (_feats(), 4.0))
    _assert_opcheck(torch.ops.datadam_fast.cpu_bwd.default, (*_bwd_args(_feats()), 4.0))
    _assert_opcheck(torch.ops.datadam_fast.cpu_bwd.default, (*_bwd_args(_feats()), 1.0, False))


def test_router_matches_reference_and_backward_contract(cpu_built):
    feats = _feats()
    ref = [R.spatial_attention(f, 4.0) for f in feats]
    maps = dd.spatial_attention(feats, power=4.0, backend="cpu")
    for m, r in zip(maps, ref):
        torch.testing.assert_close(m, r.detach(), rtol=1e-5, atol=1e-7)
    w = [torch.randn_like(m) for m in maps]
    grads = torch.autograd.grad(sum((m * x).sum() for m, x in zip(maps, w)), feats)
    rgrads = torch.autograd.grad(sum((m * x).sum() for m, x in zip(ref, w)), feats)
    for f, g, rg in zip(feats, grads, rgrads):
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)
        fmt = torch.channels_last if (f.is_contiguous(memory_format=torch.channels_last)
                                      and not f.is_contiguous()) else torch.contiguous_format
        assert g.is_contiguous(memory_format=fmt)


def test_norms_are_not_differentiable():
    f = torch.randn(2, 3, 4, 4, requires_grad=True)
    maps, norms = torch.ops.datadam_fast.spatial_attention_fwd([f], 4.0, "reference")
    assert maps[0].requires_grad and not norms[0].requires_grad


# ------------------------------------------------------------------------------------------------
# meta / FakeTensor shapes
# ------------------------------------------------------------------------------------------------
def test_meta_inputs_give_shapes():
    feats = [torch.empty(6, 5, 7, 3, device="meta"), torch.empty(6, 2, 4, 4, device="meta", dtype=torch.float64),
             torch.empty(6, 8, 3, 3, device="meta").contiguous(memory_format=torch.channels_last)]
    maps, norms = torch.ops.datadam_fast.spatial_attention_fwd(feats, 4.0)
    assert [tuple(m.shape) for m in maps] == [(6, 21), (6, 16), (6, 9)]
    assert [m.dtype for m in maps] == [torch.float32, torch.float64, torch.float32]
    assert [tuple(n.shape) for n in norms] == [(6,), (6,), (6,)] and all(m.device.type == "meta" for m in maps)
    grads = torch.ops.datadam_fast.spatial_attention_bwd(feats, maps, norms, maps, 4.0)
    assert [tuple(g.shape) for g in grads] == [tuple(f.shape) for f in feats]
    assert grads[2].is_contiguous(memory_format=torch.channels_last)
    loss = dd.attention_matching_loss(feats, feats, torch.empty(6, 9, device="meta"),
                                      torch.empty(6, 9, device="meta"), num_classes=3)
    assert loss.shape == () and loss.device.type == "meta" and loss.dtype == torch.float64


def test_fake_tensor_inputs_give_shapes(cpu_built):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        real = [torch.empty(8, 4, 6, 6), torch.empty(8, 4, 3, 3)]
        syn = [torch.empty(4, 4, 6, 6, requires_grad=True), torch.empty(4, 4, 3, 3, requires_grad=True)]
        labels = torch.zeros(4, dtype=torch.long)
        loss, terms = dd.attention_matching_loss(real, syn, num_classes=2, syn_labels=labels, return_terms=True)
        assert loss.shape == () and loss.dtype == torch.float32
        assert [t.shape for t in terms["attention_layers"]] == [(), ()]
        g = torch.autograd.grad(loss, syn)
        assert [tuple(x.shape) for x in g] == [(4, 4, 6, 6), (4, 4, 3, 3)]


# ------------------------------------------------------------------------------------------------
# torch.compile / torch.export of a user step (network + loss)
# ------------------------------------------------------------------------------------------------
class TinyConvNet(nn.Module):
    """Conv -> InstanceNorm (GroupNorm(C, C)) -> ReLU -> AvgPool blocks; returns (ReLU outputs, embedding)."""

    def __init__(self, channels=3, width=8, depth=2):
        super().__init__()
        blocks, c = [], channels
        for _ in range(depth):
            blocks.append(nn.ModuleList([nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width),
                                         nn.ReLU(), nn.AvgPool2d(2)]))
            c = width
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        feats = []
        for conv, norm, act, pool in self.blocks:
            x = act(norm(conv(x)))
            feats.append(x)
            x = pool(x)
        return feats, x.flatten(1)


K = 2


def _step(net, real_x, syn_x, syn_labels):
    with torch.no_grad():
        real_feats, real_emb = net(real_x)
    syn_feats, syn_emb = net(syn_x)
    return dd.attention_matching_loss(real_feats, syn_feats, real_emb, syn_emb, num_classes=K,
                                      syn_labels=syn_labels)


def _step_inputs():
    g = torch.Generator().manual_seed(11)
    real = torch.randn(K * 3, 3, 8, 8, generator=g)
    syn = torch.randn(K * 2, 3, 8, 8, generator=g)
    labels = torch.tensor([1, 0, 0, 1])              # rows in any order
    return real, syn, labels


def test_compile_user_step_fullgraph_no_breaks_and_grad_equals_eager(cpu_built):
    torch._dynamo.reset()
    net = TinyConvNet()
    real, syn0, labels = _step_inputs()
    fn = lambda r, s: _step(net, r, s, labels)  # noqa: E731
    explain = torch._dynamo.explain(fn)(real, syn0.clone().requires_grad_())
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    ops = [str(n.target) for g in explain.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("datadam_fast.spatial_attention_fwd" in o for o in ops), ops  # the fused op is in the graph
    compiled = torch.compile(fn, fullgraph=True)  # fullgraph: any graph break raises
    syn_c = syn0.clone().requires_grad_()
    loss_c = compiled(real, syn_c)
    (g_c,) = torch.autograd.grad(loss_c, syn_c)
    syn_e = syn0.clone().requires_grad_()
    loss_e = fn(real, syn_e)
    (g_e,) = torch.autograd.grad(loss_e, syn_e)
    assert dd.resolved_backend("cpu") == "cpu"
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6 * g_e.abs().max().item())


def test_export_network_and_loss(cpu_built):
    net = TinyConvNet()
    real, syn, labels = _step_inputs()

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, real_x, syn_x, syn_labels):
            return _step(self.net, real_x, syn_x, syn_labels)

    ep = torch.export.export(Step(), (real, syn, labels))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("datadam_fast.spatial_attention_fwd" in t for t in targets), targets
    got = ep.module()(real, syn, labels)
    want = Step()(real, syn, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# first use: build message, resolved backend
# ------------------------------------------------------------------------------------------------
def test_cold_build_prints_one_line_warm_is_silent(monkeypatch, tmp_path, capsys):
    from torch.utils import cpp_extension
    from datadam_fast.loss import _build
    monkeypatch.setenv("DATADAM_FAST_EXT_DIR", str(tmp_path))
    calls = []

    def fake_load(name, build_directory, **kw):
        calls.append(name)
        open(os.path.join(build_directory, f"{name}.so"), "w").close()  # what a real build leaves
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert _build.load_extension("_C_test_msg", ["spatial_attention_cpu.cpp"]) == "module"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("datadam_fast: building the fused _C_test_msg kernels"), err
    assert _build.load_extension("_C_test_msg", ["spatial_attention_cpu.cpp"]) == "module"
    assert capsys.readouterr().err == "" and len(calls) == 2


def test_extension_cache_key_covers_torch_arch_and_source_folder(monkeypatch, tmp_path):
    """Two torch versions, two arch lists or two checkouts get two build folders (and never
    rebuild each other's); the same inputs give the same folder."""
    from datadam_fast.loss import _build
    src = _build.csrc_dir()
    paths = [str(src / "spatial_attention_cpu.cpp")]
    base = _build.build_tag("_C_cuda", paths, ["-O3"], src=src, arch="9.0+PTX")
    assert base == _build.build_tag("_C_cuda", paths, ["-O3"], src=src, arch="9.0+PTX")
    assert base != _build.build_tag("_C_cuda", paths, ["-O3"], src=src, arch="8.0;9.0+PTX")
    assert base != _build.build_tag("_C_cuda", paths, ["-O2"], src=src, arch="9.0+PTX")
    # a second checkout: the same bytes in another folder
    other = tmp_path / "checkout2" / "csrc"
    other.mkdir(parents=True)
    (other / "spatial_attention_cpu.cpp").write_bytes(Path(paths[0]).read_bytes())
    assert base != _build.build_tag("_C_cuda", [str(other / "spatial_attention_cpu.cpp")], ["-O3"], src=other,
                                    arch="9.0+PTX")
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert base != _build.build_tag("_C_cuda", paths, ["-O3"], src=src, arch="9.0+PTX")


def test_cuda_arch_list_from_the_variable_else_the_devices(monkeypatch):
    from datadam_fast.loss import _build
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert _build.cuda_arch_list() == "8.0;9.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (8, 0)][i])
    assert _build.cuda_arch_list() == "8.0;9.0+PTX"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert _build.cuda_arch_list() == ""


def test_cuda_build_gets_the_arch_list_of_its_key(monkeypatch, tmp_path):
    """The JIT build compiles for exactly the architectures its cache key names."""
    import shutil
    from torch.utils import cpp_extension
    from datadam_fast.loss import _build
    monkeypatch.setenv("DATADAM_FAST_EXT_DIR", str(tmp_path))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(_build, "cuda_arch_list", lambda: "9.0+PTX")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda c: "/usr/bin/nvcc" if c == "nvcc" else real_which(c))
    seen = {}

    def fake_load(name, build_directory, **kw):
        seen["arch"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        seen["dir"] = build_directory
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert _build.load_extension("_C_test_arch", ["spatial_attention_cpu.cpp"], cuda=True) == "module"
    assert seen["arch"] == "9.0+PTX" and "TORCH_CUDA_ARCH_LIST" not in os.environ
    assert Path(seen["dir"]).name == _build.build_tag(
        "_C_test_arch", [str(_build.csrc_dir() / "spatial_attention_cpu.cpp")], [], src=_build.csrc_dir(),
        arch="9.0+PTX")


def test_resolved_backend_and_fallback_reason(monkeypatch):
    assert dd.resolved_backend("cpu", "reference") == "reference"
    assert dd.resolved_backend("meta") == "reference"  # no fused backend for meta, nothing to warn about
    monkeypatch.setitem(B._FACTORIES, "cpu", lambda: (_ for _ in ()).throw(B.BackendUnavailable("no compiler")))
    monkeypatch.setattr(B, "_CACHE", {})
    monkeypatch.setattr(B, "_FAILED", {})
    monkeypatch.setattr(KERNEL_FAILURES, "warned", set())
    monkeypatch.delenv("DATADAM_FAST_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning, match="falling back to the reference backend on cpu: no compiler"):
        assert dd.resolved_backend(torch.device("cpu")) == "reference"
    with pytest.raises(dd.UserError, match="unknown backend 'nope'"):
        dd.resolved_backend("cpu", "nope")


def test_error_hierarchy():
    from datadam_fast import errors
    assert issubclass(errors.UserError, ValueError) and issubclass(errors.UserError, errors.DatadamError)
    assert issubclass(errors.BackendUnavailable, RuntimeError)
    assert issubclass(errors.BackendUnavailable, errors.DatadamError)
    assert issubclass(errors.UserTypeError, TypeError) and issubclass(errors.UserTypeError, errors.UserError)
    assert B.BackendUnavailable is errors.BackendUnavailable is dd.BackendUnavailable


def test_native_eps_is_the_python_eps(cpu_built):
    from datadam_fast import _constants
    assert B.get_backend("cpu")._ext.NORM_EPS == _constants.NORM_EPS == R.NORM_EPS


def test_atomic_write_helpers(tmp_path):
    from datadam_fast import _io
    p = tmp_path / "x.txt"
    _io.atomic_write_text(p, "one")
    assert p.read_text() == "one"
    with pytest.raises(ZeroDivisionError):
        _io.atomic_write(p, lambda fh: fh.write(b"half") and 1 / 0)
    assert p.read_text() == "one" and sorted(x.name for x in tmp_path.iterdir()) == ["x.txt"]
    _io.atomic_torch_save({"a": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt")["a"], torch.arange(3))


def test_wheel_build_flags_are_portable_and_shared():
    """setup.py's ahead-of-time build takes its flags from _constants (no -march=native in a wheel)."""
    import runpy
    from pathlib import Path
    from datadam_fast import _constants
    root = Path(__file__).resolve().parents[2]
    assert "-march=native" not in " ".join(_constants.CPU_CFLAGS)
    code = (root / "setup.py").read_text().split('"""', 2)[2]        # past the module docstring
    assert "-march=native" not in code and "CPU_JIT_NATIVE_CFLAGS" not in code and '_c["CPU_CFLAGS"]' in code
    assert runpy.run_path(str(root / "datadam_fast" / "_constants.py"))["CPU_CFLAGS"] == _constants.CPU_CFLAGS
    assert f"-DDATADAM_FAST_NORM_EPS={_constants.NORM_EPS!r}" in _constants.native_defines()
    # the wheel's extension compiles every source of the JIT build (a missing one = a missing op)
    from datadam_fast.loss.backends import cpu as cpu_backend
    for source in cpu_backend._SOURCES:
        assert f'"csrc/{source}"' in code, source


def test_two_clones_use_two_builds_and_neither_rebuilds_the_other(monkeypatch, tmp_path, capsys):
    """Two checkouts of the same version on one machine (one extension cache): each gets its own
    build folder, a warm folder is loaded without the cold-build notice, and building one clone
    leaves the other's folder untouched (torch's build lock in each folder covers concurrent builds)."""
    import shutil
    from torch.utils import cpp_extension
    from datadam_fast.loss import _build
    monkeypatch.setenv("DATADAM_FAST_EXT_DIR", str(tmp_path / "ext"))
    clones = []
    for name in ("clone_a", "clone_b"):
        src = tmp_path / name / "csrc"
        shutil.copytree(_build.csrc_dir(), src)
        clones.append(src)
    builds = []

    def fake_load(name, sources, build_directory, **kw):  # a build writes <tag>.so into its folder
        builds.append((build_directory, sources[0]))
        so = Path(build_directory) / f"{name}.so"
        if not so.exists():
            so.write_text(sources[0])
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)

    def load(src):
        monkeypatch.setattr(_build, "csrc_dir", lambda: src)
        assert _build.load_extension("_C_test_clones", ["spatial_attention_cpu.cpp"]) == "module"
        return capsys.readouterr().err

    assert "building the fused" in load(clones[0])
    dir_a = Path(builds[-1][0])
    snapshot_a = sorted((p.name, p.read_text()) for p in dir_a.iterdir())
    assert "building the fused" in load(clones[1])
    dir_b = Path(builds[-1][0])
    assert dir_a != dir_b and builds[-1][1].startswith(str(clones[1]))
    assert sorted((p.name, p.read_text()) for p in dir_a.iterdir()) == snapshot_a  # clone A's build untouched
    assert "building the fused" not in load(clones[0])  # warm: no rebuild of A after B
    assert Path(builds[-1][0]) == dir_a
