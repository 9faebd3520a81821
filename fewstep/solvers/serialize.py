"""StepPrograms as plain JSON data: ``program_to_dict`` / ``program_from_dict``.

A program is data all the way down (float64 matrices, register names, the model spec), so a saved plan or a
tuned solver never needs a pickle.  Floats go through JSON as their shortest round-trip repr, so a loaded
program is bit-identical to the saved one.  Only the types below are ever constructed from a file: the three
schedules, ``ModelSpec``, ``Point``, ``Call``, ``Stage``, ``StepProgram`` and, among option values,
``Spacing``.  Every error is a ``ValueError`` naming the field that is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .program import Call, Stage, StepProgram
from .schedules import EDM, DiscreteVP, Flow, Point
from .spacing import Spacing
from .spec import ModelSpec

__all__ = ["program_to_dict", "program_from_dict"]

_SCHEDULES = {"DiscreteVP": DiscreteVP, "EDM": EDM, "Flow": Flow}
_OPTION_TYPES = {"Spacing": Spacing}


def _encode(value: Any, where: str) -> Any:
    """JSON-able form of an option / info / config value (tuples become lists; Spacing a tagged dict)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, np.generic):
        return _encode(value.item(), where)
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _encode(v, f"{where}.{k}") for k, v in value.items()}
    name = type(value).__name__
    if name in _OPTION_TYPES and isinstance(value, _OPTION_TYPES[name]):
        return {"__type__": name, **{f.name: _encode(getattr(value, f.name), f"{where}.{f.name}")
                                     for f in dataclasses.fields(value)}}
    raise ValueError(f"{where}: cannot store a {name} in a plan file (expected numbers, strings, lists, "
                     f"dicts or a Spacing)")


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        if "__float__" in value:
            text = value["__float__"]
            if text not in ("inf", "-inf", "nan"):
                raise ValueError(f"{where}: expected 'inf', '-inf' or 'nan', got {text!r}")
            return float(text)
        if "__type__" in value:
            name = value["__type__"]
            if name not in _OPTION_TYPES:
                raise ValueError(f"{where}: unknown type {name!r} (known: {sorted(_OPTION_TYPES)})")
            kw = {k: _decode(v, f"{where}.{k}") for k, v in value.items() if k != "__type__"}
            return _construct(_OPTION_TYPES[name], kw, where)
        return {k: _decode(v, f"{where}.{k}") for k, v in value.items()}
    return value


