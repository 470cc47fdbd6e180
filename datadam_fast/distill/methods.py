"""Distillation methods as plug-ins of the engine.

A :class:`Method` says what is matched between real and synthetic features of the freshly
initialised network of each iteration; the engine does everything else (sampling, DSA, class
chunks under a memory plan, class sharding over processes, prefetch, exact resume, compiled
passes). The contract that makes chunks and shards add up exactly:

* the **real side** reduces to per-class *means of per-sample statistics*:
  :meth:`Method.real_statistics` returns, for a batch of real images, a list of ``[N, d_i]``
  tensors (one row per image); the engine sums them per class in float64 over every chunk and
  divides by the class counts, so any chunking and any class sharding give the same targets;
* the **synthetic side** is a loss per class chunk: :meth:`Method.synthetic_loss` gets a chunk's
  synthetic images (class-major, ``ipc`` per class) and those classes' targets (``[k, d_i]``
  each) and returns a scalar loss that is a sum over the chunk's classes (so per-chunk gradients
  add up to the gradient of the whole), plus named terms for the log.

Optional capabilities: :meth:`Method.fused_real_sums` (per-class sums straight from the fused
ConvNet real side, ``real_side.py``), and :attr:`Method.compilable` (the two sides are plain
tensor code that ``torch.compile`` can trace with the network's weights as inputs; see
``compiled.py``). ``docs/methods.md`` walks through a complete user method.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..loss.reference import attention_maps_and_norms


def class_sums(x: torch.Tensor, classes: int) -> torch.Tensor:
    """``[classes * n, ...] -> [classes, ...]``: sums over each class's ``n`` class-major rows."""
    return x.reshape(classes, x.shape[0] // classes, *x.shape[1:]).sum(1)


class Method:
    """Base class of a distillation method (see the module docstring for the contract).

    Subclasses set :attr:`name` and implement :meth:`real_statistics` and :meth:`synthetic_loss`.
    """

    name: str = "method"
    #: the method's name in the official code's file names (``res_<official_name>_...pt``, what
    #: ``export --format official`` writes); None: :attr:`name`
    official_name: Optional[str] = None
    #: one line for ``distill --help`` (a built-in method's entry of ``--method``)
    summary: str = ""
    #: the engine may ``torch.compile`` :meth:`compiled_real` / :meth:`compiled_synthetic`
    compilable: bool = True
    #: the engine may use :meth:`fused_real_sums` (the fused ConvNet real side)
    fused_real: bool = False

    # ------------------------------------------------------------------ run settings
    @classmethod
    def from_config(cls, cfg) -> "Method":
        """The instance a run of ``cfg`` uses when the method is named (``cfg.method``, a key of
        :data:`METHODS`) rather than passed as an instance. Default: ``cls()``."""
        return cls()

    @classmethod
    def defaults(cls, cfg) -> Dict:
        """Values for the config fields the user left unset (``None``): ``batch_real``, ``lr_img``,
        ``iterations``. The DataDAM defaults unless a method says otherwise."""
        return {"batch_real": 64, "lr_img": 1.0 if cfg.ipc <= 50 else 10.0, "iterations": 8000}

    def bind(self, cfg) -> "Method":
        """Called once with the resolved config before any work (read what you need from it)."""
        return self

    def identity(self) -> Dict:
        """Settings that define the result: a checkpoint resumes only with equal ones."""
        return {k: v for k, v in vars(self).items() if isinstance(v, (int, float, str, bool, type(None)))}

    # ------------------------------------------------------------------ the two sides
    def real_statistics(self, net, x: torch.Tensor) -> List[torch.Tensor]:
        """Per-sample statistics of real images ``x`` (under ``no_grad``): ``[N, d_i]`` tensors."""
        raise NotImplementedError

    def synthetic_loss(self, net, x: torch.Tensor, targets: Sequence[torch.Tensor],
                       classes: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss of synthetic images ``x`` (``classes`` classes, class-major, equal counts) against
        those classes' mean real statistics ``targets`` (``[classes, d_i]`` each): ``(loss, terms)``
        where ``terms`` are named parts of the loss for the log (detached by the engine).

        Implement this, or the pair :meth:`synthetic_features` + :meth:`features_loss` (then the
        engine times and profiles the network forward and the loss as separate phases)."""
        return self.features_loss(self.synthetic_features(net, x), targets, classes)

    def synthetic_features(self, net, x: torch.Tensor):
        """The network forward of the synthetic side (anything :meth:`features_loss` takes)."""
        raise NotImplementedError(f"{type(self).__name__}: implement synthetic_loss, or synthetic_features "
                                  f"and features_loss")

    def features_loss(self, features, targets: Sequence[torch.Tensor],
                      classes: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of :meth:`synthetic_features`' output against ``targets``: ``(loss, terms)``."""
        raise NotImplementedError(f"{type(self).__name__}: implement synthetic_loss, or synthetic_features "
                                  f"and features_loss")

    def splits_synthetic_loss(self) -> bool:
        """True when the loss comes from the :meth:`synthetic_features` / :meth:`features_loss` pair."""
        return type(self).synthetic_loss is Method.synthetic_loss

    # ------------------------------------------------------------------ optional capabilities
    def fused_real_sums(self, net, x: torch.Tensor, classes: int, impl: str) -> List[torch.Tensor]:
        """Per-class sums of :meth:`real_statistics` from the fused real side (when :attr:`fused_real`)."""
        raise NotImplementedError

    def compiled_real(self, net, x: torch.Tensor, classes: int) -> List[torch.Tensor]:
        """Traced by ``torch.compile``: per-class sums of the statistics of ``x``."""
        return [class_sums(s, classes) for s in self.real_statistics(net, x)]

    def compiled_synthetic(self, net, x: torch.Tensor, targets: Sequence[torch.Tensor],
                           classes: int) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Traced by ``torch.compile``: the synthetic loss (and terms) of ``x``."""
        return self.synthetic_loss(net, x, targets, classes)


def _normalised_maps(f: torch.Tensor, power: float) -> torch.Tensor:
    """Spatial attention of ``f`` in fp32 (bf16/fp16 activations: the power and the sums in fp32;
    inside a compiled pass inductor fuses it into the network's epilogue, no copy)."""
    return attention_maps_and_norms(f.float(), power)[0]


def _matching_loss(feats, emb, targets, classes: int, *, power: float, attention_weight: float,
                   embedding_weight: float, backend: str):
    """The attention-matching loss of one synthetic chunk against its classes' targets (the last
    target is the embedding mean): ``(loss, {"attention", "embedding"})``."""
    from ..loss.matching import attention_matching_loss
    from ..loss.targets import ClassTargets
    loss, terms = attention_matching_loss(
        ClassTargets(list(targets[:-1]), targets[-1], power), feats, None, emb, num_classes=classes,
        power=power, attention_weight=attention_weight, embedding_weight=embedding_weight,
        backend=backend, return_terms=True)
    zero = torch.zeros((), device=loss.device)
    return loss, {"attention": terms.get("attention", zero), "embedding": terms.get("embedding", zero)}


def _compiled_matching_loss(feats, emb, targets, classes: int, *, power: float, attention_weight: float,
                            embedding_weight: float):
    """:func:`_matching_loss` in plain tensor ops, for ``torch.compile`` to trace."""
    att = emb.new_zeros((), dtype=torch.float32)
    if attention_weight:
        for f, t in zip(feats, targets[:-1]):
            m = class_sums(_normalised_maps(f, power), classes) / (f.shape[0] // classes)
            att = att + attention_weight * ((t - m) ** 2).sum()
    e = class_sums(emb.float(), classes) / (emb.shape[0] // classes)
    emb_term = embedding_weight * ((targets[-1] - e) ** 2).sum()
    return att + emb_term, {"attention": att, "embedding": emb_term}


class DataDAM(Method):
    """DataDAM (Sajedi et al., ICCV 2023): per-class mean L2-normalised spatial attention maps of
    the tapped blocks (``sum_c |f|^p``) and the mean embedding. Statistics: one ``[N, H_l*W_l]``
    map per tap, then the ``[N, D]`` embedding. Loss: ``attention_factor * sum ||t - m||^2`` over
    the maps plus ``attention_factor * task_balance * ||t - e||^2`` for the embedding."""

    name = "datadam"
    official_name = "DataDAM"  # res_DataDAM_<dataset>_<model>_<ipc>ipc.pt (export --format official)
    summary = "attention matching + embedding MMD"
    fused_real = True

    def __init__(self, *, power: float = 4.0, attention_weight: float = 100.0, embedding_weight: float = 1.0,
                 backend: str = "auto"):
        self.power = float(power)
        self.attention_weight = float(attention_weight)
        self.embedding_weight = float(embedding_weight)
        self.backend = backend

    @classmethod
    def from_config(cls, cfg) -> "DataDAM":
        return cls(power=cfg.power, attention_weight=cfg.attention_factor,
                   embedding_weight=cfg.attention_factor * cfg.task_balance, backend=cfg.backend)

    def real_statistics(self, net, x):
        from ..loss.ops import spatial_attention_maps
        feats, emb = net.features_and_embedding(x)
        maps = list(spatial_attention_maps(feats, self.power, self.backend)) if feats else []
        return maps + [emb.float()]

    def synthetic_features(self, net, x):
        return net.features_and_embedding(x)

    def features_loss(self, features, targets, classes):
        feats, emb = features
        return _matching_loss(feats, emb, targets, classes, power=self.power, attention_weight=self.attention_weight,
                              embedding_weight=self.embedding_weight, backend=self.backend)

    def fused_real_sums(self, net, x, classes, impl):
        from .real_side import real_class_sums
        att, emb = real_class_sums(net, x, classes, self.power, attention=True, impl=impl)
        return list(att) + [emb]

    def compiled_real(self, net, x, classes):
        feats, emb = net.features_and_embedding(x)
        return [class_sums(_normalised_maps(f, self.power), classes) for f in feats] + \
            [class_sums(emb.float(), classes)]

    def compiled_synthetic(self, net, x, targets, classes):
        feats, emb = net.features_and_embedding(x)
        return _compiled_matching_loss(feats, emb, targets, classes, power=self.power,
                                       attention_weight=self.attention_weight, embedding_weight=self.embedding_weight)


class DM(Method):
    """Distribution Matching (Zhao & Bilen, WACV 2023) as ``main_DM.py`` runs it: per-class mean
    embeddings only (weight 1), ``batch_real`` 256, ``lr_img`` 1, 20000 iterations. Statistics:
    the ``[N, D]`` embedding (no taps are evaluated); the loss is DataDAM's embedding term alone."""

    name = "dm"
    official_name = "DM"
    summary = ("Distribution Matching as main_DM.py runs it (per-class mean embeddings only, lr-img 1, "
               "batch-real 256, 20000 iterations by default)")
    fused_real = True
    _POWER = 1.0  # no attention maps: the loss's power argument has nothing to act on

    def __init__(self, *, backend: str = "auto"):
        self.backend = backend

    @classmethod
    def defaults(cls, cfg) -> Dict:
        return {"batch_real": 256, "lr_img": 1.0, "iterations": 20000}

    @classmethod
    def from_config(cls, cfg) -> "DM":
        return cls(backend=cfg.backend)

    def real_statistics(self, net, x):
        return [net.embed(x).float()]

    def synthetic_features(self, net, x):
        return net.embed(x)

    def features_loss(self, emb, targets, classes):
        return _matching_loss([], emb, targets, classes, power=self._POWER, attention_weight=0.0,
                              embedding_weight=1.0, backend=self.backend)

    def fused_real_sums(self, net, x, classes, impl):
        from .real_side import real_class_sums
        _, emb = real_class_sums(net, x, classes, self._POWER, attention=False, impl=impl)
        return [emb]

    def compiled_synthetic(self, net, x, targets, classes):
        return _compiled_matching_loss([], net.embed(x), targets, classes, power=self._POWER, attention_weight=0.0,
                                       embedding_weight=1.0)


#: the methods ``--method`` names (a user's own :class:`Method` is passed as an instance instead)
METHODS = {"datadam": DataDAM, "dm": DM}


def method_class(name: str):
    from ..errors import UserError
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def check_method(method) -> Method:
    from ..errors import UserError
    if not isinstance(method, Method):
        raise UserError(f"method: expected a datadam_fast.distill.Method instance or one of "
                        f"{', '.join(METHODS)}, got {type(method).__name__}")
    return method
