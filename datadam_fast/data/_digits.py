"""``digits``: scikit-learn's bundled 8x8 handwritten digits — the embedded, offline default.

Source: ``sklearn/datasets/data/digits.csv.gz`` (the UCI "Optical Recognition of Handwritten
Digits" test set, 1797 images, 10 classes, pixel values 0..16), read directly from the
installed scikit-learn package (falling back to ``sklearn.datasets.load_digits``); nothing is
downloaded. Pixels are scaled to uint8 with ``round(v * 255 / 16)`` (exact: 0 -> 0, 16 -> 255).

Split (fixed, deterministic, stratified): for each class ``c = 0..9`` in turn, the indices of
class ``c`` (ascending) are permuted by one shared ``np.random.RandomState(0)`` (a stream numpy
guarantees stable across versions) and the first ``round(0.8 * n_c)`` go to ``train``, the rest
to ``test``; both lists are returned in ascending index order. That gives 1438 train and 359
test images (each class 139..146 train / 35..37 test).

Images are native 8x8 (a depth-3 ConvNet reduces 8 -> 4 -> 2 -> 1); ``size=N`` upsamples
bilinearly (e.g. ``size=32`` to use the CIFAR-sized ConvNet); mean/std stay the 8x8 values.
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ._base import DatasetError, ImageDataset

# Mean and population std of x/255 over the 1438 train-split images at 8x8, computed with
# ``channel_stats(load_dataset("digits").images)`` (tests/data/test_data.py recomputes them).
DIGITS_MEAN = (0.30527097,)
DIGITS_STD = (0.37585775,)

TRAIN_FRACTION = 0.8
SPLIT_SEED = 0


def _digits_csv():
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if p.is_file():
            return p
    return None


def raw_digits():
    """(images uint8 [1797, 1, 8, 8], labels int64 [1797]) in scikit-learn's order."""
    path = _digits_csv()
    try:
        if path is not None:
            with gzip.open(path, "rt") as f:
                data = np.loadtxt(f, delimiter=",")
            pixels, target = data[:, :-1], data[:, -1]
        else:
            from sklearn.datasets import load_digits
            d = load_digits()
            pixels, target = d.data, d.target
    except ImportError:
        raise DatasetError("the 'digits' dataset is scikit-learn's bundled copy: install "
                           "scikit-learn (pip install scikit-learn)") from None
    except (OSError, ValueError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read scikit-learn's digits file ({e})") from None
    pixels = np.asarray(pixels, dtype=np.float64)
    if pixels.shape != (1797, 64) or pixels.min() < 0 or pixels.max() > 16:
        raise DatasetError(f"{path or 'sklearn load_digits'}: unexpected digits data "
                           f"{list(pixels.shape)}")
    images = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8).reshape(-1, 1, 8, 8)
    return images, np.asarray(target).astype(np.int64)


def split_indices(labels: np.ndarray, num_classes: int = 10):
    """The fixed stratified ~80/20 split: (train_indices, test_indices), both ascending."""
    rng = np.random.RandomState(SPLIT_SEED)
    train, test = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(TRAIN_FRACTION * idx.size))
        train.append(idx[:k])
        test.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits_dataset(split: str) -> ImageDataset:
    images, labels = raw_digits()
    train, test = split_indices(labels)
    sel = train if split == "train" else test
    return ImageDataset("digits", torch.from_numpy(images[sel]), torch.from_numpy(labels[sel]),
                        [str(i) for i in range(10)], DIGITS_MEAN, DIGITS_STD, split=split,
                        source=str(_digits_csv() or "sklearn.datasets.load_digits"))
