"""Evaluation protocol: lr schedule, batched = sequential, official result files, network choice."""
import collections
import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from datadam_fast import cli
from datadam_fast.data import load_dataset
from datadam_fast.evaluation.evaluate import (EvalConfig, evaluate_synthetic, lr_per_epoch,
                                              network_for_synthetic, train_networks)
from datadam_fast.evaluation.formats import load_synthetic
from datadam_fast.errors import UserError


@pytest.fixture(scope="module")
def digits_small():
    """Two training images per class of the bundled digits (fast)."""
    ds = load_dataset("digits", split="train")
    x, y = ds.normalized_all("cpu"), ds.labels.long()
    idx = torch.cat([torch.nonzero(y == k)[:2, 0] for k in range(10)])
    return x[idx], y[idx]


def _gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ------------------------------------------------------------------------------ lr schedule
def test_lr_per_epoch_matches_the_official_loop():
    lr = 0.01
    got = lr_per_epoch(6, lr)
    assert len(got) == 7
    assert got[:5] == [lr] * 5 and got[5:] == pytest.approx([lr * 0.1] * 2)
    # simulate the official loop literally for several budgets
    for E in (0, 1, 2, 3, 10, 1000, 1800):
        sched, cur, ref = [E // 2 + 1], lr, []
        for ep in range(E + 1):
            ref.append(cur)          # epoch ep trains with the current lr ...
            if ep in sched:          # ... and only then is the lr decayed
                cur *= 0.1
        assert lr_per_epoch(E, lr) == ref, E
    with pytest.raises(UserError, match="epochs"):
        lr_per_epoch(-1, lr)


@pytest.mark.parametrize("batched", [False, True])
def test_training_steps_with_the_scheduled_lr(digits_small, batched):
    x, y = digits_small
    cfg = EvalConfig(model="ConvNet", width=8, epochs=6, batch_size=8, dsa=False)
    seen = []

    def hook(ep, opt):
        seen.append((ep, [g["lr"] for g in opt.param_groups], opt, len(opt.state)))

    steps = []
    orig = torch.optim.SGD.step

    def counting_step(self, *a, **k):  # which lr the optimizer actually applies
        steps.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    torch.optim.SGD.step = counting_step
    try:
        train_networks(x, y, cfg, _gens(0, 1) if batched else _gens(0), num_classes=10, batched=batched,
                       epoch_callback=hook)
    finally:
        torch.optim.SGD.step = orig
    want = lr_per_epoch(6, 0.01)
    assert [e for e, *_ in seen] == list(range(7))
    assert [lrs[0] for _, lrs, _, _ in seen] == want
    per_epoch = len(range(0, x.shape[0], cfg.batch_size))
    assert steps == [lr for lr in want for _ in range(per_epoch)]
    # a fresh optimizer (momentum reset) exactly where the lr drops, the same one otherwise
    opts = [o for _, _, o, _ in seen]
    new = [ep for ep in range(1, 7) if opts[ep] is not opts[ep - 1]]
    assert new == [want.index(want[-1])]
    assert seen[new[0]][3] == 0  # no momentum buffers carried over


# --------------------------------------------------------------------------- batched
@pytest.mark.slow
@pytest.mark.parametrize("model", ["ConvNet", "ConvNetBN"])
def test_batched_equals_sequential_and_runs_differ(digits_small, model):
    x, y = digits_small
    cfg = EvalConfig(model=model, width=16, epochs=3, batch_size=8)  # DSA on: per-run draws matter
    seq, lseq, _ = train_networks(x, y, cfg, _gens(3, 4, 5), num_classes=10, batched=False)
    bat, lbat, _ = train_networks(x, y, cfg, _gens(3, 4, 5), num_classes=10, batched=True)
    for a, b in zip(seq, bat):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5, rtol=1e-4), k
        if model == "ConvNetBN":  # running statistics were tracked per run
            assert int(sb["features.1.num_batches_tracked"]) == 4 * len(range(0, 20, 8))
            assert sb["features.1.running_var"].ne(1).any()
    assert lseq == pytest.approx(lbat, rel=1e-4, abs=1e-5)
    w = [n.state_dict()["classifier.weight"] for n in bat]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])


