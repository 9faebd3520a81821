"""The native extension ``fewstep._C`` (csrc/): the solver update as the registered torch op
``torch.ops.fewstep.solver_update``, for CPU tensors (C++, OpenMP) and, where it was built with CUDA, CUDA
tensors.

The extension is optional.  It is loaded lazily, on the first call of :func:`available` or
:func:`solver_update_native`, never at package import.  A built extension that does not match this code or
this torch (another op version, or built against another torch: its C++ ABI may differ) is detected before
it is loaded, from the build info it carries, and ignored with one warning; so is one that fails to load.
Without it, :func:`available` is False and the Triton kernel / PyTorch reference in
:mod:`fewstep.kernels.solver_update` run as before.

The op has a Meta kernel, so ``torch.compile(fullgraph=True)`` traces a loop of network calls and updates as
one graph: the op's in-place writes are declared in its schema.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
import warnings

import torch

from .solver_update import StageUpdate, check_stage_inputs

__all__ = ["available", "load_error", "build_info", "solver_update_native", "NATIVE_API", "SCHEMA",
           "CUDA_MAX_REG_IN", "CUDA_MAX_ROWS"]

# The op's contract; FEWSTEP_NATIVE_API in csrc/solver_update.h carries the same number.
NATIVE_API = 1
SCHEMA = ("fewstep::solver_update(Tensor(a!) state, Tensor? net_out, Tensor(b!)? net_in, Tensor? seed, "
          "Tensor(c!)? z_out, int[] reg_in, int[] reg_out, float[] coef, bool has_ou, bool has_oc, "
          "bool has_z, bool has_net_in, bool guided, int noise_index) -> ()")
# The CUDA kernel keeps a stage's inputs in registers: at most this many state rows read and outputs written
# (kMaxRegIn / kMaxRows in csrc/solver_update.cu; the solvers shipped today need 4 and 3).
CUDA_MAX_REG_IN = 8
CUDA_MAX_ROWS = 8

_BUILD_MARK = re.compile(rb"fewstep-native-build:api=(\d+);torch=([^;\x00]*);cuda=([01]);")

_lock = threading.Lock()
_loaded = False  # a load was attempted (whatever came of it)
_devices: frozenset[str] = frozenset()  # device types the loaded op has kernels for
_error: str | None = "not loaded yet"
_info: dict | None = None


def read_build_info(path: str) -> dict | None:
    """``{"api", "torch", "cuda"}`` from the build info in a built extension's file, without loading it."""
    with open(path, "rb") as f:
        m = _BUILD_MARK.search(f.read())
    if m is None:
        return None
    return {"api": int(m.group(1)), "torch": m.group(2).decode(errors="replace"), "cuda": m.group(3) == b"1"}


