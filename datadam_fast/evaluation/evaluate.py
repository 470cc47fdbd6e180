"""The standard evaluation protocol: train fresh networks on a synthetic set, test on real data.

Follows the official ``evaluate_synset`` (``utils.py:386-453``): SGD lr 0.01, momentum 0.9,
weight decay 5e-4, cross-entropy, ``epochs + 1`` epochs, shuffled batches, non-Siamese DSA at
train time, test on the full real test set in eval mode. The learning rate is multiplied by 0.1
once, *after* training epoch ``epochs // 2 + 1`` (the official loop trains epoch ``ep`` and then
checks ``if ep in lr_schedule``), with the optimizer re-created (momentum reset): see
:func:`lr_per_epoch`. All randomness (init, shuffling, DSA) of run ``r`` comes from its own seeded
``torch.Generator``.

The runs of one evaluation can be trained together (``EvalConfig.batched``): the networks'
parameters are stacked (``torch.func.stack_module_state``) and one ``vmap``-ed
``functional_call`` trains all of them per step. Each run keeps its own generator, so its init,
batch order and DSA draws are exactly those of the sequential run with the same seed; only the
floating-point summation order inside the batched convolutions differs.
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import UserError

# Whether training the runs together beats training them one after another, per device type.
# CPU (benchmarks/bench_eval.py, benchmarks/results/bench_eval_cpu_2026-11-26.json, width-128 ConvNet,
# 5 runs): batched wins only with tiny batches (MNIST IPC 1: 10 images per step) and loses ~2.5x at
# IPC 10 - vmap lowers the stacked convolutions to grouped convolutions, whose backward has no
# oneDNN kernel on CPU in torch 2.13 (profiled: aten::convolution_backward dominates). The costly
# evaluations are the large-IPC ones, so the CPU default is sequential. CUDA: one launch for N small
# networks instead of N launches is assumed faster (benchmarks/bench_eval.py measures it on a GPU).
BATCHED_DEFAULT = {"cpu": False, "cuda": True}
# Testing N trained nets with one vmapped forward: on CPU the grouped convolutions make it ~3x
# slower than N plain forwards (same benchmark), so only done on GPUs.
BATCHED_TEST = {"cpu": False, "cuda": True}


#: torch.compile of the training step (forward, loss and backward of the network, AOTAutograd) pays
#: for its compile (13-19 s on CPU: one graph per batch shape, two when the last batch is short)
#: only in long evaluations: by default it is on from this many training steps per run, so the DM
#: protocol's 1001 epochs compile even with one batch per epoch. Measured on a 2-core CPU
#: (width-128 ConvNet, InstanceNorm, benchmarks/results/bench_eval_cpu_2026-12-07.json): training
#: 1.48x faster at 40 images (one batch of 40: 37 ms saved per step, so the compile pays for itself
#: after about 400 steps) and 1.57x at 400 images, the norm, ReLU and pooling passes of the forward
#: and backward fused; the convolutions are left.
COMPILE_MIN_STEPS = 1000

DEFAULT_EPOCHS = 1000  # the DM protocol's; evaluate of a run's file uses its recorded --eval-epochs
DEFAULT_RUNS = 3


@dataclass
class EvalConfig:
    model: str = "ConvNet"
    epochs: int = DEFAULT_EPOCHS
    runs: int = DEFAULT_RUNS
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    norm: Optional[str] = None   # override the model's normalisation layer
    width: Optional[int] = None  # override a ConvNet's width
    depth: Optional[int] = None  # override a ConvNet's depth
    test_batch: int = 1000
    batched: Optional[bool] = None  # train the runs together; None = the faster one for the device
    compile: Optional[bool] = None  # torch.compile each training step's loss; None = resolve_compile's choice




def evaluation_seed(seed: int, iteration: int) -> int:
    """The seed of a distillation run's evaluation after ``iteration`` iterations of a run seeded
    with ``seed``: run ``r``'s networks are seeded from it and ``r`` (``evaluate`` of the run's
    ``synthetic.pt`` uses it by default, so the two give the same accuracies)."""
    return int(seed) * 7919 + int(iteration)


def recorded_protocol(meta: Dict) -> Dict:
    """``{"seed", "epochs", "runs"}`` of the final evaluation of the run that wrote a synthetic set
    (None where the file records nothing: an official or exported file)."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else None
    if cfg is None or meta.get("iteration") is None:
        return {"seed": None, "epochs": None, "runs": None}
    return {"seed": evaluation_seed(cfg.get("seed", 0), meta["iteration"]), "epochs": cfg.get("eval_epochs"),
            "runs": cfg.get("eval_runs") or None}


