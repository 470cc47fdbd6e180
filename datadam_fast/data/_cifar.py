"""CIFAR-10 / CIFAR-100, python version (pickled batches)."""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import numpy as np
import torch

from ._base import DatasetError, ImageDataset
from ._download import download_file, extract_tar

SPECS = {
    "cifar10": dict(
        folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        files={"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        meta="batches.meta", label_key=b"labels", names_key=b"label_names", num_classes=10,
        # Official DataDAM/DC constants (utils.get_dataset).
        mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
    ),
    "cifar100": dict(
        folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        files={"train": ["train"], "test": ["test"]},
        meta="meta", label_key=b"fine_labels", names_key=b"fine_label_names", num_classes=100,
        mean=(0.5071, 0.4866, 0.4409), std=(0.2673, 0.2564, 0.2762),
    ),
}

_NUMPY_NAMES = {"_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer"}


class _SafeUnpickler(pickle.Unpickler):
    """Only rebuilds numpy arrays/dtypes and plain containers: a CIFAR batch needs nothing
    else, and refusing other globals keeps a tampered file from running code."""

    def find_class(self, module, name):
        if name in _NUMPY_NAMES and module in ("numpy", "numpy.core.multiarray",
                                               "numpy._core.multiarray", "numpy.core.numeric",
                                               "numpy._core.numeric"):
            if module.startswith("numpy.core."):
                try:  # numpy >= 2 moved numpy.core to numpy._core (importing the old path warns)
                    return getattr(importlib.import_module("numpy._core." + module[11:]), name)
                except (ImportError, AttributeError):
                    pass
            return getattr(importlib.import_module(module), name)
        if module == "_codecs" and name == "encode":  # bytes pickled by Python 3, protocol < 3
            import _codecs
            return _codecs.encode
        if module in ("copy_reg", "copyreg") and name == "_reconstructor":
            import copyreg
            return copyreg._reconstructor
        if module in ("__builtin__", "builtins") and name in ("object", "bytearray", "list",
                                                             "dict", "tuple", "set"):
            import builtins
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, OSError) as e:
        raise DatasetError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e}); the "
                           f"file is corrupt — delete it and download again") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    # Accept str keys too (files re-pickled under Python 3 without encoding="bytes").
    return {(k.encode() if isinstance(k, str) else k): v for k, v in obj.items()}


def _find_folder(root: Path, name: str, spec: dict):
    for d in (root / name / spec["folder"], root / spec["folder"]):
        if d.is_dir():
            return d
    return None


def load_cifar(name: str, root: Path, split: str, download: bool = False,
               progress: bool = True) -> ImageDataset:
    spec = SPECS[name]
    folder = _find_folder(root, name, spec)
    archive = None
    if folder is None:
        for a in (root / name / spec["archive"], root / spec["archive"]):
            if a.is_file():
                archive = a
                break
        if archive is None and download:
            archive = download_file([spec["url"]], root / name / spec["archive"], spec["md5"],
                                    progress=progress)
        if archive is not None:
            extract_tar(archive, archive.parent)
            folder = _find_folder(root, name, spec)
    expected = [spec["folder"] + "/" + f for f in spec["files"][split]] + \
        [spec["folder"] + "/" + spec["meta"]]
    if folder is None:
        raise DatasetError(f"{name} not found: expected {', '.join(expected)} under "
                           f"{root / name} (or {root}); pass --download (download=True) to "
                           f"fetch {spec['archive']} ({spec['url']}), or place the archive "
                           f"at {root / name / spec['archive']}")
    missing = [f for f in spec["files"][split] + [spec["meta"]] if not (folder / f).is_file()]
    if missing:
        raise DatasetError(f"{name}: missing {', '.join(missing)} in {folder}; the extraction is "
                           f"incomplete — delete the folder and extract {spec['archive']} again "
                           f"(or pass --download)")
    xs, ys = [], []
    for f in spec["files"][split]:
        path = folder / f
        d = load_pickle(path)
        if b"data" not in d or spec["label_key"] not in d:
            raise DatasetError(f"{path}: missing key b'data' or {spec['label_key']!r}")
        data = np.asarray(d[b"data"])
        labels = np.asarray(d[spec["label_key"]], dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{path}: b'data' must be uint8 [n, 3072], got "
                               f"{data.dtype} {list(data.shape)}")
        if labels.shape[0] != data.shape[0]:
            raise DatasetError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
            raise DatasetError(f"{path}: labels outside 0..{spec['num_classes'] - 1}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    meta = load_pickle(folder / spec["meta"])
    names = meta.get(spec["names_key"])
    if names is None or len(names) != spec["num_classes"]:
        raise DatasetError(f"{folder / spec['meta']}: missing or wrong {spec['names_key']!r}")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    x = torch.from_numpy(np.concatenate(xs) if len(xs) > 1 else np.ascontiguousarray(xs[0]))
    y = torch.from_numpy(np.concatenate(ys))
    return ImageDataset(name, x, y, names, spec["mean"], spec["std"], split=split, source=folder)
