"""A fused kernel that cannot run on the user's device never ends the run.

Failures are injected where a real one would surface (the kernel launch: a compiler / ptxas /
driver error raised by the backend's forward or backward, the epilogue's op), then:

* ``backend="auto"`` / ``--real-epilogue auto``: one warning per process naming the error, the
  next implementation takes over and the results equal that implementation's run directly;
* an explicitly requested implementation raises ``BackendUnavailable`` carrying the message.
"""
import warnings

import pytest
import torch

import datadam_fast as dd
from datadam_fast.loss import backends as B
from datadam_fast.distill import real_side
from datadam_fast.errors import KERNEL_FAILURES, BackendUnavailable, is_kernel_failure
from conftest import run_small

PTXAS = "ptxas fatal   : Value 'sm_100' is not defined for option 'gpu-name'"


@pytest.fixture(autouse=True)
def fresh_fallback_state(monkeypatch):
    """Each test starts as a new process would: no failure recorded, no warning issued yet."""
    monkeypatch.setattr(KERNEL_FAILURES, "failed", {})  # loss backends and epilogues alike
    monkeypatch.setattr(KERNEL_FAILURES, "warned", set())


def _cpu_backend():
    try:
        return B.get_backend("cpu")
    except BackendUnavailable as e:
        pytest.skip(f"the C++ backend is unavailable here: {e}")


def _raise(*_a, **_k):
    raise RuntimeError(PTXAS)


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    real = [torch.randn(8, 6, 7, 5, generator=g), torch.randn(8, 4, 3, 3, generator=g)]
    syn = [torch.randn(4, 6, 7, 5, generator=g).requires_grad_(), torch.randn(4, 4, 3, 3, generator=g).requires_grad_()]
    return real, syn


def _loss_and_grads(backend, calls=2):
    out = []
    for _ in range(calls):
        real, syn = _problem()
        loss = dd.attention_matching_loss(real, syn, num_classes=2, backend=backend)
        loss.backward()
        out.append((loss.detach(), [s.grad for s in syn]))
    return out


def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "datadam_fast" in str(w.message)]


def test_classification_of_failures():
    assert is_kernel_failure(RuntimeError(PTXAS))
    assert is_kernel_failure(BackendUnavailable("building _C_cuda failed"))
    assert not is_kernel_failure(ValueError("bad shape"))          # bad input: same in every implementation
    assert not is_kernel_failure(dd.errors.UserError("bad"))
    assert not is_kernel_failure(torch.OutOfMemoryError("CUDA out of memory"))  # a fallback needs more
    assert not is_kernel_failure(KeyboardInterrupt())


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_auto_loss_falls_back_once_with_the_same_results(monkeypatch, where):
    be = _cpu_backend()
    monkeypatch.setattr(type(be), where, _raise)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _loss_and_grads("auto")
    ws = _fallback_warnings(record)
    assert len(ws) == 1, [str(w.message) for w in ws]
    msg = str(ws[0].message)
    assert PTXAS in msg and "'cpu'" in msg and "'reference'" in msg
    assert B.resolved_backend("cpu") == "reference"  # stays off for the rest of the process
    monkeypatch.undo()
    expected = _loss_and_grads("reference")
    if where == "forward":  # the whole loss ran on the reference: bit for bit
        for (l, g), (el, eg) in zip(got, expected):
            assert torch.equal(l, el) and all(torch.equal(a, b) for a, b in zip(g, eg))
    else:  # forward on the C++ kernels, backward on the reference: within float32 rounding
        for (l, g), (el, eg) in zip(got, expected):
            torch.testing.assert_close(l, el, rtol=1e-5, atol=0)
            for a, b in zip(g, eg):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_explicit_backend_raises_backend_unavailable_with_the_message(monkeypatch):
    be = _cpu_backend()
    monkeypatch.setattr(type(be), "forward", _raise)
    real, syn = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no warning
        with pytest.raises(BackendUnavailable, match="sm_100") as info:
            dd.attention_matching_loss(real, syn, num_classes=2, backend="cpu")
    assert "backend 'cpu' failed in its forward kernels" in str(info.value)


def test_bad_input_inside_a_kernel_is_not_swallowed(monkeypatch):
    be = _cpu_backend()

    def bad(*_a, **_k):
        raise ValueError("expected a 4-d tensor")
    monkeypatch.setattr(type(be), "forward", bad)
    real, syn = _problem()
    with pytest.raises(ValueError, match="4-d"):
        dd.attention_matching_loss(real, syn, num_classes=2, backend="auto")