def lr_per_epoch(epochs: int, lr: float) -> List[float]:
    """Learning rate of each of the ``epochs + 1`` training epochs, as the official code runs them.

    Official loop: ``for ep in range(Epoch + 1): train one epoch; if ep in [Epoch // 2 + 1]:
    lr *= 0.1`` - so epochs ``0 .. Epoch//2+1`` use ``lr`` and the remaining ones ``lr * 0.1``
    (6 epochs: 5 x 0.01 then 2 x 0.001).
    """
    if int(epochs) != epochs or epochs < 0:
        raise UserError(f"epochs must be an integer >= 0, got {epochs!r}")
    decay_after = int(epochs) // 2 + 1
    return [lr if ep <= decay_after else lr * 0.1 for ep in range(int(epochs) + 1)]


# ----------------------------------------------------------------------- which network
def network_for_synthetic(meta: Dict, *, model: Optional[str] = None, norm: Optional[str] = None,
                          width: Optional[int] = None, depth: Optional[int] = None) -> Dict:
    """The evaluation network for a synthetic set: what its file records unless overridden.

    * datadam-fast files: the recorded ``eval_model`` (else ``model``) with the recorded
      ``norm``/``width``/``depth`` when it is the distillation network itself (as the distiller's
      own evaluation does). So an ``official``-preset set is evaluated with its BatchNorm ConvNet.
    * official files (no config): ``ConvNetBN`` - the official ``get_network('ConvNet')`` is the
      BatchNorm one (the package's ``ConvNet`` is InstanceNorm).
    * anything else: the package default ``ConvNet`` (InstanceNorm).

    ``model`` replaces the recorded network and its recorded norm/width/depth (the registry entry's
    own ones apply); ``norm``/``width``/``depth`` override single values. Returns
    ``{"model", "norm", "width", "depth", "source"}`` (``source`` says where the choice came from).
    """
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else None
    rec: Dict = {"model": "ConvNet", "norm": None, "width": None, "depth": None}
    if cfg is not None:
        dist_model = cfg.get("model") or "ConvNet"
        ev = cfg.get("eval_model") or dist_model
        rec["model"] = ev
        if ev == dist_model:
            rec.update(norm=cfg.get("norm"), width=cfg.get("width"), depth=cfg.get("depth"))
        source = f"recorded in the file (preset {cfg.get('preset', '?')})"
    elif meta.get("format") == "official":
        rec["model"] = "ConvNetBN"
        source = "official file: the official ConvNet is BatchNorm"
    else:
        source = "no network recorded in the file: package default"
    if model is not None:
        rec = {"model": model, "norm": None, "width": None, "depth": None}
        source = "--model"
    overridden = [k for k, v in (("norm", norm), ("width", width), ("depth", depth)) if v is not None]
    for k, v in (("norm", norm), ("width", width), ("depth", depth)):
        if v is not None:
            rec[k] = v
    if overridden:
        source += " + " + ", ".join(f"--{k}" for k in overridden)
    rec["source"] = source
    return rec


def _net_kwargs(cfg: EvalConfig) -> Dict:
    return {k: v for k, v in (("norm", cfg.norm), ("width", cfg.width), ("depth", cfg.depth)) if v is not None}


