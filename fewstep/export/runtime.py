"""``fs.load_onnx(path)``: an exported plan on onnxruntime, called like the plan it came from.

``ort_plan(noise, seed=None, generator=None, stage_noise=None, **cond) -> sample`` checks every input's name,
shape and dtype against the graph (errors name what was expected and what came), runs the session and
returns a float32 tensor on the noise's device.  Stochastic plans take their per-stage noise as the
``stage_noise`` input; given a ``seed`` (or nothing: a fresh one) the callable draws it on the host with
:func:`fewstep.kernels.solver_update.ref_noise`, the stream the torch plan's CPU path draws, so the same seed
gives the same sample as ``plan(noise, seed=s)`` on the CPU.

Loading reads data only: an ONNX file is a protobuf of ops and tensors, and this loader registers no custom-op
library, so nothing in the file can run code; onnxruntime resolves external data only inside the model's
directory.  The fewstep metadata is validated against the session's own inputs and outputs, so a foreign or
edited file fails at load with a message naming the input.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .onnx_export import FORMAT, META_KEY, VERSION
from .trace import STAGE_NOISE

__all__ = ["OnnxPlan", "load_onnx", "OnnxLoadError", "ORT_TYPES", "draw_stage_noise", "default_providers"]

# onnxruntime's type strings -> torch dtypes
ORT_TYPES = {f"tensor({name})": dtype for name, dtype in (
    ("float", torch.float32), ("float16", torch.float16), ("double", torch.float64),
    ("bfloat16", torch.bfloat16), ("int64", torch.int64), ("int32", torch.int32), ("int16", torch.int16),
    ("int8", torch.int8), ("uint8", torch.uint8), ("bool", torch.bool))}


class OnnxLoadError(ValueError):
    """An ONNX file that is not a loadable fewstep plan: ``str(e)`` names the file and what is wrong."""

    def __init__(self, path, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("fs.load_onnx needs onnxruntime: pip install 'fewstep[export]'") from e
    return onnxruntime


def default_providers() -> list[str]:
    """CUDA when this onnxruntime has it, then the CPU."""
    have = _ort().get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


class OnnxPlan:
    """A whole-sampler ONNX file on an ``onnxruntime.InferenceSession``; see the module docstring.

    Attributes: ``shape`` (the noise shape), ``cond`` (name -> (shape, dtype)), ``noisy_stages``, ``info``
    (the fewstep metadata: solver, nfe, guidance_scale, dtype, ...), ``session``.
    """

    def __init__(self, path, *, providers: Sequence[str] | None = None, shape: Sequence[int] | None = None,
                 threads: int | None = None):
        ort = _ort()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: fp16 graphs log a warning per node CPU kernels lack
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        providers = list(providers) if providers is not None else default_providers()
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # not ONNX, truncated, an op this runtime lacks
            raise OnnxLoadError(path, f"onnxruntime cannot load it ({' '.join(str(e).split())[:800]})") from e
        self.path = path
        meta = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if meta is None:
            raise OnnxLoadError(path, f"no {META_KEY!r} metadata: not a plan exported by fewstep "
                                      f"(plan.export_onnx / fewstep export)")
        try:
            info = json.loads(meta)
        except json.JSONDecodeError as e:
            raise OnnxLoadError(path, f"its {META_KEY!r} metadata is not JSON ({e})") from e
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            got = info.get("format") if isinstance(info, dict) else info
            raise OnnxLoadError(path, f"metadata format {got!r}, expected {FORMAT!r}")
        if info.get("version") != VERSION:
            raise OnnxLoadError(path, f"metadata version {info.get('version')!r} unsupported (this fewstep "
                                      f"reads {VERSION})")
        self.info = info
        self._check_graph(info)
        if shape is not None and tuple(shape) != self.shape:
            raise OnnxLoadError(path, f"exported for noise shape {self.shape}, expected {tuple(shape)}: "
                                      f"export the plan again for this shape")

    def _check_graph(self, info: dict) -> None:
        """The session's inputs and output must be exactly those the metadata declares."""
        declared = info.get("inputs")
        if not isinstance(declared, dict) or "noise" not in declared:
            raise OnnxLoadError(self.path, "metadata 'inputs' must name at least 'noise'")
        graph = {i.name: i for i in self.session.get_inputs()}
        missing, extra = sorted(set(declared) - set(graph)), sorted(set(graph) - set(declared))
        if missing or extra:
            raise OnnxLoadError(self.path, f"the graph's inputs {sorted(graph)} do not match the plan's "
                                           f"{sorted(declared)} (missing {missing}, unexpected {extra})")
        self.inputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, d in declared.items():
            i = graph[name]
            dtype = ORT_TYPES.get(i.type)
            shape = tuple(i.shape)
            if dtype is None or str(dtype).removeprefix("torch.") != d.get("dtype"):
                raise OnnxLoadError(self.path, f"input {name!r}: the graph has {i.type}, the metadata says "
                                               f"{d.get('dtype')}")
            if shape != tuple(d.get("shape", ())) or not all(isinstance(s, int) for s in shape):
                raise OnnxLoadError(self.path, f"input {name!r}: the graph has shape {shape}, the metadata "
                                               f"says {tuple(d.get('shape', ()))}")
            self.inputs[name] = (shape, dtype)
        outs = self.session.get_outputs()
        if [o.name for o in outs] != ["sample"] or tuple(outs[0].shape) != self.inputs["noise"][0]:
            raise OnnxLoadError(self.path, f"expected one output 'sample' of the noise's shape "
                                           f"{self.inputs['noise'][0]}, got "
                                           f"{[(o.name, tuple(o.shape)) for o in outs]}")
        self.shape = self.inputs["noise"][0]
        self.noisy_stages = int(info.get("noisy_stages") or 0)
        if (STAGE_NOISE in self.inputs) != (self.noisy_stages > 0) or (
                self.noisy_stages and self.inputs[STAGE_NOISE][0] != (self.noisy_stages, *self.shape)):
            raise OnnxLoadError(self.path, f"{STAGE_NOISE!r}: the metadata declares {self.noisy_stages} "
                                           f"noisy stages, the graph has {self.inputs.get(STAGE_NOISE)}")
        self.cond = {k: v for k, v in self.inputs.items() if k not in ("noise", STAGE_NOISE)}

    @property
    def stochastic(self) -> bool:
        return self.noisy_stages > 0

    @property
    def nfe(self) -> int:
        return int(self.info.get("nfe", 0))

    def __repr__(self) -> str:
        return (f"OnnxPlan({self.info.get('solver')}, nfe={self.nfe}, shape={self.shape}, "
                f"providers={self.session.get_providers()})")

    def __call__(self, noise, *, seed: int | None = None, generator: torch.Generator | None = None,
                 stage_noise=None, **cond: Any) -> torch.Tensor:
        """The sample for ``noise`` (float32 tensor or array of the plan's shape) and ``cond``; see the
        module docstring."""
        feeds = {"noise": _as_array("noise", noise, *self.inputs["noise"], cast_float=True)}
        missing, extra = sorted(set(self.cond) - set(cond)), sorted(set(cond) - set(self.cond))
        if missing or extra:
            raise ValueError(f"conditioning: the plan was exported with {sorted(self.cond)}, got "
                             f"{sorted(cond)} (missing {missing}, unexpected {extra})")
        for k, v in cond.items():
            feeds[k] = _as_array(f"cond[{k!r}]", v, *self.cond[k])
        if self.noisy_stages:
            if stage_noise is None:
                stage_noise = draw_stage_noise(self.noisy_stages, self.shape, seed, generator)
            elif seed is not None or generator is not None:
                raise ValueError("pass either stage_noise or seed / generator, not both")
            feeds[STAGE_NOISE] = _as_array(STAGE_NOISE, stage_noise, *self.inputs[STAGE_NOISE],
                                           cast_float=True)
        elif stage_noise is not None:
            raise ValueError(f"stage_noise: this plan ({self.info.get('solver')}) is deterministic and takes "
                             f"no stage noise")
        out = self.session.run(["sample"], feeds)[0]
        sample = torch.from_numpy(out)
        return sample.to(noise.device) if isinstance(noise, torch.Tensor) else sample