def test_triton_launch_failure_moves_to_the_next_backend(monkeypatch):
    """auto's order on a GPU is (triton, cuda): here (triton, cpu) on CPU tensors, Triton under its
    interpreter, and the failure is Triton's own out-of-resources error from the kernel launch."""
    try:
        tb = B.get_backend("triton")
    except BackendUnavailable as e:
        pytest.skip(str(e))
    if not tb.supports("cpu"):
        pytest.skip("Triton runs on CPU tensors only under TRITON_INTERPRET=1")
    _cpu_backend()
    from triton.runtime.errors import OutOfResources
    from datadam_fast.kernels import spatial_attention as K

    def oor(*_a, **_k):
        raise OutOfResources(232448, 101376, "shared memory")
    monkeypatch.setattr(K, "spatial_attention_forward", oor)
    monkeypatch.setattr(B, "_auto_order", lambda device: ("triton", "cpu"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = _loss_and_grads("auto")
    ws = _fallback_warnings(record)
    assert len(ws) == 1 and "OutOfResources" in str(ws[0].message) and "'cpu'" in str(ws[0].message)
    expected = _loss_and_grads("cpu")
    for (l, g), (el, eg) in zip(got, expected):
        assert torch.equal(l, el) and all(torch.equal(a, b) for a, b in zip(g, eg))
    with pytest.raises(BackendUnavailable, match="OutOfResources"):
        _loss_and_grads("triton", calls=1)


# ------------------------------------------------------------------------------------------------
# real-side epilogue
# ------------------------------------------------------------------------------------------------
def _fail_epilogue_op(monkeypatch):
    """The C++ epilogue's kernel launch fails (as a kernel built for another device would)."""
    _cpu_backend()
    monkeypatch.setattr(torch.ops.datadam_fast, "cpu_real_epilogue", _raise)


def test_failed_epilogue_updates_no_batchnorm_statistics(monkeypatch):
    """A pass that fails part-way is redone by the fallback: BatchNorm's running statistics must
    count it once (they are applied only when the whole fused pass succeeded)."""
    from datadam_fast.models.networks import get_network
    net = get_network("ConvNet", 1, 2, (12, 12), width=4, depth=2, norm="batchnorm").train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _fail_epilogue_op(monkeypatch)
    with pytest.raises(RuntimeError, match="sm_100"):
        real_side.real_class_sums(net, torch.randn(4, 1, 12, 12), 2, 4.0, impl="cpu")
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed fused pass"
    monkeypatch.undo()
    real_side.real_class_sums(net, torch.randn(4, 1, 12, 12), 2, 4.0, impl="cpu")
    assert int(net.features[1].num_batches_tracked) == 1


SMALL = dict(iterations=2, log_every=1, checkpoint_every=0, compile=False, device="cpu")


def _distill(mode):
    return run_small(None, real_epilogue=mode, **SMALL)


def test_distillation_survives_a_failing_epilogue_with_identical_results(monkeypatch):
    _fail_epilogue_op(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        d = _distill("auto")
    ws = _fallback_warnings(record)
    assert len(ws) == 1, [str(w.message) for w in ws]
    assert PTXAS in str(ws[0].message) and "cpu real-side epilogue" in str(ws[0].message)
    assert d.fused_real is None and d.iteration == SMALL["iterations"]
    # a second run in the same process does not try (or warn) again
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        d2 = _distill("auto")
    assert not _fallback_warnings(record) and d2.fused_real is None
    monkeypatch.undo()
    off = _distill("off")
    assert torch.equal(d.syn, off.syn) and torch.equal(d2.syn, off.syn)


def test_explicit_epilogue_failure_raises_backend_unavailable(monkeypatch):
    _fail_epilogue_op(monkeypatch)
    with pytest.raises(BackendUnavailable, match="--real-epilogue cpu: its kernels failed on cpu: RuntimeError: ptxas"):
        _distill("cpu")


def test_auto_epilogue_that_cannot_build_warns_once_before_the_run(monkeypatch):
    """The C++ extension does not build here: auto says why once, and distills without it."""
    _cpu_backend()
    monkeypatch.delitem(B._CACHE, "cpu")
    monkeypatch.setitem(B._FAILED, "cpu", "building _C_cpu from real_epilogue_cpu.cpp failed: error: 'omp.h' not found")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        d = _distill("auto")
    epi = [w for w in _fallback_warnings(record) if "fused epilogue" in str(w.message)]
    assert len(epi) == 1 and "omp.h" in str(epi[0].message)
    assert d.fused_real is None and d.iteration == SMALL["iterations"]
