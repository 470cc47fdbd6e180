"""ResNet18 (and the average-pooling variant) of the DC/DM/DataDAM benchmark code."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from ._base import _FeatureNet, _check_spatial, _check_taps, _conv_out, _im_size

# -------------------------------------------------------------------------------------- ResNet
def _norm_res(norm: str, c: int) -> nn.Module:
    return nn.GroupNorm(c, c, affine=True) if norm == "instancenorm" else nn.BatchNorm2d(c)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "instancenorm"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = _norm_res(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm_res(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                _norm_res(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out)


class _PoolFlatten(nn.Module):
    """The ResNets' final pooling + flatten as a module (no parameters, so state dicts keep the
    official keys), so that the embedding has a name: ``FeatureExtractor(net, [...], embedding="avgpool")``."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.avg_pool2d(x, self.kernel) if self.kernel else x).flatten(1)


class ResNet(_FeatureNet):
    """Official (DC/DataDAM) ResNet with a 3x3 stem, ``avg_pool2d(out, 4)`` and head ``classifier``.

    For inputs whose last stage is smaller than 4x4 the pooling window is clipped to the stage
    size (the official code would fail there); for 32x32 (and 28x28) it is the official 4x4
    window giving a 512-d embedding.
    """

    _block = BasicBlock  # ResNetAP: BasicBlockAP

    def __init__(self, num_blocks: Sequence[int], channel: int = 3, num_classes: int = 10,
                 norm: str = "instancenorm", im_size=(32, 32), taps: str = "blocks"):
        super().__init__()
        name = type(self).__name__
        # no official tap set for ResNets (no ``features``): "official" means "blocks" here
        self.taps = _check_taps(taps, name)
        if norm not in ("instancenorm", "batchnorm"):
            raise ValueError(f"{name} norm must be 'instancenorm' or 'batchnorm', got {norm!r}")
        self.channel, self.num_classes, self.norm = int(channel), int(num_classes), norm
        h, w = _im_size(im_size)
        self.im_size = (h, w)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(self.channel, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _norm_res(norm, 64)
        shapes: List[Tuple[int, int, int]] = []
        stages = []
        for planes, n, stride in zip((64, 128, 256, 512), num_blocks, (1, 2, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (int(n) - 1):
                blocks.append(self._block(self.in_planes, planes, s, norm))
                self.in_planes = planes
                h, w = self._block_out(h, s), self._block_out(w, s)
            _check_spatial(h, w, name)
            stages.append(nn.Sequential(*blocks))
            shapes.append((planes, h, w))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.embedding_dim = 512 * self._pooled_area(h, w)
        self.classifier = nn.Linear(self.embedding_dim, self.num_classes)
        self.feature_shapes = shapes[:-1]
        self.feature_layers = ["layer1", "layer2", "layer3"]

    @staticmethod
    def _block_out(size: int, stride: int) -> int:
        return _conv_out(size, 3, stride, 1)  # the block's strided 3x3 conv

    def _pooled_area(self, h: int, w: int) -> int:
        self._pool = (min(4, h), min(4, w))
        self.avgpool = _PoolFlatten(self._pool)
        return _conv_out(h, self._pool[0], self._pool[0], 0) * _conv_out(w, self._pool[1], self._pool[1], 0)

    def _pool_flat(self, out: torch.Tensor) -> torch.Tensor:
        return self.avgpool(out)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self._pool_flat(out)

    def features_and_embedding(self, x: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        out = F.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(out)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [f1, f2, f3], self._pool_flat(self.layer4(f3))

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.classifier(emb)


class BasicBlockAP(nn.Module):
    """The official ``BasicBlock_AP``: stride-2 convolutions replaced by stride-1 + 2x2 avg-pool.

    Main path: conv3x3 (stride 1) -> norm -> ReLU -> [avg_pool 2x2 if stride != 1] -> conv3x3 -> norm.
    Shortcut (when stride != 1 or the width changes): conv1x1 (stride 1) -> AvgPool2d(2, 2) -> norm,
    so its state-dict keys are ``shortcut.0`` (conv) and ``shortcut.2`` (norm), as officially.
    """
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: str = "instancenorm"):
        super().__init__()
        self.stride = int(stride)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = _norm_res(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = _norm_res(norm, planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            # officially the pool sits in every projection shortcut, whatever the stride (for
            # ResNet18 a projection only occurs at the stride-2 blocks, so the sizes agree)
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, bias=False),
                nn.AvgPool2d(kernel_size=2, stride=2),
                _norm_res(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out)


class ResNetAP(ResNet):
    """The official ``ResNet_AP`` (``ResNet18BN_AP`` with ``norm='batchnorm'``).

    Same stem (conv3x3 stride 1 -> norm -> ReLU) and stages as :class:`ResNet`, but built from
    :class:`BasicBlockAP` (downsampling by 2x2 average pooling, never by strided convolutions), and
    the final pooling is the official ``F.avg_pool2d(out, kernel_size=1, stride=1)`` - an identity -
    so the embedding is the whole flattened last stage: 512x4x4 = 8192-d at 32x32 and 512x3x3 =
    4608-d at 28x28 (the official ``512*3*3 if channel == 1 else 512*4*4``; computed here from the
    input size, which agrees for both official cases). The official ``forward`` returns logits only,
    like every network here. Assumption: the official file is the one in DatasetCondensation /
    DataDAM ``networks.py``; its ``ResNet18BN_AP`` is not given an image size, so other sizes are
    derived by the same layer arithmetic.
    """

    _block = BasicBlockAP

    def __init__(self, num_blocks: Sequence[int], channel: int = 3, num_classes: int = 10,
                 norm: str = "batchnorm", im_size=(32, 32), taps: str = "blocks"):
        super().__init__(num_blocks, channel, num_classes, norm, im_size, taps)

    @staticmethod
    def _block_out(size: int, stride: int) -> int:
        return size // 2 if stride != 1 else size  # stride-1 convs, then AvgPool2d(2, 2)

    def _pooled_area(self, h: int, w: int) -> int:
        self.avgpool = _PoolFlatten(None)  # official avg_pool2d(kernel_size=1, stride=1) is the identity
        return h * w
