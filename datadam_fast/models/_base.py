"""Shared pieces of the networks (:mod:`.networks`, :mod:`.resnet`): checks, norm and activation
layers, and the feature-tap base classes."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn
import torch.nn.functional as F

NORMS = ("instancenorm", "batchnorm", "groupnorm", "layernorm", "none")
_ACTS = ("relu", "leakyrelu", "sigmoid", "swish")
TAPS = ("blocks", "official")  # see the docstring of networks.py
_POOL_ALIASES = {"avgpool": "avgpool", "avgpooling": "avgpool", "maxpool": "maxpool",
                 "maxpooling": "maxpool", "none": "none"}


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _check_spatial(h: int, w: int, what: str) -> None:
    if h < 1 or w < 1:
        raise ValueError(f"{what}: the input is too small, the spatial size drops to {h}x{w}")


def _check_taps(taps: str, what: str) -> str:
    if taps not in TAPS:
        raise ValueError(f"{what}: unknown taps {taps!r}; choose from {TAPS}")
    return taps


def _im_size(im_size) -> Tuple[int, int]:
    if isinstance(im_size, int):
        return int(im_size), int(im_size)
    h, w = im_size
    return int(h), int(w)


def _norm2d(norm: str, c: int, h: int, w: int) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm2d(c, affine=True)
    if norm == "instancenorm":
        return nn.GroupNorm(c, c, affine=True)
    if norm == "groupnorm":
        return nn.GroupNorm(4, c, affine=True)
    if norm == "layernorm":
        return nn.LayerNorm([c, h, w], elementwise_affine=True)
    raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")


def _act(act: str) -> nn.Module:
    if act == "relu":
        return nn.ReLU(inplace=False)
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01, inplace=False)
    if act == "sigmoid":
        return nn.Sigmoid()
    if act == "swish":
        return nn.SiLU(inplace=False)  # x * sigmoid(x), the official Swish (no parameters)
    raise ValueError(f"unknown activation {act!r}; choose from {_ACTS}")


class _FeatureNet(nn.Module):
    """Shared API: ``forward`` -> logits, ``embed``, ``features_and_embedding``."""

    embedding_dim: int
    feature_shapes: List[Tuple[int, int, int]]  # [C, H, W] of each returned feature map

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features_and_embedding(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))

    def embed_and_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(emb, logits)`` in one pass: what the official networks' ``forward`` returns."""
        emb = self.embed(x)
        return emb, self.head(emb)


class _SequentialTapNet(_FeatureNet):
    """A network whose body is ``self.features`` (nn.Sequential) followed by a linear head.

    ``self._taps``: indices into ``features`` whose outputs ``features_and_embedding`` returns.
    """

    features: nn.Sequential
    _taps: Tuple[int, ...]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def features_and_embedding(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        taps = self._taps
        feats: List[torch.Tensor] = []
        for i, m in enumerate(self.features):
            x = m(x)
            if i in taps:
                feats.append(x)
        return feats, x.flatten(1)

    @property
    def feature_layers(self) -> List[str]:
        """Module names (as in ``named_modules``) of the tapped outputs, e.g. for hooks."""
        return [f"features.{i}" for i in self._taps]
