"""The request vocabulary the API and the engine share: samplers, spacings, output formats and the hard limits
and defaults of a request. No dependencies (neither pydantic nor numpy), so the engine, the API, the client
and the tests read the same names and numbers from one place.

Limits that a deployment may lower (SDXL_MAX_STEPS, SDXL_MAX_IMAGES_PER_JOB, ...) live in common/settings.py;
these are the ceilings no deployment can raise, because the compiled program or the schedule tables are built
to them.
"""

from __future__ import annotations

from enum import StrEnum


class Scheduler(StrEnum):
    euler = "euler"  # EulerDiscreteScheduler: the reference's and SDXL's default
    euler_ancestral = "euler_ancestral"  # EulerAncestralDiscreteScheduler: fresh noise at every step
    dpmpp_2m_karras = "dpmpp_2m_karras"  # DPMSolverMultistepScheduler, dpmsolver++, order 2, Karras sigmas
    ddim = "ddim"  # DDIMScheduler, eta = 0
    lcm = "lcm"  # LCMScheduler: latent consistency models (LCM-LoRA, LCM-distilled UNets), 2-8 steps


class Spacing(StrEnum):
    """Where the steps fall on the training timesteps (diffusers' timestep_spacing)."""

    leading = "leading"
    linspace = "linspace"
    trailing = "trailing"  # what SDXL-Lightning and Turbo are distilled for: the first step at t = 999


class OutputFormat(StrEnum):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


# The width of the engine's per-row schedule tables: a request's steps are 1..MAX_STEPS (a deployment may
# allow fewer, SDXL_MAX_STEPS).
MAX_STEPS = 150
# LCMScheduler's original_inference_steps: an LCM run's steps are a subset of that grid.
LCM_MAX_STEPS = 50
MAX_SEED = 2**32 - 1  # seeds are uint32 on the device (jax.random.key)
MAX_TOKENS = 77  # both SDXL tokenizers' model_max_length: longer prompts are cut (and the job says so)

# Image-to-image's share of the steps that run when the request gives no strength (diffusers' defaults).
DEFAULT_STRENGTH = 0.3
DEFAULT_INPAINT_STRENGTH = 0.9999

# The refiner (SDXL's ensemble of experts): where the base hands over, and its aesthetic-score conditioning
# (diffusers' StableDiffusionXLImg2ImgPipeline defaults).
REFINER_SWITCH_AT = 0.8
REFINER_AESTHETIC_SCORE = 6.0
REFINER_NEGATIVE_AESTHETIC_SCORE = 2.5