def test_evaluate_synthetic_batched_vs_sequential(digits_small):
    x, y = digits_small
    test = load_dataset("digits", split="test")
    cfg = dict(model="ConvNet", width=8, epochs=2, runs=2, batch_size=8)
    a = evaluate_synthetic(x, y, test, EvalConfig(batched=False, **cfg), seed=1)
    b = evaluate_synthetic(x, y, test, EvalConfig(batched=True, **cfg), seed=1)
    assert a["batched"] is False and b["batched"] is True
    # identical draws; at most a borderline test image may flip through float rounding
    assert a["accuracies"] == pytest.approx(b["accuracies"], abs=2 * 100 / len(test))
    assert b["network"] == {"model": "ConvNet", "family": "ConvNet", "norm": "instancenorm", "width": 8,
                            "depth": 3, "act": "relu", "pooling": "avgpool"}
    one = evaluate_synthetic(x, y, test, EvalConfig(**{**cfg, "runs": 1}), seed=1)
    assert one["batched"] is False and one["accuracies"][0] == a["accuracies"][0]


# ------------------------------------------------------------------- official result files
def _official_res(tmp_path, numpy_core_legacy=False):
    syn = torch.load(_random_real(tmp_path) / "synthetic.pt", weights_only=True)
    first = [torch.zeros_like(syn["images"]), syn["labels"].float()]
    last = [syn["images"], syn["labels"].float()]
    obj = {"data": [first, last],
           "accs_all_exps": {"ConvNet": [np.float64(0.5), np.float64(0.6)],
                             "arrays": [np.array([0.25, 0.75]), np.array([1, 2], dtype=np.int64)],
                             "scalars": {"f32": np.float32(0.5), "i64": np.int64(3)}}}
    path = tmp_path / "res_DataDAM_digits_ConvNet_1ipc_.pt"
    torch.save(obj, path)
    if numpy_core_legacy:
        # numpy 1.x (what the official code pins) names numpy.core.* instead of numpy._core.*;
        # torch.save uses pickle protocol 2, whose GLOBAL opcode is plain text, so renaming is exact
        buf = io.BytesIO()
        with zipfile.ZipFile(path) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
            for item in zin.infolist():
                data = zin.read(item.filename)
                if item.filename.endswith("data.pkl"):
                    assert b"numpy._core.multiarray" in data
                    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
                zout.writestr(item, data)
        path.write_bytes(buf.getvalue())
    return path, last


