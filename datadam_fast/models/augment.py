"""Batched, generator-driven Differentiable Siamese Augmentation (DSA).

The six op families and their parameter distributions are those of the official DSA code
(``DatasetCondensation/utils.py``, reused unchanged by DataDAM), with ``ParamDiffAug`` defaults:

======== ===================================================================================
color    brightness ``x + (b - 0.5) * 1.0``, then saturation ``(x - mean_c x) * (2.0 s) + mean_c x``,
         then contrast ``(x - mean_chw x) * (c + 0.5) + mean_chw x``; ``b, s, c ~ U[0, 1)``
crop     integer shift ``tx ~ U{-sh..sh}`` along H, ``ty ~ U{-sw..sw}`` along W,
         ``sh = int(H * 0.125 + 0.5)``: ``out[i, j] = x[i + tx, j + ty]`` (0 outside the image)
cutout   a ``ch x cw`` zero rectangle, ``ch = int(H * 0.5 + 0.5)``, centred at
         ``ox ~ U{0..H - (ch % 2)}`` (rows ``ox - ch//2 .. ox - ch//2 + ch - 1``, clipped), same on W
flip     horizontal flip (last dim) if ``u < 0.5``, ``u ~ U[0, 1)``
scale    ``affine_grid`` with ``[[sx, 0, 0], [0, sy, 0]]``, ``sx, sy ~ U[1/1.2, 1.2)``
rotate   ``affine_grid`` with ``[[cos t, -sin t, 0], [sin t, cos t, 0]]``, ``t ~ U[-15, 15)`` degrees
======== ===================================================================================

``grid_sample`` is bilinear, zero padding, ``align_corners=False`` (the defaults the official code
relies on). In mode ``'S'`` (official default) one family is drawn uniformly from the strategy
list (a family listed twice is drawn twice as often, as officially) and applied; in mode ``'M'``
every family of the strategy is applied once, in order of first appearance (the official code
would apply a repeated family twice).

**Siamese use** (distillation)::

    dsa = DSA()
    p = dsa.sample(K, gen, device, (H, W))       # one transform (family + params) per class
    xr = dsa.apply(x_real, p, labels_real)        # every row gets its class's transform
    xs = dsa.apply(x_syn, p, labels_syn)          # the same transforms on the synthetic side

so real and synthetic images of a class see the identical transform and classes get independent
ones, in two batched calls. (Officially: one ``DiffAugment`` call per class and side, each with a
wall-clock-ms seed that re-seeds the global RNG, so that the whole class batch shares sample 0's
parameters; consecutive classes often got the same seed.)

**Non-Siamese use** (training evaluation networks, official ``seed=-1``): ``dsa(x, gen)`` draws
*one family for the whole batch* (mode 'S') and independent parameters per sample, exactly like
the official per-batch ``DiffAugment(x, strategy, param=...)``. Passing ``group=`` instead gives
per-group families and parameters.

All randomness comes from the given ``torch.Generator`` (drawn on its device, then moved), never
from the global RNG. :meth:`DSA.apply` is fully batched (a loop over at most six families), has no
host synchronisation and is differentiable w.r.t. ``x``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["ParamDiffAug", "DSAParams", "DSA", "DSA_FAMILIES", "DEFAULT_STRATEGY"]

DSA_FAMILIES: Tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclass
class ParamDiffAug:
    """The official DSA hyper-parameters (``utils.ParamDiffAug``)."""
    aug_mode: str = "S"          # 'S': one family per transform; 'M': all families in sequence
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0   # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5    # cutout size = 0.5 H x 0.5 W
    ratio_noise: float = 0.05    # unused by the official code (no 'noise' family), kept for parity
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


@dataclass
class DSAParams:
    """One transform per group. Tensors have leading size ``num_groups``; absent families are None.

    ``family[g]`` indexes :data:`DSA_FAMILIES` (mode 'S'; ``None`` in mode 'M' = all families).
    ``present``: names of the families used by at least one group (host side, so ``apply`` needs
    no device synchronisation). ``crop``/``cutout`` are long ``[G, 2]`` (H offset, W offset),
    ``scale`` is ``[G, 2]`` (sx, sy), ``rotate`` radians, ``flip`` bool.
    """
    num_groups: int
    image_size: Tuple[int, int]
    present: Tuple[str, ...]
    family: Optional[torch.Tensor] = None
    brightness: Optional[torch.Tensor] = None
    saturation: Optional[torch.Tensor] = None
    contrast: Optional[torch.Tensor] = None
    crop: Optional[torch.Tensor] = None
    cutout: Optional[torch.Tensor] = None
    flip: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    rotate: Optional[torch.Tensor] = None

    def to(self, device) -> "DSAParams":
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return DSAParams(**kw)


def _parse_strategy(strategy: Optional[str]) -> List[str]:
    if strategy is None or strategy in ("", "none", "None"):
        return []
    ops = strategy.split("_")
    bad = [o for o in ops if o not in DSA_FAMILIES]
    if bad:
        raise ValueError(f"unknown DSA op(s) {bad} in strategy {strategy!r}; known: {DSA_FAMILIES}")
    return ops


def _crop_pad(size: int, ratio: float) -> int:
    return int(size * ratio + 0.5)


class DSA:
    """Differentiable Siamese Augmentation with explicit, batched per-group parameters."""

    def __init__(self, strategy: str = DEFAULT_STRATEGY, params: Optional[ParamDiffAug] = None):
        self.strategy = strategy
        self.params = params if params is not None else ParamDiffAug()
        if self.params.aug_mode not in ("S", "M"):
            raise ValueError(f"unknown aug_mode {self.params.aug_mode!r} (expected 'S' or 'M')")
        self.ops: List[str] = _parse_strategy(strategy)   # with repetitions (draw weights in 'S')
        self.families: List[str] = list(dict.fromkeys(self.ops))  # unique, in strategy order

    @property
    def enabled(self) -> bool:
        return bool(self.ops)

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, params={self.params!r})"

    # ----------------------------------------------------------------------------- sampling
    def sample(self, num_groups: int, generator: torch.Generator, device=None,
               image_size: Optional[Sequence[int]] = None, *, shared_family: bool = False) -> DSAParams:
        """Draw one transform per group: the family (mode 'S') and every parameter of it.

        ``shared_family=True``: a single family for all groups (the official per-batch draw of
        non-Siamese DSA). ``image_size`` = (H, W), needed for crop/cutout. Draws are made on
        ``generator.device`` in a fixed order (so results depend only on the generator state) and
        moved to ``device`` (default: the generator's device).
        """
        G = int(num_groups)
        if G < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if not isinstance(generator, torch.Generator):
            raise TypeError("DSA.sample needs a torch.Generator (the global RNG is never used)")
        g, gdev = generator, generator.device
        device = torch.device(device) if device is not None else gdev
        if image_size is None:
            if "crop" in self.families or "cutout" in self.families:
                raise ValueError("DSA.sample: image_size=(H, W) is needed for crop/cutout")
            H = W = 0
        else:
            H, W = (int(image_size), int(image_size)) if isinstance(image_size, int) else map(int, image_size)
        p = self.params
        if not self.ops:
            return DSAParams(G, (H, W), ())

        family = None
        if p.aug_mode == "S":
            n = 1 if shared_family else G
            choice = torch.randint(0, len(self.ops), (n,), generator=g, device=gdev)
            op_to_fam = torch.tensor([DSA_FAMILIES.index(o) for o in self.ops], device=gdev)
            family = op_to_fam[choice].expand(G).contiguous()
            present_idx = set(family.unique().tolist())  # host-side, one tiny sync if on GPU
            present = tuple(f for f in self.families if DSA_FAMILIES.index(f) in present_idx)
        else:
            present = tuple(self.families)

        out: Dict[str, torch.Tensor] = {}

        def rand(*shape):
            return torch.rand(*shape, generator=g, device=gdev)

        for fam in self.families:  # fixed order; every family of the strategy is always drawn
            if fam == "color":
                out["brightness"] = rand(G)
                out["saturation"] = rand(G)
                out["contrast"] = rand(G)
            elif fam == "crop":
                sh, sw = _crop_pad(H, p.ratio_crop_pad), _crop_pad(W, p.ratio_crop_pad)
                tx = torch.randint(-sh, sh + 1, (G,), generator=g, device=gdev)
                ty = torch.randint(-sw, sw + 1, (G,), generator=g, device=gdev)
                out["crop"] = torch.stack([tx, ty], 1)
            elif fam == "cutout":
                ch, cw = _crop_pad(H, p.ratio_cutout), _crop_pad(W, p.ratio_cutout)
                ox = torch.randint(0, H + (1 - ch % 2), (G,), generator=g, device=gdev)
                oy = torch.randint(0, W + (1 - cw % 2), (G,), generator=g, device=gdev)
                out["cutout"] = torch.stack([ox, oy], 1)
            elif fam == "flip":
                out["flip"] = rand(G) < p.prob_flip
            elif fam == "scale":
                r = p.ratio_scale
                out["scale"] = rand(G, 2) * (r - 1.0 / r) + 1.0 / r
            elif fam == "rotate":
                out["rotate"] = (rand(G) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
        res = DSAParams(G, (H, W), present, family=family, **out)
        return res.to(device) if device != gdev else res

    # ------------------------------------------------------------------------------- apply
    def apply(self, x: torch.Tensor, params: DSAParams, group: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Row ``i`` of ``x`` [N, C, H, W] gets transform ``group[i]`` of ``params``.

        ``group=None`` means row i -> group i (needs ``params.num_groups == N``). Differentiable
        w.r.t. ``x``; shape, dtype, device and (channels_last) memory format are preserved.
        """
        if x.dim() != 4:
            raise ValueError(f"DSA expects [N, C, H, W] images, got shape {tuple(x.shape)}")
        if not params.present:
            return x
        N, C, H, W = x.shape
        dev = x.device
        if group is None:
            if params.num_groups != N:
                raise ValueError(f"group=None needs num_groups == N ({params.num_groups} != {N})")
            group = torch.arange(N, device=dev)
        else:
            group = torch.as_tensor(group, device=dev).long().reshape(-1)
            if group.shape[0] != N:
                raise ValueError(f"group has {group.shape[0]} entries for {N} images")
        if ("crop" in params.present or "cutout" in params.present) and (H, W) != tuple(params.image_size):
            raise ValueError(f"params were sampled for image size {tuple(params.image_size)}, got {(H, W)}")
        pdev = next((getattr(params, f.name).device for f in fields(params)
                     if isinstance(getattr(params, f.name), torch.Tensor)), dev)
        if pdev != dev:
            params = params.to(dev)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)

        single = params.family is None or len(params.present) == 1  # every row is transformed
        row_fam = None if single else params.family[group]

        def rows(fams: Sequence[str]) -> Optional[torch.Tensor]:
            """[N] bool mask of rows whose family is in ``fams`` (None = all rows)."""
            if single:
                return None
            m = torch.zeros(N, dtype=torch.bool, device=dev)
            for f in fams:
                m = m | (row_fam == DSA_FAMILIES.index(f))
            return m

        def select(mask, new, old):
            return new if mask is None else torch.where(mask.view(-1, 1, 1, 1), new, old)

        out = x
        affine_done = False
        for fam in self.families:
            if fam not in params.present:
                continue
            if fam in ("scale", "rotate") and params.family is not None:
                # mode 'S': each row has one family, so scale and rotate share one grid_sample
                if affine_done:
                    continue
                affine_done = True
                fams = [f for f in ("scale", "rotate") if f in params.present]
                out = select(rows(fams), self._affine(out, params, group, fams, row_fam, single), out)
                continue
            if fam == "color":
                new = self._color(out, params, group)
            elif fam == "crop":
                new = self._crop(out, params.crop[group])
            elif fam == "cutout":
                new = self._cutout(out, params.cutout[group])
            elif fam == "flip":
                new = torch.where(params.flip[group].view(-1, 1, 1, 1), out.flip(3), out)
            else:  # 'M' mode scale / rotate: separate passes in strategy order (as official)
                new = self._affine(out, params, group, [fam], None, True)
            out = select(rows([fam]), new, out)
        return out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def __call__(self, x: torch.Tensor, generator: torch.Generator, group: Optional[torch.Tensor] = None,
                 num_groups: Optional[int] = None) -> torch.Tensor:
        """Sample and apply in one go.

        ``group=None``: non-Siamese, as the official evaluation-time DSA: one family drawn for the
        whole batch (mode 'S'), independent parameters per sample. With ``group`` (ids in
        ``[0, num_groups)``; ``num_groups`` defaults to ``group.max() + 1``, a host sync): each
        group gets its own family and parameters.
        """
        if not self.ops:
            return x
        size = tuple(x.shape[-2:])
        if group is None:
            params = self.sample(x.shape[0], generator, x.device, size, shared_family=True)
            return self.apply(x, params, None)
        group = torch.as_tensor(group, device=x.device).long()
        G = int(num_groups) if num_groups is not None else int(group.max().item()) + 1
        return self.apply(x, self.sample(G, generator, x.device, size), group)

    # --------------------------------------------------------------------------- the ops
    def _color(self, x: torch.Tensor, params: DSAParams, group: torch.Tensor) -> torch.Tensor:
        p = self.params
        b = params.brightness[group].to(x.dtype).view(-1, 1, 1, 1)
        s = params.saturation[group].to(x.dtype).view(-1, 1, 1, 1)
        c = params.contrast[group].to(x.dtype).view(-1, 1, 1, 1)
        x = x + (b - 0.5) * p.brightness
        m = x.mean(dim=1, keepdim=True)
        x = (x - m) * (s * p.saturation) + m
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - m) * (c + p.contrast) + m

    @staticmethod
    def _crop(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        ii = torch.arange(H, device=x.device).view(1, H) + shift[:, :1]   # [N, H] source rows
        jj = torch.arange(W, device=x.device).view(1, W) + shift[:, 1:]   # [N, W] source cols
        valid = ((ii >= 0) & (ii < H)).view(N, H, 1) & ((jj >= 0) & (jj < W)).view(N, 1, W)
        idx = ii.clamp(0, H - 1).view(N, H, 1) * W + jj.clamp(0, W - 1).view(N, 1, W)  # [N, H, W]
        src = x.reshape(N, C, H * W)
        out = src.gather(2, idx.view(N, 1, H * W).expand(N, C, H * W)).view(N, C, H, W)
        return torch.where(valid.view(N, 1, H, W), out, out.new_zeros(()))

    def _cutout(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        ch, cw = _crop_pad(H, self.params.ratio_cutout), _crop_pad(W, self.params.ratio_cutout)
        lo_i = offset[:, :1] - ch // 2
        lo_j = offset[:, 1:] - cw // 2
        i = torch.arange(H, device=x.device).view(1, H)
        j = torch.arange(W, device=x.device).view(1, W)
        in_i = (i >= lo_i) & (i <= lo_i + ch - 1)   # clipped rows are inside the image anyway
        in_j = (j >= lo_j) & (j <= lo_j + cw - 1)
        keep = ~(in_i.view(N, H, 1) & in_j.view(N, 1, W))
        return x * keep.view(N, 1, H, W).to(x.dtype)

    @staticmethod
    def _affine(x: torch.Tensor, params: DSAParams, group: torch.Tensor, fams: Sequence[str],
                row_fam: Optional[torch.Tensor], single: bool) -> torch.Tensor:
        N = x.shape[0]
        theta = torch.zeros(N, 2, 3, device=x.device, dtype=torch.float32)
        theta[:, 0, 0] = 1.0
        theta[:, 1, 1] = 1.0
        for f in fams:
            if f == "scale":
                sxy = params.scale[group].float()
                t = torch.zeros_like(theta)
                t[:, 0, 0] = sxy[:, 0]
                t[:, 1, 1] = sxy[:, 1]
            else:
                a = params.rotate[group].float()
                cos, sin = torch.cos(a), torch.sin(a)
                t = torch.stack([torch.stack([cos, -sin, torch.zeros_like(a)], 1),
                                 torch.stack([sin, cos, torch.zeros_like(a)], 1)], 1)
            if single:
                theta = t
            else:
                theta = torch.where((row_fam == DSA_FAMILIES.index(f)).view(N, 1, 1), t, theta)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False).to(x.dtype)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
