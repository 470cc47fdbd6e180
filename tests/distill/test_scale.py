"""Bounded memory per iteration (class chunks + planner) and class sharding over processes."""
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from datadam_fast.distill import DistillConfig, Distiller
from datadam_fast.errors import UserError
from datadam_fast.distill.memory import GB, MB, linear_fit, plan_chunks
from conftest import SMALL_RUN, cli, run_small, synthetic_images, torchrun

pytestmark = pytest.mark.slow  # torchrun jobs and planner runs

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(SMALL_RUN, checkpoint_every=0)


def _run(tmp_path, name, iterations=3, **kw):
    return run_small(tmp_path / name, iterations=iterations, **{"checkpoint_every": 0, **kw})


# ----------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("real_chunk,syn_chunk", [(1, 1), (3, 4), (10, 3), (4, 10)])
def test_chunked_equals_one_pass(tmp_path, real_chunk, syn_chunk):
    one = _run(tmp_path, "one", real_chunk=10, syn_chunk=10)
    assert one.plan.real_chunks == 1 and one.plan.syn_chunks == 1
    ch = _run(tmp_path, "ch", real_chunk=real_chunk, syn_chunk=syn_chunk)
    assert ch.plan.real_chunk == real_chunk and ch.plan.syn_chunk == syn_chunk
    torch.testing.assert_close(ch.syn, one.syn, atol=1e-5, rtol=1e-5)
    assert (ch.syn - one.syn).abs().max() < 1e-5
    assert not torch.allclose(one.syn, Distiller(DistillConfig(iterations=0, **SMALL), None, progress=False).syn)


def test_chunked_loss_terms_equal_one_pass():
    a = Distiller(DistillConfig(iterations=1, real_chunk=10, syn_chunk=10, **SMALL), None, progress=False)
    b = Distiller(DistillConfig(iterations=1, real_chunk=3, syn_chunk=3, **SMALL), None, progress=False)
    ta, tb = a.step(), b.step()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-5)


def test_batchnorm_refuses_chunks(tmp_path):
    with pytest.raises(UserError, match="BatchNorm"):
        Distiller(DistillConfig(preset="official", syn_chunk=3, **SMALL), None, progress=False)
    with pytest.raises(UserError, match="BatchNorm"):
        Distiller(DistillConfig(preset="official", real_chunk=3, **SMALL), None, progress=False)
    d = Distiller(DistillConfig(preset="official", iterations=1, **SMALL), None, progress=False)
    assert d.plan.real_chunks == 1 and d.plan.syn_chunks == 1  # one pass: exact under BatchNorm


# ----------------------------------------------------------------------------- planner
def test_plan_chunks_fits_and_rejects():
    kw = dict(fixed=1 * GB, real_per_image=10 * MB, syn_per_image=30 * MB, prefetch_per_image=0,
              num_classes=1000, batch_real=2, ipc=4, lookahead=1)
    p = plan_chunks(budget=8 * GB, **kw)
    assert p.predicted_peak + p.headroom <= 8 * GB
    assert 1 <= p.syn_chunk < 1000 and p.real_chunks * p.real_chunk >= 1000
    bigger = plan_chunks(budget=16 * GB, **kw)
    assert bigger.syn_chunk > p.syn_chunk
    with pytest.raises(UserError, match="too small for even one class"):
        plan_chunks(budget=int(1.1 * GB), **kw)
    with pytest.raises(UserError, match="cannot be split"):
        plan_chunks(budget=8 * GB, single_pass="BatchNorm mixes classes", **kw)
    one = plan_chunks(budget=400 * GB, single_pass="BatchNorm mixes classes", **kw)
    assert one.real_chunks == one.syn_chunks == 1


def test_linear_fit_takes_the_larger_way():
    slope, base = linear_fit((10, 20), [(100, 50), (300, 250)], floor=1.0)
    assert slope == 20.0 and base == 0.0
    slope, base = linear_fit((10, 20), [(0, 500), (0, 700)], floor=1.0)  # RSS saw nothing: tracking counts
    assert slope == 20.0 and base == 300.0
    slope, _ = linear_fit((10, 20), [(5, 5), (5, 5)], floor=3.0)
    assert slope == 3.0


def _poll_rss(proc, peak):
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.01)


