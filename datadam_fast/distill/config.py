"""Distillation settings (:class:`DistillConfig`), their presets and defaults, and the one place
where a run's inputs are validated before any work (:func:`validate`).

:class:`DistillConfig` is the one description of the settings: every field is a ``distill`` flag
named after it (``batch_real`` -> ``--batch-real``) unless its metadata says otherwise
(``flag``: another name, ``None`` for a setting of the Python API only; ``negated``: the flag
switches the field off, ``--no-dsa``). The CLI parser takes its defaults from the fields, and the
run directory writes ``config.toml`` from :func:`config_flags`."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from ..errors import UserError
from .methods import method_presets

PRESETS = {
    # what the paper and its hyper-parameter table describe
    "paper": {"norm": "instancenorm", "power": 4.0},
    # what the official code actually runs (get_network('ConvNet') -> batchnorm, get_attention exp=1)
    "official": {"norm": "batchnorm", "power": 1.0},
    # the field's settings (docs/usage.md, "Presets of the field"), each on the paper's network;
    # a flag given explicitly (--method, --factor, --networks, ...) overrides the preset's value.
    # IDC (Kim et al., ICML 2022): multi-formation with factor 2 (its default), on the chosen method
    "idc": {"norm": "instancenorm", "power": 4.0, "factor": 2},
}
# the presets a method brings (IDM on DM, NCFM on NCFM: methods.Method.presets), on the paper's network
PRESETS.update({name: {**PRESETS["paper"], **values} for name, values in method_presets().items()})
#: what a field left unset takes when the preset says nothing of it
PRESET_FALLBACK = {"method": "datadam", "factor": 1, "networks": "random"}
DEFAULT_PRESET = "paper"
#: the optimisers of the synthetic pixels (``--optimizer``): SGD takes ``momentum``; AdamW torch's
#: default weight decay 0.01, which is NCFM's
OPTIMIZERS = ("sgd", "adam", "adamw")
REAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Settings that do not change the result (within float rounding): a checkpoint made with other
# values resumes. ``iterations`` is among them, so a finished run can be continued for longer.
NOT_IDENTITY = ("device", "eval_every", "eval_runs", "eval_epochs", "eval_model", "eval_batch", "log_every",
                 "checkpoint_every", "data_root", "backend", "iterations", "real_chunk", "syn_chunk",
                 "memory_budget", "prefetch", "compile", "compile_mode", "real_epilogue",
                 "profile",  # profiling (trace.py) does not change the result
                 "pool_dir")  # where a pool is cached, not what it is
REAL_EPILOGUES = ("auto", "cpu", "triton", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
INITS = ("real", "noise")
_API_ONLY = {"flag": None}  # a setting of the Python API, not a distill flag


@dataclass
class DistillConfig:
    dataset: str = "digits"
    data_root: Optional[str] = None
    ipc: int = 10
    iterations: Optional[int] = None     # 8000 (paper), 100 for the bundled digits demo
    batch_real: Optional[int] = None     # 64 (official DataDAM), 256 for --method dm (main_DM.py)
    method: Optional[str] = None         # a name in methods.METHODS (datadam | dm | ncfm); None: the preset's, else
                                         # datadam. A user's Method is passed to distill()/Distiller as an
                                         # instance and its name lands here
    preset: str = DEFAULT_PRESET
    model: str = "ConvNet"
    norm: Optional[str] = None           # preset default
    depth: Optional[int] = None          # from image size
    width: Optional[int] = None          # 128 for ConvNets
    power: Optional[float] = None        # preset default
    task_balance: Optional[float] = None  # 0.01; paper preset 0.02 at >= 64 px
    # feature taps: "official" (official preset) or "blocks"
    taps: Optional[str] = field(default=None, metadata=_API_ONLY)
    attention_factor: float = field(default=100.0, metadata=_API_ONLY)
    lr_img: Optional[float] = None       # 1 for IPC <= 50, else 10
    optimizer: Optional[str] = None      # sgd | adam | adamw on the pixels; the method's default (sgd; ncfm adamw)
    num_freqs: int = 4096                # --method ncfm: frequencies of the characteristic function per class
    momentum: float = field(default=0.5, metadata=_API_ONLY)
    init: str = "real"
    factor: Optional[int] = None         # multi-formation (IDC): each stored image holds factor x factor images;
                                         # None: the preset's, else 1
    # the matching networks: "random" (a fresh one per iteration) or "pool:N[:EPOCHS]" (networks.py);
    # None: the preset's, else random
    networks: Optional[str] = None
    pool_dir: Optional[str] = None       # where trained pools are cached; None: $DATADAM_FAST_CACHE or ~/.cache
    dsa: bool = field(default=True, metadata={"flag": "no-dsa", "negated": True})
    dsa_strategy: str = field(default="color_crop_cutout_flip_scale_rotate", metadata=_API_ONLY)
    real_chunk: int = 0                  # classes per real chunk; 0 = chosen by the memory planner
    syn_chunk: int = 0                   # classes per synthetic chunk; 0 = chosen by the memory planner
    memory_budget: Optional[float] = None  # GB for the whole process; None = a safe share of what is free
    # load the next real chunk in a background thread
    prefetch: bool = field(default=True, metadata={"flag": "no-prefetch", "negated": True})
    compile: Optional[bool] = None       # torch.compile the network passes (weights as inputs); None: on,
                                         # except the digits demo and when DATADAM_FAST_COMPILE=0
    real_dtype: str = "fp32"             # fp32 | bf16 | fp16: precision of the real side's network pass
    compile_mode: str = "default"        # torch.compile mode of the passes; reduce-overhead = CUDA graphs
    real_epilogue: str = "auto"          # auto | cpu | triton | off: the fused real side of ConvNets
                                         # (real_side.py); auto = C++ on CPU (fp32), Triton on CUDA (uncompiled)
    # NHWC network + real images: ~20% faster steps on CPU (oneDNN)
    channels_last: bool = field(default=True, metadata={"flag": "no-channels-last", "negated": True})
    backend: str = "auto"
    seed: int = 0
    device: str = "auto"                 # auto = cuda when available, else cpu (devices.py)
    zca: bool = False                    # ZCA-whiten real, synthetic and test images (data/zca.py), as official --zca
    profile: int = 0                     # torch.profiler trace of this many iterations (trace.py); 0 = off
    eval_every: int = 0                  # 0 = only after the last iteration, -1 = never
    eval_runs: int = 3
    eval_epochs: Optional[int] = None    # 1000 (DM protocol; official DataDAM 1800), 300 for digits
    eval_model: Optional[str] = None
    eval_batch: int = field(default=256, metadata=_API_ONLY)
    log_every: int = 10
    checkpoint_every: int = 100
    data_opts: Dict = field(default_factory=dict, metadata=_API_ONLY)

    def preset_value(self, name: str):
        """``name``'s value: the one set, else the preset's, else :data:`PRESET_FALLBACK`'s."""
        v = getattr(self, name)
        if v is not None:
            return v
        return PRESETS.get(self.preset, {}).get(name, PRESET_FALLBACK[name])

    def method_name(self) -> str:
        """The method this config runs (``method``, else the preset's, else datadam)."""
        return self.preset_value("method")

    def resolved(self, image_size, method=None) -> "DistillConfig":
        """Fill preset- and method-dependent defaults (never overriding what the user set).
        ``method``: a :class:`~datadam_fast.distill.methods.Method` (instance or class) whose
        defaults apply; default: the one ``self.method`` names."""
        from .methods import method_class
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; expected one of {sorted(PRESETS)}")
        if method is None:
            method = method_class(self.method_name())
        c = dataclasses.replace(self, method=method.name, factor=self.preset_value("factor"),
                                networks=self.preset_value("networks"))
        p = PRESETS[self.preset]
        plain = c.model == "ConvNet"  # named variants (ConvNetBN, ConvNetD4, ...) keep their own norm/depth
        if c.norm is None and plain:
            c.norm = p["norm"]
        if c.power is None:
            c.power = p["power"]
        if c.task_balance is None:
            # the official code runs 0.01 at every resolution; 0.02 at >= 64 px is the paper's HP table
            c.task_balance = 0.01 if self.preset == "official" or min(image_size) < 64 else 0.02
        if c.taps is None:
            c.taps = "official" if self.preset == "official" else "blocks"
        from ..models.networks import TAPS
        if c.taps not in TAPS:
            raise UserError(f"unknown taps {c.taps!r}; expected one of {list(TAPS)}")
        if c.depth is None and plain:
            from ..models.networks import default_depth
            c.depth = default_depth(tuple(image_size))
        demo = c.dataset == "digits"
        for name, value in method.defaults(c).items():
            if name == "iterations" and demo:
                value = 100
            if getattr(c, name) is None:
                setattr(c, name, value)
        if c.eval_epochs is None:
            c.eval_epochs = 300 if demo else 1000
        if c.eval_model is None:
            c.eval_model = c.model
        if c.compile is None:
            c.compile = not demo and os.environ.get("DATADAM_FAST_COMPILE", "1") != "0"
        if c.optimizer is None:
            c.optimizer = "sgd"
        if c.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {c.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if c.real_dtype not in REAL_DTYPES:
            raise UserError(f"unknown real dtype {c.real_dtype!r}; expected one of {', '.join(REAL_DTYPES)}")
        if c.compile_mode not in COMPILE_MODES:
            raise UserError(f"unknown compile mode {c.compile_mode!r}; expected one of {', '.join(COMPILE_MODES)}")
        if c.real_epilogue not in REAL_EPILOGUES:
            raise UserError(f"unknown real epilogue {c.real_epilogue!r}; expected one of {', '.join(REAL_EPILOGUES)}")
        return c

    # the fields that define the result; a checkpoint must agree on them to be resumed
    def identity(self) -> Dict:
        d = dataclasses.asdict(self)
        for k in NOT_IDENTITY:
            d.pop(k)
        return d


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    kind: str                 # "random" | "pool"
    count: int = 0
    epochs: float = 0.0

    def __str__(self) -> str:
        if self.kind == "random":
            return "random"
        return f"pool:{self.count}:{self.epochs:g}"


def parse_networks(spec) -> NetworkSpec:
    """``random`` or ``pool:N[:EPOCHS]`` (N >= 1 networks, EPOCHS > 0 epochs, default 1)."""
    if not isinstance(spec, str):
        raise UserError(f"--networks (networks) = {spec!r}: expected 'random' or 'pool:N[:EPOCHS]'")
    s = spec.strip()
    if s == "random":
        return NetworkSpec("random")
    parts = s.split(":")
    if parts[0] != "pool" or len(parts) not in (2, 3):
        raise UserError(f"--networks {spec!r}: expected 'random' or 'pool:N[:EPOCHS]' (e.g. pool:5, pool:10:0.5)")
    try:
        n = int(parts[1])
    except ValueError:
        n = -1
    if n < 1:
        raise UserError(f"--networks {spec!r}: N (the number of networks) must be an integer >= 1, got {parts[1]!r}")
    epochs = 1.0
    if len(parts) == 3:
        try:
            epochs = float(parts[2])
        except ValueError:
            epochs = math.nan
        if not (math.isfinite(epochs) and epochs > 0):
            raise UserError(f"--networks {spec!r}: EPOCHS must be a finite number > 0 (fractions allowed), "
                            f"got {parts[2]!r}")
    return NetworkSpec("pool", n, epochs)


def net_overrides(width, depth, norm) -> Dict:
    return {k: v for k, v in (("width", width), ("depth", depth), ("norm", norm)) if v is not None}



def coupling_reason(cfg: DistillConfig, dataset) -> Optional[str]:
    """Why samples of different classes interact in the network (so chunking changes the loss),
    or None. Train-mode BatchNorm normalises with statistics of the whole batch."""
    from ..models.networks import get_network
    net = get_network(cfg.model, dataset.channels, dataset.num_classes, tuple(dataset.image_size),
                      generator=torch.Generator().manual_seed(0), taps=cfg.taps,
                      **net_overrides(cfg.width, cfg.depth, cfg.norm))
    bn = [n for n, m in net.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bn:
        return (f"{cfg.model} with {cfg.norm or 'its'} norm has train-mode BatchNorm layers ({bn[0]}, ...) "
                f"whose batch statistics mix all classes of an iteration")
    return None


def _bad(name: str, value, expected: str) -> UserError:
    return UserError(f"--{name.replace('_', '-')} ({name}) = {value!r}: expected {expected}")


def check_numbers(c: DistillConfig) -> None:
    """Every number of a resolved config finite and in its range (a NaN learning rate would
    silently turn the synthetic set into NaN; a zero count would divide by zero mid-run)."""
    floats = {  # name: (lowest, lowest allowed itself, highest (exclusive) or None, what)
        "lr_img": (0.0, False, None, "a finite number > 0"),
        "power": (1.0, True, None, "a finite number >= 1"),
        "task_balance": (0.0, True, None, "a finite number >= 0"),
        "attention_factor": (0.0, True, None, "a finite number >= 0"),
        "momentum": (0.0, True, 1.0, "a number in [0, 1)"),
        "memory_budget": (0.0, False, None, "a finite number of GB > 0"),
    }
    for name, (lo, inclusive, hi, what) in floats.items():
        v = getattr(c, name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                (v < lo if inclusive else v <= lo) or (hi is not None and v >= hi):
            raise _bad(name, v, what)
    ints = {  # name: (minimum, what 0 or -1 means when allowed)
        "ipc": (1, ""), "batch_real": (1, ""), "width": (1, ""), "depth": (1, ""), "log_every": (1, ""),
        "eval_epochs": (0, " (the official schedule trains eval_epochs+1)"), "iterations": (0, " (0 = evaluate the initial set)"),
        "checkpoint_every": (0, " (0 = only at the end)"), "eval_runs": (0, " (0 = no evaluation)"),
        "eval_every": (-1, " (0 = after the last iteration, -1 = never)"), "profile": (0, " (0 = off)"),
        "real_chunk": (0, " (0 = chosen by the memory planner)"), "syn_chunk": (0, " (0 = chosen by the memory planner)"),
        "eval_batch": (1, ""), "seed": (0, ""), "num_freqs": (1, ""), "factor": (1, ""),
    }
    for name, (lo, meaning) in ints.items():
        v = getattr(c, name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise _bad(name, v, f"an integer >= {lo}{meaning}")


def evaluation_scheduled(c: DistillConfig) -> bool:
    return c.eval_every >= 0 and c.eval_runs > 0


@dataclass
class Checked:
    """A validated run: the resolved config and what validation derived from it."""
    cfg: DistillConfig
    batch_real: int
    device: torch.device
    single_pass: Optional[str]  # why the classes must go in one pass (None: chunks and shards are exact)


def validate(cfg: DistillConfig, dataset, world, method) -> Checked:
    """Every check of a run's inputs, before any work: a bad setting fails here with what was expected."""
    from ..models.networks import check_model_name
    check_model_name(cfg.model)
    check_model_name(cfg.eval_model or cfg.model, "eval_model")
    if cfg.width is not None or cfg.depth is not None:
        if not cfg.model.startswith("ConvNet"):
            raise UserError(f"width/depth apply to ConvNet models only, not {cfg.model}")
    c = cfg.resolved(dataset.image_size, method)
    check_numbers(c)
    if c.ipc < 1:
        raise UserError(f"ipc must be >= 1, got {c.ipc}")
    if c.iterations < 0:
        raise UserError(f"iterations must be >= 0, got {c.iterations}")
    if c.profile < 0:
        raise UserError(f"profile must be >= 0 (iterations to trace; 0 = off), got {c.profile}")
    if c.profile > c.iterations:
        raise UserError(f"profile {c.profile}: the run has only {c.iterations} iteration(s); profile fewer "
                        f"or raise --iterations")
    if c.init not in INITS:
        raise UserError(f"init must be one of {', '.join(map(repr, INITS))}, got {c.init!r}")
    for name in ("real_chunk", "syn_chunk"):
        if getattr(c, name) < 0:
            raise UserError(f"{name} must be >= 0 (0 = chosen by the memory planner)")
    from ..data.formation import check_factor
    check_factor(c.factor, dataset.image_size)
    parse_networks(c.networks)
    counts = [len(ix) for ix in dataset.class_indices()]
    smallest = min(counts)
    import warnings
    if len(counts) < 2:
        warnings.warn(f"datadam_fast: {dataset.name} has a single class: there is nothing for the synthetic set "
                      f"to tell apart", UserWarning, stacklevel=2)
    if c.batch_real > smallest:
        warnings.warn(f"datadam_fast: batch-real {c.batch_real} is larger than the smallest class of "
                      f"{dataset.name} (class {counts.index(smallest)}: {smallest} images); every class draws "
                      f"{smallest} real images per iteration", UserWarning, stacklevel=2)
    if c.ipc > smallest:
        raise UserError(f"ipc {c.ipc} is larger than the smallest class of {dataset.name} "
                        f"(class {counts.index(smallest)} has {smallest} images)")
    if c.init == "real" and c.ipc * c.factor ** 2 > smallest:
        raise UserError(f"ipc {c.ipc} x factor {c.factor}^2 = {c.ipc * c.factor ** 2} real images per class initialise "
                        f"the cells, more than the smallest class of {dataset.name} (class "
                        f"{counts.index(smallest)} has {smallest} images); lower --factor or --ipc, or --init noise")
    device = torch.device(c.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {c.device!r} requested but CUDA is not available here")
        if world.distributed and device.index is None:
            device = torch.device("cuda", world.local_rank)
    K = dataset.num_classes
    if world.size > K:
        raise UserError(f"{world.size} processes for {K} classes: every process must own at least one class")
    single_pass = coupling_reason(c, dataset)
    if single_pass:
        if world.distributed:
            raise UserError(f"class sharding over {world.size} processes needs a network that treats samples "
                            f"independently, but {single_pass}; use --norm instancenorm / norm='instancenorm' (the paper "
                            f"preset) or run one process")
        if c.real_chunk or c.syn_chunk:
            raise UserError(f"real_chunk/syn_chunk would process the classes in chunks, but "
                            f"{single_pass}: the loss would differ from one pass; use --norm instancenorm / "
                            f"norm='instancenorm' (or the paper preset) to chunk, or leave the chunk sizes to the planner")
    return Checked(c, min(c.batch_real, smallest), device, single_pass)


# ----------------------------------------------------------------------------- flags and config.toml
def flag_fields(cls=DistillConfig) -> Dict[str, Tuple[str, bool]]:
    """``{long flag name: (field, negated)}`` of every field that is a ``distill`` flag."""
    out = {}
    for f in dataclasses.fields(cls):
        flag = f.metadata.get("flag", f.name.replace("_", "-"))
        if flag is not None:
            out[flag] = (f.name, bool(f.metadata.get("negated")))
    return out


def config_flags(cfg: DistillConfig, run_flags: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """``{long flag name: value}`` of ``cfg`` (``None`` = not set), in field order, then ``folder``
    (the folder dataset's path), ``cache-dir`` (where a decoded copy goes) and the run's CLI-only values ``run_flags`` (``{flag: value}``:
    device as given, threads, nvtx, no-progress), which override a field of the same flag."""
    out: Dict[str, object] = {}
    for flag, (name, negated) in flag_fields(type(cfg)).items():
        v = getattr(cfg, name)
        out[flag] = (not v) if negated else v
    out["folder"] = cfg.data_opts.get("path")
    out["cache-dir"] = cfg.data_opts.get("cache_dir")
    out.update(run_flags or {})
    return out


def toml_value(v) -> str:
    """A flat TOML value: bool, int, float, string or a list of those."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(ch in r for ch in ".en") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {type(v).__name__} {v!r}")


def format_config(flags: Dict[str, object], header: str = "") -> str:
    """``flag = value`` lines (a value that is not set becomes a comment: TOML has no null)."""
    lines = [f"# {line}" for line in header.splitlines()] if header else []
    for k, v in flags.items():
        lines.append(f"# {k} = (not set: the default applies)" if v is None else f"{k} = {toml_value(v)}")
    return "\n".join(lines) + "\n"
