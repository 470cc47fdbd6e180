"""Tiny ImageNet (200 classes, 64x64 RGB) from the official ``tiny-imagenet-200`` folder.

Classes are the wnids of ``wnids.txt`` in sorted order (the order of torchvision's
ImageFolder on ``train/``); ``class_names`` are the wnids. ``train`` is
``train/<wnid>/images/*.JPEG`` (500 per class), ``val``/``test`` is ``val/images/*.JPEG``
labelled by ``val/val_annotations.txt`` (the official test set has no labels, so the val set
is the test set, as in the DataDAM/DM/MTT papers).

Decoding 100k JPEGs takes minutes, so the first load of a split writes a decoded cache —
``<split>_images.npy`` (uint8 [N, 3, 64, 64]), ``<split>_labels.npy`` and
``<split>_cache.json`` (a fingerprint of wnids.txt and the file list) — into
``<dataset dir>/datadam_fast_cache/``, or, if that is not writable, into
``<default_data_root()>/cache/tinyimagenet/``; ``cache_dir=`` overrides both. Each file is
written under a temporary name and renamed, the JSON last; a fingerprint mismatch rebuilds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ._base import IMAGENET_MEAN, IMAGENET_STD, DatasetError, ImageDataset, default_data_root
from ._folder import IMG_EXTENSIONS, decode_into
from ._packed import fingerprint, write_json_atomic

DIRNAME = "tiny-imagenet-200"


def find_tiny(root: Path):
    for d in (root / "tinyimagenet" / DIRNAME, root / DIRNAME, root / "tinyimagenet"):
        if (d / "wnids.txt").is_file():
            return d
    return None


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _scan(base: Path, split: str, wnids):
    index = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    if split == "train":
        for w in wnids:
            d = base / "train" / w / "images"
            if not d.is_dir():
                raise DatasetError(f"tinyimagenet: missing {d} (expected train/<wnid>/images/*.JPEG)")
            names = sorted(n for n in os.listdir(d) if _is_image(n))
            if not names:
                raise DatasetError(f"tinyimagenet: no images in {d}")
            files += [d / n for n in names]
            labels += [index[w]] * len(names)
    else:
        ann = base / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DatasetError(f"tinyimagenet: missing {ann} (the val split's labels)")
        rows = []
        with open(ann) as f:
            for k, line in enumerate(f, 1):
                parts = line.strip().split("\t")
                if not parts or not parts[0]:
                    continue
                if len(parts) < 2 or parts[1] not in index:
                    raise DatasetError(f"{ann}:{k}: malformed line or unknown wnid: {line.strip()!r}")
                rows.append((parts[0], index[parts[1]]))
        rows.sort()
        for name, label in rows:
            p = base / "val" / "images" / name
            if not p.is_file():
                raise DatasetError(f"tinyimagenet: {p} listed in {ann} does not exist")
            files.append(p)
            labels.append(label)
        if not files:
            raise DatasetError(f"{ann}: no entries")
    return files, labels


def _writable(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = d / f".probe{os.getpid()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def load_tinyimagenet(root: Path, split: str, cache_dir=None, workers: Optional[int] = None,
                      progress: bool = True, in_memory: bool = True,
                      cache: bool = True) -> ImageDataset:
    base = find_tiny(root)
    if base is None:
        raise DatasetError(f"tinyimagenet not found: expected {root / 'tinyimagenet' / DIRNAME}"
                           f"/wnids.txt (or {root / DIRNAME}/wnids.txt) with train/<wnid>/images/"
                           f"*.JPEG, val/images/*.JPEG and val/val_annotations.txt; download "
                           f"tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip)"
                           f" and unzip it there (no --download for this dataset)")
    with open(base / "wnids.txt") as f:
        wnids = sorted({w.strip() for w in f if w.strip()})
    if not wnids:
        raise DatasetError(f"{base / 'wnids.txt'}: empty")
    files, labels = _scan(base, split, wnids)
    fp = fingerprint({"wnids": wnids, "split": split, "size": [64, 64],
                      "files": [[os.path.relpath(p, base), l] for p, l in zip(files, labels)]})
    if cache_dir is None and os.environ.get("DATADAM_FAST_CACHE"):
        cache_dir = Path(os.environ["DATADAM_FAST_CACHE"]) / "tinyimagenet"
    if cache_dir is not None:
        cdir = Path(cache_dir).expanduser()
    else:
        cdir = base / "datadam_fast_cache"
        if not _writable(cdir):
            cdir = default_data_root() / "cache" / "tinyimagenet"
    img_path, lab_path, js_path = (cdir / f"{split}_images.npy", cdir / f"{split}_labels.npy",
                                   cdir / f"{split}_cache.json")
    images = None
    if cache and js_path.is_file():
        try:
            with open(js_path) as f:
                ok = json.load(f).get("fingerprint") == fp
            if ok:
                images = np.load(img_path, mmap_mode="r", allow_pickle=False)
                if images.shape != (len(files), 3, 64, 64) or images.dtype != np.uint8:
                    images = None
        except (OSError, ValueError):
            images = None
    if images is None:
        if cache:
            if not _writable(cdir):
                raise DatasetError(f"tinyimagenet: cannot write the decode cache to {cdir}; pass "
                                   f"cache_dir=... (a writable folder)")
            tmp = cdir / f".{split}_images.{os.getpid()}.npy"
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(len(files), 3, 64, 64))
            decode_into(files, (64, 64), out, workers=workers, progress=progress,
                        desc=f"decode tinyimagenet {split}")
            out.flush()
            del out
            if js_path.exists():
                js_path.unlink()
            os.replace(tmp, img_path)
            tmp_l = cdir / f".{split}_labels.{os.getpid()}.npy"
            np.save(tmp_l, np.asarray(labels, dtype=np.int64))
            os.replace(tmp_l, lab_path)
            write_json_atomic(js_path, {"fingerprint": fp, "count": len(files), "source": str(base)})
            images = np.load(img_path, mmap_mode="r", allow_pickle=False)
        else:
            images = np.empty((len(files), 3, 64, 64), dtype=np.uint8)
            decode_into(files, (64, 64), images, workers=workers, progress=progress,
                        desc=f"decode tinyimagenet {split}")
    if in_memory:
        images = torch.from_numpy(np.array(images))
    return ImageDataset("tinyimagenet", images, torch.tensor(labels, dtype=torch.int64), wnids,
                        IMAGENET_MEAN, IMAGENET_STD, split=split, source=base)
