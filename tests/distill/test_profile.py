"""torch.profiler trace (distill --profile), the range names, profiling off, --device auto."""
import json
import re
from pathlib import Path

import pytest
import torch

from datadam_fast import cli, profiling
from datadam_fast.errors import UserError

TINY = ["--ipc", "2", "--batch-real", "8", "--width", "16", "--eval-every", "-1", "--no-progress"]


def test_step_phases_are_the_ranges_in_the_code():
    src = Path(profiling.__file__).parent
    names = set()
    for f in src.rglob("*.py"):
        names |= set(re.findall(r'nvtx_range\("([^"]+)"\)', f.read_text()))
    assert names == set(profiling.STEP_PHASES)


def test_ranges_cost_nothing_when_off_and_follow_the_switches():
    assert not profiling.is_enabled() and not profiling.is_recording()
    assert profiling.nvtx_range("datadam_fast.step.sample") is profiling._NULL  # no object, no formatting
    profiling.enable_record()
    try:
        assert isinstance(profiling.nvtx_range("x"), torch.profiler.record_function)
        profiling.enable()  # --nvtx and --profile together: both ranges
        assert type(profiling.nvtx_range("x")).__name__ == "_Both"
        profiling.disable()
    finally:
        profiling.disable_record()
    profiling.enable()  # --nvtx alone keeps the NVTX path
    try:
        assert type(profiling.nvtx_range("x")).__name__ == "_Range"
        with profiling.nvtx_range("x"):
            pass
    finally:
        profiling.disable()
    assert profiling.nvtx_range("x") is profiling._NULL


def test_profile_trace_table_and_report(tmp_path, capsys):
    out = tmp_path / "R"
    assert cli.main(["distill", "--iterations", "6", "--profile", "3", "--out", str(out)] + TINY) == 0
    cap = capsys.readouterr()
    err = cap.err.splitlines()
    if not torch.cuda.is_available():
        assert err[0] == "device: cpu (--device auto picked cpu because CUDA is not available)"
    trace = json.loads((out / "profile_trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert set(profiling.STEP_PHASES) <= names
    assert sum(1 for n in names if str(n).startswith("ProfilerStep#")) == 3
    assert "profile: 3 iterations" in cap.err
    for phase in ("sample", "real_forward", "syn_forward", "backward", "update"):
        assert re.search(rf"^\s+{phase}\s+1\s", cap.err, re.M), phase
    assert "top operators" in cap.err
    assert not profiling.is_recording()  # the window closed
    assert cli.main(["report", str(out)]) == 0
    assert (out / "report_profile.png").read_bytes()[:4] == b"\x89PNG"
    from datadam_fast.distill.trace import phases_from_trace
    ph = phases_from_trace(str(out / "profile_trace.json"))
    assert ph["iterations"] == 3 and all(ph["cpu"][p] > 0 for p in ph["phases"])
    # the same run without the profiler gives the same images
    plain = tmp_path / "P"
    assert cli.main(["distill", "--iterations", "6", "--out", str(plain)] + TINY) == 0
    a = torch.load(out / "synthetic.pt", weights_only=True)["images"]
    b = torch.load(plain / "synthetic.pt", weights_only=True)["images"]
    assert torch.equal(a, b)
    assert not (plain / "profile_trace.json").exists()


def test_profile_longer_than_the_run_is_refused_before_any_work(tmp_path, capsys):
    code = cli.main(["distill", "--iterations", "2", "--profile", "3", "--out", str(tmp_path / "o")] + TINY)
    assert code == 2 and "the run has only 2 iteration(s)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # validated with the config, before the run directory


def test_device_auto(monkeypatch):
    from datadam_fast.devices import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == ("cpu", "--device auto picked cpu because CUDA is not available")
    assert resolve_device("cpu")[0] == "cpu"
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(UserError, match="expected auto, cpu, cuda"):
        resolve_device("tpu7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Test GPU")
    dev, why = resolve_device("auto")
    assert dev == "cuda" and "CUDA is available (Test GPU)" in why


def test_device_defaults_to_auto(capsys):
    from datadam_fast.distill import DistillConfig
    from datadam_fast.evaluation.evaluate import EvalConfig  # noqa: F401 (evaluate's default lives in the CLI)
    assert DistillConfig().device == "auto"
    for sub in ("distill", "evaluate"):
        with pytest.raises(SystemExit):
            cli.main([sub, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert re.search(r"--device DEVICE .*?\(default: auto\)", text), sub
    assert cli.build_parser().parse_args(["evaluate", "--synthetic", "x"]).device == "auto"
