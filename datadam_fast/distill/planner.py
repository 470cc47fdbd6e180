"""The memory plan of a run: probe the real and synthetic passes, then cut the classes into chunks
that fit the budget (the arithmetic is :func:`~datadam_fast.distill.memory.plan_chunks`)."""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from .memory import MB, MemoryPlan, linear_fit, plan_chunks
from .step import ClassSums, real_pass, syn_pass

ROUGH_FACTOR = 8


def _one_image(d):
    ds = d.train_set
    return d.layout(torch.zeros(1, ds.channels, *ds.image_size, device=d.device))


def probe_sizes(d, net) -> Tuple[int, int]:
    """Two probe batch sizes whose activations are large enough (>= ~48 MB) that the allocator
    maps them fresh (so the resident-set peak sees them) yet stay small next to the budget."""
    with torch.no_grad():
        feats, emb = net.features_and_embedding(_one_image(d))
    per_img = max(sum(f.numel() for f in feats) * 4 + emb.numel() * 4, 1)
    n1 = int(min(max(2, math.ceil(48 * MB / per_img)), 256))
    n1 = max(1, min(n1, int(d.budget // 20 // (3 * per_img * 8)) or 1))
    return n1, 2 * n1


def probe(d) -> Dict[str, float]:
    """Measured peak bytes of the real pass and of the synthetic pass at two batch sizes:
    per-image slope and per-call intercept of each."""
    ds = d.train_set
    gen = torch.Generator().manual_seed(12345)  # the probe must not move the run's generator
    net = d.new_network(gen)
    params = d.dsa.sample(1, gen, d.device, tuple(ds.image_size)) if d.dsa else None
    n1, n2 = probe_sizes(d, net)
    out = {}
    for side in ("real", "syn"):
        peaks = []
        for n in (n1, n2):
            x = d.layout(torch.randn(n, ds.channels, *ds.image_size, generator=gen).to(d.device))
            lab = torch.zeros(n, dtype=torch.long, device=d.device)
            if side == "real":
                fn = lambda: real_pass(d, net, x, lab, params, ClassSums(1), lab.cpu())  # noqa: E731
            else:
                with torch.no_grad():
                    tg = [torch.zeros_like(s[:1], dtype=torch.float32) for s in d.method.real_statistics(net, x[:1])]
                xs = x.contiguous()
                fn = lambda: syn_pass(d, net, xs, lab, params, tg, 1)  # noqa: E731
            fn()  # warm-up: first-call allocations (kernel JIT, weight reorders) are not per image
            peaks.append(d.mem.measure(fn))
            del x
        floor = ds.channels * ds.image_size[0] * ds.image_size[1] * 4.0
        out[f"{side}_per_image"], out[f"{side}_base"] = linear_fit((n1, n2), peaks, floor)
    out["probe_sizes"] = (n1, n2)
    return out


def fixed_bytes(d, measured: Dict[str, float]) -> int:
    syn_bytes = d.syn.numel() * d.syn.element_size()
    fixed = d.mem.current()
    if d.syn.grad is None:
        fixed += syn_bytes
    if d.cfg.momentum and not d.opt.state.get(d.syn):
        fixed += syn_bytes
    with torch.no_grad():
        net = d.new_network(torch.Generator().manual_seed(0))
        x = _one_image(d)
        f, e = net.features_and_embedding(x)
        stats = d.method.real_statistics(net, x)
    # the larger of every map + the embedding and the method's own statistics
    per_class = max(sum(t.shape[2] * t.shape[3] for t in f) + e.shape[1], sum(s.shape[1] for s in stats))
    fixed += d.Kl * per_class * (8 + 4)  # float64 running sums + float32 targets
    if d.world.distributed and d.world.is_main:
        full = syn_bytes * d.K // max(d.Kl, 1)
        fixed += 2 * full  # images + momentum gathered for a checkpoint (on the host)
    return int(fixed + max(measured["real_base"], measured["syn_base"]))


def rough_per_image(d) -> int:
    """Bytes of every leaf module's output for one image: a generous bound's unit."""
    net = d.new_network(torch.Generator().manual_seed(0))
    total = [0]
    hooks = [m.register_forward_hook(lambda m, i, o: total.__setitem__(0, total[0] + o.numel() * o.element_size()))
             for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            net.features_and_embedding(_one_image(d))
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def make_plan(d) -> MemoryPlan:
    plan = _make_plan(d)
    if d.cfg.factor > 1:
        plan.notes.append(f"multi-formation: each synthetic (stored) image goes through the network as "
                          f"{d.cfg.factor ** 2} decoded images; the per-image figures are per stored image")
    return plan


def _make_plan(d) -> MemoryPlan:
    c, ds = d.cfg, d.train_set
    if not (c.real_chunk or c.syn_chunk):
        # Small runs skip the probe: with every activation kept ROUGH_FACTOR times over
        # (saved for backward, gradients, temporaries) one pass still uses under half the budget.
        rough = ROUGH_FACTOR * rough_per_image(d)
        syn_bytes = d.syn.numel() * d.syn.element_size()
        syn_rough = rough * c.factor ** 2  # a stored image goes through the network as factor^2 images
        passes = d.Kl * (d.batch_real * rough + c.ipc * syn_rough)
        bound = d.mem.current() + 3 * syn_bytes + passes
        if bound <= d.budget // 2:
            plan = plan_chunks(budget=d.budget, fixed=bound - passes,
                               real_per_image=rough, syn_per_image=syn_rough, prefetch_per_image=0,
                               num_classes=d.Kl, batch_real=d.batch_real, ipc=c.ipc, lookahead=0,
                               real_chunk=d.Kl, syn_chunk=d.Kl)
            plan.notes.append(f"not probed: a generous bound ({ROUGH_FACTOR}x every activation) fits in half "
                              f"the budget, so one chunk per side")
            return plan
    measured = probe(d)
    row = ds.channels * ds.image_size[0] * ds.image_size[1]
    prefetch_per_image = row * (4 + 1) if d.real_all is None else 0
    plan = plan_chunks(budget=d.budget, fixed=fixed_bytes(d, measured),
                       real_per_image=int(measured["real_per_image"]), syn_per_image=int(measured["syn_per_image"]),
                       prefetch_per_image=prefetch_per_image, num_classes=d.Kl, batch_real=d.batch_real,
                       ipc=c.ipc, lookahead=d.prefetcher.lookahead if d.prefetcher.enabled else 0,
                       real_chunk=c.real_chunk or None, syn_chunk=c.syn_chunk or None,
                       single_pass=d.single_pass)
    plan.notes.append(f"probe batch sizes {measured['probe_sizes']}")
    return plan
