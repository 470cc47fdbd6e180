"""Constants shared by the Python code, the native builds (JIT and ahead of time) and setup.py.

This module imports nothing, so ``setup.py`` can execute it without importing the package (or
torch). Change a value here and every backend and both build paths follow.
"""

#: eps of ``a / max(||a||, eps)``: ``F.normalize``'s default, as in the official DataDAM code.
#: The C++/CUDA sources receive it as ``-DDATADAM_FAST_NORM_EPS=...`` (see ``native_defines``).
NORM_EPS = 1e-12

#: Portable flags of the fused CPU extension. No ``-ffast-math``: NaN/Inf semantics and IEEE
#: rounding are kept. ``-fopenmp`` is required: ``at::parallel_for`` is a header template that is
#: serial unless the extension is compiled with OpenMP (PyTorch's intra-op backend).
CPU_CFLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp")
CPU_LDFLAGS = ("-fopenmp",)
#: Added by the JIT build only (its cache is keyed by a host fingerprint); never in a wheel,
#: which must run on any CPU of the architecture.
CPU_JIT_NATIVE_CFLAGS = ("-march=native",)

#: Codes of the fused real-side epilogue (index = code in kernels/real_epilogue.py and
#: csrc/real_epilogue_cpu.cpp).
EPILOGUE_ACTS = ("relu", "leakyrelu", "sigmoid", "swish")
EPILOGUE_POOLS = ("none", "avgpool", "maxpool")

CUDA_NVCC_FLAGS = ("-O3", "-lineinfo")
CUDA_CXX_FLAGS = ("-O3",)


def native_defines():
    """``-D`` flags every native translation unit is compiled with (C++ and nvcc alike)."""
    return [f"-DDATADAM_FAST_NORM_EPS={NORM_EPS!r}"]
