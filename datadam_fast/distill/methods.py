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
    #: the statistics depend on the class (NCFM's per-class frequencies): the engine passes each
    #: chunk's first *global* class as ``first_class=`` to :meth:`real_class_sums`,
    #: :meth:`synthetic_loss` and :meth:`features_loss` (chunk rows are class-major, consecutive classes)
    class_aware: bool = False
    #: the field's configurations that run this method, as ``--preset`` names: ``{name: {config
    #: field: value}}`` on the paper's network (``config.PRESETS`` collects them; docs/usage.md)
    presets: Dict[str, Dict] = {}

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

    def start_iteration(self, seed: int) -> None:
        """Called at the start of every iteration with a seed drawn from the run's generator (the
        same on every rank, restored by ``--resume``), before any pass. Override it to draw the
        iteration's own random quantities (NCFM's frequencies); the engine draws the seed only for
        methods that override this."""

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

    def real_class_sums(self, net, x: torch.Tensor, classes: int, **kw) -> List[torch.Tensor]:
        """Per-class sums (``[classes, d_i]``) of the statistics of real images ``x`` (``classes``
        classes, class-major, equal counts; under ``no_grad``). Override it when per-sample
        statistics would be large (NCFM: ``[N, F]`` per side) and the sums can be formed directly;
        the engine then calls it instead of :meth:`real_statistics`."""
        return [class_sums(s, classes) for s in self.real_statistics(net, x)]

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
    # IDM (Zhao et al., CVPR 2023): DM's means, factor 2, matching in partly trained networks
    presets = {"idm": {"factor": 2, "networks": "pool:10:0.5"}}
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


