"""The DataDAM distillation loop, assembled.

Per iteration (``main_DataDAM.py:222-317``): a fresh randomly initialised network; ``batch_real``
real images per class; one Siamese DSA transform per class shared by its real and synthetic
images; one forward pass per side for all classes (the real side under ``no_grad``, optionally
streamed in chunks into running class means); the method's loss (:mod:`.methods`: DataDAM, DM or
a user's own); one SGD step on the synthetic pixels (momentum 0.5). Every random draw comes from
one seeded ``torch.Generator`` whose state is checkpointed, so a killed and resumed run ends with
the same synthetic set as an uninterrupted one.

Who does what: :mod:`.config` validates, :mod:`.step` is one iteration, :mod:`.planner` sizes the
chunks, :mod:`.rundir` owns the files, :mod:`.loop` runs the iterations. :class:`Distiller`
assembles the run from named parts: the data side (training set, class indices, the real rows'
cache or prefetcher), the :class:`~.step.RealSide` path chosen once, the memory plan, the compiled
passes, and the :class:`RunState` that moves from one iteration to the next (what a checkpoint
holds).
"""
from __future__ import annotations

import dataclasses

from typing import Dict, List, Optional, Tuple, Union

import torch

from . import loop, planner, rundir, step as _step
from .step import RealSide
from .config import REAL_DTYPES, DistillConfig, evaluation_scheduled, net_overrides, validate
from .memory import GB, PeakMemory, parse_budget
from .methods import Method, check_method, method_class
from .parallel import World, class_block, init_world
from .prefetch import ChunkPrefetcher


def make_optimizer(c, syn: torch.Tensor) -> torch.optim.Optimizer:
    """The pixels' optimiser (``--optimizer``): SGD with ``momentum`` (DataDAM, DM), Adam, or AdamW
    with torch's default weight decay 0.01 (NCFM's ``get_optimizer`` with its config's 0.01)."""
    if c.optimizer == "adam":
        return torch.optim.Adam([syn], lr=c.lr_img)
    if c.optimizer == "adamw":
        return torch.optim.AdamW([syn], lr=c.lr_img, weight_decay=0.01)
    return torch.optim.SGD([syn], lr=c.lr_img, momentum=c.momentum)


@dataclasses.dataclass
class RunState:
    """Everything that moves from one iteration to the next, and nothing else: what
    :mod:`.rundir` checkpoints and restores (the rest of a run is rebuilt from its config)."""
    syn: torch.Tensor                   # this rank's synthetic images (the optimised leaf)
    opt: torch.optim.Optimizer          # on ``syn``: SGD (its momentum buffer), Adam or AdamW (its moments)
    gen: torch.Generator                # every random draw of the run
    next_real_idx: torch.Tensor         # the next iteration's real batch, drawn one iteration ahead
    iteration: int = 0


