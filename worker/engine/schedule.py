"""Sampler schedules as per-row tables, so one compiled program serves every scheduler, step count,
spacing, prediction type and image-to-image strength.

Every scheduler is written in the sigma ("k-diffusion") parametrisation, where the running sample is
x = x0 + sigma * noise. In that form each of them is one rule per step, with `out` the (guided) UNet output:

    model_in = x * c_in                              # what the UNet sees (diffusers' scale_model_input)
    d        = p * x + q * out                       # the denoised estimate x0 (the prediction type)
    x_next   = a * x + b * d + c * d_prev + e * z_i  # the update; z_i unit noise drawn for step i

- prediction type: epsilon p = 1, q = -sigma; v_prediction p = 1/(sigma^2+1), q = -sigma/sqrt(sigma^2+1);
  sample (x0) p = 0, q = 1.
- Euler discrete:   a = sigma_next / sigma, b = 1 - a, c = e = 0.
- Euler ancestral:  the same with sigma_down for sigma_next, and e = sigma_up (diffusers' split of the step).
- DDIM (eta = 0):   the Euler rule on DDIM's timestep grid: DDIM is Euler in sigma space.
- DPM++ 2M Karras:  first order as above; second order b = (1 - a) * (1 + 1/(2r)), c = -(1 - a)/(2r)
                    with r = h_prev / h, h = log(sigma / sigma_next) (diffusers' "midpoint" solver).
- LCM:              a = c_skip * sqrt(alpha_t), b = c_out, e = sigma_next (0 at the last step): the
                    consistency function's boundary scalings, then fresh noise to the next timestep.

Image-to-image and inpainting start at step `start` of the full schedule (diffusers' strength): the tables
are shifted so each row's first step is index 0, and the sample starts as image latents + sigma_start * noise.
Inpainting blends after each step: x = mask * x + (1 - mask) * (init * k + s_next * noise) (the image
re-noised to the next step's level, as diffusers' inpaint pipeline does for a 4-channel UNet).

The tables are computed on the host in float64 from the model's scheduler config, following diffusers'
PyTorch schedulers line by line (`scheduling_euler_discrete.py`, `scheduling_euler_ancestral_discrete.py`,
`scheduling_ddim.py`, `scheduling_dpmsolver_multistep.py`, `scheduling_lcm.py`, diffusers 0.42), and padded to
`MAX_STEPS` with identity steps (a = 1, b = c = e = 0, no blend), so rows with fewer steps than their batch
neighbours simply stop moving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# The request vocabulary is the API's too (common/vocabulary.py): one Scheduler and one Spacing, one MAX_STEPS.
from common.vocabulary import MAX_STEPS, Scheduler, Spacing

__all__ = ["MAX_STEPS", "Scheduler", "Spacing"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class ScheduleError(ValueError):
    """A row's sampler settings no schedule can be built from; `field` names the request's field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# The per-step tables, in the order the program stacks them (program.TABLES reads these names).
TABLES = ("timesteps", "c_in", "p", "q", "a", "b", "c", "e", "s_next", "k", "blend")


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
    original_inference_steps: int = 50  # LCM: the distillation's step grid
    timestep_scaling: float = 10.0  # LCM: the boundary condition's time scale

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> NoiseConfig:
        fields = {f: config[f] for f in cls.__dataclass_fields__ if f in config}
        made = cls(**fields)
        if made.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type {made.prediction_type!r} is not supported; one of {PREDICTION_TYPES}"
            )
        if made.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"scheduler beta_schedule {made.beta_schedule!r} is not supported")
        if made.timestep_spacing not in set(Spacing):
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

    steps: int  # steps this row runs (the full count less those an image-to-image strength skips)
    tables: dict[str, np.ndarray]  # name (TABLES) -> (MAX_STEPS,)
    sigmas: np.ndarray  # (MAX_STEPS,) sigma of the sample entering each step run (not a device table)
    init_scale: float  # a pure-noise start: sample = unit noise * init_scale (diffusers' init_noise_sigma)
    image_scale: float  # an image start: sample = image latents + unit noise * image_scale (add_noise)
    out_scale: float  # latents handed to the VAE = final sample * out_scale

    def __getattr__(self, name: str) -> np.ndarray:
        if name in TABLES:
            return self.tables[name]
        raise AttributeError(name)


def timesteps(cfg: NoiseConfig, scheduler: Scheduler | str, steps: int, spacing: Spacing | str | None) -> np.ndarray:
    """The full run's timesteps, one per step."""
    return build(cfg, scheduler, steps, spacing).timesteps[:steps]


def switch_step(timesteps: np.ndarray, switch: float, num_train_timesteps: int = 1000) -> int:
    """Where the base hands over to the refiner (diffusers' denoising_end / denoising_start): the number of
    steps whose timestep is at or above the cutoff. The base runs those, the refiner the rest."""
    cutoff = round(num_train_timesteps - switch * num_train_timesteps)
    return int((timesteps >= cutoff).sum())


