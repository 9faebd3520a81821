"""An exact oracle for solver accuracy: a Gaussian-mixture data distribution with a closed-form denoiser.

For data ``x0 ~ sum_k w_k N(mu_k, diag(v_k))`` and ``x = alpha * x0 + sigma * eps`` the marginal is again a
mixture, ``x | k ~ N(alpha mu_k, diag(alpha^2 v_k + sigma^2))``, so the posterior means ``E[x0 | x]`` and
``E[eps | x]`` are closed-form for every schedule (they only need a
:class:`~fewstep.solvers.schedules.Point`).
From them :meth:`GaussianMixture.output` gives the ideal network's raw output in every parameterization.

The probability-flow ODE has no closed-form solution, so :meth:`GaussianMixture.ode_solve` integrates it with
scipy's DOP853 at tight tolerances.  It works in the rectified-flow coordinates of the path,
``z = x / (alpha + sigma)`` and ``t = sigma / (alpha + sigma)`` (``z = (1 - t) x0 + t eps``, ``dz/dt =
E[eps | z] - E[x0 | z]``), which are bounded from pure noise (t = 1) to clean data (t = 0) for every
schedule, so one integrator serves VP, EDM and flow programs alike.

Typical use (``fewstep accuracy`` and the convergence tests)::

    gmm = GaussianMixture.random(d=4, k=3, seed=0)
    prog = fs.solvers.build("euler", spec, nfe=8)
    x = fs.solvers.run_reference(prog, gmm.program_model_fn(prog), noise)   # noise: (batch, d)
    err = rms(x, gmm.ode_reference(prog, noise))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .program import NET_IN, StepProgram
from .reference import apply_stage
from .schedules import EDM, DiscreteVP, Flow, Point
from .spec import ModelSpec

__all__ = ["GaussianMixture", "end_point", "point_of_time", "rms", "program_error"]


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """``sum_k weights[k] N(means[k], diag(variances[k]))`` in ``d`` dimensions (float64, the last axis of x).

    weights: (K,) positive, normalized here; means: (K, d); variances: (K, d) per-component diagonal, or
    (K,) / a scalar for isotropic components.
    """

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    def __post_init__(self):
        w = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        mu = np.asarray(self.means, dtype=np.float64)
        if mu.ndim != 2 or mu.shape[0] != w.shape[0]:
            raise ValueError(f"means must have shape (K, d) with K = len(weights) = {w.shape[0]}, "
                             f"got {mu.shape}")
        v = np.asarray(self.variances, dtype=np.float64)
        if v.ndim == 0:
            v = np.full(mu.shape, float(v))
        elif v.ndim == 1:
            if v.shape[0] != mu.shape[0]:
                raise ValueError(f"isotropic variances need one per component ({mu.shape[0]}), "
                                 f"got {v.shape[0]}")
            v = np.repeat(v[:, None], mu.shape[1], axis=1)
        if v.shape != mu.shape:
            raise ValueError(f"variances must have shape {mu.shape} (or (K,) / scalar), got {v.shape}")
        if not (np.all(np.isfinite(w)) and np.all(w > 0)):
            raise ValueError(f"weights must be finite and > 0, got {w}")
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(v)) and np.all(v > 0)):
            raise ValueError("means must be finite and variances finite and > 0")
        object.__setattr__(self, "weights", w / w.sum())
        object.__setattr__(self, "means", mu)
        object.__setattr__(self, "variances", v)

    @classmethod
    def random(cls, d: int = 4, k: int = 3, seed: int = 0, spread: float = 1.0,
               var_range: tuple[float, float] = (0.3, 1.0), isotropic: bool = False) -> "GaussianMixture":
        """A random mixture: means ~ N(0, spread^2), variances uniform in ``var_range``, weights in
        [0.5, 1.5]."""
        rng = np.random.default_rng(seed)
        means = spread * rng.standard_normal((k, d))
        shape = (k,) if isotropic else (k, d)
        variances = rng.uniform(var_range[0], var_range[1], size=shape)
        weights = rng.uniform(0.5, 1.5, size=k)
        return cls(weights, means, variances)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def mean(self) -> np.ndarray:
        """The mixture's mean, (d,)."""
        return self.weights @ self.means

    @property
    def covariance(self) -> np.ndarray:
        """The mixture's covariance, (d, d)."""
        dm = self.means - self.mean
        return (np.einsum("k,ki,kj->ij", self.weights, dm, dm)
                + np.diag(self.weights @ self.variances))

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` draws of x0, (n, d) float64, and the component index of each, (n,)."""
        k = torch.multinomial(torch.as_tensor(self.weights), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        mu, v = torch.from_numpy(self.means)[k], torch.from_numpy(self.variances)[k]
        return mu + v.sqrt() * z, k

    # -- the exact posterior ------------------------------------------------------------------------------
    def _per_component(self, x: np.ndarray, alpha: float, sigma: float):
        """Per-component terms for x: (..., d) float64 (numpy: the ODE solve calls this ~1e3 times)."""
        mu, v = self.means, self.variances
        s2 = alpha * alpha * v + sigma * sigma  # (K, d)
        diff = x[..., None, :] - alpha * mu  # (..., K, d)
        loglik = -0.5 * ((diff * diff / s2) + np.log(2 * math.pi * s2)).sum(-1)  # (..., K)
        return s2, diff, np.log(self.weights) + loglik

    def _posterior_np(self, x: np.ndarray, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
        s2, diff, logits = self._per_component(x, alpha, sigma)
        r = np.exp(logits - logits.max(-1, keepdims=True))
        r = (r / r.sum(-1, keepdims=True))[..., None]  # (..., K, 1)
        x0 = (r * (self.means + (alpha * self.variances / s2) * diff)).sum(-2)
        eps = (r * ((sigma / s2) * diff)).sum(-2)
        return x0, eps

    def posterior(self, x: torch.Tensor, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E[x0 | x], E[eps | x])`` for ``x = alpha x0 + sigma eps``; x: (..., d), computed in float64."""
        x0, eps = self._posterior_np(_as_f64(x, self.dim).numpy(), float(alpha), float(sigma))
        return torch.from_numpy(x0), torch.from_numpy(eps)

    def log_density(self, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
        """``log p(x)`` of the noisy marginal at (alpha, sigma); x: (..., d) -> (...)."""
        logits = self._per_component(_as_f64(x, self.dim).numpy(), float(alpha), float(sigma))[-1]
        m = logits.max(-1, keepdims=True)
        return torch.from_numpy((m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0])

    def output(self, x: torch.Tensor, point: Point, prediction: str) -> torch.Tensor:
        """The ideal network's raw output at ``point`` in parameterization ``prediction``: epsilon, sample,
        v_prediction (``alpha eps - sigma x0``) or flow (``eps - x0``, the velocity on a flow path, where
        ``alpha + sigma = 1``)."""
        x0, eps = self.posterior(x, point.alpha, point.sigma)
        if prediction == "epsilon":
            return eps
        if prediction == "sample":
            return x0
        if prediction == "v_prediction":
            return point.alpha * eps - point.sigma * x0
        if prediction == "flow":
            return eps - x0
        raise ValueError(f"unknown prediction {prediction!r}")

    # -- model functions ----------------------------------------------------------------------------------
    def program_model_fn(self, program: StepProgram, *, check_time: bool = True) -> Callable:
        """The exact network for ``program``: the i-th call is answered at ``program.calls[i].point``.

        This is exact whatever model time a solver hands the network (rounded, fractional); with
        ``check_time`` the time actually passed must equal the call's recorded time.  Restarts after the last
        call, so one model_fn serves repeated runs.  Guided programs get the same output for both halves.
        """
        calls = program.calls
        spec = program.spec
        state = {"i": 0}

        def model_fn(x: torch.Tensor, t: float) -> torch.Tensor:
            i = state["i"]
            state["i"] = (i + 1) % len(calls)
            c = calls[i]
            if check_time and not math.isclose(float(t), c.time, rel_tol=1e-9, abs_tol=1e-9):
                raise ValueError(f"call {i}: model time {t} but the program recorded {c.time}")
            return self.output(x, c.point, spec.prediction).to(device=x.device, dtype=x.dtype)

        return model_fn

    def spec_model_fn(self, spec: ModelSpec,
                      time_to_point: Callable[[float], Point] | None = None) -> Callable:
        """A network keyed by its time input alone (for loops we do not build, such as diffusers').

        ``time_to_point`` overrides the map; the default inverts ``spec``: DiscreteVP timesteps interpolate
        sigma linearly (exact at integers; diffusers' Euler convention for fractional ones), a VP sigma input
        or an EDM time is sigma, a flow time is ``t * num_train_timesteps``.
        """
        to_point = time_to_point or (lambda t: point_of_time(spec, t))

        def model_fn(x: torch.Tensor, t: float) -> torch.Tensor:
            return self.output(x, to_point(float(t)), spec.prediction).to(device=x.device, dtype=x.dtype)

        return model_fn

    # -- the probability-flow ODE -------------------------------------------------------------------------
    def ode_solve(self, x: torch.Tensor, start: Point, end: Point, *, rtol: float = 1e-11,
                  atol: float = 1e-13) -> torch.Tensor:
        """Integrate the probability-flow ODE from ``x`` at ``start`` to ``end`` (DOP853); x: (..., d)."""
        from scipy.integrate import solve_ivp

        x = _as_f64(x, self.dim)
        t0, t1 = _flow_t(start), _flow_t(end)
        if t0 == t1:
            return x.clone()
        shape = x.shape
        z0 = (x / (start.alpha + start.sigma)).reshape(-1).numpy()

        def rhs(t, z):
            x0, eps = self._posterior_np(z.reshape(shape), 1.0 - t, t)
            return (eps - x0).reshape(-1)

        sol = solve_ivp(rhs, (t0, t1), z0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        z1 = torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)
        return z1 * (end.alpha + end.sigma)

    def ode_reference(self, program: StepProgram, noise: torch.Tensor, *, end: Point | None = None,
                      rtol: float = 1e-11, atol: float = 1e-13) -> torch.Tensor:
        """The exact ODE endpoint for ``program`` run from ``noise``: starts where its first network call
        does (the prologue's ``net_in``, e.g. ``sigma_max * noise``) and ends at ``end`` (default: sigma = 0,
        or the schedule's smallest sigma when the program was built with ``final="sigma_min"``)."""
        if program.stages[0].call is not None:
            raise ValueError("program has no prologue stage")
        x_start = apply_stage(program.stages[0], {"x": _as_f64(noise, self.dim)})[NET_IN]
        if end is None:
            end = end_point(program.spec, str(program.options.get("final", "zero")))
        return self.ode_solve(x_start, program.calls[0].point, end, rtol=rtol, atol=atol)


def program_error(gmm: GaussianMixture, program: StepProgram, noise: torch.Tensor,
                  cache: dict | None = None) -> float:
    """RMS error of ``program`` run on the exact network against the exact ODE endpoint, from ``noise``.

    Checks that the program calls the network exactly ``program.nfe`` times.  ``cache`` (a dict) keeps ODE
    references keyed by start point, start scale and end point, so programs sharing them share one solve; only
    pass the same cache with the same ``gmm`` and ``noise``.
    """
    from .reference import count_calls, run_reference

    fn, seen = count_calls(gmm.program_model_fn(program))
    x = run_reference(program, fn, noise)
    if len(seen) != program.nfe:
        raise AssertionError(f"{program.solver}: {len(seen)} network calls, program.nfe={program.nfe}")
    end = end_point(program.spec, str(program.options.get("final", "zero")))
    key = (program.calls[0].point, program.stages[0].rows().get(NET_IN, {}).get("x"), end)
    if cache is None or key not in cache or key[1] is None:
        ref = gmm.ode_reference(program, noise, end=end)
        if cache is not None:
            cache[key] = ref
    else:
        ref = cache[key]
    return rms(x, ref)


def end_point(spec: ModelSpec, final: str = "zero") -> Point:
    """Where a sampler ends: sigma = 0 (``final="zero"``) or the schedule's smallest sigma ("sigma_min")."""
    sched = spec.schedule
    if final == "zero":
        return Point(1.0, 0.0, 0.0)
    if final != "sigma_min":
        raise ValueError(f"final must be 'zero' or 'sigma_min', got {final!r}")
    if isinstance(sched, DiscreteVP):
        return sched.point_at_sigma(sched.sigma_min, 0.0)
    if isinstance(sched, EDM):
        return sched.point_at_sigma(sched.sigma_min)
    return sched.point_at_t(1.0 / sched.num_train_timesteps)


def point_of_time(spec: ModelSpec, t: float) -> Point:
    """The point a network time input stands for under ``spec`` (see ``GaussianMixture.spec_model_fn``)."""
    sched = spec.schedule
    if isinstance(sched, DiscreteVP):
        if spec.time_input == "sigma":
            return sched.point_at_sigma(t, t)
        return sched.point_at_timestep(t)
    if isinstance(sched, EDM):
        return sched.point_at_sigma(t)
    assert isinstance(sched, Flow)
    return sched.point_at_t(t / sched.num_train_timesteps, t)


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference over every element (float64); NaN if either holds a NaN."""
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def _flow_t(p: Point) -> float:
    s = p.alpha + p.sigma
    if not s > 0:
        raise ValueError(f"degenerate point {p}")
    return p.sigma / s


def _as_f64(x: torch.Tensor | Sequence, d: int) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if x.shape[-1:] != (d,):
        raise ValueError(f"the mixture lives in d={d}: x must have shape (..., {d}), got {tuple(x.shape)}")
    return x
