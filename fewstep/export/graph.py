"""The whole sampler as one straight-line ONNX graph, assembled from one traced network call.

A :class:`~fewstep.solvers.StepProgram` is static: fixed time inputs, fixed coefficients, fixed shapes.  So
:func:`sampler_graph` writes it out: for each stage, a copy of the network's nodes (``x`` renamed to that
stage's network input, ``t`` to a constant holding the stage's time input; every copy reads the *same*
initializers, so the weights are stored once), then the stage's update as constant-coefficient ``Mul`` /
``Add`` nodes -- the columns, rows and coefficients of :class:`~fewstep.kernels.solver_update.StageUpdate`,
summed left to right in fp32 like :func:`~fewstep.kernels.solver_update.solver_update_ref` (zero
coefficients are skipped).  The network input is cast to the plan's dtype and duplicated into both halves
with guidance; the output's halves are ``O_u`` / ``O_c``.  Noisy stages read ``stage_noise[k]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..kernels.solver_update import StageUpdate
from ..solvers import StepProgram
from .trace import STAGE_NOISE, ExportError

__all__ = ["sampler_graph", "NOISE", "SAMPLE"]

NOISE, SAMPLE = "noise", "sample"


class _Builder:
    def __init__(self, onnx, net):
        self.onnx, self.net = onnx, net
        self.nodes: list = []
        self.inits: list = []
        self._consts: dict[tuple, str] = {}
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def node(self, op: str, inputs: Sequence[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], name=f"{op}_{out}", **attrs))
        return out

    def const(self, array: np.ndarray, hint: str = "k") -> str:
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.name(hint)
            self.inits.append(self.onnx.numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def combine(self, cols: Sequence[str], coefs: Sequence[float], shape) -> str:
        """``sum(c * col)`` over the non-zero coefficients, left to right, fp32."""
        acc = None
        for col, c in zip(cols, coefs):
            if c == 0.0:
                continue
            if c in (1.0, -1.0) and acc is not None:
                acc = self.node("Add" if c == 1.0 else "Sub", [acc, col], "s")
                continue
            term = col if c == 1.0 else self.node("Mul", [col, self.const(np.array(c, np.float32))], "m")
            acc = term if acc is None else self.node("Add", [acc, term], "s")
        if acc is None:  # every coefficient is zero
            acc = self.const(np.zeros(shape, np.float32), "zero")
        return acc

    def call(self, index: int, x: str, t: str) -> str:
        """A copy of the network's nodes reading ``x`` and ``t``; returns its output's name."""
        g = self.net.graph
        shared = {i.name for i in g.initializer} | {i.name for i in g.input} | {""}
        prefix = f"c{index}_"

        def rename(v: str) -> str:
            if v == "x":
                return x
            if v == "t":
                return t
            return v if v in shared else prefix + v

        for n in g.node:
            m = self.onnx.NodeProto()
            m.CopyFrom(n)
            m.name = prefix + n.name
            m.input[:] = [rename(v) for v in n.input]
            m.output[:] = [rename(v) for v in n.output]
            self.nodes.append(m)
        return rename(g.output[0].name)


# dtype names (torch's) -> ONNX element types, for the conditioning inputs
ONNX_TYPES = {"float32": 1, "uint8": 2, "int8": 3, "int16": 5, "int32": 6, "int64": 7, "bool": 9,
              "float16": 10, "float64": 11, "bfloat16": 16}


def sampler_graph(onnx, net, program: StepProgram, *, shape: Sequence[int], x_dtype: str,
                  cond: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
    """Turn ``net``, the traced network (inputs ``x``, ``t`` and the ``cond`` names, those it reads: the
    exporter drops unread ones; one output, the raw prediction), in place into the graph of ``program``:
    inputs ``noise``, every conditioning tensor of ``cond`` (name -> (shape, dtype name)), ``stage_noise`` if
    any stage is noisy; output ``sample``.  The initializers stay where they are (a large network is not
    copied).  x_dtype: the network input's dtype name.  Returns the number of noisy stages."""
    g = net.graph
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in g.node for a in n.attribute):
        raise ExportError("the traced network contains control-flow nodes (If / Loop / Scan); a plan exports "
                          "as a straight-line graph only")
    unknown = [i.name for i in g.input if i.name not in ("x", "t", *cond)]
    if unknown or len(g.output) != 1:
        raise ExportError(f"the traced network has inputs {[i.name for i in g.input]} and outputs "
                          f"{[o.name for o in g.output]}; expected x, t, {list(cond)} and one output")
    bad = {k: d for k, (_, d) in cond.items() if d not in ONNX_TYPES}
    if bad or x_dtype not in ONNX_TYPES:
        raise ExportError(f"conditioning dtypes {bad or {'x': x_dtype}} have no ONNX type here; expected "
                          f"one of {sorted(ONNX_TYPES)}")
    guided = program.guidance_scale is not None
    if not program.registers or program.registers[0] != "x":
        raise ExportError(f"{program.solver}: expected register 0 to be the sample 'x', got registers "
                          f"{list(program.registers)}")
    shape = tuple(shape)
    b, halves = shape[0], 2 if guided else 1
    tp = onnx.TensorProto
    x_type = ONNX_TYPES[x_dtype]
    out_type = g.output[0].type.tensor_type.elem_type
    bld = _Builder(onnx, net)
    regs: dict[int, str] = {0: NOISE}
    net_in, call, noisy = None, 0, 0
    for i, st in enumerate(program.stages):
        upd = StageUpdate.from_stage(st, program.registers, guided, noisy)
        noisy += int(st.noise)
        cols: list[str] = []
        if st.call is not None:
            if net_in is None:
                raise ExportError(f"{program.solver}: stage {i} calls the network before any stage wrote its "
                                  f"input")
            t = bld.const(np.full((halves * b,), program.timesteps[call], np.float32), "t")
            out = bld.call(call, net_in, t)
            call += 1
            if out_type != tp.FLOAT:
                out = bld.node("Cast", [out], "o", to=tp.FLOAT)
            if upd.has_ou:
                cols.append(bld.node("Slice", [out, bld.const(np.array([0])), bld.const(np.array([b])),
                                               bld.const(np.array([0]))], "ou"))
            if upd.has_oc:
                cols.append(out if not guided else bld.node(
                    "Slice", [out, bld.const(np.array([b])), bld.const(np.array([2 * b])),
                              bld.const(np.array([0]))], "oc"))
        for r in upd.reg_in:
            if r not in regs:
                raise ExportError(f"{program.solver}: stage {i} reads register {program.registers[r]!r} "
                                  f"before any stage writes it")
            cols.append(regs[r])
        if upd.has_z:
            cols.append(bld.node("Gather", [STAGE_NOISE, bld.const(np.array(upd.noise_index))], "z", axis=0))
        n = len(cols)
        accs = [bld.combine(cols, upd.coef[o * n:(o + 1) * n], shape) for o in range(upd.n_rows)]
        for r, acc in zip(upd.reg_out, accs):
            regs[r] = acc
        if upd.has_net_in:
            v = accs[-1] if x_type == tp.FLOAT else bld.node("Cast", [accs[-1]], "in", to=x_type)
            net_in = bld.node("Concat", [v, v], "in", axis=0) if guided else v
    bld.nodes.append(onnx.helper.make_node("Identity", [regs[0]], [SAMPLE], name="Identity_sample"))
    del g.input[:], g.output[:], g.node[:], g.value_info[:]
    g.input.append(onnx.helper.make_tensor_value_info(NOISE, tp.FLOAT, shape))
    g.input.extend(onnx.helper.make_tensor_value_info(k, ONNX_TYPES[d], s) for k, (s, d) in cond.items())
    if noisy:
        g.input.append(onnx.helper.make_tensor_value_info(STAGE_NOISE, tp.FLOAT, (noisy, *shape)))
    g.output.append(onnx.helper.make_tensor_value_info(SAMPLE, tp.FLOAT, shape))
    g.node.extend(bld.nodes)
    g.initializer.extend(bld.inits)
    g.name = "fewstep_plan"
    return noisy
