"""A re-implementation of the *structure* of one official NCFM iteration (``gszfwsb/NCFM``:
``condenser/compute_loss.py`` ``compute_match_loss`` with ``NCFM/NCFM.py`` ``match_loss`` and
``CFLossFunc``), written from the published code's structure, not copied from it. It exists so
that ``bench_ncfm_iteration.py`` can time NCFM's own way of doing an iteration next to the
package's ``Distiller.step()`` (``--method ncfm``) on the same data, network and batch sizes.

What is kept, because it is what costs time in NCFM's loop:

* per class ``c``: ``batch_real`` real images of the class and the class's synthetic images, one
  DSA call on their concatenation (``aug_fn(torch.cat([img, img_syn]))``);
* ``match_loss``: the real embeddings under ``no_grad``, the synthetic ones with a graph, both
  L2-normalised; a fresh ``t = randn(num_freqs, D)`` on the device; ``CFLossFunc`` forms
  ``torch.matmul(t, feat.t())`` **twice per side** (once for the real part, once for the imaginary
  part: the ``[F, B]`` projection is materialised four times), then the amplitude / phase loss x 300;
* ``loss.item()`` per class (a host sync), ``optim_img.zero_grad()``, ``loss.backward()``,
  ``optim_img.step()`` per class: K backward passes and K AdamW steps per iteration.

What is the same as the package's run (no effect on the comparison of structure): the network of
the iteration is a freshly initialised ConvNet (NCFM samples a pretrained one from a pool; the cost
of a forward does not depend on the weights), DSA comes from the package's ``DSA`` seeded per
class, and the sampling network is off (NCFM's ``sampling_net: False`` configs).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from datadam_fast.models.augment import DSA, DEFAULT_STRATEGY
from datadam_fast.models.networks import default_depth, get_network


def calculate_norm(x_r, x_i):
    return torch.sqrt(x_r * x_r + x_i * x_i)


def cf_loss(feat_tg: torch.Tensor, feat: torch.Tensor, t: torch.Tensor, alpha: float = 0.5,
            beta: float = 0.5) -> torch.Tensor:
    """``CFLossFunc.forward`` as structured in NCFM (four ``[F, B]`` matmuls)."""
    t_x_real = torch.cos(torch.matmul(t, feat.t())).mean(dim=1)
    t_x_imag = torch.sin(torch.matmul(t, feat.t())).mean(dim=1)
    t_x_norm = calculate_norm(t_x_real, t_x_imag)
    t_target_real = torch.cos(torch.matmul(t, feat_tg.t())).mean(dim=1)
    t_target_imag = torch.sin(torch.matmul(t, feat_tg.t())).mean(dim=1)
    t_target_norm = calculate_norm(t_target_real, t_target_imag)
    amp_diff = t_target_norm - t_x_norm
    loss_amp = amp_diff * amp_diff
    loss_pha = (2 * (t_target_norm * t_x_norm - t_x_real * t_target_real - t_x_imag * t_target_imag)).clamp(min=1e-12)
    return torch.mean(torch.sqrt(alpha * loss_amp + beta * loss_pha))


class OfficialNCFMIteration:
    """The whole normalised train set on the device, the class index lists, the synthetic images
    and their AdamW; one iteration per :meth:`step`."""

    def __init__(self, train_set, *, ipc: int, batch_real: int, num_freqs: int = 4096, width: Optional[int] = None,
                 device="cpu", dsa: bool = True, dsa_strategy: str = DEFAULT_STRATEGY, lr_img: float = 1e-3,
                 seed: int = 0, model: str = "ConvNet"):
        ds = train_set
        self.device = torch.device(device)
        self.K = ds.num_classes
        self.channels, self.image_size = ds.channels, tuple(ds.image_size)
        self.ipc, self.num_freqs, self.model, self.width = int(ipc), int(num_freqs), model, width
        self.depth = default_depth(self.image_size)
        self.images_all = ds.normalized_all(self.device)
        self.indices_class = [ix.numpy() for ix in ds.class_indices()]
        self.batch_real = min(int(batch_real), min(len(ix) for ix in self.indices_class))
        self.rng = np.random.RandomState(seed)
        self.seeds = torch.Generator().manual_seed(seed)
        self.dsa = DSA(dsa_strategy) if dsa else None
        init = [self.images_all[torch.from_numpy(self.rng.permutation(ix)[:self.ipc]).to(self.device)]
                for ix in self.indices_class]
        self.image_syn = torch.cat(init).detach().clone().requires_grad_(True)
        self.opt = torch.optim.AdamW([self.image_syn], lr=lr_img, weight_decay=0.01)

    def new_network(self):
        torch.random.manual_seed(int(torch.randint(0, 100000, (1,), generator=self.seeds)))
        net = get_network(self.model, self.channels, self.K, self.image_size, width=self.width,
                          depth=self.depth).to(self.device)
        for p in net.parameters():
            p.requires_grad = False
        return net

    def step(self) -> float:
        net = self.new_network()
        total = 0.0
        for c in range(self.K):
            idx = self.rng.permutation(self.indices_class[c])[:self.batch_real]
            img = self.images_all[torch.from_numpy(idx).to(self.device)]
            img_syn = self.image_syn[c * self.ipc:(c + 1) * self.ipc]
            both = torch.cat([img, img_syn])
            if self.dsa is not None:
                gen = torch.Generator().manual_seed(int(torch.randint(0, 100000, (1,), generator=self.seeds)))
                params = self.dsa.sample(1, gen, both.device, self.image_size)
                both = self.dsa.apply(both, params, torch.zeros(both.shape[0], dtype=torch.long, device=both.device))
            n = img.shape[0]
            with torch.no_grad():
                feat_tg = net.embed(both[:n])
            feat = net.embed(both[n:])
            feat = F.normalize(feat, dim=1)
            feat_tg = F.normalize(feat_tg, dim=1)
            t = torch.randn((self.num_freqs, feat.size(1)), device=feat.device)
            loss = 300 * cf_loss(feat_tg, feat, t)
            total += loss.item()                              # per class: a host sync
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()                                   # per class
        return total
