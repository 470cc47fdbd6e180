"""The compiled network passes (datadam_fast.distill.compiled) against the eager path."""
import pytest
import torch

from datadam_fast.distill.compiled import MethodPasses, weights_of
from datadam_fast.distill.methods import DataDAM
from datadam_fast.distill import DistillConfig, Distiller
from datadam_fast.errors import UserError
from datadam_fast.models.networks import get_network
from datadam_fast.loss.targets import ClassMeanAccumulator, ClassTargets

K, B, IPC = 3, 4, 2


def _net(norm, depth, seed, size=16):
    net = get_network("ConvNet", 3, K, (size, size), width=8, depth=depth, norm=norm,
                      generator=torch.Generator().manual_seed(seed))
    return net.train().requires_grad_(False)


def _eager_targets(net, x, power):
    acc = ClassMeanAccumulator(K, power=power, backend="reference")
    with torch.no_grad():
        f, e = net.features_and_embedding(x)
    acc.update(f, e, labels=torch.arange(K).repeat_interleave(B))
    return acc.targets()


@pytest.mark.parametrize("norm,depth", [("instancenorm", 3), ("instancenorm", 4), ("batchnorm", 3),
                                        ("batchnorm", 4)])
@pytest.mark.parametrize("power", [4.0, 1.0])
def test_compiled_passes_equal_eager(norm, depth, power):
    size = 16 if depth == 3 else 32
    net = _net(norm, depth, 0, size)
    passes = MethodPasses(_net(norm, depth, 99, size), DataDAM(power=power, attention_weight=100.0, embedding_weight=1.0),
                          real_dtype=torch.float32, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    real = torch.randn(K * B, 3, size, size, generator=g)
    w = weights_of(net)
    want = _eager_targets(net, real, power)
    *att, emb = passes.real(w, real, K)
    acc = ClassMeanAccumulator(K, power=power)
    acc.add_class_sums(att, emb, first_class=0, count=B)
    got = acc.targets()
    for a, b in zip(got.attention, want.attention):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.embedding, want.embedding, rtol=1e-5, atol=1e-5)
    # synthetic side: loss terms and the pixel gradient
    syn = torch.randn(K * IPC, 3, size, size, generator=g, requires_grad=True)
    _, syn_terms = passes.syn(w, syn, K, [*want.attention, want.embedding])
    att_c, emb_c = syn_terms["attention"], syn_terms["embedding"]
    (gc,) = torch.autograd.grad(att_c + emb_c, syn)
    from datadam_fast import attention_matching_loss
    f, e = net.features_and_embedding(syn)
    loss, terms = attention_matching_loss(ClassTargets(want.attention, want.embedding, power), f, None, e,
                                          num_classes=K, power=power, backend="reference", return_terms=True)
    (ge,) = torch.autograd.grad(loss, syn)
    torch.testing.assert_close(att_c, terms["attention"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(emb_c, terms["embedding"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


def test_a_fresh_network_does_not_recompile():
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()  # earlier tests compiled the same code objects
    counter = CompileCounter()
    passes = MethodPasses(_net("instancenorm", 3, 0), DataDAM(power=4.0), real_dtype=torch.float32, backend=counter)
    x = torch.randn(K * B, 3, 16, 16)
    for seed in range(3):  # three fresh networks, same architecture and shapes
        passes.real(weights_of(_net("instancenorm", 3, seed)), x, K)
    assert counter.frame_count == 1


def test_distill_compiled_equals_eager(tmp_path):
    kw = dict(ipc=2, batch_real=6, width=16, eval_every=-1, checkpoint_every=0, iterations=2)
    a = Distiller(DistillConfig(compile=False, **kw), None, progress=False)
    a.run()
    b = Distiller(DistillConfig(compile=True, **kw), None, progress=False)  # inductor, the real thing
    b.run()
    assert b.passes is not None and b.compile_seconds is not None and b.compile_seconds > 0
    assert (a.syn - b.syn).abs().max() < 2e-4


def test_real_dtype_bf16_eager_is_close():
    kw = dict(ipc=2, batch_real=6, width=16, eval_every=-1, checkpoint_every=0, iterations=1, compile=False)
    a = Distiller(DistillConfig(**kw), None, progress=False)
    b = Distiller(DistillConfig(real_dtype="bf16", **kw), None, progress=False)
    ta, tb = a.step(), b.step()
    rel = abs(float(ta["loss"]) - float(tb["loss"])) / float(ta["loss"])
    assert 0 < rel < 0.05  # bf16 changes the real targets a little, not much


def test_compile_mode_reaches_the_passes_and_is_checked():
    kw = dict(ipc=2, batch_real=6, width=16, eval_every=-1, checkpoint_every=0, iterations=1)
    d = Distiller(DistillConfig(compile=True, compile_mode="reduce-overhead", **kw), None, progress=False)
    assert d.passes.mode == "reduce-overhead"
    d.passes.step_begin()  # a no-op for CPU graphs, CUDA graph trees' step marker on a GPU
    with pytest.raises(UserError, match="unknown compile mode"):
        Distiller(DistillConfig(compile=True, compile_mode="fast", **kw), None, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_equal_eager_on_gpu():
    kw = dict(ipc=2, batch_real=6, width=16, eval_every=-1, checkpoint_every=0, iterations=3, device="cuda")
    a = Distiller(DistillConfig(compile=False, real_epilogue="off", **kw), None, progress=False)
    a.run()
    b = Distiller(DistillConfig(compile=True, compile_mode="reduce-overhead", **kw), None, progress=False)
    b.run()
    assert (a.syn - b.syn).abs().max() < 2e-4


@pytest.mark.parametrize("real_epilogue", ["off", "cpu"])
def test_real_dtype_casts_the_network_once_per_step(monkeypatch, real_epilogue):
    """Several real chunks share one low-precision copy of the step's network (not one per chunk),
    and chunking does not change the targets."""
    import copy
    kw = dict(ipc=2, batch_real=6, width=16, eval_every=-1, checkpoint_every=0, iterations=1, compile=False,
              real_dtype="bf16", real_epilogue=real_epilogue)
    one = Distiller(DistillConfig(**kw), None, progress=False)
    chunked = Distiller(DistillConfig(real_chunk=3, **kw), None, progress=False)
    assert len(chunked.real_chunks()) == 4
    calls = []
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda obj, *a: calls.append(obj) or real_deepcopy(obj, *a))
    ta = one.step()
    assert len(calls) == 1
    calls.clear()
    tb = chunked.step()
    assert len(calls) == 1
    assert abs(float(ta["loss"]) - float(tb["loss"])) <= 1e-3 * abs(float(ta["loss"]))
