"""ZCA whitening (the official --zca): the transform against kornia's formula written out, chunked
fitting, the refusal above MAX_FEATURES, and --zca end to end (digits, MNIST) with evaluate."""
import json

import pytest
import torch

from datadam_fast import cli
from datadam_fast.data import load_dataset
from datadam_fast.errors import UserError
from datadam_fast.data.zca import MAX_FEATURES, WhitenedDataset, fit_zca, whiten_like


def test_transform_equals_the_formula():
    ds = load_dataset("digits", split="train")
    z = fit_zca(ds)
    # kornia ZCAWhitening(eps=0.1): mean-centred covariance / (N - 1), SVD, U diag(1/sqrt(S + eps)) U^T
    X = ds.normalized_all().reshape(len(ds), -1).double()
    mu = X.mean(0, keepdim=True)
    cov = (X - mu).T @ (X - mu) / (X.shape[0] - 1)
    U, S, _ = torch.linalg.svd(cov)
    T = U @ torch.diag(1.0 / torch.sqrt(S + 0.1)) @ U.T
    T_inv = U @ torch.diag(torch.sqrt(S + 0.1)) @ U.T
    assert torch.allclose(z.transform.double(), T, atol=1e-5, rtol=0)
    assert torch.allclose(z.inverse.double(), T_inv, atol=1e-5, rtol=0)
    assert torch.allclose(z.mean.double(), mu[0], atol=1e-6, rtol=0)
    x = ds.batch(torch.arange(50))
    white = ((x.reshape(50, -1).double() - mu) @ T).reshape(x.shape)
    assert torch.allclose(z.apply(x).double(), white, atol=1e-5, rtol=0)
    assert torch.allclose(z.invert(z.apply(x)), x, atol=1e-4, rtol=0)
    # chunked fitting (the memory-mapped path) gives the same transform
    small = fit_zca(ds, chunk_bytes=64 * 8 * 100)  # 100 rows per chunk
    assert torch.allclose(small.transform, z.transform, atol=1e-5, rtol=0)


def test_refuses_too_many_features():
    class Big:
        name, channels, image_size = "big", 3, (128, 128)

        def __len__(self):
            return 10
    with pytest.raises(UserError, match=str(MAX_FEATURES)):
        fit_zca(Big())


def test_whitened_dataset_views():
    test = load_dataset("digits", split="test")
    z = fit_zca(load_dataset("digits", split="train"))
    w = whiten_like(test, z.state())
    assert isinstance(w, WhitenedDataset) and len(w) == len(test) and w.num_classes == 10
    idx = torch.arange(7)
    assert torch.equal(w.batch(idx), z.apply(test.batch(idx)))
    assert torch.allclose(w.normalized_all()[:7], w.batch(idx))
    assert torch.allclose(w.denormalize(w.batch(idx)), test.denormalize(test.batch(idx)), atol=1e-4)


def test_digits_end_to_end_and_evaluate_applies_it(tmp_path, capsys):
    out = tmp_path / "z"
    assert cli.main(["distill", "--zca", "--ipc", "2", "--iterations", "2", "--batch-real", "8", "--width", "16",
                     "--eval-runs", "1", "--eval-epochs", "1", "--no-progress", "--out", str(out)]) == 0
    run_acc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]["accuracies"]
    syn = torch.load(out / "synthetic.pt", weights_only=True)
    assert syn["config"]["zca"] is True and syn["zca"]["eigvecs"].shape == (64, 64)
    assert (out / "grid.png").exists()
    # evaluate whitens the test images from the file alone; the run evaluated with seed 0 * 7919 + 2
    js = tmp_path / "e.json"
    assert cli.main(["evaluate", "--synthetic", str(out / "synthetic.pt"), "--runs", "1", "--epochs", "1",
                     "--seed", "2", "--json", str(js)]) == 0
    assert "ZCA: test images whitened" in capsys.readouterr().out
    assert json.loads(js.read_text())["accuracies"] == run_acc
    # the folder export undoes the whitening; reading it back whitens again
    assert cli.main(["export", str(out), "--format", "folder", "--out", str(tmp_path / "f")]) == 0
    assert (tmp_path / "f" / "zca.pt").exists()


@pytest.mark.slow
def test_mnist_end_to_end(tmp_path, datasets_root, capsys):
    out = tmp_path / "m"
    assert cli.main(["distill", "--dataset", "mnist", "--data-root", str(datasets_root), "--zca", "--ipc", "1",
                     "--iterations", "1", "--batch-real", "4", "--width", "8", "--eval-runs", "1", "--eval-epochs",
                     "0", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= summary["eval"]["mean"] <= 100
    syn = torch.load(out / "synthetic.pt", weights_only=True)
    assert syn["zca"]["eigvecs"].shape == (784, 784) and syn["images"].shape == (10, 1, 28, 28)
