"""ModelSpec: what a network predicts, on which noise schedule, and which time input it takes."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .schedules import EDM, DiscreteVP, Flow, Point, Schedule

__all__ = ["ModelSpec", "PREDICTIONS", "TIME_INPUTS", "config_from"]

PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow")
TIME_INPUTS = ("discrete", "sigma", "t")

_VALID_TIME_INPUTS = {"vp": ("discrete", "sigma"), "edm": ("sigma",), "flow": ("t",)}
_VALID_PREDICTIONS = {
    "vp": ("epsilon", "sample", "v_prediction"),
    "edm": ("epsilon", "sample", "v_prediction"),
    "flow": ("flow", "epsilon", "sample"),
}


@dataclass(frozen=True)
class ModelSpec:
    """A denoiser's contract: ``schedule`` (DiscreteVP | EDM | Flow), ``prediction``
    ("epsilon" | "sample" | "v_prediction" | "flow") and ``time_input`` ("discrete" | "sigma" | "t";
    default: the schedule's own).

    ``diffusers_config`` keeps the scheduler config this spec was read from, so a solver can default to the
    same spacing options (``timestep_spacing``, ``use_karras_sigmas``, ``steps_offset``...) and, when the
    config came from that solver's own scheduler (:meth:`config_from`), to its settings (final sigma,
    order...): see ``fewstep/solvers/diffusers_map.py``.
    """

    schedule: Schedule
    prediction: str = "epsilon"
    time_input: str | None = None
    diffusers_config: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.schedule, (DiscreteVP, EDM, Flow)):
            raise TypeError(
                f"schedule must be fs.schedules.DiscreteVP, EDM or Flow, got {type(self.schedule).__name__}"
            )
        kind = self.schedule.kind
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.prediction not in _VALID_PREDICTIONS[kind]:
            raise ValueError(
                f"prediction {self.prediction!r} does not fit a {type(self.schedule).__name__} schedule; "
                f"expected one of {_VALID_PREDICTIONS[kind]}"
            )
        if self.time_input is None:
            object.__setattr__(self, "time_input", self.schedule.default_time_input)
        if self.time_input not in TIME_INPUTS:
            raise ValueError(f"time_input must be one of {TIME_INPUTS}, got {self.time_input!r}")
        if self.time_input not in _VALID_TIME_INPUTS[kind]:
            raise ValueError(
                f"time_input {self.time_input!r} does not fit a {type(self.schedule).__name__} schedule; "
                f"expected one of {_VALID_TIME_INPUTS[kind]}"
            )

    def config_from(self, scheduler: str) -> bool:
        """Whether ``diffusers_config`` came from the diffusers scheduler class named ``scheduler``."""
        return self.diffusers_config is not None and config_from(self.diffusers_config, scheduler)

    # -- conversions ------------------------------------------------------------------------------------
    def model_time(self, p: Point) -> float:
        """The value handed to the network at point ``p``."""
        if self.time_input == "sigma" and self.schedule.kind == "vp":
            return p.sigma_tilde
        return p.model_time

    def x0_coeffs(self, p: Point) -> tuple[float, float]:
        """``(cx, co)`` with ``x0 = cx * x + co * output`` for a network evaluated at ``x`` on point ``p``."""
        a, s = p.alpha, p.sigma
        if self.prediction == "epsilon":
            if a == 0:
                raise ValueError(
                    "an epsilon-prediction network gives no x0 estimate at alpha = 0 (pure noise, e.g. "
                    "t = 1 of a flow schedule or a zero-terminal-SNR endpoint); start the grid below it or "
                    "use a v / flow model"
                )
            return 1.0 / a, -s / a
        if self.prediction == "sample":
            return 0.0, 1.0
        if self.prediction == "v_prediction":
            n = a * a + s * s
            return a / n, -s / n
        return 1.0, -s  # flow: output = eps - x0 and x = x0 + t (eps - x0)

    def eps_coeffs(self, p: Point) -> tuple[float, float]:
        """``(cx, co)`` with ``eps = cx * x + co * output``."""
        a, s = p.alpha, p.sigma
        if self.prediction == "epsilon":
            return 0.0, 1.0
        if self.prediction == "sample":
            if s == 0:
                raise ValueError("a sample-prediction network gives no eps estimate at sigma = 0")
            return 1.0 / s, -a / s
        if self.prediction == "v_prediction":
            n = a * a + s * s
            return s / n, a / n
        return 1.0, a  # flow

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_diffusers_scheduler_config(cls, cfg: Mapping[str, Any]) -> "ModelSpec":
        """Read schedule and prediction type from any diffusers scheduler config (dict or FrozenDict; a
        scheduler object is accepted too).  In-memory configs carry no ``_class_name``, so the family is read
        from the keys: ``shift`` without betas is a flow-matching schedule, ``sigma_data`` an EDM one."""
        if hasattr(cfg, "config") and isinstance(cfg.config, Mapping):
            cfg = dict(cfg.config, _class_name=type(cfg).__name__)
        if not isinstance(cfg, Mapping):
            raise TypeError(f"expected a diffusers scheduler config (a mapping), got {type(cfg).__name__}")
        cfg = dict(cfg)
        name = str(cfg.get("_class_name", ""))
        # configs without a prediction_type whose scheduler fixes one: IPNDMScheduler reads the output as v,
        # CMStochasticIterativeScheduler's consistency function (what an adapter hands us) predicts x0
        fixed = {"IPNDMScheduler": "v_prediction", "CMStochasticIterativeScheduler": "sample"}
        implied = next((p for c, p in fixed.items() if config_from(cfg, c)), "epsilon")
        pred = cfg.get("prediction_type", implied)
        pred = {"flow_prediction": "flow", "v-prediction": "v_prediction"}.get(pred, pred)
        n_train = int(cfg.get("num_train_timesteps", 1000))
        if "FlowMatch" in name or ("beta_start" not in cfg and ("shift" in cfg or pred == "flow")):
            mu = None
            shift = float(cfg.get("shift", cfg.get("flow_shift", 1.0)))
            return cls(Flow(shift=shift, mu=mu, num_train_timesteps=n_train), "flow", "t", cfg)
        if pred == "flow":  # DPM-Solver / UniPC with use_flow_sigmas
            return cls(
                Flow(shift=float(cfg.get("flow_shift", 1.0)), num_train_timesteps=n_train), "flow", "t", cfg
            )
        if name.startswith("EDM") or ("sigma_data" in cfg and "beta_start" not in cfg):
            sched = EDM(
                sigma_min=float(cfg.get("sigma_min", 0.002)),
                sigma_max=float(cfg.get("sigma_max", 80.0)),
                sigma_data=float(cfg.get("sigma_data", 0.5)),
            )
            return cls(sched, pred if pred in _VALID_PREDICTIONS["edm"] else "epsilon", "sigma", cfg)
        trained = cfg.get("trained_betas")
        sched = DiscreteVP(
            num_train_timesteps=n_train,
            beta_start=float(cfg.get("beta_start", 0.0001)),
            beta_end=float(cfg.get("beta_end", 0.02)),
            beta_schedule=str(cfg.get("beta_schedule", "linear")),
            rescale_zero_terminal_snr=bool(
                cfg.get("rescale_betas_zero_snr", cfg.get("rescale_zero_terminal_snr", False))
            ),
            trained_betas=tuple(trained) if trained is not None else None,
        )
        if pred not in _VALID_PREDICTIONS["vp"]:
            raise ValueError(f"unsupported diffusers prediction_type {pred!r} for {name or 'scheduler'}")
        return cls(sched, pred, "discrete", cfg)

    def describe(self) -> str:
        return f"{type(self.schedule).__name__}, prediction={self.prediction}, time_input={self.time_input}"


def config_from(cfg: Mapping[str, Any], scheduler: str) -> bool:
    """Whether the diffusers scheduler config ``cfg`` came from the class named ``scheduler``.

    A saved config names its class (``_class_name``).  An in-memory one (``scheduler.config``) does not, but
    holds exactly its class's ``__init__`` parameters; it can only exist once diffusers is imported, so
    without diffusers in ``sys.modules`` the answer is no.  Classes with the same parameters (LCMScheduler and
    TCDScheduler; DDIMScheduler and DDIMParallelScheduler) read their configs the same way.
    """
    name = cfg.get("_class_name")
    if name:
        return name == scheduler
    params = _init_params(scheduler) if "diffusers" in sys.modules else None
    return params is not None and params == frozenset(k for k in cfg if not k.startswith("_"))


@functools.cache
def _init_params(scheduler: str) -> frozenset[str] | None:
    cls = getattr(sys.modules["diffusers"], scheduler, None)
    if not isinstance(cls, type):
        return None
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
