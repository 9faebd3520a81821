"""Noise schedules: each maps its own time variable to (alpha, sigma, lambda) and to the network's time input.

Every schedule describes the forward process ``x_t = alpha_t * x0 + sigma_t * eps``.  Solvers never look at a
schedule's own time variable; they work on :class:`Point` objects, which carry ``alpha``, ``sigma`` and the
value handed to the network (``model_time``).

* :class:`DiscreteVP` -- DDPM-style discrete schedules (``alpha^2 + sigma^2 = 1``); time is the training
  timestep ``0 .. T-1`` and the network receives it.  Tables are built in float32 exactly as diffusers builds
  them and then promoted to float64, so grids agree with diffusers' to the last bit of the table.
* :class:`EDM` -- variance-exploding ``x = x0 + sigma * eps`` (Karras et al. 2022); the network receives
  sigma.
* :class:`Flow` -- rectified flow ``x = (1 - t) x0 + t eps``; the network receives ``t * num_train_timesteps``
  (diffusers' convention for SD3 / Flux).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["Point", "DiscreteVP", "EDM", "Flow", "Schedule"]


@dataclass(frozen=True)
class Point:
    """One point on the noise path: ``x = alpha * x0 + sigma * eps``; ``model_time`` is what the network
    sees."""

    alpha: float
    sigma: float
    model_time: float

    @property
    def sigma_tilde(self) -> float:
        """k-diffusion sigma, ``sigma / alpha`` (the noise level of ``x / alpha``)."""
        return self.sigma / self.alpha if self.alpha > 0 else math.inf

    @property
    def lam(self) -> float:
        """Half log-SNR, ``log(alpha / sigma)``; +inf at the clean end."""
        if self.sigma == 0:
            return math.inf
        if self.alpha == 0:
            return -math.inf
        return math.log(self.alpha) - math.log(self.sigma)


_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> list[float]:
    """Cosine schedule of Nichol & Dhariwal 2021, discretized as diffusers does."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]


