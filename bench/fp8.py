"""FP8 (SDXL_QUANTIZE=fp8) against bfloat16 and float32, per network and for the whole image, with dynamic and
calibrated activation scales.

    python bench/fp8.py --preset mid --size 256x256 --json bench/results/fp8-cpu-mid-256.json

Method: the preset's random weights written once as a diffusers folder and loaded three times: float32,
bfloat16, and bfloat16 served in FP8 (the UNet's transformer linear layers and 1x1 convolutions as e4m3
matmuls, weights per output channel; the rest bfloat16: what a GPU would serve). On this CPU the FP8 matmuls
run emulated: e4m3's rounding, bfloat16 arithmetic.
- UNet, one call: each model's UNet in the program's form (fused projections) on the same float32 inputs (a
  unit-normal latent at t = 500, the float32 text encoders' context and pooled embedding of two prompts).
- Whole image: 20 guided Euler steps of two rows, float32 pixels in [0, 1], through the engine.
- Two ways to scale activations in FP8: dynamic (fp8.py, what is served: each row's own amax at every call)
  and calibrated (one amax per layer, fixed: the largest each layer's input reached on a calibration batch of
  two other prompts at each of the 20 steps' timesteps, with the unconditional rows, on unit-normal latents).
  The calibrated whole image runs the engine's own begin/advance/finish in one jit with those amaxes among
  the weights (`input_amax`, which the FP8 layers read in place of their rows').
Reported per output: the largest absolute difference and the RMS difference relative to the reference's RMS,
against float32 and against bfloat16. Random weights: how much FP8 moves each output, not image quality.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

EVAL = [("a photo of a cat", "blurry", 1), ("a red car at night", None, 2)]
CALIBRATION = [("a portrait of an old man", None, 11), ("a bowl of fruit on a table", "dark", 12)]
STEPS = 20


def _diff(a: Any, b: Any) -> dict[str, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {"max_abs": float(np.abs(a - b).max()), "rel_rms": float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))}


def _merge(tree: dict[str, Any], amax: dict[str, Any]) -> dict[str, Any]:
    """The UNet's weights with each FP8 layer's calibrated `input_amax` (from the fp8.AMAX collection)."""
    out = dict(tree)
    for name, node in amax.items():
        if name == "input":
            out["input_amax"] = node
        else:
            out[name] = _merge(tree[name], node)
    return out


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--preset", default="mid", choices=["tiny", "mid"])
    p.add_argument("--size", default="256x256", help="HEIGHTxWIDTH")
    args = p.parse_args()
    result_file = harness.start("fp8", args, __doc__)
    h, w = (int(x) for x in args.size.split("x"))

    import jax
    import jax.numpy as jnp

    from worker.engine import fp8, model, program_weights, tiny
    from worker.engine.arguments import AdvanceInputs, BeginInputs, Start
    from worker.engine.engine import Engine, Programs, Row
    from worker.engine.program_kind import Part, Pixels, ProgramKind

    t_start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix=f"fp8-{args.preset}-"))
    tiny.write(folder, preset=args.preset, precision=np.float32, threads=os.cpu_count() or 1)
    options = {
        "float32": model.LoadOptions(jnp.float32),
        "bfloat16": model.LoadOptions(jnp.bfloat16),
        "fp8": model.LoadOptions(jnp.bfloat16, quantize=model.Quantize.fp8),
    }
    models = {name: model.load_folder(folder, option, name=args.preset) for name, option in options.items()}
    m32 = models["float32"]
    f = m32.vae_scale_factor
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((2, m32.latent_channels, h // f, w // f)).astype(np.float32)
    time_ids = np.tile(np.array([[h, w, 0, 0, h, w]], np.float32), (2, 1))

    def encode(prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The float32 text encoders' context and pooled embedding (the same input for every UNet)."""
        ids = np.stack(
            [
                np.asarray(tok(prompts, padding="max_length", max_length=77).input_ids)
                for tok in (m32.tokenizer, m32.tokenizer_2)
            ],
            axis=1,
        )
        te1, te2 = (m32.configs.module(part, jnp.float32) for part in ("text_encoder", "text_encoder_2"))
        c1, _ = jax.jit(te1.apply)({"params": m32.params["text_encoder"]}, ids[:, 0])
        c2, pooled = jax.jit(te2.apply)({"params": m32.params["text_encoder_2"]}, ids[:, 1])
        return np.concatenate([c1, c2], -1), np.asarray(pooled)

    context, pooled = encode([prompt for prompt, _, _ in EVAL])
    calib_context, calib_pooled = encode([prompt for prompt, _, _ in CALIBRATION])

    # UNet, one call, each model in the program's form
    unet_out, unets = {}, {}
    for name, m in models.items():
        form = program_weights.form(m, light_step=True)
        unet = m.configs.module("unet", m.dtype, form=form)
        weights = program_weights.prepare(m.params, form)["unet"]
        unets[name] = (unet, weights)
        call = jax.jit(lambda p, *x, unet=unet: unet.apply({"params": p}, *x))
        unet_out[name] = call(weights, latent, np.full((2,), 500.0, np.float32), context, pooled, time_ids)

    # Calibration: each FP8 layer's largest input over two other prompts (and their unconditional rows: zero
    # embeddings), at each of the 20 steps' timesteps (leading spacing, as SDXL's Euler), on unit-normal latents.
    unet, weights = unets["fp8"]
    observe = jax.jit(lambda p, *x: unet.apply({"params": p}, *x, mutable=[fp8.AMAX])[1][fp8.AMAX])
    both_context = np.concatenate([np.zeros_like(calib_context), calib_context])
    both_pooled = np.concatenate([np.zeros_like(calib_pooled), calib_pooled])
    amax = None
    for t in (np.arange(STEPS) * (1000 // STEPS))[::-1] + 1:
        x = rng.standard_normal((4, *latent.shape[1:])).astype(np.float32)
        t4 = np.full((4,), float(t), np.float32)
        seen = observe(weights, x, t4, both_context, both_pooled, np.tile(time_ids, (2, 1)))
        amax = seen if amax is None else jax.tree.map(jnp.maximum, amax, seen)
    calibrated = _merge(weights, amax)
    call = jax.jit(lambda p, *x: unet.apply({"params": p}, *x))
    unet_out["fp8_calibrated"] = call(calibrated, latent, np.full((2,), 500.0, np.float32), context, pooled, time_ids)

    # Whole image: the engine, 20 guided Euler steps; the calibrated FP8 one through the engine's own parts
    rows = [Row(prompt, negative, seed=seed, steps=STEPS) for prompt, negative, seed in EVAL]
    pixels, engines = {}, {}
    for name, m in models.items():
        engines[name] = Engine(m, [(h, w)], batch_rows=2)
        engines[name].compile(Programs.guided | Programs.float32)
        pixels[name] = engines[name].generate(rows, h, w, output="float32").images
    e = engines["fp8"]
    parts = e.executables.program(ProgramKind(Part.finish, output=Pixels.float32))

    def whole(params, begin, time_ids, tables, stop):
        state, text = parts.begin(params, None, begin)
        state, _ = parts.advance(params, None, state, AdvanceInputs(text, begin.scalars, time_ids, tables), 0, stop)
        return parts.finish(params, state, begin.scalars)[0]

    batch = e.inputs.build(rows, h, w)
    seeds = jax.device_put(batch.seeds, e.rows_sharding)
    noise = e.executable(h, w, ProgramKind(Part.noise))(seeds)
    base = jax.device_put(batch.base, e.rows_sharding)
    init, mask = e.constants.placeholder("init", h, w), e.constants.placeholder("mask", h, w)
    begin = BeginInputs(base.prompts, Start(noise, init, mask, init, seeds), base.scalars)
    params = dict(e.params) | {"unet": _merge(e.params["unet"], jax.device_put(amax, e.replicated))}
    pixels["fp8_calibrated"] = np.asarray(jax.jit(whole)(params, begin, base.time_ids, base.tables, batch.base.steps))

    result: dict[str, Any] = {"steps": STEPS, "calibrated_layers": len(jax.tree_util.tree_leaves(amax))}
    for output, got in (("unet_one_call", unet_out), ("whole_image_pixels", pixels)):
        for name in ("bfloat16", "fp8", "fp8_calibrated"):
            for reference in ("float32", "bfloat16"):
                if name == reference:
                    continue
                key = f"{output}/{name}_vs_{reference}"
                result[key] = _diff(got[name], got[reference])
                print(f"{key:<50} max abs {result[key]['max_abs']:.3g}   relative RMS {result[key]['rel_rms']:.4f}")
    result["total_s"] = time.perf_counter() - t_start
    result_file.add("summary", result)


if __name__ == "__main__":
    main()
