"""benchmarks/bench_iteration.py and its official-iteration re-implementation.

The official row is only a fair baseline if it computes the official loss: with the same network,
the same inputs and no DSA its loss (and pixel gradient) must be the package's
``attention_matching_loss`` at power 1."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import datadam_fast as dd
from datadam_fast.data import load_dataset
from datadam_fast.models.networks import get_network

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_iteration  # noqa: E402
from official_iteration import OfficialIteration, _ReluHooks, official_loss  # noqa: E402

pytestmark = pytest.mark.slow  # benchmark script subprocesses


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_official_loss_equals_package_loss(backend):
    K, B, ipc, C, H = 3, 5, 2, 3, 16
    net = get_network("ConvNetBN", C, K, (H, H), width=8)   # depth 3: two attention layers + embedding
    net.train().requires_grad_(False)                       # train-mode BN, as officially
    real = torch.randn(K * B, C, H, H)
    syn = torch.randn(K * ipc, C, H, H)
    s1 = syn.clone().requires_grad_(True)
    got = official_loss(net, real, s1, num_classes=K, batch_real=B, ipc=ipc, task_balance=0.01)
    got.backward()
    s2 = syn.clone().requires_grad_(True)
    rf, re = net.features_and_embedding(real)                # same whole batch -> same BN statistics
    sf, se = net.features_and_embedding(s2)
    want = dd.attention_matching_loss([f.detach() for f in rf], sf, re.detach(), se, num_classes=K, power=1.0,
                                      attention_weight=100.0, embedding_weight=1.0, backend=backend)
    want.backward()
    assert got.device.type == "cpu" and got.dtype == torch.float32
    assert float(want.detach()) > 0
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-6 * float(s2.grad.abs().max()))


def test_official_hooks_clone_every_relu_and_loss_skips_the_last():
    net = get_network("ConvNetBN", 1, 2, (12, 12), width=4).train().requires_grad_(False)
    hooks = _ReluHooks(net)
    x = torch.randn(4, 1, 12, 12)
    feats, _ = net.features_and_embedding(x)
    acts = hooks.activations()
    hooks.remove()
    assert len(acts) == net.depth and len(feats) == net.depth - 1
    for a, f in zip(acts, feats):
        torch.testing.assert_close(a, f)
        assert a.data_ptr() != f.data_ptr()                  # clones, as officially
    assert not net.features[2]._forward_hooks               # removed after the forward


def test_official_iteration_is_siamese_per_class_and_learns():
    ds = load_dataset("digits")
    it = OfficialIteration(ds, ipc=2, batch_real=4, width=8, seed=1)
    x = it.get_images(0, 4)
    a, b = it.diff_augment(x, 123), it.diff_augment(x.clone(), 123)
    torch.testing.assert_close(a, b)                          # same seed -> same transform on both sides
    outs = {tuple(it.diff_augment(x, s).flatten()[:32].tolist()) for s in range(8)}
    assert len(outs) > 1                                      # seeds do change the transform
    before = it.image_syn.detach().clone()
    loss = it.step()
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    assert not torch.equal(before, it.image_syn.detach())     # one SGD step on the pixels


def test_parse_variant_types_and_unknown_fields():
    kw, missing = bench_iteration.parse_variant("official,ipc=3,power=2,dsa=0,backend=reference,nosuch=1")
    assert kw["preset"] == "official" and kw["ipc"] == 3 and kw["power"] == 2.0 and kw["dsa"] is False
    assert kw["backend"] == "reference" and missing == ["nosuch"]
    with pytest.raises(ValueError):
        bench_iteration.parse_variant("paper,width")          # a bare word after the preset


def test_bench_iteration_smoke(tmp_path):
    """Tiny run: every row present, an unknown DistillConfig field is a 'skipped' row, not a crash."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_iteration.py"), "--dataset", "digits", "--ipc", "1",
           "--batch-real", "4", "--width", "8", "--iterations", "2", "--warmup", "1", "--threads", "1",
           "--variants", "paper", "official", "paper,no_such_option=1", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"official", "package:paper", "package:official", "package:paper,no_such_option=1",
                         "limit:convs"}
    skipped = rows["package:paper,no_such_option=1"]
    assert skipped["status"] == "skipped" and "DistillConfig has no field no_such_option" in skipped["reason"]
    assert "skipped" in p.stdout
    for name in ("official", "package:paper", "package:official", "limit:convs"):
        r = rows[name]
        assert r["status"] == "ok" and r["iterations"] == 2 and r["median_ms"] > 0 and r["first_iteration_ms"] > 0
    paper = rows["package:paper"]
    assert set(paper["phases_median_ms"]) >= {"real_forward", "syn_forward", "backward", "update"}
    assert paper["speedup_vs_paper"] == pytest.approx(1.0)
    assert rows["official"]["speedup_vs_official"] == pytest.approx(1.0)
    assert paper["real_forward_over_real_convs"] > 0
    assert set(rows["limit:convs"]["parts_median_ms"]) >= {"real_forward_convs", "syn_convs"}
    m = res["machine"]
    assert m["torch"] == torch.__version__ and m["affinity"] and m["command"] and m["torch_threads"] == 1


def test_bench_iteration_on_random_shaped_data(tmp_path):
    """--shape K,C,S: CIFAR / ImageNet-64 shapes without the data (the GPU iteration tables)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_iteration.py"), "--shape", "3,3,16", "--ipc", "1",
           "--batch-real", "4", "--width", "8", "--iterations", "1", "--warmup", "1", "--threads", "1",
           "--variants", "paper,compile=0", "--no-official", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["package:paper,compile=0"]["status"] == "ok"
    assert rows["package:paper,compile=0"]["info"]["config"]["dataset"] == "random3x3x16"
    assert rows["limit:convs"]["info"]["convs"][0]["in"] == [3, 16, 16]
    bad = subprocess.run(cmd[:3] + ["3,3"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--shape must be K,C,S" in bad.stderr


def test_blocks_order_records_what_ran(tmp_path):
    """--order blocks (the CUDA default): each row built when its block starts and closed after it;
    headline iterations without phase syncs plus separate phase-timed ones; every package row says
    whether it really compiled, which real side ran, its planned peak and its first loss (the same
    seed gives the same first loss whatever the implementation)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_iteration.py"), "--dataset", "digits", "--ipc", "1",
           "--batch-real", "4", "--width", "8", "--iterations", "2", "--warmup", "1", "--threads", "1",
           "--order", "blocks", "--phase-iterations", "2", "--no-limit",
           "--variants", "paper,compile=0,real_epilogue=off", "paper,compile=0", "--json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["complete"] is True and res["args"]["order"] == "blocks"
    rows = {r["name"]: r for r in res["rows"]}
    off, fused = rows["package:paper,compile=0,real_epilogue=off"], rows["package:paper,compile=0"]
    for r in (off, fused):
        assert r["status"] == "ok" and r["iterations"] == 2 and r["phase_timed_median_ms"] > 0
        assert r["info"]["compiled"] is False and r["info"]["predicted_peak_bytes"] > 0
        assert set(r["phases_median_ms"]) >= {"real_forward", "syn_forward", "update"}
    assert off["info"]["fused_real"] is None and fused["info"]["fused_real"] == "cpu"
    assert fused["info"]["first_iteration_loss"] == pytest.approx(off["info"]["first_iteration_loss"], rel=1e-4)
    assert rows["official"]["info"]["first_iteration_loss"] > 0
