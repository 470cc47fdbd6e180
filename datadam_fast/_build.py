"""Just-in-time build of the C++/CUDA extensions in ``csrc/`` (torch.utils.cpp_extension + ninja).

Importing datadam_fast never needs a compiler: extensions are built on first use of the backend
and cached under ``$DATADAM_FAST_EXT_DIR`` (default ``~/.cache/datadam_fast/ext``), keyed by a
hash of the sources and flags, so a rebuild happens only when they change. An ahead-of-time
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

from .errors import BackendUnavailable


def csrc_dir() -> Path:
    """``csrc/`` of a source checkout (editable install) or the copy installed with the package."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "csrc", here / "_csrc"):
        if cand.is_dir():
            return cand
    raise BackendUnavailable(f"C++/CUDA sources not found (looked in {here.parent / 'csrc'} and {here / '_csrc'})")


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
    h = hashlib.sha1()
    for p in paths:
        h.update(Path(p).read_bytes())
    for flag in (*extra_cflags, *extra_cuda_cflags, *extra_ldflags):
        h.update(flag.encode())
    tag = f"{name}_{h.hexdigest()[:12]}"
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
    try:
        ext = cpp_extension.load(name=tag, sources=paths, extra_cflags=list(extra_cflags),
                                  extra_cuda_cflags=list(extra_cuda_cflags),
                                  extra_ldflags=list(extra_ldflags), build_directory=str(out),
                                  with_cuda=cuda, verbose=verbose)
    except Exception as e:  # compiler error, missing ninja, ...
        raise BackendUnavailable(f"building {name} from {', '.join(sources)} failed: {type(e).__name__}: "
                                 f"{str(e)[-2000:]}") from e
    return ext
