"""The standard evaluation protocol: train fresh networks on a synthetic set, test on real data.

Follows the official ``evaluate_synset`` (``utils.py:386-453``): SGD lr 0.01, momentum 0.9,
weight decay 5e-4, cross-entropy, ``epochs + 1`` epochs with the learning rate x0.1 (optimizer
re-created, momentum reset) after epoch ``epochs // 2 + 1``, shuffled batches, non-Siamese DSA at
train time, test on the full real test set in eval mode. All randomness (init, shuffling, DSA)
comes from a seeded ``torch.Generator``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .errors import UserError


@dataclass
class EvalConfig:
    model: str = "ConvNet"
    epochs: int = 300
    runs: int = 3
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    norm: Optional[str] = None  # override the model's normalisation layer
    width: Optional[int] = None  # override a ConvNet's width
    test_batch: int = 1000


def _to_int_labels(labels, n: int, where: str) -> torch.Tensor:
    lab = torch.as_tensor(labels)
    if lab.dim() != 1 or lab.shape[0] != n:
        raise UserError(f"{where}: labels must be a 1-d sequence of {n} class indices, got shape {tuple(lab.shape)}")
    if lab.is_floating_point():
        if not torch.equal(lab, lab.round()):
            raise UserError(f"{where}: labels must be whole numbers (hard labels)")
    return lab.long()


def _load_file(path: str, what: str):
    """``torch.load`` with tensors-only unpickling; any failure is a one-line UserError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except Exception as e:
        raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {str(e)[:200]}") from None


def load_synthetic(path: str) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Read a synthetic set: ours (``{"images", "labels", ...}``), the official release
    (``{"data": [images, labels]}``) or the official ``res_*.pt`` (``{"data": [[images, labels], ...]}``,
    last entry). Returns float32 images [N,C,H,W] (normalised space), int64 labels and metadata."""
    obj = _load_file(path, "synthetic set")
    meta: Dict = {}
    if isinstance(obj, dict) and "images" in obj and "labels" in obj:
        images, labels = obj["images"], obj["labels"]
        meta = {k: v for k, v in obj.items() if k not in ("images", "labels")}
    elif isinstance(obj, dict) and "data" in obj:
        data = obj["data"]
        if isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple)):
            data = data[-1]  # res_DataDAM_*.pt keeps one [images, labels] per eval point
        if not (isinstance(data, (list, tuple)) and len(data) == 2):
            raise UserError(f"{path}: expected {{'data': [images, labels]}} (official format)")
        images, labels = data
        meta = {"format": "official"}
    else:
        raise UserError(f"{path}: expected a dict with 'images' and 'labels' (datadam-fast) or "
                        f"'data': [images, labels] (official DataDAM release)")
    images = torch.as_tensor(images)
    if images.dim() != 4 or not images.is_floating_point():
        raise UserError(f"{path}: images must be a float [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
    labels = _to_int_labels(labels, images.shape[0], path)
    return images.float(), labels, meta


def load_frozen_model(path: str):
    """Read an official ``{"net_parameters": state_dict}`` file (a plain state_dict is accepted too)."""
    obj = _load_file(path, "frozen model")
    if isinstance(obj, dict) and "net_parameters" in obj:
        obj = obj["net_parameters"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected {{'net_parameters': state_dict}}")
    return obj


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


def train_and_test(images: torch.Tensor, labels: torch.Tensor, test_set, cfg: EvalConfig, *,
                   generator: torch.Generator, device="cpu", num_classes: Optional[int] = None) -> Dict:
    """One evaluation run: a fresh network trained on (images, labels), tested on ``test_set``."""
    from .augment import DSA
    from .networks import get_network
    device = torch.device(device)
    K = num_classes or test_set.num_classes
    C, H, W = images.shape[1:]
    if C != test_set.channels:
        raise UserError(f"synthetic images have {C} channels but dataset {test_set.name} has {test_set.channels}")
    kw = {k: v for k, v in (("norm", cfg.norm), ("width", cfg.width)) if v is not None}
    net = get_network(cfg.model, C, K, (H, W), generator=generator, **kw).to(device)
    x_all, y_all = images.to(device), labels.to(device)
    dsa = DSA(cfg.dsa_strategy) if cfg.dsa else None
    lr = cfg.lr
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    decay_at = cfg.epochs // 2 + 1
    n = x_all.shape[0]
    t0 = time.time()
    last_loss = math.nan
    for ep in range(cfg.epochs + 1):
        if ep == decay_at:
            lr *= 0.1
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        net.train()
        perm = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            x, y = x_all[idx], y_all[idx]
            if dsa is not None:
                x = dsa(x, generator)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last_loss = float(loss.detach())
    train_time = time.time() - t0
    acc = accuracy(net, test_set, device, cfg.test_batch)
    return {"accuracy": acc, "train_loss": last_loss, "train_time_s": train_time}


def evaluate_synthetic(images, labels, test_set, cfg: EvalConfig, *, seed: int = 0, device="cpu",
                       progress: bool = False, run_ids: Optional[List[int]] = None) -> Dict:
    """``cfg.runs`` independent runs; returns ``{"accuracies", "mean", "std", ...}`` in percent.

    Run ``r`` is seeded by ``(seed, r)`` alone; ``run_ids`` runs only those (e.g. this process's
    share of a sharded evaluation), which then give the same accuracies as in a full call."""
    if images.shape[0] != labels.shape[0]:
        raise UserError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if int(labels.max()) >= test_set.num_classes or int(labels.min()) < 0:
        raise UserError(f"labels must lie in [0, {test_set.num_classes}) for dataset {test_set.name}")
    if tuple(images.shape[2:]) != tuple(test_set.image_size):
        raise UserError(f"synthetic images are {tuple(images.shape[2:])} but dataset {test_set.name} "
                        f"images are {tuple(test_set.image_size)}")
    from .distill import check_model_name
    check_model_name(cfg.model)
    accs: List[float] = []
    details = []
    it = range(cfg.runs) if run_ids is None else list(run_ids)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"evaluate {cfg.model}", unit="run")
    for r in it:
        g = torch.Generator().manual_seed(seed * 1000003 + r)
        res = train_and_test(images, labels, test_set, cfg, generator=g, device=device)
        accs.append(res["accuracy"])
        details.append(res)
    t = torch.tensor(accs, dtype=torch.float64)
    return {"accuracies": accs, "mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(accs) > 1 else 0.0,
            "runs": details, "model": cfg.model, "epochs": cfg.epochs, "num_images": int(images.shape[0])}


def frozen_model_accuracy(state_dict, test_set, *, model: str = "ConvNetBN", device="cpu", batch: int = 1000) -> float:
    """Like the official ``distill_test_model.py``: load the frozen net and test it (no training)."""
    from .networks import get_network, load_official_state_dict
    H, W = test_set.image_size
    net = get_network(model, test_set.channels, test_set.num_classes, (H, W))
    try:
        load_official_state_dict(net, state_dict)
    except RuntimeError as e:
        raise UserError(f"frozen model does not fit {model} for {test_set.name}: {str(e).splitlines()[0]}") from None
    return accuracy(net.to(device), test_set, torch.device(device), batch)
