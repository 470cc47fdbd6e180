"""Same seed and flags, same synthetic images: fixed ``datadam-fast distill`` runs (digits and a
2-iteration MNIST run; DataDAM with both presets and DM; eager, chunked, fused-real and compiled
paths) must reproduce, bit for bit, the SHA-256 of the synthetic tensor recorded in
``tests/distill/golden_synthetic.json`` (recorded from the code of the commit named there; the
fused C++ real side runs its 3x3 convolutions as Winograd F(2x2, 3x3) since that recording).

Float results depend on the CPU's instruction set and the torch version (oneDNN picks kernels by
ISA, and the C++ kernels are compiled with ``-march=native``), so the exact digest is asserted where
a recording was made on a machine like this one (``recorded_with``, or one of ``more_recordings``:
the same code recorded on another CPU); elsewhere the recorded leading values and the sum are
compared with a tolerance, and the test says so in its skip reason for the exact part. Re-record with ``python tests/distill/test_golden.py`` (only when a change of results
is intended). All runs happen in one subprocess (``--json``), in the order of ``RUNS``.
"""
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: also when run as a script
from conftest import shared_datasets  # noqa: E402

pytestmark = pytest.mark.slow  # subprocess runs of the CLI

GOLDEN = Path(__file__).resolve().parent / "golden_synthetic.json"

RUNS = {
    "digits_paper": ["--ipc", "2", "--iterations", "5"],
    "digits_official": ["--ipc", "2", "--iterations", "5", "--preset", "official"],
    "digits_dm": ["--ipc", "2", "--iterations", "5", "--method", "dm"],
    "digits_dm_official": ["--ipc", "2", "--iterations", "3", "--method", "dm", "--preset", "official"],
    "digits_paper_chunked_eager": ["--ipc", "2", "--iterations", "3", "--real-chunk", "3", "--syn-chunk", "4",
                                   "--real-epilogue", "off"],
    "digits_paper_noise": ["--ipc", "2", "--iterations", "3", "--init", "noise", "--no-dsa", "--real-epilogue", "off",
                           "--syn-chunk", "3"],
    "mnist_paper": ["--dataset", "mnist", "--ipc", "2", "--iterations", "2", "--no-compile"],
    "mnist_official": ["--dataset", "mnist", "--ipc", "2", "--iterations", "2", "--preset", "official", "--no-compile"],
    "mnist_dm": ["--dataset", "mnist", "--ipc", "2", "--iterations", "2", "--method", "dm", "--no-compile"],
    "mnist_paper_compiled": ["--dataset", "mnist", "--ipc", "2", "--iterations", "2", "--compile"],
}
# one thread: reductions then run in one fixed order whatever the machine's core count
COMMON = ["--eval-every", "-1", "--no-progress", "--threads", "1", "--checkpoint-every", "0"]


def native_isa() -> str:
    """The CPU's vector extensions: the C++ kernels are compiled with ``-march=native``, so two CPUs
    of one ``cpu_capability`` that differ in these (AMX, AVX512-FP16, ...) round differently."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return " ".join(sorted(f for f in (m.group(1).split() if m else []) if re.match(r"(avx|amx|fma|f16c|sse4|bmi)", f)))


def fingerprint():
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "native_isa": native_isa()}


def recording(golden):
    """The recording made on a machine like this one: of those whose every recorded key matches this
    machine, the most specific (``more_recordings`` add machines to the first recording; each was
    made from the same code, see its ``commit``). None: no recording is exactly comparable."""
    recs = [{"recorded_with": golden["recorded_with"], "runs": golden["runs"]}] + golden.get("more_recordings", [])
    fp = fingerprint()
    matching = [r for r in recs if all(fp.get(k) == v for k, v in r["recorded_with"].items())]
    return max(matching, key=lambda r: len(r["recorded_with"]), default=None)


def _digest(x: torch.Tensor) -> dict:
    x = x.contiguous()
    return {"sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(), "shape": list(x.shape),
            "first": [float(v) for v in x.flatten()[:4]], "sum": float(x.double().sum())}


def run_all(names, work: Path, data_root=None) -> dict:
    """The digests of ``names``, each a ``datadam-fast distill`` run of this one process (every run
    seeds its own generators; one process instead of one per run saves a torch import each)."""
    from datadam_fast.cli import main
    runs = {}
    for name in names:  # the compiled run last: nothing after it shares dynamo's state
        out = work / name
        args = RUNS[name] + (["--data-root", str(data_root)] if "--dataset" in RUNS[name] else [])
        rc = main(["distill", *args, *COMMON, "--out", str(out)])
        if rc != 0:
            raise SystemExit(f"{name}: datadam-fast distill exited with {rc}")
        runs[name] = _digest(torch.load(out / "synthetic.pt", weights_only=True)["images"])
    return runs


def _has_real_data(root: Path) -> bool:
    return (root / "mnist" / "raw").is_dir()


@pytest.fixture(scope="module")
def digests(tmp_path_factory):
    # the digits runs need no real data: without MNIST only the MNIST runs are left out (and skip)
    root = shared_datasets()
    names = [n for n in RUNS if "--dataset" not in RUNS[n] or _has_real_data(root)]
    work = tmp_path_factory.mktemp("golden")
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json", str(work / "digests.json"),
                        "--data-root", str(root), "--work", str(work), *names],
                       capture_output=True, text=True, env={**os.environ, "DATADAM_FAST_COMPILE": "0"})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((work / "digests.json").read_text())


@pytest.mark.parametrize("name", list(RUNS))
def test_same_seed_same_synthetic_images(name, digests):
    if name not in digests:
        pytest.skip(f"real datasets not found at {shared_datasets()}")
    golden = json.loads(GOLDEN.read_text())
    rec = recording(golden)
    want = (rec or golden)["runs"][name]
    got = digests[name]
    assert got["shape"] == want["shape"]
    if rec is not None:
        assert got["sha256"] == want["sha256"], (got, want)
        assert got["first"] == want["first"] and got["sum"] == want["sum"]
    else:
        torch.testing.assert_close(torch.tensor(got["first"]), torch.tensor(want["first"]), rtol=1e-3, atol=1e-3)
        assert abs(got["sum"] - want["sum"]) <= 1e-3 * max(1.0, abs(want["sum"])) * len(want["shape"])
        pytest.skip(f"exact digest not comparable: no recording made on {fingerprint()} "
                    f"(values matched within tolerance)")


if __name__ == "__main__":
    # --json FILE: the digests of every run (the test's subprocess); no flags: re-record the golden
    # file (only when a change of results is intended)
    import argparse
    import tempfile
    os.environ.setdefault("DATADAM_FAST_COMPILE", "0")
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--data-root", default=str(shared_datasets()))
    ap.add_argument("--work")
    ap.add_argument("names", nargs="*", help="runs to make (default: every run of RUNS)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        runs = run_all(a.names or list(RUNS), Path(a.work or d), a.data_root)
    if a.json:
        Path(a.json).write_text(json.dumps(runs))
    else:
        for name, r in runs.items():
            print(name, r)
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
        GOLDEN.write_text(json.dumps({"recorded_with": fingerprint(), "runs": runs, "recorded_at_commit": head},
                                     indent=1))
