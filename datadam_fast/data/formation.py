"""Multi-formation (IDC, Kim et al. ICML 2022): one stored ``H x W`` image holds ``F x F`` images of
``H/F x W/F``, each upsampled back to ``H x W`` for matching and for evaluation, so a storage budget
of IPC images trains on ``F^2 x IPC``.

Order: stored image ``j``'s cell ``(a, b)`` (row ``a``, column ``b``) decodes to row
``j * F^2 + a * F + b``, so class-major stored rows decode to class-major rows (every class keeps
``F^2 x IPC`` consecutive rows, which is what the methods' per-class means assume).

Decoding upsamples bilinearly (``align_corners=False``: IDC's ``nn.Upsample(mode='bilinear')``);
encoding (the initialisation from real images) downsamples with ``area`` (the mean over each
``F x F`` block: an exact box filter, where IDC's default ``nearest`` keeps one pixel in ``F^2``).
Both are linear, so they act in whatever space the images live in (normalised, or ZCA-whitened).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError

MAX_FACTOR = 8


def check_factor(factor, image_size: Sequence[int]) -> int:
    """``factor`` as an int: >= 1, and dividing both sides of the images into cells of >= 2 px."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or factor > MAX_FACTOR:
        raise UserError(f"--factor (factor) = {factor!r}: expected an integer in [1, {MAX_FACTOR}] (1 = one image "
                        f"per stored image)")
    H, W = int(image_size[0]), int(image_size[1])
    if H % factor or W % factor or H // factor < 2 or W // factor < 2:
        fits = [f for f in range(2, MAX_FACTOR + 1) if H % f == 0 and W % f == 0 and H // f >= 2 and W // f >= 2]
        raise UserError(f"--factor {factor}: {H}x{W} images do not split into {factor}x{factor} cells of whole "
                        f"pixels (at least 2x2 each); factors that fit: {', '.join(map(str, [1] + fits))}")
    return factor


def decode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """``[n, C, H, W] -> [n * F^2, C, H, W]``: every cell upsampled to the full size (differentiable)."""
    if factor == 1:
        return images
    n, C, H, W = images.shape
    h, w = H // factor, W // factor
    cells = images.reshape(n, C, factor, h, factor, w).permute(0, 2, 4, 1, 3, 5).reshape(n * factor * factor, C, h, w)
    return F.interpolate(cells, size=(H, W), mode="bilinear", align_corners=False)


def decode_labels(labels: torch.Tensor, factor: int) -> torch.Tensor:
    """The labels of :func:`decode`'s rows."""
    return labels if factor == 1 else labels.repeat_interleave(factor * factor)


def encode(images: torch.Tensor, factor: int) -> torch.Tensor:
    """``[n * F^2, C, H, W] -> [n, C, H, W]``: each group of ``F^2`` consecutive images downsampled
    (``area``) into the cells of one stored image (the inverse order of :func:`decode`)."""
    if factor == 1:
        return images
    m, C, H, W = images.shape
    if m % (factor * factor):
        raise UserError(f"encode: {m} images do not fill whole stored images of {factor}x{factor} cells")
    h, w = H // factor, W // factor
    small = F.interpolate(images.float(), size=(h, w), mode="area")
    n = m // (factor * factor)
    return small.reshape(n, factor, factor, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, C, H, W).contiguous()


def recorded_factor(meta) -> int:
    """The factor a synthetic file's images still have to be decoded with: its ``"factor"``, unless
    it says the images were decoded already (an export)."""
    f = meta.get("factor") if isinstance(meta, dict) else None
    if f is None or meta.get("decoded"):
        return 1
    if isinstance(f, bool) or not isinstance(f, int) or f < 1:
        raise UserError(f"the synthetic set records factor {f!r}: expected an integer >= 1")
    return f


__all__ = ["MAX_FACTOR", "check_factor", "decode", "decode_labels", "encode", "recorded_factor"]
