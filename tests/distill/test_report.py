"""`datadam-fast report`: plots and summary of a run's metrics.jsonl."""
import json

import pytest

from datadam_fast import cli


def _check_png(path, min_w=400, min_h=250):
    from PIL import Image
    import numpy as np
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    im = Image.open(path)
    im.load()
    w, h = im.size
    assert w >= min_w and h >= min_h and w <= 4000 and h <= 4000, (path, im.size)
    a = np.asarray(im.convert("L"), dtype=float)
    # not blank: a real plot has many non-white pixels and several grey levels (text, lines, grid)
    assert (a < 250).mean() > 0.01 and len(np.unique(a)) > 20, path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    code = cli.main(["distill", "--out", str(out), "--iterations", "4", "--eval-every", "2", "--eval-runs", "1",
                     "--eval-epochs", "2", "--no-progress", "--log-every", "1"])
    assert code == 0
    return out


def test_report_after_tiny_distillation(tiny_run, capsys, tmp_path):
    js = tmp_path / "summary.json"
    assert cli.main(["report", str(tiny_run), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    for name in ("report_loss.png", "report_accuracy.png", "report_speed.png"):
        _check_png(tiny_run / name)
        assert f"wrote {tiny_run / name}" in out
    assert (tiny_run / "grid.png").exists()  # next to it
    s = json.loads(js.read_text())
    lines = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    evals = [l for l in lines if "eval" in l]
    steps = [l for l in lines if "loss" in l]
    assert s["iterations"] == 4 and "iterations: 4 of 4" in out
    assert s["final_loss"]["loss"] == pytest.approx(steps[-1]["loss"])
    assert s["final_accuracy"]["iteration"] == evals[-1]["iteration"] == 4
    assert s["best_accuracy"]["mean"] == pytest.approx(max(e["eval"]["mean"] for e in evals))
    assert s["speed"]["it_per_s"] == pytest.approx(steps[-1]["it_per_s"])
    assert "final loss" in out and "accuracy: final" in out and "it/s" in out


def test_report_tolerates_new_keys_events_and_a_cut_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    extra = []
    for l in lines:
        rec = json.loads(l)
        if "loss" in rec:
            rec.update(peak_memory_mb=100.0 + rec["iteration"], sec_per_it=0.5, images_per_s=1234.0, new_thing=[1])
        extra.append(json.dumps(rec))
    extra.insert(1, json.dumps({"iteration": 0, "event": "plan", "plan": {"anything": True}}))
    (run / "metrics.jsonl").write_text("\n".join(extra) + '\n{"iteration": 5, "lo')  # killed mid-line
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "peak memory 104 MB" in out and "images/s" in out and "skipped 1 unreadable line" in out
    _check_png(run / "report_speed.png", min_h=500)  # three panels: it/s, images/s, memory


def test_report_without_evaluations(tmp_path, capsys):
    run = tmp_path / "noeval"
    assert cli.main(["distill", "--out", str(run), "--iterations", "2", "--eval-every", "-1", "--no-progress",
                     "--log-every", "1", "--width", "8", "--ipc", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "no evaluation" in out and not (run / "report_accuracy.png").exists()
    _check_png(run / "report_loss.png")


@pytest.mark.parametrize("content,match", [(None, "no metrics.jsonl"), ("", "no step or evaluation records"),
                                           ("not json\n", "no step or evaluation records")])
def test_report_bad_input_one_line(tmp_path, capsys, content, match):
    run = tmp_path / "r"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    code = cli.main(["report", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err
    code = cli.main(["report", str(tmp_path / "missing")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "does not exist" in err
