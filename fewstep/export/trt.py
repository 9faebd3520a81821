"""TensorRT: a serialized engine from an exported plan's ONNX file, and ``fs.load_trt`` to run it.

UNVERIFIED: TensorRT cannot be installed on the machines this code was written on (its wheels pull libraries
from outside the package registries reached there).  The builder's call sequence is tested against a stand-in
module that records it; nothing here has run on a real TensorRT.  Written against the TensorRT 10 Python API
(``build_serialized_network``, named I/O tensors, ``execute_async_v3``).

Build (:func:`build_engine`): parse the ONNX file, static shapes (the file has no dynamic dimension), then

* FP8 (Q/DQ) plans: a *strongly typed* network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): the graph's
  own types, float8 Q/DQ included, decide every layer's precision; no precision flags (TensorRT rejects them
  on strongly typed networks);
* float16 / bfloat16 plans: the ``FP16`` / ``BF16`` builder flag; float32 plans: no flag.

Load (:func:`load_trt`): ``trt.Runtime.deserialize_cuda_engine`` on the file's bytes.  The runtime's
``engine_host_code_allowed`` stays False (TensorRT's default), so an engine carrying host code (a
version-compatible engine's embedded lean runtime) is refused: loading runs no code from the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .onnx_export import META_KEY
from .runtime import draw_stage_noise
from .trace import STAGE_NOISE

__all__ = ["build_engine", "load_trt", "TrtPlan", "tensorrt_or_error"]

WORKSPACE_BYTES = 8 << 30  # the builder's scratch memory limit


def tensorrt_or_error():
    """The ``tensorrt`` module, or an ImportError saying in one line what is missing."""
    try:
        import tensorrt
    except ImportError as e:
        raise ImportError("TensorRT is not installed (pip install 'fewstep[trt]' on a machine with an NVIDIA "
                          "GPU and a matching CUDA); the ONNX file works without it") from e
    return tensorrt


def _plan_info(onnx_path: Path) -> dict:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}.get(META_KEY)
    if meta is None:
        raise ValueError(f"{onnx_path}: no {META_KEY!r} metadata: not a plan exported by fewstep")
    return json.loads(meta)


def build_engine(onnx_path, engine_path, *, workspace_bytes: int = WORKSPACE_BYTES) -> Path:
    """Build a serialized TensorRT engine for the exported plan at ``onnx_path`` and write it to
    ``engine_path`` (nothing is written on failure); precision as the module docstring says."""
    trt = tensorrt_or_error()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    info = _plan_info(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = info.get("quant") is not None
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if not strongly_typed:
        flag = {"float16": "FP16", "bfloat16": "BF16"}.get(info.get("dtype"))
        if flag is not None:
            config.set_flag(getattr(trt.BuilderFlag, flag))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    tmp = engine_path.with_name(engine_path.name + ".partial")
    try:
        tmp.write_bytes(bytes(serialized))
        os.replace(tmp, engine_path)
    finally:
        tmp.unlink(missing_ok=True)
    return engine_path


_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "INT8": torch.int8, "BOOL": torch.bool}


class TrtPlan:
    """A TensorRT engine of an exported plan, called like the plan: ``(noise, seed=None, stage_noise=None,
    **cond) -> sample`` on CUDA.  Inputs are checked against the engine's named I/O tensors."""

    def __init__(self, path, *, device: torch.device | str = "cuda"):
        trt = tensorrt_or_error()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        self.device = torch.device(device)
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)  # engine_host_code_allowed stays False: no code from the file
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ValueError(f"{path}: TensorRT cannot deserialize it (another TensorRT version or GPU, or "
                             f"not an engine)")
        self.context = self.engine.create_execution_context()
        self.inputs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        outputs = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = _TRT_TO_TORCH.get(self.engine.get_tensor_dtype(name).name)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = (shape, dtype)
            else:
                outputs.append((name, shape, dtype))
        if "noise" not in self.inputs or [o[0] for o in outputs] != ["sample"]:
            raise ValueError(f"{path}: expected inputs with 'noise' and one output 'sample', got inputs "
                             f"{sorted(self.inputs)} and outputs {[o[0] for o in outputs]}")
        self.shape = self.inputs["noise"][0]
        self.noisy_stages = self.inputs[STAGE_NOISE][0][0] if STAGE_NOISE in self.inputs else 0
        self.cond = {k: v for k, v in self.inputs.items() if k not in ("noise", STAGE_NOISE)}
        self._out = torch.empty(outputs[0][1], dtype=outputs[0][2], device=self.device)

    def __call__(self, noise: torch.Tensor, *, seed: int | None = None, generator=None, stage_noise=None,
                 **cond: Any) -> torch.Tensor:
        missing, extra = sorted(set(self.cond) - set(cond)), sorted(set(cond) - set(self.cond))
        if missing or extra:
            raise ValueError(f"conditioning: the engine takes {sorted(self.cond)}, got {sorted(cond)} "
                             f"(missing {missing}, unexpected {extra})")
        feeds = {"noise": noise, **cond}
        if self.noisy_stages:
            feeds[STAGE_NOISE] = (stage_noise if stage_noise is not None
                                  else draw_stage_noise(self.noisy_stages, self.shape, seed, generator))
        keep = []
        for name, (shape, dtype) in self.inputs.items():
            v = feeds[name]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{name}: expected shape {shape}, got {got}")
            v = v.to(self.device, dtype if dtype is not None else v.dtype).contiguous()
            keep.append(v)
            self.context.set_tensor_address(name, v.data_ptr())
        self.context.set_tensor_address("sample", self._out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see its log)")
        return self._out.clone()


def load_trt(path, *, device: torch.device | str = "cuda") -> TrtPlan:
    """A serialized engine from ``fewstep export --trt`` (:func:`build_engine`), called like the plan.
    UNVERIFIED on real TensorRT (see the module docstring)."""
    return TrtPlan(path, device=device)
