"""Trained network pools (``--networks pool:N[:EPOCHS]``): the spec, the cache (built once, reused,
a changed setting builds another), an interrupted build resumes to the same weights, runs sharing a
pool folder train each network once, matching in pool networks for every method, and the run's
exactness with a pool (digits and MNIST end to end; chunked == one pass, 2 gloo processes == 1 and
build the same pool, kill + ``--resume`` == uninterrupted)."""
import json
from pathlib import Path

import pytest
import torch

from datadam_fast.distill import DistillConfig, Distiller
from datadam_fast.distill import networks as N
from datadam_fast.distill.config import NetworkSpec, parse_networks
from datadam_fast.errors import UserError
from conftest import cli, synthetic_images, torchrun


def _pool_events(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if '"network_pool"' in x]


def _net_files(pool_root):
    return sorted(p for p in Path(pool_root).glob("*/net_*.pt") if not p.name.endswith(".partial.pt"))


def test_network_specs_parse_and_bad_ones_say_what_was_expected():
    assert parse_networks("random") == NetworkSpec("random")
    assert parse_networks("pool:3") == NetworkSpec("pool", 3, 1.0)
    assert parse_networks("pool:10:0.5") == NetworkSpec("pool", 10, 0.5)
    assert str(parse_networks("pool:2:0.25")) == "pool:2:0.25"
    for bad, match in (("pool", "pool:N"), ("pool:0", "integer >= 1"), ("pool:x", "integer >= 1"),
                       ("pool:2:0", "EPOCHS"), ("pool:2:nan", "EPOCHS"), ("pool:2:-1", "EPOCHS"),
                       ("fresh", "random"), ("pool:1:2:3", "pool:N"), (3, "random")):
        with pytest.raises(UserError, match=match):
            parse_networks(bad)
    with pytest.raises(UserError, match="pool:N"):
        Distiller(DistillConfig(dataset="digits", networks="pool", iterations=1), None, progress=False)
    assert N.total_steps(1, 1437) == 6 and N.total_steps(0.5, 1437) == 3 and N.total_steps(0.01, 100) == 1


def test_pool_key_covers_what_defines_the_networks(tmp_path):
    d = Distiller(DistillConfig(dataset="digits", iterations=1, networks="pool:2:1", pool_dir=str(tmp_path)), None,
                  progress=False)
    base = N.pool_key(N.pool_definition(d.cfg, d.train_set, parse_networks("pool:2:1")))
    import dataclasses
    for change in (dict(seed=1), dict(width=64), dict(norm="batchnorm"), dict(depth=2), dict(zca=True),
                   dict(dsa=False)):
        c = dataclasses.replace(d.cfg, **change)
        assert N.pool_key(N.pool_definition(c, d.train_set, parse_networks("pool:2:1"))) != base, change
    for spec in ("pool:3:1", "pool:2:0.5"):
        assert N.pool_key(N.pool_definition(d.cfg, d.train_set, parse_networks(spec))) != base, spec
    # what does not define the weights does not change the key
    c = dataclasses.replace(d.cfg, ipc=3, method="dm", factor=2, iterations=50, lr_img=0.1)
    assert N.pool_key(N.pool_definition(c, d.train_set, parse_networks("pool:2:1"))) == base
    # a default and the same value given explicitly build the same networks: one pool
    assert d.cfg.width is None and d.cfg.depth is not None
    for same in (dict(width=128), dict(width=128, norm="instancenorm")):
        c = dataclasses.replace(d.cfg, **same)
        assert N.pool_key(N.pool_definition(c, d.train_set, parse_networks("pool:2:1"))) == base, same
    d.close()


