"""Build script: the Python package, plus the optional native extension ``fewstep._C`` built from csrc/.

* The CPU op (csrc/*.cpp) builds wherever torch and a C++ compiler are present.
* The CUDA op (csrc/*.cu) builds into the same module where torch is a CUDA build and nvcc exists;
  ``FEWSTEP_SKIP_CUDA_BUILD=1`` skips it (the Makefile sets it on machines without a GPU).
* ``FEWSTEP_SKIP_NATIVE_BUILD=1`` skips the extension altogether.

A skipped or failed build prints one line and the package installs and works without it:
fewstep/kernels/native.py loads the extension lazily, and the Triton kernels and PyTorch references remain.
"""

import glob
import os
import sys

from setuptools import setup

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
# -ffp-contract=off: the CPU op rounds every product and sum like the PyTorch reference (no FMA contraction).
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off"]
# No --use_fast_math: the noise must use the same logf / cosf as Triton's kernel (csrc/solver_update.cu).
NVCC_FLAGS = ["-O3"]


def say(msg: str) -> None:
    print(f"fewstep: {msg}", flush=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def native_build():
    """``(ext_modules, cmdclass)`` for fewstep._C, or ``([], {})`` with one line saying why not."""
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    if os.environ.get("FEWSTEP_SKIP_NATIVE_BUILD") == "1":
        return _skipped("FEWSTEP_SKIP_NATIVE_BUILD=1")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # torch not importable in the build environment (e.g. build isolation)
        return _skipped(f"torch is not importable here ({_first_line(e)})")

    if not cu or os.environ.get("FEWSTEP_SKIP_CUDA_BUILD") == "1":
        why_no_cuda = "FEWSTEP_SKIP_CUDA_BUILD=1" if cu else "no CUDA sources"
    elif torch.version.cuda is None:
        why_no_cuda = f"torch {torch.__version__} is not a CUDA build"
    elif CUDA_HOME is None:
        why_no_cuda = "no CUDA toolkit (nvcc) found"
    else:
        why_no_cuda = None

    if why_no_cuda is None:
        ext = CUDAExtension("fewstep._C", cpp + cu, include_dirs=[CSRC], extra_link_args=["-fopenmp"],
                            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS})
    else:
        ext = CppExtension("fewstep._C", cpp, include_dirs=[CSRC], extra_compile_args={"cxx": CXX_FLAGS},
                           extra_link_args=["-fopenmp"])
    ext.optional = True  # setuptools: a missing build output is not copied into the source tree

    class OptionalBuildExt(BuildExtension):
        """Builds fewstep._C when it can; any failure prints one line and the install goes on without it."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # e.g. torch's check that nvcc matches torch's CUDA version
                say(f"native extension not built ({_first_line(e)}); the Triton / PyTorch paths are used")

        def build_extension(self, ext):
            gen = os.path.join(os.path.abspath(self.build_temp), "fewstep_gen")
            os.makedirs(gen, exist_ok=True)
            with open(os.path.join(gen, "fewstep_build_info.h"), "w") as f:
                f.write(f'#pragma once\n#define FEWSTEP_TORCH_VERSION "{torch.__version__}"\n'
                        f"#define FEWSTEP_WITH_CUDA {0 if why_no_cuda else 1}\n")
            ext.include_dirs = [gen] + [d for d in ext.include_dirs if d != gen]
            try:
                super().build_extension(ext)
            except Exception as e:
                say(f"native extension not built ({_first_line(e)}); the Triton / PyTorch paths are used")
                return
            ops = "CPU op" + (f"; CUDA op skipped: {why_no_cuda}" if why_no_cuda else " and CUDA op")
            say(f"built the native extension fewstep._C ({ops})")

    return [ext], {"build_ext": OptionalBuildExt}


def _skipped(why: str):
    if BUILDING:  # not on metadata-only runs of this script (pip runs it several times)
        say(f"native extension skipped: {why}; the Triton / PyTorch paths are used")
    return [], {}


BUILDING = bool({"build", "build_ext", "editable_wheel", "bdist_wheel", "develop", "install"} & set(sys.argv))


ext_modules, cmdclass = native_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