class Distiller:
    """One distillation run (optionally one rank of a class-sharded ``torchrun`` job).

    Memory per iteration is bounded by a plan (:mod:`.memory`): the real side is streamed through
    the network in class chunks into running class sums, and the synthetic side goes forward +
    loss + backward one class chunk at a time, its pixel gradients written into one buffer, before
    a single optimiser step. With a per-sample norm (InstanceNorm) the classes never interact, so
    any chunking (and any class sharding) gives the same images up to float rounding.

    ``method``: a :class:`~datadam_fast.distill.methods.Method` instance (default: the one
    ``cfg.method`` names). ``run_flags``: the CLI-only values (``{flag: value}``: device as given,
    threads, nvtx, no-progress) that ``config.toml`` records besides the config.

    A context manager: ``with Distiller(cfg, out) as d: d.run()`` stops the prefetch thread on exit.
    """

    def __init__(self, cfg: DistillConfig, out_dir: Optional[str], *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, train_set=None, test_set=None, world: Optional[World] = None,
                 method: Optional[Method] = None, run_flags: Optional[Dict[str, object]] = None):
        from ..data import load_dataset
        if cfg.device == "auto":  # cuda when available (the local rank's GPU under torchrun), else cpu
            from ..devices import resolve_device
            cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device)[0])
        self.world = W = world if world is not None else init_world(cfg.device)
        self.out_dir = out_dir
        self.run_flags = dict(run_flags or {})
        self.progress = progress and W.is_main
        if out_dir:
            rundir.check_out_dir(out_dir, resume, overwrite)  # fail fast, touch nothing yet
        self.builtin_method = method is None
        method_type = method_class(cfg.method_name()) if method is None else check_method(method)
        self.train_set = ds = train_set or load_dataset(cfg.dataset, root=cfg.data_root, split="train",
                                                         **dict(cfg.data_opts))
        self._test_set = test_set
        checked = validate(cfg, ds, W, method_type)
        self.cfg = c = checked.cfg
        self.batch_real, self.device, self.single_pass = checked.batch_real, checked.device, checked.single_pass
        self.method = (method_type.from_config(c) if method is None else method).bind(c)
        if c.backend != "auto":  # a named loss backend that cannot run here fails now, not at the first loss
            from ..loss.backends import resolve_backend
            resolve_backend(c.backend, self.device)

        if c.zca:  # every real image the run reads comes out whitened (fit on the training set)
            from ..data.zca import whiten_train_set
            self.train_set = ds = whiten_train_set(ds, device=self.device)
        if evaluation_scheduled(c):  # the end-of-run evaluation needs a test split: found now, not after the run
            from ..errors import UserError
            try:
                self.test_set()
            except UserError as e:
                raise UserError(f"the run evaluates on the test split (--eval-every {c.eval_every}, --eval-runs "
                                f"{c.eval_runs}), which cannot be read: {e}; pass --eval-every -1 to distill "
                                f"without evaluation") from None
        self.K = ds.num_classes
        self.factor = c.factor  # multi-formation: each stored image decodes to factor^2 images
        from .networks import network_source
        self.networks = network_source(self)  # random, or a trained pool (built at the start of run())
        self.k_lo, self.k_hi = class_block(self.K, W.rank, W.size)
        self.Kl = self.k_hi - self.k_lo
        gen = torch.Generator().manual_seed(c.seed)
        from ..models.augment import DSA
        self.dsa = DSA(c.dsa_strategy) if c.dsa else None
        self.mem = PeakMemory(self.device)
        self.budget = parse_budget(c.memory_budget, self.device, self.mem.current())
        # A small training set is normalised once and kept on the device; a large one is read
        # chunk by chunk (memory-mapped sets through pread, see data._base._read_rows).
        nbytes = len(ds) * ds.channels * ds.image_size[0] * ds.image_size[1] * 4
        cache = nbytes <= min(2 * GB, self.budget // 8)
        self.real_all = self.layout(ds.normalized_all(self.device)) if cache else None
        self.class_idx = [ix.clone() for ix in ds.class_indices()]
        # synthetic rows of this rank: classes [k_lo, k_hi), class-major
        self.labels_syn = torch.arange(self.k_lo, self.k_hi, device=self.device).repeat_interleave(c.ipc)
        syn = self._initial_synthetic(gen)
        self.state = RunState(syn=syn, opt=make_optimizer(c, syn), gen=gen,
                              next_real_idx=self._draw_real_indices(gen))
        if resume:
            rundir.load_checkpoint(self)
        self.prefetcher = ChunkPrefetcher(self.load_rows, lookahead=1 if c.prefetch else 0,
                                          enabled=self.real_all is None and c.prefetch)
        # the real side's path, chosen once: before the plan, whose probe runs the real pass
        self.real_side = RealSide(self._resolve_real_epilogue(), self.cfg.real_epilogue)
        self.plan = planner.make_plan(self)
        self.passes = self._compiled_passes() if c.compile and self.method.compilable else None
        self.real_side.compiled = self.passes is not None
        self.compile_seconds: Optional[float] = None
        self.schedule_real(self.iteration, self.state.next_real_idx)
        W.barrier()  # every rank validated its inputs (and read the checkpoint) before rank 0 writes
        if out_dir and not resume and W.is_main:
            rundir.claim_out_dir(out_dir)

    # ---------------------------------------------------------------- setup
    def _resolve_real_epilogue(self) -> Optional[str]:
        """The fused real side (:mod:`.real_side`) this run uses: ``"cpu"`` (C++), ``"triton"`` or None.

        ``auto``: the C++ kernels on CPU for float32 real passes (they replace the compiled real
        pass too: a first layer convolved per sample in L2 beats oneDNN + inductor's epilogue,
        see README); Triton on CUDA for uncompiled passes (compiled ones get inductor's fusion).
        ``cpu`` / ``triton``: that implementation, or an error now if it cannot run here. Only for
        methods that take the fused real side (``Method.fused_real``)."""
        from ..errors import UserError
        from .real_side import blocks_of, unavailable_reason, warn_fallback
        mode, dev = self.cfg.real_epilogue, self.device
        if mode == "off":
            return None
        if not self.method.fused_real:
            if mode != "auto":
                raise UserError(f"--real-epilogue {mode}: method {self.method.name!r} does not use the fused real side")
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
        net = self.new_network(torch.Generator().manual_seed(0))
        why = unavailable_reason(net, dev, impl)
        if why and mode != "auto":
            raise UserError(f"--real-epilogue {mode}: {why}")
        if why and blocks_of(net)[1] is None:  # the model fits but the kernels cannot run here: say why
            warn_fallback(impl, dev, why)
        return None if why else impl

    def _compiled_passes(self):
        from .compiled import MethodPasses
        template = self.new_network(torch.Generator().manual_seed(0))
        return MethodPasses(template, self.method, real_dtype=REAL_DTYPES[self.cfg.real_dtype],
                            mode=self.cfg.compile_mode)

    # ---------------------------------------------------------------- the run state's parts
    @property
    def syn(self) -> torch.Tensor:
        return self.state.syn

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.state.opt

    @property
    def gen(self) -> torch.Generator:
        return self.state.gen

    @property
    def iteration(self) -> int:
        return self.state.iteration

    @property
    def fused_real(self) -> Optional[str]:
        """The fused real-side implementation in use (``"cpu"``, ``"triton"``) or None."""
        return self.real_side.fused

    # ---------------------------------------------------------------- the data side
    def layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def load_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Real rows for the prefetcher thread: normalised on CPU; pinned uint8 for a GPU."""
        ds = self.train_set
        if self.device.type == "cuda":
            return ds.rows_uint8(idx).pin_memory()
        return self.layout(ds.batch(idx, device="cpu"))

    def real_rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self.real_all is not None:
            return self.real_all[idx.to(self.real_all.device)]
        return self.finish_rows(self.load_rows(idx))

    def finish_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.dtype == torch.uint8:
            rows = self.train_set.normalize_uint8(rows.to(self.device, non_blocking=True), device=self.device)
            return self.layout(rows)
        return rows.to(self.device)

    def _initial_synthetic(self, gen: torch.Generator) -> torch.Tensor:
        """Initial images of this rank's classes. Draws are made for every class in class order
        (one ``randperm`` or one ``randn`` per class), so every world size draws the same. With
        ``factor`` F, real initialisation fills each stored image's F x F cells with downsampled
        real images of the class (``ipc * F^2`` of them)."""
        from ..data.formation import encode
        c, ds = self.cfg, self.train_set
        shape = (c.ipc, ds.channels, *ds.image_size)
        parts = []
        for k, ix in enumerate(self.class_idx):
            if c.init == "real":
                pick = ix[torch.randperm(len(ix), generator=gen)[:c.ipc * c.factor ** 2]]
                if self.k_lo <= k < self.k_hi:
                    rows = self.real_rows(pick).detach().float().contiguous()
                    parts.append(encode(rows, c.factor))
            else:
                noise = torch.randn(shape, generator=gen)
                if self.k_lo <= k < self.k_hi:
                    parts.append(noise.to(self.device))
        return torch.cat(parts).to(self.device).contiguous().requires_grad_(True)

    def _draw_real_indices(self, gen: torch.Generator) -> torch.Tensor:
        B = self.batch_real
        return torch.cat([ix[torch.randperm(len(ix), generator=gen)[:B]] for ix in self.class_idx])

    def draw_real_indices(self) -> torch.Tensor:
        """``batch_real`` indices of every class (all classes drawn on every rank, in order)."""
        return self._draw_real_indices(self.state.gen)

    def real_chunks(self) -> List[Tuple[int, int]]:
        """(first, last) local class of each real chunk."""
        rc = self.plan.real_chunk
        return [(a, min(a + rc, self.Kl)) for a in range(0, self.Kl, rc)]

    def syn_chunks(self) -> List[Tuple[int, int]]:
        sc = self.plan.syn_chunk
        return [(a, min(a + sc, self.Kl)) for a in range(0, self.Kl, sc)]

    def schedule_real(self, iteration: int, idx: torch.Tensor) -> None:
        if self.real_all is not None:
            return
        B = self.batch_real
        for j, (a, b) in enumerate(self.real_chunks()):
            rows = idx[(self.k_lo + a) * B:(self.k_lo + b) * B]
            self.prefetcher.schedule((iteration, j), rows)

    def new_network(self, gen: Optional[torch.Generator] = None):
        from ..models.networks import get_network
        c, ds = self.cfg, self.train_set
        net = get_network(c.model, ds.channels, self.K, tuple(ds.image_size), generator=gen or self.gen,
                          taps=c.taps, **net_overrides(c.width, c.depth, c.norm)).to(self.device)
        if c.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    # ---------------------------------------------------------------- the step and the run
    def step(self, timings: Optional[Dict[str, float]] = None) -> Dict[str, torch.Tensor]:
        """One distillation iteration (:func:`.step.step`)."""
        return _step.step(self, timings)

    def real_pass(self, net, x, labels, params, sums, local_cpu, mark=None, weights=None) -> None:
        _step.real_pass(self, net, x, labels, params, sums, local_cpu, mark, weights)

    def syn_pass(self, net, rows, labels, params, targets, classes, mark=None, weights=None):
        return _step.syn_pass(self, net, rows, labels, params, targets, classes, mark, weights)

    def run(self, *, stop_after: Optional[int] = None) -> Dict:
        """Run to ``cfg.iterations``; ``stop_after`` (testing) returns early after that many iterations."""
        return loop.run(self, stop_after=stop_after)

    def evaluate(self) -> Dict:
        return loop.evaluate(self)

    def test_set(self):
        if self._test_set is None:
            from ..data import load_dataset
            self._test_set = load_dataset(self.cfg.dataset, root=self.cfg.data_root, split="test",
                                          **dict(self.cfg.data_opts))
            if self.cfg.zca:  # test images through the training set's transform
                from ..data.zca import whiten_like
                self._test_set = whiten_like(self._test_set, self.train_set.zca)
        return self._test_set

    def checkpoint_state(self) -> Optional[Dict]:
        return rundir.checkpoint_state(self)

    def save_checkpoint(self) -> None:
        rundir.save_checkpoint(self)

    def full_synthetic(self, to_all: bool = True):
        return rundir.full_synthetic(self, to_all)

    def synthetic_state(self) -> Optional[Dict]:
        return rundir.synthetic_state(self)

    def write_outputs(self) -> None:
        rundir.write_outputs(self)

    def close(self) -> None:
        self.prefetcher.close()

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def distill(cfg: DistillConfig, out_dir: Optional[str] = None, *, resume: bool = False, overwrite: bool = False,
            progress: bool = True, method: Union[Method, str, None] = None, world: Optional[World] = None) -> Dict:
    """Run a distillation to the end; returns the summary. ``method``: a
    :class:`~datadam_fast.distill.methods.Method` instance (a user's own), or a registered name
    (a key of :data:`~datadam_fast.distill.methods.METHODS`) that replaces ``cfg.method``."""
    if isinstance(method, str):
        import dataclasses
        cfg, method = dataclasses.replace(cfg, method=method), None
    with Distiller(cfg, out_dir, resume=resume, overwrite=overwrite, progress=progress, method=method,
                   world=world) as d:
        return d.run()
