"""The ``datadam-fast`` argument parser: every subcommand's flags and their help (the commands
themselves are in :mod:`.main`).

The ``distill`` flags are the fields of :class:`~datadam_fast.distill.DistillConfig` (their
defaults come from it, :func:`distill_config` maps them back), and every ``choices=`` is a
registry of the code (methods, presets, norms, dtypes, backends, compile modes, export formats;
the dataset names in the help),
so a new built-in method or backend is one registry entry.
"""
from __future__ import annotations

import argparse

from ..distill.config import (COMPILE_MODES, DEFAULT_PRESET, INITS, OPTIMIZERS, PRESETS, REAL_DTYPES, REAL_EPILOGUES, DistillConfig,
                              flag_fields)
from ..data import DATASET_NAMES
from ..distill.methods import METHODS
from ..evaluation.export import FORMATS
from ..loss.backends import BACKEND_NAMES
from ..models._base import NORMS


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where X says something: a flag whose default is None (decided
    at run time, explained in its help) or a switch that is off shows none."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _method_help() -> str:
    return "; ".join(f"{name}: {cls.summary}" for name, cls in METHODS.items())


def _add_distill(sub) -> None:
    p = sub.add_parser(
        "distill", help="learn a synthetic set with DataDAM",
        formatter_class=_Help,
        description="Distill a dataset into IPC synthetic images per class by attention matching. With no "
                    "arguments it distills the bundled scikit-learn digits (no data, no network needed).")
    p.add_argument("--dataset", default="digits",
                   help=f"{', '.join(DATASET_NAMES)} (digits: the bundled default; folder: see --folder)")
    p.add_argument("--data-root", default=None,
                   help="where datasets live (<root>/mnist/raw/*.gz, <root>/cifar10/cifar-10-batches-py, ...); "
                        "default $DATADAM_FAST_DATA, else ~/.cache/datadam_fast/data")
    p.add_argument("--folder", default=None, help="with --dataset folder: an ImageFolder tree or a packed directory")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="tinyimagenet / imagenet64: where their decoded copy is written on first load (default "
                        "$DATADAM_FAST_CACHE, else beside the data); a read-only data root works with it")
    p.add_argument("--download", action="store_true", help="fetch missing official files (checksums verified)")
    p.add_argument("--ipc", type=int, default=10, help="synthetic images per class")
    p.add_argument("--iterations", type=int, default=None,
                   help="distillation iterations (default 8000 as in the paper, 20000 with --method dm, 100 for the digits demo; the official "
                        "code's default is 20000); 0 = evaluate the random real subset the run starts from")
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help=_method_help() + " (default datadam, or the --preset's method)")
    p.add_argument("--batch-real", type=int, default=None,
                   help="real images per class per iteration (default 64; 256 with --method dm)")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help="paper: InstanceNorm ConvNet, power 4; official: what the official code runs "
                        "(BatchNorm ConvNet, power 1); the field's settings on the paper's network (docs/usage.md): "
                        "idc: --factor 2; idm: --method dm --factor 2 --networks pool:10:0.5; ncfm: --method ncfm "
                        "--factor 2 --networks pool:10:1. Flags given explicitly override the preset's values")
    p.add_argument("--model", default="ConvNet", help="network used for distillation (fresh random init every iteration, or trained: --networks)")
    p.add_argument("--norm", default=None, choices=NORMS,
                   help="normalisation layer of the ConvNet (default from --preset)")
    p.add_argument("--depth", type=int, default=None, help="ConvNet depth (default from image size: 3 for 32px, 4 for 64px)")
    p.add_argument("--width", type=int, default=None, help="ConvNet channels (default 128)")
    p.add_argument("--power", type=float, default=None, help="attention power p >= 1 (default from --preset)")
    p.add_argument("--task-balance", type=float, default=None,
                   help="embedding-term balance lambda (coefficient 100*lambda); default 0.01, 0.02 at >= 64 px")
    p.add_argument("--lr-img", type=float, default=None,
                   help="learning rate on pixels (default 1, 10 for IPC > 50; 0.001 with --method ncfm)")
    p.add_argument("--optimizer", default=None, choices=OPTIMIZERS,
                   help="optimiser of the pixels (default sgd with momentum 0.5; adamw with --method ncfm, as NCFM)")
    p.add_argument("--num-freqs", type=int, default=4096,
                   help="--method ncfm: Gaussian frequencies per class of the characteristic function")
    p.add_argument("--init", default="real", choices=INITS,
                   help="initialise from random real images (with --factor F: F x F downsampled real images per "
                        "stored image) or noise")
    p.add_argument("--factor", type=int, default=None, metavar="F",
                   help="multi-formation (IDC): each stored H x W image holds F x F images of H/F x W/F, each "
                        "upsampled (bilinear) to H x W for matching and evaluation; IPC counts stored images, so "
                        "the set trains on F^2 x IPC images per class. IDC, IDM, DANCE and NCFM use 2 (default 1, or "
                        "the --preset's)")
    p.add_argument("--networks", default=None, metavar="random|pool:N[:EPOCHS]",
                   help="the networks whose features are matched: random (a freshly initialised one every "
                        "iteration) or pool:N[:EPOCHS] (N networks of --model trained EPOCHS epochs, default 1, "
                        "fractions allowed, on the real training set with the evaluation protocol's optimiser; built "
                        "once, cached under --pool-dir and reused by every later run with the same settings; each "
                        "iteration draws one from the run's generator). Default random, or the --preset's")
    p.add_argument("--pool-dir", default=None, metavar="DIR",
                   help="where trained network pools are cached (default $DATADAM_FAST_CACHE/pools, else "
                        "~/.cache/datadam_fast/pools); shared by every process of a torchrun job")
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
    p.add_argument("--real-dtype", default="fp32", choices=list(REAL_DTYPES),
                   help="precision of the real side's network pass (no_grad; maps and means still accumulate in fp32)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled passes. reduce-overhead replays CUDA graphs on a GPU "
                        "(shapes are static per architecture and chunk size); on CPU it equals default")
    p.add_argument("--real-epilogue", choices=REAL_EPILOGUES,
                   help="real side (no_grad) of ConvNet passes through a fused epilogue: conv output -> norm "
                        "statistics -> norm + activation -> pooling and attention map, the normalised activation "
                        "never written. cpu: C++ kernels (a first layer with <= 4 input channels is convolved "
                        "inside them; 3x3 convolutions with >= 16 input channels run as Winograd F(2x2, 3x3), "
                        "or as oneDNN's direct convolution with DATADAM_FAST_REAL_CONV=direct); triton: Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1, for tests). "
                        "auto: cpu on CPU for fp32 real passes (also replacing the compiled real pass), triton on "
                        "CUDA with --no-compile; off: the network's own forward (or the compiled pass)")
    p.add_argument("--no-prefetch", action="store_true",
                   help="load real chunks in the main thread instead of a background thread")
    p.add_argument("--no-channels-last", action="store_true",
                   help="run the network in NCHW instead of channels_last (NHWC is ~20%% faster per step on CPU)")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKEND_NAMES,
                   help="loss backend")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (same seed, same result)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, the local rank's GPU under torchrun; else cpu), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", default="runs/distill", help="output directory (synthetic.pt, grid.png, metrics.jsonl, checkpoint.pt)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="write checkpoint.pt atomically every N iterations (0 = only at the end of the run)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out (same flags required)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate every N iterations (0 = only after the last iteration, -1 = never)")
    p.add_argument("--eval-runs", type=int, default=3, help="networks trained per evaluation (0 = no evaluation)")
    p.add_argument("--eval-epochs", type=int, default=None,
                   help="training epochs per evaluation network (default 1000 as DM, 300 for digits; official DataDAM 1800)")
    p.add_argument("--eval-model", default=None, help="network for evaluation (default: --model)")
    p.add_argument("--log-every", type=int, default=10, help="write a metrics.jsonl line every N iterations")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges for Nsight (also DATADAM_FAST_NVTX=1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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


def _defaults_from_config(p) -> None:
    """Every distill flag that is a ``DistillConfig`` field takes its default from the dataclass,
    so the two cannot drift apart (``--help`` shows them)."""
    base = DistillConfig()
    fields = {flag.replace("-", "_"): (name, negated) for flag, (name, negated) in flag_fields().items()}
    for action in p._actions:
        if action.dest in fields:
            name, negated = fields[action.dest]
            action.default = (not getattr(base, name)) if negated else getattr(base, name)


def distill_config(args, data_opts) -> DistillConfig:
    """The :class:`DistillConfig` the parsed ``distill`` flags describe."""
    kw = {}
    for flag, (name, negated) in flag_fields().items():
        v = getattr(args, flag.replace("-", "_"))
        kw[name] = (not v) if negated else v
    return DistillConfig(**kw, data_opts=data_opts)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="train fresh networks on a synthetic set and test on real data",
        formatter_class=_Help,
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
    p.add_argument("--norm", default=None, choices=NORMS, help="override the network's normalisation layer")
    p.add_argument("--width", type=int, default=None, help="override a ConvNet's width")
    p.add_argument("--depth", type=int, default=None, help="override a ConvNet's depth")
    p.add_argument("--runs", type=int, default=None,
                   help="independent training runs (default: the run's --eval-runs recorded in the file, else 3)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs per run, the official code trains epochs+1 (default: the run's --eval-epochs "
                        "recorded in the file, else 1000 as the DM protocol)")
    p.add_argument("--batch", type=int, default=256, help="training batch size")
    p.add_argument("--lr", type=float, default=0.01, help="network learning rate")
    p.add_argument("--no-dsa", action="store_true", help="no augmentation while training")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--batched", dest="batched", action="store_const", const=True, default=None,
                      help="train the runs together (vmap); default: whichever is faster on the device")
    mode.add_argument("--sequential", dest="batched", action="store_const", const=False,
                      help="train the runs one after another")
    comp = p.add_mutually_exclusive_group()
    comp.add_argument("--compile", dest="compile", action="store_const", const=True, default=None,
                      help="torch.compile each training step's loss and backward (sequential runs; one compile per "
                           "batch shape, 13-19 s on CPU). Default: on from 1000 training steps per run (epochs x "
                           "batches), unless DATADAM_FAST_COMPILE=0. Only float rounding differs from --no-compile")
    comp.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                      help="train the networks uncompiled")
    p.add_argument("--frozen-model", default=None,
                   help="official {'net_parameters': state_dict} file: test it without training (like "
                        "distill_test_model.py); the network (BatchNorm or not, width, depth) is read from the state "
                        "dict unless --model is given")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the training runs (default: the seed of the run's own final evaluation, recorded in "
                        "the file, so that the same --epochs and --runs give its summary's accuracy; else 0)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None,
                   help="also write the result as JSON here: {'accuracies': [...], 'mean', 'std', 'network': {model, "
                        "norm, width, depth}, 'seed', ...} (the folder must exist); finished runs are kept in JSON.partial "
                        "until then, so the same command continues an interrupted evaluation")


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="plot a distillation run's metrics and print a summary",
        formatter_class=_Help,
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
        formatter_class=_Help,
        description="official: res_<method>_<dataset>_<model>_<ipc>ipc.pt, {'data': [[images, labels]], "
                    "'accs_all_exps': {...}} as the official DC/DM/DataDAM code saves it (DC-BENCH reads "
                    "['data'][-1]); folder: PATH/<class>/<i>.png (de-normalised, 8-bit: values outside [0, 1] are "
                    "clipped) plus meta.json, what torchvision's ImageFolder reads; tensors: PATH/images.pt (float, "
                    "normalised as recorded) and PATH/labels.pt plus meta.json (e.g. DD-Ranking's image_tensor). "
                    "evaluate --synthetic reads all three back.")
    p.add_argument("source", metavar="RUN_DIR_OR_SYNTHETIC", help="a distill --out directory or a synthetic set file")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="official: a .pt file or a directory (the official file name is used); folder/tensors: "
                        "a directory (created; must be empty)")


def _add_pack(sub) -> None:
    p = sub.add_parser("pack", help="decode an ImageFolder once into a memory-mapped uint8 array",
                       formatter_class=_Help)
    p.add_argument("src", help="ImageFolder root (<src>/<class>/*.jpg)")
    p.add_argument("dst", help="output directory (images.u8, labels.npy, meta.json)")
    p.add_argument("--size", type=int, default=64, help="output resolution (shorter side resize + center crop)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datadam-fast", description="Dataset distillation by attention matching.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"datadam-fast {__version__}")
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
    p.add_argument("--json", default=None, metavar="PATH",
                   help="with --verify: write the table as JSON (rewritten after every row)")
    p.add_argument("--require", default=[], metavar="NAMES", type=lambda v: [x for x in v.split(",") if x],
                   help="with --verify: exit 1 unless these implementations were verified: 'all', or a comma list "
                        "of cpu, cuda, triton, epilogue:cpu, epilogue:triton, stats:cpu, stats:triton (default: none required)")
    p.add_argument("--quick", action="store_true",
                   help="with --verify: only the small, odd-sized problem of each kind (seconds; without it the "
                        "DataDAM- and CIFAR-sized problems run too)")
    return parser
