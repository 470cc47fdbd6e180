"""Input validation: every error names the layer and the shape that was expected."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..errors import UserError, UserTypeError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_power(power) -> float:
    try:
        p = float(power)
    except (TypeError, ValueError):
        raise UserTypeError(f"power must be a float >= 1, got {power!r}") from None
    if not math.isfinite(p) or p < 1.0:
        raise UserError(f"power must be a finite float >= 1 (1 = official code, 4 = paper), got {power!r}")
    return p


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _check_tensor(t, what: str, ndim: int, shape_hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise UserTypeError(f"{what}: expected a torch.Tensor {shape_hint}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise UserTypeError(f"{what}: expected a floating tensor (float32, bfloat16, float16 or float64), "
                        f"got dtype {t.dtype}")
    if t.dim() != ndim:
        raise UserError(f"{what}: expected a {ndim}-d tensor {shape_hint}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise UserError(f"{what}: empty tensor (shape {tuple(t.shape)}); expected {shape_hint} with no zero sizes")


def check_feature_list(feats, side: str, num_classes: Optional[int]) -> list:
    if isinstance(feats, torch.Tensor):
        feats = [feats]
    if not isinstance(feats, (list, tuple)):
        raise UserTypeError(f"{side} features: expected a list of [N, C, H, W] tensors, got {type(feats).__name__}")
    feats = list(feats)
    for i, f in enumerate(feats):
        _check_tensor(f, f"{side} layer {i}", 4, "[N, C, H, W]")
        if num_classes is not None and f.shape[0] % num_classes:
            raise UserError(f"{side} layer {i}: batch {f.shape[0]} is not divisible by num_classes={num_classes}; "
                             f"rows must be class-major with the same count per class, or pass labels")
    return feats


def check_pair(real_feats: Sequence[torch.Tensor], syn_feats: Sequence[torch.Tensor]) -> None:
    if len(real_feats) != len(syn_feats):
        raise UserError(f"real has {len(real_feats)} layers but synthetic has {len(syn_feats)}")
    for i, (r, s) in enumerate(zip(real_feats, syn_feats)):
        if r.shape[1:] != s.shape[1:]:
            raise UserError(f"layer {i}: real features {tuple(r.shape)} and synthetic features {tuple(s.shape)} "
                             f"differ in [C, H, W]; expected synthetic [N, {r.shape[1]}, {r.shape[2]}, {r.shape[3]}]")


def check_embedding(emb, side: str, num_classes: Optional[int]) -> None:
    _check_tensor(emb, f"{side} embedding", 2, "[N, D]")
    if num_classes is not None and emb.shape[0] % num_classes:
        raise UserError(f"{side} embedding: batch {emb.shape[0]} is not divisible by num_classes={num_classes}; "
                        f"rows must be class-major with the same count per class, or pass labels")


def check_same_device(tensors, what: str = "inputs") -> torch.device:
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise UserError(f"{what} are on different devices: {sorted(str(d) for d in devs)}; move them to one device")
    return devs.pop() if devs else torch.device("cpu")


def check_rows(side: str, feats: Sequence[torch.Tensor], emb: Optional[torch.Tensor],
               labels: Optional[torch.Tensor], num_classes: int,
               label_name: Optional[str] = None) -> Optional[torch.Tensor]:
    """Every layer and the embedding of one side hold the same rows; ``labels`` index them.

    Returns the labels (validated) or None. Label *values* are checked by
    :func:`check_label_values` (host-side, only where that is free).
    """
    lname = label_name or f"{side}_labels"
    ts = [("layer %d" % i, f) for i, f in enumerate(feats)] + ([("embedding", emb)] if emb is not None else [])
    if not ts:
        if labels is not None:
            raise UserError(f"{lname} given but the {side} side has no features or embedding")
        return None
    n0 = ts[0][1].shape[0]
    for what, t in ts[1:]:
        if t.shape[0] != n0:
            raise UserError(f"{side} {what} has {t.shape[0]} rows but {side} {ts[0][0]} has {n0}; every layer and "
                            f"the embedding of one side must come from the same batch")
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point \
            or labels.dtype == torch.bool or labels.is_complex():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise UserTypeError(f"{lname}: expected a 1-d integer tensor of class indices, one per row, got {shape}"
                            + (f" {labels.dtype}" if isinstance(labels, torch.Tensor) else ""))
    if labels.shape[0] != n0:
        raise UserError(f"{lname} has {labels.shape[0]} entries but the {side} features have {n0} rows")
    return labels


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def check_label_values(name: str, labels: torch.Tensor, num_classes: int) -> None:
    """Range and coverage of CPU labels (a cheap host check). Labels on an accelerator are not read
    back (that would be a device sync per step): an out-of-range index then fails inside
    ``index_add`` and an empty class gives a NaN loss, never a silently wrong one."""
    if labels.device.type != "cpu" or torch.compiler.is_compiling() or labels.numel() == 0 \
            or _is_fake(labels):
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise UserError(f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]")
    present = torch.zeros(num_classes, dtype=torch.bool)
    present[labels] = True
    if not bool(present.all()):
        missing = (~present).nonzero().flatten().tolist()
        raise UserError(f"{name}: classes {missing[:10]}{'...' if len(missing) > 10 else ''} have no rows; "
                        f"every class needs at least one sample")
