"""The packed format: one decode, then memory-mapped loads.

A packed dataset is a folder holding

* ``images.u8``  — raw uint8 bytes, C-order ``[count, channels, H, W]`` (no header), opened
  with ``np.memmap(..., mode="r")``;
* ``labels.npy`` — int64 ``[count]`` (standard ``.npy``);
* ``meta.json``  — ``{"format": "datadam_fast.packed", "version": 1, "name", "classes",
  "size": [H, W], "channels", "count", "mean", "std", "data_mean", "data_std", ...}``.
  ``mean``/``std`` are the normalisation the loader applies (ImageNet's unless the packer was
  given others); ``data_mean``/``data_std`` are the measured statistics of the packed pixels.

``meta.json`` is written last and is the commit marker: a folder without it is not a packed
dataset. Packing happens in ``<dst>/.partial/``; progress (rows done, running pixel sums) is
saved after every chunk, so an interrupted pack resumes where it stopped when run again with
the same inputs, and the finished files are moved into ``<dst>`` with ``os.replace``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ._base import DatasetError, ImageDataset
from .._io import atomic_write_text

FORMAT = "datadam_fast.packed"
VERSION = 1
IMAGES, LABELS, META, PARTIAL, PROGRESS = "images.u8", "labels.npy", "meta.json", ".partial", \
    "progress.json"


def is_packed(path) -> bool:
    return (Path(path) / META).is_file()


def write_json_atomic(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def fingerprint(items) -> str:
    h = hashlib.sha1()
    h.update(json.dumps(items, separators=(",", ":")).encode())
    return h.hexdigest()


class PackWriter:
    """Writes rows sequentially into ``<dst>/.partial/images.u8``; resumable.

    ``writer.done`` is the number of rows already written (non-zero when resuming a pack
    with the same ``fp``). Call ``write(rows)`` with consecutive uint8 [n, C, H, W] chunks
    starting at row ``done``, then ``finalize(...)``."""

    def __init__(self, dst, count: int, chw, fp: str):
        self.dst = Path(dst)
        self.count, self.chw, self.fp = int(count), tuple(int(v) for v in chw), fp
        if self.count <= 0:
            raise DatasetError(f"nothing to pack into {self.dst}: no images")
        self.part = self.dst / PARTIAL
        try:
            self.part.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(f"cannot create {self.part}: {e}") from None
        self.done = 0
        self.sums = [0] * self.chw[0]
        self.sq_sums = [0] * self.chw[0]
        state = self._read_progress()
        img_path = self.part / IMAGES
        nbytes = self.count * int(np.prod(self.chw))
        mode = "w+"
        if (state and state.get("fingerprint") == fp and img_path.is_file()
                and img_path.stat().st_size == nbytes):
            self.done = int(state["done"])
            self.sums, self.sq_sums = list(state["sums"]), list(state["sq_sums"])
            mode = "r+"
        self.mm = np.memmap(img_path, dtype=np.uint8, mode=mode, shape=(self.count,) + self.chw)
        if mode == "w+":
            self._save_progress()

    def _read_progress(self):
        try:
            with open(self.part / PROGRESS) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _save_progress(self):
        write_json_atomic(self.part / PROGRESS, {"fingerprint": self.fp, "done": self.done,
                                                 "count": self.count, "sums": self.sums,
                                                 "sq_sums": self.sq_sums})

    def write(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        n = rows.shape[0]
        if rows.dtype != np.uint8 or tuple(rows.shape[1:]) != self.chw:
            raise DatasetError(f"pack {self.dst}: rows must be uint8 {list(self.chw)}, got "
                               f"{rows.dtype} {list(rows.shape[1:])}")
        if self.done + n > self.count:
            raise DatasetError(f"pack {self.dst}: more rows than the {self.count} announced")
        self.mm[self.done:self.done + n] = rows
        flat = rows.transpose(1, 0, 2, 3).reshape(self.chw[0], -1)
        for c in range(self.chw[0]):
            v = flat[c].astype(np.int64)
            self.sums[c] += int(v.sum())
            self.sq_sums[c] += int(np.dot(v, v))
        self.done += n
        self.mm.flush()
        self._save_progress()

    def finalize(self, labels, classes: Sequence[str], mean, std, name: str = "folder",
                 extra: Optional[dict] = None) -> Path:
        if self.done != self.count:
            raise DatasetError(f"pack {self.dst}: only {self.done} of {self.count} rows written")
        self.mm.flush()
        del self.mm
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape[0] != self.count:
            raise DatasetError(f"pack {self.dst}: {labels.shape[0]} labels for {self.count} images")
        np.save(self.part / LABELS, labels)
        pixels = self.count * self.chw[1] * self.chw[2]
        data_mean = [s / pixels / 255.0 for s in self.sums]
        data_std = [float(np.sqrt(max(q / pixels / 65025.0 - m * m, 0.0)))
                    for q, m in zip(self.sq_sums, data_mean)]
        meta = {"format": FORMAT, "version": VERSION, "name": name, "classes": list(classes),
                "size": [self.chw[1], self.chw[2]], "channels": self.chw[0], "count": self.count,
                "layout": "NCHW", "dtype": "uint8", "mean": list(mean), "std": list(std),
                "data_mean": data_mean, "data_std": data_std, "fingerprint": self.fp}
        meta.update(extra or {})
        write_json_atomic(self.part / META, meta)
        # meta.json goes last: an interruption in between leaves no (stale) commit marker.
        if (self.dst / META).exists():
            (self.dst / META).unlink()
        os.replace(self.part / IMAGES, self.dst / IMAGES)
        os.replace(self.part / LABELS, self.dst / LABELS)
        os.replace(self.part / META, self.dst / META)
        shutil.rmtree(self.part, ignore_errors=True)
        return self.dst


def read_meta(path) -> dict:
    path = Path(path)
    try:
        with open(path / META) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path / META}: unreadable packed-dataset metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DatasetError(f"{path / META}: not a datadam_fast packed dataset (format "
                           f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise DatasetError(f"{path / META}: packed format version {meta.get('version')} is newer "
                           f"than this datadam_fast supports ({VERSION})")
    return meta


def load_packed(path, split: str = "train", mean=None, std=None, name: Optional[str] = None,
                in_memory: bool = False) -> ImageDataset:
    """Memory-map a packed dataset folder (no decoding). ``in_memory=True`` reads it into a
    tensor instead."""
    path = Path(path)
    meta = read_meta(path)
    try:
        count, c = int(meta["count"]), int(meta["channels"])
        h, w = (int(v) for v in meta["size"])
        classes = list(meta["classes"])
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path / META}: incomplete metadata ({e!r})") from None
    img_path = path / IMAGES
    want = count * c * h * w
    if not img_path.is_file():
        raise DatasetError(f"{img_path}: missing (packed dataset incomplete; pack it again)")
    if img_path.stat().st_size != want:
        raise DatasetError(f"{img_path}: {img_path.stat().st_size} bytes, expected {want} "
                           f"({count}x{c}x{h}x{w}); the file is truncated or corrupt — pack again")
    try:
        labels = np.load(path / LABELS, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path / LABELS}: unreadable ({e}); pack again") from None
    if labels.ndim != 1 or labels.shape[0] != count or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path / LABELS}: expected {count} integer labels, got "
                           f"{labels.dtype} {list(labels.shape)}")
    images = np.memmap(img_path, dtype=np.uint8, mode="r", shape=(count, c, h, w))
    if in_memory:
        images = torch.from_numpy(np.array(images))
    return ImageDataset(name or meta.get("name") or "folder", images,
                        torch.from_numpy(labels.astype(np.int64)), classes,
                        meta["mean"] if mean is None else mean,
                        meta["std"] if std is None else std, split=split, source=path)
