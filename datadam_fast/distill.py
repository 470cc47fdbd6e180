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
import os
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .errors import UserError
from .loss import attention_matching_loss
from .profiling import nvtx_range
from .targets import ClassMeanAccumulator, ClassTargets

PRESETS = {
    # what the paper and its hyper-parameter table describe
    "paper": {"norm": "instancenorm", "power": 4.0},
    # what the official code actually runs (get_network('ConvNet') -> batchnorm, get_attention exp=1)
    "official": {"norm": "batchnorm", "power": 1.0},
}
DEFAULT_PRESET = "paper"
CHECKPOINT = "checkpoint.pt"


@dataclass
class DistillConfig:
    dataset: str = "digits"
    data_root: Optional[str] = None
    ipc: int = 10
    iterations: Optional[int] = None     # 8000 (paper), 100 for the bundled digits demo
    batch_real: int = 64
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
    real_chunk: int = 0                  # 0 = one real forward pass; else classes per chunk
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
        from .networks import TAPS
        if c.taps not in TAPS:
            raise UserError(f"unknown taps {c.taps!r}; expected one of {list(TAPS)}")
        if c.lr_img is None:
            c.lr_img = 1.0 if c.ipc <= 50 else 10.0
        if c.depth is None and plain:
            from .networks import default_depth
            c.depth = default_depth(tuple(image_size))
        demo = c.dataset == "digits"
        if c.iterations is None:
            c.iterations = 100 if demo else 8000
        if c.eval_epochs is None:
            c.eval_epochs = 300 if demo else 1000
        if c.eval_model is None:
            c.eval_model = c.model
        return c

    # the fields that define the result; a checkpoint must agree on them to be resumed
    def identity(self) -> Dict:
        d = dataclasses.asdict(self)
        for k in ("device", "eval_every", "eval_runs", "eval_epochs", "eval_model", "eval_batch", "log_every",
                  "checkpoint_every", "data_root", "backend"):
            d.pop(k)
        return d


def _net_overrides(width, depth, norm) -> Dict:
    return {k: v for k, v in (("width", width), ("depth", depth), ("norm", norm)) if v is not None}


def check_model_name(name: str, what: str = "--model") -> None:
    from .networks import NETWORK_NAMES
    if name not in NETWORK_NAMES:
        raise UserError(f"unknown {what} {name!r}; expected one of {', '.join(NETWORK_NAMES)}")


