"""ControlNet and IP-Adapter rows against plain ones: what a batch costs with each, side by side in one process.

    python bench/control.py --preset mid --size 256x256 --batch 4 --steps 4 --rounds 5 \
        --json bench/results/control-cpu-mid-256.json

Method (docs/benchmarks.md, "ControlNet and IP-Adapter rows"): the preset's random weights (float32), two random
ControlNets (`a`, `b`: the UNet's encoder half, as ControlNetModel.from_unet makes it; SDXL's conditioning
embedding widths (16, 32, 96, 256) at `mid`, the tests' small one at `tiny`) and one random IP-Adapter (its image
encoder a CLIP ViT-H/14 at the preset's scale: `mid` 512 wide, 32 layers, 224 px, 14 px patches; `tiny` the tests'
tiny one). One engine serves all three (`served`), one serves none (`bare`, the baseline); both compile their
guided programs for one size and `--batch` rows first. Every batch is `--batch` rows of `--steps` guided steps
(guidance 5, Euler), one batch per variant:
- `bare_plain`: plain rows on the engine serving nothing;
- `plain`: the same rows on the engine serving the ControlNets and the IP-Adapter (what the served extras cost a
  batch that uses none: it runs the same plain programs);
- `controlnet_1`: every row with ControlNet `a` (scale 1, every step);
- `controlnet_2`: every row with `a` and `b`;
- `ip_adapter`: every row with an image prompt (scale 0.6);
- `mixed`: unrelated requests in one batch: one row with ControlNet `a`, one with an image prompt, the rest plain.
Each variant runs once first (its programs compiled, caches warmed), then `--rounds` rounds run every variant in
turn (ABCDEF ABCDEF ...: the machine's noise falls on all of them alike); per variant the median, p10 and p90 of
a batch's seconds, s/image (median / rows), and its time against `plain`'s: the median over the rounds of each
round's ratio (`vs_plain`: the machine's load drifts between rounds, less within one), beside the ratio of the
medians (`median_vs_plain`). Beside the measured ratio, the
expected one from XLA's cost analysis (bench/accelerator.py's way: each program lowered and
`cost_analysis()["flops"]` read): a batch = begin + steps x one advance step + finish (the starting noise
program's few FLOPs left out). A ControlNet step is counted on its own (one ControlNet applied to the batch's UNet
rows, its control image's embedding made once per step as the engine's chunks of one step do) and added per
ControlNet the batch's rows use: the controlled advance skips (lax.cond) a ControlNet no row of the batch uses at
that step, which XLA's count of the whole program cannot know. The IP-Adapter's are the imaged programs' own
counts (its image encoder runs once per batch in begin; its keys and values are 4 more tokens per cross-attention).
`grouped` (derived, not measured): the mixed batch's rows served in one batch per kind instead (a ControlNet
batch, an IP-Adapter batch and a plain batch, each a whole batch's time since a part-filled batch is padded to
`--batch` rows), the sum of the three medians, against the mixed batch's.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

# CLIP ViT-H/14 (the `vit-h` IP-Adapters' image encoder) at `mid`'s scale: 0.4 of its widths, as mid's UNet has
# 0.4 of SDXL's (128/320 ... 512/1280), its depth, image and patch sizes kept.
MID_IMAGE_ENCODER = {
    "model_type": "clip_vision_model",
    "architectures": ["CLIPVisionModelWithProjection"],
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 32,
    "num_attention_heads": 8,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
SDXL_CONTROLNET_EMBEDDING = (16, 32, 96, 256)  # diffusers' SDXL ControlNets' conditioning_embedding_out_channels
VARIANTS = ("bare_plain", "plain", "controlnet_1", "controlnet_2", "ip_adapter", "mixed")


def controlnet_step_gflop(net: Any, rows: int, size: tuple[int, int], latent: tuple[int, int]) -> float:
    """XLA's count of one ControlNet's work in one guided step: its control image's embedding for `rows` images and
    the network on their 2 x rows UNet rows (program.py's _control)."""
    import jax
    import jax.numpy as jnp

    from worker.engine import attention, controlnet

    cfg = net.config.unet
    module = controlnet.ControlNet(net.config, attention.einsum, jnp.float32)
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731

    def step(params: Any, image: Any, sample: Any, t: Any, context: Any, pooled: Any, ids: Any) -> Any:
        embedded = jnp.repeat(controlnet.embed(net.config, params, image, jnp.float32), 2, axis=0)
        return module.apply({"params": params}, sample, t, context, pooled, ids, embedded=embedded)

    params = jax.tree_util.tree_map(lambda x: f32(*x.shape), net.params)
    b = 2 * rows
    args = (
        params,
        f32(rows, 3, *size),
        f32(b, cfg.in_channels, *latent),
        f32(b),
        f32(b, 77, cfg.cross_attention_dim),
        f32(b, cfg.pooled_width),
        f32(b, cfg.time_ids),
    )
    return float(jax.jit(step).lower(*args).cost_analysis()["flops"]) / 1e9


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--preset", default="mid", choices=["tiny", "mid"])
    p.add_argument("--size", default="256x256", help="WIDTHxHEIGHT")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    result_file = harness.start("control", args, __doc__)

    import time

    import numpy as np

    from bench.side_by_side import alternate, random_model
    from tests.helpers.variants import CONTROLNET_EMBEDDING, write_controlnet, write_ip_adapter
    from worker.engine import controlnet_source, ip_adapter_source
    from worker.engine.engine import Control, Engine, ImagePrompt, Row
    from worker.engine.program_kind import Part, ProgramKind, Programs

    w, h = (int(v) for v in args.size.split("x"))
    t0 = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix=f"control-{args.preset}-"))
    m = random_model(args.preset, "control", root / "model")  # the adapters are written against its folder
    mid = args.preset == "mid"
    embedding = SDXL_CONTROLNET_EMBEDDING if mid else CONTROLNET_EMBEDDING
    nets = [
        controlnet_source.load(name, write_controlnet(root / "model", root / name, seed, embedding), m.unet, np.float32)
        for name, seed in (("a", 11), ("b", 12))
    ]
    ip_file = write_ip_adapter(root / "model", root / "ip", 13, MID_IMAGE_ENCODER if mid else None)
    ip = ip_adapter_source.load("style", ip_file, m.unet, np.float32)
    write_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    bare = Engine(m, [(h, w)], args.batch)
    bare.compile(Programs.guided | Programs.uint8)
    served = Engine(m, [(h, w)], args.batch, controlnets=nets, ip_adapters=[ip])
    served.compile(Programs.guided | Programs.controls | Programs.images | Programs.uint8)
    compile_s = time.perf_counter() - t0

    rng = np.random.default_rng(3)
    control_images = {n: rng.integers(0, 256, (h, w, 3), np.uint8) for n in ("a", "b")}
    prompt_image = rng.integers(0, 256, (300, 400, 3), np.uint8)  # any size: the encoder's processor crops it
    cn = {n: Control(n, control_images[n], 1.0) for n in ("a", "b")}
    image = ImagePrompt("style", prompt_image, 0.6)

    def row(j: int, controls: tuple[Control, ...] = (), image_prompt: ImagePrompt | None = None) -> Row:
        return Row(f"a picture number {j}", seed=j, steps=args.steps, controlnets=controls, ip_adapter=image_prompt)

    n = args.batch
    mixed_rows = [row(0, (cn["a"],)), row(1, image_prompt=image), *(row(j) for j in range(2, n))]
    batches = {
        "bare_plain": (bare, [row(j) for j in range(n)]),
        "plain": (served, [row(j) for j in range(n)]),
        "controlnet_1": (served, [row(j, (cn["a"],)) for j in range(n)]),
        "controlnet_2": (served, [row(j, (cn["a"], cn["b"])) for j in range(n)]),
        "ip_adapter": (served, [row(j, image_prompt=image) for j in range(n)]),
        "mixed": (served, mixed_rows),
    }
    dispatched = dict(served.dispatched)
    variants = {name: (lambda e=e, r=r: e.generate(r, h, w)) for name, (e, r) in batches.items()}
    run_t0 = time.perf_counter()
    result = alternate(variants, args.rounds)
    run_s = time.perf_counter() - run_t0
    # each batch ran the programs it should have: the served engine's controlled and imaged counts
    ran = {k: served.dispatched[k] - dispatched.get(k, 0) for k in ("control", "ip_adapter", "advance")}
    finite = {k: bool(np.all(result["outputs"][k].finite)) for k in VARIANTS}

    # XLA's counts (GFLOP) of the served engine's programs for this shape
    def gflop(kind: ProgramKind) -> float:
        return float(served.executables.lower(kind, h, w).cost_analysis()["flops"]) / 1e9

    counted = {
        "begin": gflop(ProgramKind(Part.begin)),
        "begin-image": gflop(ProgramKind(Part.begin, imaged=True)),
        "advance": gflop(ProgramKind(Part.advance)),
        "advance-image": gflop(ProgramKind(Part.advance, imaged=True)),
        "advance-control": gflop(ProgramKind(Part.advance, controlled=True)),
        "advance-control-image": gflop(ProgramKind(Part.advance, controlled=True, imaged=True)),
        "finish-uint8": gflop(ProgramKind(Part.finish)),
    }
    dims = served.executables.dims(h, w).latents
    cn_step = controlnet_step_gflop(nets[0], n, (h, w), tuple(dims[2:]))
    counted["controlnet_step"] = cn_step
    # XLA counts both branches of the controlled advance's lax.cond: its count over the plain one's is every served
    # ControlNet's step, 1.0 here when the ControlNet counted alone is what the program runs
    check = (counted["advance-control"] - counted["advance"]) / (len(nets) * cn_step)

    def batch_gflop(imaged: bool, controlnets: int) -> float:
        suffix = "-image" if imaged else ""
        step = counted[f"advance{suffix}"] + controlnets * cn_step
        return counted[f"begin{suffix}"] + args.steps * step + counted["finish-uint8"]

    expected = {
        "bare_plain": batch_gflop(False, 0),
        "plain": batch_gflop(False, 0),
        "controlnet_1": batch_gflop(False, 1),
        "controlnet_2": batch_gflop(False, 2),
        "ip_adapter": batch_gflop(True, 0),
        "mixed": batch_gflop(True, 1),
    }

    median = result["median_s"]
    times = result["batch_s"]
    per_round = {k: [a / b for a, b in zip(times[k], times["plain"], strict=True)] for k in VARIANTS}
    grouped_s = median["controlnet_1"] + median["ip_adapter"] + median["plain"]
    report = {
        "rows": n,
        "steps": args.steps,
        "s_per_image": {k: v / n for k, v in median.items()},
        "vs_plain": {k: harness.percentile(per_round[k], 50) for k in VARIANTS},
        "vs_plain_per_round": per_round,
        "median_vs_plain": {k: v / median["plain"] for k, v in median.items()},
        "gflop_per_batch": expected,
        "flop_vs_plain": {k: v / expected["plain"] for k, v in expected.items()},
        "measured_over_flop_ratio": {
            k: harness.percentile(per_round[k], 50) / (expected[k] / expected["plain"]) for k in VARIANTS
        },
        "grouped_s": grouped_s,
        "grouped_over_mixed": grouped_s / median["mixed"],
        "median_s": median,
        "timing": result["timing"],
        "first_s": result["first_s"],
        "counted_gflop": counted,
        "controlled_advance_over_counted_controlnets": check,
        "served_batches_ran": ran,
        "all_finite": finite,
        "write_s": write_s,
        "compile_s": compile_s,
        "rounds_s": run_s,
    }
    shown = ("s_per_image", "vs_plain", "flop_vs_plain", "measured_over_flop_ratio", "grouped_over_mixed")
    print(json.dumps({k: report[k] for k in shown} | {"counted_gflop": counted, "check": check}, indent=2))
    result_file.add("summary", report)


if __name__ == "__main__":
    main()
