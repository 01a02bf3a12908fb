"""Sampler schedules as per-row tables, so one compiled program serves every scheduler and step count.

All three schedulers are written in the sigma ("k-diffusion") parametrisation, where the running
sample is x = x0 + sigma * eps. In that form each of them is one rule per step:

    model_in = x * c_in                      # what the UNet sees (diffusers' scale_model_input)
    d        = x - sigma * eps               # the denoised estimate
    x_next   = a * x + b * d + c * d_prev    # the update

- Euler discrete:   a = sigma_next / sigma, b = 1 - a, c = 0 (the same as x + (sigma_next - sigma) * eps).
- DDIM (eta = 0):   the same rule on DDIM's timestep grid: DDIM is Euler in sigma space.
- DPM++ 2M Karras:  first order as above; second order b = (1 - a) * (1 + 1/(2r)), c = -(1 - a)/(2r)
                    with r = h_prev / h, h = log(sigma / sigma_next) (diffusers' "midpoint" solver).

The tables are computed on the host in float64 from the model's scheduler config, following diffusers'
PyTorch schedulers line by line (`scheduling_euler_discrete.py`, `scheduling_ddim.py`,
`scheduling_dpmsolver_multistep.py`, diffusers 0.39), and padded to `MAX_STEPS` with identity steps
(a = 1, b = c = 0), so rows with fewer steps than their batch neighbours simply stop moving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

MAX_STEPS = 150  # the table width; steps outside 1..MAX_STEPS are refused


class Scheduler(StrEnum):
    euler = "euler"  # EulerDiscreteScheduler: the reference's and SDXL's default
    dpmpp_2m_karras = "dpmpp_2m_karras"  # DPMSolverMultistepScheduler, dpmsolver++, order 2, Karras sigmas
    ddim = "ddim"  # DDIMScheduler, eta = 0


@dataclass(frozen=True)
class NoiseConfig:
    """The parts of a diffusers scheduler_config.json that define the noise schedule."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    set_alpha_to_one: bool = False
    prediction_type: str = "epsilon"

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> NoiseConfig:
        fields = {f: config[f] for f in cls.__dataclass_fields__ if f in config}
        made = cls(**fields)
        if made.prediction_type != "epsilon":
            raise ValueError(f"scheduler prediction_type {made.prediction_type!r} is not supported; only 'epsilon'")
        if made.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"scheduler beta_schedule {made.beta_schedule!r} is not supported")
        if made.timestep_spacing not in ("leading", "linspace", "trailing"):
            raise ValueError(f"scheduler timestep_spacing {made.timestep_spacing!r} is not supported")
        return made

    def alphas_cumprod(self) -> np.ndarray:
        # diffusers builds these in float32 torch; doing the same keeps sigmas bit-close to it.
        n = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=np.float32) ** 2
        else:
            betas = np.linspace(self.beta_start, self.beta_end, n, dtype=np.float32)
        return np.cumprod(1.0 - betas, dtype=np.float32)


@dataclass(frozen=True)
class Schedule:
    """One row's sampler, as tables of length MAX_STEPS (float32 when handed to the device)."""

    steps: int
    timesteps: np.ndarray  # (MAX_STEPS,) the UNet's timestep input per step
    sigmas: np.ndarray  # (MAX_STEPS,) sigma of the sample entering each step
    c_in: np.ndarray  # (MAX_STEPS,) model input scale, 1/sqrt(sigma^2 + 1)
    a: np.ndarray  # (MAX_STEPS,) update coefficients, see the module docstring
    b: np.ndarray
    c: np.ndarray
    init_scale: float  # initial sample = unit noise * init_scale (diffusers' init_noise_sigma, in sigma space)
    out_scale: float  # latents handed to the VAE = final sample * out_scale


def _leading_or_spaced(cfg: NoiseConfig, steps: int) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.timestep_spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + cfg.steps_offset
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    ratio = n / steps
    return np.arange(n, 0, -ratio).round().astype(np.float64) - 1


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    # diffusers' _sigma_to_t: interpolate the timestep in log-sigma space.
    log_sigma = np.log(max(sigma, 1e-10))
    dists = log_sigma - log_sigmas
    low = int(np.clip(np.cumsum(dists >= 0).argmax(), None, len(log_sigmas) - 2))
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = float(np.clip((lo - log_sigma) / (lo - hi), 0, 1))
    return (1 - w) * low + w * (low + 1)


def _first_order(sigmas: np.ndarray, i: int) -> tuple[float, float, float]:
    a = sigmas[i + 1] / sigmas[i]
    return a, 1.0 - a, 0.0


