"""Plan -> one ONNX file: the whole sampler as a straight-line graph (``Plan.export_onnx``).

Inputs: ``noise`` (the plan's shape, float32), the plan's conditioning tensors under their keyword names
(their shapes and dtypes), and for stochastic solvers ``stage_noise`` (``(noisy stages, *shape)`` float32,
the standard-normal noise each noisy stage adds, in stage order: nothing random happens in the graph).
Output: ``sample`` (float32).  Every shape is static.  The file's ``metadata_props["fewstep.plan"]`` is a
JSON document describing the plan (format, solver, shapes, dtypes, inputs, quantization);
:func:`fewstep.export.load_onnx` checks it against the graph.

How: the network is traced once, one call with the time input as a tensor (:class:`~.trace.NetworkCall`),
then :func:`~.graph.sampler_graph` copies its nodes once per call with the solver updates between them, every
copy reading the same initializers: the weights are stored once, and exporting costs one trace whatever the
NFE.  Why the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``): it needs nothing beyond
``onnx`` (the dynamo exporter needs ``onnxscript``, which the ``export`` extra does not install), its
custom-symbolic hook (``autograd.Function.symbolic``) emits the FP8 Q/DQ nodes, and a trace of diffusers'
networks is reliable.

Before writing, :func:`compact` merges identical initializers, turns large constants into shared
initializers (each traced call of a diffusers network creates e.g. its sinusoidal frequency table as
constants) and shortens value names.  Then ``onnx.checker`` and strict shape inference must pass, and the
output's inferred shape must be the plan's.  Files whose tensors exceed 1 GiB keep them in ``<file>.data``
beside the graph (ONNX external data; a protobuf holds at most 2 GB).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..solvers import StepProgram, program_to_dict
from .graph import sampler_graph
from .qdq import int4_initializers, qdq_layers, quant_opset
from .trace import STAGE_NOISE, ExportError, NetworkCall, extra_symbolics, network_module, trace_guard

__all__ = ["export_plan", "export_network", "trace_network", "TracedNetwork", "ExportReport", "DEFAULT_OPSET",
           "OPSETS", "META_KEY", "FORMAT", "VERSION", "compact", "dtype_name"]

DEFAULT_OPSET = 19  # the first with float8 QuantizeLinear / DequantizeLinear
OPSETS = range(17, 22)  # LayerNormalization needs 17; INT4 DequantizeLinear 21
# The TorchScript exporter's newest: a 21 file is traced at 20, then declared 21.  Opset 21 changed only
# GroupNormalization's meaning (which that exporter never emits); its other changes add types (4-bit ones).
_TRACE_MAX_OPSET = 20
META_KEY, FORMAT, VERSION = "fewstep.plan", "fewstep.onnx-plan", 1
_EXTERNAL_BYTES = 1 << 30  # tensors above this total go to <file>.data (a protobuf holds at most 2 GB)
_HOIST_BYTES = 256  # constants at least this large become (shared) initializers


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What :func:`export_plan` wrote."""

    path: Path
    file_bytes: int  # the .onnx file plus its external data file, if any
    network_bytes: int  # the network's parameters and buffers as they are in the plan
    inputs: dict[str, tuple[tuple[int, ...], str]]
    nodes: int
    initializers: int
    qdq_layers: int  # FP8 / INT4 layers exported as QuantizeLinear / DequantizeLinear
    seconds: float

    @property
    def size_ratio(self) -> float:
        """File bytes over the network's own parameter bytes (weights stored once: close to 1)."""
        return self.file_bytes / max(self.network_bytes, 1)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_opset(opset: Any, need: tuple[int, str] | None) -> int:
    """``need``: :func:`~.qdq.quant_opset`'s (lowest opset, why) for a quantized network, or None."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise ValueError(f"opset: expected an int in {OPSETS.start}..{OPSETS.stop - 1}, got {opset!r}")
    if need is not None and opset < need[0]:
        raise ValueError(f"opset {opset}: a quantized plan exports {need[1]}, which need opset >= {need[0]}")
    return opset


def _onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx package: pip install 'fewstep[export]'") from e
    return onnx


@dataclasses.dataclass
class TracedNetwork:
    """One traced network call, ``(x, t, *cond) -> out`` as an ONNX ModelProto (compacted), reusable by
    :func:`export_plan` for every program with the same network input: several solvers or NFEs of one model
    cost one trace.  ``x`` and ``cond``: (shape, dtype name) of the traced inputs."""

    model: Any  # onnx.ModelProto; export_plan works on a copy
    x: tuple[tuple[int, ...], str]
    cond: dict[str, tuple[tuple[int, ...], str]]
    opset: int
    qdq_layers: int


def trace_network(model: Callable[..., torch.Tensor], *, x: torch.Tensor, t: torch.Tensor,
                  cond: Mapping[str, torch.Tensor], opset: int = DEFAULT_OPSET) -> TracedNetwork:
    """Trace one call ``model(x, t, **cond)`` (``x``: the network input, batch ``2 * batch`` with guidance;
    ``t``: ``(x.shape[0],)`` float32) to ONNX; FP8 layers become Q/DQ.  Raises :class:`ExportError` for data-
    dependent control flow or an op torch.onnx cannot convert."""
    onnx = _onnx()
    net = network_module(model)
    opset = _check_opset(opset, quant_opset(net))
    with tempfile.TemporaryDirectory(prefix=".fewstep-trace-") as tmp:
        path = Path(tmp) / "network.onnx"
        with qdq_layers(net) as n_qdq:
            _torch_export(NetworkCall(model, list(cond)), (x, t, *cond.values()), path, ["x", "t", *cond],
                          min(opset, _TRACE_MAX_OPSET))
        m = onnx.load(str(path))
    int4_initializers(m)
    for op in m.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = opset
    compact(m)
    cond_spec = {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in cond.items()}
    return TracedNetwork(model=m, x=(tuple(x.shape), dtype_name(x.dtype)), cond=cond_spec, opset=opset,
                         qdq_layers=n_qdq)


def export_plan(model: Callable[..., torch.Tensor], program: StepProgram, path, *, shape: Sequence[int],
                dtype: torch.dtype, device: torch.device, cond: Mapping[str, torch.Tensor],
                opset: int = DEFAULT_OPSET, quant: Any = None, description: str | None = None,
                network: TracedNetwork | None = None) -> ExportReport:
    """Write ``program`` on ``model`` (a plan's network, ``shape``, ``dtype``, example ``cond``) as one ONNX
    file at ``path`` (``Plan.export_onnx`` passes its own).  network: a :func:`trace_network` of ``model``
    for this shape, guidance and conditioning (default: traced here).  Nothing is left at ``path`` after an
    error."""
    onnx = _onnx()
    path = Path(path)
    net = network_module(model)
    mode = None if quant is None else getattr(quant, "mode", str(quant))
    opset = _check_opset(opset, quant_opset(net, mode))
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: directory {path.parent} does not exist")
    t0 = time.perf_counter()
    shape = tuple(shape)
    halves = 2 if program.guidance_scale is not None else 1
    x_shape = (halves * shape[0], *shape[1:])
    cond_spec = {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in cond.items()}
    traced_here = network is None
    if network is None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(x_shape, generator=g).to(device=device, dtype=dtype)
        t = torch.full((x_shape[0],), float(program.timesteps[0]), dtype=torch.float32, device=device)
        network = trace_network(model, x=x, t=t, cond=cond, opset=opset)
    elif (network.x, network.cond, network.opset) != ((x_shape, dtype_name(dtype)), cond_spec, opset):
        raise ValueError(f"network: traced for x {network.x}, cond {network.cond}, opset {network.opset}; "
                         f"this plan needs x {(x_shape, dtype_name(dtype))}, cond {cond_spec}, opset {opset}")
    if traced_here:  # nobody else holds it: no copy (a DiT-XL/2 graph carries 2.7 GB of fp32 weights)
        m = network.model
    else:
        m = onnx.ModelProto()
        m.CopyFrom(network.model)
    tmp = Path(tempfile.mkdtemp(prefix=".fewstep-export-", dir=path.parent))
    try:
        noisy = sampler_graph(onnx, m, program, shape=shape, x_dtype=dtype_name(dtype), cond=cond_spec)
        inputs = {"noise": (shape, "float32"), **cond_spec}
        if noisy:
            inputs[STAGE_NOISE] = ((noisy, *shape), "float32")
        doc = {"format": FORMAT, "version": VERSION, "fewstep": _version(), "solver": program.solver,
               "nfe": program.nfe, "guidance_scale": program.guidance_scale, "shape": list(shape),
               "dtype": dtype_name(dtype), "noisy_stages": noisy, "output": "sample",
               "inputs": {n: {"shape": list(s), "dtype": d} for n, (s, d) in inputs.items()},
               "quant": None if quant is None else getattr(quant, "mode", str(quant)),
               "model": type(net if net is not None else model).__name__,
               "program": program_to_dict(program)}
        m.producer_name, m.producer_version = "fewstep", _version()
        m.doc_string = description or (f"fewstep plan: {program.solver}, NFE {program.nfe}, guidance "
                                       f"{program.guidance_scale}, shape {shape}, {dtype_name(dtype)}")
        del m.metadata_props[:]
        m.metadata_props.add(key=META_KEY, value=json.dumps(doc))
        out = tmp / path.name
        _save(onnx, m, out)
        del m
        _check_file(onnx, out, shape)
        data = out.with_name(out.name + ".data")
        if data.exists():
            os.replace(data, path.with_name(path.name + ".data"))
        os.replace(out, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats = onnx.load(str(path), load_external_data=False).graph
    data = path.with_name(path.name + ".data")
    size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    return ExportReport(path=path, file_bytes=size, network_bytes=_module_bytes(net), inputs=inputs,
                        nodes=len(stats.node), initializers=len(stats.initializer),
                        qdq_layers=network.qdq_layers, seconds=time.perf_counter() - t0)


def export_network(model: Callable[..., torch.Tensor], path, *, x: torch.Tensor, t: torch.Tensor,
                   cond: Mapping[str, torch.Tensor], opset: int = DEFAULT_OPSET) -> int:
    """The network alone, one call ``model(x, t, **cond)`` (inputs ``x``, ``t``, the cond names; output
    ``out``), as ONNX: what other engines export, the baseline of the whole-plan file.  Returns its bytes."""
    path = Path(path)
    _save(_onnx(), trace_network(model, x=x, t=t, cond=cond, opset=opset).model, path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _torch_export(module: torch.nn.Module, args: tuple, path: Path, names: list[str], opset: int,
                  output: str = "out") -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings flag every tensor -> Python conversion, shape arithmetic included; trace_guard
        # raises on the ones that depend on input values.  The exporter's own deprecation notice is not ours.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*dynamo=False.*")
        # torch.onnx.export ends by setting every submodule to the wrapper's mode: a fresh wrapper is in
        # training mode, which would leave the plan's network in training mode (dropout, label dropout)
        modes = [(m, m.training) for m in module.modules()]
        module.eval()
        # The exporter prints its whole IR graph (megabytes for an unrolled plan) to stderr on any conversion
        # error: its setup_onnx_logging tests the function _jit_is_onnx_log_enabled for truth, so logging is
        # always on (torch 2.13, torch/onnx/_internal/torchscript_exporter/utils.py).  Our error says what
        # failed; the dump is dropped.
        log, torch._C._jit_onnx_log = torch._C._jit_onnx_log, lambda *a: None
        try:
            with trace_guard(names), extra_symbolics(opset):
                torch.onnx.export(module, args, str(path), input_names=names, output_names=[output],
                                  opset_version=opset, dynamo=False, do_constant_folding=True)
        except ExportError:
            raise
        except Exception as e:  # an op torch.onnx cannot convert names itself; keep its words
            msg = " ".join(str(e).split())
            raise ExportError(f"torch.onnx (opset {opset}) could not convert the network: "
                              f"{type(e).__name__}: {msg[:1500]}") from e
        finally:
            torch._C._jit_onnx_log = log
            for m, training in modes:
                m.training = training


def compact(model) -> None:
    """Merge identical initializers, turn constants of at least 256 bytes into shared initializers, and give
    intermediate values and nodes short names; graph inputs, outputs and initializers keep theirs."""
    from onnx import numpy_helper

    graph = model.graph
    rename: dict[str, str] = {}
    by_key: dict[tuple, str] = {}
    keep = []
    for init in graph.initializer:
        key = _tensor_key(init, numpy_helper)
        if key is not None and key in by_key:
            rename[init.name] = by_key[key]
            continue
        if key is not None:
            by_key[key] = init.name
        keep.append(init)
    nodes = []
    for node in graph.node:
        t = _constant_tensor(node)
        if t is not None and _tensor_bytes(t) >= _HOIST_BYTES:
            key = _tensor_key(t, numpy_helper)
            if key in by_key:
                rename[node.output[0]] = by_key[key]
            else:
                t.name = node.output[0]
                by_key[key] = t.name
                keep.append(t)
            continue
        nodes.append(node)
    fixed = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in keep}
    count = 0
    for node in nodes:
        for name in node.output:
            if name and name not in fixed and name not in rename:
                rename[name] = f"v{count}"
                count += 1
    for i, node in enumerate(nodes):
        node.name = f"n{i}"
        _rename_inputs(node, rename)
        for j, name in enumerate(node.output):
            if name in rename:
                node.output[j] = rename[name]
    del graph.value_info[:]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _rename_inputs(node, rename: Mapping[str, str]) -> None:
    for j, name in enumerate(node.input):
        if name in rename:
            node.input[j] = rename[name]
    for attr in node.attribute:  # subgraphs (If / Loop) may read outer values
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for n in sub.node:
                _rename_inputs(n, rename)


def _constant_tensor(node):
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for a in node.attribute:
        if a.name == "value" and a.HasField("t"):
            t = type(a.t)()
            t.CopyFrom(a.t)
            return t
    return None


def _tensor_bytes(t) -> int:
    if t.raw_data:
        return len(t.raw_data)
    return t.ByteSize()


def _tensor_key(t, numpy_helper) -> tuple | None:
    if t.data_location == t.EXTERNAL:
        return None
    data = t.raw_data if t.raw_data else numpy_helper.to_array(t).tobytes()
    return t.data_type, tuple(t.dims), hashlib.sha256(data).digest()


def _save(onnx, m, path: Path) -> None:
    total = sum(_tensor_bytes(t) for t in m.graph.initializer)
    if total > _EXTERNAL_BYTES:
        onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(m, str(path))


def _check_file(onnx, path: Path, shape: tuple[int, ...]) -> None:
    """onnx.checker and strict shape inference on the written file; the output's shape must be ``shape``."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
        inferred = path.with_name(path.name + ".inferred")
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
        g = onnx.load(str(inferred), load_external_data=False).graph
        inferred.unlink()
    except Exception as e:
        raise ExportError(f"the exported graph fails onnx's checks: {type(e).__name__}: "
                          f"{' '.join(str(e).split())[:1500]}") from e
    dims = tuple(d.dim_value if d.HasField("dim_value") else None
                 for d in g.output[0].type.tensor_type.shape.dim)
    if dims != tuple(shape):
        raise ExportError(f"the exported graph's output has shape {dims} after shape inference, expected the "
                          f"plan's {tuple(shape)}")


def _module_bytes(net) -> int:
    if net is None:
        return 0
    seen, total = set(), 0
    for t in list(net.parameters()) + list(net.buffers()):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _version() -> str:
    from .. import __version__

    return __version__
