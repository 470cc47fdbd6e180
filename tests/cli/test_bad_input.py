"""Bad input to every subcommand: exit code 2, one line naming the flag or file, no traceback, and
the file system exactly as before (no half-written run folder blocks the corrected re-run)."""
import os
from pathlib import Path

import pytest
import torch

from datadam_fast import cli

NAN_INF = ["nan", "inf", "-inf"]
DISTILL = ["distill", "--ipc", "1", "--iterations", "1", "--width", "8", "--no-progress"]


def _tree(root: Path):
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def _run(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert _tree(tmp_path) == before, f"{argv}: the file system changed"
    return code, err


def _one_error_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"datadam-fast {command}: error")]
    assert len(lines) == 1, err
    return lines[0]


def _bad_distill_cases():
    cases = []
    for flag in ("--lr-img", "--power", "--task-balance", "--memory-budget"):
        for v in NAN_INF:
            cases.append(([flag, v], flag))
    cases += [(["--lr-img", "-1"], "--lr-img"), (["--lr-img", "0"], "--lr-img"), (["--power", "0.5"], "--power"),
              (["--task-balance", "-1"], "--task-balance"), (["--memory-budget", "0"], "--memory-budget"),
              (["--batch-real", "0"], "--batch-real"), (["--width", "0"], "--width"), (["--depth", "0"], "--depth"),
              (["--log-every", "0"], "--log-every"), (["--ipc", "0"], "ipc"), (["--iterations", "-1"], "iterations"),
              (["--eval-epochs", "-1"], "--eval-epochs"), (["--eval-runs", "-1"], "--eval-runs"),
              (["--eval-every", "-2"], "--eval-every"), (["--checkpoint-every", "-1"], "--checkpoint-every"),
              (["--real-chunk", "-1"], "real_chunk"), (["--profile", "-1"], "profile"), (["--seed", "-1"], "--seed"),
              (["--threads", "0"], "--threads"), (["--factor", "0"], "--factor"), (["--factor", "3"], "--factor 3"),
              (["--networks", "pool:0"], "--networks"), (["--networks", "pool:2:nan"], "EPOCHS"),
              (["--networks", "trained"], "--networks"), (["--ipc", "40", "--factor", "2"], "--factor")]
    if not torch.cuda.is_available():
        cases.append((["--backend", "cuda"], "cuda"))
    return cases


@pytest.mark.parametrize("extra,names", _bad_distill_cases(), ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_distill_refuses_bad_numbers_before_any_work(extra, names, tmp_path, capsys, monkeypatch):
    code, err = _run([*DISTILL, *extra, "--out", "run"], tmp_path, capsys, monkeypatch)
    assert code == 2
    assert names in _one_error_line(err, "distill")


def test_distill_out_under_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    code, err = _run([*DISTILL, "--out", "afile/run"], tmp_path, capsys, monkeypatch)
    assert code == 2 and "afile" in _one_error_line(err, "distill")


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root may write anywhere")
def test_distill_out_in_an_unwritable_folder(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = _run([*DISTILL, "--out", "ro/run"], tmp_path, capsys, monkeypatch)
    finally:
        ro.chmod(0o755)
    assert code == 2 and "permission" in _one_error_line(err, "distill")


def _folder_without_test_split(root: Path) -> Path:
    from PIL import Image
    import numpy as np
    for k in range(2):
        d = root / "imgs" / f"c{k}"
        d.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * k + i, np.uint8)).save(d / f"{i}.png")
    return root / "imgs"


def test_a_run_that_cannot_be_evaluated_is_refused_before_the_first_iteration(tmp_path, capsys, monkeypatch):
    folder = _folder_without_test_split(tmp_path)
    code, err = _run(["distill", "--dataset", "folder", "--folder", str(folder), "--ipc", "1", "--iterations", "1",
                      "--width", "8", "--no-progress", "--out", "run"], tmp_path, capsys, monkeypatch)
    line = _one_error_line(err, "distill")
    assert code == 2 and "test split" in line and "--eval-every -1" in line


@pytest.fixture
def synthetic_file(tmp_path):
    def make(nan=False):
        images = torch.randn(10, 1, 8, 8)
        if nan:
            images[3, 0, 2, 2] = float("nan")
        path = tmp_path / ("nan.pt" if nan else "ok.pt")
        torch.save({"images": images, "labels": torch.arange(10), "dataset": "digits", "mean": [0.5], "std": [0.5]},
                   path)
        return str(path)
    return make


@pytest.mark.parametrize("extra,names", [(["--lr", v], "--lr") for v in NAN_INF + ["0"]] +
                         [(["--runs", "0"], "--runs"), (["--epochs", "-1"], "--epochs"),
                          (["--json", "missing_dir/e.json"], "missing_dir"), (["--threads", "0"], "--threads")])
def test_evaluate_refuses_bad_input_before_training(extra, names, synthetic_file, tmp_path, capsys, monkeypatch):
    path = synthetic_file()
    code, err = _run(["evaluate", "--synthetic", path, "--runs", "1", "--epochs", "0", *extra], tmp_path, capsys,
                     monkeypatch)
    assert code == 2 and names in _one_error_line(err, "evaluate")


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_synthetic_set_with_a_nan_pixel_is_refused(command, synthetic_file, tmp_path, capsys, monkeypatch):
    path = synthetic_file(nan=True)
    argv = (["evaluate", "--synthetic", path, "--runs", "1", "--epochs", "0"] if command == "evaluate"
            else ["export", path, "--format", "tensors", "--out", "exported"])
    code, err = _run(argv, tmp_path, capsys, monkeypatch)
    assert code == 2 and "NaN or Inf" in _one_error_line(err, command)


