"""``datadam-fast backends --verify``: the self-check users run on their own GPU, here on the CPU
(the C++ backend and epilogue, and Triton under its interpreter when TRITON_INTERPRET=1)."""
import json

import pytest
import torch

from datadam_fast.loss import backends as B
from datadam_fast.distill import real_side
from datadam_fast.loss import verify
from datadam_fast.cli import main


def _cpu_or_skip():
    try:
        return B.get_backend("cpu")
    except B.BackendUnavailable as e:
        pytest.skip(f"the C++ backend is unavailable here: {e}")


@pytest.mark.slow
def test_verify_passes_here_and_prints_the_table(tmp_path, capsys):
    _cpu_or_skip()
    path = tmp_path / "verify.json"
    rc = main(["backends", "--verify", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "backend" in out and "max abs err" in out and "median us" in out and "FAILED" not in out
    doc = json.loads(path.read_text())
    rows = doc["rows"]
    assert doc["passed"] and all(r["passed"] for r in rows)
    names = {r["backend"] for r in rows}
    assert {"cpu", "epilogue:cpu"} <= names
    if B.get_backend("triton").supports("cpu"):
        assert {"triton", "epilogue:triton"} <= names
    cpu_cases = [r["case"] for r in rows if r["backend"] == "cpu"]
    # both problem sizes, both dtypes, both layouts, both directions
    assert len(cpu_cases) == 2 * 2 * 2 * 2 and any("datadam [2,128,32,32]+[2,128,16,16]" in c for c in cpu_cases)
    for part in ("fp32", "bf16", "nchw", "channels_last", "fwd", "bwd"):
        assert any(part in c for c in cpu_cases), part
    assert all(0 <= r["max_rel_err"] <= r["tolerance"] for r in rows)
    assert "cuda" in " ".join(doc["not_verified"])  # no GPU here: named, not silently dropped


@pytest.fixture
def small_problems(monkeypatch):
    """Only the small problem of each kind (the verdict checks below test the verdict, not the
    full matrix of the test above)."""
    _cpu_or_skip()
    loss, epilogue, stats = verify.loss_problems, verify.epilogue_problems, verify.statistics_problems
    monkeypatch.setattr(verify, "loss_problems", lambda device: loss(device)[:1])
    monkeypatch.setattr(verify, "epilogue_problems", lambda device: epilogue(device)[:1])
    monkeypatch.setattr(verify, "statistics_problems", lambda device, impl="cpu": stats(device, impl)[:1])


@pytest.fixture
def small_cpu_only(monkeypatch, small_problems):
    """Only the C++ implementations, only the small problems (the failing-kernel checks)."""
    monkeypatch.setattr(B, "BACKEND_NAMES", ("reference", "cpu"))
    monkeypatch.setattr(real_side, "IMPLS", ("cpu",))
    monkeypatch.setattr(verify, "STATS_IMPLS", ("cpu",))


def test_quick_verifies_only_the_small_problem_of_each_kind(tmp_path, monkeypatch):
    _cpu_or_skip()
    monkeypatch.setattr(B, "BACKEND_NAMES", ("reference", "cpu"))
    monkeypatch.setattr(real_side, "IMPLS", ("cpu",))
    monkeypatch.setattr(verify, "STATS_IMPLS", ("cpu",))
    path = tmp_path / "q.json"
    assert main(["backends", "--verify", "--quick", "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["passed"] and doc["quick"] is True
    assert {r["backend"] for r in doc["rows"]} == {"cpu", "epilogue:cpu", "stats:cpu"}
    assert all(" small " in f" {r['case']} " for r in doc["rows"]), [r["case"] for r in doc["rows"]]
    assert main(["backends", "--quick"]) == 2  # --quick without --verify


def test_verify_fails_naming_a_wrong_kernel(monkeypatch, capsys, small_cpu_only):
    be = B.get_backend("cpu")
    forward = type(be).forward

    def slightly_wrong(self, feats, power):  # a kernel off by 1e-3: far outside float32 rounding
        maps, norms = forward(self, feats, power)
        return [m * 1.001 for m in maps], norms
    monkeypatch.setattr(type(be), "forward", slightly_wrong)
    rc = main(["backends", "--verify"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED: cpu small p=2.5 fp32 nchw fwd: max rel err" in out
    assert "FAILED: epilogue:cpu" not in out  # only the wrong kernel is named


def test_verify_fails_naming_a_kernel_that_cannot_launch(monkeypatch, capsys, small_cpu_only):
    def broken(*_a, **_k):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
    monkeypatch.setattr(torch.ops.datadam_fast, "cpu_real_epilogue", broken)
    rc = main(["backends", "--verify"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED: epilogue:cpu small convnet" in out and "no kernel image is available" in out
    assert "FAILED: cpu " not in out


def test_verify_refuses_a_missing_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["backends", "--verify", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert main(["backends", "--json", "x.json"]) == 2  # --json without --verify


def test_required_but_unavailable_fails(tmp_path, capsys, small_problems):
    """--require names what must be verified: a GPU run whose Triton cannot load is a failure,
    not a table of the rest."""
    path = tmp_path / "v.json"
    rc = main(["backends", "--verify", "--require", "cpu,cuda", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAILED: cuda was required (--require) but not verified: does not run on cpu" in out
    doc = json.loads(path.read_text())
    assert doc["required_not_verified"] == ["cuda"] and doc["passed"] is False and doc["complete"] is True


def test_cuda_backend_is_not_loaded_on_cpu(monkeypatch):
    """Device types are known before loading: verifying on one device never builds the other's
    extension only to skip it."""
    loaded = []
    real_get = B.get_backend
    monkeypatch.setattr(B, "get_backend", lambda n: loaded.append(n) or real_get(n))
    _cpu_or_skip()
    loaded.clear()
    monkeypatch.setattr(verify, "verify_loss_backend", lambda *a, **k: [])
    monkeypatch.setattr(verify, "verify_epilogue", lambda *a, **k: [])
    monkeypatch.setattr(verify, "verify_statistics", lambda *a, **k: [])
    _, skipped = verify.verify("cpu")
    assert "cuda" not in loaded
    assert any(s.startswith("cuda: does not run on cpu (not loaded)") for s in skipped)


def test_interrupted_run_keeps_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    """Each row is printed to stderr and the JSON rewritten as it finishes: a run stopped midway
    (a time limit's SIGINT) leaves every finished row on disk."""
    _cpu_or_skip()

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(verify, "verify_epilogue", stop)
    path = tmp_path / "v.json"
    with pytest.raises(KeyboardInterrupt):
        verify.run("cpu", str(path))
    doc = json.loads(path.read_text())
    err = capsys.readouterr().err
    assert doc["complete"] is False and doc["passed"] is False
    # the loss backends that ran (cpu; triton too under the interpreter), none of the epilogue
    assert sum(r["backend"] == "cpu" for r in doc["rows"]) == 16
    assert not any(r["backend"].startswith("epilogue") for r in doc["rows"])
    assert err.count("\ncpu | ") + err.startswith("cpu | ") == 16


def test_bad_device_is_a_usage_error(capsys):
    assert main(["backends", "--verify", "--device", "tpu"]) == 2
    assert "--device tpu: expected cpu, cuda or cuda:N" in capsys.readouterr().err
