"""PNG grids of synthetic images (Pillow; no matplotlib)."""
from __future__ import annotations

import numpy as np
import torch

from ._io import atomic_write


def save_grid(images: torch.Tensor, path: str, nrow: int, *, pad: int = 2, min_cell: int = 32) -> None:
    """Save ``images`` ([N, C, H, W] in [0, 1]) as a grid with ``nrow`` images per row.

    Small images (e.g. 8x8 digits) are enlarged by pixel repetition to at least ``min_cell`` px.
    Written atomically (temp file + rename).
    """
    from PIL import Image
    x = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    scale = max(1, -(-min_cell // max(h, w)))
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))