def test_export_into_a_missing_folder(synthetic_file, tmp_path, capsys, monkeypatch):
    path = synthetic_file()
    code, err = _run(["export", path, "--format", "official", "--out", "missing_dir/x.pt"], tmp_path, capsys,
                     monkeypatch)
    assert code == 2 and "missing_dir" in _one_error_line(err, "export")


def test_report_out_under_a_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"iteration": 1, "loss": 1.0}\n')
    (tmp_path / "afile").write_text("x")
    code, err = _run(["report", "run", "--out", "afile/plots"], tmp_path, capsys, monkeypatch)
    assert code == 2 and "afile" in _one_error_line(err, "report")


def test_verify_on_an_unknown_device(tmp_path, capsys, monkeypatch):
    code, err = _run(["backends", "--verify", "--device", "tpu"], tmp_path, capsys, monkeypatch)
    assert code == 2 and "tpu" in err and "Traceback" not in err


def test_evaluate_reproduces_the_runs_own_evaluation(tmp_path, capsys, monkeypatch):
    """evaluate of a run's synthetic.pt with the run's epochs and runs and no seed gives its summary's numbers."""
    import json
    monkeypatch.chdir(tmp_path)
    assert cli.main(["distill", "--ipc", "1", "--iterations", "2", "--width", "8", "--no-progress", "--eval-epochs",
                     "1", "--eval-runs", "2", "--checkpoint-every", "0", "--out", "run"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["eval"]
    assert cli.main(["evaluate", "--synthetic", "run/synthetic.pt", "--epochs", "1", "--runs", "2",
                     "--json", "e.json"]) == 0
    got = json.loads((tmp_path / "e.json").read_text())
    assert got["seed"] == summary["seed"]
    assert got["accuracies"] == summary["accuracies"]
    capsys.readouterr()


def _snapshot(root: Path):
    import hashlib
    return sorted((str(p.relative_to(root)), hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
                  for p in root.rglob("*"))


def test_plan_only_leaves_the_data_root_and_the_working_directory_unchanged(tmp_path, capsys, monkeypatch):
    """ImageNet-64 packs a decoded copy on first load: --plan-only decodes into a temporary folder instead."""
    import json
    import numpy as np
    monkeypatch.delenv("DATADAM_FAST_CACHE", raising=False)
    data, work = tmp_path / "data", tmp_path / "work"
    base = data / "imagenet64"
    base.mkdir(parents=True)
    work.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 11):  # 1000 classes, one image each, over the ten official batch files
        labels = list(range(1 + 100 * (i - 1), 1 + 100 * i))
        np.savez(base / f"train_data_batch_{i}.npz", data=rng.integers(0, 256, (100, 12288), dtype=np.uint8),
                 labels=labels, mean=np.zeros(12288))
    np.savez(base / "val_data.npz", data=rng.integers(0, 256, (4, 12288), dtype=np.uint8), labels=[1, 2, 3, 4])
    data_before, work_before = _snapshot(data), _snapshot(work)
    monkeypatch.chdir(work)
    code = cli.main(["distill", "--dataset", "imagenet64", "--data-root", str(data), "--ipc", "1", "--width", "8",
                     "--depth", "2", "--no-compile", "--plan-only"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert json.loads(out.out.strip().splitlines()[-1])["plan"]["num_classes"] == 1000
    assert "--plan-only: a missing packed copy of imagenet64 is decoded into" in out.err
    assert _snapshot(data) == data_before and _snapshot(work) == work_before


def test_likely_mistakes_are_warned_about(synthetic_file, tmp_path, capsys, monkeypatch):
    """A synthetic set covering some classes only, a batch-real above the smallest class: one warning line each."""
    import warnings
    from datadam_fast.distill import DistillConfig, Distiller
    images = torch.randn(5, 1, 8, 8)
    part = tmp_path / "part.pt"
    torch.save({"images": images, "labels": torch.arange(5), "dataset": "digits", "mean": [0.5], "std": [0.5]}, part)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # the CLI sets its one-line form
    with pytest.warns(UserWarning, match="images of 5 of the 10 classes of digits"):
        code, err = _run(["evaluate", "--synthetic", str(part), "--runs", "1", "--epochs", "0", "--no-progress"],
                         tmp_path, capsys, monkeypatch)
    assert code == 0
    assert warnings.formatwarning("datadam_fast: x", UserWarning, "f.py", 1) == "datadam-fast: warning: x\n"
    folder = _folder_without_test_split(tmp_path / "f")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        Distiller(DistillConfig(dataset="folder", data_opts={"path": str(folder)}, ipc=1, width=8, iterations=1,
                                eval_every=-1), None, progress=False).close()
    assert any("larger than the smallest class" in str(w.message) for w in record)
    from PIL import Image
    import numpy as np
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(folder / "c0" / "odd.png")
    from datadam_fast.data import load_dataset
    with pytest.warns(UserWarning, match="1 of 7 images differ in size from the first one"):
        load_dataset("folder", path=str(folder), progress=False)
    one = tmp_path / "one" / "c0"
    one.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(one / f"{i}.png")
    with pytest.warns(UserWarning, match="single class"):
        Distiller(DistillConfig(dataset="folder", data_opts={"path": str(one.parent)}, ipc=1, width=8, iterations=1,
                                eval_every=-1), None, progress=False).close()
