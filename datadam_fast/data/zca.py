"""ZCA whitening as the official code's ``--zca`` option (kornia ``ZCAWhitening(eps=0.1, compute_inv=True)``).

Formula (kornia ``zca_mean``, its defaults ``dim=0, unbiased=True``): the images, normalised as
usual, are flattened to ``X`` [N, D] (D = C*H*W, channel-major); ``mu`` is the mean row;
``Sigma = (X - mu)^T (X - mu) / (N - 1)`` (kornia divides by N - 1, its ``unbiased=True``
default); ``Sigma = U diag(S) U^T`` (kornia takes the SVD of the symmetric ``Sigma``, which for a
positive semi-definite matrix is this eigendecomposition); the transform is
``T = U diag(1 / sqrt(S + eps)) U^T`` with inverse ``T^-1 = U diag(sqrt(S + eps)) U^T``; an image
``x`` maps to ``(x - mu) T`` and back by ``y T^-1 + mu``.

Here the covariance is accumulated in float64 over chunks of rows (so a memory-mapped training
set is never read whole), decomposed with ``torch.linalg.eigh`` in float64, and the eigenvectors
are kept in float32: the run, the recorded ``synthetic.pt`` and ``evaluate`` all rebuild ``T`` and
``T^-1`` from the same float32 ``U`` and float64 ``S``, so they apply the identical transform.
Whitening needs a D x D matrix: refused above :data:`MAX_FEATURES` features.

Official quirk, not reproduced: ``main_DataDAM.py`` whitens the real data in ``get_dataset`` and
initialises the synthetic set from those whitened images, then whitens the synthetic set once
more with a transform re-fitted on the synthetic images themselves (``include_fit=True``), so
its synthetic set starts in a different space from the real images it is matched to. Here the
synthetic set is initialised from (or as noise in) the whitened space of the real data and stays
there: real training images, synthetic images and test images all go through the one transform
fitted on the training set.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..errors import UserError

EPS = 0.1                 # the official code's ZCAWhitening(eps=0.1)
MAX_FEATURES = 16384      # 64x64 RGB (12288) fits; a D x D float64 covariance is 2 GB at the limit
FORMAT = "datadam_fast.data.zca/1"


def check_features(shape) -> int:
    C, H, W = (int(s) for s in shape)
    D = C * H * W
    if D > MAX_FEATURES:
        raise UserError(f"ZCA whitening of {C}x{H}x{W} images = {D} features needs a {D}x{D} covariance "
                        f"({D * D * 8 / 2 ** 30:.1f} GB in float64) and its eigendecomposition; refused above "
                        f"{MAX_FEATURES} features (3x64x64 = 12288 fits); drop --zca for this dataset")
    return D


def zca_matrices(eigvecs: torch.Tensor, eigvals: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(T, T^-1)`` in float64 from ``U`` and ``S``: ``U diag((S + eps)^-1/2) U^T`` and ``U diag((S + eps)^1/2) U^T``."""
    U = eigvecs.double()
    s = eigvals.double().clamp_min(0) + eps
    return (U * s.rsqrt()) @ U.T, (U * s.sqrt()) @ U.T


