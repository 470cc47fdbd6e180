"""The run directory: out-dir checks, the checkpoint (save, load, resume), metrics.jsonl, the
outputs (synthetic.pt, grid.png as a PNG grid drawn with Pillow, summary.json). Every write is atomic; under torchrun only rank 0
writes, and gathering the synthetic rows is collective (every rank calls)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from .._io import atomic_torch_save, atomic_write, atomic_write_text, check_writable_dir
from ..errors import UserError
from .config import NOT_IDENTITY, config_flags, format_config
from .parallel import class_block

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.toml"
CHECKPOINT_FORMAT = "datadam_fast.checkpoint/2"
GRID_MAX_CLASSES = 100


def check_out_dir(out_dir: str, resume: bool, overwrite: bool) -> None:
    """Fail fast, touch nothing yet."""
    if resume:
        if not os.path.isfile(os.path.join(out_dir, CHECKPOINT)):
            raise UserError(f"resume: no checkpoint at {os.path.join(out_dir, CHECKPOINT)}")
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output directory {out_dir} exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise UserError(f"output directory {out_dir} is not empty; choose a new one, replace its results "
                        f"(--overwrite / overwrite=True) or continue its checkpoint (--resume / resume=True)")
    check_writable_dir(out_dir, "output directory")


def claim_out_dir(out_dir: str) -> None:
    """Called once every input is validated: only then are stale results of --overwrite removed."""
    os.makedirs(out_dir, exist_ok=True)
    for name in ("metrics.jsonl", CHECKPOINT, "summary.json"):
        p = os.path.join(out_dir, name)
        if os.path.exists(p):
            os.remove(p)


def identity(d) -> Dict:
    """The settings a checkpoint must agree on: the config's, and a user method's own."""
    ident = d.cfg.identity()
    if not d.builtin_method:
        ident["method_params"] = d.method.identity()
    return ident


def syn_counts(d) -> List[int]:
    return [(b - a) * d.cfg.ipc for a, b in (class_block(d.K, r, d.world.size) for r in range(d.world.size))]


#: Adam's per-pixel state (what AdamW keeps too)
ADAM_BUFFERS = ("exp_avg", "exp_avg_sq")


def checkpoint_state(d) -> Optional[Dict]:
    """The run state (:class:`~.engine.RunState`: images, momentum, generator, iteration, next
    real batch) of every rank, gathered on rank 0 (collective: every rank must call it); None elsewhere."""
    counts = syn_counts(d)
    images = d.world.gather_rows(d.syn.detach(), counts, to_all=False)
    st = d.opt.state.get(d.syn) or {}
    mom = st.get("momentum_buffer")
    momentum = None
    if d.world.max_int(0 if mom is None else 1):
        momentum = d.world.gather_rows(mom if mom is not None else torch.zeros_like(d.syn), counts, to_all=False)
    # Adam / AdamW: the two moment buffers (rows, gathered like the images) and the step count
    adam = {}
    for key in ADAM_BUFFERS:
        buf = st.get(key)
        if d.world.max_int(0 if buf is None else 1):
            adam[key] = d.world.gather_rows(buf if buf is not None else torch.zeros_like(d.syn), counts, to_all=False)
    if "step" in st:
        adam["step"] = float(st["step"])
    if not d.world.is_main:
        return None
    state = d.state
    return {"format": CHECKPOINT_FORMAT, "iteration": state.iteration, "images": images, "momentum": momentum,
            "adam": adam or None,
            "generator": state.gen.get_state(), "next_real_idx": state.next_real_idx.clone(),
            "config": dataclasses.asdict(d.cfg), "identity": identity(d), "world_size": d.world.size}


class NonFiniteError(UserError):
    """The synthetic images or the loss stopped being finite: the run stops, its last good
    checkpoint is kept."""


def nonfinite_error(d, what: str) -> NonFiniteError:
    ck = os.path.join(d.out_dir, CHECKPOINT) if d.out_dir else None
    kept = (f"the last good checkpoint {ck} is kept" if ck and os.path.isfile(ck) else "no checkpoint was written")
    return NonFiniteError(f"iteration {d.iteration}: {what}; the run stops and {kept}. Likely causes: a learning "
                          f"rate too high for these images (--lr-img / lr_img), or non-finite input images")


def check_finite(d) -> None:
    """Every rank's synthetic images finite (collective: every rank calls it), else stop the run."""
    bad = 0 if bool(torch.isfinite(d.syn).all()) else 1
    if d.world.max_int(bad):
        raise nonfinite_error(d, "the synthetic images contain NaN or Inf")


def save_checkpoint(d) -> None:
    if not d.out_dir:
        return
    check_finite(d)  # a checkpoint is only ever written of a finite state
    state = checkpoint_state(d)
    if state is not None:
        atomic_torch_save(state, os.path.join(d.out_dir, CHECKPOINT))


