"""Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017), the official ``.npz`` batches.

Files: ``<root>/imagenet64/train_data_batch_1.npz`` ... ``_10.npz`` and ``val_data.npz`` (also
found one folder deeper, e.g. ``imagenet64/Imagenet64_train_part1_npz/``). Each holds ``data``
uint8 [n, 12288] (channel-major rows like CIFAR: 4096 R, 4096 G, 4096 B), ``labels`` 1..1000
(stored 0-based here) and optionally ``mean``. ``class_names`` are "0".."999".

The train split is 1.28M images, 15.7 GB as uint8, so by default the batches are streamed
(never a whole ``data`` array in memory) into the packed format (see ``_packed``) under
``<root>/imagenet64/packed/<split>/`` (or ``cache_dir=``, ``--cache-dir``, ``$DATADAM_FAST_CACHE/imagenet64``) on first load — resumable — and
every load memory-maps it. A packed folder that already exists is used without the npz files.
``in_memory=True`` reads the npz files straight into a tensor instead (fine for ``val``).
"""
from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path
from typing import List

import numpy as np
import torch

from ._base import IMAGENET_MEAN, IMAGENET_STD, DatasetError, ImageDataset
from ._folder import _progress_bar
from ._packed import PackWriter, fingerprint, is_packed, load_packed

NUM_CLASSES = 1000
TRAIN_FILES = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
VAL_FILES = ["val_data.npz"]


def _locate(base: Path, names: List[str]):
    found, missing = [], []
    for n in names:
        cands = [base / n] + (sorted(base.glob(f"*/{n}")) if base.is_dir() else [])
        hit = next((c for c in cands if c.is_file()), None)
        (found if hit else missing).append(hit or n)
    return found, missing


def _open_npy_member(zf: zipfile.ZipFile, key: str, path: Path):
    try:
        f = zf.open(key + ".npy")
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except KeyError:
        raise DatasetError(f"{path}: no '{key}' array in the npz") from None
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: corrupt '{key}' array ({e})") from None
    return f, shape, fortran, dtype


def _read_labels(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "labels" not in z.files:
                raise DatasetError(f"{path}: no 'labels' array in the npz")
            labels = np.asarray(z["labels"]).reshape(-1).astype(np.int64)
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetError(f"{path}: not a readable npz file ({e}); delete it and download "
                           f"again") from None
    if labels.size and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise DatasetError(f"{path}: labels must be 1..{NUM_CLASSES}, got "
                           f"{int(labels.min())}..{int(labels.max())}")
    return labels - 1


def _data_header(path: Path):
    """(n, row_len, side) of the ``data`` array, validated."""
    try:
        with zipfile.ZipFile(path) as zf:
            f, shape, fortran, dtype = _open_npy_member(zf, "data", path)
            f.close()
    except zipfile.BadZipFile as e:
        raise DatasetError(f"{path}: not a readable npz file ({e})") from None
    if dtype != np.uint8 or fortran or len(shape) != 2:
        raise DatasetError(f"{path}: 'data' must be a C-order uint8 [n, 3*side*side] array, got "
                           f"{dtype} {list(shape)}{' (Fortran order)' if fortran else ''}")
    side = int(round(math.sqrt(shape[1] / 3)))
    if 3 * side * side != shape[1]:
        raise DatasetError(f"{path}: rows of {shape[1]} bytes are not 3*side*side images")
    return int(shape[0]), int(shape[1]), side


def _iter_rows(path: Path, side: int, chunk: int = 4096):
    """Yield uint8 [k, 3, side, side] chunks of ``data`` without loading the whole array."""
    row = 3 * side * side
    try:
        with zipfile.ZipFile(path) as zf:
            f, shape, _, _ = _open_npy_member(zf, "data", path)
            with f:
                left = int(shape[0])
                while left:
                    k = min(chunk, left)
                    buf = f.read(k * row)
                    if len(buf) != k * row:
                        raise DatasetError(f"{path}: 'data' is truncated")
                    yield np.frombuffer(buf, np.uint8).reshape(k, 3, side, side)
                    left -= k
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DatasetError(f"{path}: corrupt npz ({e}); delete it and download again") from None


def load_imagenet64(root: Path, split: str, cache_dir=None, in_memory: bool = False,
                    progress: bool = True) -> ImageDataset:
    base = root / "imagenet64"
    split_dir = "train" if split == "train" else "val"
    if cache_dir is None and os.environ.get("DATADAM_FAST_CACHE"):  # a read-only data root: pack elsewhere
        cache_dir = Path(os.environ["DATADAM_FAST_CACHE"]) / "imagenet64"
    pack_dir = (Path(cache_dir).expanduser() if cache_dir is not None else base / "packed") / split_dir
    if not in_memory and is_packed(pack_dir):
        return load_packed(pack_dir, split=split, name="imagenet64")
    names = TRAIN_FILES if split == "train" else VAL_FILES
    files, missing = _locate(base, names)
    if missing:
        raise DatasetError(f"imagenet64 {split} split not found: missing {', '.join(missing)} in "
                           f"{base} (the Downsampled ImageNet 64x64 npz files from "
                           f"image-net.org; no --download), and no packed copy at {pack_dir}")
    headers = [_data_header(p) for p in files]
    labels = []
    for p, (n, _, _) in zip(files, headers):
        lab = _read_labels(p)
        if lab.shape[0] != n:
            raise DatasetError(f"{p}: {n} images but {lab.shape[0]} labels")
        labels.append(lab)
    sides = {h[2] for h in headers}
    if len(sides) != 1:
        raise DatasetError(f"imagenet64: npz files of different image sizes {sorted(sides)}")
    side = sides.pop()
    labels = np.concatenate(labels)
    total = int(labels.shape[0])
    classes = [str(i) for i in range(NUM_CLASSES)]
    if in_memory:
        images = np.empty((total, 3, side, side), dtype=np.uint8)
        pos = 0
        for p in files:
            for rows in _iter_rows(p, side):
                images[pos:pos + rows.shape[0]] = rows
                pos += rows.shape[0]
        return ImageDataset("imagenet64", torch.from_numpy(images), torch.from_numpy(labels),
                            classes, IMAGENET_MEAN, IMAGENET_STD, split=split, source=base)
    fp = fingerprint({"files": [[p.name, os.path.getsize(p)] for p in files], "side": side})
    writer = PackWriter(pack_dir, total, (3, side, side), fp)
    bar = _progress_bar(total, f"pack imagenet64 {split_dir}", progress)
    bar.update(writer.done)
    try:
        pos = 0
        for p, (n, _, _) in zip(files, headers):
            if pos + n <= writer.done:
                pos += n
                continue
            for rows in _iter_rows(p, side):
                k = rows.shape[0]
                if pos + k > writer.done:
                    rows = rows[max(writer.done - pos, 0):]
                    writer.write(rows)
                    bar.update(rows.shape[0])
                pos += k
    finally:
        bar.close()
    writer.finalize(labels, classes, IMAGENET_MEAN, IMAGENET_STD, name="imagenet64",
                    extra={"source": str(base)})
    return load_packed(pack_dir, split=split, name="imagenet64")
