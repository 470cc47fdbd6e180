"""distill --config FILE.toml, the resolved config.toml of every run, and --plan-only."""
import json
import tomllib

import pytest
import torch

from datadam_fast import cli
from datadam_fast.cli.config_file import apply_config_file
from datadam_fast.distill.config import toml_value

TINY = ["--ipc", "2", "--iterations", "3", "--batch-real", "8", "--width", "16", "--eval-every", "-1",
        "--no-progress"]


def test_toml_writer_round_trips():
    vals = {"a": True, "b": 3, "c": 0.01, "d": 4.0, "e": 'say "hi"\\ \u00e9', "f": [1, 2.5, "x"], "g": 1e-12}
    text = "\n".join(f"{k} = {toml_value(v)}" for k, v in vals.items())
    assert tomllib.loads(text) == vals


def test_file_values_and_command_line_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('ipc = 3\nbatch-real = 16\nno_dsa = true\ncompile = false\nlr-img = 2\n')
    parser = cli.build_parser()
    apply_config_file(parser.distill_parser, str(f))
    args = parser.parse_args(["distill", "--ipc", "5"])
    assert args.ipc == 5 and args.batch_real == 16 and args.no_dsa is True and args.compile is False
    assert args.lr_img == 2.0


@pytest.mark.parametrize("text,match", [
    ("ipcs = 3\n", "unknown key 'ipcs'"),
    ("ipc = 2.5\n", "expected an integer"),
    ("no-dsa = 1\n", "expected true or false"),
    ("preset = 'mine'\n", "expected one of"),
    ("ipc = [1, 2]\n", "expected a single value"),
    ("ipc = \n", "not valid TOML"),
])
def test_bad_config_files(tmp_path, capsys, text, match):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    assert cli.main(["distill", "--config", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert match in err and not (tmp_path / "o").exists()


def test_run_writes_config_and_it_reproduces_the_run(tmp_path, capsys):
    f = tmp_path / "mine.toml"
    f.write_text('seed = 4\npower = 2\n')
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    assert cli.main(["distill", "--config", str(f), "--out", str(r1)] + TINY) == 0
    conf = tomllib.loads((r1 / "config.toml").read_text())
    # resolved: preset defaults filled in, file and flags merged
    assert conf["seed"] == 4 and conf["power"] == 2.0 and conf["ipc"] == 2 and conf["norm"] == "instancenorm"
    assert conf["depth"] == 3 and conf["iterations"] == 3 and conf["device"] == "auto" and "out" not in conf
    assert cli.main(["distill", "--config", str(r1 / "config.toml"), "--out", str(r2)]) == 0
    a = torch.load(r1 / "synthetic.pt", weights_only=True)
    b = torch.load(r2 / "synthetic.pt", weights_only=True)
    assert torch.equal(a["images"], b["images"]) and a["config"] == b["config"]
    assert (r2 / "config.toml").read_text() == (r1 / "config.toml").read_text()


def test_plan_only_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["distill", "--plan-only", "--out", str(out), "--ipc", "2", "--width", "16"]) == 0
    cap = capsys.readouterr()
    assert not out.exists()
    plan = json.loads(cap.out.strip().splitlines()[-1])["plan"]
    assert plan["classes_per_process"] == 10 and plan["num_classes"] == 10 and plan["iterations"] == 100
    assert plan["memory"]["predicted_peak"] > 0 and plan["memory"]["real_chunks"] >= 1
    assert plan["predicted"]["sec_per_it"] > 0
    assert plan["predicted_hours"] == pytest.approx(plan["predicted"]["sec_per_it"] * 100 / 3600)
    assert "predicted peak" in cap.err and "s/iteration" in cap.err and "hours" in cap.err


def test_the_config_is_the_flag_schema():
    """Every DistillConfig field that is a flag exists on the distill parser with the field's default;
    what the parser has beyond them is the CLI's own (where and how to run)."""
    import dataclasses
    from datadam_fast.cli import build_parser
    from datadam_fast.distill.config import DistillConfig, flag_fields
    parser = build_parser().distill_parser
    actions = {a.dest: a for a in parser._actions}
    base = DistillConfig()
    for flag, (name, negated) in flag_fields().items():
        action = actions[flag.replace("-", "_")]
        assert action.default == ((not getattr(base, name)) if negated else getattr(base, name)), flag
    api_only = {f.name for f in dataclasses.fields(DistillConfig)} - {n for n, _ in flag_fields().values()}
    assert api_only == {"taps", "attention_factor", "momentum", "dsa_strategy", "eval_batch", "data_opts"}
    cli_only = set(actions) - {f.replace("-", "_") for f in flag_fields()}
    assert cli_only == {"help", "folder", "cache_dir", "download", "threads", "out", "resume", "overwrite", "nvtx", "no_progress",
                        "config", "plan_only"}
