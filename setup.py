"""datadam-fast packaging.

``kernels/`` (Triton) is installed as the subpackage ``datadam_fast.kernels``. The C++/CUDA
sources in ``csrc/`` are compiled just-in-time on first use (torch.utils.cpp_extension + ninja,
cached); set ``DATADAM_FAST_BUILD_EXT=1`` to build them ahead of time here instead
(``DATADAM_FAST_BUILD_CUDA=1`` adds the CUDA extension; needs nvcc).

The ahead-of-time build uses the portable flags of ``datadam_fast/_constants.py`` (the JIT build
uses the same list and adds ``-march=native`` only for its host-keyed cache), so a wheel runs on
any CPU of its architecture.
"""
import os
import runpy

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# executed from its file: importing the package here would import torch before it is installed
_c = runpy.run_path(os.path.join(HERE, "datadam_fast", "_constants.py"))

packages = ["datadam_fast", "datadam_fast.cli", "datadam_fast.distill", "datadam_fast.evaluation", "datadam_fast.loss",
            "datadam_fast.loss.backends", "datadam_fast.models", "datadam_fast.data", "datadam_fast.kernels",
            "datadam_fast._csrc"]
# kernels/ -> datadam_fast.kernels; csrc/ ships as datadam_fast/_csrc so the JIT build works from a wheel too
package_dir = {"datadam_fast": "datadam_fast", "datadam_fast.kernels": "kernels", "datadam_fast._csrc": "csrc"}

ext_modules, cmdclass = [], {}
if os.environ.get("DATADAM_FAST_BUILD_EXT", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    defines = _c["native_defines"]()
    ext_modules.append(CppExtension("datadam_fast._C_cpu", ["csrc/spatial_attention_cpu.cpp", "csrc/real_epilogue_cpu.cpp", "csrc/statistics_cpu.cpp",
                                                          "csrc/winograd_cpu.cpp"],
                                    extra_compile_args=[*_c["CPU_CFLAGS"], *defines],
                                    extra_link_args=list(_c["CPU_LDFLAGS"])))
    if os.environ.get("DATADAM_FAST_BUILD_CUDA", "0") == "1":
        ext_modules.append(CUDAExtension("datadam_fast._C_cuda", ["csrc/spatial_attention_cuda.cu"],
                                         extra_compile_args={"cxx": [*_c["CUDA_CXX_FLAGS"], *defines],
                                                             "nvcc": [*_c["CUDA_NVCC_FLAGS"], *defines]}))
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="datadam-fast",
    version="0.1.0",
    description="Fused attention-matching loss and dataset distillation (DataDAM) for PyTorch",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=packages,
    package_dir=package_dir,
    package_data={"datadam_fast._csrc": ["*.cpp", "*.cu", "*.cuh", "*.h"]},
    python_requires=">=3.9",
    # triton 3.6 is the oldest triton the GPU code generation is tested with (CI); it is the one
    # torch 2.11 ships with
    install_requires=["torch>=2.11", "numpy", "tqdm", "pillow", "scikit-learn", "matplotlib"],
    extras_require={"triton": ["triton>=3.6"], "profiling": ["nvtx"],
                    "test": ["pytest", "pytest-benchmark", "scikit-learn"]},
    entry_points={"console_scripts": ["datadam-fast=datadam_fast.cli:entry"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