def build_eval_network(cfg: EvalConfig, C: int, K: int, size, generator=None):
    from ..models.networks import get_network
    try:
        return get_network(cfg.model, C, K, tuple(size), generator=generator, **_net_kwargs(cfg))
    except ValueError as e:
        raise UserError(f"cannot build evaluation network {cfg.model}: {e}") from None


def describe_eval_network(cfg: EvalConfig, channels: int, num_classes: int, image_size) -> Dict:
    """``{"model", "family", "norm", "width", "depth", ...}`` of the network ``cfg`` trains."""
    from ..models.networks import describe_network
    with torch.random.fork_rng(devices=[]):
        net = build_eval_network(cfg, channels, num_classes, image_size)
    return describe_network(net, cfg.model)


def network_label(d: Dict) -> str:
    """One-line description, e.g. ``ConvNetBN (ConvNet, norm=batchnorm, width=128, depth=3)``."""
    return (f"{d['model']} ({d['family']}, norm={d['norm']}, width={d['width'] if d['width'] is not None else '-'}, "
            f"depth={d['depth']})")


# --------------------------------------------------------------------------- training
@torch.no_grad()
def accuracy(net, test_set, device, batch: int = 1000) -> float:
    """Top-1 accuracy (percent) of ``net`` in eval mode on the whole ``test_set``."""
    net.eval()
    correct = 0
    n = len(test_set)
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n))
        x = test_set.batch(idx, device=device)
        y = test_set.labels[idx].to(device)
        correct += int((net(x).argmax(1) == y).sum())
    return 100.0 * correct / n


EpochCallback = Callable[[int, torch.optim.Optimizer], None]