# ------------------------------------------------------------------------------------------ digits, end to end
@pytest.fixture(scope="module")
def digits_pool(tmp_path_factory):
    base = tmp_path_factory.mktemp("pool_digits")
    out = base / "first"
    r = cli("distill", "--dataset", "digits", "--ipc", "2", "--networks", "pool:3:1", "--pool-dir", str(base / "pools"),
             "--iterations", "4", "--eval-runs", "1", "--eval-epochs", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return base, out, r


def test_digits_pool_end_to_end_trains_then_a_second_run_reuses_it(digits_pool):
    base, out, r = digits_pool
    assert "network pool: training 3 of 3 ConvNet networks (1 epoch(s), 6 steps each)" in r.stderr
    assert "train pool (3 networks)" in r.stderr  # the progress bar
    (ev,) = _pool_events(out)
    assert ev["trained"] == 3 and ev["count"] == 3 and ev["seconds"] > 0
    files = _net_files(base / "pools")
    assert len(files) == 3 and not list((base / "pools").glob("*/*.partial.pt"))
    for f in files:
        obj = torch.load(f, weights_only=True)
        assert obj["steps"] == 6 and obj["final_loss"] < 2.3  # below chance (ln 10) after one epoch
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = base / "again"
    r2 = cli("distill", "--dataset", "digits", "--ipc", "2", "--networks", "pool:3:1", "--pool-dir", str(base / "pools"),
              "--iterations", "4", "--eval-runs", "1", "--eval-epochs", "1", "--out", str(again))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "network pool: reusing 3 cached network(s)" in r2.stderr and "training" not in r2.stderr
    assert _pool_events(again)[0]["trained"] == 0
    assert {f: f.stat().st_mtime_ns for f in _net_files(base / "pools")} == stamps  # nothing trained or rewritten
    assert torch.equal(synthetic_images(again), synthetic_images(out))  # same seed, same pool: the same set


def test_digits_changed_pool_setting_builds_a_new_pool(digits_pool, tmp_path):
    base, out, _ = digits_pool
    r = cli("distill", "--dataset", "digits", "--ipc", "2", "--networks", "pool:3:0.5", "--pool-dir",
             str(base / "pools"), "--iterations", "2", "--eval-every", "-1", "--no-progress", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training 3 of 3" in r.stderr
    assert len(list((base / "pools").iterdir())) == 2  # the first pool is kept beside the new one


def test_plan_only_shows_the_pool_and_its_cost_and_trains_nothing(digits_pool, tmp_path):
    base, _, _ = digits_pool
    r = cli("distill", "--dataset", "digits", "--networks", "pool:4:2", "--pool-dir", str(tmp_path / "p"),
             "--plan-only")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "networks: pool of 4 ConvNet networks x 2 epoch(s) (12 steps of 256 each)" in r.stderr
    assert "4 to train; training them takes about" in r.stderr and "s per step, measured" in r.stderr
    plan = json.loads(r.stdout.strip().splitlines()[-1])["plan"]
    assert plan["networks"]["to_train"] == 4 and plan["networks"]["build_seconds"] > 0
    assert not (tmp_path / "p").exists()
    r = cli("distill", "--dataset", "digits", "--ipc", "2", "--networks", "pool:3:1", "--pool-dir", str(base / "pools"),
             "--plan-only")
    assert "cached, nothing to train" in r.stderr


def test_interrupted_pool_build_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = dict(dataset="digits", ipc=1, iterations=1, networks="pool:1:2", eval_every=-1, compile=False)
    with Distiller(DistillConfig(pool_dir=str(tmp_path / "whole"), **cfg), None, progress=False) as d:
        d.networks.prepare(d)
        (whole,) = _net_files(tmp_path / "whole")
    monkeypatch.setattr(N, "CHECKPOINT_STEPS", 4)
    with Distiller(DistillConfig(pool_dir=str(tmp_path / "cut"), **cfg), None, progress=False) as d:
        calls = [0]
        real_rows = d.real_rows

        def dying(idx):
            calls[0] += 1
            if calls[0] == 7:  # step 7 of 12: after the checkpoint at step 4
                raise KeyboardInterrupt
            return real_rows(idx)

        d.real_rows = dying
        with pytest.raises(KeyboardInterrupt):
            d.networks.prepare(d)
    partial = list((tmp_path / "cut").glob("*/net_0.partial.pt"))
    assert partial and torch.load(partial[0], weights_only=True)["step"] == 4 and not _net_files(tmp_path / "cut")
    with Distiller(DistillConfig(pool_dir=str(tmp_path / "cut"), **cfg), None, progress=False) as d:
        d.networks.prepare(d)
    (resumed,) = _net_files(tmp_path / "cut")
    a, b = torch.load(whole, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["steps"] == b["steps"] == 12
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k
    assert not list((tmp_path / "cut").glob("*/*.partial.pt"))


@pytest.mark.parametrize("method", ["datadam", "dm", "ncfm"])
def test_every_method_matches_in_the_drawn_pool_network(tmp_path, method):
    """The step's network is a pool network: its weights are one of the pool's, drawn with the run's
    generator, and never a fresh initialisation."""
    cfg = DistillConfig(dataset="digits", ipc=1, iterations=2, networks="pool:2:1", pool_dir=str(tmp_path),
                        method=method, num_freqs=16, eval_every=-1, compile=False)
    with Distiller(cfg, None, progress=False) as d:
        d.networks.prepare(d)
        pool = [{k: v.clone() for k, v in s.items()} for s in d.networks.states]
        seen = []
        draw = d.networks.draw

        def spy(dd):
            net = draw(dd)
            seen.append({k: v.clone() for k, v in net.state_dict().items()})
            return net

        d.networks.draw = spy
        d.run()
        assert len(seen) == 2
        for s in seen:
            match = [i for i, p in enumerate(pool) if all(torch.equal(s[k], p[k]) for k in p)]
            assert len(match) == 1
        fresh = d.new_network(torch.Generator().manual_seed(0)).state_dict()
        assert not all(torch.equal(fresh[k], seen[0][k]) for k in fresh)


# ------------------------------------------------------------------------------------------ MNIST, exactness
MNIST = dict(dataset="mnist", ipc=2, batch_real=8, width=8, networks="pool:3:1", eval_every=-1, log_every=1,
             checkpoint_every=2, compile=False)


@pytest.fixture(scope="module")
def mnist_pool(tmp_path_factory, datasets_root):
    base = tmp_path_factory.mktemp("pool_mnist")
    out = base / "one"
    with Distiller(DistillConfig(data_root=str(datasets_root), pool_dir=str(base / "pools"), iterations=4, **MNIST),
                   str(out), progress=False) as d:
        d.run()
    assert d.plan.real_chunks == 1 and d.plan.syn_chunks == 1 and _pool_events(out)[0]["trained"] == 3
    return base, out


def _mnist(root, base, **kw):
    return DistillConfig(data_root=str(root), pool_dir=str(base / "pools"), **{**MNIST, **kw})


def test_mnist_pool_chunked_equals_one_pass(mnist_pool, datasets_root, tmp_path):
    base, out = mnist_pool
    with Distiller(_mnist(datasets_root, base, iterations=4, real_chunk=3, syn_chunk=4), str(tmp_path / "c"),
                   progress=False) as d:
        d.run()
    assert d.plan.real_chunks == 4 and d.plan.syn_chunks == 3 and _pool_events(tmp_path / "c")[0]["trained"] == 0
    assert (synthetic_images(tmp_path / "c") - synthetic_images(out)).abs().max() < 1e-5


def test_mnist_pool_killed_and_resumed_equals_uninterrupted(mnist_pool, datasets_root, tmp_path):
    base, out = mnist_pool
    cut = tmp_path / "cut"
    with Distiller(_mnist(datasets_root, base, iterations=4), str(cut), progress=False) as d:
        assert d.run(stop_after=3) == {"stopped": True, "iteration": 3}
    with Distiller(_mnist(datasets_root, base, iterations=4), str(cut), resume=True, progress=False) as d:
        assert d.iteration == 2
        d.run()
    assert torch.equal(synthetic_images(cut), synthetic_images(out))
    with pytest.raises(UserError, match="different settings"):
        Distiller(_mnist(datasets_root, base, iterations=4, networks="pool:2:1"), str(cut), resume=True,
                  progress=False)


def _torchrun(flags):
    r = torchrun(*flags, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_mnist_pool_two_gloo_processes_equal_one(mnist_pool, datasets_root, tmp_path):
    base, out = mnist_pool
    two = tmp_path / "two"
    _torchrun(["distill", "--dataset", "mnist", "--data-root", str(datasets_root), "--ipc", "2", "--batch-real", "8",
               "--width", "8", "--networks", "pool:3:1", "--pool-dir", str(base / "pools"), "--iterations", "4",
               "--eval-every", "-1", "--log-every", "1", "--checkpoint-every", "2", "--no-compile", "--no-progress",
               "--out", str(two)])
    assert _pool_events(two)[0]["trained"] == 0  # the cached pool, shared by both processes
    assert (synthetic_images(two) - synthetic_images(out)).abs().max() < 1e-5


def test_two_gloo_processes_build_the_pool_one_process_builds(digits_pool, tmp_path):
    """Network i trained by rank i mod 2: the pool is the one a single process trains."""
    base, out, _ = digits_pool
    two = tmp_path / "two"
    _torchrun(["distill", "--dataset", "digits", "--ipc", "2", "--networks", "pool:3:1", "--pool-dir",
               str(tmp_path / "pools"), "--iterations", "4", "--eval-runs", "1", "--eval-epochs", "1", "--no-progress",
               "--out", str(two)])
    assert _pool_events(two)[0]["trained"] == 3
    ours = _net_files(tmp_path / "pools")
    theirs = [f for f in _net_files(base / "pools") if f.parent.name == ours[0].parent.name]
    assert [f.name for f in ours] == [f.name for f in theirs] == ["net_0.pt", "net_1.pt", "net_2.pt"]
    for a, b in zip(ours, theirs):
        sa, sb = torch.load(a, weights_only=True)["state"], torch.load(b, weights_only=True)["state"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa), a.name
    assert (synthetic_images(two) - synthetic_images(out)).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------ shared pool folders
def _distill_pool(pool_dir, out):
    """A digits pool:3:1 run as a separate process (what a second cell of the same dataset is)."""
    import subprocess
    import sys
    from conftest import ROOT, _one_thread_env
    return subprocess.Popen([sys.executable, "-m", "datadam_fast", "distill", "--dataset", "digits", "--ipc", "2",
                             "--networks", "pool:3:1", "--pool-dir", str(pool_dir), "--iterations", "4",
                             "--eval-runs", "1", "--eval-epochs", "1", "--no-progress", "--out", str(out)],
                            cwd=str(ROOT), env=_one_thread_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def test_two_runs_sharing_a_pool_folder_train_each_network_once(digits_pool, tmp_path):
    base, out, _ = digits_pool
    a, b = tmp_path / "a", tmp_path / "b"
    pa, pb = _distill_pool(tmp_path / "pools", a), _distill_pool(tmp_path / "pools", b)
    _finish(pa), _finish(pb)
    here = [_pool_events(o)[0]["trained_here"] for o in (a, b)]
    assert sum(here) == 3, here  # between them, every network trained once
    ours = _net_files(tmp_path / "pools")
    theirs = [f for f in _net_files(base / "pools") if f.parent.name == ours[0].parent.name]
    for x, y in zip(ours, theirs):
        sx, sy = torch.load(x, weights_only=True)["state"], torch.load(y, weights_only=True)["state"]
        assert all(torch.equal(sx[k], sy[k]) for k in sx), x.name
    assert not list((tmp_path / "pools").glob("*/*.lock")) and not list((tmp_path / "pools").glob("*/*.partial.pt"))
    assert torch.equal(synthetic_images(a), synthetic_images(out)) and torch.equal(synthetic_images(b),
                                                                                   synthetic_images(out))


def test_a_claimed_network_is_waited_for_and_taken_over_when_its_claim_ends(digits_pool, tmp_path):
    """Network 1's claim is held by this test (another process training it): the run trains the
    other two, waits, and trains network 1 itself once the claim is gone (its holder died)."""
    import time
    base, out, _ = digits_pool
    (name,) = [p.name for p in (base / "pools").glob("digits_*")  # the pool:3:1 folder (other tests add more)
               if json.loads((p / "pool.json").read_text())["definition"]["epochs"] == 1]
    pool_dir = tmp_path / "pools" / name
    pool_dir.mkdir(parents=True)
    with N.claim(str(pool_dir / "net_1.lock")) as held:
        assert held
        proc = _distill_pool(tmp_path / "pools", tmp_path / "run")
        deadline = time.time() + 300
        while not ((pool_dir / "net_0.pt").exists() and (pool_dir / "net_2.pt").exists()):
            assert proc.poll() is None and time.time() < deadline, "the run did not train its other networks"
            time.sleep(0.2)
        time.sleep(3 * N.WAIT_POLL_S)
        assert proc.poll() is None and not (pool_dir / "net_1.pt").exists()  # it waits for the claimed one
    _finish(proc)  # the claim ended: the run trained network 1 itself
    assert _pool_events(tmp_path / "run")[0]["trained_here"] == 3
    assert torch.equal(synthetic_images(tmp_path / "run"), synthetic_images(out))
