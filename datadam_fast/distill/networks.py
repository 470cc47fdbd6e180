"""The networks whose features a run matches (``--networks``).

* ``random`` (default): a freshly initialised network every iteration, its weights drawn from the
  run's generator (DataDAM, DM: ``main_DataDAM.py:232``).
* ``pool:N[:EPOCHS]``: N networks of the run's architecture trained for EPOCHS epochs (default 1;
  fractions allowed: ``pool:10:0.5``) on the real training set, each iteration drawing one of them
  with the run's generator (the same draw on every rank, restored by ``--resume``). IDM, DANCE and
  NCFM match in such trained or partly trained networks.

A pool is built once and cached on disk (``--pool-dir``, default ``$DATADAM_FAST_CACHE/pools`` or
``~/.cache/datadam_fast/pools``) under a key of everything that defines it (:func:`pool_definition`:
dataset and its options, ZCA, architecture, norm, width, depth, taps, epochs, batch, optimiser, DSA,
seed, format version), so a later run with the same settings reuses it and a changed setting builds
another. Training follows the evaluation protocol's optimiser: SGD lr 0.01, momentum 0.9, weight
decay 5e-4, batch 256, cross-entropy, DSA (non-Siamese) on the training batches, the learning rate
x0.1 for the second half of the steps. Network ``i`` draws everything (init, batch order, DSA) from
its own generator seeded by the run's seed and ``i``, so the pool does not depend on the world size
or on which process trained it. A network in training is checkpointed every
:data:`CHECKPOINT_STEPS` steps, so an interrupted build resumes where it stopped; each finished
network is one atomically written file. Under ``torchrun`` network ``i`` is trained by rank
``i mod world size`` and every rank waits for the others' files (the pool folder must be shared).
Whoever trains a network holds its claim (an exclusive ``flock`` on ``net_i.lock``, which the
system releases when the process ends, however it ends): separate runs that need the same pool at
the same time (two cells of one dataset, say) train each network once between them, a process that
has finished its share trains the networks nobody has claimed yet, and a network whose trainer died
is taken over from its partial checkpoint.

Matching reads a pool network exactly as a fresh one: the same module (train mode, frozen
parameters, the run's memory format) with the pool's weights loaded into it at each draw, so a
BatchNorm network's running statistics never carry over from one iteration to the next.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from typing import Dict, Iterator, List, Optional

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no claims, each process trains what it misses
    fcntl = None

import torch
import torch.nn.functional as F

from .._io import atomic_torch_save, atomic_write_text
from ..errors import UserError
from .config import NetworkSpec, net_overrides, parse_networks

POOL_FORMAT = "datadam_fast.pool/1"
#: training steps between two checkpoints of the network being trained
CHECKPOINT_STEPS = 100
#: the evaluation protocol's optimiser (evaluation/evaluate.py EvalConfig)
POOL_LR, POOL_MOMENTUM, POOL_WEIGHT_DECAY, POOL_BATCH = 0.01, 0.9, 5e-4, 256
#: seconds between two looks for the files other ranks train
WAIT_POLL_S = 1.0


@contextlib.contextmanager
def claim(path: str) -> Iterator[bool]:
    """Try to hold the exclusive claim ``path`` (a lock file) without waiting: yields whether this
    process holds it; released on exit (or by the system when the process dies)."""
    if fcntl is None:  # pragma: no cover
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except OSError:
            held = False
        yield held
    finally:
        os.close(fd)


def default_pool_root() -> str:
    env = os.environ.get("DATADAM_FAST_CACHE", "").strip()
    base = os.path.expanduser(env) if env else os.path.join(os.path.expanduser("~"), ".cache", "datadam_fast")
    return os.path.join(base, "pools")


def pool_definition(cfg, dataset, spec: NetworkSpec) -> Dict:
    """Everything that defines a pool's weights (its cache key is a hash of this). The architecture
    (norm, width, depth) is read from the network the run builds, so an option left at its default
    and the same value given explicitly (``--width 128``) share one pool."""
    from ..models.networks import describe_network, get_network
    opts = {k: v for k, v in sorted(dict(cfg.data_opts).items()) if k not in ("cache_dir", "cache")}
    net = get_network(cfg.model, dataset.channels, dataset.num_classes, tuple(dataset.image_size),
                      generator=torch.Generator().manual_seed(0), taps=cfg.taps,
                      **net_overrides(cfg.width, cfg.depth, cfg.norm))
    arch = describe_network(net, cfg.model)
    return {"format": POOL_FORMAT, "dataset": dataset.name, "data_opts": opts, "train_images": len(dataset),
            "num_classes": dataset.num_classes, "image_shape": [dataset.channels, *dataset.image_size],
            "zca": bool(cfg.zca), "model": cfg.model, "norm": arch["norm"], "width": arch["width"],
            "depth": arch["depth"],
            "taps": cfg.taps, "count": spec.count, "epochs": spec.epochs, "batch": POOL_BATCH, "lr": POOL_LR,
            "momentum": POOL_MOMENTUM, "weight_decay": POOL_WEIGHT_DECAY, "lr_decay": "x0.1 for the second half",
            "dsa": cfg.dsa_strategy if cfg.dsa else None, "seed": cfg.seed}


def pool_key(defn: Dict) -> str:
    return hashlib.sha256(json.dumps(defn, sort_keys=True).encode()).hexdigest()[:16]


def network_seed(seed: int, i: int) -> int:
    """Network ``i``'s generator seed (apart from the run's own and the evaluation's seeds)."""
    return (int(seed) * 1000003 + 7919 * (i + 1) + 104729) % (1 << 62)


