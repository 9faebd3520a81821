"""The IR: a sampler as a list of stages, each a small linear map over a register file.

A solver is written once, as ordinary-looking sampler code over symbolic vectors (:class:`Lin`: a linear
combination of registers with float64 coefficients).  :class:`ProgramBuilder` records it:

* ``x = b.start(scale)`` -- the prologue; the user's noise sits in register ``x``.
* ``out, kept = b.call(x_eval, point, keep=[...])`` -- ends the current stage: the network input
  ``net_in = x_eval`` is written, every value in ``keep`` is placed in a register (values already sitting in a
  register stay where they are: history rotates by pointer, never by copy), and the network is called at
  ``point``.  It returns the converted output (``out.x0``, ``out.eps``) and the kept values, all as Lins over
  the new stage's inputs.
* ``z = b.noise()`` -- fresh N(0, 1) noise for the current stage.
* ``b.finish(x_final)`` -- writes the sample to register ``x`` and returns the :class:`StepProgram`.

A stage's inputs are ``O_u`` / ``O_c`` (raw network output halves; ``O_c`` alone without guidance), the
registers ``x``, ``h0 .. h{K-1}``, and ``z``.  Its outputs are register writes and ``net_in``.  Guidance
(``O_u + w (O_c - O_u)``), the conversion from the network's parameterization, corrector and predictor are all
folded into one float64 matrix per stage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .schedules import Point
from .spec import ModelSpec

__all__ = ["Lin", "Call", "Stage", "StepProgram", "ProgramBuilder", "NetOutput"]

NET_IN = "net_in"
INPUT_ORDER = ("O_u", "O_c", "x")  # then h0.., then z


class Lin:
    """An immutable linear combination of named registers (float64 coefficients)."""

    __slots__ = ("terms",)

    def __init__(self, terms: Mapping[str, float] | None = None):
        self.terms = {k: float(v) for k, v in (terms or {}).items() if v != 0.0}

    @classmethod
    def _of(cls, terms: dict[str, float]) -> "Lin":
        """A Lin holding ``terms`` as they are (float coefficients, zeros dropped): the arithmetic below makes
        thousands of these per program, and the checks of ``__init__`` would double its cost."""
        out = cls.__new__(cls)
        out.terms = terms
        return out

    def __add__(self, other: "Lin") -> "Lin":
        if not isinstance(other, Lin):
            return NotImplemented
        t = dict(self.terms)
        for k, v in other.terms.items():
            s = t.get(k, 0.0) + v
            if s == 0.0:
                t.pop(k, None)
            else:
                t[k] = s
        return Lin._of(t)

    def __sub__(self, other: "Lin") -> "Lin":
        if not isinstance(other, Lin):
            return NotImplemented
        return self + (-1.0) * other

    def __mul__(self, c: float) -> "Lin":
        if isinstance(c, Lin):
            raise TypeError("a solver update must stay linear in the registers: Lin * Lin is not allowed")
        c = float(c)
        return Lin._of({k: p for k, v in self.terms.items() if (p := v * c) != 0.0})

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "Lin":
        return self * (1.0 / float(c))

    def __neg__(self) -> "Lin":
        return self * -1.0

    def coef(self, name: str) -> float:
        return self.terms.get(name, 0.0)

    def is_register(self) -> str | None:
        """The register name if this value is exactly one register, else None."""
        if len(self.terms) == 1:
            ((k, v),) = self.terms.items()
            if v == 1.0 and k not in ("O_u", "O_c", "z"):
                return k
        return None

    def __repr__(self) -> str:
        return "Lin(" + " + ".join(f"{v:.6g}*{k}" for k, v in self.terms.items()) + ")"


def lin_sum(terms: Iterable[Lin]) -> Lin:
    out = Lin()
    for t in terms:
        out = out + t
    return out


@dataclass(frozen=True)
class Call:
    """A network evaluation: at ``point`` (alpha, sigma), the network receives ``time``."""

    point: Point
    time: float


@dataclass(frozen=True)
class Stage:
    """One update kernel: ``outputs = matrix @ inputs``, after the network call ``call`` (None: prologue)."""

    call: Call | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    matrix: np.ndarray
    noise: bool
    info: Mapping[str, Any] = field(default_factory=dict)

    def coef(self, out: str, inp: str) -> float:
        if out not in self.outputs or inp not in self.inputs:
            return 0.0
        return float(self.matrix[self.outputs.index(out), self.inputs.index(inp)])

    def rows(self) -> dict[str, dict[str, float]]:
        """``{output: {input: coefficient}}`` with zeros left out."""
        return {
            o: {i: float(c) for i, c in zip(self.inputs, self.matrix[r]) if c != 0.0}
            for r, o in enumerate(self.outputs)
        }


@dataclass(frozen=True)
class StepProgram:
    """A whole sampler as stages; see the module docstring.  Build with :func:`fewstep.solvers.build`."""

    solver: str
    spec: ModelSpec
    stages: tuple[Stage, ...]
    registers: tuple[str, ...]
    guidance_scale: float | None
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def nfe(self) -> int:
        """Number of network calls."""
        return sum(1 for s in self.stages if s.call is not None)

    @property
    def calls(self) -> tuple[Call, ...]:
        return tuple(s.call for s in self.stages if s.call is not None)

    @property
    def timesteps(self) -> tuple[float, ...]:
        """The network's time input for each call, in order."""
        return tuple(c.time for c in self.calls)

    @property
    def sigmas(self) -> tuple[float, ...]:
        """The k-diffusion sigma (sigma / alpha) of each call."""
        return tuple(c.point.sigma_tilde for c in self.calls)

    @property
    def stochastic(self) -> bool:
        return any(s.noise for s in self.stages)

    @property
    def history_size(self) -> int:
        return sum(1 for r in self.registers if r.startswith("h"))

    def describe(self) -> str:
        """A human-readable table of every stage: time input, sigma, order and coefficients."""
        g = "off" if self.guidance_scale is None else f"{self.guidance_scale:g}"
        lines = [
            f"{self.solver}: nfe={self.nfe}, {self.spec.describe()}, guidance={g}, "
            f"registers={list(self.registers)}, stochastic={self.stochastic}"
        ]
        for i, st in enumerate(self.stages):
            head = (
                "prologue"
                if st.call is None
                else (
                    f"call {sum(1 for s in self.stages[: i + 1] if s.call) - 1}: t_in={st.call.time:.6g} "
                    f"sigma={st.call.point.sigma_tilde:.6g}"
                )
            )
            extra = " ".join(f"{k}={v}" for k, v in st.info.items())
            lines.append(f"  stage {i}: {head}{' noise' if st.noise else ''} {extra}".rstrip())
            for o, row in st.rows().items():
                lines.append(f"    {o:>6} = " + " + ".join(f"{c:+.8g}*{k}" for k, c in row.items()))
        return "\n".join(lines)