def _extension_path() -> str | None:
    try:
        spec = importlib.util.find_spec("fewstep._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def _load(path: str | None, module_name: str = "fewstep._C") -> tuple[frozenset, dict | None, str | None]:
    """Load the extension at ``path``: ``(device types, build info, None)``, or ``(frozenset(), info, why)``.

    A missing extension is the ordinary case of an install without a compiler: no warning.  Every other
    refusal warns once (the caller loads once per process).
    """
    if path is None:
        return frozenset(), None, "fewstep._C is not built (pip install -e . with a C++ compiler builds it)"
    try:
        info = read_build_info(path)
    except OSError as e:
        info, why = None, f"cannot read {path}: {e}"
    else:
        why = None
        if info is None:
            why = f"{path} carries no fewstep build info (a stale build from older sources); rebuild it"
        elif info["api"] != NATIVE_API:
            why = (f"{path} implements op version {info['api']}, this fewstep needs {NATIVE_API} (a stale "
                   f"build); rebuild it")
        elif info["torch"] != torch.__version__:
            why = (f"{path} was built against torch {info['torch']}, this is torch {torch.__version__} "
                   f"(its C++ ABI may differ); rebuild it")
    if why is None:
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules[module_name] = module
        except Exception as e:  # dlopen failure: undefined symbols, wrong architecture, truncated file
            why = f"{path} failed to load ({type(e).__name__}: {e}); rebuild it"
    if why is None:
        op = getattr(getattr(torch.ops, "fewstep", None), "solver_update", None)
        schema = str(op.default._schema) if op is not None else None
        if schema != SCHEMA:
            why = f"{path} registers fewstep::solver_update as {schema!r}, expected {SCHEMA!r}; rebuild it"
    if why is not None:
        warnings.warn(f"ignoring the native extension: {why}. The Triton / PyTorch solver updates are used.",
                      RuntimeWarning, stacklevel=3)
        return frozenset(), info, why
    devices = {"cpu"}
    if torch._C._dispatch_has_kernel_for_dispatch_key("fewstep::solver_update", "CUDA"):
        devices.add("cuda")
    return frozenset(devices), info, None


def _ensure_loaded() -> frozenset[str]:
    global _loaded, _devices, _info, _error
    if not _loaded:
        with _lock:
            if not _loaded:
                _devices, _info, _error = _load(_extension_path())
                _loaded = True
    return _devices


def available(device: torch.device | str | None = None) -> bool:
    """Whether the native op is loaded and has a kernel for ``device``'s type (any device when None)."""
    devices = _ensure_loaded()
    if device is None:
        return bool(devices)
    return torch.device(device).type in devices


def load_error() -> str | None:
    """Why the extension is not in use (None when it is loaded)."""
    _ensure_loaded()
    return _error


def build_info() -> dict | None:
    """The loaded (or refused) extension's build info ``{"api", "torch", "cuda"}``; None if none was found."""
    _ensure_loaded()
    return _info


def solver_update_native(upd: StageUpdate, state: torch.Tensor, net_out: torch.Tensor | None,
                         net_in: torch.Tensor | None, seed: torch.Tensor | None, *,
                         z_out: torch.Tensor | None = None, config=None) -> None:
    """Run one stage in place with the native op (same buffers and semantics as ``solver_update``).

    state: (R, N) fp32, contiguous.  net_out: G*N elements (G = 2 with guidance) of float32 / float64 /
    float16 / bfloat16.  net_in: G*N elements of one of those (the model dtype).  seed: (1,) int64, read on
    the device.  z_out: optional (N,) fp32 that receives the noise drawn.  config: accepted for the launcher's
    signature and unused (the native op picks its own blocks).

    Noise is the Triton kernel's Philox stream for the same seed and ``noise_index``.  On CPU the float math
    is the reference's (:func:`~fewstep.kernels.solver_update.solver_update_ref`, term by term in fp32).
    """
    check_stage_inputs(upd, state, net_out, net_in, seed, z_out)  # the Triton launcher's checks and messages
    if upd.n_rows == 0:
        return
    if state.device.type not in _ensure_loaded():
        raise RuntimeError(f"solver_update_native: no native kernel for {state.device.type} tensors "
                           f"({_error or 'fewstep._C was built without CUDA'}); use solver_update or "
                           f"solver_update_ref")
    if state.device.type == "cuda" and (len(upd.reg_in) > CUDA_MAX_REG_IN or upd.n_rows > CUDA_MAX_ROWS):
        raise ValueError(f"solver_update_native on CUDA: a stage may read at most {CUDA_MAX_REG_IN} state "
                         f"rows and write {CUDA_MAX_ROWS} outputs, this one reads {len(upd.reg_in)} and "
                         f"writes {upd.n_rows}; use solver_update")
    torch.ops.fewstep.solver_update(
        state, net_out if upd.has_ou or upd.has_oc else None, net_in if upd.has_net_in else None,
        seed if upd.has_z else None, z_out if upd.has_z else None, upd.reg_in, upd.reg_out, upd.coef,
        upd.has_ou, upd.has_oc, upd.has_z, upd.has_net_in, upd.guided, upd.noise_index)