def total_steps(epochs: float, n_train: int, batch: int = POOL_BATCH) -> int:
    """Training steps of one network: ``epochs`` times the ``ceil(n / batch)`` steps of an epoch."""
    return max(1, math.ceil(epochs * math.ceil(n_train / batch) - 1e-9))


class RandomNetworks:
    """A freshly initialised network per iteration (weights from the run's generator)."""

    spec = NetworkSpec("random")

    def prepare(self, d) -> None:
        pass

    def draw(self, d):
        return d.new_network()

    def describe(self, d) -> Dict:
        return {"networks": "random", "summary": "a freshly initialised network every iteration"}


class NetworkPool:
    """N trained networks (see the module docstring); :meth:`prepare` builds or loads them."""

    def __init__(self, d, spec: NetworkSpec):
        self.spec = spec
        self.definition = pool_definition(d.cfg, d.train_set, spec)
        self.key = pool_key(self.definition)
        root = d.cfg.pool_dir or default_pool_root()
        self.dir = os.path.join(os.path.expanduser(root), f"{d.cfg.dataset}_{d.cfg.model}_{self.key}")
        self.steps = total_steps(spec.epochs, len(d.train_set))
        self.states: Optional[List[Dict[str, torch.Tensor]]] = None
        self.template = None
        self.build_seconds = 0.0
        self.trained_here = 0  # networks this process trained (the rest: cached, or other processes')

    # ------------------------------------------------------------------ files
    def net_path(self, i: int) -> str:
        return os.path.join(self.dir, f"net_{i}.pt")

    def partial_path(self, i: int) -> str:
        return os.path.join(self.dir, f"net_{i}.partial.pt")

    def lock_path(self, i: int) -> str:
        return os.path.join(self.dir, f"net_{i}.lock")

    def missing(self) -> List[int]:
        return [i for i in range(self.spec.count) if not os.path.isfile(self.net_path(i))]

    def describe(self, d) -> Dict:
        missing = self.missing()
        return {"networks": str(self.spec), "pool_dir": self.dir, "key": self.key, "count": self.spec.count,
                "epochs": self.spec.epochs, "steps_per_network": self.steps, "cached": self.spec.count - len(missing),
                "to_train": len(missing), "summary": (
                    f"pool of {self.spec.count} {d.cfg.model} networks x {self.spec.epochs:g} epoch(s) "
                    f"({self.steps} steps of {POOL_BATCH} each) in {self.dir}: "
                    + (f"{len(missing)} to train" if missing else "cached, nothing to train"))}

    # ------------------------------------------------------------------ build and load
    def prepare(self, d) -> None:
        """Train the missing networks (this rank's share), wait for the others', load all of them."""
        if self.states is not None:
            return
        from .loop import say
        W = d.world
        missing = self.missing()
        mine = [i for i in missing if i % W.size == W.rank]
        t0 = time.perf_counter()
        if missing:
            os.makedirs(self.dir, exist_ok=True)
            if W.is_main:
                atomic_write_text(os.path.join(self.dir, "pool.json"),
                                  json.dumps({"definition": self.definition, "key": self.key}, indent=2))
                say(d, f"network pool: training {len(missing)} of {self.spec.count} {d.cfg.model} networks "
                       f"({self.spec.epochs:g} epoch(s), {self.steps} steps each) into {self.dir}")
            bar = None
            if d.progress:
                from tqdm import tqdm
                bar = tqdm(total=len(mine) * self.steps, desc=f"train pool ({len(mine)} networks)", unit="step",
                           dynamic_ncols=True)
            try:
                for i in mine:
                    self._train_unclaimed(d, i, bar)
                self._wait_for(d, missing, bar)
            finally:
                if bar is not None:
                    bar.close()
        self.build_seconds = time.perf_counter() - t0
        self.states = [self._load(i, d.device) for i in range(self.spec.count)]
        self.template = d.new_network(torch.Generator().manual_seed(0))
        from . import rundir
        if missing:
            say(d, f"network pool: trained {len(missing)} network(s) in {self.build_seconds:.1f} s")
        else:
            say(d, f"network pool: reusing {self.spec.count} cached network(s) from {self.dir}")
        rundir.log(d, {"iteration": d.iteration, "event": "network_pool", "dir": self.dir, "key": self.key,
                       "count": self.spec.count, "epochs": self.spec.epochs, "trained": len(missing),
                       "trained_here": self.trained_here, "seconds": self.build_seconds})

    def _train_unclaimed(self, d, i: int, bar=None, extra: bool = False) -> bool:
        """Train network ``i`` unless it is on disk or another process holds its claim; whether
        this process held the claim. ``extra``: not in this process's share (the bar grows)."""
        if os.path.isfile(self.net_path(i)):
            return False
        with claim(self.lock_path(i)) as held:
            if held:
                if not os.path.isfile(self.net_path(i)):
                    if extra and bar is not None:
                        bar.total += self.steps
                        bar.refresh()
                    train_pool_network(d, i, self, bar)
                    self.trained_here += 1
                # the network is on disk: whoever takes the claim from now on finds it and stops
                # there, so the lock file can go (before, removing it could split one claim in two)
                with contextlib.suppress(OSError):
                    os.remove(self.lock_path(i))
            return held

    def _wait_for(self, d, indices: List[int], bar=None) -> None:
        """Every network of ``indices`` on disk: the ones other processes are training are waited
        for, the unclaimed ones (another rank's share not yet started, or a trainer that died) are
        trained here. torchrun stops the job if a rank fails, so the wait needs no timeout."""
        while True:
            left = [i for i in indices if not os.path.isfile(self.net_path(i))]
            if not left:
                return
            for i in left:
                self._train_unclaimed(d, i, bar, extra=True)
            if any(not os.path.isfile(self.net_path(i)) for i in left):
                time.sleep(WAIT_POLL_S)

    def _load(self, i: int, device) -> Dict[str, torch.Tensor]:
        path = self.net_path(i)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"network pool file {path} is unreadable ({type(e).__name__}); delete it and it will "
                            f"be trained again") from None
        if not isinstance(obj, dict) or obj.get("format") != POOL_FORMAT or obj.get("key") != self.key:
            raise UserError(f"{path} is not network {i} of pool {self.key}; delete it and it will be trained again")
        return {k: v.to(device) for k, v in obj["state"].items()}

    def draw(self, d):
        """One network of the pool, chosen with the run's generator, its weights in the template
        (a step taken outside ``run()``, e.g. ``Distiller.step()`` from the API, builds the pool first)."""
        if self.states is None:
            self.prepare(d)
        i = int(torch.randint(self.spec.count, (1,), generator=d.gen))
        with torch.no_grad():
            self.template.load_state_dict(self.states[i])
        return self.template