@dataclass(frozen=True)
class NetOutput:
    """A network call's output converted to the quantities solvers use, as Lins over stage inputs."""

    x0: Lin
    eps: Lin
    raw: Lin
    x: Lin  # the point the network was evaluated at, in the new stage's registers
    point: Point


class ProgramBuilder:
    """Records a solver written over :class:`Lin` values into a :class:`StepProgram`."""

    def __init__(self, solver: str, spec: ModelSpec, guidance_scale: float | None = None, **options: Any):
        self.solver, self.spec, self.guidance_scale, self.options = solver, spec, guidance_scale, options
        self._stages: list[Stage] = []
        self._call: Call | None = None
        self._noise = False
        self._info: dict[str, Any] = {}
        self._live: set[str] = set()  # registers holding values at the start of the current stage
        self._regs: set[str] = {"x"}
        self._started = False

    # -- solver-facing API ---------------------------------------------------------------------------
    def start(self, scale: float = 1.0) -> Lin:
        """The prologue: the user's standard-normal noise is in ``x``; returns ``scale * noise``."""
        if self._started:
            raise RuntimeError("ProgramBuilder.start() called twice")
        self._started = True
        self._live = {"x"}
        return Lin({"x": scale})

    def noise(self) -> Lin:
        """Fresh standard-normal noise for the current stage (one draw per stage)."""
        if self._noise:
            raise RuntimeError(f"{self.solver}: a stage can draw noise only once")
        self._noise = True
        return Lin({"z": 1.0})

    def annotate(self, **info: Any) -> None:
        """Attach information (order, step index...) to the current stage for ``describe()``."""
        self._info.update(info)

    def call(self, x_eval: Lin, point: Point, keep: Sequence[Lin] = ()) -> tuple[NetOutput, list[Lin]]:
        """End the stage: evaluate the network at ``x_eval`` (which sits on ``point``), keeping ``keep``."""
        values = list(keep) + [x_eval]
        new_vals, writes = self._place(values)
        writes[NET_IN] = x_eval
        self._emit(writes)
        self._call = Call(point, float(self.spec.model_time(point)))
        x_new = new_vals[-1]
        g = self._guided_output()
        cx, co = self.spec.x0_coeffs(point)
        ex, eo = self.spec.eps_coeffs(point)
        out = NetOutput(x0=cx * x_new + co * g, eps=ex * x_new + eo * g, raw=g, x=x_new, point=point)
        return out, new_vals[:-1]

    def finish(self, x: Lin) -> "StepProgram":
        """Write the final sample to register ``x`` and return the program."""
        if self._call is None:
            raise RuntimeError(f"{self.solver}: finish() before any network call")
        self._emit({} if x.is_register() == "x" else {"x": x})
        regs = ("x",) + tuple(sorted((r for r in self._regs if r != "x"), key=lambda r: int(r[1:])))
        prog = StepProgram(
            self.solver, self.spec, tuple(self._stages), regs, self.guidance_scale, dict(self.options)
        )
        _check_finite(prog)
        return prog

    # -- internals -----------------------------------------------------------------------------------
    def _guided_output(self) -> Lin:
        w = self.guidance_scale
        if w is None:
            return Lin({"O_c": 1.0})
        return Lin({"O_u": 1.0 - w, "O_c": w})

    def _place(self, values: list[Lin]) -> tuple[list[Lin], dict[str, Lin]]:
        """Put each value in a register; returns the values over the new registers and the writes."""
        new: list[Lin | None] = [None] * len(values)
        claimed: dict[str, Lin] = {}
        basis_old: list[Lin] = []
        basis_new: list[Lin] = []
        writes: dict[str, Lin] = {}
        for i, v in enumerate(values):  # values already in a live register stay there
            r = v.is_register()
            if r is not None and r in self._live:
                new[i] = Lin({r: 1.0})
                if r not in claimed:
                    claimed[r] = v
                    basis_old.append(v)
                    basis_new.append(new[i])
        for i, v in enumerate(values):
            if new[i] is not None:
                continue
            combo = _express(v, basis_old)
            if combo is not None:
                new[i] = lin_sum(c * b for c, b in zip(combo, basis_new) if c != 0.0)
                continue
            r = self._free_register(claimed, prefer_x=(i == 0))
            claimed[r] = v
            writes[r] = v
            new[i] = Lin({r: 1.0})
            basis_old.append(v)
            basis_new.append(new[i])
        self._live = set(claimed)
        return new, writes  # type: ignore[return-value]

    def _free_register(self, claimed: Mapping[str, Lin], prefer_x: bool) -> str:
        if prefer_x and "x" not in claimed:
            return "x"
        k = 0
        while f"h{k}" in claimed:
            k += 1
        r = f"h{k}"
        self._regs.add(r)
        return r

    def _emit(self, writes: Mapping[str, Lin]) -> None:
        outs = sorted((o for o in writes if o != NET_IN), key=_reg_key) + (
            [NET_IN] if NET_IN in writes else []
        )
        used = set()
        for o in outs:
            used.update(writes[o].terms)
        ins = tuple(sorted(used, key=_input_key))
        m = np.zeros((len(outs), len(ins)), dtype=np.float64)
        for r, o in enumerate(outs):
            for k, v in writes[o].terms.items():
                m[r, ins.index(k)] = v
        m.setflags(write=False)
        self._stages.append(Stage(self._call, ins, tuple(outs), m, self._noise, dict(self._info)))
        self._noise = False
        self._info = {}


