"""Micro-benchmark of the fused CPU backend on the DataDAM CIFAR-10 step shapes.

Times one forward+backward of the whole attention-matching loss (K=10, p=4; real
[640,128,32,32] + [640,128,16,16] + [640,2048] embedding, synthetic [100, ...] requiring grad)
for ``datadam_fast.attention_matching_loss(..., backend="cpu")``, ``torch.compile`` of
``datadam_fast.loss.reference.attention_matching_loss`` and the eager reference. Medians of --reps runs.

    python benchmarks/micro_cpu.py [--reps 15] [--no-compile] [--no-eager] [--kernels] [--rand]
                                   [--threads T] [--cpu-time]

Wall-clock medians are sensitive to other processes on a small machine: rerun when noisy.
``--threads 1 --cpu-time`` measures process CPU time on one thread instead, which other load
disturbs much less (it still shares memory bandwidth); use it for relative comparisons only.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import datadam_fast
from datadam_fast.loss import reference


def make_inputs(dist: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        x = torch.randn(*shape, generator=g) if dist == "relu" else torch.rand(*shape, generator=g)
        return x.relu_() if dist == "relu" else x

    real = [t(640, 128, 32, 32), t(640, 128, 16, 16)]
    syn = [t(100, 128, 32, 32).requires_grad_(), t(100, 128, 16, 16).requires_grad_()]
    real_emb = t(640, 2048)
    syn_emb = t(100, 2048).requires_grad_()
    return real, syn, real_emb, syn_emb


def step_fn(loss_fn, real, syn, real_emb, syn_emb):
    def step():
        for s in syn:
            s.grad = None
        syn_emb.grad = None
        loss = loss_fn(real, syn, real_emb, syn_emb, num_classes=10, power=4.0)
        loss.backward()
        return loss
    return step


CLOCK = time.perf_counter


def median_ms(fn, reps: int, warmup: int = 2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        fn()
        ts.append((CLOCK() - t0) * 1e3)
    return statistics.median(ts), min(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="also time the backend calls alone")
    ap.add_argument("--rand", action="store_true", help="torch.rand inputs instead of randn().relu_()")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave)")
    ap.add_argument("--cpu-time", action="store_true", help="time with process CPU time")
    args = ap.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK = time.process_time
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")
    dist = "rand" if args.rand else "relu"
    real, syn, real_emb, syn_emb = make_inputs(dist)

    fused = step_fn(lambda *a, **k: datadam_fast.attention_matching_loss(*a, backend="cpu", **k),
                    real, syn, real_emb, syn_emb)
    ref_step = step_fn(reference.attention_matching_loss, real, syn, real_emb, syn_emb)
    # correctness spot-check against the eager reference
    lf = fused().item()
    gf = [s.grad.clone() for s in syn] + [syn_emb.grad.clone()]
    lr = ref_step().item()
    gr = [s.grad.clone() for s in syn] + [syn_emb.grad.clone()]
    err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(gf, gr))
    print(f"inputs {dist}: loss cpu {lf:.6g} ref {lr:.6g}; max rel grad err {err:.2e}")

    res = {}
    med, mn = median_ms(fused, args.reps)
    res["cpu"] = med
    print(f"datadam_fast cpu backend  fwd+bwd: median {med:8.2f} ms  (min {mn:.2f})")
    if not args.no_compile:
        comp = torch.compile(reference.attention_matching_loss)
        cstep = step_fn(comp, real, syn, real_emb, syn_emb)
        t0 = time.perf_counter()
        cstep()
        print(f"  (torch.compile warm-up {time.perf_counter() - t0:.1f} s)")
        med, mn = median_ms(cstep, args.reps)
        res["compile"] = med
        print(f"torch.compile(reference) fwd+bwd: median {med:8.2f} ms  (min {mn:.2f})")
        med, mn = median_ms(fused, args.reps)  # rerun: the machine may have changed
        res["cpu2"] = med
        print(f"datadam_fast cpu backend  fwd+bwd: median {med:8.2f} ms  (min {mn:.2f}) [rerun]")
    if not args.no_eager:
        med, mn = median_ms(ref_step, max(3, args.reps // 3), warmup=1)
        res["eager"] = med
        print(f"eager reference          fwd+bwd: median {med:8.2f} ms  (min {mn:.2f})")
    best = min(res["cpu"], res.get("cpu2", res["cpu"]))
    if "compile" in res:
        print(f"speed-up vs torch.compile: {res['compile'] / best:.2f}x")
    if "eager" in res:
        print(f"speed-up vs eager:         {res['eager'] / best:.2f}x")

    if args.kernels:
        from datadam_fast.loss.backends import get_backend
        be = get_backend("cpu")
        sd = [s.detach() for s in syn]
        med, _ = median_ms(lambda: be.forward(real, 4.0), args.reps)
        print(f"kernel forward real (2 layers, {sum(r.nbytes for r in real) / 1e6:.0f} MB): {med:.2f} ms")
        med, _ = median_ms(lambda: be.forward(sd, 4.0), args.reps)
        print(f"kernel forward syn  (2 layers): {med:.2f} ms")
        maps, norms = be.forward(sd, 4.0)
        gm = [torch.randn_like(m) for m in maps]
        med, _ = median_ms(lambda: be.backward(sd, maps, norms, gm, 4.0), args.reps)
        print(f"kernel backward syn (2 layers): {med:.2f} ms")


if __name__ == "__main__":
    main()
