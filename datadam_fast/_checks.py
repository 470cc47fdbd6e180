"""Input validation: every error names the layer and the shape that was expected."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_power(power) -> float:
    try:
        p = float(power)
    except (TypeError, ValueError):
        raise TypeError(f"power must be a float >= 1, got {power!r}") from None
    if not math.isfinite(p) or p < 1.0:
        raise ValueError(f"power must be a finite float >= 1 (1 = official code, 4 = paper), got {power!r}")
    return p


def check_num_classes(num_classes) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _check_tensor(t, what: str, ndim: int, shape_hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor {shape_hint}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: expected a floating tensor (float32, bfloat16, float16 or float64), "
                        f"got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{what}: expected a {ndim}-d tensor {shape_hint}, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{what}: empty tensor (shape {tuple(t.shape)}); expected {shape_hint} with no zero sizes")


def check_feature_list(feats, side: str, num_classes: Optional[int]) -> list:
    if isinstance(feats, torch.Tensor):
        feats = [feats]
    if not isinstance(feats, (list, tuple)):
        raise TypeError(f"{side} features: expected a list of [N, C, H, W] tensors, got {type(feats).__name__}")
    feats = list(feats)
    for i, f in enumerate(feats):
        _check_tensor(f, f"{side} layer {i}", 4, "[N, C, H, W]")
        if num_classes is not None and f.shape[0] % num_classes:
            raise ValueError(f"{side} layer {i}: batch {f.shape[0]} is not divisible by num_classes={num_classes}; "
                             f"rows must be class-major with the same count per class")
    return feats


def check_pair(real_feats: Sequence[torch.Tensor], syn_feats: Sequence[torch.Tensor]) -> None:
    if len(real_feats) != len(syn_feats):
        raise ValueError(f"real has {len(real_feats)} layers but synthetic has {len(syn_feats)}")
    for i, (r, s) in enumerate(zip(real_feats, syn_feats)):
        if r.shape[1:] != s.shape[1:]:
            raise ValueError(f"layer {i}: real features {tuple(r.shape)} and synthetic features {tuple(s.shape)} "
                             f"differ in [C, H, W]; expected synthetic [N, {r.shape[1]}, {r.shape[2]}, {r.shape[3]}]")


def check_embedding(emb, side: str, num_classes: Optional[int]) -> None:
    _check_tensor(emb, f"{side} embedding", 2, "[N, D]")
    if num_classes is not None and emb.shape[0] % num_classes:
        raise ValueError(f"{side} embedding: batch {emb.shape[0]} is not divisible by num_classes={num_classes}")


def check_same_device(tensors, what: str = "inputs") -> torch.device:
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"{what} are on different devices: {sorted(str(d) for d in devs)}; move them to one device")
    return devs.pop() if devs else torch.device("cpu")