def draw_stage_noise(stages: int, shape: tuple[int, ...], seed: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``(stages, *shape)`` float32: stage i's noise is :func:`~fewstep.kernels.solver_update.ref_noise`
    ``(seed, i)``, what the torch plan draws on the CPU; seed None draws one from ``generator`` (a CPU
    generator) or torch's global generator, as the plan does."""
    from ..kernels.solver_update import ref_noise

    if seed is None:
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator: expected a CPU torch.Generator, got one on {generator.device}")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    n = math.prod(shape)
    return torch.stack([ref_noise(seed, i, n).view(shape) for i in range(stages)])


def _as_array(what: str, v, shape: tuple[int, ...], dtype: torch.dtype,
              cast_float: bool = False) -> np.ndarray:
    """``v`` (a tensor or array) as a contiguous numpy array of ``shape`` and ``dtype``; float16 / bfloat16
    noise is widened to float32 when ``cast_float``; anything else must match exactly."""
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor or numpy array, got {type(v).__name__}")
    if tuple(v.shape) != shape:
        raise ValueError(f"{what} shape: expected {shape}, got {tuple(v.shape)}")
    if cast_float and v.dtype in (torch.float16, torch.bfloat16) and dtype == torch.float32:
        v = v.float()
    if v.dtype != dtype:
        raise ValueError(f"{what} dtype: expected {dtype}, got {v.dtype}")
    if dtype == torch.bfloat16:
        raise ValueError(f"{what}: bfloat16 inputs have no numpy type to hand onnxruntime; export the plan "
                         f"with float32 conditioning")
    return np.ascontiguousarray(v.detach().cpu().numpy())


def load_onnx(path, *, providers: Sequence[str] | None = None, shape: Sequence[int] | None = None,
              threads: int | None = None) -> OnnxPlan:
    """An exported plan (``plan.export_onnx`` / ``fewstep export``) on onnxruntime, called like the plan.

    providers: onnxruntime execution providers (default: CUDA when available, then CPU).  shape: the noise
    shape you expect (a file exported for another one is an error here, not at the first call).  threads:
    onnxruntime's intra-op threads (default: its own choice).
    """
    return OnnxPlan(path, providers=providers, shape=shape, threads=threads)
