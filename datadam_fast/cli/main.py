"""``datadam-fast`` command line: distill, evaluate, report, export, pack, backends (the flags are
in :mod:`datadam_fast.cli.args`)."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import List, Optional

from .args import build_parser, distill_config

EXIT_USAGE = 2


def _cmd_export(args) -> int:
    from .._io import check_writable_dir, check_writable_file
    from ..evaluation.export import export
    target = args.out
    if args.format == "official" and target.endswith(".pt") and not os.path.isdir(target):
        check_writable_file(target, "export --out")
    else:
        check_writable_dir(target, "export --out")
    for line in export(args.source, args.format, args.out):
        print(line)
    return 0


def _data_opts(args) -> dict:
    opts = {}
    if getattr(args, "folder", None):
        opts["path"] = args.folder
    if getattr(args, "download", False):
        opts["download"] = True
    if getattr(args, "cache_dir", None):
        from ..data import CACHED_DATASETS
        from ..errors import UserError
        dataset = getattr(args, "dataset", None)
        if dataset not in CACHED_DATASETS:
            raise UserError(f"--cache-dir applies to {' and '.join(CACHED_DATASETS)}, not --dataset {dataset}")
        opts["cache_dir"] = args.cache_dir
    return opts


def _cmd_distill(args) -> int:
    from .. import profiling
    from ..distill import Distiller
    from ..devices import device_line
    device, line = device_line(args.device)  # the first log line names the device
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)
    if args.nvtx:
        profiling.enable()
    opts = _data_opts(args)
    download = opts.pop("download", False)
    cfg = distill_config(args, opts)
    if download:
        from ..data import load_dataset
        for split in ("train", "test"):
            load_dataset(args.dataset, root=args.data_root, split=split, download=True, **opts)
    from ..distill.parallel import init_world
    world = init_world(device)
    if args.plan_only:  # print the plan, write nothing
        from ..distill.plan_only import plan_only
        plan_only(cfg, world)
        world.close()
        return 0
    try:
        # the CLI-only values, which config.toml records besides the config
        run_flags = {"device": args.device, "threads": args.threads, "nvtx": args.nvtx, "no-progress": args.no_progress}
        with Distiller(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                       world=world, run_flags=run_flags) as d:
            summary = d.run()
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
    from ..data import load_dataset
    from .._io import check_writable_file
    from ..errors import UserError
    from ..evaluation.evaluate import (EvalConfig, describe_eval_network, evaluate_synthetic, network_for_synthetic,
                                       network_label)
    from ..evaluation.formats import load_frozen_model, load_synthetic
    from ..evaluation.frozen_model import frozen_model_accuracy, frozen_model_network
    for flag, v in (("--runs", args.runs), ("--batch", args.batch), ("--width", args.width), ("--depth", args.depth)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    if args.epochs is not None and args.epochs < 0:
        raise UserError(f"--epochs must be >= 0 (the official schedule trains epochs+1), got {args.epochs}")
    if args.seed is not None and args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.json:
        check_writable_file(args.json, "--json")
    if args.model is not None:
        from ..models.networks import check_model_name
        check_model_name(args.model)
    from ..devices import device_line
    args.device, line = device_line(args.device)  # --device auto
    print(line, flush=True)  # stdout, with evaluate's other log lines (stderr holds errors only)
    images, labels, meta = load_synthetic(args.synthetic)
    if meta.get("factor", 1) > 1:
        print(f"multi-formation: {meta.get('stored_images', images.shape[0])} stored images of factor {meta['factor']} "
              f"-> {images.shape[0]} full-size images")
    from ..evaluation.evaluate import DEFAULT_EPOCHS, DEFAULT_RUNS, recorded_protocol
    rec = recorded_protocol(meta)
    seed = args.seed if args.seed is not None else (rec["seed"] if rec["seed"] is not None else 0)
    args.epochs = args.epochs if args.epochs is not None else (rec["epochs"] or DEFAULT_EPOCHS)
    args.runs = args.runs if args.runs is not None else (rec["runs"] or DEFAULT_RUNS)
    dataset = args.dataset or meta.get("dataset")
    if not dataset:
        raise UserError(f"{args.synthetic} does not record its dataset; pass --dataset")
    opts = _data_opts(args)
    test_set = load_dataset(dataset, root=args.data_root, split="test", **opts)
    if meta.get("zca") is not None:  # the recorded whitening applies to the test images
        from ..data.zca import whiten_like
        test_set = whiten_like(test_set, meta["zca"])
        print("ZCA: test images whitened with the transform recorded in the file")
    partial = None  # the finished runs of an interrupted evaluate --json (not for a frozen model)
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
                         batched=args.batched, compile=args.compile)
        from ..models.networks import check_model_name
        check_model_name(cfg.model, "recorded model")
        network = describe_eval_network(cfg, images.shape[1], test_set.num_classes, tuple(images.shape[2:]))
        print(f"network: {network_label(network)} ({pick['source']})", flush=True)
        if args.seed is None and rec["seed"] is not None:
            print(f"seed {seed}: the seed of the run's final evaluation (recorded in the file; --seed to choose)")
        if args.json:  # finished runs are kept beside the result, so a rerun continues
            import torch
            from ..evaluation.resume import PartialRuns, run_key
            key = run_key(synthetic=args.synthetic, dataset=dataset, data_options={"folder": opts.get("path")},
                          cfg=cfg, seed=seed, device_type=torch.device(args.device).type, outputs=[args.json])
            partial = PartialRuns(args.json + ".partial", key)
            if partial.set_aside:
                print(f"{partial.path}: not resumed ({partial.set_aside}); it is replaced as runs finish")
            usable = sorted(r for r in partial.runs if r < cfg.runs)
            if usable:
                print(f"resuming the evaluation: run(s) {', '.join(map(str, usable))} of {cfg.runs} finished earlier "
                      f"({partial.path})", flush=True)
        result = evaluate_synthetic(images, labels, test_set, cfg, seed=seed, device=args.device,
                                    progress=not args.no_progress, completed=partial.runs if partial else None,
                                    on_run=partial.record if partial else None)
        result["network_source"] = pick["source"]
        mode = ("batched" if result["batched"] else "sequential") + (", compiled" if result["compiled"] else "")
        print(f"{network_label(result['network'])} on {dataset}: {result['mean']:.2f} ± {result['std']:.2f} % over "
              f"{cfg.runs} runs ({images.shape[0]} images, {cfg.epochs}+1 epochs, {mode})")
    if args.json:
        net = result["network"]
        out = {"accuracies": result["accuracies"], "mean": result["mean"], "std": result["std"],
               "model": net["model"], "norm": net["norm"], "width": net["width"], "depth": net["depth"],
               "network": net, "network_source": result["network_source"], "dataset": dataset,
               "synthetic": args.synthetic, "epochs": None if args.frozen_model else args.epochs,
               "runs": len(result["accuracies"]), "seed": None if args.frozen_model else seed,
               "batched": None if args.frozen_model else result["batched"],
               "compiled": None if args.frozen_model else result["compiled"], "num_images": int(images.shape[0]),
               "factor": int(meta.get("factor", 1)), "stored_images": int(meta.get("stored_images", images.shape[0]))}
        if args.frozen_model:
            out["frozen_model"] = args.frozen_model
        else:
            out["resumed_runs"] = result["resumed_runs"]
        from .._io import atomic_write_text
        atomic_write_text(args.json, json.dumps(out, indent=2))
        if partial is not None:  # the full result is written: the finished runs are no longer needed
            partial.finish()
    return 0


def _cmd_report(args) -> int:
    from ..distill.report import format_summary, report
    from .._io import check_writable_dir, check_writable_file
    if args.json:
        check_writable_file(args.json, "--json")
    if args.out:
        check_writable_dir(args.out, "report --out")
    summary, paths = report(args.run_dir, args.out)
    print(format_summary(summary, args.run_dir))
    for p in paths:
        print(f"wrote {p}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


def _cmd_pack(args) -> int:
    from ..data import pack_image_folder
    kw = {} if args.workers is None else {"workers": args.workers}
    pack_image_folder(args.src, args.dst, args.size, **kw)
    return 0


def _cmd_backends(args) -> int:
    import torch
    if getattr(args, "verify", False):
        from ..loss.verify import run
        return run(args.device, args.json, require=args.require, quick=args.quick)
    if getattr(args, "json", None) or getattr(args, "device", "cpu") != "cpu" or getattr(args, "require", None) \
            or getattr(args, "quick", False):
        from ..errors import UserError
        raise UserError("--device, --json, --require and --quick go with --verify")
    from ..loss.backends import BACKEND_NAMES, BackendUnavailable, get_backend
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
    from ..devices import env_world_size
    text = str(e)
    return env_world_size() > 1 and any(k in text for k in ("Connection closed by peer", "Connection reset by peer",
                                                                "Broken pipe", "NCCL communicator was aborted"))


def _rank_tag() -> str:
    """' (rank N)' inside a torchrun job, so that the failing rank is named."""
    from ..devices import env_world_size
    return f" (rank {os.environ.get('RANK', '?')})" if env_world_size() > 1 else ""


PEER_GONE_GRACE_S = 10.0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            print(f"datadam-fast {args.command}: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return EXIT_USAGE
        import torch
        torch.set_num_threads(args.threads)
    import warnings
    # a warning is one line in the CLI: "datadam-fast: warning: ..." (no source file and line)
    warnings.formatwarning = lambda msg, cat, *a, **k: (
        f"datadam-fast: warning: {str(msg).removeprefix('datadam_fast: ')}\n")
    from ..errors import DatadamError
    handlers = {"distill": _cmd_distill, "evaluate": _cmd_evaluate, "report": _cmd_report, "pack": _cmd_pack,
                "backends": _cmd_backends, "export": _cmd_export}
    try:
        if args.command == "distill" and args.config:  # the file's values, then the flags
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
        cmd = getattr(args, "command", None)
        if cmd == "distill":
            print("interrupted; resume with --resume (the last checkpoint is kept)", file=sys.stderr)
        elif cmd == "evaluate" and getattr(args, "json", None):
            print(f"interrupted; the same command continues from the finished runs ({args.json}.partial)",
                  file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
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
    from ..devices import env_world_size
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
