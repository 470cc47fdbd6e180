"""``datadam-fast`` command line: distill, evaluate, pack, backends."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional

EXIT_USAGE = 2


def _add_distill(sub) -> None:
    from .distill import DEFAULT_PRESET, PRESETS
    p = sub.add_parser(
        "distill", help="learn a synthetic set with DataDAM",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Distill a dataset into IPC synthetic images per class by attention matching. With no "
                    "arguments it distills the bundled scikit-learn digits (no data, no network needed).")
    p.add_argument("--dataset", default="digits",
                   help="digits (bundled default), mnist, fashion_mnist, cifar10, cifar100, tinyimagenet, "
                        "imagenet64, or folder (see --folder)")
    p.add_argument("--data-root", default=None,
                   help="where datasets live (<root>/mnist/raw/*.gz, <root>/cifar10/cifar-10-batches-py, ...); "
                        "default $DATADAM_FAST_DATA, else ~/.cache/datadam_fast/data")
    p.add_argument("--folder", default=None, help="with --dataset folder: an ImageFolder tree or a packed directory")
    p.add_argument("--download", action="store_true", help="fetch missing official files (checksums verified)")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    p.add_argument("--iterations", type=int, default=None,
                   help="distillation iterations (default 8000 as in the paper, 20000 with --method dm, 100 for the digits demo; the official "
                        "code's default is 20000); 0 = evaluate the random real subset the run starts from")
    p.add_argument("--method", default="datadam", choices=["datadam", "dm"],
                   help="datadam: attention matching + embedding MMD; dm: Distribution Matching as main_DM.py runs it "
                        "(per-class mean embeddings only, lr-img 1, batch-real 256, 20000 iterations by default)")
    p.add_argument("--batch-real", type=int, default=None,
                   help="real images per class per iteration (default 64; 256 with --method dm)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help="paper: InstanceNorm ConvNet, power 4; official: what the official code runs "
                        "(BatchNorm ConvNet, power 1). Flags below override single values")
    p.add_argument("--model", default="ConvNet", help="network used for distillation (fresh random init every iteration)")
    p.add_argument("--norm", default=None, choices=["instancenorm", "batchnorm", "groupnorm", "layernorm", "none"],
                   help="normalisation layer of the ConvNet (default from --preset)")
    p.add_argument("--depth", type=int, default=None, help="ConvNet depth (default from image size: 3 for 32px, 4 for 64px)")
    p.add_argument("--width", type=int, default=None, help="ConvNet channels (default 128)")
    p.add_argument("--power", type=float, default=None, help="attention power p >= 1 (default from --preset)")
    p.add_argument("--task-balance", type=float, default=None,
                   help="embedding-term balance lambda (coefficient 100*lambda); default 0.01, 0.02 at >= 64 px")
    p.add_argument("--lr-img", type=float, default=None, help="SGD learning rate on pixels (default 1, 10 for IPC > 50)")
    p.add_argument("--init", default="real", choices=["real", "noise"], help="initialise from random real images or noise")
    p.add_argument("--no-dsa", action="store_true", help="disable differentiable Siamese augmentation")
    p.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                   help="peak memory of the whole process in GB (RSS on CPU, device memory on GPU; per process "
                        "under torchrun). The real and synthetic sides are cut into class chunks that fit, from a "
                        "measured per-image footprint. Default: 80%% of available RAM on CPU, 90%% of free GPU memory")
    p.add_argument("--real-chunk", type=int, default=0,
                   help="classes per chunk of the real side (streamed under no_grad into running class means); "
                        "0 = chosen by the memory planner. Exact with instancenorm; refused with batchnorm")
    p.add_argument("--syn-chunk", type=int, default=0,
                   help="classes per chunk of the synthetic side (forward, loss and backward per chunk, one optimiser "
                        "step per iteration); 0 = chosen by the memory planner. Exact with instancenorm; refused "
                        "with batchnorm")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network passes once per architecture (each iteration's fresh weights go "
                        "in as inputs; compile time is paid on the first iteration and reported). Default: on, except "
                        "for the digits demo or when DATADAM_FAST_COMPILE=0")
    p.add_argument("--real-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="precision of the real side's network pass (no_grad; maps and means still accumulate in fp32)")
    p.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the compiled passes. reduce-overhead replays CUDA graphs on a GPU "
                        "(shapes are static per architecture and chunk size); on CPU it equals default")
    p.add_argument("--real-epilogue", choices=["auto", "cpu", "triton", "off"],
                   help="real side (no_grad) of ConvNet passes through a fused epilogue: conv output -> norm "
                        "statistics -> norm + activation -> pooling and attention map, the normalised activation "
                        "never written. cpu: C++ kernels (a first layer with <= 4 input channels is convolved "
                        "inside them); triton: Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1, for tests). "
                        "auto: cpu on CPU for fp32 real passes (also replacing the compiled real pass), triton on "
                        "CUDA with --no-compile; off: the network's own forward (or the compiled pass)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="load real chunks in the main thread instead of a background thread")
    p.add_argument("--no-channels-last", action="store_true",
                   help="run the network in NCHW instead of channels_last (NHWC is ~20%% faster per step on CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda", "triton"],
                   help="loss backend")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (same seed, same result)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, the local rank's GPU under torchrun; else cpu), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", default="runs/distill", help="output directory (synthetic.pt, grid.png, metrics.jsonl, checkpoint.pt)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="write checkpoint.pt atomically every N iterations")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out (same flags required)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N iterations (0 = only after the last iteration, -1 = never)")
    p.add_argument("--eval-runs", type=int, default=3, help="networks trained per evaluation")
    p.add_argument("--eval-epochs", type=int, default=None,
                   help="training epochs per evaluation network (default 1000 as DM, 300 for digits; official DataDAM 1800)")
    p.add_argument("--eval-model", default=None, help="network for evaluation (default: --model)")
    p.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl line every N iterations")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges for Nsight (also DATADAM_FAST_NVTX=1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # hooks: devices.py, zca.py, profiler.py, config_file.py, plan.py (see docs/workflow.md)
    p.add_argument("--zca", action="store_true",
                   help="ZCA-whiten the images as the official --zca (eps 0.1, fitted on the training set); "
                        "recorded in synthetic.pt and applied by evaluate")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="record N iterations (after a warm-up) with torch.profiler: RUN/profile_trace.json "
                        "(Chrome/Perfetto) and a per-phase table; 0 = off")
    p.add_argument("--config", default=None, metavar="FILE.toml",
                   help="read flags from a TOML file (long flag names: ipc = 10, batch-real = 64, no-dsa = true); "
                        "flags on the command line override it. Every run writes its resolved RUN/config.toml")
    p.add_argument("--plan-only", action="store_true",
                   help="set the run up, run the memory probe, time the passes and print the plan (classes per "
                        "process, chunks, predicted peak memory, s/iteration, hours); writes nothing")
    _defaults_from_config(p)
    return p


# flags that switch a DistillConfig field off: flag dest -> field
_NEGATED = {"no_dsa": "dsa", "no_channels_last": "channels_last", "no_prefetch": "prefetch"}


def _defaults_from_config(p) -> None:
    """Every distill flag that is a ``DistillConfig`` field takes its default from the dataclass,
    so the two cannot drift apart (``--help`` shows them)."""
    import dataclasses
    from .distill import DistillConfig
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    base = DistillConfig()
    for action in p._actions:
        if action.dest in fields:
            action.default = getattr(base, action.dest)


def _distill_config(args, data_opts):
    import dataclasses
    from .distill import DistillConfig
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    kw = {k: v for k, v in vars(args).items() if k in fields}
    kw.update({field: not getattr(args, flag) for flag, field in _NEGATED.items()})
    return DistillConfig(**kw, data_opts=data_opts)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="train fresh networks on a synthetic set and test on real data",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The standard protocol: SGD lr 0.01 momentum 0.9 wd 5e-4, epochs+1 epochs with lr x0.1 after "
                    "epoch epochs//2+1 (as the official code), DSA at train time, test on the full real test set; mean "
                    "and std over runs (percent). Reads datadam-fast synthetic.pt and the official "
                    "{'data': [images, labels]} / res_*.pt files. The network is the one recorded in the file "
                    "(an official-preset set is evaluated with its BatchNorm ConvNet; official files with ConvNetBN) "
                    "unless --model/--norm/--width/--depth say otherwise; the result states the exact network.")
    p.add_argument("--synthetic", required=True, help="synthetic set file")
    p.add_argument("--dataset", default=None, help="real dataset for testing (default: the one recorded in the file)")
    p.add_argument("--data-root", default=None, help="dataset root (see distill --help)")
    p.add_argument("--folder", default=None, help="with --dataset folder: the ImageFolder or packed directory")
    p.add_argument("--model", default=None,
                   help="network to train: ConvNet (InstanceNorm), ConvNetBN (the official 'ConvNet'), ConvNetD4, "
                        "AlexNet, VGG11, ResNet18, ResNet18BN_AP, ... (default: recorded in the file)")
    p.add_argument("--norm", default=None, choices=["instancenorm", "batchnorm", "groupnorm", "layernorm", "none"],
                   help="override the network's normalisation layer")
    p.add_argument("--width", type=int, default=None, help="override a ConvNet's width")
    p.add_argument("--depth", type=int, default=None, help="override a ConvNet's depth")
    p.add_argument("--runs", type=int, default=3, help="independent training runs")
    p.add_argument("--epochs", type=int, default=300, help="training epochs per run (the official code trains epochs+1)")
    p.add_argument("--batch", type=int, default=256, help="training batch size")
    p.add_argument("--lr", type=float, default=0.01, help="network learning rate")
    p.add_argument("--no-dsa", action="store_true", help="no augmentation while training")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--batched", dest="batched", action="store_const", const=True, default=None,
                      help="train the runs together (vmap); default: whichever is faster on the device")
    mode.add_argument("--sequential", dest="batched", action="store_const", const=False,
                      help="train the runs one after another")
    p.add_argument("--frozen-model", default=None,
                   help="official {'net_parameters': state_dict} file: test it without training (like "
                        "distill_test_model.py); the network (BatchNorm or not, width, depth) is read from the state "
                        "dict unless --model is given")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--json", default=None,
                   help="write {'accuracies': [...], 'mean', 'std', 'network': {model, norm, width, depth}, ...} here")


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="plot a distillation run's metrics and print a summary",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Reads RUN_DIR/metrics.jsonl and writes report_loss.png (loss terms, log scale), "
                    "report_accuracy.png (evaluation accuracy with a std band) and report_speed.png (iterations/s, "
                    "images/s and peak memory when logged) next to grid.png, then prints iterations, final loss, "
                    "best/final accuracy and speed.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out directory of datadam-fast distill")
    p.add_argument("--out", default=None, help="write the PNGs here instead of RUN_DIR")
    p.add_argument("--json", default=None, help="also write the summary as JSON here")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a synthetic set in a format other tools read",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="official: res_<method>_<dataset>_<model>_<ipc>ipc.pt, {'data': [[images, labels]], "
                    "'accs_all_exps': {...}} as the official DC/DM/DataDAM code saves it (DC-BENCH reads "
                    "['data'][-1]); folder: PATH/<class>/<i>.png (de-normalised, 8-bit: values outside [0, 1] are "
                    "clipped) plus meta.json, what torchvision's ImageFolder reads; tensors: PATH/images.pt (float, "
                    "normalised as recorded) and PATH/labels.pt plus meta.json (e.g. DD-Ranking's image_tensor). "
                    "evaluate --synthetic reads all three back.")
    p.add_argument("source", metavar="RUN_DIR_OR_SYNTHETIC", help="a distill --out directory or a synthetic set file")
    p.add_argument("--format", required=True, choices=["official", "folder", "tensors"], help="what to write")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="official: a .pt file or a directory (the official file name is used); folder/tensors: "
                        "a directory (created; must be empty)")


def _cmd_export(args) -> int:
    from .export import export
    for line in export(args.source, args.format, args.out):
        print(line)
    return 0


def _add_pack(sub) -> None:
    p = sub.add_parser("pack", help="decode an ImageFolder once into a memory-mapped uint8 array",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", help="ImageFolder root (<src>/<class>/*.jpg)")
    p.add_argument("dst", help="output directory (images.u8, labels.npy, meta.json)")
    p.add_argument("--size", type=int, default=64, help="output resolution (shorter side resize + center crop)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datadam-fast", description="Dataset distillation by attention matching.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="{distill,evaluate,report,export,pack,backends}")
    parser.distill_parser = _add_distill(sub)  # config_file.py reads its flags
    _add_evaluate(sub)
    _add_report(sub)
    _add_export(sub)
    _add_pack(sub)
    p = sub.add_parser("backends", help="list the loss backends that run on this machine; --verify checks them",
                       description="List the loss backends that run on this machine. With --verify, run every "
                                   "available backend and the real-side epilogue against the reference on small and "
                                   "DataDAM-sized problems (forward and backward, fp32 and bf16, NCHW and "
                                   "channels_last), print a table and exit 1 on any mismatch.")
    p.add_argument("--verify", action="store_true", help="self-check every fused implementation against the reference")
    p.add_argument("--device", default="cpu", help="with --verify: the device to check (cpu, cuda, cuda:1 ...)")
    p.add_argument("--json", default=None, metavar="PATH", help="with --verify: write the table as JSON")
    return parser


def _data_opts(args) -> dict:
    opts = {}
    if getattr(args, "folder", None):
        opts["path"] = args.folder
    if getattr(args, "download", False):
        opts["download"] = True
    return opts


def _cmd_distill(args) -> int:
    from . import profiling
    from .distill import Distiller
    from .devices import device_line
    device, line = device_line(args.device)  # hook (devices.py): the first log line names the device
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    if args.nvtx:
        profiling.enable()
    opts = _data_opts(args)
    download = opts.pop("download", False)
    cfg = _distill_config(args, opts)
    if download:
        from .data import load_dataset
        for split in ("train", "test"):
            load_dataset(args.dataset, root=args.data_root, split=split, download=True, **opts)
    from .distill.parallel import init_world
    world = init_world(device)
    if args.plan_only:  # print the plan, write nothing
        from .distill.plan_only import plan_only
        plan_only(cfg, world)
        world.close()
        return 0
    try:
        d = Distiller(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                      world=world)
        # hook (config_file.py): CLI-only values that config.toml records besides the config
        d.run_flags = {"device": args.device, "threads": args.threads, "nvtx": args.nvtx,
                       "no_progress": args.no_progress}
        try:
            summary = d.run()
        finally:
            d.close()
    except BaseException:
        # no goodbye collective: the other ranks may be inside a different one. Exiting now lets
        # torchrun see this rank's failure and stop the rest.
        world.owns_group = False
        raise
    world.close()
    if world.is_main:
        print(json.dumps({"out": args.out, **summary}))
    return 0


def _cmd_evaluate(args) -> int:
    from .data import load_dataset
    from .errors import UserError
    from .evaluate import (EvalConfig, describe_eval_network, evaluate_synthetic, frozen_model_accuracy,
                           frozen_model_network, load_frozen_model, load_synthetic, network_for_synthetic,
                           network_label)
    for flag, v in (("--runs", args.runs), ("--batch", args.batch), ("--width", args.width), ("--depth", args.depth)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    if args.epochs < 0:
        raise UserError(f"--epochs must be >= 0, got {args.epochs}")
    if args.model is not None:
        from .models.networks import check_model_name
        check_model_name(args.model)
    from .devices import device_line
    args.device, line = device_line(args.device)  # hook (devices.py): --device auto
    print(line, flush=True)  # stdout, with evaluate's other log lines (stderr holds errors only)
    images, labels, meta = load_synthetic(args.synthetic)
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise UserError(f"{args.synthetic} does not record its dataset; pass --dataset")
    opts = _data_opts(args)
    test_set = load_dataset(dataset, root=args.data_root, split="test", **opts)
    if meta.get("zca") is not None:  # hook (zca.py): the recorded whitening applies to the test images
        from .zca import whiten_like
        test_set = whiten_like(test_set, meta["zca"])
        print("ZCA: test images whitened with the transform recorded in the file")
    if args.frozen_model:
        sd = load_frozen_model(args.frozen_model)
        pick = frozen_model_network(sd, model=args.model, norm=args.norm, width=args.width, depth=args.depth)
        cfg = EvalConfig(model=pick["model"], norm=pick["norm"], width=pick["width"], depth=pick["depth"])
        network = describe_eval_network(cfg, test_set.channels, test_set.num_classes, test_set.image_size)
        print(f"frozen model: {network_label(network)} ({pick['reason']})")
        acc = frozen_model_accuracy(sd, test_set, model=cfg.model, norm=cfg.norm, width=cfg.width, depth=cfg.depth,
                                    device=args.device)
        print(f"Trained Model Best {acc / 100:.4f}")
        result = {"accuracies": [acc], "mean": acc, "std": 0.0, "network": network, "frozen_model": args.frozen_model,
                  "network_source": pick["reason"]}
    else:
        pick = network_for_synthetic(meta, model=args.model, norm=args.norm, width=args.width, depth=args.depth)
        cfg = EvalConfig(model=pick["model"], epochs=args.epochs, runs=args.runs, lr=args.lr, batch_size=args.batch,
                         dsa=not args.no_dsa, norm=pick["norm"], width=pick["width"], depth=pick["depth"],
                         batched=args.batched)
        from .models.networks import check_model_name
        check_model_name(cfg.model, "recorded model")
        network = describe_eval_network(cfg, images.shape[1], test_set.num_classes, tuple(images.shape[2:]))
        print(f"network: {network_label(network)} ({pick['source']})", flush=True)
        result = evaluate_synthetic(images, labels, test_set, cfg, seed=args.seed, device=args.device, progress=True)
        result["network_source"] = pick["source"]
        mode = "batched" if result["batched"] else "sequential"
        print(f"{network_label(result['network'])} on {dataset}: {result['mean']:.2f} ± {result['std']:.2f} % over "
              f"{cfg.runs} runs ({images.shape[0]} images, {cfg.epochs}+1 epochs, {mode})")
    if args.json:
        net = result["network"]
        out = {"accuracies": result["accuracies"], "mean": result["mean"], "std": result["std"],
               "model": net["model"], "norm": net["norm"], "width": net["width"], "depth": net["depth"],
               "network": net, "network_source": result["network_source"], "dataset": dataset,
               "synthetic": args.synthetic, "epochs": None if args.frozen_model else args.epochs,
               "runs": len(result["accuracies"]), "seed": args.seed,
               "batched": None if args.frozen_model else result["batched"]}
        if args.frozen_model:
            out["frozen_model"] = args.frozen_model
        from ._io import atomic_write_text
        atomic_write_text(args.json, json.dumps(out, indent=2))
    return 0


def _cmd_report(args) -> int:
    from .report import format_summary, report
    summary, paths = report(args.run_dir, args.out)
    print(format_summary(summary, args.run_dir))
    for p in paths:
        print(f"wrote {p}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _cmd_pack(args) -> int:
    from .data import pack_image_folder
    kw = {} if args.workers is None else {"workers": args.workers}
    pack_image_folder(args.src, args.dst, args.size, **kw)
    return 0


def _cmd_backends(args) -> int:
    import torch
    if getattr(args, "verify", False):
        from .verify import run
        return run(args.device, args.json)
    if getattr(args, "json", None) or getattr(args, "device", "cpu") != "cpu":
        from .errors import UserError
        raise UserError("--device and --json go with --verify")
    from .loss.backends import BACKEND_NAMES, BackendUnavailable, get_backend
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for name in BACKEND_NAMES:
        try:
            b = get_backend(name)
            ok = [str(d) for d in devices if b.supports(d)]
            print(f"{name:10s} available on: {', '.join(ok) or 'no device here'}")
        except BackendUnavailable as e:
            print(f"{name:10s} unavailable: {str(e).splitlines()[0][:200]}")
    return 0


def _peer_gone(e: BaseException) -> bool:
    """A collective failed because another rank's process is gone (gloo / NCCL wording)."""
    from .distill.parallel import env_world_size
    text = str(e)
    return env_world_size() > 1 and any(k in text for k in ("Connection closed by peer", "Connection reset by peer",
                                                                "Broken pipe", "NCCL communicator was aborted"))


