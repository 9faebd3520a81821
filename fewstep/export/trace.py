"""Tracing a plan's network once, for the whole-sampler graph: :class:`NetworkCall` and :func:`trace_guard`.

``NetworkCall(model, cond_names)(x, t, *cond)`` is one call of the plan's network exactly as the plan makes it
(``model(x, t, **cond)``, ``x`` of batch ``2 * batch`` with guidance), with the time input ``t`` as a tensor
argument, so one trace serves every unrolled call (:mod:`fewstep.export.graph` copies it NFE times).  The
network module is registered, so its parameters become the graph's initializers.

:func:`trace_guard` watches the trace for a tensor computed from the *inputs* (``x``, ``t``, the
conditioning) being turned into a Python value (``if x.mean() > 0``, ``int(x.max())``): a trace freezes
whichever branch the example took, so the graph would be silently wrong for other inputs; the guard raises
:class:`ExportError` naming the line and the op instead.  Values computed only from shapes are fine (shapes
are static).
"""

from __future__ import annotations

import linecache
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["NetworkCall", "ExportError", "trace_guard", "network_module", "extra_symbolics", "STAGE_NOISE"]

STAGE_NOISE = "stage_noise"  # the input holding every noisy stage's Gaussian noise, (stages, *shape) fp32


class ExportError(ValueError):
    """A plan that cannot become one static ONNX graph (data-dependent control flow, an unsupported op...)."""


def network_module(model) -> nn.Module | None:
    """The ``nn.Module`` whose parameters ``model`` (a module, an adapter of ``fs.models``, a wrapper with
    ``__wrapped__``) computes with, or None for a plain function."""
    seen = 0
    while model is not None and seen < 16:
        if isinstance(model, nn.Module):
            return model
        for attr in ("model", "module", "network"):
            m = getattr(model, attr, None)
            if isinstance(m, nn.Module):
                return m
        model, seen = getattr(model, "__wrapped__", None), seen + 1
    return None