def _trainable(net):
    """A network of ``Distiller.new_network`` (frozen for matching) made trainable."""
    for p in net.parameters():
        p.requires_grad_(True)
    return net.train()


def train_pool_network(d, i: int, pool: NetworkPool, bar=None) -> None:
    """Train network ``i`` of ``pool`` (resuming its partial checkpoint) and write ``net_i.pt``."""
    from ..models.augment import DSA
    c, ds = d.cfg, d.train_set
    dev = d.device
    os.makedirs(pool.dir, exist_ok=True)
    g = torch.Generator().manual_seed(network_seed(c.seed, i))
    net = _trainable(d.new_network(g))  # the run's architecture and memory format, initialised from g
    opt = torch.optim.SGD(net.parameters(), lr=POOL_LR, momentum=POOL_MOMENTUM, weight_decay=POOL_WEIGHT_DECAY)
    dsa = DSA(c.dsa_strategy) if c.dsa else None
    n = len(ds)
    labels_all = ds.labels
    step, perm, pos, t_spent = 0, None, 0, 0.0
    part = pool.partial_path(i)
    if os.path.isfile(part):
        try:
            ck = torch.load(part, map_location="cpu", weights_only=True)
            if ck.get("key") == pool.key:
                net.load_state_dict(ck["state"])
                opt.load_state_dict(ck["optimizer"])
                g.set_state(ck["generator"])
                step, perm, pos, t_spent = int(ck["step"]), ck["perm"], int(ck["pos"]), float(ck["seconds"])
        except Exception:  # a torn or foreign partial file: this network trains from the start
            step, perm, pos = 0, None, 0
    if bar is not None and step:
        bar.update(step)
    net.train()
    t0 = time.perf_counter()
    half = pool.steps // 2
    loss = torch.tensor(math.nan)
    while step < pool.steps:
        if perm is None:  # a new epoch: a new order of the training set
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + POOL_BATCH]
        pos += POOL_BATCH
        if pos >= n:
            perm = None
        x = d.real_rows(idx).float()
        y = labels_all[idx].to(dev)
        if dsa is not None:
            x = dsa(x, g)
        for group in opt.param_groups:
            group["lr"] = POOL_LR if step < half or pool.steps == 1 else POOL_LR * 0.1
        loss = F.cross_entropy(net(d.layout(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if bar is not None:
            bar.update(1)
        if step % CHECKPOINT_STEPS == 0 and step < pool.steps:
            atomic_torch_save({"key": pool.key, "state": net.state_dict(), "optimizer": opt.state_dict(),
                               "generator": g.get_state(), "step": step, "perm": perm, "pos": pos,
                               "seconds": t_spent + time.perf_counter() - t0}, part)
    last = float(loss.detach())
    if not math.isfinite(last):
        raise UserError(f"network pool: network {i} diverged (loss {last}) after {step} steps")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_torch_save({"format": POOL_FORMAT, "key": pool.key, "index": i, "state": state, "steps": step,
                       "final_loss": last, "seconds": t_spent + time.perf_counter() - t0,
                       "device": str(dev), "torch": str(torch.__version__)}, pool.net_path(i))
    try:
        os.remove(part)
    except OSError:
        pass


def time_training_step(d, repeats: int = 2) -> float:
    """Seconds of one pool training step (forward, backward, SGD step at batch :data:`POOL_BATCH`, on
    random data, after a warm-up; best of ``repeats``): what ``--plan-only`` scales the build by."""
    ds = d.train_set
    g = torch.Generator().manual_seed(0)
    net = _trainable(d.new_network(g))
    opt = torch.optim.SGD(net.parameters(), lr=POOL_LR, momentum=POOL_MOMENTUM, weight_decay=POOL_WEIGHT_DECAY)
    B = min(POOL_BATCH, len(ds))
    x = d.layout(torch.randn(B, ds.channels, *ds.image_size, generator=g).to(d.device))
    y = torch.randint(ds.num_classes, (B,), generator=g).to(d.device)

    def one():
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)

    one()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        one()
        best = min(best, time.perf_counter() - t0)
    return best


def network_source(d):
    """The run's :class:`RandomNetworks` or :class:`NetworkPool` (nothing built yet)."""
    spec = parse_networks(d.cfg.networks)
    return RandomNetworks() if spec.kind == "random" else NetworkPool(d, spec)


__all__ = ["pool_definition", "pool_key", "NetworkPool", "RandomNetworks",
           "network_source", "train_pool_network", "default_pool_root", "total_steps"]