def _construct(cls, kw: Mapping[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}")
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid {cls.__name__}: {e}") from None


def _field(d: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{where}.{key}: field missing")
    v = d[key]
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or (isinstance(v, bool) and kind in (int, float)):
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}.{key}: expected {want}, got {type(v).__name__}")
    return v


# -- spec --------------------------------------------------------------------------------------------------
def _spec_to_dict(spec: ModelSpec) -> dict:
    sched = spec.schedule
    return {
        "schedule": {"type": type(sched).__name__,
                     **{f.name: _encode(getattr(sched, f.name), f"spec.schedule.{f.name}")
                        for f in dataclasses.fields(sched) if f.init}},
        "prediction": spec.prediction,
        "time_input": spec.time_input,
        "diffusers_config": _encode(dict(spec.diffusers_config), "spec.diffusers_config")
        if spec.diffusers_config is not None else None,
    }


def _spec_from_dict(d: Any, where: str) -> ModelSpec:
    sd = dict(_field(d, "schedule", where, dict))
    kind = _field(sd, "type", f"{where}.schedule", str)
    if kind not in _SCHEDULES:
        raise ValueError(f"{where}.schedule.type: expected one of {sorted(_SCHEDULES)}, got {kind!r}")
    sd.pop("type")
    kw = {k: _decode(v, f"{where}.schedule.{k}") for k, v in sd.items()}
    schedule = _construct(_SCHEDULES[kind], kw, f"{where}.schedule")
    cfg = d.get("diffusers_config")
    if cfg is not None and not isinstance(cfg, dict):
        raise ValueError(f"{where}.diffusers_config: expected an object or null, got {type(cfg).__name__}")
    try:
        config = _decode(cfg, f"{where}.diffusers_config") if cfg is not None else None
        return ModelSpec(schedule, prediction=_field(d, "prediction", where, str),
                         time_input=_field(d, "time_input", where, str), diffusers_config=config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid model spec: {e}") from None


# -- program -----------------------------------------------------------------------------------------------
def program_to_dict(program: StepProgram) -> dict:
    """A JSON-able dict holding everything :func:`program_from_dict` needs to rebuild ``program`` exactly."""
    stages = []
    for i, st in enumerate(program.stages):
        call = None
        if st.call is not None:
            p = st.call.point
            call = {"alpha": p.alpha, "sigma": p.sigma, "model_time": p.model_time, "time": st.call.time}
        stages.append({
            "call": call, "inputs": list(st.inputs), "outputs": list(st.outputs),
            "matrix": [[float(c) for c in row] for row in np.asarray(st.matrix, dtype=np.float64)],
            "noise": bool(st.noise), "info": _encode(dict(st.info), f"stages[{i}].info"),
        })
    return {
        "solver": program.solver,
        "spec": _spec_to_dict(program.spec),
        "registers": list(program.registers),
        "guidance_scale": program.guidance_scale,
        "options": _encode(dict(program.options), "options"),
        "stages": stages,
    }


def program_from_dict(d: Any, where: str = "program") -> StepProgram:
    """Rebuild a :class:`StepProgram` from :func:`program_to_dict`'s output, validating every field."""
    registers = tuple(_field(d, "registers", where, list))
    if not all(isinstance(r, str) for r in registers) or "x" not in registers:
        raise ValueError(f"{where}.registers: expected a list of register names including 'x', got "
                         f"{list(registers)}")
    guidance = d.get("guidance_scale") if isinstance(d, dict) else None
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        raise ValueError(f"{where}.guidance_scale: expected a finite number or null, got {guidance!r}")
    allowed_in = set(registers) | {"O_u", "O_c", "z"}
    allowed_out = set(registers) | {"net_in"}
    stages = []
    for i, sd in enumerate(_field(d, "stages", where, list)):
        w = f"{where}.stages[{i}]"
        inputs = tuple(_field(sd, "inputs", w, list))
        outputs = tuple(_field(sd, "outputs", w, list))
        bad = [n for n in inputs if n not in allowed_in] + [n for n in outputs if n not in allowed_out]
        if bad:
            raise ValueError(f"{w}: unknown register(s) {bad} (registers: {list(registers)})")
        rows = _field(sd, "matrix", w, list)
        try:
            matrix = np.array(rows, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{w}.matrix: expected a list of rows of numbers") from None
        if matrix.size == 0:
            matrix = matrix.reshape(len(outputs), len(inputs))
        if matrix.shape != (len(outputs), len(inputs)) or not np.isfinite(matrix).all():
            raise ValueError(f"{w}.matrix: expected {len(outputs)} x {len(inputs)} finite numbers, got "
                             f"shape {matrix.shape}")
        call = sd.get("call")
        if call is not None:
            cw = f"{w}.call"
            point = Point(_field(call, "alpha", cw, float), _field(call, "sigma", cw, float),
                          _field(call, "model_time", cw, float))
            call = Call(point, _field(call, "time", cw, float))
        info = _decode(_field(sd, "info", w, dict), f"{w}.info")
        stages.append(Stage(call, inputs, outputs, matrix, _field(sd, "noise", w, bool), info))
    if not stages or stages[0].call is not None:
        raise ValueError(f"{where}.stages: expected a prologue stage (call null) first")
    return StepProgram(
        solver=_field(d, "solver", where, str),
        spec=_spec_from_dict(_field(d, "spec", where, dict), f"{where}.spec"),
        stages=tuple(stages),
        registers=registers,
        guidance_scale=None if guidance is None else float(guidance),
        options=_decode(_field(d, "options", where, dict), f"{where}.options"),
    )
