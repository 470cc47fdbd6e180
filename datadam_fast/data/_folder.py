"""ImageFolder trees (``<path>/<class>/*.jpg``), decoding with Pillow, and packing."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ._base import IMAGENET_MEAN, IMAGENET_STD, DatasetError, ImageDataset, as_size
from ._packed import PackWriter, fingerprint, is_packed, load_packed

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
TRAIN_DIRS = ("train",)
EVAL_DIRS = ("val", "test")


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False)


# ----------------------------------------------------------------------------- scanning
def list_classes(path: Path) -> List[str]:
    try:
        return sorted(e.name for e in os.scandir(path)
                      if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DatasetError(f"{path}: cannot list class folders ({e})") from None


def scan_image_folder(path, classes: Optional[Sequence[str]] = None,
                      allow_empty: bool = False) -> Tuple[List[Path], List[int], List[str]]:
    """(files, labels, classes) of an ImageFolder tree, torchvision's conventions: classes are
    the sorted sub-folder names, images are found recursively with the extensions
    ``IMG_EXTENSIONS`` (any case), in sorted order. ``classes`` fixes the class list (e.g. the
    train split's for a val split): sub-folders outside it are an error."""
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"image folder {path} does not exist (expected {path}/<class>/*.jpg)")
    found = list_classes(path)
    if classes is None:
        classes = found
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise DatasetError(f"{path}: class folder(s) {', '.join(extra[:5])} not in the train "
                               f"split's classes")
    if not classes:
        raise DatasetError(f"{path}: no class sub-folders (expected {path}/<class>/*.jpg)")
    files, labels, empty = [], [], []
    for label, cls in enumerate(classes):
        cdir = path / cls
        n0 = len(files)
        if cdir.is_dir():
            for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if not fn.startswith(".") and fn.lower().endswith(IMG_EXTENSIONS):
                        files.append(Path(dirpath) / fn)
                        labels.append(label)
        if len(files) == n0:
            empty.append(cls)
    if empty and not allow_empty:
        raise DatasetError(f"{path}: class folder(s) with no images "
                           f"({', '.join(IMG_EXTENSIONS)}): {', '.join(empty[:5])}"
                           f"{' ...' if len(empty) > 5 else ''}")
    return files, labels, list(classes)