class NetworkCall(nn.Module):
    """``forward(x, t, *cond) -> model(x, t, **dict(zip(cond_names, cond)))``."""

    def __init__(self, model: Callable[..., torch.Tensor], cond_names: Sequence[str]):
        super().__init__()
        self.net = network_module(model)  # registered: its parameters are the traced graph's initializers
        self._model = model
        self.cond_names = tuple(cond_names)

    def forward(self, x: torch.Tensor, t: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        return self._model(x, t, **dict(zip(self.cond_names, cond)))


# -- the trace guard -----------------------------------------------------------------------------------------
_CONVERSIONS = {"__bool__": "bool", "__int__": "int", "__float__": "float", "__index__": "int",
                "item": "number", "tolist": "list", "__len__": "len"}
# ops whose result depends on the shape of their input only (shapes are static in the exported graph)
_SHAPE_OPS = {"aten::size", "aten::sym_size", "aten::numel", "aten::dim", "prim::shape", "aten::len"}
_FEWSTEP_MODELS = Path(__file__).resolve().parent.parent / "models"


class _Guard(TorchFunctionMode):
    def __init__(self, input_names: Sequence[str]):
        super().__init__()
        self.input_names = list(input_names)
        # graph value -> (user input index, its consumer) or None: the trace only grows, so results stay valid
        self.memo: dict[int, tuple[int, str] | None] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kind = _CONVERSIONS.get(getattr(func, "__name__", ""))
        if kind is not None and args and isinstance(args[0], torch.Tensor) and torch._C._is_tracing():
            self._check(args[0], kind)
        return func(*args, **(kwargs or {}))

    def _check(self, t: torch.Tensor, kind: str) -> None:
        try:
            value = torch._C._get_value_trace(t)
        except RuntimeError:  # a tensor the trace never saw: a constant
            return
        found = self._depends(value)
        if found is None:
            return
        frame = _user_frame()
        if frame is not None and _FEWSTEP_MODELS in Path(frame.f_code.co_filename).resolve().parents:
            return  # fewstep's adapters read input values only to validate them (class label range)
        where = "an unknown place"
        if frame is not None:
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            where = f"{frame.f_code.co_filename}:{frame.f_lineno} ({line!r})"
        what = "branches on" if kind == "bool" else f"reads as a Python {kind}"
        op = value.node().kind()
        raise ExportError(
            f"cannot export the network as one static graph: {where} {what} a tensor computed by {op} from "
            f"the input {self.input_names[found[0]]!r}, i.e. data-dependent control flow; a trace would "
            f"freeze the branch this example took. Rewrite it without Python control flow on tensor values "
            f"(torch.where, masks) or keep this model on the torch plan")

    def _depends(self, value) -> tuple[int, str] | None:
        """(index of a user input, the op that read it) if ``value`` depends on an input's values (not only on
        its shape), else None.  The traced graph's inputs are the call's arguments first, then the module's
        parameters and buffers."""
        memo, n_inputs = self.memo, len(self.input_names)
        stack = [value]
        while stack:
            v = stack[-1]
            u = v.unique()
            if u in memo:
                stack.pop()
                continue
            node = v.node()
            kind = node.kind()
            if kind == "prim::Param":
                memo[u] = (v.offset(), "the input") if v.offset() < n_inputs else None
            elif kind in _SHAPE_OPS:
                memo[u] = None
            else:
                ins = list(node.inputs())
                pending = [i for i in ins if i.unique() not in memo]
                if pending:
                    stack.extend(pending)
                    continue
                hit = [memo[i.unique()] for i in ins if memo[i.unique()] is not None]
                memo[u] = (hit[0][0], kind) if hit else None
            stack.pop()
        return memo[value.unique()]


def _user_frame():
    """The innermost Python frame outside torch and this module (the line that made the conversion)."""
    f = sys._getframe(2)
    torch_dir = str(Path(torch.__file__).resolve().parent)
    while f is not None and (f.f_code.co_filename.startswith(torch_dir) or f.f_code.co_filename == __file__):
        f = f.f_back
    return f


@contextmanager
def trace_guard(input_names: Sequence[str]):
    """Inside the block, a trace that converts an input-dependent tensor to a Python value raises
    :class:`ExportError` naming the line and the op (see the module docstring).  input_names: the traced
    call's arguments, in order."""
    with _Guard(input_names):
        yield


# -- ops the TorchScript exporter lacks ----------------------------------------------------------------------
_EPS = {"Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16, "Double": torch.float64}


def _rms_norm(g, x, normalized_shape, weight, eps):
    """``aten::rms_norm`` (Flux's and SD3.5's QK norms) as ``x / sqrt(mean(x^2) + eps) * weight``: ONNX has
    RMSNormalization only from opset 23, which the TorchScript exporter does not reach."""
    from torch.onnx import symbolic_helper as sh

    dims = sh._get_const(normalized_shape, "is", "normalized_shape")
    e = None if sh._is_none(eps) else sh._get_const(eps, "f", "eps")
    if e is None:  # torch's default: the input dtype's machine epsilon
        e = torch.finfo(_EPS.get(x.type().scalarType(), torch.float32)).eps
    axes = list(range(-len(dims), 0))
    sq = g.op("Mul", x, x)
    if g.opset >= 18:
        axes_c = g.op("Constant", value_t=torch.tensor(axes, dtype=torch.int64))
        ms = g.op("ReduceMean", sq, axes_c, keepdims_i=1)
    else:
        ms = g.op("ReduceMean", sq, axes_i=axes, keepdims_i=1)
    eps_c = g.op("CastLike", g.op("Constant", value_t=torch.tensor(e, dtype=torch.float32)), x)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", ms, eps_c)))
    return y if sh._is_none(weight) else g.op("Mul", y, weight)


_SYMBOLICS = {"aten::rms_norm": _rms_norm}


@contextmanager
def extra_symbolics(opset: int):
    """Register the symbolic functions of :data:`_SYMBOLICS` that torch.onnx has none of at ``opset`` for the
    duration of the block (a symbolic already registered, by torch or the user, is left alone)."""
    from torch.onnx._internal.torchscript_exporter import registration

    added = [name for name in _SYMBOLICS if not registration.registry.is_registered_op(name, opset)]
    for name in added:
        torch.onnx.register_custom_op_symbolic(name, _SYMBOLICS[name], opset)
    try:
        yield
    finally:
        for name in added:
            torch.onnx.unregister_custom_op_symbolic(name, opset)