def skipped_steps(steps: int, strength: float) -> int:
    """diffusers' get_timesteps: the steps an image-to-image strength skips at the start."""
    return max(steps - min(int(steps * strength), steps), 0)


def _spaced(cfg: NoiseConfig, spacing: Spacing, steps: int) -> np.ndarray:
    n = cfg.num_train_timesteps
    if spacing is Spacing.leading:
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + cfg.steps_offset
    if spacing is Spacing.linspace:
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


def _first_order(sigmas: np.ndarray, i: int) -> tuple[float, float, float, float]:
    a = sigmas[i + 1] / sigmas[i]
    return a, 1.0 - a, 0.0, 0.0


def _prediction(cfg: NoiseConfig, sigma: float) -> tuple[float, float]:
    """(p, q) with x0 = p * x + q * out, for the model's prediction type at noise level sigma."""
    if cfg.prediction_type == "v_prediction":
        return 1 / (sigma**2 + 1), -sigma / math.sqrt(sigma**2 + 1)
    if cfg.prediction_type == "sample":
        return 0.0, 1.0
    return 1.0, -sigma


@dataclass
class _Grid:
    """A scheduler's full run before any step is skipped: per step i of `steps`, its timestep, the sigma of the
    sample entering it, the update (a, b, c, e) and the blend's (s_next, k)."""

    timesteps: np.ndarray
    sigmas: np.ndarray
    coef: list[tuple[float, float, float, float]]
    s_next: list[float]
    k: list[float]
    init_scale: float
    out_scale: float


def _euler(cfg: NoiseConfig, spacing: Spacing, steps: int, ancestral: bool) -> _Grid:
    timesteps = _spaced(cfg, spacing, steps)
    ac = cfg.alphas_cumprod()
    train_sigmas = ((1 - ac) / ac) ** 0.5  # float32, as diffusers computes them
    sig = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
    sigmas = np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)
    coef = []
    for i in range(steps):
        if ancestral:
            s_from, s_to = sigmas[i], sigmas[i + 1]
            up = math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
            down = math.sqrt(s_to**2 - up**2)
            coef.append((down / s_from, 1.0 - down / s_from, 0.0, up))
        else:
            coef.append(_first_order(sigmas, i))
    init_sigma = sigmas.max()
    if spacing is Spacing.leading:
        init_sigma = (init_sigma**2 + 1) ** 0.5
    return _Grid(timesteps, sigmas, coef, list(sigmas[1:]), [1.0] * steps, float(np.float32(init_sigma)), 1.0)


def _ddim(cfg: NoiseConfig, spacing: Spacing, steps: int) -> _Grid:
    ac = cfg.alphas_cumprod()
    n = cfg.num_train_timesteps
    ratio = n // steps
    if spacing is Spacing.leading:
        timesteps = (np.arange(0, steps) * ratio).round()[::-1].astype(np.int64) + cfg.steps_offset
    elif spacing is Spacing.linspace:
        # DDIM rounds its linspace grid to integers (Euler keeps it fractional): truncating instead is one
        # timestep off for most step counts
        timesteps = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    else:
        timesteps = _spaced(cfg, spacing, steps).astype(np.int64)
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
        coef.append((r * a, r * (1.0 - a), 0.0, 0.0))
    out_scale = float(np.sqrt(alpha_prev[-1]))
    # The inpainting blend re-noises the image to the next timestep; after the last step the sample is the VP
    # latents over out_scale, so the image is too (k).
    s_next = [*sig_t[1:], 0.0]
    k = [1.0] * (steps - 1) + [1 / out_scale]
    # DDIM starts from unit noise in the alpha ("VP") space and ends there: convert at both ends.
    return _Grid(timesteps.astype(np.float64), sigmas, coef, s_next, k, float(1 / np.sqrt(alpha_t[0])), out_scale)


def _dpmpp(cfg: NoiseConfig, steps: int, start: int) -> _Grid:
    """DPM++ 2M with Karras sigmas, diffusers' dpmsolver++ / midpoint / lower_order_final."""
    ac = cfg.alphas_cumprod()
    train_sigmas = ((1 - ac) / ac) ** 0.5
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
        if i < start:  # skipped (image-to-image): never run
            coef.append((1.0, 0.0, 0.0, 0.0))
            continue
        # the first step run has no history (a skipped start included); the last is first order (final zero)
        if i == start or i == steps - 1:
            coef.append(_first_order(sigmas, i))
            continue
        a = sigmas[i + 1] / sigmas[i]
        h = math.log(sigmas[i] / sigmas[i + 1])
        h_prev = math.log(sigmas[i - 1] / sigmas[i])
        r = h_prev / h
        coef.append((a, (1 - a) * (1 + 1 / (2 * r)), -(1 - a) / (2 * r), 0.0))
    init_scale = float(np.sqrt(sigmas[0] ** 2 + 1))  # VP start (init_noise_sigma = 1) in sigma space
    return _Grid(timesteps, sigmas, coef, list(sigmas[1:]), [1.0] * steps, init_scale, 1.0)


