"""Distillation-loop properties: streamed real side, presets, per-phase timings."""
import pytest
import torch

from datadam_fast.distill import DistillConfig, Distiller
from datadam_fast.errors import UserError


def _run(tmp_path, name, **kw):
    cfg = DistillConfig(ipc=2, iterations=3, batch_real=6, width=16, eval_every=-1, checkpoint_every=0, **kw)
    d = Distiller(cfg, str(tmp_path / name), progress=False)
    d.run()
    return d


def test_real_chunk_streaming_matches_one_pass(tmp_path):
    a = _run(tmp_path, "one", real_chunk=0)
    b = _run(tmp_path, "chunked", real_chunk=3)  # 10 classes in chunks of 3 (last chunk 1)
    assert torch.allclose(a.syn, b.syn, atol=1e-5, rtol=1e-5)
    assert not torch.equal(a.syn, a.train_set.normalized_all("cpu")[:1])  # sanity: it did something


def test_presets_resolve_as_documented(tmp_path):
    d = _run(tmp_path, "official", preset="official")
    assert d.cfg.norm == "batchnorm" and d.cfg.power == 1.0 and d.cfg.task_balance == 0.01
    p = _run(tmp_path, "paper")
    assert p.cfg.norm == "instancenorm" and p.cfg.power == 4.0 and p.cfg.lr_img == 1.0
    o = _run(tmp_path, "override", preset="official", power=2.0, norm="instancenorm")
    assert o.cfg.power == 2.0 and o.cfg.norm == "instancenorm"


def test_step_timings_cover_the_phases(tmp_path):
    cfg = DistillConfig(ipc=1, iterations=1, batch_real=4, width=8, eval_every=-1)
    d = Distiller(cfg, None, progress=False)
    t = {}
    terms = d.step(t)
    assert set(t) >= {"sample", "augment", "real_forward", "syn_forward", "loss", "backward", "update"}
    assert all(v >= 0 for v in t.values())
    assert abs(terms["loss"] - terms["loss_attention"] - terms["loss_embedding"]) < 1e-3 * max(1, terms["loss"])


@pytest.mark.slow
def test_benchmark_scripts_smoke(tmp_path):
    """The benchmark scripts run end to end (tiny shapes; timing is not asserted)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "bench_loss.py"), "--shapes", "tiny", "--repeat", "1",
                    "--warmup", "0", "--no-compile", "--providers", "eager", "cpu", "--json", str(out)],
                   check=True, capture_output=True)
    rows = json.loads(out.read_text())["results"]
    assert {r["provider"] for r in rows} >= {"eager"} and all(r["fwd_bwd_ms"] > 0 for r in rows)
    prof = tmp_path / "prof.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "profile_iteration.py"), "--ipc", "1", "--batch-real", "4",
                    "--iterations", "1", "--warmup", "0", "--json", str(prof)], check=True, capture_output=True)
    assert json.loads(prof.read_text())["total_ms_per_iteration"] > 0


def test_dm_method_is_the_main_DM_loss():
    """--method dm: sum over classes of || mean real embedding - mean synthetic embedding ||^2 (as
    main_DM.py), on the same fresh network, with main_DM.py's defaults."""
    cfg = DistillConfig(method="dm", ipc=2, iterations=1, width=16, dsa=False, eval_every=-1)
    d = Distiller(cfg, None, progress=False)
    assert d.cfg.batch_real == 256 and d.cfg.lr_img == 1.0 and d.cfg.norm == "instancenorm"
    assert DistillConfig(method="dm", dataset="mnist").resolved((28, 28)).iterations == 20000
    gen = torch.Generator()
    gen.set_state(d.gen.get_state())
    net = d.new_network(gen)  # the network step() will draw
    real = d.real_all[d.state.next_real_idx]
    B = d.batch_real
    with torch.no_grad():
        syn = d.syn.detach().clone()
        want = sum(((net.embed(real[k * B:(k + 1) * B]).mean(0) - net.embed(syn[k * 2:(k + 1) * 2]).mean(0)) ** 2).sum()
                   for k in range(d.K))
    terms = d.step()
    assert float(terms["loss_attention"]) == 0.0
    torch.testing.assert_close(terms["loss"], want.float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="unknown method"):
        Distiller(DistillConfig(method="mtt"), None, progress=False)


def test_dm_runs_chunked_with_the_probe():
    """--method dm through the memory probe and class chunks (no attention targets anywhere)."""
    d = Distiller(DistillConfig(method="dm", ipc=2, batch_real=6, width=16, iterations=2, syn_chunk=3,
                                eval_every=-1), None, progress=False)
    assert d.plan.syn_chunks == 4 and "probe" in " ".join(d.plan.notes)
    d.run()
    assert d.iteration == 2
