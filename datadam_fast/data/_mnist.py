"""MNIST and Fashion-MNIST from the official IDX files (gzipped or not)."""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ._base import DatasetError, ImageDataset
from ._download import download_file

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

SPECS = {
    "mnist": dict(
        dirs=("mnist/raw", "MNIST/raw", "mnist"),
        # Official DataDAM/DC constants (utils.get_dataset).
        mean=(0.1307,), std=(0.3081,),
        classes=[str(i) for i in range(10)],
        urls=("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "http://yann.lecun.com/exdb/mnist/"),
        md5={"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"},
    ),
    "fashion_mnist": dict(
        dirs=("fashion_mnist/raw", "FashionMNIST/raw", "fashion_mnist"),
        # Not in the official DataDAM code (FashionMNIST was dropped relative to DC): mean and
        # population std of x/255 over the 60000 training images (0.28604, 0.35302), rounded;
        # tests/data/test_data.py recomputes them from the real file.
        mean=(0.2860,), std=(0.3530,),
        classes=["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"],
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
             "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
             "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
             "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"},
    ),
}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot read ({e}); the file is corrupt or truncated — "
                           f"delete it and download again") from None


def read_idx(path, kind: str) -> np.ndarray:
    """Parse an IDX file: ``kind="images"`` (magic 0x803, [N, rows, cols] uint8) or
    ``"labels"`` (magic 0x801, [N] uint8). Validates magic number and exact length."""
    path = Path(path)
    data = _read_bytes(path)
    want_magic, ndim = (0x803, 3) if kind == "images" else (0x801, 1)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: too short for an IDX {kind} file ({len(data)} bytes)")
    magic, *dims = struct.unpack(">" + "I" * (1 + ndim), data[:header])
    if magic != want_magic:
        raise DatasetError(f"{path}: bad IDX magic number 0x{magic:08x} (expected "
                           f"0x{want_magic:08x} for {kind})")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(f"{path}: size {len(data)} bytes does not match the header "
                           f"(dims {dims} need {expected}); the file is truncated or corrupt")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find(root: Path, spec: dict, stem: str):
    for d in spec["dirs"]:
        for name in (stem + ".gz", stem):
            p = root / d / name
            if p.is_file():
                return p
    return None


def load_mnist_like(name: str, root: Path, split: str, download: bool = False,
                    progress: bool = True) -> ImageDataset:
    spec = SPECS[name]
    stems = _FILES[split]
    if download:
        target = root / spec["dirs"][0]
        for stem in stems:
            if _find(root, spec, stem) is None:
                fname = stem + ".gz"
                download_file([u + fname for u in spec["urls"]], target / fname,
                              spec["md5"][fname], progress=progress)
    paths = [_find(root, spec, s) for s in stems]
    if any(p is None for p in paths):
        dirs = ", ".join(str(root / d) for d in spec["dirs"][:2])
        missing = ", ".join(s + ".gz" for s, p in zip(stems, paths) if p is None)
        raise DatasetError(f"{name} {split} split not found: expected {missing} (gzipped or "
                           f"not) in {dirs}; pass --download (download=True) to fetch the "
                           f"official files, or point --data-root / DATADAM_FAST_DATA at the "
                           f"folder holding {spec['dirs'][0]}/")
    images = read_idx(paths[0], "images")
    labels = read_idx(paths[1], "labels")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has "
                           f"{labels.shape[0]} labels")
    if labels.size and labels.max() >= 10:
        raise DatasetError(f"{paths[1]}: label {int(labels.max())} outside 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(name, x, y, spec["classes"], spec["mean"], spec["std"], split=split,
                        source=paths[0].parent)
