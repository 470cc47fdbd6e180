"""Core types shared by every reader: :class:`DatasetError`, :class:`ImageDataset`, constants."""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import UserError

__all__ = ["DatasetError", "ImageDataset", "default_data_root", "IMAGENET_MEAN", "IMAGENET_STD",
           "resize_uint8", "channel_stats"]

# Normalisation constants of the official code (DataDAM/DC `utils.get_dataset`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(UserError):
    """Every user-facing data problem: unknown name/option, missing, corrupt or malformed file.

    The message is a single line (the CLI prints it and exits with status 2)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def default_data_root() -> Path:
    """``$DATADAM_FAST_DATA`` if set (and non-empty), else ``~/.cache/datadam_fast/data``."""
    env = os.environ.get("DATADAM_FAST_DATA", "").strip()
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/datadam_fast/data").expanduser()


IndexLike = Union[torch.Tensor, np.ndarray, Sequence[int], slice, range]


class ImageDataset:
    """A labelled set of uint8 NCHW images plus its normalisation.

    ``images`` is a ``torch.Tensor`` (uint8, [N, C, H, W]) for data held in memory, or a
    read-only ``numpy.memmap`` of the same shape for packed data (see ``pack_image_folder``);
    ``labels`` is always a ``torch.int64`` tensor [N]. Normalised values are
    ``(x / 255 - mean) / std`` per channel, as in the official code.
    """

    def __init__(self, name: str, images, labels, class_names: Sequence[str],
                 mean: Sequence[float], std: Sequence[float], split: str = "train",
                 source: Optional[Union[str, Path]] = None):
        if isinstance(images, np.ndarray) and not isinstance(images, np.memmap):
            images = torch.from_numpy(np.ascontiguousarray(images))
        is_u8 = (images.dtype == np.uint8) if isinstance(images, np.ndarray) else (
            images.dtype == torch.uint8)
        if images.ndim != 4 or not is_u8:
            raise DatasetError(f"{name}: images must be uint8 [N, C, H, W], got "
                               f"{tuple(images.shape)} {images.dtype}")
        labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor)
                                 else labels).to(torch.int64).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise DatasetError(f"{name}: {images.shape[0]} images but {labels.numel()} labels")
        self.name = name
        self.split = split
        self.source = None if source is None else str(source)
        self.images = images
        self.labels = labels
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise DatasetError(f"{name}: labels outside 0..{self.num_classes - 1}")
        self.channels = int(images.shape[1])
        self.image_size = (int(images.shape[2]), int(images.shape[3]))
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) == 1 and self.channels > 1:
            mean = mean * self.channels
        if len(std) == 1 and self.channels > 1:
            std = std * self.channels
        if len(mean) != self.channels or len(std) != self.channels or min(std) <= 0:
            raise DatasetError(f"{name}: mean/std must have {self.channels} entries (std > 0), "
                               f"got {mean} / {std}")
        self.mean, self.std = mean, std
        self._class_indices: Optional[List[torch.Tensor]] = None
        self._affine_cache = {}

    # ------------------------------------------------------------------ basic info
    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def is_memmap(self) -> bool:
        return isinstance(self.images, np.ndarray)

    def __repr__(self) -> str:
        kind = "memmap" if self.is_memmap else f"tensor@{self.images.device}"
        return (f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"classes={self.num_classes}, shape={self.channels}x{self.image_size[0]}x"
                f"{self.image_size[1]}, images={kind})")

    def counts(self) -> List[int]:
        """Number of images per class, as a list of ``num_classes`` ints."""
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes).tolist()

    def class_indices(self) -> List[torch.Tensor]:
        """Indices (int64, ascending) of each class's images; computed once and cached."""
        if self._class_indices is None:
            labels = self.labels
            order = torch.argsort(labels, stable=True)
            counts = torch.bincount(labels, minlength=self.num_classes).tolist()
            self._class_indices = list(torch.split(order, counts))
        return self._class_indices

    # ------------------------------------------------------------------ normalisation
    def _affine(self, device, dtype):
        """Per-channel (scale, shift) so that normalised = x_uint8 * scale + shift."""
        key = (str(device), dtype)
        if key not in self._affine_cache:
            std = torch.tensor(self.std, dtype=torch.float64)
            mean = torch.tensor(self.mean, dtype=torch.float64)
            scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
            shift = (-mean / std).view(1, -1, 1, 1)
            self._affine_cache[key] = (scale.to(device=device, dtype=dtype),
                                       shift.to(device=device, dtype=dtype))
        return self._affine_cache[key]

    def rows_uint8(self, indices: IndexLike) -> torch.Tensor:
        """The uint8 rows selected by ``indices`` as a tensor (on the images' device)."""
        if isinstance(indices, slice):
            indices = range(*indices.indices(len(self)))
        if self.is_memmap:
            idx = (indices.cpu().numpy() if isinstance(indices, torch.Tensor)
                   else np.asarray(indices)).astype(np.int64).reshape(-1)
            if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
                raise IndexError(f"index out of range for dataset of size {len(self)}")
            idx = np.where(idx < 0, idx + len(self), idx)
            return torch.from_numpy(_read_rows(self.images, idx))
        idx = torch.as_tensor(indices if not isinstance(indices, range) else list(indices),
                              dtype=torch.int64).reshape(-1).to(self.images.device)
        return self.images.index_select(0, idx)

    def normalize_uint8(self, x: torch.Tensor, device=None, dtype=torch.float32) -> torch.Tensor:
        """Normalise a uint8 [B, C, H, W] tensor: ``(x / 255 - mean) / std``."""
        device = x.device if device is None else torch.device(device)
        x = x.to(device, non_blocking=True)
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        scale, shift = self._affine(device, work)
        out = torch.addcmul(shift, x.to(work), scale)
        return out if work == dtype else out.to(dtype)

    def batch(self, indices: IndexLike, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """Normalised float images of the rows ``indices`` (a LongTensor, array, list or slice)."""
        return self.normalize_uint8(self.rows_uint8(indices), device=device, dtype=dtype)

    def normalized_all(self, device="cpu", dtype=torch.float32) -> torch.Tensor:
        """The whole set normalised, [N, C, H, W] (meant for small sets)."""
        if self.is_memmap:
            rows = torch.from_numpy(np.array(self.images))
        else:
            rows = self.images
        return self.normalize_uint8(rows, device=device, dtype=dtype)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map normalised images back to [0, 1] (clamped), e.g. for saving synthetic images."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        if x.ndim == 3:
            return (x * std[0] + mean[0]).clamp(0, 1)
        return (x * std + mean).clamp(0, 1)

    def sample(self, c: int, n: int, generator: Optional[torch.Generator] = None,
               device="cpu", dtype=torch.float32) -> torch.Tensor:
        """``n`` random images of class ``c`` (without replacement; fewer if the class is
        smaller), normalised — the official ``get_images(c, n)``."""
        idx = self.class_indices()[c]
        perm = torch.randperm(idx.numel(), generator=generator, device="cpu")[:n]
        return self.batch(idx.cpu()[perm], device=device, dtype=dtype)

    # ------------------------------------------------------------------ misc
    def __getitem__(self, i: int):
        """``(normalised image [C, H, W], label)`` — enough for a ``torch.utils.data.DataLoader``."""
        return self.batch([int(i)])[0], int(self.labels[int(i)])

    def to(self, device) -> "ImageDataset":
        """Move the uint8 images and the labels to ``device`` (in place; a memmap is read into
        memory). ``batch`` then gathers and normalises on that device. Returns ``self``."""
        device = torch.device(device)
        imgs = torch.from_numpy(np.array(self.images)) if self.is_memmap else self.images
        self.images = imgs.to(device)
        self.labels = self.labels.to(device)
        self._class_indices = None
        return self

    def data_stats(self, chunk: int = 8192) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """Per-channel mean and (population) std of ``x / 255`` over the whole set."""
        return channel_stats(self.images, chunk=chunk)


def _read_rows(images: np.memmap, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of a memory-mapped uint8 array, read with ``pread`` from its file.

    Reading through the mapping would map every touched page into this process: over an
    ImageNet-size file the resident set then grows with each random batch until it holds most of
    the file, which defeats a memory budget. ``pread`` goes through the page cache instead
    (cached, but not resident in this process). Rows are read in file order, runs of adjacent
    rows in one call, and put back in the requested order.
    """
    row = int(np.prod(images.shape[1:]))
    out = np.empty((idx.size,) + tuple(images.shape[1:]), dtype=np.uint8)
    filename = getattr(images, "filename", None)
    # only the mapping itself (not a view into it) has ``offset`` pointing at its first row
    if not (isinstance(getattr(images, "base", None), mmap.mmap) and images.flags.c_contiguous):
        filename = None
    if not idx.size or filename is None:
        if idx.size:
            out[...] = images[idx]
        return out
    flat = out.reshape(idx.size, row)
    order = np.argsort(idx, kind="stable")
    srt = idx[order]
    base = int(getattr(images, "offset", 0))
    fd = os.open(filename, os.O_RDONLY)
    try:
        i = 0
        n = srt.size
        while i < n:
            j = i + 1
            while j < n and srt[j] == srt[j - 1] + 1:  # a run of consecutive rows: one read
                j += 1
            buf = os.pread(fd, (j - i) * row, base + int(srt[i]) * row)
            if len(buf) != (j - i) * row:
                raise DatasetError(f"{filename}: short read at row {int(srt[i])} (file truncated?)")
            flat[order[i:j]] = np.frombuffer(buf, np.uint8).reshape(j - i, row)
            i = j
    finally:
        os.close(fd)
    return out


def channel_stats(images, chunk: int = 8192) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and population std of ``images / 255`` (uint8 NCHW; tensor or array),
    accumulated in float64 over chunks of rows."""
    n, c = int(images.shape[0]), int(images.shape[1])
    s = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    for i in range(0, n, chunk):
        part = images[i:i + chunk]
        part = part.cpu().numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
        part = part.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
        s += part.sum(1)
        s2 += np.square(part).sum(1)
    count = max(n * int(images.shape[2]) * int(images.shape[3]), 1)
    mean = s / count
    var = np.maximum(s2 / count - mean ** 2, 0.0)
    return tuple(float(m) / 255.0 for m in mean), tuple(float(v) / 255.0 for v in np.sqrt(var))


def resize_uint8(images: torch.Tensor, size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of uint8 NCHW images to ``size``."""
    hw = (int(size), int(size)) if not isinstance(size, (tuple, list)) else tuple(int(s) for s in size)
    if tuple(images.shape[-2:]) == hw:
        return images
    out = torch.empty((images.shape[0], images.shape[1]) + hw, dtype=torch.uint8)
    for i in range(0, images.shape[0], 4096):
        part = images[i:i + 4096].float()
        part = torch.nn.functional.interpolate(part, size=hw, mode="bilinear", align_corners=False,
                                               antialias=True)
        out[i:i + 4096] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def as_size(value, what: str = "size") -> Optional[Tuple[int, int]]:
    """Parse a size option (int, "N", "HxW", or a pair) into (H, W); None stays None."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            parts = value.lower().replace(",", "x").split("x")
            hw = tuple(int(p) for p in parts)
        elif isinstance(value, (tuple, list)):
            hw = tuple(int(p) for p in value)
        else:
            hw = (int(value),)
        if len(hw) == 1:
            hw = hw * 2
        if len(hw) != 2 or min(hw) <= 0:
            raise ValueError
    except (TypeError, ValueError):
        raise DatasetError(f"invalid {what} {value!r}: expected a positive int or HxW") from None
    return hw


def first_existing(candidates: Iterable[Path]) -> Optional[Path]:
    for c in candidates:
        if c.exists():
            return c
    return None