def _random_real(tmp_path):
    out = tmp_path / "rr"
    if not out.exists():
        assert cli.main(["distill", "--out", str(out), "--ipc", "1", "--iterations", "0", "--eval-every", "-1",
                         "--width", "8", "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("legacy", [False, True])
def test_official_res_file_with_numpy_values_loads_and_evaluates(tmp_path, capsys, legacy):
    path, last = _official_res(tmp_path, numpy_core_legacy=legacy)
    images, labels, meta = load_synthetic(str(path))
    assert torch.equal(images, last[0]) and torch.equal(labels, last[1].long())  # the last eval point
    assert meta == {"format": "official", "eval_points": 2}
    js = tmp_path / "e.json"
    code = cli.main(["evaluate", "--synthetic", str(path), "--dataset", "digits", "--runs", "1", "--epochs", "1",
                     "--width", "8", "--json", str(js)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    res = json.loads(js.read_text())
    # official files are evaluated with the official (BatchNorm) ConvNet, and say so
    assert res["model"] == "ConvNetBN" and res["norm"] == "batchnorm" and res["width"] == 8 and res["depth"] == 3
    assert "official" in res["network_source"] and "norm=batchnorm" in cap.out


class _Sneaky(collections.OrderedDict):
    pass


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["subclass", "reduce"])
def test_arbitrary_objects_are_refused(tmp_path, capsys, kind):
    marker = tmp_path / "pwned"
    evil = _Sneaky(a=torch.zeros(1)) if kind == "subclass" else _RunsCode(marker)
    path = tmp_path / "res_evil.pt"
    torch.save({"data": [[torch.zeros(10, 1, 8, 8), torch.arange(10)]], "accs_all_exps": {"x": evil}}, path)
    code = cli.main(["evaluate", "--synthetic", str(path), "--dataset", "digits", "--runs", "1", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "refusing to load" in err and ("_Sneaky" in err if kind == "subclass" else "system" in err)
    assert not marker.exists()


# --------------------------------------------------------------------- which network
def test_evaluate_follows_the_recorded_network(tmp_path, capsys):
    out = tmp_path / "off"
    assert cli.main(["distill", "--out", str(out), "--preset", "official", "--ipc", "1", "--iterations", "0",
                     "--eval-every", "-1", "--width", "8", "--no-progress"]) == 0
    syn = str(out / "synthetic.pt")
    js = tmp_path / "e.json"

    def ev(*extra):
        code = cli.main(["evaluate", "--synthetic", syn, "--runs", "1", "--epochs", "0", "--json", str(js), *extra])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        return json.loads(js.read_text()), cap.out

    res, text = ev()
    assert (res["model"], res["norm"], res["width"], res["depth"]) == ("ConvNet", "batchnorm", 8, 3)
    assert "norm=batchnorm, width=8, depth=3" in text and "preset official" in res["network_source"]
    res, _ = ev("--norm", "instancenorm")
    assert (res["norm"], res["width"]) == ("instancenorm", 8)
    res, _ = ev("--model", "ConvNet")  # an explicit model takes its registry defaults
    assert (res["model"], res["norm"], res["width"]) == ("ConvNet", "instancenorm", 128)
    res, _ = ev("--model", "ConvNetBN", "--width", "8", "--depth", "2")
    assert (res["norm"], res["width"], res["depth"]) == ("batchnorm", 8, 2)


def test_network_for_synthetic_rules():
    paper = {"config": {"preset": "paper", "model": "ConvNet", "norm": "instancenorm", "width": 32, "depth": 3,
                        "eval_model": "ConvNet"}}
    assert network_for_synthetic(paper)["norm"] == "instancenorm"
    other = {"config": {**paper["config"], "eval_model": "ResNet18BN"}}
    r = network_for_synthetic(other)
    assert (r["model"], r["norm"], r["width"]) == ("ResNet18BN", None, None)
    assert network_for_synthetic({})["model"] == "ConvNet"
    assert network_for_synthetic({"format": "official"})["model"] == "ConvNetBN"


def test_frozen_model_network_is_read_from_the_state_dict(tmp_path, capsys):
    from datadam_fast.models.networks import get_network
    syn = tmp_path / "syn.pt"
    torch.save({"data": [torch.zeros(10, 1, 8, 8), torch.arange(10).float()]}, syn)
    for name, norm in (("ConvNet", "instancenorm"), ("ConvNetBN", "batchnorm")):
        f = tmp_path / f"{name}.pt"
        torch.save({"net_parameters": get_network(name, 1, 10, (8, 8), width=16, depth=2).state_dict()}, f)
        js = tmp_path / "f.json"
        code = cli.main(["evaluate", "--synthetic", str(syn), "--dataset", "digits", "--frozen-model", str(f),
                         "--json", str(js)])
        cap = capsys.readouterr()
        assert code == 0, cap.err
        res = json.loads(js.read_text())
        assert (res["norm"], res["width"], res["depth"]) == (norm, 16, 2)
        assert f"norm={norm}" in cap.out and ("BatchNorm buffers (running_mean" in cap.out) == (norm == "batchnorm")
    # a network that is not a ConvNet must be named; naming the wrong one is a clear error
    f = tmp_path / "alex.pt"
    torch.save({"net_parameters": get_network("AlexNet", 1, 10, (8, 8)).state_dict()}, f)
    code = cli.main(["evaluate", "--synthetic", str(syn), "--dataset", "digits", "--frozen-model", str(f)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--model" in err
    code = cli.main(["evaluate", "--synthetic", str(syn), "--dataset", "digits", "--frozen-model",
                     str(tmp_path / "ConvNetBN.pt"), "--model", "ConvNet", "--width", "16", "--depth", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "norm=instancenorm" in err


@pytest.mark.parametrize("args,match", [
    (["--runs", "0"], "--runs"), (["--epochs", "-1"], "--epochs"), (["--model", "Nope"], "Nope"),
])
def test_evaluate_bad_flags(tmp_path, capsys, args, match):
    syn = tmp_path / "s.pt"
    torch.save({"images": torch.zeros(10, 1, 8, 8), "labels": torch.arange(10), "dataset": "digits"}, syn)
    code = cli.main(["evaluate", "--synthetic", str(syn), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err


# ---------------------------------------------------------------------- presets
def test_preset_task_balance_and_taps():
    from datadam_fast.distill import DistillConfig
    off = DistillConfig(preset="official").resolved((64, 64))
    assert off.task_balance == 0.01 and off.taps == "official" and off.norm == "batchnorm"
    pap = DistillConfig(preset="paper").resolved((64, 64))
    assert pap.task_balance == 0.02 and pap.taps == "blocks"
    assert DistillConfig(preset="paper").resolved((32, 32)).task_balance == 0.01
    given = DistillConfig(preset="official", task_balance=0.05, taps="blocks").resolved((64, 64))
    assert given.task_balance == 0.05 and given.taps == "blocks"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ConvNetBN", "ResNet18BN_AP"])
def test_batched_testing_equals_per_network_testing(digits_small, model):
    from datadam_fast.evaluation.evaluate import accuracies_batched, accuracy
    x, y = digits_small
    cfg = EvalConfig(model=model, width=8 if model.startswith("ConvNet") else None, epochs=1, batch_size=10)
    nets, _, _ = train_networks(x, y, cfg, _gens(7, 8), num_classes=10, batched=True)
    test = load_dataset("digits", split="test")
    got = accuracies_batched(nets, test, "cpu", batch=100)
    want = [accuracy(n, test, torch.device("cpu"), 100) for n in nets]
    assert got == pytest.approx(want, abs=100 / len(test) + 1e-9)


def test_unknown_taps_is_a_user_error():
    from datadam_fast.distill import DistillConfig
    with pytest.raises(UserError, match="taps"):
        DistillConfig(taps="every").resolved((32, 32))


# ------------------------------------------------------------------- resumable evaluation
class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("batched", [False, True])
def test_an_interrupted_evaluation_continues_to_the_uninterrupted_result(digits_small, batched):
    x, y = digits_small
    test = load_dataset("digits", split="test")
    cfg = EvalConfig(model="ConvNet", width=8, epochs=2, runs=3, batch_size=8, batched=batched)
    full = evaluate_synthetic(x, y, test, cfg, seed=3)
    kept = {}

    def stop_after_first(r, res):
        kept[r] = res
        if len(kept) == 1:
            raise _Interrupted

    if batched:  # all runs finish together: nothing to keep before the end
        kept = {r: full["runs"][r] for r in (0, 2)}
    else:
        with pytest.raises(_Interrupted):
            evaluate_synthetic(x, y, test, cfg, seed=3, on_run=stop_after_first)
        assert list(kept) == [0]
    seen = []
    resumed = evaluate_synthetic(x, y, test, cfg, seed=3, completed=kept, on_run=lambda r, res: seen.append(r))
    assert seen == [r for r in range(3) if r not in kept]  # only the missing runs are trained
    assert resumed["resumed_runs"] == len(kept)
    assert resumed["accuracies"] == full["accuracies"]
    assert (resumed["mean"], resumed["std"]) == (full["mean"], full["std"])
    # every run finished earlier: nothing is trained
    again = evaluate_synthetic(x, y, test, cfg, seed=3, completed={r: full["runs"][r] for r in range(3)},
                               on_run=lambda r, res: pytest.fail("trained a finished run"))
    assert again["accuracies"] == full["accuracies"] and again["resumed_runs"] == 3


def test_evaluate_json_keeps_finished_runs_and_a_rerun_continues(tmp_path, capsys, monkeypatch):
    import datadam_fast.evaluation.evaluate as ev
    syn = str(_random_real(tmp_path) / "synthetic.pt")
    args = ["evaluate", "--synthetic", syn, "--runs", "3", "--epochs", "1", "--seed", "5", "--no-progress"]
    ref = tmp_path / "ref.json"
    assert cli.main([*args, "--json", str(ref)]) == 0
    assert not (tmp_path / "ref.json.partial").exists()  # removed once the result is written
    capsys.readouterr()
    js = tmp_path / "e.json"
    partial = tmp_path / "e.json.partial"
    real_accuracy, calls = ev.accuracy, []

    def dies_in_the_second_run(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process is killed while testing run 1
        return real_accuracy(*a, **k)

    monkeypatch.setattr(ev, "accuracy", dies_in_the_second_run)
    assert cli.main([*args, "--json", str(js)]) == 130
    assert "the same command continues from the finished runs" in capsys.readouterr().err
    monkeypatch.setattr(ev, "accuracy", real_accuracy)
    assert not js.exists()
    kept = json.loads(partial.read_text())
    assert list(kept["runs"]) == ["0"] and kept["key"]["seed"] == 5
    assert cli.main([*args, "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "resuming the evaluation: run(s) 0 of 3 finished earlier" in out
    res, want = json.loads(js.read_text()), json.loads(ref.read_text())
    assert res["accuracies"] == want["accuracies"] and res["resumed_runs"] == 1 and want["resumed_runs"] == 0
    assert not partial.exists()
    # a partial file of another protocol (here: another seed) is not used, and says so
    kept["runs"]["0"]["accuracy"] = -1.0
    partial.write_text(json.dumps(kept))
    assert cli.main([*args[:-2], "6", "--no-progress", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "not resumed (written for another set, protocol, seed or device)" in out
    assert "resuming" not in out and -1.0 not in json.loads(js.read_text())["accuracies"]
    # a torn or foreign file is set aside too
    partial.write_text("{not json")
    assert cli.main([*args, "--json", str(js)]) == 0
    assert "not resumed (unreadable)" in capsys.readouterr().out
    assert json.loads(js.read_text())["accuracies"] == want["accuracies"]


# --------------------------------------------------------------------------- compiled training
def test_compile_is_chosen_by_the_run_length(monkeypatch):
    from datadam_fast.evaluation.evaluate import COMPILE_MIN_STEPS, resolve_compile
    monkeypatch.delenv("DATADAM_FAST_COMPILE", raising=False)  # tests/conftest.py sets it to 0
    long_run = EvalConfig(epochs=COMPILE_MIN_STEPS // 2, batch_size=256)  # 2 batches of 400 images
    assert resolve_compile(long_run, 400, batched=False) == (True, f"{COMPILE_MIN_STEPS} training steps per run")
    assert resolve_compile(long_run, 256, batched=False)[0] is False     # one batch per epoch: too few steps
    assert resolve_compile(long_run, 400, batched=True)[0] is False      # vmapped runs stay eager
    assert resolve_compile(EvalConfig(epochs=1, compile=True), 10, batched=False) == (True, "requested")
    assert resolve_compile(EvalConfig(epochs=10 ** 6, compile=False), 10, batched=False) == (False, "requested")
    monkeypatch.setenv("DATADAM_FAST_COMPILE", "0")
    assert resolve_compile(long_run, 400, batched=False) == (False, "DATADAM_FAST_COMPILE=0")


@pytest.mark.slow
def test_compiled_training_follows_the_eager_training(digits_small):
    """Same draws, same steps: the compiled loss trains each run's own parameters and BatchNorm's
    running statistics (the official ConvNet: parameters and buffers both go through the compiled
    graph) to the eager result within float rounding, and several runs share one compiled graph
    per batch shape."""
    model = "ConvNetBN"
    from torch._dynamo.utils import counters
    from datadam_fast.evaluation.evaluate import CompiledTrainingLoss, build_eval_network
    x, y = digits_small
    cfg = EvalConfig(model=model, width=8, epochs=3, batch_size=10, dsa=True)  # 20 images: two batches of 10
    eager, l_eager, _ = train_networks(x, y, cfg, _gens(3, 4), num_classes=10)
    loss_fn = CompiledTrainingLoss(build_eval_network(cfg, 1, 10, (8, 8), generator=torch.Generator().manual_seed(0)))
    graphs = counters["stats"]["unique_graphs"]
    comp, l_comp, _ = train_networks(x, y, cfg, _gens(3, 4), num_classes=10, loss_fn=loss_fn)
    assert loss_fn.failed is None
    assert counters["stats"]["unique_graphs"] - graphs == 1  # one batch shape: one graph for both runs
    for a, b in zip(eager, comp):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sb[k].float(), sa[k].float(), rtol=1e-4, atol=1e-5, msg=k)
        # running statistics moved away from their initial values
        assert not torch.equal(sb["features.1.running_mean"], torch.zeros_like(sb["features.1.running_mean"]))
    assert l_comp == pytest.approx(l_eager, rel=1e-4)
    assert not torch.equal(comp[0].state_dict()["classifier.weight"], comp[1].state_dict()["classifier.weight"])


def test_a_failing_compiler_falls_back_to_eager(digits_small, monkeypatch):
    from datadam_fast.evaluation import evaluate as E
    x, y = digits_small

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("no C++ compiler")
        return run
    monkeypatch.setattr(E.torch, "compile", broken_compile)
    test = load_dataset("digits", split="test")
    cfg = dict(model="ConvNet", width=8, epochs=2, runs=1, batch_size=8)
    with pytest.warns(RuntimeWarning, match="compiled evaluation training failed .*no C\\+\\+ compiler"):
        got = evaluate_synthetic(x, y, test, EvalConfig(compile=True, **cfg), seed=2)
    want = evaluate_synthetic(x, y, test, EvalConfig(compile=False, **cfg), seed=2)
    assert got["compiled"] is False and "no C++ compiler" in got["compiled_reason"]
    assert want["compiled"] is False and want["compiled_reason"] == "requested"
    assert got["accuracies"] == want["accuracies"]
