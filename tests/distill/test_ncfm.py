"""``--method ncfm`` on MNIST through the engine: class chunks, 2 gloo processes and kill +
``--resume`` each give the uninterrupted one-pass result; the frequencies are a function of
(iteration seed, class) alone; the targets are the per-class characteristic functions."""
import json


import pytest
import torch

from datadam_fast.distill import NCFM, DistillConfig, Distiller
from datadam_fast.distill.config import DistillConfig as Config
from datadam_fast.errors import UserError
from conftest import synthetic_images, torchrun

# a small MNIST run: 2 images per class, 8 real per class, a 16-channel ConvNet, 64 frequencies
FLAGS = dict(dataset="mnist", ipc=2, batch_real=8, width=16, num_freqs=64, method="ncfm", eval_every=-1,
             log_every=1, checkpoint_every=2)


def _cfg(root, **kw):
    return DistillConfig(data_root=str(root), **{**FLAGS, **kw})


def _run(out, root, iterations=4, **kw):
    with Distiller(_cfg(root, iterations=iterations, **kw), str(out), progress=False) as d:
        d.run()
    return d


@pytest.fixture(scope="module")
def one_pass(tmp_path_factory, datasets_root):
    out = tmp_path_factory.mktemp("ncfm") / "one"
    d = _run(out, datasets_root)
    assert d.plan.real_chunks == 1 and d.plan.syn_chunks == 1
    return out, d


def test_ncfm_runs_with_its_published_defaults(one_pass, datasets_root):
    out, d = one_pass
    assert isinstance(d.method, NCFM) and d.cfg.optimizer == "adamw" and d.cfg.lr_img == pytest.approx(1e-3)
    assert isinstance(d.opt, torch.optim.AdamW)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert logged and logged[-1]["loss"] == pytest.approx(logged[-1]["loss_cf"])
    assert torch.load(out / "synthetic.pt", weights_only=True)["method"] == "NCFM"
    c = Config(dataset="mnist", method="ncfm").resolved((28, 28))
    assert (c.batch_real, c.lr_img, c.iterations, c.optimizer, c.num_freqs) == (1024, 1e-3, 20000, "adamw", 4096)
    start = d.train_set.normalized_all("cpu")
    assert not torch.equal(synthetic_images(out), start[:20])


def test_ncfm_chunked_equals_one_pass(one_pass, datasets_root, tmp_path):
    out, _ = one_pass
    d = _run(tmp_path / "chunked", datasets_root, real_chunk=3, syn_chunk=4)
    assert d.plan.real_chunks == 4 and d.plan.syn_chunks == 3
    assert (synthetic_images(tmp_path / "chunked") - synthetic_images(out)).abs().max() < 1e-5


def test_ncfm_killed_and_resumed_equals_uninterrupted(one_pass, datasets_root, tmp_path):
    out, _ = one_pass
    cut = tmp_path / "cut"
    with Distiller(_cfg(datasets_root, iterations=4), str(cut), progress=False) as d:
        assert d.run(stop_after=3) == {"stopped": True, "iteration": 3}  # checkpoint at 2, then "killed"
    ck = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert set(ck["adam"]) == {"exp_avg", "exp_avg_sq", "step"} and ck["adam"]["step"] == 2
    with Distiller(_cfg(datasets_root, iterations=4), str(cut), resume=True, progress=False) as d:
        assert d.iteration == 2
        d.run()
    assert torch.equal(synthetic_images(cut), synthetic_images(out))
    with pytest.raises(UserError, match="different settings"):
        Distiller(_cfg(datasets_root, iterations=4, num_freqs=32), str(cut), resume=True, progress=False)


def test_ncfm_two_gloo_processes_equal_one(one_pass, datasets_root, tmp_path):
    out, _ = one_pass
    two = tmp_path / "two"
    flags = ["distill", "--method", "ncfm", "--dataset", "mnist", "--data-root", str(datasets_root), "--ipc", "2",
             "--batch-real", "8", "--width", "16", "--num-freqs", "64", "--iterations", "4", "--eval-every", "-1",
             "--log-every", "1", "--checkpoint-every", "2", "--no-progress", "--out", str(two)]
    r = torchrun(*flags)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = next(json.loads(x)["plan"] for x in (two / "metrics.jsonl").read_text().splitlines() if "plan" in x)
    assert plan["world_size"] == 2 and plan["num_classes"] == 5
    assert (synthetic_images(two) - synthetic_images(out)).abs().max() < 1e-5


def test_frequencies_depend_on_iteration_seed_and_class_only():
    m = NCFM(num_freqs=8)
    m.start_iteration(123)
    all_at_once = m.frequencies(0, 5, 3, "cpu")
    m.start_iteration(123)
    later = m.frequencies(3, 2, 3, "cpu")  # a chunk starting at class 3, another rank's shard
    assert torch.equal(all_at_once[3:], later)
    assert not torch.equal(all_at_once[0], all_at_once[1])
    m.start_iteration(124)
    assert not torch.equal(m.frequencies(0, 1, 3, "cpu")[0], all_at_once[0])


def test_ncfm_targets_are_class_characteristic_functions(one_pass):
    """The engine's real-side sums, divided by the counts, are the characteristic functions of
    the normalised embeddings at the method's frequencies."""
    import datadam_fast as dd
    _, d = one_pass
    net = d.new_network(torch.Generator().manual_seed(3))
    x = torch.randn(12, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    d.method.start_iteration(9)
    c, s = d.method.real_class_sums(net, x, 3, first_class=4)
    with torch.no_grad():
        e = net.embed(x)
    re, im = dd.characteristic_function(e, d.method.frequencies(4, 3, e.shape[1], "cpu"), 3, normalize=True,
                                        backend="reference")
    torch.testing.assert_close(c / 4, re, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s / 4, im, rtol=1e-5, atol=1e-6)
    # the fused ConvNet real side (what the run takes) gives the same sums
    assert d.fused_real == "cpu"
    fc, fs = d.method.fused_real_sums(net, x, 3, "cpu", first_class=4)
    torch.testing.assert_close(fc, c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fs, s, rtol=1e-5, atol=1e-5)


def test_num_freqs_and_optimizer_are_checked():
    with pytest.raises(UserError, match="num-freqs"):
        from datadam_fast.distill.config import check_numbers
        check_numbers(Config(method="ncfm", num_freqs=0).resolved((8, 8)))
    with pytest.raises(UserError, match="unknown optimizer"):
        Config(optimizer="lbfgs").resolved((8, 8))
