"""datadam-fast packaging.

``kernels/`` (Triton) is installed as the subpackage ``datadam_fast.kernels``. The C++/CUDA
sources in ``csrc/`` are compiled just-in-time on first use (torch.utils.cpp_extension + ninja,
cached); set ``DATADAM_FAST_BUILD_EXT=1`` to build them ahead of time here instead
(``DATADAM_FAST_BUILD_CUDA=1`` adds the CUDA extension; needs nvcc).
"""
import os

from setuptools import setup

packages = ["datadam_fast", "datadam_fast.backends", "datadam_fast.data", "datadam_fast.kernels", "datadam_fast._csrc"]
# kernels/ -> datadam_fast.kernels; csrc/ ships as datadam_fast/_csrc so the JIT build works from a wheel too
package_dir = {"datadam_fast": "datadam_fast", "datadam_fast.kernels": "kernels", "datadam_fast._csrc": "csrc"}

ext_modules, cmdclass = [], {}
if os.environ.get("DATADAM_FAST_BUILD_EXT", "0") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    ext_modules.append(CppExtension("datadam_fast._C_cpu", ["csrc/spatial_attention_cpu.cpp"],
                                    extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-march=native"],
                                    extra_link_args=["-fopenmp"]))
    if os.environ.get("DATADAM_FAST_BUILD_CUDA", "0") == "1":
        ext_modules.append(CUDAExtension("datadam_fast._C_cuda", ["csrc/spatial_attention_cuda.cu"],
                                         extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))
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
    install_requires=["torch", "numpy", "tqdm", "pillow", "scikit-learn", "matplotlib"],
    extras_require={"triton": ["triton"], "profiling": ["nvtx"],
                    "test": ["pytest", "pytest-benchmark", "scikit-learn"]},
    entry_points={"console_scripts": ["datadam-fast=datadam_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
