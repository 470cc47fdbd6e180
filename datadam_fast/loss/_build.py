"""Just-in-time build of the C++/CUDA extensions in ``csrc/`` (torch.utils.cpp_extension + ninja).

Importing datadam_fast never needs a compiler: extensions are built on first use of the backend
and cached under ``$DATADAM_FAST_EXT_DIR`` (default ``~/.cache/datadam_fast/ext``), keyed by a
hash of what the build depends on (:func:`build_tag`), so a rebuild happens only when that changes
and two checkouts or torch versions never share or rebuild each other's build. An ahead-of-time
build (``DATADAM_FAST_BUILD_EXT=1 pip install -e .``) produces ``datadam_fast._C_cpu`` /
``datadam_fast._C_cuda``, which are preferred when present.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from ..errors import BackendUnavailable


def csrc_dir() -> Path:
    """``csrc/`` of a source checkout (editable install) or the copy installed with the package."""
    package = Path(__file__).resolve().parent.parent
    for cand in (package.parent / "csrc", package / "_csrc"):
        if cand.is_dir():
            return cand
    raise BackendUnavailable(f"C++/CUDA sources not found (looked in {package.parent / 'csrc'} and "
                             f"{package / '_csrc'})")


def build_dir() -> Path:
    root = os.environ.get("DATADAM_FAST_EXT_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "datadam_fast", "ext")
    return Path(root)


def load_extension(name: str, sources: Sequence[str], *, cuda: bool = False,
                   extra_cflags: Sequence[str] = (), extra_cuda_cflags: Sequence[str] = (),
                   extra_ldflags: Sequence[str] = (), verbose: bool = False):
    """Import the prebuilt ``datadam_fast.<name>`` if present, else JIT-build ``sources`` (relative to csrc/).

    Raises :class:`BackendUnavailable` with the compiler's complaint when the toolchain is missing.
    """
    try:
        return importlib.import_module(f"datadam_fast.{name}")
    except ImportError:
        pass
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise BackendUnavailable(f"no C++ compiler found to build {name} (set CXX or install g++)")
    if cuda and shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        raise BackendUnavailable(f"nvcc not found to build {name} (set CUDA_HOME or put nvcc on PATH)")
    from torch.utils import cpp_extension
    src = csrc_dir()
    paths = [str(src / s) for s in sources]
    flags = (*extra_cflags, *extra_cuda_cflags, *extra_ldflags)
    arch = cuda_arch_list() if cuda else ""
    tag = build_tag(name, paths, flags, src=src, arch=arch)
    out = build_dir() / tag
    out.mkdir(parents=True, exist_ok=True)
    verbose = verbose or os.environ.get("DATADAM_FAST_VERBOSE_BUILD") == "1"
    # A cold build takes 40-100 s: one line on stderr so that a first call does not look hung
    # (stderr, not a warning: it is progress, and warning filters would hide or duplicate it).
    # A warm cache (the .so already there) loads silently.
    cold = not any(out.glob(f"{tag}*.so"))
    if cold:
        print(f"datadam_fast: building the fused {name} kernels (first use; about a minute, cached in "
              f"{out})...", file=sys.stderr, flush=True)
    saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cuda and arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch  # what the cache key says, not torch's own guess
    try:
        ext = cpp_extension.load(name=tag, sources=paths, extra_cflags=list(extra_cflags),
                                  extra_cuda_cflags=list(extra_cuda_cflags),
                                  extra_ldflags=list(extra_ldflags), build_directory=str(out),
                                  with_cuda=cuda, verbose=verbose)
    except Exception as e:  # compiler error, missing ninja, ...
        raise BackendUnavailable(f"building {name} from {', '.join(sources)} failed: {type(e).__name__}: "
                                 f"{str(e)[-2000:]}") from e
    finally:
        if cuda and arch:
            if saved_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch
    return ext


def cuda_arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST`` for a CUDA build: the variable when set, else the compute
    capabilities of the visible GPUs (``"9.0+PTX"`` on an H100/H200; PTX of the newest so that a
    newer GPU can still JIT it); ``""`` when there is neither (torch then decides)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    import torch
    try:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # noqa: BLE001 - no driver, no device: nothing to derive
        caps = []
    if not caps:
        return ""
    names = [f"{a}.{b}" for a, b in caps]
    names[-1] += "+PTX"
    return ";".join(names)


def build_tag(name: str, paths: Sequence[str], flags: Sequence[str], *, src: Path, arch: str = "") -> str:
    """Folder name of one build in the cache: ``<name>_<hash>``.

    The hash covers everything a build depends on, so that a cache folder shared by several
    checkouts, Python environments or GPUs never hands over (or rebuilds over) another's ``.so``:
    the sources' bytes and the flags; the source folder (ninja's build files hold absolute source
    paths, so two checkouts of the same version would otherwise rebuild each other's build);
    torch's version and CUDA version and the Python ABI (the extension links against them); and
    the CUDA architectures compiled for.
    """
    import torch
    h = hashlib.sha1()
    for p in paths:
        h.update(Path(p).read_bytes())
    for part in (*flags, "|src=", str(Path(src).resolve()), "|torch=", torch.__version__,
                 "|cuda=", str(torch.version.cuda), "|py=", sys.implementation.cache_tag or "",
                 "|arch=", arch):
        h.update(part.encode())
    return f"{name}_{h.hexdigest()[:12]}"
