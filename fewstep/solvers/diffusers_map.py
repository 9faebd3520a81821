"""The diffusers mapping: which diffusers scheduler each solver is, in both directions.

* :data:`EQUIVALENTS`: per solver, the diffusers scheduler class, the config that makes it equal to the
  solver with given options and spacing, and the inverse, the options that reproduce a config of that class.
* :func:`resolve`: the spacing and options ``build`` runs with.  When the spec's diffusers config came from
  the solver's own scheduler (``DEISMultistepScheduler().config`` for ``deis``), that config's settings
  (final sigma, order, spacing, ...) are the defaults, so config -> spec -> build reproduces the scheduler.
  Explicit options win; the solver's name fixes its algorithm (``dpmpp_2m`` stays second order on a
  ``solver_order=3`` config).
* :func:`to_diffusers`: the scheduler equivalent to ``build(name, spec, nfe, spacing, **options)`` (parity
  tests, ``fewstep accuracy``), with the same resolution.

Where diffusers is wrong fewstep keeps its fix even for the scheduler's own config: DEIS with karras /
exponential / beta sigmas (a repeated last sigma and a wasted call), bh1 UniPC into sigma = 0 (NaN), the
third-order SDE weight, a zero-length final step at order 3 (NaN).  Not reproduced either: ``clip_sample``,
``thresholding`` and ``clip_denoised``, which clamp x0 and are not linear (fewstep never clamps).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .grids import DDIM_SPACINGS
from .registry import SolverInfo, get
from .spacing import Spacing, as_spacing, valid_spacings
from .spec import ModelSpec

__all__ = ["Equivalent", "EQUIVALENTS", "resolve", "to_diffusers", "diffusers_base_config",
           "spacing_from_diffusers"]


@dataclass(frozen=True)
class Equivalent:
    """A solver's diffusers scheduler.

    config: ``(opts, spacing, spec) -> overrides`` of the base config (:func:`diffusers_base_config`) that
    make the scheduler equal to the solver; ValueError where it cannot be.  An override set to None drops
    that base key (the class has it built in).  options: ``scheduler config -> {option: value}``, the solver
    options that reproduce a config of this class.  spacing: ``config -> Spacing | None`` where the class has
    a grid parameter of its own (CMStochasticIterative's rho).
    """

    scheduler: str
    config: Callable[[Any, Spacing, ModelSpec], dict]
    options: Callable[[Mapping[str, Any]], dict] = field(default=lambda cfg: {})
    spacing: Callable[[Mapping[str, Any]], Spacing | None] = field(default=lambda cfg: None)


def _ends_at_zero(scheduler: str) -> Equivalent:
    """A scheduler with nothing to set but that always ends at sigma = 0."""

    def config(o, sp: Spacing, spec: ModelSpec) -> dict:
        if o.final != "zero":
            raise ValueError(f"{scheduler} always ends at sigma = 0: final must be 'zero'")
        return {}

    return Equivalent(scheduler, config)


# -- DDIM, LCM, TCD, consistency models ----------------------------------------------------------------------
def _ddim(o, sp: Spacing, spec: ModelSpec) -> dict:
    if sp.name not in DDIM_SPACINGS:
        raise ValueError(f"DDIMScheduler has no {sp.name!r} spacing")
    return {"set_alpha_to_one": o.final == "zero", "clip_sample": False}


def _tcd(o, sp: Spacing, spec: ModelSpec) -> dict:
    if o.final != "sigma_min":
        raise ValueError("TCDScheduler's last step lands on timestep 0: final must be 'sigma_min'")
    return {"original_inference_steps": o.original_inference_steps}


def _cm(o, sp: Spacing, spec: ModelSpec) -> dict:
    if o.train_steps is None or o.gamma != 1 or o.final != "sigma_min":
        raise ValueError("cm equals diffusers' CMStochasticIterativeScheduler only with "
                         "train_steps=N, gamma=1 and final='sigma_min'")
    return {"num_train_timesteps": o.train_steps, "rho": sp.rho, "s_noise": o.s_noise, "clip_denoised": False,
            "use_karras_sigmas": None}  # karras is its only grid


def _euler(o, sp: Spacing, spec: ModelSpec) -> dict:
    if o.final == "sigma_min" and spec.schedule.kind == "vp":
        raise ValueError("EulerDiscreteScheduler returns its sample in k-diffusion variables, x / alpha, so "
                         "at final sigma_min it is 1 / alpha_min times fewstep's (the schedule's own x, as "
                         "DPMSolverMultistep's): no exact equivalent")
    return {"final_sigmas_type": o.final}


# -- multistep solvers ---------------------------------------------------------------------------------------
def _dpm_multistep(sde: bool) -> Callable[[Any, Spacing, ModelSpec], dict]:
    def config(o, sp: Spacing, spec: ModelSpec) -> dict:
        if o.taylor_d2 and o.order == 3:
            raise ValueError("taylor_d2 has no diffusers equivalent (diffusers uses the published D2 weight)")
        if sp.name not in ("linspace", "leading", "trailing", "karras", "exponential", "beta", "flow"):
            raise ValueError(f"no DPMSolverMultistepScheduler equivalent for spacing {sp.name!r}")
        return dict(solver_order=o.order, algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++",
                    solver_type=o.solver_type, lower_order_final=o.lower_order_final,
                    euler_at_final=o.euler_at_final, final_sigmas_type=o.final)

    return config


def _dpm_options(cfg: Mapping[str, Any]) -> dict:
    """DPMSolverMultistep / Singlestep settings; the solver's name fixes order and algorithm_type."""
    keys = {"final_sigmas_type": "final", "lower_order_final": "lower_order_final",
            "euler_at_final": "euler_at_final", "solver_type": "solver_type"}
    return {opt: cfg[k] for k, opt in keys.items() if k in cfg}


def _dpm_singlestep(o, sp: Spacing, spec: ModelSpec) -> dict:
    if sp.name not in ("linspace", "karras", "exponential", "beta"):
        raise ValueError(f"DPMSolverSinglestepScheduler has no {sp.name!r} spacing "
                         f"(it supports linspace, karras, exponential, beta)")
    return dict(solver_order=o.order, algorithm_type="dpmsolver++", solver_type=o.solver_type,
                lower_order_final=o.lower_order_final, final_sigmas_type=o.final)


def _unipc(o, sp: Spacing, spec: ModelSpec) -> dict:
    if o.euler_at_final and not o.lower_order_final:
        raise ValueError("UniPCMultistepScheduler has no euler_at_final (it matches with lower_order_final)")
    if sp.name == "flow" and not o.predict_x0:
        raise ValueError("UniPCMultistepScheduler rejects flow_prediction with predict_x0=False")
    disabled = list(o.disable_corrector) if o.corrector else list(range(1000))  # every step of any real run
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"} if sp.name == "flow" else {}
    return {"solver_order": o.order, "solver_type": o.solver_type, "predict_x0": o.predict_x0,
            "lower_order_final": o.lower_order_final, "disable_corrector": disabled,
            "final_sigmas_type": o.final, **flow}


def _unipc_options(cfg: Mapping[str, Any]) -> dict:
    keys = {"solver_order": "order", "solver_type": "solver_type", "predict_x0": "predict_x0",
            "lower_order_final": "lower_order_final", "final_sigmas_type": "final"}
    out = {opt: cfg[k] for k, opt in keys.items() if k in cfg}
    if cfg.get("disable_corrector"):
        out["disable_corrector"] = tuple(cfg["disable_corrector"])
    return out


def _deis(o, sp: Spacing, spec: ModelSpec) -> dict:
    if o.final != "sigma_min":
        raise ValueError("DEISMultistepScheduler always ends at sigma_min: use final='sigma_min' to match it")
    if o.euler_at_final:
        raise ValueError("DEISMultistepScheduler has no euler_at_final")
    if sp.name in ("karras", "exponential", "beta"):
        raise ValueError(
            f"DEISMultistepScheduler repeats the last {sp.name} sigma and wastes its last call: its n + 1 "
            f"steps equal fewstep's deis with nfe = n; there is no same-NFE equivalent"
        )
    return {"solver_order": o.order, "lower_order_final": o.lower_order_final}


def _deis_options(cfg: Mapping[str, Any]) -> dict:
    out = {"final": "sigma_min"}  # DEISMultistepScheduler has no final_sigmas_type: it always ends there
    if "solver_order" in cfg:
        out["order"] = cfg["solver_order"]
    if "lower_order_final" in cfg:
        out["lower_order_final"] = cfg["lower_order_final"]
    return out


def _ipndm(o, sp: Spacing, spec: ModelSpec) -> dict:
    if o.grid != "ipndm":
        raise ValueError("diffusers' IPNDMScheduler has its own grid and time input: use grid='ipndm'")
    if o.order != 4 or o.lower_order_final or o.euler_at_final:
        raise ValueError("IPNDMScheduler is fixed at order 4 without lower-order or Euler final steps")
    return {"trained_betas": None}


EQUIVALENTS: dict[str, Equivalent] = {
    "ddim": Equivalent(
        "DDIMScheduler", _ddim,
        lambda cfg: {"final": "zero" if cfg.get("set_alpha_to_one", True) else "sigma_min"}),
    "lcm": Equivalent(
        "LCMScheduler",
        lambda o, sp, spec: {"original_inference_steps": o.original_inference_steps,
                       "timestep_scaling": o.timestep_scaling},
        lambda cfg: {k: cfg[k] for k in ("original_inference_steps", "timestep_scaling") if k in cfg}),
    "tcd": Equivalent(
        "TCDScheduler", _tcd,
        lambda cfg: {k: cfg[k] for k in ("original_inference_steps",) if k in cfg}),
    "cm": Equivalent(
        "CMStochasticIterativeScheduler", _cm,
        lambda cfg: {"train_steps": int(cfg.get("num_train_timesteps", 40)),
                     "s_noise": cfg.get("s_noise", 1.0), "gamma": 1.0, "final": "sigma_min"},
        lambda cfg: Spacing("karras", rho=float(cfg.get("rho", 7.0)))),
    "euler": Equivalent(
        "EulerDiscreteScheduler", _euler,
        lambda cfg: {"final": cfg["final_sigmas_type"]} if "final_sigmas_type" in cfg else {}),
    "heun": _ends_at_zero("HeunDiscreteScheduler"),
    "flow_euler": _ends_at_zero("FlowMatchEulerDiscreteScheduler"),
    "flow_heun": _ends_at_zero("FlowMatchHeunDiscreteScheduler"),
    "dpmpp_2m": Equivalent("DPMSolverMultistepScheduler", _dpm_multistep(False), _dpm_options),
    "dpmpp_3m": Equivalent("DPMSolverMultistepScheduler", _dpm_multistep(False), _dpm_options),
    "dpmpp_2m_sde": Equivalent("DPMSolverMultistepScheduler", _dpm_multistep(True), _dpm_options),
    "dpmpp_3m_sde": Equivalent("DPMSolverMultistepScheduler", _dpm_multistep(True), _dpm_options),
    "dpmpp_2s": Equivalent("DPMSolverSinglestepScheduler", _dpm_singlestep, _dpm_options),
    "unipc": Equivalent("UniPCMultistepScheduler", _unipc, _unipc_options),
    "deis": Equivalent("DEISMultistepScheduler", _deis, _deis_options),
    "ipndm": Equivalent("IPNDMScheduler", _ipndm, lambda cfg: {"grid": "ipndm"}),
}


# -- reading a spec's config ---------------------------------------------------------------------------------
def spacing_from_diffusers(cfg: Mapping[str, Any]) -> Spacing | None:
    """The spacing a diffusers scheduler config asks for (karras / exponential / beta flags,
    timestep_spacing)."""
    if cfg.get("use_karras_sigmas"):
        return Spacing("karras")
    if cfg.get("use_exponential_sigmas"):
        return Spacing("exponential")
    if cfg.get("use_beta_sigmas"):
        return Spacing("beta")
    if cfg.get("use_flow_sigmas") or "FlowMatch" in str(cfg.get("_class_name", "")):
        return Spacing("flow")
    ts = cfg.get("timestep_spacing")
    if ts in ("linspace", "leading", "trailing"):
        return Spacing(ts, steps_offset=int(cfg.get("steps_offset", 0) or 0))
    return None


def resolve(name: str, spec: ModelSpec, spacing: "str | Spacing | Sequence[float] | None" = None,
            options: Mapping[str, Any] | None = None) -> tuple[SolverInfo, Spacing, Any]:
    """``(solver info, Spacing, options dataclass)`` for ``build(name, spec, nfe, spacing, **options)``.

    Explicit arguments win.  Otherwise the spec's diffusers config decides where it has a say: its spacing
    flags for any solver, and, when it came from the solver's own scheduler (``spec.config_from``), that
    scheduler's settings through :data:`EQUIVALENTS`.  Else the solver's defaults.
    """
    info = get(name)
    cfg = dict(spec.diffusers_config or {})
    eq = EQUIVALENTS.get(name)
    own = eq is not None and bool(cfg) and spec.config_from(eq.scheduler)
    if spacing is not None:
        sp = as_spacing(spacing, spec)
    else:
        sp = (eq.spacing(cfg) if own else None) or (spacing_from_diffusers(cfg) if cfg else None)
        if sp is not None and sp.name not in valid_spacings(spec):
            sp = None
        if sp is None:
            # old configs (SD1.5's) carry steps_offset without timestep_spacing: keep it for 'leading'
            default = info.default_spacing(spec)
            offset = int(cfg.get("steps_offset", 0) or 0)
            sp = Spacing(default, steps_offset=offset) if default == "leading" else Spacing(default)
        sp = as_spacing(sp, spec)
    opts = info.make_options(dict(options or {}), eq.options(cfg) if own else None)
    return info, sp, opts


# -- writing a scheduler -------------------------------------------------------------------------------------
def diffusers_base_config(spec: ModelSpec, spacing: Spacing) -> dict:
    """The diffusers scheduler config keys that describe ``spec`` and ``spacing`` (schedule, prediction,
    grid)."""
    from .schedules import DiscreteVP, Flow

    sched = spec.schedule
    cfg: dict = {}
    if isinstance(sched, DiscreteVP):
        cfg.update(
            num_train_timesteps=sched.num_train_timesteps,
            beta_start=sched.beta_start,
            beta_end=sched.beta_end,
            beta_schedule=sched.beta_schedule,
            rescale_betas_zero_snr=sched.rescale_zero_terminal_snr,
            prediction_type=spec.prediction,
        )
        if sched.trained_betas is not None:
            cfg["trained_betas"] = list(sched.trained_betas)
    elif isinstance(sched, Flow):
        cfg.update(num_train_timesteps=sched.num_train_timesteps, shift=sched.shift)
    else:
        cfg.update(
            sigma_min=sched.sigma_min,
            sigma_max=sched.sigma_max,
            sigma_data=sched.sigma_data,
            prediction_type=spec.prediction,
        )
    if spacing.name in ("linspace", "leading", "trailing"):
        cfg.update(timestep_spacing=spacing.name, steps_offset=spacing.steps_offset)
    elif spacing.name in ("karras", "exponential", "beta"):
        cfg[f"use_{spacing.name}_sigmas"] = True
    return cfg


def to_diffusers(name: str, spec: ModelSpec, spacing: "str | Spacing | Sequence[float] | None" = None,
                 **options: Any):
    """Instantiate the diffusers scheduler equivalent to ``build(name, spec, nfe, spacing, **options)``.

    Needs diffusers (a test dependency).  Raises ValueError where diffusers has no equivalent, rather than
    silently dropping a setting the scheduler class cannot take.
    """
    import diffusers

    eq = EQUIVALENTS.get(name)
    if eq is None:
        get(name)  # an unknown name says so
        raise ValueError(f"solver {name!r} has no diffusers equivalent")
    _, sp, opts = resolve(name, spec, spacing, options)
    cls_name = eq.scheduler
    overrides = eq.config(opts, sp, spec)
    cls = getattr(diffusers, cls_name)
    cfg = diffusers_base_config(spec, sp)
    if spec.schedule.kind == "flow" and not cls_name.startswith("FlowMatch"):
        # VP-family schedulers run flow models through their use_flow_sigmas mode
        cfg.update(use_flow_sigmas=True, flow_shift=spec.schedule.shift, prediction_type="flow_prediction")
    cfg.update(overrides)
    for k in [k for k, v in overrides.items() if v is None]:  # None: "this class has it built in", drop it
        del cfg[k]
    params = inspect.signature(cls.__init__).parameters
    # keys that carry meaning for this program must be taken, never silently dropped: the solver's own
    # overrides, the spacing flags and the flow mapping (schedule keys a class lacks are simply not its own)
    if sp.name in ("ays", "sigmas", "timesteps"):
        raise ValueError(
            f"{cls_name} has no config for spacing {sp.name!r} (diffusers takes it as "
            f"set_timesteps(timesteps=... / sigmas=...))"
        )
    needed = {k for k in overrides if k in cfg} | {
        k for k in cfg if k.startswith("use_") or k in ("timestep_spacing", "flow_shift")
    }
    if spec.schedule.kind == "vp":
        needed |= {k for k in ("rescale_betas_zero_snr", "trained_betas") if cfg.get(k)}
    if cfg.get("timestep_spacing") == "linspace" and not cfg.get("steps_offset"):
        needed.discard("timestep_spacing")  # a class without the key (DPMSolverSinglestep) spaces linearly
    dropped = sorted(k for k in needed if k not in params and cfg.get(k) not in (None, False))
    if dropped:
        raise ValueError(
            f"{cls_name} takes no {dropped}: no diffusers equivalent of {name} with "
            f"spacing {sp.name!r} on {spec.describe()}"
        )
    return cls(**{k: v for k, v in cfg.items() if k in params})
