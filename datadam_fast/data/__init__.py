"""Datasets for distillation: uint8 images in memory (or memory-mapped) plus normalisation.

    from datadam_fast.data import load_dataset
    ds = load_dataset("cifar10", root=None, split="train", download=False)
    x = ds.batch(ds.class_indices()[3][:64], device="cuda")   # normalised float32 NCHW

``root`` defaults to :func:`default_data_root` (``$DATADAM_FAST_DATA`` or
``~/.cache/datadam_fast/data``). Expected layouts under ``root`` (the first is where
``download=True`` writes):

=============  ===============================================================================
digits         none: scikit-learn's bundled copy (8x8, fixed stratified 80/20 split)
mnist          ``mnist/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` or ``MNIST/raw/``
fashion_mnist  same file names in ``fashion_mnist/raw/`` or ``FashionMNIST/raw/``
cifar10        ``cifar10/cifar-10-batches-py/`` or ``cifar-10-batches-py/`` (or the .tar.gz)
cifar100       ``cifar100/cifar-100-python/`` or ``cifar-100-python/`` (fine labels)
tinyimagenet   ``tinyimagenet/tiny-imagenet-200/`` or ``tiny-imagenet-200/`` (decoded cache)
imagenet64     ``imagenet64/{train_data_batch_1..10,val_data}.npz`` (packed to a memmap)
folder         ``path=``: ``<path>/<class>/*.jpg``, ``<path>/{train,val|test}/<class>/``, or a
               packed folder made by :func:`pack_image_folder`
=============  ===============================================================================

Splits: ``"train"`` and ``"test"`` (``"val"`` is a synonym: Tiny ImageNet's and ImageNet's val
sets are their test sets). Normalisation ``(x / 255 - mean) / std`` uses the official
DataDAM/DC constants (MNIST, CIFAR, ImageNet-style sets); see each module for the others.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ._base import (IMAGENET_MEAN, IMAGENET_STD, DatasetError, ImageDataset, as_size,
                    channel_stats, default_data_root, resize_uint8)
from ._download import download_file, md5sum
from ._folder import decode_image, pack_image_folder, scan_image_folder
from ._packed import load_packed

__all__ = ["load_dataset", "DATASET_NAMES", "default_data_root", "DatasetError", "ImageDataset",
           "pack_image_folder", "load_packed", "canonical_name", "channel_stats",
           "IMAGENET_MEAN", "IMAGENET_STD", "download_file", "md5sum", "DOWNLOADABLE"]

DATASET_NAMES = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "tinyimagenet",
                 "imagenet64", "folder")
#: the datasets that decode their images once into a cache (``cache_dir=``, --cache-dir, $DATADAM_FAST_CACHE)
CACHED_DATASETS = ("tinyimagenet", "imagenet64")
DOWNLOADABLE = ("mnist", "fashion_mnist", "cifar10", "cifar100")

_ALIASES = {
    "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist", "fashion": "fashion_mnist",
    "cifar_10": "cifar10", "cifar_100": "cifar100", "tiny_imagenet": "tinyimagenet",
    "tiny": "tinyimagenet", "tiny_imagenet_200": "tinyimagenet", "imagenet_64": "imagenet64",
    "imagenet64x64": "imagenet64", "imagefolder": "folder", "image_folder": "folder",
    "packed": "folder", "sklearn_digits": "digits",
}

# Accepted by every dataset ("workers" only matters where images are decoded).
_COMMON = {"size", "mean", "std", "progress", "workers"}
_OPTIONS = {
    "digits": _COMMON,
    "mnist": _COMMON,
    "fashion_mnist": _COMMON,
    "cifar10": _COMMON,
    "cifar100": _COMMON,
    "tinyimagenet": _COMMON | {"cache_dir", "in_memory", "cache"},
    "imagenet64": _COMMON | {"cache_dir", "in_memory"},
    "folder": _COMMON | {"path", "split_dirs", "in_memory"},
}


def canonical_name(name: str) -> str:
    """The canonical dataset name for ``name`` (case, '-' and aliases such as 'CIFAR-10',
    'FashionMNIST', 'tiny-imagenet' are accepted); DatasetError if unknown."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return key


def _canonical_split(split: str) -> str:
    s = str(split).strip().lower()
    if s == "train":
        return "train"
    if s in ("test", "val", "valid", "validation"):
        return "test"
    raise DatasetError(f"unknown split {split!r}; use 'train' or 'test' ('val' = 'test')")


