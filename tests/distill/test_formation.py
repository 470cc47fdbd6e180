"""Multi-formation (``--factor F``): the decode/encode pair, the engine (digits and MNIST end to
end; chunked == one pass, 2 gloo processes == 1, kill + ``--resume`` == uninterrupted), and every
reader of a set (evaluate, the three exports, the grid, report) seeing ``F^2 x IPC`` full-size
images per class."""
import json


import pytest
import torch

from datadam_fast.data.formation import check_factor, decode, decode_labels, encode, recorded_factor
from datadam_fast.distill import DistillConfig, Distiller
from datadam_fast.errors import UserError
from datadam_fast.evaluation.formats import load_synthetic
from conftest import cli, synthetic_images, torchrun


# ------------------------------------------------------------------------------------------ the pair
def test_decode_puts_cell_a_b_of_image_j_at_row_j_f2_plus_a_f_plus_b():
    F_, n, C, H, W = 3, 2, 2, 9, 12
    stored = torch.zeros(n, C, H, W)
    h, w = H // F_, W // F_
    for j in range(n):
        for a in range(F_):
            for b in range(F_):
                stored[j, :, a * h:(a + 1) * h, b * w:(b + 1) * w] = 100 * j + 10 * a + b + torch.arange(C).view(C, 1, 1)
    out = decode(stored, F_)
    assert out.shape == (n * F_ * F_, C, H, W)
    for j in range(n):
        for a in range(F_):
            for b in range(F_):
                want = 100 * j + 10 * a + b + torch.arange(C).view(C, 1, 1).float()
                torch.testing.assert_close(out[j * F_ * F_ + a * F_ + b], want.expand(C, H, W))  # constant cell
    assert torch.equal(decode_labels(torch.tensor([4, 7]), F_), torch.tensor([4] * 9 + [7] * 9))


