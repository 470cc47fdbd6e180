"""Every file format a synthetic set (or a frozen network) is read from, in one place.

* ``synthetic.pt`` (what ``distill`` writes): ``{"images", "labels", "mean", "std", "dataset",
  "config", "iteration", "method"}`` (+ ``"zca"``); ``"method"`` is the method's official name,
  which ``export --format official`` puts into the file name;
* the official release ``{"data": [images, labels]}`` and the official ``res_*.pt``
  ``{"data": [[images, labels], ...]}`` (the last entry), plus the keys our official export adds
  (:data:`OFFICIAL_EXTRAS`);
* a folder export (``<class>/<i>.png`` + :data:`META`) and a tensors export (``images.pt``,
  ``labels.pt`` + :data:`META`), with :data:`ZCA_FILE` for a whitened set;
* the official ``{"net_parameters": state_dict}`` of a trained network.

Everything is read with ``torch.load(weights_only=True)`` (numpy scalars allowed); a file that is
not data is refused with a one-line error, never unpickled.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Tuple

import torch

from ..errors import UserError

META = "meta.json"
ZCA_FILE = "zca.pt"
# keys of an official-format file that evaluate passes on as metadata
OFFICIAL_EXTRAS = ("dataset", "config", "mean", "std", "zca", "method", "factor", "decoded", "stored_images")


def _to_int_labels(labels, n: int, where: str) -> torch.Tensor:
    lab = torch.as_tensor(labels)
    if lab.dim() != 1 or lab.shape[0] != n:
        raise UserError(f"{where}: labels must be a 1-d sequence of {n} class indices, got shape {tuple(lab.shape)}")
    if lab.is_floating_point():
        if not torch.equal(lab, lab.round()):
            raise UserError(f"{where}: labels must be whole numbers (hard labels)")
    return lab.long()


def _numpy_safe_globals() -> list:
    """Exactly the numpy callables/classes that pickles of numpy scalars and arrays reference.

    The official ``res_*.pt`` files hold ``accs_all_exps`` as numpy float64 (and lists/arrays of
    them). numpy >= 2 pickles ``numpy._core.multiarray.scalar`` / ``_reconstruct``; numpy 1.x
    (the official code pins 1.21.6) wrote ``numpy.core.multiarray.*``, so both names map to the
    same functions. These only rebuild arrays, scalars and dtypes from bytes - nothing callable
    beyond them is allowed.
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
    core = getattr(np, "_core", None) or np.core
    ma = core.multiarray
    out: list = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        out += [(ma.scalar, f"{mod}.scalar"), (ma._reconstruct, f"{mod}._reconstruct")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: one class per dtype, needed by BUILD
    if dtypes is not None:
        for name in ("BoolDType", "Int8DType", "Int16DType", "Int32DType", "Int64DType", "UInt8DType",
                     "UInt16DType", "UInt32DType", "UInt64DType", "Float16DType", "Float32DType",
                     "Float64DType", "LongDoubleDType", "Complex64DType", "Complex128DType",
                     "ByteDType", "UByteDType", "ShortDType", "UShortDType", "IntDType", "UIntDType",
                     "LongDType", "ULongDType", "LongLongDType", "ULongLongDType"):
            cls = getattr(dtypes, name, None)
            if cls is not None:
                out.append(cls)
    return out


def _load_file(path: str, what: str):
    """``torch.load(weights_only=True)`` plus numpy arrays/scalars; any failure is a one-line UserError."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except Exception as e:
        msg = str(e)
        # torch words it "Unsupported global: GLOBAL x.y" or "unsupported GLOBAL x.y whose module ... is blocked"
        m = re.search(r"GLOBAL ([\w.]+)", msg)
        if m and isinstance(e, __import__("pickle").UnpicklingError):
            raise UserError(f"refusing to load {what} {path}: it references {m.group(1)}, which is not a tensor, "
                            f"numpy array/scalar or plain container (expected data only; nothing else is "
                            f"unpickled, since that could run code)") from None
        first = msg.strip().splitlines()[0] if msg.strip() else ""
        raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {first[:200]}") from None


def load_synthetic(path: str) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Read a synthetic set: ours (``{"images", "labels", ...}``), the official release
    (``{"data": [images, labels]}``) or the official ``res_*.pt`` (``{"data": [[images, labels], ...]}``,
    last entry). Returns float32 images [N,C,H,W] (normalised space), int64 labels and metadata
    (for official files ``{"format": "official"}``, plus ``"eval_points"`` for ``res_*.pt``)."""
    if os.path.isdir(path):  # a folder or tensors export
        return load_export_dir(path)
    obj = _load_file(path, "synthetic set")
    meta: Dict = {}
    if isinstance(obj, dict) and "images" in obj and "labels" in obj:
        images, labels = obj["images"], obj["labels"]
        meta = {k: v for k, v in obj.items() if k not in ("images", "labels")}
    elif isinstance(obj, dict) and "data" in obj:
        data = obj["data"]
        meta = {"format": "official"}
        meta.update({k: obj[k] for k in OFFICIAL_EXTRAS if obj.get(k) is not None})
        if isinstance(data, (list, tuple)) and data and isinstance(data[0], (list, tuple)):
            meta["eval_points"] = len(data)
            data = data[-1]  # res_DataDAM_*.pt keeps one [images, labels] per eval point
        if not (isinstance(data, (list, tuple)) and len(data) == 2):
            raise UserError(f"{path}: expected {{'data': [images, labels]}} (official format)")
        images, labels = data
    else:
        raise UserError(f"{path}: expected a dict with 'images' and 'labels' (datadam-fast) or "
                        f"'data': [images, labels] (official DataDAM release)")
    images = torch.as_tensor(images)
    if images.dim() != 4 or not images.is_floating_point():
        raise UserError(f"{path}: images must be a float [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}")
    labels = _to_int_labels(labels, images.shape[0], path)
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise UserError(f"{path}: {bad} of {images.numel()} pixel values are NaN or Inf; a synthetic set must be "
                        f"finite (networks trained on it learn nothing)")
    images, labels = decoded(images.float(), labels, meta, path)
    return images, labels, meta


def decoded(images: torch.Tensor, labels: torch.Tensor, meta: Dict, where: str):
    """A multi-formation set (``"factor"`` F > 1, not yet ``"decoded"``) as the ``F^2 x`` full-size
    images it trains on; ``meta`` then says ``"decoded": True`` (what exports record)."""
    from ..data.formation import check_factor, decode, decode_labels, recorded_factor
    f = recorded_factor(meta)
    if f == 1:
        return images, labels
    try:
        check_factor(f, images.shape[2:])
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    meta["decoded"] = True
    meta["stored_images"] = int(images.shape[0])
    return decode(images, f), decode_labels(labels, f)


def load_frozen_model(path: str):
    """Read an official ``{"net_parameters": state_dict}`` file (a plain state_dict is accepted too)."""
    obj = _load_file(path, "frozen model")
    if isinstance(obj, dict) and "net_parameters" in obj:
        obj = obj["net_parameters"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected {{'net_parameters': state_dict}}")
    return obj


def load_export_dir(path: str) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
    """Read a folder or tensors export back: ``(images, labels, meta)`` like ``load_synthetic``
    (images in the space the set was learned in: normalised, and whitened again for a ZCA set)."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise UserError(f"{path} is a directory without {META}: expected a folder or tensors export "
                        f"(datadam-fast export), or pass the synthetic set file")
    with open(meta_path) as f:
        m = json.load(f)
    fmt = str(m.get("format", ""))
    meta = {k: m.get(k) for k in ("dataset", "mean", "std", "iteration", "factor", "decoded", "stored_images")
            if m.get(k) is not None}
    if isinstance(m.get("config"), dict):
        meta["config"] = m["config"]
    meta["format"] = fmt
    if m.get("zca"):
        meta["zca"] = torch.load(os.path.join(path, m["zca"]), map_location="cpu", weights_only=True)
    if fmt.startswith("datadam_fast.tensors/"):
        images = torch.load(os.path.join(path, m.get("images", "images.pt")), map_location="cpu", weights_only=True)
        labels = torch.load(os.path.join(path, m.get("labels", "labels.pt")), map_location="cpu", weights_only=True)
        return torch.as_tensor(images).float(), torch.as_tensor(labels).long(), meta
    if not fmt.startswith("datadam_fast.folder/"):
        raise UserError(f"{meta_path}: unknown export format {fmt!r}")
    import numpy as np
    from PIL import Image
    from ..data import ImageDataset
    rows, labels = [], []
    for k, name in enumerate(m["classes"]):
        d = os.path.join(path, name)
        files = sorted((f for f in os.listdir(d) if f.endswith(".png")), key=lambda f: int(os.path.splitext(f)[0]))
        for fn in files:
            arr = np.asarray(Image.open(os.path.join(d, fn)))
            rows.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(k)
    if not rows:
        raise UserError(f"{path}: no PNG images in the class folders")
    u8 = torch.from_numpy(np.stack(rows))
    ds = ImageDataset(meta.get("dataset") or "export", u8, torch.tensor(labels), m["classes"], m["mean"], m["std"])
    images = ds.normalized_all()
    if meta.get("zca") is not None:
        from ..data.zca import ZCA
        images = ZCA.from_state(meta["zca"]).apply(images)
    return images, torch.tensor(labels, dtype=torch.int64), meta


__all__ = ["META", "ZCA_FILE", "OFFICIAL_EXTRAS", "load_synthetic", "load_frozen_model", "load_export_dir", "decoded"]
