"""bfloat16 against float32, per network, on the same weights and inputs.

    python bench/precision.py --preset tiny
    python bench/precision.py --preset mid --json bench/results/precision-mid-cpu.json

Method: the preset's random weights written once as a diffusers folder, loaded twice (float32, bfloat16).
Each network runs alone on the same float32 inputs: both text encoders on tokenized prompts (context and
pooled), the UNet once on a noisy latent at a mid timestep with that context, the VAE decoder on a latent.
Then the whole program: 20 Euler steps, guided, float32 pixels. Reported per output: the largest absolute
difference, and the RMS difference relative to the float32 output's RMS. The weights are random, so the
figures show how much bfloat16 arithmetic moves each network, not a picture's quality.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402


def _diff(a, b) -> dict[str, float]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return {"max_abs": float(np.abs(a - b).max()), "rel_rms": float(np.sqrt(((a - b) ** 2).mean() / (a**2).mean()))}


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--preset", default="tiny", choices=["tiny", "mid"])
    p.add_argument("--size", default="256x256", help="HEIGHTxWIDTH of the whole-program run")
    args = p.parse_args()
    result = harness.start("precision", args, __doc__)
    h, w = (int(x) for x in args.size.split("x"))

    import jax
    import jax.numpy as jnp

    from worker.engine import model, tiny
    from worker.engine.engine import Engine, Row

    folder = Path(tempfile.mkdtemp(prefix=f"precision-{args.preset}-"))
    tiny.write(folder, preset=args.preset, precision=np.float32, threads=os.cpu_count() or 1)
    models = {
        name: model.load_folder(folder, model.LoadOptions(dt))
        for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
    }
    m32 = models["float32"]
    ids = np.stack(
        [
            np.asarray(tok(["a photo of a cat", "a red car at night"], padding="max_length", max_length=77).input_ids)
            for tok in (m32.tokenizer, m32.tokenizer_2)
        ],
        axis=1,
    )
    rng = np.random.default_rng(0)
    f = m32.vae_scale_factor
    latent = rng.standard_normal((2, m32.latent_channels, h // f, w // f)).astype(np.float32)
    outputs: dict[str, dict[str, np.ndarray]] = {}
    for name, m in models.items():
        te1, te2 = m.configs.module("text_encoder", m.dtype), m.configs.module("text_encoder_2", m.dtype)
        c1, _ = jax.jit(te1.apply)({"params": m.params["text_encoder"]}, ids[:, 0])
        c2, pooled = jax.jit(te2.apply)({"params": m.params["text_encoder_2"]}, ids[:, 1])
        # the same float32 context into both UNets: the UNet's own difference, not the encoders' carried over
        ctx32 = outputs["float32"]["context"] if name == "bfloat16" else np.concatenate([c1, c2], -1)
        pooled32 = outputs["float32"]["pooled"] if name == "bfloat16" else pooled
        unet = m.configs.module("unet", m.dtype)
        time_ids = np.tile(np.array([[h, w, 0, 0, h, w]], np.float32), (2, 1))
        eps = jax.jit(unet.apply)(
            {"params": m.params["unet"]},
            latent,
            np.full((2,), 500.0, np.float32),
            np.asarray(ctx32, np.float32),
            np.asarray(pooled32, np.float32),
            time_ids,
        )
        vae = m.configs.module("vae", m.dtype_of("vae"))
        image = jax.jit(lambda p, z, vae=vae: vae.apply({"params": p}, z, method="decode"))(m.params["vae"], latent)
        engine = Engine(m, [(h, w)], batch_rows=2)
        rows = [Row("a photo of a cat", "blurry", seed=1, steps=20), Row("a red car at night", seed=2, steps=20)]
        pixels = engine.generate(rows, h, w, output="float32").images
        outputs[name] = {
            "context": np.concatenate([c1, c2], -1),
            "pooled": pooled,
            "text_encoder": c1,
            "text_encoder_2": c2,
            "unet": eps,
            "vae_decode": image,
            "whole_program_pixels": pixels,
        }
    for key in ("text_encoder", "text_encoder_2", "pooled", "unet", "vae_decode", "whole_program_pixels"):
        diff = _diff(outputs["float32"][key], outputs["bfloat16"][key])
        result.add(key, diff)
        print(f"{key:<22} max abs {diff['max_abs']:.3g}   relative RMS {diff['rel_rms']:.3g}")


if __name__ == "__main__":
    main()
