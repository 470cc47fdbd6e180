"""Networks of the official DataDAM / DatasetCondensation code, with the same state-dict keys.

Every network here returns **logits** from ``net(x)`` (the official ones return ``(emb, logits)``)
and offers

* ``net.embed(x)`` -> ``[N, D]``: the flattened final embedding (what the official ``net(x)[0]``
  is: for ConvNet the output of ``features`` after the last activation *and* the last pooling);
* ``net.features_and_embedding(x)`` -> ``(feats, emb)``: ``feats`` is a list of intermediate
  activations, one per resolution stage **except the last** (the last stage is covered by the
  embedding, as in DataDAM), ``emb`` is ``net.embed(x)``. Computed in one pass, no hooks, no
  copies. What the stages are:

  - ConvNet: the activation output of every block but the last, before pooling (exactly the
    tensors DataDAM's forward hooks on ``nn.ReLU`` capture: depth 3 on 32x32 ->
    ``[N,128,32,32]``, ``[N,128,16,16]``);
  - AlexNet(BN): the ReLU output preceding each of the first two max-pools
    (``[N,128,32,32]``, ``[N,192,16,16]`` on 32x32);
  - VGG11(BN): the ReLU output preceding each of the first four max-pools
    (``[N,64,32,32]``, ``[N,128,16,16]``, ``[N,256,8,8]``, ``[N,512,4,4]``);
  - ResNet18(BN): the outputs of ``layer1``, ``layer2``, ``layer3``.

  That is ``taps="blocks"`` (the default). DataDAM itself hooks *every* ``nn.ReLU`` inside
  ``net.features`` and drops the last one; ``taps="official"`` gives exactly that set:

  - ConvNet: identical to ``"blocks"`` (one ReLU per block);
  - AlexNet(BN): the outputs of the first four of its five ReLUs (``[N,128,32,32]``,
    ``[N,192,16,16]``, ``[N,256,8,8]``, ``[N,192,8,8]`` on 32x32);
  - VGG11(BN): the outputs of the first seven of its eight ReLUs;
  - ResNet: the official networks have no ``features`` (the official hooks would find nothing and
    the official loop cannot run them), so ``"official"`` falls back to ``"blocks"``.

Activations are never in-place, so returned tensors are not overwritten later.

Initialisation: PyTorch's default (kaiming_uniform_(a=sqrt(5)) on weights, U(+-1/sqrt(fan_in)) on
biases). With ``generator=`` the conv/linear parameters are re-drawn from that generator in
module-construction order (so ``get_network(..., generator=torch.Generator().manual_seed(s))``
equals ``torch.manual_seed(s); get_network(...)`` on the CPU) and the global RNG is left
untouched. Without a generator the global RNG is used exactly as PyTorch does; nothing is ever
seeded from the clock (unlike the official ``get_network``).

Shapes are computed by conv/pool arithmetic for any input size. The official 28x28 quirk comes
out naturally: with ``channel == 1`` the first conv has padding 3, so 28x28 becomes 32x32 (MNIST
with a depth-3 ConvNet gives a 2048-d embedding, as in the official code).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from ._base import (  # noqa: F401 - re-exported: networks is the models' public module
    NORMS, _ACTS, TAPS, _POOL_ALIASES, _conv_out, _check_spatial, _check_taps, _im_size, _norm2d, _act, _FeatureNet, _SequentialTapNet)
from .resnet import BasicBlock, BasicBlockAP, ResNet, ResNetAP, _norm_res, _PoolFlatten  # noqa: F401

__all__ = [
    "NETWORK_NAMES", "get_network", "default_depth", "load_official_state_dict",
    "ConvNet", "AlexNet", "VGG", "ResNet", "BasicBlock", "ResNetAP", "BasicBlockAP", "init_from_generator",
    "TAPS", "describe_network", "infer_network_from_state_dict",
]



# ------------------------------------------------------------------------------------- ConvNet
class ConvNet(_SequentialTapNet):
    """The DC/DM/DataDAM ConvNet: ``depth`` x [Conv3x3(width) -> norm -> act -> pool] -> Linear.

    ``features`` indices follow the official layout exactly (the norm module is omitted when
    ``norm='none'``, the pooling module when ``pooling='none'``), the head is ``classifier``.
    """

    def __init__(self, channel: int, num_classes: int, width: int = 128, depth: int = 3,
                 act: str = "relu", norm: str = "instancenorm", pooling: str = "avgpool",
                 im_size=(32, 32), taps: str = "blocks"):
        super().__init__()
        # one activation per block: the official hook set equals the per-block set
        self.taps = _check_taps(taps, "ConvNet")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
        if act not in _ACTS:
            raise ValueError(f"unknown activation {act!r}; choose from {_ACTS}")
        if pooling not in _POOL_ALIASES:
            raise ValueError(f"unknown pooling {pooling!r}; choose from {tuple(_POOL_ALIASES)}")
        if int(depth) < 1 or int(width) < 1:
            raise ValueError(f"depth and width must be >= 1, got depth={depth}, width={width}")
        pooling = _POOL_ALIASES[pooling]
        self.channel, self.num_classes = int(channel), int(num_classes)
        self.width, self.depth, self.act, self.norm, self.pooling = int(width), int(depth), act, norm, pooling
        h, w = _im_size(im_size)
        self.im_size = (h, w)
        layers: List[nn.Module] = []
        act_idx: List[int] = []
        shapes: List[Tuple[int, int, int]] = []
        c_in = self.channel
        for d in range(self.depth):
            pad = 3 if self.channel == 1 and d == 0 else 1
            layers.append(nn.Conv2d(c_in, self.width, kernel_size=3, padding=pad))
            h, w = _conv_out(h, 3, 1, pad), _conv_out(w, 3, 1, pad)
            _check_spatial(h, w, "ConvNet")
            if norm != "none":
                layers.append(_norm2d(norm, self.width, h, w))
            layers.append(_act(act))
            act_idx.append(len(layers) - 1)
            shapes.append((self.width, h, w))
            if pooling != "none":
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avgpool" else nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
                _check_spatial(h, w, "ConvNet")
            c_in = self.width
        self.features = nn.Sequential(*layers)
        self.embedding_dim = self.width * h * w
        self.embedding_shape = (self.width, h, w)
        self.classifier = nn.Linear(self.embedding_dim, self.num_classes)
        self._taps = tuple(act_idx[:-1])
        self.feature_shapes = shapes[:-1]

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.classifier(emb)


# ------------------------------------------------------------------------------------- AlexNet
class AlexNet(_SequentialTapNet):
    """Official AlexNet (conv 128-192-256-192-192, k5/k5/k3/k3/k3, ReLU, 3 max-pools), head ``fc``.

    ``norm='batchnorm'`` gives AlexNetBN (BatchNorm2d after every conv); ``'none'`` the plain one.
    """

    def __init__(self, channel: int, num_classes: int, norm: str = "none", im_size=(32, 32),
                 taps: str = "blocks"):
        super().__init__()
        self.taps = _check_taps(taps, "AlexNet")
        if norm not in ("none", "batchnorm", "instancenorm"):
            raise ValueError(f"AlexNet norm must be 'none', 'batchnorm' or 'instancenorm', got {norm!r}")
        self.channel, self.num_classes, self.norm = int(channel), int(num_classes), norm
        h, w = _im_size(im_size)
        self.im_size = (h, w)
        # (out_channels, kernel, padding, pool after)
        cfg = [(128, 5, 4 if self.channel == 1 else 2, True), (192, 5, 2, True),
               (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True)]
        layers: List[nn.Module] = []
        block_taps: List[Tuple[int, Tuple[int, int, int]]] = []  # ReLU before each max-pool
        relu_taps: List[Tuple[int, Tuple[int, int, int]]] = []   # every ReLU (official hooks)
        c_in = self.channel
        for c_out, k, p, pool in cfg:
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=k, stride=1, padding=p))
            h, w = _conv_out(h, k, 1, p), _conv_out(w, k, 1, p)
            _check_spatial(h, w, "AlexNet")
            if norm != "none":
                layers.append(_norm2d(norm, c_out, h, w))
            layers.append(nn.ReLU(inplace=False))
            relu_taps.append((len(layers) - 1, (c_out, h, w)))
            if pool:
                block_taps.append((len(layers) - 1, (c_out, h, w)))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                h, w = h // 2, w // 2
                _check_spatial(h, w, "AlexNet")
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.embedding_dim = 192 * h * w
        self.fc = nn.Linear(self.embedding_dim, self.num_classes)
        chosen = (relu_taps if taps == "official" else block_taps)[:-1]  # the last is the embedding's
        self._taps = tuple(i for i, _ in chosen)
        self.feature_shapes = [sh for _, sh in chosen]

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.fc(emb)


# ----------------------------------------------------------------------------------------- VGG
_CFG_VGG = {
    "VGG11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "VGG16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(_SequentialTapNet):
    """Official VGG: [conv3x3 -> norm -> ReLU] blocks and max-pools ('M'), head ``classifier``.

    ``norm='instancenorm'`` is GroupNorm(C, C) (official VGG11), ``'batchnorm'`` gives VGG11BN.
    The official trailing ``AvgPool2d(kernel_size=1, stride=1)`` is an identity and is omitted
    (it has no parameters and comes last, so the state-dict keys are unchanged).
    """

    def __init__(self, vgg_name: str, channel: int, num_classes: int, norm: str = "instancenorm",
                 im_size=(32, 32), taps: str = "blocks"):
        super().__init__()
        self.taps = _check_taps(taps, vgg_name)
        if norm not in ("instancenorm", "batchnorm"):
            raise ValueError(f"VGG norm must be 'instancenorm' or 'batchnorm', got {norm!r}")
        self.channel, self.num_classes, self.norm = int(channel), int(num_classes), norm
        h, w = _im_size(im_size)
        self.im_size = (h, w)
        layers: List[nn.Module] = []
        block_taps: List[Tuple[int, Tuple[int, int, int]]] = []  # ReLU before each max-pool
        relu_taps: List[Tuple[int, Tuple[int, int, int]]] = []   # every ReLU (official hooks)
        c_in = self.channel
        for ic, v in enumerate(_CFG_VGG[vgg_name]):
            if v == "M":
                block_taps.append((len(layers) - 1, (c_in, h, w)))
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                h, w = h // 2, w // 2
                _check_spatial(h, w, vgg_name)
            else:
                pad = 3 if self.channel == 1 and ic == 0 else 1
                layers.append(nn.Conv2d(c_in, v, kernel_size=3, padding=pad))
                h, w = _conv_out(h, 3, 1, pad), _conv_out(w, 3, 1, pad)
                layers += [_norm2d(norm, v, h, w), nn.ReLU(inplace=False)]
                relu_taps.append((len(layers) - 1, (v, h, w)))
                c_in = v
        self.features = nn.Sequential(*layers)
        self.embedding_dim = c_in * h * w
        self.classifier = nn.Linear(self.embedding_dim, self.num_classes)
        chosen = (relu_taps if taps == "official" else block_taps)[:-1]  # the last is the embedding's
        self._taps = tuple(i for i, _ in chosen)
        self.feature_shapes = [sh for _, sh in chosen]

    def head(self, emb: torch.Tensor) -> torch.Tensor:
        return self.classifier(emb)


# ------------------------------------------------------------------------------------ registry
# name -> (family, kwargs). ConvNet defaults: width 128, depth 3, relu, avgpool; "norm" below.
_CONVNET_REGISTRY: Dict[str, Dict[str, object]] = {
    # Our ConvNet defaults to instancenorm (paper / HP table); the official registry's 'ConvNet'
    # is the BN one -> use 'ConvNetBN' to reproduce the official code and load released weights.
    "ConvNet": {},
    "ConvNetBN": {"norm": "batchnorm"},
    "ConvNetIN": {"norm": "instancenorm"},
    "ConvNetNN": {"norm": "none"},
    "ConvNetLN": {"norm": "layernorm"},
    "ConvNetGN": {"norm": "groupnorm"},
    "ConvNetD1": {"depth": 1}, "ConvNetD2": {"depth": 2}, "ConvNetD3": {"depth": 3},
    "ConvNetD4": {"depth": 4}, "ConvNetD5": {"depth": 5}, "ConvNetD6": {"depth": 6},
    "ConvNetW32": {"width": 32}, "ConvNetW64": {"width": 64}, "ConvNetW128": {"width": 128},
    "ConvNetW256": {"width": 256},
    "ConvNetAS": {"act": "sigmoid"}, "ConvNetAR": {"act": "relu"}, "ConvNetAL": {"act": "leakyrelu"},
    "ConvNetASwish": {"act": "swish"}, "ConvNetASwishBN": {"act": "swish", "norm": "batchnorm"},
    "ConvNetNP": {"pooling": "none"}, "ConvNetMP": {"pooling": "maxpool"},
    "ConvNetAP": {"pooling": "avgpool"},
    "ConvNetBNImageNet": {"depth": 4, "norm": "batchnorm"},
    # Official quirk (DataDAM utils.py since d58dec2): depth 6 and BatchNorm despite the name;
    # the released ImageWoof/ImageSquack weights are this network.
    "ConvNet128IN": {"depth": 6, "norm": "batchnorm"},
}
_OTHER_NETS = {
    "AlexNet": ("alexnet", "none"), "AlexNetBN": ("alexnet", "batchnorm"),
    "VGG11": ("vgg", "instancenorm"), "VGG11BN": ("vgg", "batchnorm"),
    "ResNet18": ("resnet", "instancenorm"), "ResNet18BN": ("resnet", "batchnorm"),
    "ResNet18_AP": ("resnet_ap", "instancenorm"), "ResNet18BN_AP": ("resnet_ap", "batchnorm"),
}
NETWORK_NAMES: Tuple[str, ...] = tuple(_CONVNET_REGISTRY) + tuple(_OTHER_NETS)


def default_depth(im_size) -> int:
    """ConvNet depth for a resolution: <=32 (incl. 28) -> 3, 64 -> 4, 128 -> 6, 256 -> 7, ...

    32/64 follow DC/DM/DataDAM (ConvNet / ConvNetD4 on TinyImageNet); 128 -> 6 follows DataDAM's
    ``ConvNet128IN`` (its released ImageNet-subset weights are depth 6; DM/MTT use 5 there: pass
    ``depth=5`` to get that). Larger sizes add one block per doubling.
    """
    s = max(_im_size(im_size))
    if s <= 32:
        return 3
    if s <= 64:
        return 4
    if s <= 128:
        return 6
    return 6 + math.ceil(math.log2(s / 128))


@torch.no_grad()
def init_from_generator(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every Conv/Linear weight and bias with PyTorch's default scheme from ``generator``.

    Weights: ``kaiming_uniform_(a=sqrt(5))`` = U(-1/sqrt(fan_in), 1/sqrt(fan_in)); biases: the same
    bound. Modules are visited in ``net.modules()`` order (= construction order), weight before
    bias, exactly like the default initialisation, so on the CPU the result equals the default
    init after ``torch.manual_seed`` with the generator's seed. Draws happen on the generator's
    device and are copied into the parameters (any device / memory format).
    """
    gdev = generator.device
    for m in net.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            wt = torch.empty(m.weight.shape, dtype=m.weight.dtype, device=gdev)
            nn.init.kaiming_uniform_(wt, a=math.sqrt(5), generator=generator)
            m.weight.copy_(wt)
            if m.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(m.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                bt = torch.empty(m.bias.shape, dtype=m.bias.dtype, device=gdev)
                bt.uniform_(-bound, bound, generator=generator)
                m.bias.copy_(bt)
    return net


def check_model_name(name: str, what: str = "model") -> None:
    """A one-line ``UserError`` listing the known networks when ``name`` is not one."""
    if name not in NETWORK_NAMES:
        from ..errors import UserError
        raise UserError(f"unknown {what} {name!r}; expected one of {', '.join(NETWORK_NAMES)}")


def get_network(name: str, channel: int, num_classes: int, im_size=(32, 32), *,
                width: Optional[int] = None, depth: Optional[int] = None,
                norm: Optional[str] = None, act: Optional[str] = None,
                pooling: Optional[str] = None, taps: str = "blocks",
                generator: Optional[torch.Generator] = None) -> nn.Module:
    """Build network ``name`` (one of :data:`NETWORK_NAMES`) on the CPU.

    ``width/depth/norm/act/pooling`` override the registry entry for ConvNet-family names;
    for AlexNet/VGG/ResNet only ``norm`` may be given. ``taps``: which activations
    ``features_and_embedding`` returns, ``"blocks"`` (one per resolution) or ``"official"`` (every
    ReLU in ``features`` but the last, as the official hooks; see the module docstring).
    ``generator``: draw the initial weights from it (global RNG untouched); ``None``: PyTorch's
    default init from the global RNG.
    """
    _check_taps(taps, f"get_network({name!r})")
    if name in _CONVNET_REGISTRY:
        cfg = {"width": 128, "depth": 3, "act": "relu", "norm": "instancenorm", "pooling": "avgpool"}
        cfg.update(_CONVNET_REGISTRY[name])
        for k, v in (("width", width), ("depth", depth), ("norm", norm), ("act", act), ("pooling", pooling)):
            if v is not None:
                cfg[k] = v
        build = lambda: ConvNet(channel, num_classes, im_size=im_size, taps=taps, **cfg)  # noqa: E731
    elif name in _OTHER_NETS:
        extra = [k for k, v in (("width", width), ("depth", depth), ("act", act), ("pooling", pooling))
                 if v is not None]
        if extra:
            raise ValueError(f"get_network({name!r}): {extra} only apply to ConvNet variants")
        family, default_norm = _OTHER_NETS[name]
        nrm = norm if norm is not None else default_norm
        if family == "alexnet":
            build = lambda: AlexNet(channel, num_classes, norm=nrm, im_size=im_size, taps=taps)  # noqa: E731
        elif family == "vgg":
            build = lambda: VGG("VGG11", channel, num_classes, norm=nrm, im_size=im_size, taps=taps)  # noqa: E731
        elif family == "resnet_ap":
            build = lambda: ResNetAP([2, 2, 2, 2], channel, num_classes, norm=nrm, im_size=im_size, taps=taps)  # noqa: E731
        else:
            build = lambda: ResNet([2, 2, 2, 2], channel, num_classes, norm=nrm, im_size=im_size, taps=taps)  # noqa: E731
    else:
        raise ValueError(f"unknown network {name!r}; choose from {NETWORK_NAMES}")
    if generator is None:
        return build()
    with torch.random.fork_rng(devices=[]):  # default init inside must not move the global RNG
        net = build()
    return init_from_generator(net, generator)


def load_official_state_dict(net: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """Load an official state dict (or the ``{"net_parameters": sd}`` file content) into ``net``.

    A ``module.`` prefix (DataParallel) is stripped. Returns ``net.load_state_dict``'s result.
    """
    if "net_parameters" in state_dict and isinstance(state_dict["net_parameters"], Mapping):
        state_dict = state_dict["net_parameters"]
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    return net.load_state_dict(sd, strict=strict)


def describe_network(net: nn.Module, name: Optional[str] = None) -> Dict[str, object]:
    """What a network exactly is: ``{"model", "family", "norm", "width", "depth", ...}``.

    ``width``/``depth`` are the ConvNet's channels and number of conv blocks; for the fixed
    architectures ``width`` is None and ``depth`` the number of weight layers in the name
    (AlexNet 5 conv, VGG11 8 conv, ResNet18 18). Every evaluation result carries this, so that a
    number can never be attributed to the wrong network (e.g. InstanceNorm vs BatchNorm ConvNet).
    """
    d: Dict[str, object] = {"model": name or type(net).__name__, "family": type(net).__name__,
                            "norm": getattr(net, "norm", None)}
    if isinstance(net, ConvNet):
        d.update(width=net.width, depth=net.depth, act=net.act, pooling=net.pooling)
    elif isinstance(net, AlexNet):
        d.update(width=None, depth=5)
    elif isinstance(net, VGG):
        d.update(width=None, depth=sum(isinstance(m, nn.Conv2d) for m in net.features))
    elif isinstance(net, ResNet):
        d.update(width=None, depth=2 + 2 * sum(len(getattr(net, f"layer{i}")) for i in range(1, 5)))
    else:
        d.update(width=None, depth=None)
    return d


_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def infer_network_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, object]:
    """Read the architecture of a ConvNet-family state dict (official layout).

    Returns ``{"model", "norm", "width", "depth", "reason"}`` for :func:`get_network`. The norm
    comes from the module after each conv: BatchNorm buffers -> ``batchnorm``; a ``[C]`` affine
    without buffers -> ``instancenorm`` (``GroupNorm(C, C)``, the official instancenorm; a
    ``groupnorm`` state dict looks the same, so that is assumed); ``[C, H, W]`` -> ``layernorm``;
    nothing -> ``none``. Raises ``ValueError`` for anything that is not a ConvNet.
    """
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    convs = sorted(int(k.split(".")[1]) for k, v in sd.items()
                   if k.startswith("features.") and k.endswith(".weight") and k.count(".") == 2 and v.dim() == 4)
    if not convs or "classifier.weight" not in sd:
        raise ValueError("the state dict is not a ConvNet's (no features.<i>.weight convolutions and classifier); "
                         "name the network explicitly")
    first = sd[f"features.{convs[0]}.weight"]
    if first.shape[2:] != (3, 3):
        raise ValueError(f"the state dict's first convolution is {tuple(first.shape[2:])}, a ConvNet's is 3x3 "
                         f"(AlexNet/VGG?); name the network explicitly")
    width = int(first.shape[0])
    nxt = convs[0] + 1
    if any(f"features.{nxt}.{b}" in sd for b in _BN_BUFFERS):
        norm, why = "batchnorm", "BatchNorm buffers (running_mean/running_var) in the state dict"
    elif f"features.{nxt}.weight" in sd:
        if sd[f"features.{nxt}.weight"].dim() == 3:
            norm, why = "layernorm", "[C, H, W] norm weights in the state dict"
        else:
            norm, why = "instancenorm", "per-channel norm weights without BatchNorm buffers in the state dict"
    else:
        norm, why = "none", "no norm parameters in the state dict"
    model = "ConvNetBN" if norm == "batchnorm" else "ConvNet"
    return {"model": model, "norm": norm, "width": width, "depth": len(convs), "reason": why}
