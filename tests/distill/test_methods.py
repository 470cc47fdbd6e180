"""Methods as plug-ins: the user method of docs/methods.md through the engine (chunks, 2 gloo
processes, kill + resume each equal the uninterrupted one-pass run), and the built-in ones."""
import json

import pytest
import torch

from datadam_fast.distill import DM, DataDAM, DistillConfig, Distiller, Method, distill
from datadam_fast.errors import UserError

from _user_method import SMALL, load_user_method
from conftest import ROOT, run_small, synthetic_images, torchrun

ChannelAttention = load_user_method()["ChannelAttention"]


def _run(out, iterations=4, method=None, **kw):
    return run_small(out, iterations=iterations, method=method or ChannelAttention(),
                     **{"log_every": 1, "checkpoint_every": 2, **kw})


@pytest.fixture(scope="module")
def one_pass(tmp_path_factory):
    out = tmp_path_factory.mktemp("user") / "one"
    d = _run(out)
    assert d.plan.real_chunks == 1 and d.plan.syn_chunks == 1
    return out, d


def test_user_method_runs_through_the_engine(one_pass):
    out, d = one_pass
    assert d.method.name == "channel_attention" and d.cfg.method == "channel_attention"
    assert d.fused_real is None  # the method does not take the fused DataDAM real side
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert logged and {"loss_attention", "loss_embedding"} <= set(logged[-1])
    assert logged[-1]["loss"] == pytest.approx(logged[-1]["loss_attention"] + logged[-1]["loss_embedding"], rel=1e-5)
    start = d.train_set.normalized_all("cpu")
    assert not torch.equal(synthetic_images(out), start[:20])  # it moved the pixels
    assert json.loads((out / "summary.json").read_text())["iteration"] == 4


def test_user_method_targets_are_means_of_its_statistics(one_pass):
    """The real side the engine reduces equals the method's statistics averaged per class."""
    from datadam_fast.distill.step import ClassSums
    _, d = one_pass
    net = d.new_network(torch.Generator().manual_seed(3))
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    labels = torch.arange(3).repeat_interleave(4)
    sums = ClassSums(3)
    sums.add(d.method.real_statistics(net, x[:5]), labels[:5])  # chunks that split a class
    sums.add(d.method.real_statistics(net, x[5:]), labels[5:])
    want = [s.reshape(3, 4, -1).mean(1) for s in d.method.real_statistics(net, x)]
    for got, w in zip(sums.means(), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
    assert len(want) >= 2 and want[0].shape == (3, 16)  # channels of each tapped block (width 16), the embedding


def test_user_method_chunked_equals_one_pass(one_pass, tmp_path):
    out, _ = one_pass
    d = _run(tmp_path / "chunked", real_chunk=3, syn_chunk=4)
    assert d.plan.real_chunks == 4 and d.plan.syn_chunks == 3
    assert (synthetic_images(tmp_path / "chunked") - synthetic_images(out)).abs().max() < 1e-5


def test_user_method_killed_and_resumed_equals_uninterrupted(one_pass, tmp_path):
    out, _ = one_pass
    cut = tmp_path / "cut"
    d = Distiller(DistillConfig(iterations=4, checkpoint_every=2, **SMALL), str(cut), progress=False,
                  method=ChannelAttention())
    try:
        assert d.run(stop_after=3) == {"stopped": True, "iteration": 3}  # checkpoint at 2, then "killed"
    finally:
        d.close()
    assert not (cut / "synthetic.pt").exists()
    d = Distiller(DistillConfig(iterations=4, checkpoint_every=2, **SMALL), str(cut), resume=True, progress=False,
                  method=ChannelAttention())
    assert d.iteration == 2
    d.run()
    d.close()
    assert torch.equal(synthetic_images(cut), synthetic_images(out))
    # the checkpoint records the method's settings: another power does not resume it
    with pytest.raises(UserError, match="different settings"):
        Distiller(DistillConfig(iterations=4, **SMALL), str(cut), resume=True, progress=False,
                  method=ChannelAttention(power=3.0))


@pytest.mark.slow
def test_user_method_two_gloo_processes_equal_one(one_pass, tmp_path):
    out, _ = one_pass
    two = tmp_path / "two"
    r = torchrun(two, 4, script=ROOT / "tests" / "_user_method.py")
    assert r.returncode == 0, r.stderr[-3000:]
    plan = next(json.loads(x)["plan"] for x in (two / "metrics.jsonl").read_text().splitlines() if "plan" in x)
    assert plan["world_size"] == 2 and plan["num_classes"] == 5
    assert (synthetic_images(two) - synthetic_images(out)).abs().max() < 1e-5


def test_moments_method_of_the_page_chunked_equals_one_pass(tmp_path):
    """The channel-moments method of docs/methods.md (on the fused channel_moments operator)."""
    ChannelMoments = load_user_method("channel_moments")["ChannelMoments"]
    one = _run(tmp_path / "one", method=ChannelMoments())
    assert one.plan.real_chunks == 1
    rows = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_moments" in r for r in rows)
    _run(tmp_path / "chunked", method=ChannelMoments(), real_chunk=3, syn_chunk=4)
    assert (synthetic_images(tmp_path / "chunked") - synthetic_images(tmp_path / "one")).abs().max() < 1e-5


def test_distill_function_and_callable_package_take_a_method(tmp_path):
    import datadam_fast as dd
    cfg = DistillConfig(iterations=1, checkpoint_every=0, **SMALL)
    a = dd.distill(cfg, str(tmp_path / "a"), progress=False, method=ChannelAttention())
    b = distill(cfg, str(tmp_path / "b"), progress=False, method="dm")
    assert a["iteration"] == b["iteration"] == 1
    assert torch.load(tmp_path / "b" / "synthetic.pt", weights_only=True)["config"]["method"] == "dm"
    with pytest.raises(UserError, match="Method instance"):
        Distiller(cfg, None, progress=False, method=object())


@pytest.mark.slow
def test_user_method_compiles(tmp_path):
    """compilable methods go through the compiled passes; same images as eager up to rounding."""
    eager = _run(tmp_path / "eager", iterations=1, compile=False)
    comp = _run(tmp_path / "compiled", iterations=1, compile=True)
    assert eager.passes is None and comp.passes is not None and comp.compile_seconds is not None
    assert (synthetic_images(tmp_path / "eager") - synthetic_images(tmp_path / "compiled")).abs().max() < 1e-4


def test_builtin_methods_are_implementations():
    assert issubclass(DataDAM, Method) and issubclass(DM, Method)
    c = DistillConfig(preset="official").resolved((28, 28))
    m = DataDAM.from_config(c)
    assert (m.power, m.attention_weight, m.embedding_weight) == (1.0, 100.0, 100.0 * 0.01)
    assert DM.defaults(c) == {"batch_real": 256, "lr_img": 1.0, "iterations": 20000}


def test_every_module_has_one_name():
    """The modules live under their wing only: the names they had at the top level are gone."""
    import importlib
    for old, new in (("networks", "models.networks"), ("targets", "loss.targets"), ("backends", "loss.backends"),
                     ("real_side", "distill.real_side"), ("memory", "distill.memory"), ("augment", "models.augment"),
                     ("evaluate", "evaluation.evaluate"), ("cli_args", "cli.args"), ("zca", "data.zca")):
        assert importlib.import_module(f"datadam_fast.{new}").__name__ == f"datadam_fast.{new}"
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"datadam_fast.{old}")
    from datadam_fast.models.networks import get_network
    assert get_network is importlib.import_module("datadam_fast.models.networks").get_network