class ZCA:
    """A fitted ZCA transform: :meth:`apply` whitens normalised images, :meth:`invert` undoes it."""

    def __init__(self, mean: torch.Tensor, eigvecs: torch.Tensor, eigvals: torch.Tensor, eps: float, shape):
        self.shape = tuple(int(s) for s in shape)
        D = check_features(self.shape)
        if tuple(mean.shape) != (D,) or tuple(eigvecs.shape) != (D, D) or tuple(eigvals.shape) != (D,):
            raise UserError(f"ZCA: mean {tuple(mean.shape)}, eigenvectors {tuple(eigvecs.shape)} and eigenvalues "
                            f"{tuple(eigvals.shape)} do not fit images of shape {self.shape} ({D} features)")
        self.mean = mean.detach().to("cpu", torch.float32).contiguous()
        self.eigvecs = eigvecs.detach().to("cpu", torch.float32).contiguous()
        self.eigvals = eigvals.detach().to("cpu", torch.float64).contiguous()
        self.eps = float(eps)
        T, T_inv = zca_matrices(self.eigvecs, self.eigvals, self.eps)
        self.transform = T.float()
        self.inverse = T_inv.float()
        self._on: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _mats(self, device):
        key = str(torch.device(device))
        if key not in self._on:
            self._on[key] = (self.mean.to(device), self.transform.to(device), self.inverse.to(device))
        return self._on[key]

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise UserError(f"ZCA fitted on images of shape {self.shape}, got a batch of {tuple(x.shape)}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten normalised images [N, C, H, W]: ``(x - mu) T`` (float32, same shape and device)."""
        self._check(x)
        mu, T, _ = self._mats(x.device)
        flat = x.reshape(x.shape[0], -1).float() - mu
        return (flat @ T).reshape(x.shape)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """Back from whitened to normalised images: ``y T^-1 + mu``."""
        self._check(x)
        mu, _, T_inv = self._mats(x.device)
        flat = x.reshape(x.shape[0], -1).float()
        return torch.addmm(mu, flat, T_inv).reshape(x.shape)

    def state(self) -> Dict:
        """What ``synthetic.pt`` records (tensors, numbers and lists only: ``weights_only`` loads it)."""
        return {"format": FORMAT, "mean": self.mean, "eigvecs": self.eigvecs, "eigvals": self.eigvals,
                "eps": self.eps, "shape": list(self.shape)}

    @classmethod
    def from_state(cls, st: Dict) -> "ZCA":
        if not isinstance(st, dict) or st.get("format") != FORMAT:
            raise UserError(f"recorded ZCA transform: expected a {FORMAT} dict")
        return cls(st["mean"], st["eigvecs"], st["eigvals"], st["eps"], st["shape"])


def fit_zca(dataset, eps: float = EPS, device="cpu", chunk_bytes: int = 256 * 2 ** 20) -> ZCA:
    """Fit on every image of ``dataset`` (normalised rows, read ``chunk_bytes`` at a time)."""
    shape = (dataset.channels, *dataset.image_size)
    D = check_features(shape)
    N = len(dataset)
    if N < 2:
        raise UserError(f"ZCA needs at least 2 training images, {dataset.name} has {N}")
    device = torch.device(device)
    rows = max(1, chunk_bytes // (D * 8))
    total = torch.zeros(D, dtype=torch.float64, device=device)
    gram = torch.zeros(D, D, dtype=torch.float64, device=device)
    # Shift by the first chunk's mean before accumulating: the centred Gram matrix is then
    # formed from small numbers, which keeps float64 cancellation negligible.
    shift = None
    for a in range(0, N, rows):
        x = dataset.batch(torch.arange(a, min(a + rows, N)), device=device).reshape(-1, D).double()
        if shift is None:
            shift = x.mean(0)
        x = x - shift
        total += x.sum(0)
        gram.addmm_(x.T, x)
    m = total / N
    cov = (gram - N * torch.outer(m, m)) / (N - 1)
    cov = (cov + cov.T) / 2
    S, U = torch.linalg.eigh(cov)
    return ZCA((m + shift).float(), U.float(), S, eps, shape)


class WhitenedDataset:
    """A dataset whose normalised images come out whitened (every other attribute is the wrapped
    dataset's): ``batch``, ``normalize_uint8``, ``normalized_all`` and ``sample`` whiten,
    ``denormalize`` inverts the whitening first (grids, image exports)."""

    def __init__(self, base, zca: ZCA):
        if tuple((base.channels, *base.image_size)) != zca.shape:
            raise UserError(f"ZCA fitted on {zca.shape} images cannot whiten {base.name} "
                            f"({base.channels}x{base.image_size[0]}x{base.image_size[1]})")
        self.base = base
        self.zca = zca

    def __getattr__(self, name):
        if name in ("base", "zca"):  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.base, name)

    def __len__(self) -> int:
        return len(self.base)

    def __repr__(self) -> str:
        return f"Whitened({self.base!r}, eps={self.zca.eps})"

    def _white(self, x: torch.Tensor, dtype) -> torch.Tensor:
        out = self.zca.apply(x)
        return out if out.dtype == dtype else out.to(dtype)

    def batch(self, indices, device="cpu", dtype=torch.float32) -> torch.Tensor:
        return self._white(self.base.batch(indices, device=device), dtype)

    def normalize_uint8(self, x: torch.Tensor, device=None, dtype=torch.float32) -> torch.Tensor:
        return self._white(self.base.normalize_uint8(x, device=device), dtype)

    def normalized_all(self, device="cpu", dtype=torch.float32) -> torch.Tensor:
        x = self.base.normalized_all(device=device)
        step = max(1, (64 * 2 ** 20) // max(x[0].numel() * 4, 1))
        for a in range(0, x.shape[0], step):
            x[a:a + step] = self.zca.apply(x[a:a + step])
        return x if x.dtype == dtype else x.to(dtype)

    def sample(self, c: int, n: int, generator: Optional[torch.Generator] = None, device="cpu",
               dtype=torch.float32) -> torch.Tensor:
        return self._white(self.base.sample(c, n, generator=generator, device=device), dtype)

    def __getitem__(self, i: int):
        return self.batch([int(i)])[0], int(self.base.labels[int(i)])

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        single = x.dim() == 3
        y = self.zca.invert(x.unsqueeze(0) if single else x)
        return self.base.denormalize(y[0] if single else y)


def whiten_train_set(dataset, device="cpu", eps: float = EPS) -> WhitenedDataset:
    if isinstance(dataset, WhitenedDataset):
        return dataset
    return WhitenedDataset(dataset, fit_zca(dataset, eps=eps, device=device))


def whiten_like(dataset, recorded) -> object:
    """``dataset`` through a recorded transform (a ``ZCA``, its ``state()``, or None = unchanged)."""
    if recorded is None:
        return dataset
    zca = recorded if isinstance(recorded, ZCA) else ZCA.from_state(recorded)
    return WhitenedDataset(dataset.base if isinstance(dataset, WhitenedDataset) else dataset, zca)


__all__ = ["EPS", "MAX_FEATURES", "ZCA", "fit_zca", "zca_matrices", "WhitenedDataset", "whiten_train_set",
           "whiten_like", "check_features"]
