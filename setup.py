"""Build script: the Python package, plus the optional CUDA extension in csrc/ when a toolkit is present.

FEWSTEP_SKIP_CUDA_BUILD=1 skips the extension; a missing toolkit prints one line and skips.  Every op in csrc/
also exists in Triton / PyTorch, which is the fallback at run time.
"""

import glob
import os

from setuptools import setup


def cuda_extensions():
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    if not sources or os.environ.get("FEWSTEP_SKIP_CUDA_BUILD") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as e:  # torch not importable in the build environment
        print(f"fewstep: skipping CUDA extension ({e})")
        return [], {}
    if CUDA_HOME is None:
        print("fewstep: no CUDA toolkit found, skipping the CUDA extension (Triton kernels are used)")
        return [], {}
    ext = CUDAExtension("fewstep._C", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