class NCFM(Method):
    """Neural Characteristic Function Matching (Wang et al., CVPR 2025; ``gszfwsb/NCFM``), its
    matching loss: per class, the empirical characteristic function of the L2-normalised final
    embedding at ``num_freqs`` Gaussian frequencies ``t_k ~ N(0, I)`` drawn per class and per
    iteration, and ``weight * mean_f sqrt(alpha * amplitude^2 + beta * phase)`` between the real
    and synthetic ones (``NCFM/NCFM.py``). Statistics: per-class sums of ``cos(t_k . e)`` and
    ``sin(t_k . e)`` straight from the fused operator (no ``[N, F]`` projection). Defaults from
    NCFM's CIFAR configs: batch-real 1024, AdamW with lr 0.001 (their lr_img 0.01 x lr_scale_adam
    0.1, weight decay 0.01), 20000 iterations. One optimiser step per iteration over all classes
    (NCFM steps once per class); its sampling network, pretrained-model pools, calibration loss
    and multi-formation are not part of this method (``docs/methods.md``)."""

    name = "ncfm"
    # NCFM (Wang et al., CVPR 2025): its configs' factor 2, a pool of trained networks (its pretrained models)
    presets = {"ncfm": {"factor": 2, "networks": "pool:10:1"}}
    official_name = "NCFM"
    summary = ("NCFM's characteristic-function matching of normalised embeddings (per-class Gaussian "
               "frequencies each iteration; AdamW lr 0.001, batch-real 1024, 20000 iterations by default)")
    compilable = False  # the fused operator is the fast path; nothing is left for inductor to fuse
    class_aware = True
    fused_real = True   # the fused ConvNet real side gives the per-sample embeddings
    #: frequencies of one iteration kept between its real and synthetic passes up to this size
    CACHE_BYTES = 512 << 20

    def __init__(self, *, num_freqs: int = 4096, alpha: float = 0.5, beta: float = 0.5, weight: float = 300.0,
                 backend: str = "auto"):
        from ..errors import UserError
        if isinstance(num_freqs, bool) or not isinstance(num_freqs, int) or num_freqs < 1:
            raise UserError(f"num_freqs must be an integer >= 1, got {num_freqs!r}")
        self.num_freqs = num_freqs
        self.alpha, self.beta, self.weight = float(alpha), float(beta), float(weight)
        self.backend = backend
        self._seed = 0
        self._blocks: List[Tuple[int, torch.Tensor]] = []  # (first class, [n, F, D]) of this iteration

    @classmethod
    def defaults(cls, cfg) -> Dict:
        return {"batch_real": 1024, "lr_img": 1e-3, "iterations": 20000, "optimizer": "adamw"}

    @classmethod
    def from_config(cls, cfg) -> "NCFM":
        return cls(num_freqs=cfg.num_freqs, backend=cfg.backend)

    def identity(self) -> Dict:
        return {"num_freqs": self.num_freqs, "alpha": self.alpha, "beta": self.beta, "weight": self.weight}

    def start_iteration(self, seed: int) -> None:
        self._seed = int(seed)
        self._blocks = []

    def _class_generator(self, k: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed((self._seed * 1_000_003 + k) % (1 << 63))

    def frequencies(self, first_class: int, classes: int, width: int, device) -> torch.Tensor:
        """``[classes, F, D]``: class ``k``'s frequencies come from a generator seeded by (iteration
        seed, k) alone, so every chunking, shard and resumed run draws the same ones.

        Drawing them is the largest cost of the statistic after its GEMM (one ``randn`` of
        ``F x D`` per class, which torch runs on one thread on a CPU): the classes of a request are
        drawn in parallel threads straight into one buffer, and an iteration keeps its buffers (up
        to :attr:`CACHE_BYTES`) so that the synthetic side reads the real side's as a view."""
        device = torch.device(device)
        last = first_class + classes
        for b_first, buf in self._blocks:  # a buffer that covers the request: a view, no copy
            if b_first <= first_class and last <= b_first + buf.shape[0] and buf.shape[2] == width \
                    and buf.device == device:
                return buf[first_class - b_first:last - b_first]
        out = torch.empty((classes, self.num_freqs, width), device=device)
        todo = []
        for i, k in enumerate(range(first_class, last)):
            src = next((buf[k - b] for b, buf in self._blocks if b <= k < b + buf.shape[0]
                        and buf.shape[2] == width and buf.device == device), None)
            if src is not None:
                out[i].copy_(src)
            else:
                todo.append((i, k))

        def draw(item):
            i, k = item
            torch.randn(self.num_freqs, width, generator=self._class_generator(k, device), device=device, out=out[i])
        if device.type == "cpu" and len(todo) > 1:
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(max(1, min(len(todo), torch.get_num_threads()))) as pool:
                list(pool.map(draw, todo))
        else:
            for item in todo:
                draw(item)
        held = sum(b.numel() * 4 for _, b in self._blocks)
        if held + out.numel() * 4 <= self.CACHE_BYTES:
            self._blocks.append((first_class, out))
        return out

    def _sums(self, emb, classes: int, first_class: int):
        # classes in groups whose frequencies fit CACHE_BYTES: the [classes, F, D] draw of a large
        # chunk (33.5 MB a class at F = 4096, D = 2048) stays bounded whatever the memory plan
        from ..loss.characteristic import cf_class_sums
        e = torch.nn.functional.normalize(emb.float(), dim=1)
        n = e.shape[0] // classes
        group = max(1, self.CACHE_BYTES // (self.num_freqs * e.shape[1] * 4))
        cos, sin = [], []
        for a in range(0, classes, group):
            b = min(classes, a + group)
            t = self.frequencies(first_class + a, b - a, e.shape[1], e.device)
            c, s = cf_class_sums(e[a * n:b * n], t, b - a, backend=self.backend)
            cos.append(c)
            sin.append(s)
        return (cos[0], sin[0]) if len(cos) == 1 else (torch.cat(cos), torch.cat(sin))

    def real_statistics(self, net, x):
        # per-sample statistics against class 0's frequencies: what the memory probes size the
        # targets with; a run forms the per-class sums directly (real_class_sums)
        e = torch.nn.functional.normalize(net.embed(x).float(), dim=1)
        t = self.frequencies(0, 1, e.shape[1], e.device)
        p = e @ t[0].t()
        return [p.cos(), p.sin()]

    #: on a CPU, the real side's network pass runs at most this many images at a time (whole
    #: classes; the per-sample embeddings do not depend on the batch): at MNIST, batch-real 1024, one
    #: 10240-image pass took 6.3 s an iteration, passes of 2048 / 512 images 5.0 / 4.9 s (activations
    #: that stay in cache instead of streaming gigabytes)
    CPU_PASS_ROWS = 512

    def _embeddings(self, embed, net, x, classes: int) -> torch.Tensor:
        per = x.shape[0] // classes
        batch_stats = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
        if x.device.type != "cpu" or x.shape[0] <= self.CPU_PASS_ROWS or batch_stats:
            return embed(x)  # (train-mode BatchNorm: the batch's statistics need the whole batch)
        group = max(1, self.CPU_PASS_ROWS // per)
        return torch.cat([embed(x[a * per:min(classes, a + group) * per]) for a in range(0, classes, group)])

    def real_class_sums(self, net, x, classes, first_class: int = 0):
        c, s = self._sums(self._embeddings(net.embed, net, x, classes), classes, first_class)
        return [c, s]

    def fused_real_sums(self, net, x, classes, impl, first_class: int = 0):
        from .real_side import real_embeddings
        emb = self._embeddings(lambda part: real_embeddings(net, part, impl), net, x, classes)
        c, s = self._sums(emb, classes, first_class)
        return [c, s]

    def synthetic_features(self, net, x):
        return net.embed(x)

    def features_loss(self, emb, targets, classes, first_class: int = 0):
        from ..loss.characteristic import cf_loss
        c, s = self._sums(emb, classes, first_class)
        n = emb.shape[0] // classes
        loss = cf_loss(targets[0], targets[1], c / n, s / n, alpha=self.alpha, beta=self.beta, weight=self.weight)
        return loss, {"cf": loss}


def overrides(method: Method, name: str) -> bool:
    """True when ``method``'s class overrides :class:`Method`'s ``name``."""
    return getattr(type(method), name) is not getattr(Method, name)


def class_kwargs(method: Method, first_class: int) -> Dict:
    """The chunk's first global class for a :attr:`~Method.class_aware` method, else nothing."""
    return {"first_class": int(first_class)} if method.class_aware else {}


#: the methods ``--method`` names (a user's own :class:`Method` is passed as an instance instead)
METHODS = {"datadam": DataDAM, "dm": DM, "ncfm": NCFM}


def method_presets() -> Dict[str, Dict]:
    """``{preset name: {"method": name, field: value, ...}}`` of every registered method's :attr:`Method.presets`."""
    return {p: {"method": cls.name, **values} for cls in METHODS.values() for p, values in cls.presets.items()}


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