def _rank_tag() -> str:
    """' (rank N)' inside a torchrun job, so that the failing rank is named."""
    from .distill.parallel import env_world_size
    return f" (rank {os.environ.get('RANK', '?')})" if env_world_size() > 1 else ""


PEER_GONE_GRACE_S = 10.0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    from .errors import DatadamError
    handlers = {"distill": _cmd_distill, "evaluate": _cmd_evaluate, "report": _cmd_report, "pack": _cmd_pack,
                "backends": _cmd_backends, "export": _cmd_export}
    try:
        if args.command == "distill" and args.config:  # hook (config_file.py): file values, then the flags
            from .config_file import apply_config_file
            apply_config_file(parser.distill_parser, args.config)
            args = parser.parse_args(argv)
            if args.threads:
                import torch
                torch.set_num_threads(args.threads)
        return handlers[args.command](args)
    except DatadamError as e:  # every deliberate error: bad input, data, unavailable backend
        if args.debug:
            raise
        print(f"datadam-fast {args.command}: error{_rank_tag()}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        if not _peer_gone(e) or args.debug:
            raise
        print(f"datadam-fast {args.command}: error{_rank_tag()}: another process of this job stopped (its own "
              f"error is printed above); the last checkpoint is intact, continue with --resume", file=sys.stderr)
        # Give the launcher time to see the rank that really failed first: torchrun names the earliest
        # observed failure as the root cause, and a peer that exits at the same instant can win the tie.
        # Normally torchrun stops this process (SIGTERM) during the wait.
        time.sleep(PEER_GONE_GRACE_S)
        return 1
    except KeyboardInterrupt:
        print("interrupted; resume with --resume (the last checkpoint is kept)", file=sys.stderr)
        return 130


def entry(argv: Optional[List[str]] = None) -> None:
    """The ``datadam-fast`` / ``python -m datadam_fast`` entry point.

    One rank of a ``torchrun`` job leaves with ``os._exit`` once its exit code is known: by then
    the process group is destroyed (or the rank failed), outputs are written and the streams are
    flushed. Ordinary interpreter finalization can race gloo's C++ worker threads, which still
    drop tensor references after a collective has returned; a thread that needs the GIL while the
    interpreter is being torn down aborts the process ("terminate called without an active
    exception"), turning a finished rank into a failed job. A single process exits normally.
    """
    from .distill.parallel import env_world_size
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse --help / usage errors
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        if env_world_size() <= 1:
            raise
        import traceback
        traceback.print_exc()
        rc = 1
    if env_world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc or 0))
    sys.exit(rc)


if __name__ == "__main__":
    entry()
