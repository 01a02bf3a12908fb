"""What guidance-free batches and few-step sampling buy: the same rows through the guided and the
guidance-free program, and 4 trailing Euler steps without guidance against 20 guided Euler steps.

    python bench/sampling.py --preset mid --size 256x256 --batch 2 --rounds 2 \
        --json bench/results/sampling-cpu-mid-256.json

Method (docs/benchmarks.md): the preset's random weights, float32, one engine, the same prompts and seeds.
- `guided_program` vs `free_program`: rows with guidance 0 and 4 trailing Euler steps, run by the guided program
  (forced with dispatch(guided=True): two UNet rows per image, the unconditional one thrown away) and by the
  guidance-free program the engine picks for them (one UNet row per image); their largest uint8 pixel
  difference is reported.
- the same at 8 steps (`guided_program_8`, `free_program_8`): the difference from 4 steps is 4 steps' UNet and
  sampler work alone, without the text encoders and the VAE decode that both programs share, so
  `free_speedup_per_step` is the speed-up of the denoising loop itself.
- `turbo_4` vs `guided_20`: 4 trailing Euler steps at guidance 0 (how SDXL-Turbo and Lightning run) against 20
  Euler steps at guidance 5 (the service's default), each on the program the engine picks; images/s of each.
Everything is compiled and run once first; then the rounds alternate the variants so all see the same machine
noise, and the median batch time of each is reported with the ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--preset", default="mid", choices=["tiny", "mid"])
    p.add_argument("--size", default="256x256", help="WIDTHxHEIGHT")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    result_file = harness.start("sampling", args, __doc__)

    import numpy as np

    from bench.side_by_side import alternate, random_model
    from worker.engine.engine import Engine, Row

    w, h = (int(v) for v in args.size.split("x"))
    m = random_model(args.preset, "sampling")
    engine = Engine(m, [(h, w)], args.batch)

    def rows(steps: int, guidance: float, spacing: str | None) -> list[Row]:
        return [
            Row(f"a picture number {i}", seed=i, steps=steps, guidance_scale=guidance, timestep_spacing=spacing)
            for i in range(args.batch)
        ]

    fast = rows(4, 0.0, "trailing")
    fast_8 = rows(8, 0.0, "trailing")
    variants = {
        "guided_program": lambda: engine.generate(fast, h, w, guided=True).images,
        "free_program": lambda: engine.generate(fast, h, w).images,
        "guided_program_8": lambda: engine.generate(fast_8, h, w, guided=True).images,
        "free_program_8": lambda: engine.generate(fast_8, h, w).images,
        "turbo_4": lambda: engine.generate(fast, h, w).images,
        "guided_20": lambda: engine.generate(rows(20, 5.0, None), h, w).images,
    }
    ran = alternate(variants, args.rounds)
    first, images, times, med = ran["first_s"], ran["outputs"], ran["batch_s"], ran["median_s"]
    result = {
        "dtype": "float32",
        "compile_and_first_run_s": first,
        "batch_s": times,
        "median_batch_s": med,
        "timing": ran["timing"],
        "images_per_s": {name: args.batch / t for name, t in med.items()},
        "free_speedup_same_rows": med["guided_program"] / med["free_program"],
        "free_speedup_per_step": (med["guided_program_8"] - med["guided_program"])
        / (med["free_program_8"] - med["free_program"]),
        "turbo_4_over_guided_20_images_per_s": med["guided_20"] / med["turbo_4"],
        # two different XLA programs round differently; the parity tests hold both to diffusers at 1e-4
        "free_vs_guided_max_abs_uint8": int(
            np.abs(images["guided_program"].astype(int) - images["free_program"].astype(int)).max()
        ),
        "dispatched": dict(engine.dispatched),
    }
    print(json.dumps(result, indent=2))
    result_file.add("summary", result)


if __name__ == "__main__":
    main()