def _set_normalization(ds: ImageDataset, mean, std) -> None:
    from ._folder import _parse_floats
    mean, std = _parse_floats(mean, "mean"), _parse_floats(std, "std")
    if mean is None and std is None:
        return
    mean = mean or ds.mean
    std = std or ds.std
    if len(mean) == 1:
        mean = mean * ds.channels
    if len(std) == 1:
        std = std * ds.channels
    if len(mean) != ds.channels or len(std) != ds.channels or min(std) <= 0:
        raise DatasetError(f"{ds.name}: mean/std need {ds.channels} values (std > 0), got "
                           f"{mean} / {std}")
    ds.mean, ds.std = tuple(mean), tuple(std)
    ds._affine_cache.clear()


def load_dataset(name: str, root=None, split: str = "train", download: bool = False,
                 **opts) -> ImageDataset:
    """Load the ``split`` ("train" or "test"/"val") of dataset ``name`` (see ``DATASET_NAMES``).

    ``download=True`` fetches the official files of mnist, fashion_mnist, cifar10 and cifar100
    into ``root`` (MD5-checked, written atomically); other datasets ignore it. Options:

    * ``size``: int or "HxW". Resizes in-memory images (bilinear, antialiased); for ``folder``
      it is the decode size (shorter side to ``size``, center crop). Normalisation constants
      are unchanged.
    * ``mean``, ``std``: override the normalisation (a number per channel, or one for all).
    * ``progress`` (bool, default True): tqdm bars for slow steps (downloads, decoding,
      packing); ``workers`` (int): decoding threads (tinyimagenet, folder; ignored elsewhere).
    * tinyimagenet: ``cache_dir``, ``cache`` (default True), ``in_memory`` (default True);
      imagenet64: ``cache_dir`` (packed copy location), ``in_memory`` (default
      False); folder: ``path`` (defaults to ``root`` when ``root`` is given), ``split_dirs``
      (default True), ``in_memory`` (packed folders only).

    Raises :class:`DatasetError` for unknown names/options and missing or corrupt files."""
    key = canonical_name(name)
    split = _canonical_split(split)
    unknown = sorted(set(opts) - _OPTIONS[key])
    if unknown:
        raise DatasetError(f"unknown option(s) for {key}: {', '.join(unknown)} (accepted: "
                           f"{', '.join(sorted(_OPTIONS[key]))})")
    root_given = root is not None
    root = Path(root).expanduser() if root_given else default_data_root()
    size = as_size(opts.pop("size", None))
    mean, std = opts.pop("mean", None), opts.pop("std", None)
    progress = bool(opts.pop("progress", True))
    workers = opts.pop("workers", None)

    if key == "digits":
        from ._digits import load_digits_dataset
        ds = load_digits_dataset(split)
    elif key in ("mnist", "fashion_mnist"):
        from ._mnist import load_mnist_like
        ds = load_mnist_like(key, root, split, download=download, progress=progress)
    elif key in ("cifar10", "cifar100"):
        from ._cifar import load_cifar
        ds = load_cifar(key, root, split, download=download, progress=progress)
    elif key == "tinyimagenet":
        from ._tinyimagenet import load_tinyimagenet
        ds = load_tinyimagenet(root, split, progress=progress, workers=workers, **opts)
    elif key == "imagenet64":
        from ._imagenet64 import load_imagenet64
        ds = load_imagenet64(root, split, progress=progress, **opts)
    else:
        from ._folder import load_folder
        path = opts.pop("path", None)
        if path is None:
            if not root_given:
                raise DatasetError("the 'folder' dataset needs path=<folder> (on the command line: --folder): "
                                   "<folder>/<class>/*.jpg, <folder>/train|val/<class>/*.jpg, "
                                   "or a folder made by 'datadam-fast pack'")
            path = root
        return load_folder(path, split=split, size=size, mean=mean, std=std, progress=progress,
                           workers=workers, **opts)

    if size is not None and tuple(ds.image_size) != size:
        if ds.is_memmap:
            raise DatasetError(f"{key}: size={size[0]}x{size[1]} needs the images in memory "
                               f"(they are memory-mapped at {ds.image_size[0]}x"
                               f"{ds.image_size[1]}); pass in_memory=True or pack at that size")
        images = resize_uint8(ds.images, size)
        ds = ImageDataset(ds.name, images, ds.labels, ds.class_names, ds.mean, ds.std,
                          split=ds.split, source=ds.source)
    _set_normalization(ds, mean, std)
    return ds
