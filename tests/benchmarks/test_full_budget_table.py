"""benchmarks/full_budget_table.py at a tiny budget on digits: cells, skip, resume, the field variants;
the generated docs sections and verdicts."""
import json
import subprocess
import sys
from pathlib import Path

import torch

import pytest  # noqa: E402
pytestmark = pytest.mark.slow  # benchmark script subprocesses

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "full_budget_table.py"


def _run(tmp_path, *extra):
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--datasets", "digits", "--ipcs", "1", "--iterations", "2",
           "--eval-epochs", "2", "--runs", "1", "--width", "8", "--checkpoint-every", "1",
           "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_full_budget_driver_tiny(tmp_path):
    # a preset cell and a random-real cell on each network (the -f2pool test below runs a --method cell)
    _run(tmp_path, "--methods", "datadam-paper", "random", "random-official")
    res = tmp_path / "results"
    for m, norm in (("datadam-paper", "instancenorm"), ("random", "instancenorm"), ("random-official", "batchnorm")):
        cell = json.loads((res / f"digits_ipc1_{m}.json").read_text())
        assert cell["method"] == m and 0 <= cell["mean"] <= 100 and len(cell["accuracies"]) == 1
        assert cell["network"]["norm"] == norm and cell["network"]["width"] == 8 and cell["eval_epochs"] == 2
        assert cell["iterations"] == (0 if m.startswith("random") else 2)
    # both random baselines are the same real images (the subset every run starts from), on two networks
    sets = [torch.load(tmp_path / "runs" / f"digits_ipc1_{m}" / "synthetic.pt", weights_only=True)["images"]
            for m in ("random", "random-official")]
    assert torch.equal(*sets)
    table = (res / "table.md").read_text()
    assert "| digits | 1 |" in table and "±" in table

    # rerun: finished cells are not recomputed
    before = {p.name: p.read_text() for p in res.glob("*.json")}
    out = _run(tmp_path, "--methods", "datadam-paper", "random-official", "random")
    assert out.count("done already") == 3 and "distill" not in out.replace("done already", "")
    assert {p.name: p.read_text() for p in res.glob("*.json")} == before

    # an unfinished cell (result and final outputs lost, checkpoint kept) is resumed, not restarted
    run = tmp_path / "runs" / "digits_ipc1_datadam-paper"
    images = torch.load(run / "synthetic.pt", weights_only=True)["images"]
    for f in ("synthetic.pt", "summary.json"):
        (run / f).unlink()
    (res / "digits_ipc1_datadam-paper.json").unlink()
    out = _run(tmp_path, "--methods", "datadam-paper")
    assert "resuming from its checkpoint" in out
    cell = json.loads((res / "digits_ipc1_datadam-paper.json").read_text())
    assert cell["resumed"] is True
    assert torch.equal(torch.load(run / "synthetic.pt", weights_only=True)["images"], images)
    # the table keeps every finished cell, not only this invocation's method, baseline column first
    header = (res / "table.md").read_text().splitlines()[2]
    assert header.startswith("| dataset | IPC | random | datadam-paper | random-official |"), header


