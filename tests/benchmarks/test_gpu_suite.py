"""benchmarks/gpu_suite.sh: the one call prepared for a GPU machine lent for a few minutes.

What a CPU can prove: the plan (stage order, caps within the deadline), that a stage cut at its
cap by SIGINT leaves the rows it measured in the archive, and that collecting the tests never
turns Triton's interpreter on behind the caller's back. The whole dry run (``DRY=1``, every stage
on the CPU) is run by ``.ci/run`` and checked by ``benchmarks/gpu_suite_check.py``.
"""
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"
ORDER = ["env", "install", "verify", "loss", "loss_bf16", "kernels", "iteration", "tests", "iter_imagenet", "profile"]

pytestmark = [pytest.mark.slow,  # runs the GPU suite's dry run
              pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")]


def _plan(**env):
    p = subprocess.run(["bash", str(SCRIPT)], env=dict(os.environ, PLAN_ONLY="1", **env), capture_output=True,
                       text=True, check=True)
    lines = p.stdout.splitlines()
    rows = [ln.split() for ln in lines[1:] if ln and not ln.startswith("caps add up")]
    return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in rows], lines[-1]


def test_plan_is_ordered_by_value_and_fits_the_deadline():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    rows, total = _plan()
    assert [r[0] for r in rows] == ORDER
    assert sum(r[1] for r in rows) <= 530 and rows[-1][3] <= 530
    assert total == f"caps add up to {sum(r[1] for r in rows)} s of DEADLINE_S=530 s"
    # the second call of docs/gpu.md fits its own deadline
    second, _ = _plan()
    later = [r for r in second if r[0] in ("tests", "iter_imagenet", "profile")]
    assert sum(r[1] for r in later) <= 150


def test_unknown_stage_is_refused_before_any_work(tmp_path):
    p = subprocess.run(["bash", str(SCRIPT), "nonsense"], env=dict(os.environ, OUT=str(tmp_path / "o")),
                       capture_output=True, text=True)
    assert p.returncode == 2 and "unknown stage 'nonsense'" in p.stderr
    assert not (tmp_path / "o").exists()


def test_a_stage_cut_by_sigint_keeps_its_earlier_rows(tmp_path):
    """The loss stage gets a 15 s cap and a second shape that cannot finish in it: SIGINT at the
    cap, the summary says 'cut', and the archive holds the first shape's rows (the benchmark
    rewrites its JSON after every row)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, DRY="1", OUT=str(out), SUITE_WORK=str(work), PYTHON=sys.executable, CAP_loss="15",
               SUITE_LOSS_ARGS="--device cpu --shapes tiny convnet3-32px-K10 --providers eager --no-compile "
                               "--repeat 1000 --warmup 0")
    p = subprocess.run(["bash", str(SCRIPT), "loss"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr  # a stage that is not ok fails the suite
    assert sorted(os.listdir(out)) == ["gpu_suite.tgz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "loss: cut at" in summary and "(cap 15 s)" in summary, summary
    with tarfile.open(out / "gpu_suite.tgz") as tf:
        doc = json.loads(tf.extractfile("./bench_loss_fp32.json").read())
        log = tf.extractfile("./loss.log").read().decode()
    assert doc["complete"] is False
    done = [r for r in doc["results"] if r.get("status") == "ok"]
    assert [(r["shape"], r["provider"]) for r in done] == [("tiny", "eager")]
    assert done[0]["fwd_bwd_ms"] > 0
    assert "interrupted: the JSON holds the rows finished so far" in log  # flushed (PYTHONUNBUFFERED)


def test_collecting_the_tests_leaves_triton_interpret_alone():
    """With TRITON_INTERPRET=0 (a GPU run) no test module turns the interpreter on while the suite
    is collected: on a GPU the Triton tests must run compiled kernels on the device."""
    code = ("import os, pytest\n"
            "rc = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', %r])\n"
            "from datadam_fast.kernels import spatial_attention as K\n"
            "print('RESULT', rc, os.environ.get('TRITON_INTERPRET'), K.interpreter_active())\n") % str(ROOT / "tests")
    env = dict(os.environ, TRITON_INTERPRET="0")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       cwd=str(ROOT))
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT")]
    assert line == ["RESULT 0 0 False"], p.stdout[-2000:] + p.stderr[-2000:]
