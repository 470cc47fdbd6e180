"""The DataDAM distillation loop.

Per iteration (``main_DataDAM.py:222-317``): a fresh randomly initialised network; ``batch_real``
real images per class; one Siamese DSA transform per class shared by its real and synthetic
images; one forward pass per side for all classes (the real side under ``no_grad``, optionally
streamed in chunks into running class means); the fused attention-matching loss; one SGD step on
the synthetic pixels (momentum 0.5). Every random draw comes from one seeded
``torch.Generator`` whose state is checkpointed, so a killed and resumed run ends with the same
synthetic set as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .._io import atomic_torch_save, atomic_write_text
from ..errors import UserError
from ..loss.matching import attention_matching_loss
from ..models.networks import check_model_name
from .memory import GB, MB, MemoryPlan, PeakMemory, linear_fit, parse_budget, plan_chunks
from .parallel import World, class_block, init_world
from .prefetch import ChunkPrefetcher
from ..profiling import nvtx_range
from ..loss.targets import ClassMeanAccumulator, ClassTargets

PRESETS = {
    # what the paper and its hyper-parameter table describe
    "paper": {"norm": "instancenorm", "power": 4.0},
    # what the official code actually runs (get_network('ConvNet') -> batchnorm, get_attention exp=1)
    "official": {"norm": "batchnorm", "power": 1.0},
}
DEFAULT_PRESET = "paper"
# dm: Distribution Matching (Zhao & Bilen 2023) as ``main_DM.py`` runs it: per-class mean
# embeddings only (the DataDAM loss without its attention terms, weight 1), lr_img 1,
# batch_real 256, 20000 iterations; ConvNet (InstanceNorm) or, with --preset official, ConvNetBN.
METHODS = ("datadam", "dm")
REAL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "datadam_fast.checkpoint/2"
GRID_MAX_CLASSES = 100
ROUGH_FACTOR = 8
_TERMS = ("loss", "loss_attention", "loss_embedding")
# Settings that do not change the result (within float rounding): a checkpoint made with other
# values resumes. ``iterations`` is among them, so a finished run can be continued for longer.
_NOT_IDENTITY = ("device", "eval_every", "eval_runs", "eval_epochs", "eval_model", "eval_batch", "log_every",
                 "checkpoint_every", "data_root", "backend", "iterations", "real_chunk", "syn_chunk",
                 "memory_budget", "prefetch", "compile", "compile_mode", "real_epilogue")
REAL_EPILOGUES = ("auto", "cpu", "triton", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DistillConfig:
    dataset: str = "digits"
    data_root: Optional[str] = None
    ipc: int = 10
    iterations: Optional[int] = None     # 8000 (paper), 100 for the bundled digits demo
    batch_real: Optional[int] = None     # 64 (official DataDAM), 256 for --method dm (main_DM.py)
    method: str = "datadam"              # datadam | dm (Distribution Matching: embedding means only)
    preset: str = DEFAULT_PRESET
    model: str = "ConvNet"
    norm: Optional[str] = None           # preset default
    depth: Optional[int] = None          # from image size
    width: Optional[int] = None          # 128 for ConvNets
    power: Optional[float] = None        # preset default
    task_balance: Optional[float] = None  # 0.01; paper preset 0.02 at >= 64 px
    taps: Optional[str] = None           # feature taps: "official" (official preset) or "blocks"
    attention_factor: float = 100.0
    lr_img: Optional[float] = None       # 1 for IPC <= 50, else 10
    momentum: float = 0.5
    init: str = "real"
    dsa: bool = True
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    real_chunk: int = 0                  # classes per real chunk; 0 = chosen by the memory planner
    syn_chunk: int = 0                   # classes per synthetic chunk; 0 = chosen by the memory planner
    memory_budget: Optional[float] = None  # GB for the whole process; None = a safe share of what is free
    prefetch: bool = True                # load the next real chunk in a background thread
    compile: Optional[bool] = None       # torch.compile the network passes (weights as inputs); None: on,
                                         # except the digits demo and when DATADAM_FAST_COMPILE=0
    real_dtype: str = "fp32"             # fp32 | bf16 | fp16: precision of the real side's network pass
    compile_mode: str = "default"        # torch.compile mode of the passes; reduce-overhead = CUDA graphs
    real_epilogue: str = "auto"          # auto | cpu | triton | off: the fused real side of ConvNets
                                         # (real_side.py); auto = C++ on CPU (fp32), Triton on CUDA (uncompiled)
    channels_last: bool = True           # NHWC network + real images: ~20% faster steps on CPU (oneDNN)
    backend: str = "auto"
    seed: int = 0
    device: str = "cpu"
    eval_every: int = 0                  # 0 = only after the last iteration, -1 = never
    eval_runs: int = 3
    eval_epochs: Optional[int] = None    # 1000 (DM protocol; official DataDAM 1800), 300 for digits
    eval_model: Optional[str] = None
    eval_batch: int = 256
    log_every: int = 10
    checkpoint_every: int = 100
    data_opts: Dict = field(default_factory=dict)

    def resolved(self, image_size) -> "DistillConfig":
        """Fill preset-dependent defaults (never overriding what the user set)."""
        if self.preset not in PRESETS:
            raise UserError(f"unknown preset {self.preset!r}; expected one of {sorted(PRESETS)}")
        c = dataclasses.replace(self)
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
        if c.method not in METHODS:
            raise UserError(f"unknown method {c.method!r}; expected one of {', '.join(METHODS)}")
        dm = c.method == "dm"
        if c.batch_real is None:
            c.batch_real = 256 if dm else 64
        if c.lr_img is None:
            c.lr_img = 1.0 if (dm or c.ipc <= 50) else 10.0
        if c.depth is None and plain:
            from ..models.networks import default_depth
            c.depth = default_depth(tuple(image_size))
        demo = c.dataset == "digits"
        if c.iterations is None:
            c.iterations = 100 if demo else (20000 if dm else 8000)
        if c.eval_epochs is None:
            c.eval_epochs = 300 if demo else 1000
        if c.eval_model is None:
            c.eval_model = c.model
        if c.compile is None:
            c.compile = not demo and os.environ.get("DATADAM_FAST_COMPILE", "1") != "0"
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
        for k in _NOT_IDENTITY:
            d.pop(k)
        return d


def _net_overrides(width, depth, norm) -> Dict:
    return {k: v for k, v in (("width", width), ("depth", depth), ("norm", norm)) if v is not None}


class Distiller:
    """One distillation run (optionally one rank of a class-sharded ``torchrun`` job).

    Memory per iteration is bounded by a plan (:mod:`datadam_fast.memory`): the real side is
    streamed through the network in class chunks into running class means, and the synthetic
    side goes forward + loss + backward one class chunk at a time, its pixel gradients written
    into one buffer, before a single optimiser step. With a per-sample norm (InstanceNorm) the
    classes never interact, so any chunking (and any class sharding) gives the same images up to
    float rounding.
    """

    def __init__(self, cfg: DistillConfig, out_dir: Optional[str], *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, train_set=None, test_set=None, world: Optional[World] = None):
        from ..data import load_dataset
        self.world = world if world is not None else init_world(cfg.device)
        self.out_dir = out_dir
        self.progress = progress and self.world.is_main
        if out_dir:
            self._check_out_dir(out_dir, resume, overwrite)  # fail fast, touch nothing yet
        opts = dict(cfg.data_opts)
        self.train_set = train_set or load_dataset(cfg.dataset, root=cfg.data_root, split="train", **opts)
        self._test_set = test_set
        ds = self.train_set
        check_model_name(cfg.model)
        check_model_name(cfg.eval_model or cfg.model, "eval_model")
        if cfg.width is not None or cfg.depth is not None:
            if not cfg.model.startswith("ConvNet"):
                raise UserError(f"width/depth apply to ConvNet models only, not {cfg.model}")
        self.cfg = cfg.resolved(ds.image_size)
        c = self.cfg
        if c.ipc < 1:
            raise UserError(f"ipc must be >= 1, got {c.ipc}")
        if c.iterations < 0:  # resolved above
            raise UserError(f"iterations must be >= 0, got {c.iterations}")
        if c.init not in ("real", "noise"):
            raise UserError(f"init must be 'real' or 'noise', got {c.init!r}")
        for name in ("real_chunk", "syn_chunk"):
            if getattr(c, name) < 0:
                raise UserError(f"{name} must be >= 0 (0 = chosen by the memory planner)")
        counts = [len(ix) for ix in ds.class_indices()]
        K = ds.num_classes
        smallest = min(counts)
        if c.ipc > smallest:
            raise UserError(f"ipc {c.ipc} is larger than the smallest class of {ds.name} "
                            f"(class {counts.index(smallest)} has {smallest} images)")
        self.batch_real = min(c.batch_real, smallest)
        self.device = torch.device(c.device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"device {c.device!r} requested but CUDA is not available here")
            if self.world.distributed and self.device.index is None:
                self.device = torch.device("cuda", self.world.local_rank)
        self.K = K
        W = self.world
        if W.size > K:
            raise UserError(f"{W.size} processes for {K} classes: every process must own at least one class")
        self.k_lo, self.k_hi = class_block(K, W.rank, W.size)
        self.Kl = self.k_hi - self.k_lo
        self.single_pass = self._coupling_reason()
        if self.single_pass:
            if W.distributed:
                raise UserError(f"class sharding over {W.size} processes needs a network that treats samples "
                                f"independently, but {self.single_pass}; use norm='instancenorm' (the paper "
                                f"preset) or run one process")
            if c.real_chunk or c.syn_chunk:
                raise UserError(f"real_chunk/syn_chunk would process the classes in chunks, but "
                                f"{self.single_pass}: the loss would differ from one pass; use norm='instancenorm' "
                                f"(or preset='paper') to chunk, or leave the chunk sizes to the planner")
        self.gen = torch.Generator().manual_seed(c.seed)
        from ..models.augment import DSA
        self.dsa = DSA(c.dsa_strategy) if c.dsa else None
        self.mem = PeakMemory(self.device)
        self.budget = parse_budget(c.memory_budget, self.device, self.mem.current())
        # A small training set is normalised once and kept on the device; a large one is read
        # chunk by chunk (memory-mapped sets through pread, see data._base._read_rows).
        nbytes = len(ds) * ds.channels * ds.image_size[0] * ds.image_size[1] * 4
        cache = nbytes <= min(2 * GB, self.budget // 8)
        self.real_all = self._layout(ds.normalized_all(self.device)) if cache else None
        self.class_idx = [ix.clone() for ix in ds.class_indices()]
        # synthetic rows of this rank: classes [k_lo, k_hi), class-major
        self.labels_syn = torch.arange(self.k_lo, self.k_hi, device=self.device).repeat_interleave(c.ipc)
        self.iteration = 0
        self._init_syn()
        self.opt = torch.optim.SGD([self.syn], lr=c.lr_img, momentum=c.momentum)
        self._next_real_idx = self._draw_real_indices()
        if resume:
            self._load_checkpoint()
        self.prefetcher = ChunkPrefetcher(self._load_rows, lookahead=1 if c.prefetch else 0,
                                          enabled=self.real_all is None and c.prefetch)
        self.fused_real = self._resolve_real_epilogue()  # before the plan: its probe runs the real pass
        self.plan = self._make_plan()
        self.passes = self._compiled_passes() if c.compile else None
        self.compile_seconds: Optional[float] = None
        self._schedule_real(self.iteration, self._next_real_idx)
        W.barrier()  # every rank validated its inputs (and read the checkpoint) before rank 0 writes
        if out_dir and not resume and W.is_main:
            self._claim_out_dir(out_dir)

    # ---------------------------------------------------------------- setup
    def _coupling_reason(self) -> Optional[str]:
        """Why samples of different classes interact in the network (so chunking changes the
        loss), or None. Train-mode BatchNorm normalises with statistics of the whole batch."""
        net = self._build_network(torch.Generator().manual_seed(0))
        bn = [n for n, m in net.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if bn:
            return (f"{self.cfg.model} with {self.cfg.norm or 'its'} norm has train-mode BatchNorm layers ({bn[0]}, ...) "
                    f"whose batch statistics mix all classes of an iteration")
        return None

    def _resolve_real_epilogue(self) -> Optional[str]:
        """The fused real side (real_side.py) this run uses: ``"cpu"`` (C++), ``"triton"`` or None.

        ``auto``: the C++ kernels on CPU for float32 real passes (they replace the compiled real
        pass too: a first layer convolved per sample in L2 beats oneDNN + inductor's epilogue,
        see README); Triton on CUDA for uncompiled passes (compiled ones get inductor's fusion).
        ``cpu`` / ``triton``: that implementation, or an error now if it cannot run here."""
        from .real_side import unavailable_reason
        mode, dev = self.cfg.real_epilogue, self.device
        if mode == "off":
            return None
        if mode == "auto":
            if dev.type == "cpu":
                impl = "cpu" if self.cfg.real_dtype == "fp32" else None
            else:
                impl = "triton" if dev.type == "cuda" and not self.cfg.compile else None
        else:
            impl = mode
        if impl is None:
            return None
        why = unavailable_reason(self.new_network(torch.Generator().manual_seed(0)), dev, impl)
        if why and mode != "auto":
            raise UserError(f"--real-epilogue {mode}: {why}")
        return None if why else impl

    def _check_out_dir(self, out_dir: str, resume: bool, overwrite: bool) -> None:
        if resume:
            if not os.path.isfile(os.path.join(out_dir, CHECKPOINT)):
                raise UserError(f"resume: no checkpoint at {os.path.join(out_dir, CHECKPOINT)}")
            return
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise UserError(f"output directory {out_dir} exists and is not a directory")
        if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
            raise UserError(f"output directory {out_dir} is not empty; pass overwrite=True to replace its results "
                            f"or resume=True to continue its checkpoint")

    def _claim_out_dir(self, out_dir: str) -> None:
        """Called once every input is validated: only then are stale results of --overwrite removed."""
        os.makedirs(out_dir, exist_ok=True)
        for name in ("metrics.jsonl", CHECKPOINT, "summary.json"):
            p = os.path.join(out_dir, name)
            if os.path.exists(p):
                os.remove(p)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _load_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Real rows for the prefetcher thread: normalised on CPU; pinned uint8 for a GPU."""
        ds = self.train_set
        if self.device.type == "cuda":
            return ds._rows_uint8(idx).pin_memory()
        return self._layout(ds.batch(idx, device="cpu"))

    def _real_rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self.real_all is not None:
            return self.real_all[idx.to(self.real_all.device)]
        return self._finish_rows(self._load_rows(idx))

    def _finish_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.dtype == torch.uint8:
            rows = self.train_set.normalize_uint8(rows.to(self.device, non_blocking=True), device=self.device)
            return self._layout(rows)
        return rows.to(self.device)

    def _init_syn(self) -> None:
        """Initial images of this rank's classes. Draws are made for every class in class order
        (one ``randperm`` or one ``randn`` per class), so every world size draws the same."""
        c, ds = self.cfg, self.train_set
        shape = (c.ipc, ds.channels, *ds.image_size)
        parts = []
        for k, ix in enumerate(self.class_idx):
            if c.init == "real":
                pick = ix[torch.randperm(len(ix), generator=self.gen)[:c.ipc]]
                if self.k_lo <= k < self.k_hi:
                    parts.append(self._real_rows(pick).detach().float().contiguous())
            else:
                noise = torch.randn(shape, generator=self.gen)
                if self.k_lo <= k < self.k_hi:
                    parts.append(noise.to(self.device))
        self.syn = torch.cat(parts).to(self.device).contiguous().requires_grad_(True)

    def _draw_real_indices(self) -> torch.Tensor:
        """``batch_real`` indices of every class (all classes drawn on every rank, in order)."""
        B = self.batch_real
        return torch.cat([ix[torch.randperm(len(ix), generator=self.gen)[:B]] for ix in self.class_idx])

    def _real_chunks(self):
        """(first, last) local class of each real chunk."""
        rc = self.plan.real_chunk
        return [(a, min(a + rc, self.Kl)) for a in range(0, self.Kl, rc)]

    def _syn_chunks(self):
        sc = self.plan.syn_chunk
        return [(a, min(a + sc, self.Kl)) for a in range(0, self.Kl, sc)]

    def _schedule_real(self, iteration: int, idx: torch.Tensor) -> None:
        if self.real_all is not None:
            return
        B = self.batch_real
        for j, (a, b) in enumerate(self._real_chunks()):
            rows = idx[(self.k_lo + a) * B:(self.k_lo + b) * B]
            self.prefetcher.schedule((iteration, j), rows)

    def _build_network(self, gen: torch.Generator):
        from ..models.networks import get_network
        c, ds = self.cfg, self.train_set
        return get_network(c.model, ds.channels, self.K, tuple(ds.image_size), generator=gen, taps=c.taps,
                           **_net_overrides(c.width, c.depth, c.norm))

    def new_network(self, gen: Optional[torch.Generator] = None):
        net = self._build_network(gen or self.gen).to(self.device)
        if self.cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    # ---------------------------------------------------------------- the two phases of a step
    def _real_pass(self, net, x: torch.Tensor, labels: torch.Tensor, params, acc: ClassMeanAccumulator,
                   local_labels_cpu: torch.Tensor, mark=None, weights=None) -> None:
        """One real chunk (no_grad) into the running class means. Rows are class-major with
        the same count per class; ``weights``: run the compiled pass with these weights."""
        with torch.no_grad():
            if params is not None:
                with nvtx_range("datadam_fast.step.augment_real"):
                    x = self.dsa.apply(x, params, labels)
                if mark:
                    mark("augment")
            with nvtx_range("datadam_fast.step.real_forward"):
                dtype = REAL_DTYPES[self.cfg.real_dtype]
                first = int(local_labels_cpu[0])
                classes = int(local_labels_cpu[-1]) - first + 1
                if weights is None or self.fused_real == "cpu":
                    net = self._real_side_copy(net, dtype)
                if self.fused_real and (weights is None or self.fused_real == "cpu"):
                    from .real_side import real_class_sums
                    att, emb = real_class_sums(net, x.to(dtype), classes, self.cfg.power,
                                               attention=self.cfg.method != "dm", impl=self.fused_real)
                    acc.add_class_sums(att, emb, first_class=first, count=x.shape[0] // classes)
                elif weights is not None:
                    att, emb = self.passes.real(weights, x, classes)
                    acc.add_class_sums(att, emb, first_class=first, count=x.shape[0] // classes)
                else:
                    x = x.to(dtype)
                    feats_r, emb_r = ([], net.embed(x)) if self.cfg.method == "dm" else net.features_and_embedding(x)
                    acc.update(feats_r, emb_r.float(), labels=local_labels_cpu)
                    del feats_r, emb_r
            if mark:
                mark("real_forward")

    def _syn_pass(self, net, rows: torch.Tensor, labels: torch.Tensor, params, targets: ClassTargets,
                  num_classes: int, mark=None, weights=None):
        """Forward, loss and backward of one synthetic chunk; returns (grad of rows, att, emb)."""
        c = self.cfg
        leaf = rows.detach().requires_grad_(True)
        x = leaf
        if params is not None:
            with nvtx_range("datadam_fast.step.augment_syn"):
                x = self.dsa.apply(x, params, labels)
            if mark:
                mark("augment")
        dm = c.method == "dm"
        if weights is not None:
            with nvtx_range("datadam_fast.step.syn_forward"):
                att, emb = self.passes.syn(weights, self._layout(x), num_classes, targets.attention, targets.embedding,
                                           0.0 if dm else c.attention_factor,
                                           1.0 if dm else c.attention_factor * c.task_balance)
            if mark:
                mark("syn_forward")
            with nvtx_range("datadam_fast.step.backward"):
                (att + emb).backward()
            if mark:
                mark("backward")
            return leaf.grad, att.detach(), emb.detach()
        with nvtx_range("datadam_fast.step.syn_forward"):
            feats_s, emb_s = ([], net.embed(x)) if dm else net.features_and_embedding(x)
        if mark:
            mark("syn_forward")
        with nvtx_range("datadam_fast.step.loss"):
            # dm: attention_weight 0 skips the attention work (and there are no taps)
            loss, terms = attention_matching_loss(
                targets, feats_s, None, emb_s, num_classes=num_classes, power=c.power,
                attention_weight=0.0 if dm else c.attention_factor,
                embedding_weight=1.0 if dm else c.attention_factor * c.task_balance, backend=c.backend,
                return_terms=True)
        if mark:
            mark("loss")
        with nvtx_range("datadam_fast.step.backward"):
            loss.backward()
        if mark:
            mark("backward")
        zero = torch.zeros((), device=loss.device)
        att, emb = terms.get("attention"), terms.get("embedding")
        return (leaf.grad, zero if att is None else att.detach().float(),
                zero if emb is None else emb.detach().float())

    # ---------------------------------------------------------------- one iteration
    def step(self, timings: Optional[Dict[str, float]] = None) -> Dict[str, torch.Tensor]:
        """One distillation iteration; ``timings`` (optional) receives seconds per phase.

        Returns this rank's loss terms as 0-d tensors (converting them is a host sync: the
        caller does it only when it logs)."""
        c, K, B = self.cfg, self.K, self.batch_real
        sync = (torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None))
        clock = [time.perf_counter()]

        def mark(name):
            if timings is not None:
                sync()
                now = time.perf_counter()
                timings[name] = timings.get(name, 0.0) + now - clock[0]
                clock[0] = now
            return None

        with nvtx_range("datadam_fast.step.sample"):
            net = self.new_network()
            params = self.dsa.sample(K, self.gen, self.device, tuple(self.train_set.image_size)) if self.dsa else None
            real_idx = self._next_real_idx
            # the next iteration's real batch is drawn now, so that it loads while this one computes
            self._next_real_idx = self._draw_real_indices()
            self._schedule_real(self.iteration + 1, self._next_real_idx)
        mark("sample")
        if self.passes is not None:
            return self._step_compiled(net, params, real_idx, mark, timings)
        return self._finish_step(net, params, real_idx, mark, timings, None, None)

    def _step_compiled(self, net, params, real_idx, mark, timings):
        from .compiled import CompiledPasses
        self.passes.step_begin()
        weights = CompiledPasses.weights_of(net)
        dtype = REAL_DTYPES[self.cfg.real_dtype]
        real_weights = weights if dtype == torch.float32 else CompiledPasses.weights_of(net, dtype)
        if self.compile_seconds is not None:
            return self._finish_step(net, params, real_idx, mark, timings, weights, real_weights)
        # first compiled step: it compiles (timed); a toolchain without a working compiler falls
        # back to eager for the rest of the run, with one warning
        state = (self.syn.detach().clone(), {k: v.clone() for k, v in self.opt.state.get(self.syn, {}).items()})
        t0 = time.perf_counter()
        try:
            out = self._finish_step(net, params, real_idx, mark, timings, weights, real_weights)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path is exact
            import warnings
            warnings.warn(f"torch.compile of the network passes failed ({type(e).__name__}: {str(e)[:200]}); "
                          f"running eagerly (pass --no-compile to skip trying)")
            self.passes = None
            with torch.no_grad():
                self.syn.copy_(state[0])
            self.opt.state[self.syn] = state[1]
            self.prefetcher.clear()  # the failed attempt consumed this iteration's chunks: load them again
            self._schedule_real(self.iteration, real_idx)
            self._schedule_real(self.iteration + 1, self._next_real_idx)
            return self._finish_step(net, params, real_idx, mark, timings, None, None)
        self.compile_seconds = time.perf_counter() - t0
        return out

    def _finish_step(self, net, params, real_idx, mark, timings, weights, real_weights):
        c, B = self.cfg, self.batch_real
        # Real side: only its per-class means enter the loss, so it is reduced chunk by chunk.
        acc = ClassMeanAccumulator(self.Kl, power=c.power, backend=c.backend)
        real_net = net
        if weights is None or self.fused_real == "cpu":
            real_net = self._real_side_copy(net, REAL_DTYPES[c.real_dtype])  # once per step, not per chunk
        for j, (a, b) in enumerate(self._real_chunks()):
            with nvtx_range("datadam_fast.step.load"):
                if self.real_all is not None:
                    x = self.real_all[real_idx[(self.k_lo + a) * B:(self.k_lo + b) * B].to(self.real_all.device)]
                else:
                    x = self._finish_rows(self.prefetcher.get((self.iteration, j)))
            mark("load")
            glob = torch.arange(self.k_lo + a, self.k_lo + b, device=self.device).repeat_interleave(B)
            local = torch.arange(a, b).repeat_interleave(B)
            self._real_pass(real_net, x, glob, params, acc, local, mark if timings is not None else None,
                            real_weights)
            del x
        targets = acc.targets()
        del acc
        # Synthetic side: forward + loss + backward per class chunk; gradients land in one buffer.
        if self.syn.grad is None:
            self.syn.grad = torch.zeros_like(self.syn)
        grad = self.syn.grad
        att_sum = torch.zeros((), device=self.device)
        emb_sum = torch.zeros((), device=self.device)
        ipc = c.ipc
        for a, b in self._syn_chunks():
            rows = slice(a * ipc, b * ipc)
            chunk_targets = ClassTargets([t[a:b] for t in targets.attention], targets.embedding[a:b], c.power)
            g, att, emb = self._syn_pass(net, self.syn[rows], self.labels_syn[rows], params, chunk_targets, b - a,
                                         mark if timings is not None else None, weights)
            grad[rows].copy_(g)
            att_sum += att
            emb_sum += emb
            del g
        with nvtx_range("datadam_fast.step.update"):
            self.opt.step()
        mark("update")
        self.iteration += 1
        return {"loss": att_sum + emb_sum, "loss_attention": att_sum, "loss_embedding": emb_sum}

    @staticmethod
    def _real_side_copy(net, dtype):
        """``net`` in the real side's dtype: itself when it already is (the step casts once, not per chunk)."""
        p = next(net.parameters(), None)
        if p is None or p.dtype == dtype:
            return net
        import copy
        return copy.deepcopy(net).to(dtype)

    def _compiled_passes(self):
        from .compiled import CompiledPasses
        template = self.new_network(torch.Generator().manual_seed(0))
        return CompiledPasses(template, power=self.cfg.power, embedding_only=self.cfg.method == "dm",
                              real_dtype=REAL_DTYPES[self.cfg.real_dtype], mode=self.cfg.compile_mode)

    # ---------------------------------------------------------------- memory plan
    def _probe_sizes(self, net) -> Tuple[int, int]:
        """Two probe batch sizes whose activations are large enough (>= ~48 MB) that the
        allocator maps them fresh (so the resident-set peak sees them) yet stay small next to
        the budget."""
        ds = self.train_set
        with torch.no_grad():
            feats, emb = net.features_and_embedding(
                self._layout(torch.zeros(1, ds.channels, *ds.image_size, device=self.device)))
        per_img = max(sum(f.numel() for f in feats) * 4 + emb.numel() * 4, 1)
        n1 = int(min(max(2, math.ceil(48 * MB / per_img)), 256))
        n1 = max(1, min(n1, int(self.budget // 20 // (3 * per_img * 8)) or 1))
        return n1, 2 * n1

    def _probe(self) -> Dict[str, float]:
        """Measured peak bytes of the real pass and of the synthetic pass at two batch sizes:
        per-image slope and per-call intercept of each."""
        c, ds = self.cfg, self.train_set
        gen = torch.Generator().manual_seed(12345)  # the probe must not move the run's generator
        net = self.new_network(gen)
        params = self.dsa.sample(1, gen, self.device, tuple(ds.image_size)) if self.dsa else None
        n1, n2 = self._probe_sizes(net)
        out = {}
        for side in ("real", "syn"):
            peaks = []
            for n in (n1, n2):
                x = self._layout(torch.randn(n, ds.channels, *ds.image_size, generator=gen).to(self.device))
                lab = torch.zeros(n, dtype=torch.long, device=self.device)
                if side == "real":
                    acc = ClassMeanAccumulator(1, power=c.power, backend=c.backend)
                    fn = lambda: self._real_pass(net, x, lab, params, acc, lab.cpu())  # noqa: E731
                else:
                    with torch.no_grad():
                        f, e = net.features_and_embedding(x[:1])
                    maps = [] if c.method == "dm" else [torch.zeros(1, t.shape[2] * t.shape[3], device=self.device)
                                                        for t in f]
                    tg = ClassTargets(maps, torch.zeros(1, e.shape[1], device=self.device), c.power)
                    xs = x.contiguous()
                    fn = lambda: self._syn_pass(net, xs, lab, params, tg, 1)  # noqa: E731
                fn()  # warm-up: first-call allocations (kernel JIT, weight reorders) are not per image
                peaks.append(self.mem.measure(fn))
                del x
            floor = ds.channels * ds.image_size[0] * ds.image_size[1] * 4.0
            out[f"{side}_per_image"], out[f"{side}_base"] = linear_fit((n1, n2), peaks, floor)
        out["probe_sizes"] = (n1, n2)
        return out

    def _fixed_bytes(self, probe: Dict[str, float]) -> int:
        c, ds = self.cfg, self.train_set
        syn_bytes = self.syn.numel() * self.syn.element_size()
        fixed = self.mem.current()
        if self.syn.grad is None:
            fixed += syn_bytes
        if c.momentum and not self.opt.state.get(self.syn):
            fixed += syn_bytes
        with torch.no_grad():
            net = self.new_network(torch.Generator().manual_seed(0))
            f, e = net.features_and_embedding(self._layout(torch.zeros(1, ds.channels, *ds.image_size,
                                                                       device=self.device)))
        per_class = sum(t.shape[2] * t.shape[3] for t in f) + e.shape[1]
        fixed += self.Kl * per_class * (8 + 4)  # float64 running sums + float32 targets
        if self.world.distributed and self.world.is_main:
            full = syn_bytes * self.K // max(self.Kl, 1)
            fixed += 2 * full  # images + momentum gathered for a checkpoint (on the host)
        return int(fixed + max(probe["real_base"], probe["syn_base"]))

    def _rough_per_image(self) -> int:
        """Bytes of every leaf module's output for one image: a generous bound's unit."""
        ds = self.train_set
        net = self.new_network(torch.Generator().manual_seed(0))
        total = [0]
        hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o.numel() * o.element_size()))
                 for m in net.modules() if not list(m.children())]
        try:
            with torch.no_grad():
                net.features_and_embedding(self._layout(torch.zeros(1, ds.channels, *ds.image_size,
                                                                    device=self.device)))
        finally:
            for h in hooks:
                h.remove()
        return total[0]

    def _make_plan(self) -> MemoryPlan:
        c, ds = self.cfg, self.train_set
        if not (c.real_chunk or c.syn_chunk):
            # Small runs skip the probe: with every activation kept ROUGH_FACTOR times over
            # (saved for backward, gradients, temporaries) one pass still uses under half the budget.
            rough = ROUGH_FACTOR * self._rough_per_image()
            syn_bytes = self.syn.numel() * self.syn.element_size()
            bound = self.mem.current() + 3 * syn_bytes + self.Kl * (self.batch_real + c.ipc) * rough
            if bound <= self.budget // 2:
                plan = plan_chunks(budget=self.budget, fixed=bound - self.Kl * (self.batch_real + c.ipc) * rough,
                                   real_per_image=rough, syn_per_image=rough, prefetch_per_image=0,
                                   num_classes=self.Kl, batch_real=self.batch_real, ipc=c.ipc, lookahead=0,
                                   real_chunk=self.Kl, syn_chunk=self.Kl)
                plan.notes.append(f"not probed: a generous bound ({ROUGH_FACTOR}x every activation) fits in half "
                                  f"the budget, so one chunk per side")
                return plan
        probe = self._probe()
        row = ds.channels * ds.image_size[0] * ds.image_size[1]
        prefetch_per_image = row * (4 + 1) if self.real_all is None else 0
        plan = plan_chunks(budget=self.budget, fixed=self._fixed_bytes(probe),
                           real_per_image=int(probe["real_per_image"]), syn_per_image=int(probe["syn_per_image"]),
                           prefetch_per_image=prefetch_per_image, num_classes=self.Kl, batch_real=self.batch_real,
                           ipc=c.ipc, lookahead=self.prefetcher.lookahead if self.prefetcher.enabled else 0,
                           real_chunk=c.real_chunk or None, syn_chunk=c.syn_chunk or None,
                           single_pass=self.single_pass)
        plan.notes.append(f"probe batch sizes {probe['probe_sizes']}")
        return plan

    # ---------------------------------------------------------------- checkpoints
    def _momentum(self) -> Optional[torch.Tensor]:
        st = self.opt.state.get(self.syn)
        return None if not st else st.get("momentum_buffer")

    def _syn_counts(self) -> List[int]:
        return [(b - a) * self.cfg.ipc for a, b in (class_block(self.K, r, self.world.size)
                                                    for r in range(self.world.size))]

    def checkpoint_state(self) -> Optional[Dict]:
        """The full run state on rank 0 (collective: every rank must call it); None elsewhere."""
        counts = self._syn_counts()
        images = self.world.gather_rows(self.syn.detach(), counts, to_all=False)
        mom = self._momentum()
        has_mom = self.world.max_int(0 if mom is None else 1)
        momentum = None
        if has_mom:
            momentum = self.world.gather_rows(mom if mom is not None else torch.zeros_like(self.syn), counts,
                                              to_all=False)
        if not self.world.is_main:
            return None
        return {"format": CHECKPOINT_FORMAT, "iteration": self.iteration, "images": images, "momentum": momentum,
                "generator": self.gen.get_state(), "next_real_idx": self._next_real_idx.clone(),
                "config": dataclasses.asdict(self.cfg), "identity": self.cfg.identity(),
                "world_size": self.world.size}

    def save_checkpoint(self) -> None:
        if not self.out_dir:
            return
        state = self.checkpoint_state()
        if state is not None:
            atomic_torch_save(state, os.path.join(self.out_dir, CHECKPOINT))

    def _load_checkpoint(self) -> None:
        path = os.path.join(self.out_dir, CHECKPOINT)
        try:  # mmap: each rank touches only its own classes' rows of a large checkpoint
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it and start again "
                            f"with overwrite=True") from None
        if not isinstance(ck, dict) or ck.get("format") not in (CHECKPOINT_FORMAT, "datadam_fast.checkpoint/1"):
            raise UserError(f"{path} is not a datadam-fast checkpoint")
        mine = self.cfg.identity()
        theirs = {k: v for k, v in ck.get("identity", {}).items() if k not in _NOT_IDENTITY}
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in list(diff.items())[:6])
            raise UserError(f"checkpoint {path} was made with different settings ({desc}); rerun with the same "
                            f"flags or start a new --out")
        full = (self.K * self.cfg.ipc,) + tuple(self.syn.shape[1:])
        if tuple(ck["images"].shape) != full:
            raise UserError(f"checkpoint images {tuple(ck['images'].shape)} do not match {full}")
        rows = slice(self.k_lo * self.cfg.ipc, self.k_hi * self.cfg.ipc)
        with torch.no_grad():
            self.syn.copy_(ck["images"][rows].to(self.device))
        mom = ck.get("momentum")
        if mom is None and "optimizer" in ck:  # format 1: one parameter, SGD's own state dict
            mom = (ck["optimizer"].get("state", {}).get(0) or {}).get("momentum_buffer")
        self.opt.state.clear()
        if mom is not None:
            self.opt.state[self.syn]["momentum_buffer"] = mom[rows].to(self.device).clone()
        self.gen.set_state(ck["generator"])
        self.iteration = int(ck["iteration"])
        nxt = ck.get("next_real_idx")
        # format 1 stored the generator before the iteration's draws: draw the batch now
        self._next_real_idx = nxt.clone() if nxt is not None else self._draw_real_indices()
        del ck

    # ---------------------------------------------------------------- outputs
    def test_set(self):
        if self._test_set is None:
            from ..data import load_dataset
            self._test_set = load_dataset(self.cfg.dataset, root=self.cfg.data_root, split="test",
                                          **dict(self.cfg.data_opts))
        return self._test_set

    def full_synthetic(self, to_all: bool = True) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of every class, on the host (collective under sharding)."""
        images = self.world.gather_rows(self.syn.detach(), self._syn_counts(), to_all=to_all)
        if images is None:
            return None
        labels = torch.arange(self.K).repeat_interleave(self.cfg.ipc)
        return images, labels

    def evaluate(self) -> Dict:
        """Evaluation networks trained on the whole synthetic set; the runs are split over ranks
        (run r on rank r mod world size, seeded by r alone, so any world size gives the same)."""
        from ..evaluate import EvalConfig, evaluate_synthetic
        c = self.cfg
        images, labels = self.full_synthetic(to_all=True)
        same = c.eval_model == c.model
        ecfg = EvalConfig(model=c.eval_model, epochs=c.eval_epochs, runs=c.eval_runs, dsa=c.dsa,
                          dsa_strategy=c.dsa_strategy, norm=c.norm if same else None,
                          width=c.width if same else None, depth=c.depth if same else None,
                          batch_size=c.eval_batch)
        mine = list(range(self.world.rank, c.eval_runs, self.world.size))
        seed = c.seed * 7919 + self.iteration
        res = evaluate_synthetic(images, labels, self.test_set(), ecfg, seed=seed, device=self.device,
                                 run_ids=mine) if mine else {"accuracies": [], "network": None}
        parts = self.world.gather_objects(list(zip(mine, res["accuracies"])))
        accs = [a for _, a in sorted(p for part in parts for p in part)]
        t = torch.tensor(accs, dtype=torch.float64)
        return {"accuracies": accs, "mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(accs) > 1
                else 0.0, "model": ecfg.model, "network": res["network"], "epochs": ecfg.epochs,
                "num_images": int(images.shape[0])}

    def synthetic_state(self) -> Optional[Dict]:
        full = self.full_synthetic(to_all=False)
        if full is None:
            return None
        ds = self.train_set
        return {"images": full[0].clone(), "labels": full[1], "mean": list(ds.mean), "std": list(ds.std),
                "dataset": ds.name, "config": dataclasses.asdict(self.cfg), "iteration": self.iteration}

    def write_outputs(self) -> None:
        from ..visualize import save_grid
        if not self.out_dir:
            return
        state = self.synthetic_state()
        if state is None:
            return
        atomic_torch_save(state, os.path.join(self.out_dir, "synthetic.pt"))
        # one row per class; a grid of more than GRID_MAX_CLASSES classes would be unreadable
        shown = state["images"][:GRID_MAX_CLASSES * self.cfg.ipc]
        save_grid(self.train_set.denormalize(shown), os.path.join(self.out_dir, "grid.png"),
                  nrow=self.cfg.ipc if self.cfg.ipc <= 20 else 20)

    def _log(self, record: Dict) -> None:
        if self.out_dir and self.world.is_main:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _say(self, msg: str) -> None:
        if self.world.is_main and (self.progress or os.environ.get("DATADAM_FAST_QUIET") != "1"):
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stderr)

    def _truncate_metrics(self) -> None:
        """On resume, drop log lines written after the checkpoint (they will be written again)."""
        if not self.out_dir or not self.world.is_main:
            return
        p = os.path.join(self.out_dir, "metrics.jsonl")
        if not os.path.exists(p):
            return
        keep = []
        with open(p) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                if rec.get("iteration", 0) <= self.iteration:  # evals at the checkpoint's iteration ran before it
                    keep.append(line if line.endswith("\n") else line + "\n")
        atomic_write_text(p, "".join(keep))

    def _should_eval(self, it: int) -> bool:
        e = self.cfg.eval_every
        if e < 0 or self.cfg.eval_runs <= 0:
            return False
        return it == self.cfg.iterations or (e > 0 and it % e == 0)

    def run(self, *, stop_after: Optional[int] = None) -> Dict:
        """Run to ``cfg.iterations``; ``stop_after`` (testing) returns early after that many iterations."""
        c = self.cfg
        self._truncate_metrics()
        plan = {**self.plan.as_dict(), "world_size": self.world.size, "device": str(self.device),
                "classes_total": self.K, "real_cached_on_device": self.real_all is not None}
        self._say(f"{self.plan.summary()}" + (f"; {self.world.size} processes, {self.Kl} classes on rank 0"
                                               if self.world.distributed else ""))
        if self.iteration == 0:
            self._log({"iteration": 0, "event": "start", "config": dataclasses.asdict(c),
                       "batch_real": self.batch_real, "num_classes": self.K})
        self._log({"iteration": self.iteration, "event": "plan", "plan": plan})
        last_eval = None
        if self.iteration == 0 and self._should_eval(0):
            last_eval = self._eval_and_log()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=c.iterations, initial=self.iteration, desc=f"distill {c.dataset} ipc={c.ipc}",
                       unit="it", dynamic_ncols=True)
        images_per_it = self.K * (self.batch_real + c.ipc)
        t_last, it_last = time.perf_counter(), self.iteration
        done = 0
        try:
            while self.iteration < c.iterations:
                terms = self.step()
                done += 1
                it = self.iteration
                if bar is not None:
                    bar.update(1)
                if done == 1:
                    t_first = time.perf_counter()  # the first iteration compiles: not a typical one
                    if self.compile_seconds is not None:
                        self._say(f"compiled the network passes in {self.compile_seconds:.1f} s (first iteration)")
                        self._log({"iteration": it, "event": "compile", "seconds": self.compile_seconds})
                if done == 3 or (done < 3 and it == c.iterations):
                    if done == 1:
                        self._report_measured(time.perf_counter() - t_last, 1)
                    else:
                        self._report_measured(time.perf_counter() - t_first, done - 1)
                if it % c.log_every == 0 or it == c.iterations:
                    now = time.perf_counter()
                    sec = (now - t_last) / max(it - it_last, 1)
                    t_last, it_last = now, it
                    vals = self.world.sum_(torch.stack([terms[k] for k in _TERMS]))  # sums over ranks
                    vals = [float(v) for v in vals]
                    peak = self.world.max_int(self.mem.process_peak())
                    rec = {"iteration": it, **dict(zip(_TERMS, vals)), "it_per_s": 1.0 / max(sec, 1e-12),
                           "sec_per_it": sec, "images_per_s": images_per_it / max(sec, 1e-12),
                           "peak_memory_mb": peak / MB}
                    if bar is not None:
                        bar.set_postfix(loss=f"{vals[0]:.4g}", refresh=False)
                    self._log(rec)
                if self._should_eval(it):
                    last_eval = self._eval_and_log()
                if c.checkpoint_every > 0 and (it % c.checkpoint_every == 0) and it < c.iterations:
                    self.save_checkpoint()
                if stop_after is not None and done >= stop_after:
                    return {"stopped": True, "iteration": it}
        finally:
            if bar is not None:
                bar.close()
        self.save_checkpoint()
        self.write_outputs()
        summary = {"iteration": self.iteration, "dataset": c.dataset, "ipc": c.ipc, "preset": c.preset,
                   "eval": last_eval, "world_size": self.world.size,
                   "peak_memory_mb": self.world.max_int(self.mem.process_peak()) / MB,
                   "predicted_peak_mb": self.plan.predicted_peak / MB, "memory_budget_mb": self.budget / MB}
        if self.out_dir and self.world.is_main:
            atomic_write_text(os.path.join(self.out_dir, "summary.json"), json.dumps(summary, indent=2))
        return summary

    def _report_measured(self, seconds: float, iterations: int) -> None:
        if iterations <= 0:
            return
        sec = seconds / iterations
        peak = self.world.max_int(self.mem.process_peak())
        self._say(f"measured: {sec:.3g} s/iteration, peak memory {peak / GB:.2f} GB "
                  f"(predicted {self.plan.predicted_peak / GB:.2f} GB, budget {self.budget / GB:.2f} GB)")
        self._log({"iteration": self.iteration, "event": "plan_measured", "sec_per_it": sec,
                   "peak_memory_mb": peak / MB, "predicted_peak_mb": self.plan.predicted_peak / MB})

    def _eval_and_log(self) -> Dict:
        res = self.evaluate()
        short = {k: res[k] for k in ("mean", "std", "accuracies", "model", "network", "epochs")}
        self._log({"iteration": self.iteration, "eval": short})
        if self.progress:
            from tqdm import tqdm
            tqdm.write(f"iteration {self.iteration}: {short['model']} accuracy {short['mean']:.2f} ± {short['std']:.2f} %")
        return short

    def close(self) -> None:
        self.prefetcher.close()


def distill(cfg: DistillConfig, out_dir: Optional[str] = None, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True) -> Dict:
    d = Distiller(cfg, out_dir, resume=resume, overwrite=overwrite, progress=progress)
    try:
        return d.run()
    finally:
        d.close()
