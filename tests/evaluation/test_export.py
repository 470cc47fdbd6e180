"""datadam-fast export: official, folder and tensors formats, each read back by evaluate."""
import json
import os

import pytest
import torch

from datadam_fast import cli

K, IPC = 10, 2


def _evaluate_json(capsys, synthetic, tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert cli.main(["evaluate", "--synthetic", str(synthetic), "--runs", "1", "--epochs", "1", "--seed", "3",
                     "--json", str(out)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert cli.main(["distill", "--ipc", str(IPC), "--iterations", "2", "--batch-real", "8", "--width", "16",
                     "--eval-every", "-1", "--no-progress", "--out", str(out)]) == 0
    return out


def test_official(run_dir, tmp_path, capsys):
    assert cli.main(["export", str(run_dir), "--format", "official", "--out", str(tmp_path / "off")]) == 0
    path = tmp_path / "off" / f"res_DataDAM_digits_ConvNet_{IPC}ipc.pt"
    images, labels = torch.load(path)["data"][-1]  # plain torch.load, as DC-BENCH reads it
    assert images.shape == (K * IPC, 1, 8, 8) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [k for k in range(K) for _ in range(IPC)]
    orig = torch.load(run_dir / "synthetic.pt", weights_only=True)
    assert torch.equal(images, orig["images"])
    a = _evaluate_json(capsys, run_dir / "synthetic.pt", tmp_path, "orig")
    b = _evaluate_json(capsys, path, tmp_path, "official")
    assert a["network"] == b["network"] and a["accuracies"] == b["accuracies"]
    # a .pt path is used as given
    assert cli.main(["export", str(run_dir / "synthetic.pt"), "--format", "official", "--out",
                     str(tmp_path / "x.pt")]) == 0
    assert torch.equal(torch.load(tmp_path / "x.pt")["data"][-1][0], images)


def test_folder(run_dir, tmp_path, capsys):
    from PIL import Image
    from datadam_fast.data import ImageDataset
    from datadam_fast.evaluation.export import to_uint8
    out = tmp_path / "folder"
    assert cli.main(["export", str(run_dir), "--format", "folder", "--out", str(out)]) == 0
    assert "clipped" in capsys.readouterr().out
    classes = sorted(d for d in os.listdir(out) if (out / d).is_dir())
    assert len(classes) == K and all(len(os.listdir(out / c)) == IPC for c in classes)
    assert Image.open(out / classes[3] / "1.png").size == (8, 8)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == classes and len(meta["mean"]) == 1 and meta["dataset"] == "digits"
    # what the folder holds is the 8-bit form of the set; reading it back gives exactly that
    orig = torch.load(run_dir / "synthetic.pt", weights_only=True)
    u8, _ = to_uint8(orig["images"], orig)
    quant = ImageDataset("digits", u8, orig["labels"], classes, orig["mean"], orig["std"]).normalized_all()
    from datadam_fast.evaluation.formats import load_export_dir
    back, labels, _ = load_export_dir(str(out))
    assert torch.equal(back, quant) and torch.equal(labels, orig["labels"])
    assert (quant - orig["images"]).abs().max() > 0  # 8 bits do not hold the float set
    qfile = tmp_path / "quant.pt"
    torch.save({**orig, "images": quant}, qfile)
    a = _evaluate_json(capsys, qfile, tmp_path, "quant")
    b = _evaluate_json(capsys, out, tmp_path, "folder")
    assert a["network"] == b["network"] and a["accuracies"] == b["accuracies"]
    # an export never writes into a non-empty directory
    assert cli.main(["export", str(run_dir), "--format", "folder", "--out", str(out)]) == 2


def test_tensors(run_dir, tmp_path, capsys):
    out = tmp_path / "tensors"
    assert cli.main(["export", str(run_dir), "--format", "tensors", "--out", str(out)]) == 0
    images = torch.load(out / "images.pt")
    labels = torch.load(out / "labels.pt")
    orig = torch.load(run_dir / "synthetic.pt", weights_only=True)
    assert torch.equal(images, orig["images"]) and torch.equal(labels, orig["labels"])
    a = _evaluate_json(capsys, run_dir / "synthetic.pt", tmp_path, "orig")
    b = _evaluate_json(capsys, out, tmp_path, "tensors")
    assert a["network"] == b["network"] and a["accuracies"] == b["accuracies"]


def test_bad_source(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--format", "tensors", "--out", str(tmp_path / "o")]) == 2
    assert "no synthetic.pt" in capsys.readouterr().err


def test_an_exported_folder_evaluation_resumes_with_its_json_inside_the_folder(run_dir, tmp_path, capsys,
                                                                                monkeypatch):
    """The set's hash leaves out the evaluation's own files, so a JSON kept in the folder still resumes."""
    import datadam_fast.evaluation.evaluate as ev
    out = tmp_path / "folder"
    assert cli.main(["export", str(run_dir), "--format", "folder", "--out", str(out)]) == 0
    args = ["evaluate", "--synthetic", str(out), "--runs", "2", "--epochs", "1", "--seed", "3", "--no-progress",
            "--json", str(out / "eval.json")]
    real, calls = ev.accuracy, []

    def dies_in_the_second_run(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "accuracy", dies_in_the_second_run)
    assert cli.main(args) == 130
    monkeypatch.setattr(ev, "accuracy", real)
    assert (out / "eval.json.partial").exists()
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "resuming the evaluation: run(s) 0 of 2" in capsys.readouterr().out
    res = json.loads((out / "eval.json").read_text())
    assert res["resumed_runs"] == 1 and len(res["accuracies"]) == 2
    assert not (out / "eval.json.partial").exists()