def _sgd(params, lr: float, cfg: EvalConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _check_inputs(images, test_set, cfg: EvalConfig):
    C = images.shape[1]
    if C != test_set.channels:
        raise UserError(f"synthetic images have {C} channels but dataset {test_set.name} has {test_set.channels}")
    if cfg.batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {cfg.batch_size}")


def steps_per_run(num_images: int, cfg: EvalConfig) -> int:
    return cfg.epochs * -(-num_images // cfg.batch_size)


def resolve_compile(cfg: EvalConfig, num_images: int, batched: bool) -> Tuple[bool, str]:
    """Whether the sequential runs train through :class:`CompiledTrainingLoss`, and why."""
    if batched:
        return False, "batched runs train under vmap, uncompiled"
    if cfg.compile is not None:
        return bool(cfg.compile), "requested"
    if os.environ.get("DATADAM_FAST_COMPILE", "1") == "0":
        return False, "DATADAM_FAST_COMPILE=0"
    steps = steps_per_run(num_images, cfg)
    if steps < COMPILE_MIN_STEPS:
        return False, f"{steps} training steps per run (compiled from {COMPILE_MIN_STEPS})"
    return True, f"{steps} training steps per run"


class CompiledTrainingLoss:
    """``loss(net, x, y)`` = ``cross_entropy(net(x), y)`` through one ``torch.compile`` per
    architecture: a template copy of the first network is traced with ``functional_call`` and each
    run's parameters and buffers go in as inputs (as the distillation's compiled passes do), so five
    runs compile once per batch shape. Gradients reach the run's own parameters; train-mode
    BatchNorm updates the run's running statistics in place. The draws (initial weights, batch
    order, DSA) are the eager path's: only float rounding differs. A compiler that fails falls back
    to the eager loss with one warning."""

    def __init__(self, template: torch.nn.Module):
        self.template = copy.deepcopy(template)
        self.failed: Optional[str] = None
        self._fn = torch.compile(self._loss, dynamic=False)

    def _loss(self, weights: Dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(self.template, weights, (x,)), y)

    def __call__(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.failed is None:
            weights = dict(net.named_parameters())
            weights.update(net.named_buffers())
            self.template.train(net.training)
            try:
                return self._fn(weights, x, y)
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # a compiler or toolchain failure: train on, uncompiled
                import warnings
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                warnings.warn(f"datadam_fast: compiled evaluation training failed ({self.failed}); "
                              f"training uncompiled", RuntimeWarning, stacklevel=2)
        return F.cross_entropy(net(x), y)


def train_networks(images: torch.Tensor, labels: torch.Tensor, cfg: EvalConfig, generators: Sequence[torch.Generator],
                   *, num_classes: int, device="cpu", batched: bool = False,
                   epoch_callback: Optional[EpochCallback] = None, progress: bool = False,
                   loss_fn: Optional[Callable] = None):
    """Train one fresh network per generator on (images, labels); returns ``(nets, last_losses, seconds)``.

    Run ``r`` draws, from ``generators[r]`` only and in this order: its initial weights, then per
    epoch a permutation of the images, then per batch its DSA family and parameters - whether the
    runs are trained one after another (``batched=False``) or together (``batched=True``).
    ``epoch_callback(ep, optimizer)`` is called before each epoch with the optimizer that will
    step during it (one optimizer for all runs when batched). ``loss_fn(net, x, y)`` (sequential
    runs only; e.g. a :class:`CompiledTrainingLoss`) replaces ``cross_entropy(net(x), y)``.
    """
    from ..models.augment import DSA
    device = torch.device(device)
    C, H, W = images.shape[1:]
    x_all, y_all = images.to(device), labels.to(device)
    dsa = DSA(cfg.dsa_strategy) if cfg.dsa else None
    lrs = lr_per_epoch(cfg.epochs, cfg.lr)
    n, B = x_all.shape[0], cfg.batch_size
    t0 = time.perf_counter()
    if not batched:
        nets, losses = [], []
        for g in generators:
            net = build_eval_network(cfg, C, num_classes, (H, W), generator=g).to(device)
            last = torch.tensor(math.nan)
            opt = None
            for ep, lr in enumerate(lrs):
                if opt is None or lr != lrs[ep - 1]:
                    opt = _sgd(net.parameters(), lr, cfg)  # official: a new optimizer, momentum reset
                if epoch_callback is not None:
                    epoch_callback(ep, opt)
                net.train()
                perm = torch.randperm(n, generator=g).to(device)
                for i in range(0, n, B):
                    idx = perm[i:i + B]
                    x, y = x_all[idx], y_all[idx]
                    if dsa is not None:
                        x = dsa(x, g)
                    loss = loss_fn(net, x, y) if loss_fn is not None else F.cross_entropy(net(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    last = loss.detach()
            nets.append(net)
            losses.append(float(last))
        return nets, losses, time.perf_counter() - t0

    from torch.func import functional_call, stack_module_state, vmap
    nets = [build_eval_network(cfg, C, num_classes, (H, W), generator=g).to(device) for g in generators]
    R = len(nets)
    params, buffers = stack_module_state(nets)  # [R, ...] leaves; BN running stats stacked too
    base = copy.deepcopy(nets[0]).to("meta")     # structure only; every tensor is swapped in

    def run_loss(p, b, x, y):
        return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

    # BatchNorm: under vmap the stacked running_mean/var/num_batches_tracked slices are updated in
    # place per run, exactly as each network's own buffers would be (checked by the tests).
    losses_fn = vmap(run_loss)
    last = torch.full((R,), math.nan)
    opt = None
    epochs = lrs
    if progress:
        from tqdm import tqdm
        epochs = tqdm(lrs, desc=f"evaluate {cfg.model} x{R} (batched)", unit="epoch")
    base.train()
    for ep, lr in enumerate(epochs):
        if opt is None or lr != lrs[ep - 1]:
            # SGD is elementwise, so one optimizer over the stacked tensors = R separate ones
            opt = _sgd(list(params.values()), lr, cfg)
        if epoch_callback is not None:
            epoch_callback(ep, opt)
        perms = [torch.randperm(n, generator=g).to(device) for g in generators]
        for i in range(0, n, B):
            xs, ys = [], []
            for r, g in enumerate(generators):
                idx = perms[r][i:i + B]
                x = x_all[idx]
                xs.append(dsa(x, g) if dsa is not None else x)
                ys.append(y_all[idx])
            losses = losses_fn(params, buffers, torch.stack(xs), torch.stack(ys))
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()  # run r's parameters only see run r's loss
            opt.step()
            last = losses.detach()
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # hand back ordinary modules (tests, saving, sequential testing)
        for r, net in enumerate(nets):
            for k, v in net.named_parameters():
                v.copy_(params[k][r])
            for k, v in net.named_buffers():
                v.copy_(buffers[k][r])
    return nets, [float(v) for v in last.cpu()], seconds


@torch.no_grad()
def accuracies_batched(nets: Sequence[torch.nn.Module], test_set, device, batch: int = 1000) -> List[float]:
    """Top-1 accuracy (percent) of each net (same architecture), all nets in one vmapped forward."""
    from torch.func import functional_call, stack_module_state, vmap
    device = torch.device(device)
    for net in nets:
        net.eval()
    params, buffers = stack_module_state(list(nets))
    base = copy.deepcopy(nets[0]).to("meta").eval()
    fwd = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))
    correct = torch.zeros(len(nets), dtype=torch.long, device=device)
    n = len(test_set)
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n))
        x = test_set.batch(idx, device=device)
        y = test_set.labels[idx].to(device)
        correct += (fwd(params, buffers, x).argmax(2) == y).sum(1)
    return [100.0 * int(c) / n for c in correct.cpu()]


def resolve_batched(batched: Optional[bool], device, runs: int) -> Tuple[bool, str]:
    """Whether to train the runs together, and why."""
    if runs <= 1:
        return False, "a single run"
    if batched is not None:
        return bool(batched), "requested"
    dev = torch.device(device).type
    b = BATCHED_DEFAULT.get(dev, False)
    return b, f"default for {dev}"


def train_and_test(images: torch.Tensor, labels: torch.Tensor, test_set, cfg: EvalConfig, *,
                   generator: torch.Generator, device="cpu", num_classes: Optional[int] = None,
                   epoch_callback: Optional[EpochCallback] = None) -> Dict:
    """One evaluation run: a fresh network trained on (images, labels), tested on ``test_set``."""
    _check_inputs(images, test_set, cfg)
    K = num_classes or test_set.num_classes
    nets, losses, seconds = train_networks(images, labels, cfg, [generator], num_classes=K, device=device,
                                           epoch_callback=epoch_callback)
    acc = accuracy(nets[0], test_set, torch.device(device), cfg.test_batch)
    return {"accuracy": acc, "train_loss": losses[0], "train_time_s": seconds}


RunCallback = Callable[[int, Dict], None]


def evaluate_synthetic(images, labels, test_set, cfg: EvalConfig, *, seed: int = 0, device="cpu",
                       progress: bool = False, epoch_callback: Optional[EpochCallback] = None,
                       run_ids: Optional[Sequence[int]] = None, completed: Optional[Dict[int, Dict]] = None,
                       on_run: Optional[RunCallback] = None) -> Dict:
    """``cfg.runs`` independent runs; returns ``{"accuracies", "mean", "std", "network", ...}`` in percent.

    Run ``r`` uses ``torch.Generator().manual_seed(seed * 1000003 + r)`` whether the runs are
    batched or not, so the mode changes the speed, not the draws. ``run_ids`` runs only those
    runs (e.g. one process's share of a sharded evaluation): they give the same accuracies as in
    a full call.

    Resuming: ``completed`` maps run ids to the result dicts (``accuracy``, ``train_loss``,
    ``train_time_s``) of runs finished by an earlier, interrupted call with the same set, protocol
    and seed; those runs are not trained again. ``on_run(r, result)`` is called as each run
    finishes (all at the end when batched), so a caller can record them (``evaluate --json`` keeps
    them in ``JSON.partial``). Since each run draws only from its own generator, a resumed
    evaluation gives the accuracies of an uninterrupted one.
    """
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if int(labels.max()) >= test_set.num_classes or int(labels.min()) < 0:
        raise UserError(f"labels must lie in [0, {test_set.num_classes}) for dataset {test_set.name}")
    covered = int(torch.unique(labels).numel())
    if covered < test_set.num_classes:  # likely the wrong file or dataset: say so, the test still runs
        import warnings
        warnings.warn(f"datadam_fast: the synthetic set has images of {covered} of the {test_set.num_classes} classes "
                      f"of {test_set.name}; the networks cannot learn the others", UserWarning, stacklevel=2)
    if tuple(images.shape[2:]) != tuple(test_set.image_size):
        raise UserError(f"synthetic images are {tuple(images.shape[2:])} but dataset {test_set.name} "
                        f"images are {tuple(test_set.image_size)}")
    if cfg.runs < 1:
        raise UserError(f"runs must be >= 1, got {cfg.runs}")
    from ..models.networks import check_model_name
    check_model_name(cfg.model)
    _check_inputs(images, test_set, cfg)
    K = test_set.num_classes
    network = describe_eval_network(cfg, images.shape[1], K, tuple(images.shape[2:]))
    ids = list(range(cfg.runs)) if run_ids is None else [int(r) for r in run_ids]
    if not ids:
        raise UserError("run_ids: no evaluation run to do")
    done: Dict[int, Dict] = {int(r): dict(v) for r, v in (completed or {}).items() if int(r) in ids}
    todo = [r for r in ids if r not in done]
    batched, why = resolve_batched(cfg.batched, device, len(todo)) if todo else (False, "every run finished earlier")
    gens = [torch.Generator().manual_seed(seed * 1000003 + r) for r in todo]
    compiled, compiled_why = resolve_compile(cfg, int(images.shape[0]), batched) if todo else (False, why)
    loss_fn = None
    if todo and compiled:  # the template's own draws come from a generator of its own
        template = build_eval_network(cfg, images.shape[1], K, tuple(images.shape[2:]),
                                      generator=torch.Generator().manual_seed(0))
        loss_fn = CompiledTrainingLoss(template.to(device))
    if todo and batched:
        nets, losses, seconds = train_networks(images, labels, cfg, gens, num_classes=K, device=device, batched=True,
                                               epoch_callback=epoch_callback, progress=progress)
        if BATCHED_TEST.get(torch.device(device).type, False):
            accs = accuracies_batched(nets, test_set, device, cfg.test_batch)
        else:
            accs = [accuracy(net, test_set, torch.device(device), cfg.test_batch) for net in nets]
        for r, a, l in zip(todo, accs, losses):
            done[r] = {"accuracy": a, "train_loss": l, "train_time_s": seconds / len(nets)}
            if on_run is not None:
                on_run(r, done[r])
    elif todo:
        it = range(len(todo))
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc=f"evaluate {cfg.model}", unit="run", total=len(ids), initial=len(ids) - len(todo))
        for j in it:
            nets, losses, seconds = train_networks(images, labels, cfg, [gens[j]], num_classes=K, device=device,
                                                   epoch_callback=epoch_callback, loss_fn=loss_fn)
            acc = accuracy(nets[0], test_set, torch.device(device), cfg.test_batch)
            done[todo[j]] = {"accuracy": acc, "train_loss": losses[0], "train_time_s": seconds}
            if on_run is not None:
                on_run(todo[j], done[todo[j]])
    details = [done[r] for r in ids]
    accs = [d["accuracy"] for d in details]
    t = torch.tensor(accs, dtype=torch.float64)
    return {"accuracies": accs, "mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(accs) > 1 else 0.0,
            "runs": details, "model": cfg.model, "network": network, "epochs": cfg.epochs,
            "num_images": int(images.shape[0]), "batched": batched, "batched_reason": why,
            "compiled": bool(compiled and (loss_fn is None or loss_fn.failed is None)),
            "compiled_reason": loss_fn.failed if loss_fn is not None and loss_fn.failed else compiled_why,
            "resumed_runs": len(ids) - len(todo)}


# testing a frozen official network (no training): evaluation/frozen_model.py