def _lcm(cfg: NoiseConfig, steps: int) -> _Grid:
    original = cfg.original_inference_steps
    if steps > original:
        raise ScheduleError("steps", f"LCM runs at most {original} steps (the distillation's original_inference_steps)")
    k_ratio = cfg.num_train_timesteps // original
    origin = (np.arange(1, original + 1) * k_ratio - 1)[::-1]
    index = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    timesteps = origin[index]
    ac = cfg.alphas_cumprod().astype(np.float64)
    alpha = ac[timesteps]
    sig = np.sqrt((1 - alpha) / alpha)
    sigmas = np.concatenate([sig, [0.0]])
    coef = []
    for i, t in enumerate(timesteps):
        scaled = float(t) * cfg.timestep_scaling
        c_skip = 0.25 / (scaled**2 + 0.25)  # sigma_data = 0.5
        c_out = scaled / math.sqrt(scaled**2 + 0.25)
        # the next sample is the boundary-scaled estimate re-noised to the next timestep (none after the last)
        e = sig[i + 1] if i + 1 < steps else 0.0
        coef.append((c_skip * math.sqrt(alpha[i]), c_out, 0.0, e))
    return _Grid(
        timesteps.astype(np.float64), sigmas, coef, list(sigmas[1:]), [1.0] * steps, float(1 / math.sqrt(alpha[0])), 1.0
    )


def _pad(values: list[float] | np.ndarray, fill: float) -> np.ndarray:
    out = np.full(MAX_STEPS, fill, dtype=np.float64)
    out[: len(values)] = values
    return out


def build(
    cfg: NoiseConfig,
    scheduler: Scheduler | str,
    steps: int,
    spacing: Spacing | str | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Schedule:
    """The tables for one row: `steps` steps on the `spacing` grid (None: the model's), of which the first
    `start` are skipped (image-to-image, or the refiner's part) and those from `stop` on are left to another
    model (the base's part before the refiner). Raises ScheduleError naming the field for bad input."""
    if not 1 <= steps <= MAX_STEPS:
        raise ScheduleError("steps", f"must be between 1 and {MAX_STEPS}, got {steps}")
    stop = steps if stop is None else stop
    if not 0 <= start < stop <= steps:
        raise ScheduleError("strength", f"leaves no step to run of {steps} (steps {start} to {stop})")
    if scheduler not in set(Scheduler):
        raise ScheduleError("scheduler", f"{scheduler!r} is unknown; use one of {[s.value for s in Scheduler]}")
    if spacing is not None and spacing not in set(Spacing):
        raise ScheduleError("timestep_spacing", f"{spacing!r}: one of {[s.value for s in Spacing]}")
    scheduler = Scheduler(scheduler)
    spacing = Spacing(spacing or cfg.timestep_spacing)
    if scheduler is Scheduler.euler_ancestral and cfg.prediction_type == "sample":
        raise ScheduleError("scheduler", "euler_ancestral does not take a model with prediction_type 'sample'")
    if scheduler in (Scheduler.euler, Scheduler.euler_ancestral):
        grid = _euler(cfg, spacing, steps, ancestral=scheduler is Scheduler.euler_ancestral)
    elif scheduler is Scheduler.ddim:
        grid = _ddim(cfg, spacing, steps)
    elif scheduler is Scheduler.lcm:
        grid = _lcm(cfg, steps)
    else:
        grid = _dpmpp(cfg, steps, start)

    run = range(start, stop)
    sig = grid.sigmas[start:stop]
    pq = [_prediction(cfg, float(s)) for s in sig]
    coef = grid.coef[start:stop]
    columns = {
        "timesteps": _pad(grid.timesteps[start:stop], grid.timesteps[stop - 1]),
        "c_in": _pad(1 / np.sqrt(sig**2 + 1), 1.0),
        "p": _pad([v[0] for v in pq], 1.0),
        "q": _pad([v[1] for v in pq], 0.0),
        "a": _pad([v[0] for v in coef], 1.0),
        "b": _pad([v[1] for v in coef], 0.0),
        "c": _pad([v[2] for v in coef], 0.0),
        "e": _pad([v[3] for v in coef], 0.0),
        "s_next": _pad(grid.s_next[start:stop], 0.0),
        "k": _pad(grid.k[start:stop], 1.0),
        "blend": _pad([1.0] * len(run), 0.0),
    }
    return Schedule(
        steps=len(run),
        tables=columns,
        sigmas=_pad(sig, sig[-1]),
        init_scale=grid.init_scale,
        image_scale=float(grid.sigmas[start]),
        out_scale=grid.out_scale,
    )