def load_checkpoint(d) -> None:
    path = os.path.join(d.out_dir, CHECKPOINT)
    try:  # mmap: each rank touches only its own classes' rows of a large checkpoint
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it and start again "
                        f"with overwrite=True") from None
    if not isinstance(ck, dict) or ck.get("format") not in (CHECKPOINT_FORMAT, "datadam_fast.checkpoint/1"):
        raise UserError(f"{path} is not a datadam-fast checkpoint")
    mine = identity(d)
    theirs = {k: v for k, v in ck.get("identity", {}).items() if k not in NOT_IDENTITY}
    theirs.setdefault("zca", False)  # checkpoints from before the option were made without ZCA
    theirs.setdefault("factor", 1)  # ... and from before multi-formation and network pools
    theirs.setdefault("networks", "random")
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
        desc = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in list(diff.items())[:6])
        raise UserError(f"checkpoint {path} was made with different settings ({desc}); rerun with the same "
                        f"flags or start a new --out")
    full = (d.K * d.cfg.ipc,) + tuple(d.syn.shape[1:])
    if tuple(ck["images"].shape) != full:
        raise UserError(f"checkpoint images {tuple(ck['images'].shape)} do not match {full}")
    rows = slice(d.k_lo * d.cfg.ipc, d.k_hi * d.cfg.ipc)
    with torch.no_grad():
        d.syn.copy_(ck["images"][rows].to(d.device))
    mom = ck.get("momentum")
    if mom is None and "optimizer" in ck:  # format 1: one parameter, SGD's own state dict
        mom = (ck["optimizer"].get("state", {}).get(0) or {}).get("momentum_buffer")
    d.opt.state.clear()
    if mom is not None:
        d.opt.state[d.syn]["momentum_buffer"] = mom[rows].to(d.device).clone()
    for key, value in (ck.get("adam") or {}).items():
        if key == "step":
            d.opt.state[d.syn]["step"] = torch.tensor(float(value))
        else:
            d.opt.state[d.syn][key] = value[rows].to(d.device).clone()
    state = d.state
    state.gen.set_state(ck["generator"])
    state.iteration = int(ck["iteration"])
    nxt = ck.get("next_real_idx")
    # format 1 stored the generator before the iteration's draws: draw the batch now
    state.next_real_idx = nxt.clone() if nxt is not None else d.draw_real_indices()
    del ck


def full_synthetic(d, to_all: bool = True):
    """(images, labels) of every class, on the host (collective under sharding)."""
    images = d.world.gather_rows(d.syn.detach(), syn_counts(d), to_all=to_all)
    if images is None:
        return None
    return images, torch.arange(d.K).repeat_interleave(d.cfg.ipc)


def synthetic_state(d) -> Optional[Dict]:
    full = full_synthetic(d, to_all=False)
    if full is None:
        return None
    ds = d.train_set
    state = {"images": full[0].clone(), "labels": full[1], "mean": list(ds.mean), "std": list(ds.std),
             "dataset": ds.name, "config": dataclasses.asdict(d.cfg), "iteration": d.iteration,
             "method": d.method.official_name or d.method.name,  # export names official files by it
             "factor": d.factor}  # multi-formation: the images are stored, evaluate and export decode them
    if d.cfg.zca:  # evaluate and export apply the recorded transform
        state["zca"] = ds.zca.state()
    return state


def save_grid(images: torch.Tensor, path: str, nrow: int, *, pad: int = 2, min_cell: int = 32) -> None:
    """Save ``images`` ([N, C, H, W] in [0, 1]) as a grid with ``nrow`` images per row.

    Small images (e.g. 8x8 digits) are enlarged by pixel repetition to at least ``min_cell`` px.
    Written atomically (temp file + rename).
    """
    from PIL import Image
    x = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = x.shape
    scale = max(1, -(-min_cell // max(h, w)))
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = x[i]
    arr = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def write_run_config(out_dir: str, cfg, run_flags: Optional[Dict] = None) -> str:
    """Write ``out_dir/config.toml`` (atomically): the fully resolved config as ``distill`` flags,
    so that ``distill --config RUN/config.toml --out NEW`` repeats the run. Where the run goes
    (``out``, ``resume``, ``overwrite``) is given on the command line and not written."""
    header = ("datadam-fast distill configuration, fully resolved.\n"
              "Repeat the run: datadam-fast distill --config config.toml --out NEW_DIR")
    extra = sorted(k for k in cfg.data_opts if k not in ("path", "cache_dir"))
    if extra:
        header += f"\nDataset options set through the Python API are not flags and are not repeated: {extra}"
    path = os.path.join(out_dir, CONFIG)
    atomic_write_text(path, format_config(config_flags(cfg, run_flags), header))
    return path


def write_outputs(d) -> None:
    if not d.out_dir:
        return
    state = synthetic_state(d)
    if state is None:
        return
    atomic_torch_save(state, os.path.join(d.out_dir, "synthetic.pt"))
    # one row per class (the decoded images with --factor); a grid of more than GRID_MAX_CLASSES
    # classes would be unreadable
    from ..data.formation import decode
    shown = decode(state["images"][:GRID_MAX_CLASSES * d.cfg.ipc], d.factor)
    per_class = d.cfg.ipc * d.factor ** 2
    save_grid(d.train_set.denormalize(shown), os.path.join(d.out_dir, "grid.png"),
              nrow=per_class if per_class <= 20 else 20)


def strict_json(obj):
    """``obj`` with every non-finite float as None: metrics.jsonl and summary.json are strict JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def log(d, record: Dict) -> None:
    if d.out_dir and d.world.is_main:
        with open(os.path.join(d.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


def truncate_metrics(d) -> None:
    """On resume, drop log lines written after the checkpoint (they will be written again)."""
    if not d.out_dir or not d.world.is_main:
        return
    p = os.path.join(d.out_dir, "metrics.jsonl")
    if not os.path.exists(p):
        return
    keep = []
    with open(p) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("iteration", 0) <= d.iteration:  # evals at the checkpoint's iteration ran before it
                keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(p, "".join(keep))


def write_summary(d, summary: Dict) -> None:
    if d.out_dir and d.world.is_main:
        atomic_write_text(os.path.join(d.out_dir, "summary.json"),
                          json.dumps(strict_json(summary), indent=2, allow_nan=False))