def test_planner_keeps_a_small_run_within_budget(tmp_path, datasets_root):
    base = ["distill", "--dataset", "mnist", "--data-root", str(datasets_root), "--width", "64", "--ipc", "10",
            "--iterations", "2", "--eval-every", "-1", "--no-progress", "--log-every", "1",
            "--real-epilogue", "off"]  # the network's own real pass: large enough per image to need chunks
    # a budget below one class is rejected up front: exit 2, one line, nothing written
    r = cli(*base + ["--out", str(tmp_path / "tiny"), "--memory-budget", "0.2"])
    assert r.returncode == 2 and "too small for even one class" in r.stderr
    # the first log line names the device (devices.py); the error itself is one line
    assert len([l for l in r.stderr.strip().splitlines() if not l.startswith("device: ")]) == 1
    assert not (tmp_path / "tiny" / "metrics.jsonl").exists()
    need = float(re.search(r"needs about ([0-9.]+) GB", r.stderr).group(1))
    budget = need + 0.25  # room for a few classes per chunk, not for all ten
    cmd = [sys.executable, "-m", "datadam_fast", *base, "--out", str(tmp_path / "fit"), "--memory-budget", f"{budget:.3f}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak = [0]
    th = threading.Thread(target=_poll_rss, args=(proc, peak), daemon=True)
    th.start()
    out, err = proc.communicate(timeout=600)
    th.join()
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    plan = next(x["plan"] for x in lines if x.get("event") == "plan")
    assert plan["real_chunks"] > 1  # the budget forced the real side into chunks
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["peak_memory_mb"] * MB <= budget * GB
    assert peak[0] <= budget * GB, (peak[0] / GB, budget)
    assert "memory plan:" in err and "measured:" in err
    steps = [x for x in lines if "loss" in x]
    assert steps and all(x["peak_memory_mb"] > 0 and x["sec_per_it"] > 0 and x["images_per_s"] > 0 for x in steps)


# ----------------------------------------------------------------------------- sharding
def test_two_process_gloo_equals_one_process_and_resumes(tmp_path):
    flags = ["distill", "--ipc", "2", "--batch-real", "6", "--width", "16", "--no-progress", "--log-every", "1",
             "--eval-every", "4", "--eval-runs", "3", "--eval-epochs", "2", "--checkpoint-every", "2"]
    r2 = torchrun(*flags + ["--iterations", "4", "--out", str(tmp_path / "two")])
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = cli(*flags + ["--iterations", "4", "--out", str(tmp_path / "one")])
    assert r1.returncode == 0, r1.stderr
    a, b = synthetic_images(tmp_path / "two"), synthetic_images(tmp_path / "one")
    assert a.shape == b.shape == (20, 1, 8, 8)
    assert (a - b).abs().max() < 1e-5
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    plan2 = next(x["plan"] for x in m2 if x.get("event") == "plan")
    assert plan2["world_size"] == 2 and plan2["num_classes"] == 5  # rank 0 owns 5 of 10 classes
    loss2 = [x["loss"] for x in m2 if "loss" in x]
    loss1 = [x["loss"] for x in m1 if "loss" in x]
    assert loss2 == pytest.approx(loss1, rel=1e-5)  # logged loss = sum over ranks
    ev2 = next(x["eval"] for x in m2 if "eval" in x)
    ev1 = next(x["eval"] for x in m1 if "eval" in x)
    assert len(ev2["accuracies"]) == 3 and ev2["accuracies"] == pytest.approx(ev1["accuracies"], abs=0.5)
    # a 2-process checkpoint resumes in 1 process (and for longer) to the uninterrupted result
    r = torchrun(*flags + ["--iterations", "2", "--out", str(tmp_path / "cut"), "--eval-every", "-1"])
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and ck["iteration"] == 2 and ck["images"].shape[0] == 20
    r = cli(*flags + ["--iterations", "4", "--out", str(tmp_path / "cut"), "--resume", "--eval-every", "-1"])
    assert r.returncode == 0, r.stderr
    assert (synthetic_images(tmp_path / "cut") - b).abs().max() < 1e-5


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux /proc")
def test_close_ends_the_gloo_threads():
    """After World.close() no gloo thread is left to be torn down at interpreter exit (where it
    can abort a finished run), even when torch._dynamo is first imported after the group exists."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "_gloo_teardown.py")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    found = dict(re.findall(r"rank (\d) threads after close: ([\w ]*?)(?=rank \d|$)", r.stdout, re.M))
    assert sorted(found) == ["0", "1"], r.stdout
    assert not any("gloo" in names for names in found.values()), found


def test_failing_rank_brings_the_job_down_and_checkpoint_survives(tmp_path):
    """Rank 1 raises at iteration 3 under torchrun: the job exits non-zero, rank 1's own error is on
    stderr and named as the root cause, and the last checkpoint (written by rank 0) resumes."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "_fail_rank.py"), "distill", "--ipc", "2", "--batch-real", "6", "--width", "16",
           "--iterations", "6", "--checkpoint-every", "1", "--log-every", "1", "--eval-every", "-1",
           "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0
    assert "injected failure on rank 1 at iteration 3" in r.stderr
    root = r.stderr[r.stderr.index("Root Cause"):]
    assert "rank      : 1" in root
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] in (2, 3) and ck["images"].shape[0] == 20
    d = Distiller(DistillConfig(iterations=4, **SMALL), str(out), resume=True, progress=False)
    assert d.iteration == ck["iteration"]
    d.run()
    d.close()
    assert d.iteration == 4


def test_sharding_refuses_batchnorm():
    from datadam_fast.distill.parallel import World
    with pytest.raises(UserError, match="class sharding"):
        Distiller(DistillConfig(preset="official", **SMALL), None, progress=False, world=World(rank=0, size=2))


# ----------------------------------------------------------------------------- data path
def test_memmap_rows_do_not_map_the_file(tmp_path):
    """Batches of a packed (memory-mapped) set are read with pread: the file is never mapped
    into the process, so the resident set does not grow with the data set."""
    import numpy as np
    from datadam_fast.data import load_dataset
    from datadam_fast.data._packed import PackWriter
    n, chw = 4000, (3, 32, 32)
    w = PackWriter(tmp_path / "p", n, chw, "fp")
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n,) + chw, dtype=np.uint8)
    w.write(imgs)
    w.finalize(np.arange(n) % 10, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3)
    ds = load_dataset("folder", path=str(tmp_path / "p"))
    assert ds.is_memmap
    idx = torch.tensor([3999, 0, 5, 6, 7, 1234, 5])
    torch.testing.assert_close(ds.rows_uint8(idx), torch.from_numpy(imgs[idx.numpy()]))
    ds.batch(torch.arange(n))  # every row read once
    assert _mapped_rss_kb(str(tmp_path / "p" / "images.u8")) == 0


def _mapped_rss_kb(path: str) -> int:
    """Resident kB of every mapping of ``path`` in this process (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total
