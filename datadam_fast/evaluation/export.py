"""``datadam-fast export``: a synthetic set in the formats other tools read, and reading them back.

=========  ============================================================================================
official   ``res_<method>_<dataset>_<model>_<ipc>ipc.pt``: ``{'data': [[images, labels]], 'accs_all_exps':
           {model: [accuracy, ...]}}`` as the official DC/DM/DataDAM code saves it (images float32
           [K*IPC, C, H, W] in the normalised space they were learned in, labels int64, class-major;
           accuracies as fractions). DC-BENCH and the official evaluation read ``['data'][-1]``. Extra keys
           ``dataset``, ``config``, ``mean``, ``std`` (and ``zca`` for a whitened set) let ``evaluate``
           read it back exactly; tools that only read ``'data'`` ignore them.
folder     ``PATH/<class>/<i>.png``: images de-normalised (``x * std + mean``; a whitened set is first
           mapped back with the inverse ZCA) to 8-bit PNG, one folder per class, the folder names
           zero-padded label numbers so that torchvision's ``ImageFolder`` (which sorts folder names)
           assigns the original labels; ``meta.json`` holds mean, std, classes and the run's config.
           PNG is lossless, but the 8-bit range is not: values outside [0, 1] are clipped and the
           rest quantised to 1/255 (the share of clipped values is printed and recorded).
tensors    ``PATH/images.pt`` (float32, normalised as recorded) and ``PATH/labels.pt`` (int64) plus
           ``meta.json``: plain tensors, e.g. for DD-Ranking's ``compute_metrics(image_tensor=...)``.
=========  ============================================================================================

A whitened (``--zca``) set also gets ``zca.pt`` (the recorded transform) next to ``meta.json``.
``evaluate --synthetic`` reads all three: the official file directly, a folder or tensors export
through its directory (:func:`.formats.load_export_dir`).
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import torch

from .._io import atomic_torch_save, atomic_write_text
from ..errors import UserError
from .formats import META, OFFICIAL_EXTRAS, ZCA_FILE, load_synthetic

FORMATS = ("official", "folder", "tensors")
_OFFICIAL_DATASET = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100",
                     "tinyimagenet": "TinyImageNet", "imagenet64": "ImageNet64", "digits": "digits"}


def _source_file(source: str) -> Tuple[str, str]:
    """(synthetic file, run directory or '')."""
    if os.path.isdir(source):
        path = os.path.join(source, "synthetic.pt")
        if not os.path.isfile(path):
            raise UserError(f"{source} has no synthetic.pt (expected a distill --out directory of a finished run "
                            f"or a synthetic set file)")
        return path, source
    if not os.path.isfile(source):
        raise UserError(f"export: {source} does not exist (expected a distill --out directory or a synthetic set file)")
    return source, ""


def _fresh_dir(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UserError(f"export --out {path}: exists and is not an empty directory; choose a new path")
    os.makedirs(path, exist_ok=True)


def _json_safe(obj):
    return json.loads(json.dumps(obj, default=lambda o: None))


def _final_accuracies(run_dir: str) -> Dict[str, List[float]]:
    """``{model: [fraction, ...]}`` of the run's last evaluation (summary.json), else {}."""
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            ev = json.load(f).get("eval") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}
    accs = ev.get("accuracies")
    if not isinstance(accs, list) or not accs:
        return {}
    return {str(ev.get("model") or "ConvNet"): [float(a) / 100.0 for a in accs]}