def _atomic_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Distiller:
    def __init__(self, cfg: DistillConfig, out_dir: Optional[str], *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, train_set=None, test_set=None):
        from .data import load_dataset
        self.out_dir = out_dir
        self.progress = progress
        if out_dir:
            self._check_out_dir(out_dir, resume, overwrite)  # fail fast, touch nothing yet
        opts = dict(cfg.data_opts)
        self.train_set = train_set or load_dataset(cfg.dataset, root=cfg.data_root, split="train", **opts)
        self._test_set = test_set
        ds = self.train_set
        check_model_name(cfg.model)
        check_model_name(cfg.eval_model or cfg.model, "--eval-model")
        if cfg.width is not None or cfg.depth is not None:
            if not cfg.model.startswith("ConvNet"):
                raise UserError(f"--width/--depth apply to ConvNet models only, not {cfg.model}")
        self.cfg = cfg.resolved(ds.image_size)
        c = self.cfg
        if c.ipc < 1:
            raise UserError(f"--ipc must be >= 1, got {c.ipc}")
        if c.iterations < 0:  # resolved above
            raise UserError(f"--iterations must be >= 0, got {c.iterations}")
        if c.init not in ("real", "noise"):
            raise UserError(f"--init must be 'real' or 'noise', got {c.init!r}")
        counts = [len(ix) for ix in ds.class_indices()]
        K = ds.num_classes
        smallest = min(counts)
        if c.ipc > smallest:
            raise UserError(f"--ipc {c.ipc} is larger than the smallest class of {ds.name} "
                            f"(class {counts.index(smallest)} has {smallest} images)")
        self.batch_real = min(c.batch_real, smallest)
        if c.real_chunk and c.norm == "batchnorm":
            raise UserError("--real-chunk streams the real images through the network in chunks, which changes "
                            "BatchNorm's train-mode batch statistics (the loss would differ from one pass); use "
                            "--norm instancenorm (or --preset paper) with --real-chunk, or drop --real-chunk")
        self.device = torch.device(c.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda requested but CUDA is not available here")
        self.K = K
        self.gen = torch.Generator().manual_seed(c.seed)
        from .augment import DSA
        self.dsa = DSA(c.dsa_strategy) if c.dsa else None
        nbytes = len(ds) * ds.channels * ds.image_size[0] * ds.image_size[1] * 4
        self.real_all = self._layout(ds.normalized_all(self.device)) if nbytes <= 2 * 2 ** 30 else None
        self.class_idx = [ix.clone() for ix in ds.class_indices()]
        self.labels_syn = torch.arange(K, device=self.device).repeat_interleave(c.ipc)
        self.labels_real_cpu = torch.arange(K).repeat_interleave(self.batch_real)
        self.labels_real = self.labels_real_cpu.to(self.device)
        self.iteration = 0
        self._init_syn()
        self.opt = torch.optim.SGD([self.syn], lr=c.lr_img, momentum=c.momentum)
        if resume:
            self._load_checkpoint()
        elif out_dir:
            self._claim_out_dir(out_dir)

    # ---------------------------------------------------------------- setup
    def _check_out_dir(self, out_dir: str, resume: bool, overwrite: bool) -> None:
        if resume:
            if not os.path.isfile(os.path.join(out_dir, CHECKPOINT)):
                raise UserError(f"--resume: no checkpoint at {os.path.join(out_dir, CHECKPOINT)}")
            return
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise UserError(f"--out {out_dir} exists and is not a directory")
        if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
            raise UserError(f"output directory {out_dir} is not empty; pass --overwrite to replace its results "
                            f"or --resume to continue its checkpoint")

    def _claim_out_dir(self, out_dir: str) -> None:
        """Called once every input is validated: only then are stale results of --overwrite removed."""
        os.makedirs(out_dir, exist_ok=True)
        for name in ("metrics.jsonl", CHECKPOINT, "summary.json"):
            p = os.path.join(out_dir, name)
            if os.path.exists(p):
                os.remove(p)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def _real_rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self.real_all is not None:
            return self.real_all[idx.to(self.real_all.device)]
        return self._layout(self.train_set.batch(idx, device=self.device))

    def _init_syn(self) -> None:
        c, ds = self.cfg, self.train_set
        shape = (self.K * c.ipc, ds.channels, *ds.image_size)
        if c.init == "real":
            idx = torch.cat([ix[torch.randperm(len(ix), generator=self.gen)[:c.ipc]] for ix in self.class_idx])
            syn = self._real_rows(idx).detach().float().contiguous()
        else:
            syn = torch.randn(shape, generator=self.gen).to(self.device)
        self.syn = syn.to(self.device).requires_grad_(True)

    def _sample_real_indices(self) -> torch.Tensor:
        B = self.batch_real
        return torch.cat([ix[torch.randperm(len(ix), generator=self.gen)[:B]] for ix in self.class_idx])

    def new_network(self):
        from .networks import get_network
        c, ds = self.cfg, self.train_set
        net = get_network(c.model, ds.channels, self.K, tuple(ds.image_size), generator=self.gen,
                          **_net_overrides(c.width, c.depth, c.norm)).to(self.device)
        if c.channels_last:
            net = net.to(memory_format=torch.channels_last)
        net.train()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    # ---------------------------------------------------------------- one iteration
    def step(self, timings: Optional[Dict[str, float]] = None) -> Dict[str, float]:
        """One distillation iteration; ``timings`` (optional) receives seconds per phase."""
        c, K = self.cfg, self.K
        sync = (torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None))

        def mark(name, t0):
            if timings is not None:
                sync()
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
            return time.perf_counter()

        t = time.perf_counter()
        with nvtx_range("datadam_fast.step.sample"):
            net = self.new_network()
            real_idx = self._sample_real_indices()
            real = self._real_rows(real_idx)
            params = self.dsa.sample(K, self.gen, self.device, tuple(self.train_set.image_size)) if self.dsa else None
        t = mark("sample", t)
        ew = c.attention_factor * c.task_balance
        # The real side only enters through its per-class means, so it is reduced to ClassTargets
        # chunk by chunk (one chunk = all classes unless --real-chunk): never held beyond a chunk.
        acc = ClassMeanAccumulator(K, power=c.power, backend=c.backend)
        rows_per_chunk = c.real_chunk * self.batch_real if c.real_chunk else real.shape[0]
        with torch.no_grad():
            for i in range(0, real.shape[0], rows_per_chunk):
                x, y = real[i:i + rows_per_chunk], self.labels_real[i:i + rows_per_chunk]
                if params is not None:
                    with nvtx_range("datadam_fast.step.augment_real"):
                        x = self.dsa.apply(x, params, y)
                t = mark("augment", t)
                with nvtx_range("datadam_fast.step.real_forward"):
                    feats_r, emb_r = net.features_and_embedding(x)
                    acc.update(feats_r, emb_r, labels=self.labels_real_cpu[i:i + rows_per_chunk])
                    del feats_r, emb_r
                t = mark("real_forward", t)
        targets = acc.targets()
        syn = self.syn
        if params is not None:
            with nvtx_range("datadam_fast.step.augment_syn"):
                syn = self.dsa.apply(syn, params, self.labels_syn)
        t = mark("augment", t)
        with nvtx_range("datadam_fast.step.syn_forward"):
            feats_s, emb_s = net.features_and_embedding(syn)
        t = mark("syn_forward", t)
        with nvtx_range("datadam_fast.step.loss"):
            att = attention_matching_loss(ClassTargets(targets.attention, None, c.power), feats_s,
                                          num_classes=K, power=c.power, attention_weight=c.attention_factor,
                                          backend=c.backend)
            emb = attention_matching_loss(ClassTargets([], targets.embedding, c.power), [], None, emb_s,
                                          num_classes=K, power=c.power, embedding_weight=ew, backend=c.backend)
            loss = att + emb
        t = mark("loss", t)
        with nvtx_range("datadam_fast.step.backward"):
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        t = mark("backward", t)
        with nvtx_range("datadam_fast.step.update"):
            self.opt.step()
        mark("update", t)
        self.iteration += 1
        # 0-d tensors: converting them to floats is a host sync, done by the caller only when it logs
        return {"loss": loss.detach(), "loss_attention": att.detach(), "loss_embedding": emb.detach()}

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> Dict:
        return {"format": "datadam_fast.checkpoint/1", "iteration": self.iteration,
                "images": self.syn.detach().cpu(), "optimizer": self.opt.state_dict(),
                "generator": self.gen.get_state(), "config": dataclasses.asdict(self.cfg),
                "identity": self.cfg.identity()}

    def save_checkpoint(self) -> None:
        if self.out_dir:
            _atomic_save(self.checkpoint_state(), os.path.join(self.out_dir, CHECKPOINT))

    def _load_checkpoint(self) -> None:
        path = os.path.join(self.out_dir, CHECKPOINT)
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it and start again "
                            f"with --overwrite") from None
        if not isinstance(ck, dict) or ck.get("format") != "datadam_fast.checkpoint/1":
            raise UserError(f"{path} is not a datadam-fast checkpoint")
        mine = self.cfg.identity()
        theirs = ck.get("identity", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            desc = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in list(diff.items())[:6])
            raise UserError(f"checkpoint {path} was made with different settings ({desc}); rerun with the same "
                            f"flags or start a new --out")
        if tuple(ck["images"].shape) != tuple(self.syn.shape):
            raise UserError(f"checkpoint images {tuple(ck['images'].shape)} do not match {tuple(self.syn.shape)}")
        with torch.no_grad():
            self.syn.copy_(ck["images"].to(self.device))
        self.opt.load_state_dict(ck["optimizer"])
        self.gen.set_state(ck["generator"])
        self.iteration = int(ck["iteration"])

    # ---------------------------------------------------------------- outputs
    def test_set(self):
        if self._test_set is None:
            from .data import load_dataset
            self._test_set = load_dataset(self.cfg.dataset, root=self.cfg.data_root, split="test",
                                          **dict(self.cfg.data_opts))
        return self._test_set

    def evaluate(self) -> Dict:
        from .evaluate import EvalConfig, evaluate_synthetic
        c = self.cfg
        same = c.eval_model == c.model
        ecfg = EvalConfig(model=c.eval_model, epochs=c.eval_epochs, runs=c.eval_runs, dsa=c.dsa,
                          dsa_strategy=c.dsa_strategy, norm=c.norm if same else None,
                          width=c.width if same else None, depth=c.depth if same else None,
                          batch_size=c.eval_batch)
        return evaluate_synthetic(self.syn.detach(), self.labels_syn, self.test_set(), ecfg,
                                  seed=c.seed * 7919 + self.iteration, device=self.device)

    def synthetic_state(self) -> Dict:
        ds = self.train_set
        return {"images": self.syn.detach().cpu().clone(), "labels": self.labels_syn.cpu().clone(),
                "mean": list(ds.mean), "std": list(ds.std), "dataset": ds.name,
                "config": dataclasses.asdict(self.cfg), "iteration": self.iteration}

    def write_outputs(self) -> None:
        from .visualize import save_grid
        if not self.out_dir:
            return
        _atomic_save(self.synthetic_state(), os.path.join(self.out_dir, "synthetic.pt"))
        save_grid(self.train_set.denormalize(self.syn.detach().cpu()), os.path.join(self.out_dir, "grid.png"),
                  nrow=self.cfg.ipc if self.cfg.ipc <= 20 else 20)

    def _log(self, record: Dict) -> None:
        if self.out_dir:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_metrics(self) -> None:
        """On resume, drop log lines written after the checkpoint (they will be written again)."""
        if not self.out_dir:
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
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, p)

    def _should_eval(self, it: int) -> bool:
        e = self.cfg.eval_every
        if e < 0 or self.cfg.eval_runs <= 0:
            return False
        return it == self.cfg.iterations or (e > 0 and it % e == 0)

    def run(self, *, stop_after: Optional[int] = None) -> Dict:
        """Run to ``cfg.iterations``; ``stop_after`` (testing) returns early after that many iterations."""
        c = self.cfg
        self._truncate_metrics()
        if self.iteration == 0 and self.out_dir:
            self._log({"iteration": 0, "event": "start", "config": dataclasses.asdict(c),
                       "batch_real": self.batch_real, "num_classes": self.K})
        last_eval = None
        if self.iteration == 0 and self._should_eval(0):
            last_eval = self._eval_and_log()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=c.iterations, initial=self.iteration, desc=f"distill {c.dataset} ipc={c.ipc}",
                       unit="it", dynamic_ncols=True)
        t_start, it_start = time.time(), self.iteration
        done = 0
        try:
            while self.iteration < c.iterations:
                terms = self.step()
                done += 1
                it = self.iteration
                rate = (it - it_start) / max(time.time() - t_start, 1e-9)
                if bar is not None:
                    bar.update(1)
                if it % c.log_every == 0 or it == c.iterations:
                    terms = {k: float(v) for k, v in terms.items()}
                    if bar is not None:
                        bar.set_postfix(loss=f"{terms['loss']:.4g}", refresh=False)
                    self._log({"iteration": it, **terms, "it_per_s": rate})
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
                   "eval": last_eval}
        if self.out_dir:
            with open(os.path.join(self.out_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary

    def _eval_and_log(self) -> Dict:
        res = self.evaluate()
        short = {k: res[k] for k in ("mean", "std", "accuracies", "model", "epochs")}
        self._log({"iteration": self.iteration, "eval": short})
        if self.progress:
            from tqdm import tqdm
            tqdm.write(f"iteration {self.iteration}: {short['model']} accuracy {short['mean']:.2f} ± {short['std']:.2f} %")
        return short


def distill(cfg: DistillConfig, out_dir: Optional[str] = None, **kw) -> Dict:
    return Distiller(cfg, out_dir, **{k: v for k, v in kw.items() if k in ("resume", "overwrite", "progress")}).run()
