"""A re-implementation of the *structure* of one official ``main_DataDAM.py`` iteration.

Written from the reference notes (``../shared/reference/datadam_official.md`` §1-§2, §9), not copied
from the official code. It exists so that ``bench_iteration.py`` can time the official way of doing
an iteration next to the package's ``Distiller.step()`` on the same data and machine. What is kept,
because it is what costs time officially:

* a fresh BatchNorm ConvNet every iteration (global RNG re-seeded, PyTorch default init), train
  mode, parameters frozen;
* per class: ``batch_real`` real images picked by a permutation of the whole class, and two DSA
  calls (real, synthetic) that share one seed (Siamese), each re-creating its RNG from that seed:
  2K augmentation calls per iteration; then all classes are concatenated;
* forward hooks on every ``nn.ReLU`` in ``net.features`` that store ``output.clone()`` (the last
  ReLU is cloned too, though unused), attached and removed around each side's forward;
* one real forward (not under ``no_grad``; nothing requires grad so no graph is built), one
  synthetic forward, both computing the classifier head as the official ``(emb, logits)`` does;
* attention ``get_attention(param=1, exp=1, norm='l2')`` on ReLU blocks 0..L-2, error ``MSE_B``
  on the **CPU** (``.cpu()`` on both sides), the loss assembled in a CPU scalar;
* ``zero_grad`` / ``backward`` / SGD(lr, momentum 0.5) step on the pixels, ``loss.item()`` (the
  official loop accumulates it), ``torch.cuda.empty_cache()`` on CUDA.

What is deliberately different (no effect on cost): seeds come from a seeded generator instead of
the wall clock (``int(time.time()*1000) % 100000``), so that runs are reproducible; the DSA
transform of a call is drawn with the package's ``DSA`` from a ``torch.Generator`` seeded with the
class seed (the official ``DiffAugment`` re-seeds the global RNG before each draw) and applied to
the whole class batch, which is what the official seeded call does (every sample gets sample 0's
parameters).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from datadam_fast.models.augment import DSA, DEFAULT_STRATEGY
from datadam_fast.models.networks import default_depth, get_network

# The official seeds (clock ms) live in [0, SEED_RANGE); ours are drawn from the same range.
SEED_RANGE = 100000


def get_attention(f: torch.Tensor, exp: float = 1.0) -> torch.Tensor:
    """``get_attention(f, param=1, exp=exp, norm='l2')``: sum over channels of |f|^exp, flattened
    per sample (h then w), divided by its L2 norm (``F.normalize``, eps 1e-12)."""
    a = torch.sum(torch.abs(f) ** exp, dim=1)
    return F.normalize(a.reshape(a.shape[0], -1), p=2, dim=1)


def mse_b(real: torch.Tensor, syn: torch.Tensor, num_classes: int, batch_real: int, ipc: int) -> torch.Tensor:
    """``MSE_B``: rows are class-major; per-class means over the batch, then the *sum* of squared
    differences over classes and dimensions. Computed on the CPU, as officially (``.cpu()`` on both
    sides forces a device sync per call on a GPU)."""
    r = real.reshape(num_classes, batch_real, -1).cpu().mean(dim=1)
    s = syn.reshape(num_classes, ipc, -1).cpu().mean(dim=1)
    return torch.sum((r - s) ** 2)


class _ReluHooks:
    """Forward hooks on every ``nn.ReLU`` inside ``net.features`` storing ``output.clone()`` (the
    official hooks clone because its ReLUs are in place), in module order."""

    def __init__(self, net: nn.Module):
        self.store: Dict[str, torch.Tensor] = {}
        self.handles = []
        for name, m in net.features.named_modules():
            if isinstance(m, nn.ReLU):
                self.handles.append(m.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def fn(module, inputs, output):
            self.store[name] = output.clone()
        return fn

    def activations(self) -> List[torch.Tensor]:
        return list(self.store.values())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def official_loss(net: nn.Module, real: torch.Tensor, syn: torch.Tensor, *, num_classes: int, batch_real: int,
                  ipc: int, task_balance: float = 0.01, exp: float = 1.0) -> torch.Tensor:
    """The official loss of one iteration on already augmented, concatenated, class-major batches
    ``real`` [K*batch_real, ...] and ``syn`` [K*ipc, ...] (differentiable w.r.t. ``syn``).

    ``100 * sum_{l < L-1} MSE_B(att_l) + 100 * task_balance * MSE_B(emb)``, a CPU float32 scalar.
    """
    hooks = _ReluHooks(net)
    emb_real = net.embed_and_logits(real)[0].detach()   # official: net(x)[0].detach(), head included
    act_real = hooks.activations()
    hooks.remove()
    hooks = _ReluHooks(net)
    emb_syn = net.embed_and_logits(syn)[0]
    act_syn = hooks.activations()
    hooks.remove()
    loss = torch.tensor(0.0)                              # a CPU tensor, as officially
    for layer in range(len(act_real) - 1):               # the last ReLU block is left to the embedding
        ra = get_attention(act_real[layer].detach(), exp)
        sa = get_attention(act_syn[layer], exp)
        loss = loss + 100 * mse_b(ra, sa, num_classes, batch_real, ipc)
    loss = loss + 100 * task_balance * mse_b(emb_real, emb_syn, num_classes, batch_real, ipc)
    return loss


class OfficialIteration:
    """Holds what the official loop holds (the whole normalised train set on the device, the class
    index lists, the synthetic images and their optimiser) and runs one iteration per ``step``."""

    def __init__(self, train_set, *, ipc: int, batch_real: int, width: Optional[int] = None,
                 device="cpu", dsa: bool = True, dsa_strategy: str = DEFAULT_STRATEGY, lr_img: float = 1.0,
                 task_balance: float = 0.01, seed: int = 0, model: str = "ConvNetBN"):
        ds = train_set
        self.device = torch.device(device)
        self.K = ds.num_classes
        self.channels, self.image_size = ds.channels, tuple(ds.image_size)
        self.ipc, self.task_balance, self.model = int(ipc), float(task_balance), model
        self.width = width
        self.depth = default_depth(self.image_size)
        self.images_all = ds.normalized_all(self.device)          # NCHW: the official code has no channels_last
        self.indices_class = [ix.numpy() for ix in ds.class_indices()]
        self.batch_real = min(int(batch_real), min(len(ix) for ix in self.indices_class))
        self.rng = np.random.RandomState(seed)                   # official get_images: np.random.permutation
        self.seeds = torch.Generator().manual_seed(seed)         # stands in for the wall clock
        self.dsa = DSA(dsa_strategy) if dsa else None
        init = [self.images_all[torch.from_numpy(self.rng.permutation(ix)[:self.ipc]).to(self.device)]
                for ix in self.indices_class]                    # init 'real'
        self.image_syn = torch.cat(init).detach().clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.image_syn], lr=lr_img, momentum=0.5)

    def _seed(self) -> int:
        return int(torch.randint(0, SEED_RANGE, (1,), generator=self.seeds))

    def new_network(self) -> nn.Module:
        torch.random.manual_seed(self._seed())  # official get_network re-seeds the global RNG every call
        net = get_network(self.model, self.channels, self.K, self.image_size, width=self.width,
                          depth=self.depth).to(self.device)
        net.train()
        for p in net.parameters():
            p.requires_grad = False
        return net

    def get_images(self, c: int, n: int) -> torch.Tensor:
        idx = self.rng.permutation(self.indices_class[c])[:n]
        return self.images_all[torch.from_numpy(idx).to(self.device)]

    def diff_augment(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """One seeded official ``DiffAugment`` call: one transform, shared by the whole batch."""
        gen = torch.Generator().manual_seed(seed)
        params = self.dsa.sample(1, gen, x.device, self.image_size)
        return self.dsa.apply(x, params, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))

    def batches(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The per-class loop: sample, augment (Siamese: one seed per class for both sides), concatenate."""
        reals, syns = [], []
        for c in range(self.K):
            img_real = self.get_images(c, self.batch_real)
            img_syn = self.image_syn[c * self.ipc:(c + 1) * self.ipc]
            if self.dsa is not None:
                seed = self._seed()
                img_real = self.diff_augment(img_real, seed)
                img_syn = self.diff_augment(img_syn, seed)
            reals.append(img_real)
            syns.append(img_syn)
        return torch.cat(reals), torch.cat(syns)

    def step(self) -> float:
        net = self.new_network()
        real, syn = self.batches()
        loss = official_loss(net, real, syn, num_classes=self.K, batch_real=self.batch_real, ipc=self.ipc,
                             task_balance=self.task_balance)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        value = loss.item()                                   # official: loss_avg += loss.item()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()                          # official: every iteration
        return value