@dataclass(frozen=True)
class DiscreteVP:
    """Discrete variance-preserving schedule (DDPM / Stable Diffusion / DiT)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    rescale_zero_terminal_snr: bool = False
    trained_betas: tuple[float, ...] | None = None

    kind = "vp"
    default_time_input = "discrete"

    def __post_init__(self):
        if self.trained_betas is None and self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {_BETA_SCHEDULES}, got {self.beta_schedule!r}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {len(self.trained_betas)} entries, expected num_train_timesteps="
                    f"{self.num_train_timesteps}"
                )

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """``alpha_bar_t`` for t = 0 .. T-1, computed in float32 as diffusers does, returned as float64.

        With ``rescale_zero_terminal_snr`` the last entry is 2**-24 rather than 0, as in diffusers'
        sigma-space schedulers (DPM-Solver, UniPC, Euler), so sigma stays finite; :attr:`alphas_cumprod_exact`
        keeps the 0 that alpha-space schedulers (DDIM, LCM, TCD) use.
        """
        ac = self.alphas_cumprod_exact.copy()
        if self.rescale_zero_terminal_snr:
            ac[-1] = 2.0**-24
        return ac

    @cached_property
    def alphas_cumprod_exact(self) -> np.ndarray:
        """``alpha_bar_t`` without the zero-terminal-SNR guard (the last entry is exactly 0 when rescaled)."""
        import torch

        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float32)
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float32) ** 2
        else:
            betas = torch.tensor(_betas_for_alpha_bar(n), dtype=torch.float32)
        if self.rescale_zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        return torch.cumprod(1.0 - betas, dim=0).double().numpy()

    @cached_property
    def sigmas_tilde(self) -> np.ndarray:
        """k-diffusion sigmas ``sqrt((1 - a) / a)`` per training timestep (float64)."""
        ac = self.alphas_cumprod
        return ((1 - ac) / ac) ** 0.5

    @cached_property
    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas_tilde)

    def point_at_timestep(self, t: float, model_time: float | None = None) -> Point:
        """Point at a (possibly fractional) timestep; sigma_tilde interpolated linearly, as diffusers does."""
        st = float(np.interp(t, np.arange(self.num_train_timesteps), self.sigmas_tilde))
        return self.point_at_sigma(st, t if model_time is None else model_time)

    def point_at_sigma(self, sigma_tilde: float, model_time: float | None = None) -> Point:
        """Point at a k-diffusion sigma; the network time defaults to the log-sigma interpolated timestep."""
        if model_time is None:
            model_time = self.timestep_of_sigma(sigma_tilde)
        if sigma_tilde == 0:
            return Point(1.0, 0.0, float(model_time))
        alpha = 1.0 / math.sqrt(sigma_tilde**2 + 1.0)
        return Point(alpha, sigma_tilde * alpha, float(model_time))

    def timestep_of_sigma(self, sigma_tilde: float) -> float:
        """Fractional timestep of a sigma by interpolation in log-sigma (diffusers' ``_sigma_to_t``)."""
        return float(self.timesteps_of_sigmas([sigma_tilde])[0])

    def timesteps_of_sigmas(self, sigmas_tilde) -> np.ndarray:
        """:meth:`timestep_of_sigma` of each sigma, at once (one grid's worth)."""
        log_sigmas = self.log_sigmas
        log_sigma = np.array([math.log(max(float(s), 1e-10)) for s in sigmas_tilde])
        dists = log_sigma[:, None] - log_sigmas[None, :]
        low = np.clip(np.cumsum(dists >= 0, axis=1).argmax(axis=1), 0, len(log_sigmas) - 2)
        low_v, high_v = log_sigmas[low], log_sigmas[low + 1]
        w = np.clip((low_v - log_sigma) / (low_v - high_v), 0, 1)
        return (1 - w) * low + w * (low + 1)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas_tilde[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas_tilde[-1])


def _rescale_zero_terminal_snr(betas):
    """Lin et al. 2023, Algorithm 1: shift sqrt(alpha_bar) so the last timestep has zero SNR."""
    import torch

    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt -= aT
    abar_sqrt *= a0 / (a0 - aT)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass(frozen=True)
class EDM:
    """Variance-exploding schedule (Karras et al. 2022): ``x = x0 + sigma * eps``; the network gets sigma."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    kind = "edm"
    default_time_input = "sigma"

    def __post_init__(self):
        if not (0 < self.sigma_min < self.sigma_max) or not math.isfinite(self.sigma_max):
            raise ValueError(
                f"EDM needs 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}"
            )
        if not self.sigma_data > 0:
            raise ValueError(f"EDM sigma_data must be > 0, got {self.sigma_data}")

    def point_at_sigma(self, sigma: float, model_time: float | None = None) -> Point:
        return Point(1.0, float(sigma), float(sigma if model_time is None else model_time))


@dataclass(frozen=True)
class Flow:
    """Rectified-flow schedule ``x = (1 - t) x0 + t eps`` with the SD3 / Flux time shift.

    ``shift`` maps ``t -> shift t / (1 + (shift - 1) t)``; with ``mu`` set (dynamic shifting, Flux) the map is
    ``exp(mu) / (exp(mu) + (1 / t - 1))`` and ``shift`` is ignored.  The network receives
    ``t * num_train_timesteps``.
    """

    shift: float = 1.0
    mu: float | None = None
    num_train_timesteps: int = 1000

    kind = "flow"
    default_time_input = "t"

    def __post_init__(self):
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"Flow shift must be a finite positive number, got {self.shift}")
        if self.mu is not None and not math.isfinite(self.mu):
            raise ValueError(f"Flow mu must be finite, got {self.mu}")

    def shift_t(self, t: float) -> float:
        """Apply the (static or dynamic) time shift to an unshifted t in [0, 1]."""
        if t <= 0 or t >= 1:
            return float(t)
        if self.mu is not None:
            e = math.exp(self.mu)
            return e / (e + (1.0 / t - 1.0))
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def point_at_t(self, t: float, model_time: float | None = None) -> Point:
        t = float(t)
        return Point(1.0 - t, t, t * self.num_train_timesteps if model_time is None else float(model_time))

    def point_at_sigma(self, sigma: float, model_time: float | None = None) -> Point:
        """Flow 'sigma' is t itself (diffusers' FlowMatch convention)."""
        return self.point_at_t(sigma, model_time)


Schedule = DiscreteVP | EDM | Flow
