"""End-to-end: distill, kill and resume, evaluate, official formats, bad input (tiny budgets)."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from datadam_fast import cli
from conftest import synthetic_images

TINY = ["--ipc", "2", "--iterations", "6", "--batch-real", "8", "--width", "16", "--eval-runs", "1",
        "--eval-epochs", "2", "--no-progress", "--log-every", "1"]


def run_cli(args, capsys=None):
    code = cli.main(args)
    out = capsys.readouterr() if capsys else None
    return code, out


def test_help_explains_every_flag(capsys):
    parser = cli.build_parser()
    for sub in parser._subparsers._group_actions[0].choices:
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        # a default decided at run time is explained in the flag's help, never printed as "None"
        assert "(default: None)" not in text and "(default: False)" not in text, sub
        subp = parser._subparsers._group_actions[0].choices[sub]
        for action in subp._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{sub} {action.option_strings} has no help"
                assert action.option_strings[-1] in text


def test_distill_digits_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    code, cap = run_cli(["distill", "--out", str(out), "--checkpoint-every", "2"] + TINY, capsys)
    assert code == 0, cap.err
    syn = torch.load(out / "synthetic.pt", weights_only=True)
    assert set(syn) >= {"images", "labels", "mean", "std", "dataset", "config"}
    assert syn["images"].shape == (20, 1, 8, 8) and syn["labels"].tolist() == [k for k in range(10) for _ in range(2)]
    assert syn["dataset"] == "digits" and syn["config"]["preset"] == "paper"
    png = (out / "grid.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image
    im = Image.open(out / "grid.png")
    assert im.size[1] > im.size[0]  # 10 rows (classes) x 2 columns
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "loss" in l]
    assert [l["iteration"] for l in steps] == [1, 2, 3, 4, 5, 6]
    assert all(l["loss"] > 0 and l["it_per_s"] > 0 and "loss_attention" in l for l in steps)
    evals = [l for l in lines if "eval" in l]
    assert len(evals) == 1 and evals[0]["iteration"] == 6 and 0 <= evals[0]["eval"]["mean"] <= 100
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["iteration"] == 6


def test_same_seed_same_result_and_different_seed_differs(tmp_path):
    from datadam_fast.distill import DistillConfig, Distiller
    cfg = DistillConfig(ipc=2, iterations=3, batch_real=8, width=16, eval_every=-1, seed=5)
    a = Distiller(cfg, str(tmp_path / "a"), progress=False)
    a.run()
    b = Distiller(cfg, str(tmp_path / "b"), progress=False)
    b.run()
    assert torch.equal(synthetic_images(tmp_path / "a"), synthetic_images(tmp_path / "b"))
    cfg.seed = 6
    Distiller(cfg, str(tmp_path / "c"), progress=False).run()
    assert not torch.equal(synthetic_images(tmp_path / "a"), synthetic_images(tmp_path / "c"))


def test_resume_equals_uninterrupted(tmp_path):
    from datadam_fast.distill import DistillConfig, Distiller
    cfg = DistillConfig(ipc=2, iterations=7, batch_real=8, width=16, eval_every=-1, checkpoint_every=3, log_every=1)
    Distiller(cfg, str(tmp_path / "full"), progress=False).run()
    d = Distiller(cfg, str(tmp_path / "cut"), progress=False)
    d.run(stop_after=4)  # "killed" after iteration 4; last checkpoint at 3
    assert not (tmp_path / "cut" / "synthetic.pt").exists()
    r = Distiller(cfg, str(tmp_path / "cut"), resume=True, progress=False)
    assert r.iteration == 3
    r.run()
    assert torch.equal(synthetic_images(tmp_path / "full"), synthetic_images(tmp_path / "cut"))
    its = [json.loads(l)["iteration"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(l)]
    assert its == list(range(1, 8))  # nothing duplicated or lost in the log


@pytest.mark.slow
def test_kill_and_resume_subprocess(tmp_path, capsys):
    flags = ["--ipc", "2", "--iterations", "40", "--batch-real", "32", "--width", "64", "--eval-every", "-1",
             "--checkpoint-every", "2", "--no-progress"]
    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "datadam_fast", "distill", "--out", str(out)] + flags,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ck = out / "checkpoint.pt"
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)  # no chance to clean up
    p.wait()
    assert ck.exists(), p.stderr.read().decode()
    assert not (out / "synthetic.pt").exists(), "run finished before it could be killed"
    it_killed = torch.load(ck, weights_only=True)["iteration"]
    assert 0 < it_killed < 40
    # a resume with different settings is refused and leaves the checkpoint alone
    assert run_cli(["distill", "--out", str(out), "--resume", "--seed", "1"] + flags, capsys)[0] == 2
    assert torch.load(ck, weights_only=True)["iteration"] == it_killed
    assert run_cli(["distill", "--out", str(out), "--resume"] + flags, capsys)[0] == 0
    assert run_cli(["distill", "--out", str(tmp_path / "full")] + flags, capsys)[0] == 0
    assert torch.equal(synthetic_images(out), synthetic_images(tmp_path / "full"))


def test_evaluate_cli_and_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(["distill", "--out", str(out), "--ipc", "1", "--iterations", "0", "--eval-every", "-1",
                    "--width", "16", "--no-progress"], capsys)[0] == 0
    js = tmp_path / "eval.json"
    code, cap = run_cli(["evaluate", "--synthetic", str(out / "synthetic.pt"), "--runs", "2", "--epochs", "2",
                         "--json", str(js)], capsys)
    assert code == 0, cap.err
    res = json.loads(js.read_text())
    assert len(res["accuracies"]) == 2 and abs(res["mean"] - sum(res["accuracies"]) / 2) < 1e-9
    assert res["std"] >= 0


def test_iterations_zero_is_random_real_subset(tmp_path):
    from datadam_fast.data import load_dataset
    from datadam_fast.distill import DistillConfig, Distiller
    d = Distiller(DistillConfig(ipc=3, iterations=0, eval_every=-1), str(tmp_path / "z"), progress=False)
    d.run()
    imgs = synthetic_images(tmp_path / "z")
    real = load_dataset("digits", split="train").normalized_all("cpu")
    for k in range(10):
        for x in imgs[3 * k:3 * k + 3]:
            assert ((real - x).abs().flatten(1).amax(1) < 1e-6).any()


def test_official_formats(tmp_path, capsys):
    from datadam_fast.models.networks import get_network
    out = tmp_path / "run"
    assert run_cli(["distill", "--out", str(out), "--ipc", "1", "--iterations", "0", "--eval-every", "-1",
                    "--width", "16", "--no-progress"], capsys)[0] == 0
    syn = torch.load(out / "synthetic.pt", weights_only=True)
    official = tmp_path / "syn_data_digits_ipc_1.pt"
    torch.save({"data": [syn["images"], syn["labels"].float()]}, official)  # official labels are float
    code, cap = run_cli(["evaluate", "--synthetic", str(official), "--dataset", "digits", "--runs", "1",
                         "--epochs", "1"], capsys)
    assert code == 0, cap.err
    net = get_network("ConvNetBN", 1, 10, (8, 8))
    frozen = tmp_path / "model_params_digits_ipc_1.pt"
    torch.save({"net_parameters": {"module." + k: v for k, v in net.state_dict().items()}}, frozen)
    code, cap = run_cli(["evaluate", "--synthetic", str(official), "--dataset", "digits", "--frozen-model",
                         str(frozen)], capsys)
    assert code == 0, cap.err
    assert "Trained Model Best" in cap.out


def test_mnist_from_shared_datasets(tmp_path, datasets_root, capsys):
    out = tmp_path / "mnist"
    code, cap = run_cli(["distill", "--dataset", "mnist", "--data-root", str(datasets_root), "--out", str(out),
                         "--ipc", "1", "--iterations", "2", "--batch-real", "4", "--width", "8", "--eval-every", "-1",
                         "--no-progress"], capsys)
    assert code == 0, cap.err
    syn = torch.load(out / "synthetic.pt", weights_only=True)
    assert syn["images"].shape == (10, 1, 28, 28) and syn["dataset"] == "mnist"


@pytest.mark.parametrize("args,match", [
    (["distill", "--dataset", "nope"], "nope"),
    (["distill", "--ipc", "100000"], "larger than the smallest class"),
    (["distill", "--model", "NoSuchNet"], "NoSuchNet"),
    (["distill", "--preset", "official", "--real-chunk", "2"], "BatchNorm"),
    (["distill", "--dataset", "mnist", "--data-root", "/nonexistent"], "/nonexistent"),
])
def test_bad_input_exit_2_one_line(tmp_path, capsys, args, match):
    code, cap = run_cli(args + ["--out", str(tmp_path / "o"), "--no-progress", "--iterations", "1"], capsys)
    assert code == 2
    # the first log line names the device (devices.py); the error itself is one line
    err = "\n".join(l for l in cap.err.strip().splitlines() if not l.startswith("device: "))
    assert len(err.splitlines()) == 1 and match in err and err.startswith("datadam-fast")


def test_never_overwrites_and_rejects_bad_checkpoints(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    code, cap = run_cli(["distill", "--out", str(out), "--no-progress", "--iterations", "1"], capsys)
    assert code == 2 and "overwrite" in cap.err and (out / "precious.txt").read_text() == "keep"
    code, cap = run_cli(["distill", "--out", str(out), "--no-progress", "--iterations", "1", "--resume"], capsys)
    assert code == 2 and "no checkpoint" in cap.err
    (out / "checkpoint.pt").write_bytes(b"garbage")
    code, cap = run_cli(["distill", "--out", str(out), "--no-progress", "--iterations", "1", "--resume"], capsys)
    assert code == 2 and "unreadable" in cap.err
    good = tmp_path / "g"
    assert run_cli(["distill", "--out", str(good), "--no-progress", "--iterations", "2", "--width", "16",
                    "--ipc", "1", "--eval-every", "-1"], capsys)[0] == 0
    before = (good / "synthetic.pt").read_bytes()
    code, cap = run_cli(["distill", "--out", str(good), "--no-progress", "--iterations", "2", "--width", "16",
                         "--ipc", "2", "--eval-every", "-1", "--resume"], capsys)
    assert code == 2 and "different settings" in cap.err and "ipc" in cap.err
    assert (good / "synthetic.pt").read_bytes() == before
    # --overwrite with an invalid setting fails before anything in the directory is touched
    code, cap = run_cli(["distill", "--out", str(good), "--no-progress", "--iterations", "2", "--ipc", "100000",
                         "--overwrite"], capsys)
    assert code == 2 and (good / "checkpoint.pt").exists() and (good / "synthetic.pt").read_bytes() == before


def test_evaluate_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save({"foo": 1}, bad)
    code, cap = run_cli(["evaluate", "--synthetic", str(bad), "--dataset", "digits"], capsys)
    assert code == 2 and "expected a dict" in cap.err
    rgb = tmp_path / "rgb.pt"
    torch.save({"images": torch.zeros(10, 3, 8, 8), "labels": torch.arange(10), "dataset": "digits"}, rgb)
    code, cap = run_cli(["evaluate", "--synthetic", str(rgb), "--epochs", "1", "--runs", "1"], capsys)
    assert code == 2 and "channels" in cap.err
    code, cap = run_cli(["evaluate", "--synthetic", str(tmp_path / "missing.pt"), "--dataset", "digits"], capsys)
    assert code == 2 and "not found" in cap.err


def test_distill_flags_default_to_the_config_dataclass():
    """No flag repeats a DistillConfig default: parsing no flags gives DistillConfig() exactly."""
    import dataclasses
    from datadam_fast.cli.args import build_parser, distill_config
    from datadam_fast.distill import DistillConfig
    got = distill_config(build_parser().parse_args(["distill"]), {})
    assert dataclasses.asdict(got) == dataclasses.asdict(DistillConfig())
    got = distill_config(build_parser().parse_args(["distill", "--no-dsa", "--no-prefetch", "--ipc", "3"]), {})
    assert got.dsa is False and got.prefetch is False and got.ipc == 3 and got.channels_last is True
