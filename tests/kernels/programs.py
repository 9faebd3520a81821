"""Programs for kernel / engine tests: every registered solver, plus two local ones that exercise history
registers and noise whatever solvers are registered at the moment."""

from __future__ import annotations

import math

import torch

import fewstep as fs
from fewstep.solvers import ProgramBuilder, Spacing, make_grid
from fewstep.solvers._math import first_order

VP = fs.ModelSpec(fs.schedules.DiscreteVP())
FLOW = fs.ModelSpec(fs.schedules.Flow(shift=3.0), "flow", "t")


def local_multistep(spec, n, guidance_scale=None):
    """A 2-step Adams-Bashforth-style sampler on x0 (uses a history register)."""
    b = ProgramBuilder("test_ab2", spec, guidance_scale)
    pts = make_grid(spec, Spacing("linspace"), n).points
    x, prev = b.start(1.0), None
    for i in range(n):
        out, kept = b.call(x, pts[i], keep=[x] + ([prev] if prev is not None else []))
        x = kept[0]
        d = out.x0 if prev is None else 1.5 * out.x0 - 0.5 * kept[1]
        x, prev = first_order(x, d, pts[i], pts[i + 1]), out.x0
    return b.finish(x)


def local_ancestral(spec, n, guidance_scale=None, eta=0.5):
    """A DDIM(eta)-style sampler: fresh noise at every step but the last."""
    b = ProgramBuilder("test_ancestral", spec, guidance_scale)
    pts = make_grid(spec, Spacing("linspace"), n).points
    x = b.start(1.0)
    for i in range(n):
        out, (x,) = b.call(x, pts[i], keep=[x])
        q = pts[i + 1]
        if q.sigma > 0:
            x = q.alpha * out.x0 + q.sigma * (math.sqrt(1 - eta * eta) * out.eps + eta * b.noise())
        else:
            x = out.x0
    return b.finish(x)


def registered(name, guidance_scale=None):
    """``name`` built for the first spec / nfe it accepts (solvers differ in schedule and nfe support)."""
    last = None
    for spec in (VP, FLOW):
        for nfe in (4, 5, 3, 6):
            try:
                return fs.solvers.build(name, spec, nfe, guidance_scale=guidance_scale)
            except ValueError as e:
                last = e
    raise ValueError(f"{name}: no test configuration builds ({last})")


def all_programs(guidance_scale=None):
    """``[(id, program)]``: every registered solver and the local ones."""
    progs = [("local_ab2", local_multistep(VP, 4, guidance_scale)),
             ("local_ancestral", local_ancestral(VP, 4, guidance_scale))]
    for name in fs.solvers.available():
        progs.append((name, registered(name, guidance_scale)))
    return progs


def program_ids():
    return ["local_ab2", "local_ancestral"] + fs.solvers.available()


def get_program(name, guidance_scale=None):
    if name == "local_ab2":
        return local_multistep(VP, 4, guidance_scale)
    if name == "local_ancestral":
        return local_ancestral(VP, 4, guidance_scale)
    return registered(name, guidance_scale)


def toy_net(x: torch.Tensor, t: float) -> torch.Tensor:
    """Smooth, nonlinear, mixes neighbours; halves differ under guidance (2B batch)."""
    s = float(t) / 1000.0
    out = 0.7 * torch.tanh(x * (0.5 + s)) + 0.2 * math.cos(3 * s) * torch.roll(x, 1, dims=-1) + 0.1 * s * x
    return out


def guided_toy_net(x: torch.Tensor, t: float) -> torch.Tensor:
    out = toy_net(x, t)
    half = x.shape[0] // 2
    out[half:] = out[half:] + 0.3 * torch.sin(x[half:])
    return out