def official_name(meta: Dict, images: torch.Tensor, labels: torch.Tensor) -> str:
    cfg = meta.get("config") or {}
    ds = meta.get("dataset") or cfg.get("dataset") or "unknown"
    K = int(labels.max()) + 1 if labels.numel() else 0
    ipc = cfg.get("ipc") or (images.shape[0] // max(K, 1))
    method = meta.get("method") or cfg.get("method") or "DataDAM"  # recorded by distill
    return (f"res_{method}_{_OFFICIAL_DATASET.get(ds, ds)}_"
            f"{cfg.get('model', 'ConvNet')}_{ipc}ipc.pt")


def _zca_of(meta: Dict):
    from ..data.zca import ZCA
    st = meta.get("zca")
    return None if st is None else ZCA.from_state(st)


def to_uint8(images: torch.Tensor, meta: Dict) -> Tuple[torch.Tensor, float]:
    """De-normalised 8-bit images [N, C, H, W] and the share of values clipped to [0, 1]."""
    mean, std = meta.get("mean"), meta.get("std")
    if mean is None or std is None:
        raise UserError("the synthetic set does not record its normalisation (mean/std), which a folder export "
                        "needs to write pixel values; export a datadam-fast synthetic.pt (or its run directory)")
    x = images.float()
    zca = _zca_of(meta)
    if zca is not None:
        x = zca.invert(x)
    C = x.shape[1]
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    if m.shape[1] != C:
        raise UserError(f"recorded mean/std have {m.shape[1]} channels, images have {C}")
    y = x * s + m
    # share of values the 8-bit range cannot hold to within its own rounding (half a grey level)
    half = 0.5 / 255
    clipped = float(((y < -half) | (y > 1 + half)).float().mean())
    return (y.clamp(0, 1) * 255).round().to(torch.uint8), clipped


def _meta_json(meta: Dict, images, labels, fmt: str, extra: Dict) -> Dict:
    K = int(labels.max()) + 1
    out = {"format": f"datadam_fast.{fmt}/1", "dataset": meta.get("dataset"), "mean": meta.get("mean"),
           "std": meta.get("std"), "num_classes": K, "num_images": int(images.shape[0]),
           "image_shape": list(images.shape[1:]), "zca": ZCA_FILE if meta.get("zca") is not None else None,
           "config": _json_safe(meta.get("config")), "iteration": meta.get("iteration"),
           # a multi-formation set is exported decoded: factor^2 full-size images per stored one
           "factor": meta.get("factor", 1), "decoded": bool(meta.get("decoded")),
           "stored_images": meta.get("stored_images", int(images.shape[0]))}
    out.update(extra)
    return out


def export(source: str, fmt: str, out: str) -> List[str]:
    """Write ``source`` (a run directory or synthetic file) as ``fmt`` to ``out``; returns report lines."""
    if fmt not in FORMATS:
        raise UserError(f"export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    path, run_dir = _source_file(source)
    images, labels, meta = load_synthetic(path)
    images, labels = images.contiguous(), labels.long().contiguous()
    lines = []
    if fmt == "official":
        target = out
        if os.path.isdir(out) or out.endswith(os.sep) or not out.endswith(".pt"):
            os.makedirs(out, exist_ok=True)
            target = os.path.join(out, official_name(meta, images, labels))
        obj = {"data": [[images, labels]], "accs_all_exps": _final_accuracies(run_dir) if run_dir else {}}
        for k in OFFICIAL_EXTRAS:
            if meta.get(k) is not None:
                obj[k] = meta[k]
        atomic_torch_save(obj, target)
        lines.append(f"wrote {target}: {images.shape[0]} images {list(images.shape[1:])}, labels int64 "
                     f"(torch.load(...)['data'][-1])")
        return lines
    _fresh_dir(out)
    if fmt == "tensors":
        atomic_torch_save(images, os.path.join(out, "images.pt"))
        atomic_torch_save(labels, os.path.join(out, "labels.pt"))
        extra = {"images": "images.pt", "labels": "labels.pt", "space": "whitened" if meta.get("zca") is not None
                 else "normalised: (x - mean) / std"}
    else:
        from PIL import Image
        u8, clipped = to_uint8(images, meta)
        K = int(labels.max()) + 1
        width = len(str(K - 1))
        names = [str(k).zfill(width) for k in range(K)]
        counters = [0] * K
        C = u8.shape[1]
        if C not in (1, 3):
            raise UserError(f"folder export writes 1- or 3-channel PNGs, the images have {C} channels")
        for name in names:
            os.makedirs(os.path.join(out, name), exist_ok=True)
        for img, lab in zip(u8, labels.tolist()):
            arr = img.permute(1, 2, 0).numpy()
            pil = Image.fromarray(arr[:, :, 0] if C == 1 else arr, mode="L" if C == 1 else "RGB")
            pil.save(os.path.join(out, names[lab], f"{counters[lab]}.png"), format="PNG")
            counters[lab] += 1
        extra = {"classes": names, "clipped_fraction": clipped,
                 "pixels": "uint8 = round(255 * clamp(x * std + mean, 0, 1))"
                           + (" after the inverse ZCA" if meta.get("zca") is not None else "")}
        lines.append(f"{100 * clipped:.2f}% of the pixel values lay outside [0, 1] by more than half a grey level "
                     f"and were clipped")
    if meta.get("zca") is not None:
        atomic_torch_save(meta["zca"], os.path.join(out, ZCA_FILE))
    atomic_write_text(os.path.join(out, META), json.dumps(_meta_json(meta, images, labels, fmt, extra), indent=2))
    lines.append(f"wrote {out}: {fmt} export of {images.shape[0]} images ({int(labels.max()) + 1} classes)")
    return lines


__all__ = ["FORMATS", "export", "official_name", "to_uint8"]
