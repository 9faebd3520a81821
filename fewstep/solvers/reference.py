"""Eager reference executor for StepPrograms: the ground truth the fused kernels and plans are tested
against."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .program import NET_IN, StepProgram

__all__ = ["run_reference", "apply_stage"]

ModelFn = Callable[[torch.Tensor, float], torch.Tensor]


def apply_stage(stage, regs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Evaluate one stage: ``{output: sum_i coef * regs[input]}`` (every input read before any write)."""
    out = {}
    for r, name in enumerate(stage.outputs):
        acc = None
        for c, inp in zip(stage.matrix[r], stage.inputs):
            if c == 0.0:
                continue
            term = float(c) * regs[inp]
            acc = term if acc is None else acc + term
        out[name] = acc if acc is not None else torch.zeros_like(regs["x"])
    return out


def run_reference(
    program: StepProgram,
    model_fn: ModelFn,
    noise: torch.Tensor,
    guidance_scale: float | None = None,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    step_noise: Sequence[torch.Tensor] | Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``program`` eagerly with any callable ``model_fn(x, t) -> raw output`` (``t`` a Python float).

    noise: standard-normal starting noise, any shape.  With guidance the network is called once per step on
    ``cat([x, x])`` and must return ``cat([uncond, cond])``.  ``guidance_scale`` may be given to check it
    matches the program's (None: the program's).  Stochastic programs draw ``torch.randn`` from ``generator``,
    or take the i-th noise tensor from ``step_noise`` (a list, or a callable of the stage index) to reproduce
    another implementation's draws.  Computation is in ``dtype`` (float64 by default); returns the sample.
    """
    if guidance_scale is not None and guidance_scale != program.guidance_scale:
        raise ValueError(
            f"guidance_scale={guidance_scale} but the program was built with guidance_scale="
            f"{program.guidance_scale}; build the program with the guidance you want"
        )
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    guided = program.guidance_scale is not None
    x = noise.to(dtype)
    regs: dict[str, torch.Tensor] = {r: torch.zeros_like(x) for r in program.registers}
    regs["x"] = x
    noise_index = 0
    for st in program.stages:
        ins = dict(regs)
        if st.call is not None:
            inp = regs[NET_IN]
            out = model_fn(torch.cat([inp, inp]) if guided else inp, st.call.time)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"model_fn must return a tensor, got {type(out).__name__}")
            out = out.to(dtype)
            if guided:
                if out.shape[0] != 2 * x.shape[0]:
                    raise ValueError(
                        f"with guidance model_fn must return 2x the batch ({2 * x.shape[0]}), "
                        f"got {out.shape[0]}"
                    )
                ins["O_u"], ins["O_c"] = out.chunk(2)
            else:
                ins["O_c"] = out
        if st.noise:
            if step_noise is None:
                z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(dtype)
            elif callable(step_noise):
                z = step_noise(noise_index)
            else:
                z = step_noise[noise_index]
            ins["z"] = z.to(dtype)
            noise_index += 1
        regs.update(apply_stage(st, ins))
    return regs["x"]


def count_calls(model_fn: ModelFn) -> tuple[ModelFn, list[float]]:
    """Wrap ``model_fn`` to record the time of every call (tests compare the count with ``program.nfe``)."""
    seen: list[float] = []

    def wrapped(x, t):
        seen.append(t)
        if not math.isfinite(t):
            raise ValueError(f"non-finite time input {t}")
        return model_fn(x, t)

    return wrapped, seen