# ----------------------------------------------------------------------------- decoding
def decode_image(path, size: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Decode to RGB uint8 [3, H, W]. With ``size=(H, W)``: scale (bilinear) so the image just
    covers H x W keeping its aspect ratio — for a square size that is "resize the shorter side
    to size" — then center-crop, as torchvision's Resize(size) + CenterCrop(size)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and (im.height, im.width) != tuple(size):
                th, tw = size
                scale = max(th / im.height, tw / im.width)
                nh, nw = max(th, int(round(im.height * scale))), max(tw, int(round(im.width * scale)))
                if (nh, nw) != (im.height, im.width):
                    im = im.resize((nw, nh), Image.BILINEAR)
                top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
                im = im.crop((left, top, left + tw, top + th))
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def probe_size(path) -> Tuple[int, int]:
    return tuple(decode_image(path).shape[1:])


def warn_mixed_sizes(files: Sequence[Path], size: Tuple[int, int]) -> None:
    """One warning when images differ in size from the first one (they are resized and cropped to
    it): likely a mixed folder, and the size was not chosen (``size=`` / ``pack --size``). Reads the
    image headers only."""
    from PIL import Image
    differ = 0
    for f in files:
        try:
            with Image.open(f) as im:
                differ += (im.size[1], im.size[0]) != tuple(size)
        except OSError:
            pass  # decoding reports unreadable files with their name
    if differ:
        import warnings
        warnings.warn(f"datadam_fast: {differ} of {len(files)} images differ in size from the first one "
                      f"({size[0]}x{size[1]}) and are resized and cropped to it; choose the size with size= "
                      f"(datadam-fast pack --size)", UserWarning, stacklevel=3)


def decode_into(files: Sequence[Path], size: Tuple[int, int], out, start: int = 0,
                workers: Optional[int] = None, progress: bool = True, desc: str = "decode",
                chunk: int = 256, on_chunk=None) -> None:
    """Decode ``files[start:]`` into ``out[start:]`` (uint8 [N, 3, H, W]) with a thread pool
    (Pillow releases the GIL while decoding). ``on_chunk(lo, hi)`` runs after each chunk."""
    workers = workers or default_workers()
    bar = _progress_bar(len(files), desc, progress)
    bar.update(start)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for lo in range(start, len(files), chunk):
                hi = min(lo + chunk, len(files))
                for i, arr in enumerate(pool.map(lambda p: decode_image(p, size), files[lo:hi])):
                    out[lo + i] = arr
                if on_chunk is not None:
                    on_chunk(lo, hi)
                bar.update(hi - lo)
    finally:
        bar.close()


def _parse_floats(value, what: str):
    if value is None:
        return None
    try:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        vals = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    except (TypeError, ValueError):
        raise DatasetError(f"invalid {what} {value!r}: expected numbers like 0.5,0.5,0.5") from None
    if not vals:
        raise DatasetError(f"invalid {what}: empty")
    return vals


# ----------------------------------------------------------------------------- splits
def resolve_split_dir(path: Path, split: str, split_dirs: bool = True):
    """(directory for ``split``, train directory or None). ``<path>/train`` and
    ``<path>/val`` or ``<path>/test`` are the splits when ``split_dirs`` and ``<path>/train``
    exists; otherwise ``path`` itself is the (train-only) dataset."""
    if split_dirs and (path / "train").is_dir():
        if split == "train":
            return path / "train", path / "train"
        for d in EVAL_DIRS:
            if (path / d).is_dir():
                return path / d, path / "train"
        raise DatasetError(f"{path}: no evaluation split (expected {path / 'val'} or "
                           f"{path / 'test'} next to {path / 'train'})")
    if split != "train":
        raise DatasetError(f"{path}: no {split} split — the folder has no train/ and val/ (or "
                           f"test/) sub-folders, so it is a train-only dataset")
    return path, None


def _packed_dir(path: Path, split: str):
    if is_packed(path):
        if split != "train":
            raise DatasetError(f"{path} is a single packed split (train-only); pack a folder "
                               f"with train/ and val/ (or test/) sub-folders to get a {split} "
                               f"split")
        return path
    names = ("train",) if split == "train" else EVAL_DIRS
    for d in names:
        if is_packed(path / d):
            return path / d
    return None


def load_folder(path, split: str = "train", size=None, split_dirs: bool = True, mean=None,
                std=None, workers: Optional[int] = None, progress: bool = True,
                in_memory: bool = False, name: str = "folder") -> ImageDataset:
    """An ImageFolder tree decoded into memory, or a packed folder memory-mapped."""
    if path is None:
        raise DatasetError("the 'folder' dataset needs a path (path=...; on the command line: --folder)")
    path = Path(path).expanduser()
    mean, std = _parse_floats(mean, "mean"), _parse_floats(std, "std")
    size = as_size(size)
    if not path.is_dir():
        raise DatasetError(f"image folder {path} does not exist (expected {path}/<class>/*.jpg, "
                           f"{path}/train/<class>/*.jpg, or a packed folder with meta.json)")
    packed = _packed_dir(path, split)
    if packed is not None:
        ds = load_packed(packed, split=split, mean=mean, std=std, name=name, in_memory=in_memory)
        if size is not None and ds.image_size != size:
            raise DatasetError(f"{packed} is packed at {ds.image_size[0]}x{ds.image_size[1]}, "
                               f"not the requested size {size[0]}x{size[1]}; pack again")
        return ds
    split_dir, train_dir = resolve_split_dir(path, split, split_dirs)
    classes = list_classes(train_dir) if train_dir is not None and train_dir != split_dir else None
    files, labels, classes = scan_image_folder(split_dir, classes, allow_empty=split != "train")
    if not files:
        raise DatasetError(f"{split_dir}: no images ({', '.join(IMG_EXTENSIONS)})")
    if size is None:
        size = probe_size(files[0])
        warn_mixed_sizes(files, size)
    out = np.empty((len(files), 3) + tuple(size), dtype=np.uint8)
    decode_into(files, size, out, workers=workers, progress=progress,
                desc=f"decode {split_dir.name}")
    return ImageDataset(name, torch.from_numpy(out), torch.tensor(labels, dtype=torch.int64),
                        classes, mean or IMAGENET_MEAN, std or IMAGENET_STD, split=split,
                        source=split_dir)


# ----------------------------------------------------------------------------- packing
def _pack_files(files, labels, classes, dst: Path, size, workers, progress, mean, std,
                src: Path, overwrite: bool) -> Path:
    stats = []
    for f in files:
        try:
            stats.append(os.stat(f).st_size)
        except OSError as e:
            raise DatasetError(f"{f}: cannot read ({e})") from None
    fp = fingerprint({"files": [[os.path.relpath(f, src), s, l]
                                for f, s, l in zip(files, stats, labels)],
                      "size": list(size), "classes": list(classes)})
    if is_packed(dst) and not overwrite:
        from ._packed import read_meta
        if read_meta(dst).get("fingerprint") == fp:
            return dst  # already packed from the same files
        raise DatasetError(f"{dst} already holds a different packed dataset; delete it or "
                           f"choose another destination")
    writer = PackWriter(dst, len(files), (3,) + tuple(size), fp)

    class _Rows:  # decode_into writes row by row; buffer each chunk, then hand it to the writer
        def __init__(self):
            self.chunk = {}

        def __setitem__(self, i, arr):
            self.chunk[i] = arr

    rows = _Rows()

    def flush(lo, hi):
        writer.write(np.stack([rows.chunk.pop(i) for i in range(lo, hi)]))

    decode_into(files, size, rows, start=writer.done, workers=workers, progress=progress,
                desc=f"pack {dst.name}", on_chunk=flush)
    return writer.finalize(labels, classes, mean or IMAGENET_MEAN, std or IMAGENET_STD,
                           name="folder", extra={"source": str(src)})


def pack_image_folder(src, dst, size, workers: Optional[int] = None, progress: bool = True,
                      split_dirs: bool = True, mean=None, std=None,
                      overwrite: bool = False) -> Path:
    """Decode an ImageFolder tree once into the packed format (see ``_packed``).

    ``size``: int N (resize the shorter side to N, center-crop N x N), "HxW", or None (the first
    image's size; others are resized/cropped to it). If ``src`` has ``train/`` and ``val/``
    (or ``test/``) sub-folders (and ``split_dirs``), each split is packed into ``dst/train`` and
    ``dst/val`` (or ``dst/test``) with the train split's class list; otherwise ``src`` is packed
    into ``dst``. ``load_dataset("folder", path=dst, split=...)`` then memory-maps the result.
    Resumable (rerun the same call after an interruption); a finished identical pack is a
    no-op. Returns ``dst``."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise DatasetError(f"image folder {src} does not exist")
    if is_packed(src):
        raise DatasetError(f"{src} is already a packed dataset")
    size = as_size(size)
    mean, std = _parse_floats(mean, "mean"), _parse_floats(std, "std")
    jobs = []
    if split_dirs and (src / "train").is_dir():
        classes = list_classes(src / "train")
        jobs.append((src / "train", dst / "train", None))
        for d in EVAL_DIRS:
            if (src / d).is_dir():
                jobs.append((src / d, dst / d, classes))
    else:
        jobs.append((src, dst, None))
    for sdir, ddir, classes in jobs:
        files, labels, classes = scan_image_folder(sdir, classes, allow_empty=classes is not None)
        if not files:
            raise DatasetError(f"{sdir}: no images ({', '.join(IMG_EXTENSIONS)})")
        if size is None:
            size = probe_size(files[0])
            warn_mixed_sizes(files, size)
        _pack_files(files, labels, classes, ddir, size, workers, progress, mean, std, sdir,
                    overwrite)
    return dst