def _reg_key(r: str) -> tuple[int, int]:
    return (0, 0) if r == "x" else (1, int(r[1:]))


def _input_key(r: str) -> tuple[int, int]:
    if r in INPUT_ORDER:
        return (INPUT_ORDER.index(r), 0)
    if r == "z":
        return (9, 0)
    return (5, int(r[1:]))


def _express(v: Lin, basis: list[Lin]) -> list[float] | None:
    """Coefficients c with v == sum c_i basis_i exactly (to float64 rounding), or None.

    Least squares by modified Gram-Schmidt in plain Python: the systems are a handful of registers, where
    numpy's per-call overhead was most of a 1000-step build.  The residual check decides.
    """
    if not basis:
        return None
    support = set().union(*(b.terms for b in basis))
    if not v.terms.keys() <= support:
        return None
    names = sorted(support)
    y = [v.terms.get(n, 0.0) for n in names]
    qs: list[tuple[int, list[float]]] = []  # (column, orthonormal vector)
    r: dict[tuple[int, int], float] = {}
    for j, b in enumerate(basis):
        w = [b.terms.get(n, 0.0) for n in names]
        for i, q in qs:
            r[i, j] = rij = sum(a * c for a, c in zip(q, w))
            w = [a - rij * c for a, c in zip(w, q)]
        norm = math.sqrt(sum(a * a for a in w))
        if norm > 0.0:  # a zero column (a register holding 0) gets coefficient 0
            r[j, j] = norm
            qs.append((j, [a / norm for a in w]))
    c = [0.0] * len(basis)
    for i, q in reversed(qs):  # back substitution: R c = Q^T y
        known = sum(r.get((i, k), 0.0) * c[k] for k in range(i + 1, len(c)))
        c[i] = (sum(a * yy for a, yy in zip(q, y)) - known) / r[i, i]
    scale = max(max(abs(t) for t in y), 1e-300)
    fit = [sum(ck * b.terms.get(n, 0.0) for ck, b in zip(c, basis)) for n in names]
    if max(abs(f - t) for f, t in zip(fit, y)) > 1e-12 * scale:
        return None
    big = max(abs(x) for x in c)
    return [0.0 if abs(x) < 1e-15 * big else x for x in c]


def _check_finite(prog: StepProgram) -> None:
    for i, st in enumerate(prog.stages):
        if not np.all(np.isfinite(st.matrix)):
            bad = [(o, n) for o in st.outputs for n in st.inputs if not math.isfinite(st.coef(o, n))]
            raise ValueError(
                f"{prog.solver}: stage {i} has non-finite coefficients {bad[:4]}; this grid/option "
                f"combination is degenerate (e.g. a zero-SNR endpoint the solver cannot step to)"
            )