def test_decode_is_bilinear_upsampling_and_differentiable():
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    cells = decode(x, 2)
    ref = torch.nn.functional.interpolate(x[:, :, :4, 4:], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(cells[1::4], ref)  # cell (0, 1) of both images
    assert torch.autograd.gradcheck(lambda t: decode(t, 2), (x,))
    assert decode(x, 1) is x


def test_encode_averages_blocks_into_cells_and_inverts_decode_on_blockysynthetic_images():
    real = torch.randn(8, 3, 8, 8)
    enc = encode(real, 2)
    assert enc.shape == (2, 3, 8, 8)
    # cell (1, 0) of stored image 1 is real image 1*4 + 1*2 + 0 = 6, averaged over 2x2 blocks
    want = torch.nn.functional.avg_pool2d(real[6:7], 2)[0]
    torch.testing.assert_close(enc[1, :, 4:, :4], want)
    blocky = torch.randn(4, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3)  # 2x2-constant 8x8 images
    torch.testing.assert_close(encode(blocky, 2)[0], torch.cat([torch.cat([blocky[0, :, ::2, ::2], blocky[1, :, ::2, ::2]], 2),
                                                               torch.cat([blocky[2, :, ::2, ::2], blocky[3, :, ::2, ::2]], 2)], 1))
    with pytest.raises(UserError, match="whole stored images"):
        encode(torch.randn(3, 1, 8, 8), 2)


def test_factor_checks_say_which_factors_fit():
    assert check_factor(2, (28, 28)) == 2 and check_factor(1, (7, 7)) == 1
    with pytest.raises(UserError, match=r"factors that fit: 1, 2, 4, 7"):
        check_factor(3, (28, 28))
    for bad in (0, -1, 2.0, True, "2", 9):
        with pytest.raises(UserError, match="--factor"):
            check_factor(bad, (32, 32))
    with pytest.raises(UserError, match="--factor 3: 8x8 images"):
        Distiller(DistillConfig(dataset="digits", factor=3, iterations=1), None, progress=False)
    assert recorded_factor({"factor": 2}) == 2 and recorded_factor({"factor": 2, "decoded": True}) == 1
    assert recorded_factor({}) == 1


def test_factor_with_real_init_needs_enough_real_images_per_class():
    with pytest.raises(UserError, match=r"ipc 50 x factor 2\^2 = 200 real images per class"):
        Distiller(DistillConfig(dataset="digits", ipc=50, factor=2, iterations=1), None, progress=False)


# ------------------------------------------------------------------------------------------ digits, end to end
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("factor") / "run"
    r = cli("distill", "--dataset", "digits", "--ipc", "2", "--factor", "2", "--iterations", "4", "--eval-runs", "1",
             "--eval-epochs", "1", "--no-progress", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_digits_factor_2_end_to_end_trains_on_four_images_per_stored_one(digits_run):
    out = digits_run
    st = torch.load(out / "synthetic.pt", weights_only=True)
    assert st["factor"] == 2 and st["images"].shape == (20, 1, 8, 8) and st["config"]["factor"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["num_images"] == 80  # 10 classes x 2 stored x 4 decoded
    from PIL import Image
    grid = Image.open(out / "grid.png")
    cell = 32 + 2  # 8 px enlarged to 32, plus the padding
    assert grid.size == (8 * cell + 2, 10 * cell + 2)  # one row per class of its 8 decoded images
    assert "factor = 2" in (out / "config.toml").read_text()


def test_digits_factor_2_evaluate_and_every_export_hold_the_decoded_set(digits_run, tmp_path):
    out = digits_run
    images, labels, meta = load_synthetic(str(out / "synthetic.pt"))
    assert images.shape == (80, 1, 8, 8) and meta["decoded"] and meta["stored_images"] == 20
    assert torch.equal(torch.bincount(labels), torch.full((10,), 8))
    st = torch.load(out / "synthetic.pt", weights_only=True)
    torch.testing.assert_close(images, decode(st["images"], 2))
    ev = tmp_path / "eval.json"
    r = cli("evaluate", "--synthetic", str(out / "synthetic.pt"), "--runs", "1", "--epochs", "1", "--json", str(ev),
             "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "20 stored images of factor 2 -> 80 full-size images" in r.stdout
    res = json.loads(ev.read_text())
    assert (res["num_images"], res["factor"], res["stored_images"]) == (80, 2, 20)
    for fmt in ("official", "tensors", "folder"):
        dest = tmp_path / fmt
        r = cli("export", str(out), "--format", fmt, "--out", str(dest))
        assert r.returncode == 0, r.stderr[-2000:]
        path = next(dest.glob("*.pt")) if fmt == "official" else dest
        back, back_labels, back_meta = load_synthetic(str(path))
        assert back.shape == (80, 1, 8, 8), fmt  # decoded once, never twice
        assert torch.equal(back_labels, labels) and back_meta.get("factor") == 2, fmt
        if fmt == "folder":
            classes = json.loads((dest / "meta.json").read_text())["classes"]
            assert [len(list((dest / c).glob("*.png"))) for c in classes] == [8] * 10
        else:
            torch.testing.assert_close(back, images)
    off = torch.load(next((tmp_path / "official").glob("*.pt")), weights_only=True)
    assert off["data"][0][0].shape == (80, 1, 8, 8) and off["factor"] == 2 and off["decoded"] is True
    r = cli("report", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "factor 2: 8 decoded images per class" in r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ MNIST, exactness
MNIST = dict(dataset="mnist", ipc=2, batch_real=8, width=16, factor=2, eval_every=-1, log_every=1,
             checkpoint_every=2, compile=False)


def _mnist(root, **kw):
    return DistillConfig(data_root=str(root), **{**MNIST, **kw})


@pytest.fixture(scope="module")
def mnist_one_pass(tmp_path_factory, datasets_root):
    out = tmp_path_factory.mktemp("factor_mnist") / "one"
    with Distiller(_mnist(datasets_root, iterations=4), str(out), progress=False) as d:
        d.run()
    assert d.plan.real_chunks == 1 and d.plan.syn_chunks == 1
    return out, d


def test_mnist_factor_2_initial_cells_are_downsampled_real_images_of_the_class(datasets_root):
    d = Distiller(_mnist(datasets_root, iterations=0), None, progress=False)
    gen = torch.Generator().manual_seed(0)
    want = []
    for ix in d.class_idx:  # the same draws as the engine: one randperm per class, ipc * 4 images
        pick = ix[torch.randperm(len(ix), generator=gen)[:8]]
        want.append(encode(d.train_set.normalized_all("cpu")[pick], 2))
    torch.testing.assert_close(d.syn.detach().contiguous(), torch.cat(want))
    d.close()


def test_mnist_factor_2_chunked_equals_one_pass(mnist_one_pass, datasets_root, tmp_path):
    out, _ = mnist_one_pass
    with Distiller(_mnist(datasets_root, iterations=4, real_chunk=3, syn_chunk=4), str(tmp_path / "c"), progress=False) as d:
        d.run()
    assert d.plan.real_chunks == 4 and d.plan.syn_chunks == 3
    assert (synthetic_images(tmp_path / "c") - synthetic_images(out)).abs().max() < 1e-5
    with Distiller(_mnist(datasets_root, iterations=0), None, progress=False) as start:
        assert (start.syn.detach() - synthetic_images(out)).abs().max() > 1e-3  # the four iterations moved the set


def test_mnist_factor_2_killed_and_resumed_equals_uninterrupted(mnist_one_pass, datasets_root, tmp_path):
    out, _ = mnist_one_pass
    cut = tmp_path / "cut"
    with Distiller(_mnist(datasets_root, iterations=4), str(cut), progress=False) as d:
        assert d.run(stop_after=3) == {"stopped": True, "iteration": 3}  # checkpoint at 2, then "killed"
    with Distiller(_mnist(datasets_root, iterations=4), str(cut), resume=True, progress=False) as d:
        assert d.iteration == 2
        d.run()
    assert torch.equal(synthetic_images(cut), synthetic_images(out))
    with pytest.raises(UserError, match="different settings"):
        Distiller(_mnist(datasets_root, iterations=4, factor=1), str(cut), resume=True, progress=False)


def test_mnist_factor_2_two_gloo_processes_equal_one(mnist_one_pass, datasets_root, tmp_path):
    out, _ = mnist_one_pass
    two = tmp_path / "two"
    flags = ["distill", "--dataset", "mnist", "--data-root", str(datasets_root), "--ipc", "2", "--batch-real", "8",
             "--width", "16", "--factor", "2", "--iterations", "4", "--eval-every", "-1", "--log-every", "1",
             "--checkpoint-every", "2", "--no-compile", "--no-progress", "--out", str(two)]
    r = torchrun(*flags)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = next(json.loads(x)["plan"] for x in (two / "metrics.jsonl").read_text().splitlines() if "plan" in x)
    assert plan["world_size"] == 2
    assert (synthetic_images(two) - synthetic_images(out)).abs().max() < 1e-5


def test_field_presets_set_method_factor_and_networks_and_explicit_values_win():
    c = DistillConfig(dataset="mnist", preset="idm").resolved((28, 28))
    assert (c.method, c.factor, c.networks, c.norm, c.power, c.batch_real) == ("dm", 2, "pool:10:0.5", "instancenorm",
                                                                                 4.0, 256)
    c = DistillConfig(dataset="mnist", preset="ncfm").resolved((28, 28))
    assert (c.method, c.factor, c.networks, c.optimizer, c.batch_real) == ("ncfm", 2, "pool:10:1", "adamw", 1024)
    c = DistillConfig(dataset="mnist", preset="idc").resolved((28, 28))
    assert (c.method, c.factor, c.networks) == ("datadam", 2, "random")
    c = DistillConfig(dataset="mnist", preset="idm", method="datadam", factor=1, networks="random").resolved((28, 28))
    assert (c.method, c.factor, c.networks) == ("datadam", 1, "random")
    c = DistillConfig(dataset="mnist").resolved((28, 28))
    assert (c.method, c.factor, c.networks) == ("datadam", 1, "random")
    from datadam_fast.cli import build_parser
    from datadam_fast.cli.args import distill_config
    args = build_parser().parse_args(["distill", "--preset", "idm", "--networks", "pool:2:1"])
    c = distill_config(args, {}).resolved((28, 28))
    assert (c.method, c.factor, c.networks) == ("dm", 2, "pool:2:1")