def test_full_budget_refuses_a_small_budget_without_tiny(tmp_path):
    p = subprocess.run([sys.executable, str(SCRIPT), "--iterations", "10", "--results-dir", str(tmp_path / "r"),
                        "--runs-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert p.returncode == 2 and "--tiny" in p.stderr and not (tmp_path / "r").exists()


def test_readme_full_budget_section_is_generated_from_the_committed_cells():
    """docs/results.md's full-budget and field sections and the README's accuracy table are what the
    committed cell JSONs say."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import full_budget_readme as fbr
    doc = (ROOT / "docs" / "results.md").read_text()
    sec = fbr.section()
    assert doc[doc.index(fbr.START):doc.index(fbr.END)] == sec
    assert doc[doc.index(fbr.FIELD_START):doc.index(fbr.FIELD_END)] == fbr.field_section()
    readme = (ROOT / "README.md").read_text()
    table = fbr.readme_table()
    assert readme[readme.index(fbr.TABLE_START):readme.index(fbr.TABLE_END) + len(fbr.TABLE_END)] == table
    assert "above its random baseline in 4 of 4" in fbr.verdict("datadam-paper")


def test_full_budget_driver_runs_the_field_variants(tmp_path):
    """A ``-f2pool`` cell: multi-formation and a trained pool, the pool in ``--pool-dir``."""
    _run(tmp_path, "--methods", "dm-f2pool", "--pool-dir", str(tmp_path / "pools"))
    cell = json.loads((tmp_path / "results" / "digits_ipc1_dm-f2pool.json").read_text())
    assert "--factor 2" in cell["distill_command"] and "--networks pool:5:0.5" in cell["distill_command"]
    st = torch.load(tmp_path / "runs" / "digits_ipc1_dm-f2pool" / "synthetic.pt", weights_only=True)
    assert st["factor"] == 2 and st["config"]["networks"] == "pool:5:0.5"
    assert len(list((tmp_path / "pools").glob("*/net_*.pt"))) == 5
    assert "dm-f2pool" in (tmp_path / "results" / "table.md").read_text()


def test_field_verdicts_are_computed_against_the_best_published_number():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import full_budget_readme as fbr
    assert fbr.best_published("fashion_mnist", 1) == ("IDC", 81.0)
    assert fbr.best_published("mnist", 10) == ("DSA", 97.8)
    assert fbr.judge({"mean": 82.0, "std": 0.5}, "fashion_mnist", 1).startswith("above IDC (+1.00)")
    assert fbr.judge({"mean": 80.8, "std": 0.5}, "fashion_mnist", 1).startswith("within one std of IDC")
    assert fbr.judge({"mean": 79.0, "std": 0.5}, "fashion_mnist", 1).startswith("below IDC (-2.00)")


def test_ingredient_effects_pair_cells_that_differ_by_one_ingredient(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import full_budget_readme as fbr
    cells = {("mnist", 1, "dm"): {"mean": 87.0, "std": 0.3}, ("mnist", 1, "dm-f2"): {"mean": 94.0, "std": 0.2},
             ("mnist", 1, "dm-pool"): {"mean": 86.9, "std": 0.4}, ("mnist", 1, "dm-f2pool"): {"mean": 95.0, "std": 0.1},
             ("fashion_mnist", 1, "ncfm"): {"mean": 70.0, "std": 0.5},
             ("fashion_mnist", 1, "ncfm-pool"): {"mean": 69.0, "std": 0.2},
             # an IPC 10 cell of the chosen variant alone pairs with nothing: no line claims it
             ("mnist", 10, "dm-f2pool"): {"mean": 97.0, "std": 0.1}}
    monkeypatch.setattr(fbr, "cell", lambda d, k, m: cells.get((d, k, m)))
    lines = fbr.ingredient_effects().splitlines()
    assert lines == [
        "- factor 2 over plain: +7.00 MNIST IPC 1 `dm` (higher by more than one std in 1 of 1, lower in 0).",
        "- the pool over plain: -0.10 MNIST IPC 1 `dm`, -1.00 Fashion-MNIST IPC 1 `ncfm` "
        "(higher by more than one std in 0 of 2, lower in 1).",
        "- the pool on top of factor 2: +1.00 MNIST IPC 1 `dm` (higher by more than one std in 1 of 1, lower in 0).",
    ]
    monkeypatch.setattr(fbr, "cell", lambda d, k, m: None)
    assert fbr.ingredient_effects() == "- No pair of cells finished yet."


def test_ipc10_runs_the_variant_that_was_best_at_ipc1(monkeypatch):
    """All three variants at IPC 1; above it, the one that was best there: undecided until the three
    are finished, then that one cell is required (and named in the table)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import full_budget_readme as fbr
    cells = {("mnist", 1, "dm-f2"): {"mean": 90.0, "std": 0.1}, ("mnist", 1, "dm-pool"): {"mean": 88.0, "std": 0.1}}
    monkeypatch.setattr(fbr, "cell", lambda d, k, m: cells.get((d, k, m)))
    assert fbr.chosen_variant("mnist", "dm") is None and fbr.required_variants("mnist", 10, "dm") is None
    assert ("mnist", 10, "dm-best") in fbr.missing_cells()
    assert "not decided yet" in fbr.fmt_best(None, "mnist", 10, "dm")
    cells[("mnist", 1, "dm-f2pool")] = {"mean": 91.0, "std": 0.2}
    assert fbr.chosen_variant("mnist", "dm") == "f2pool"
    assert fbr.required_variants("mnist", 10, "dm") == ["f2pool"]
    assert fbr.required_variants("mnist", 1, "dm") == list(fbr.VARIANTS)
    missing = fbr.missing_cells()
    assert ("mnist", 10, "dm-f2pool") in missing and ("mnist", 10, "dm-f2") not in missing
    assert not any(m.startswith("dm-") for d, k, m in missing if (d, k) == ("mnist", 1))
    assert "--datasets mnist --ipcs 10 --methods datadam-paper dm dm-f2pool ncfm\n" in fbr.fill_commands(missing) + "\n"
    assert "dm-f2pool" in fbr.fill_commands(missing)
    assert "factor 2 + pool, the best at IPC 1" in fbr.fmt_best(None, "mnist", 10, "dm")
    cells[("mnist", 10, "dm-f2pool")] = {"mean": 97.0, "std": 0.1}
    assert ("mnist", 10, "dm-f2pool") not in fbr.missing_cells()
    best = fbr.best_variant("mnist", 10, "dm")
    assert fbr.fmt_best(best, "mnist", 10, "dm") == "97.00 ± 0.10 (factor 2 + pool, the best at IPC 1)"


def test_best_method_names_all_variants_at_ipc1_and_the_chosen_one_above(tmp_path, capsys):
    """``<method>-best``: the three variants at IPC 1; above it nothing (with a message) until they
    are all finished, then the one with the best mean; the driver accepts the name."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import full_budget_table as fbt
    res = tmp_path / "results"
    res.mkdir()
    assert fbt.expand_method(str(res), "digits", 1, "dm-best") == ["dm-f2", "dm-pool", "dm-f2pool"]
    assert fbt.expand_method(str(res), "digits", 1, "dm") == ["dm"]
    for v, mean in (("f2", 80.0), ("pool", 82.5)):
        (res / f"digits_ipc1_dm-{v}.json").write_text(json.dumps({"mean": mean, "std": 1.0}))
    assert fbt.expand_method(str(res), "digits", 10, "dm-best") == []
    assert "not all finished" in capsys.readouterr().out
    (res / "digits_ipc1_dm-f2pool.json").write_text(json.dumps({"mean": 81.0, "std": 1.0}))
    assert fbt.expand_method(str(res), "digits", 10, "dm-best") == ["dm-pool"]
    assert fbt.expand_method(str(res), "mnist", 10, "dm-best") == []  # another dataset chooses for itself
    # the driver: an undecided -best cell is skipped without running anything
    out = _run(tmp_path / "drv", "--ipcs", "10", "--methods", "ncfm-best")
    assert "skipped: ncfm-best at IPC 10" in out and "finished 0 cell(s)" in out