def _pad(values: list[float] | np.ndarray, fill: float) -> np.ndarray:
    out = np.full(MAX_STEPS, fill, dtype=np.float64)
    out[: len(values)] = values
    return out


def build(cfg: NoiseConfig, scheduler: Scheduler, steps: int) -> Schedule:
    """The tables for one row. Raises ValueError naming the field for bad input."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    scheduler = Scheduler(scheduler)
    ac = cfg.alphas_cumprod()
    train_sigmas = ((1 - ac) / ac) ** 0.5  # float32, as diffusers computes them

    if scheduler is Scheduler.euler:
        timesteps = _leading_or_spaced(cfg, steps)
        sig = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)
        coef = [_first_order(sigmas, i) for i in range(steps)]
        init_sigma = sigmas.max()
        if cfg.timestep_spacing == "leading":
            init_sigma = (init_sigma**2 + 1) ** 0.5
        init_scale, out_scale = float(np.float32(init_sigma)), 1.0
    elif scheduler is Scheduler.ddim:
        n = cfg.num_train_timesteps
        ratio = n // steps
        if cfg.timestep_spacing == "leading":
            timesteps = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
        elif cfg.timestep_spacing == "linspace":
            # DDIM rounds its linspace grid to integers (Euler keeps it fractional): truncating instead is one
            # timestep off for most step counts
            timesteps = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
        else:
            timesteps = _leading_or_spaced(cfg, steps).astype(np.int64)
        final_alpha = 1.0 if cfg.set_alpha_to_one else float(ac[0])
        alpha_t = ac[timesteps].astype(np.float64)
        prev = timesteps - ratio
        alpha_prev = np.array([ac[p] if p >= 0 else final_alpha for p in prev], dtype=np.float64)
        sig_t = np.sqrt((1 - alpha_t) / alpha_t)
        sig_prev = np.sqrt((1 - alpha_prev) / alpha_prev)
        sigmas = np.concatenate([sig_t, sig_prev[-1:]])
        coef = []
        for i in range(steps):
            a = sig_prev[i] / sig_t[i]
            # DDIM steps to t - n // steps, which on a rounded (linspace, trailing) grid is not always the next
            # timestep; the sample is then rescaled from the one noise level to the other, as diffusers' VP
            # sample is fed to the next step unchanged (r = 1 on the leading grid)
            r = math.sqrt(alpha_prev[i] / alpha_t[i + 1]) if i + 1 < steps else 1.0
            coef.append((r * a, r * (1.0 - a), 0.0))
        timesteps = timesteps.astype(np.float64)
        # DDIM starts from unit noise in the alpha ("VP") space and ends there: convert at both ends.
        init_scale = float(1 / np.sqrt(alpha_t[0]))
        out_scale = float(np.sqrt(alpha_prev[-1]))
    else:  # DPM++ 2M with Karras sigmas, diffusers' dpmsolver++ / midpoint / lower_order_final
        log_sigmas = np.log(train_sigmas.astype(np.float64))
        in_sigmas = np.flip(train_sigmas).copy()
        s_min, s_max = float(in_sigmas[-1]), float(in_sigmas[0])
        rho = 7.0
        ramp = np.linspace(0, 1, steps)
        karras = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in karras]).round()
        sigmas = np.concatenate([karras, [0.0]]).astype(np.float32).astype(np.float64)
        coef = []
        for i in range(steps):
            if i == 0 or i == steps - 1:  # the first step has no history; the last is first order (final zero)
                coef.append(_first_order(sigmas, i))
                continue
            a = sigmas[i + 1] / sigmas[i]
            h = math.log(sigmas[i] / sigmas[i + 1])
            h_prev = math.log(sigmas[i - 1] / sigmas[i])
            r = h_prev / h
            coef.append((a, (1 - a) * (1 + 1 / (2 * r)), -(1 - a) / (2 * r)))
        init_scale = float(np.sqrt(sigmas[0] ** 2 + 1))  # VP start (init_noise_sigma = 1) in sigma space
        out_scale = 1.0

    a, b, c = (np.array([k[j] for k in coef]) for j in range(3))
    sig = sigmas[:steps]
    return Schedule(
        steps=steps,
        timesteps=_pad(timesteps, timesteps[-1]),
        sigmas=_pad(sig, sig[-1]),
        c_in=_pad(1 / np.sqrt(sig**2 + 1), 1.0),
        a=_pad(a, 1.0),
        b=_pad(b, 0.0),
        c=_pad(c, 0.0),
        init_scale=init_scale,
        out_scale=out_scale,
    )
