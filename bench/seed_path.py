"""The seed's own path, for bench/engine.py: diffusers 0.39's FlaxStableDiffusionXLPipeline with the blog's
`split_head_dim=True`, on the same weights as our engine (a diffusers folder of PyTorch-layout safetensors).

It runs in .venv-reference (`scripts/setup.sh reference`: the last diffusers and transformers with Flax
classes), as a child process that bench/engine.py drives over stdin, so the two paths' rounds alternate:

    ready {"compile_and_first_run_s": ...}      after loading and a first (compiling) call
    run            -> {"batch_s": ...}          one timed call per line read
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker.engine import convert

_VAE_BACK = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}


def _paths(module: str) -> list[tuple[str, ...]]:
    """Where a PyTorch module lives in diffusers' Flax naming (`name_N`, VAE attention renamed) or
    transformers' (`layers/N`)."""
    parts = module.split(".")
    joined: list[str] = []
    for part in parts:
        if part.isdigit() and joined and not joined[-1].isdigit():
            joined[-1] = f"{joined[-1]}_{part}"
        else:
            joined.append(part)
    found = [tuple(joined), tuple(parts)]
    if joined[-1] in _VAE_BACK:
        found.insert(0, (*joined[:-1], _VAE_BACK[joined[-1]]))
    return found


def to_flax(state: dict[str, np.ndarray], shapes: Any, dtype: Any) -> dict[str, Any]:
    target = convert.flatten(shapes)
    out = {}
    for key, tensor in state.items():
        module, leaf = key.rsplit(".", 1)
        for path in _paths(module):
            options = (
                [((*path, "bias"), tensor)]
                if leaf == "bias"
                else [
                    ((*path, "kernel"), tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T),
                    ((*path, "scale"), tensor),
                    ((*path, "embedding"), tensor),
                ]
            )
            hit = [(k, v) for k, v in options if k in target and tuple(target[k].shape) == v.shape]
            if hit:
                out[hit[0][0]] = np.ascontiguousarray(hit[0][1]).astype(dtype)
                break
    missing = [k for k in target if k not in out]
    if missing:
        raise SystemExit(f"seed path: {len(missing)} parameters not filled, e.g. {missing[:3]}")
    return convert.unflatten(out)


def build(folder: Path, height: int, width: int, batch: int, steps: int, dtype_name: str) -> Callable[[], None]:
    """Load the folder's weights into diffusers 0.39's Flax pipeline (UNet with split_head_dim=True) and return
    one generation call (the first one compiles)."""
    import jax
    import jax.numpy as jnp
    from diffusers import (
        FlaxAutoencoderKL,
        FlaxEulerDiscreteScheduler,
        FlaxStableDiffusionXLPipeline,
        FlaxUNet2DConditionModel,
    )
    from safetensors.numpy import load_file
    from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype_name]
    root = folder
    unet = FlaxUNet2DConditionModel.from_config(
        FlaxUNet2DConditionModel.load_config(root / "unet"), dtype=dtype, split_head_dim=True
    )
    vae = FlaxAutoencoderKL.from_config(FlaxAutoencoderKL.load_config(root / "vae"), dtype=dtype)
    te1 = FlaxCLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"), dtype=dtype, _do_init=False)
    te2 = FlaxCLIPTextModelWithProjection(
        CLIPTextConfig.from_pretrained(root / "text_encoder_2"), dtype=dtype, _do_init=False
    )
    key = jax.random.PRNGKey(0)
    shapes = {
        "unet": jax.eval_shape(unet.init_weights, key),
        "vae": jax.eval_shape(vae.init_weights, key),
        "text_encoder": te1.params_shape_tree,
        "text_encoder_2": te2.params_shape_tree,
    }
    params = {}
    for part in shapes:
        stem = "diffusion_pytorch_model" if part in ("unet", "vae") else "model"
        files = sorted((root / part).glob(f"{stem}*.safetensors"))
        state = {}
        for path in files:
            state.update(load_file(path))
        params[part] = to_flax(state, shapes[part], dtype)
    scheduler = FlaxEulerDiscreteScheduler.from_config(
        json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    )
    pipe = FlaxStableDiffusionXLPipeline(
        text_encoder=te1,
        text_encoder_2=te2,
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        dtype=dtype,
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
    )
    params["scheduler"] = scheduler.create_state()
    n = jax.local_device_count()
    # the blog's replicate: a copy per device, handed over once (an identity pmap)
    stacked = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * n), params)
    replicated = jax.pmap(lambda tree: tree)(stacked)
    del stacked
    prompts = [f"a photo of thing number {i}" for i in range(batch)]
    ids = pipe.prepare_inputs(prompts).reshape(n, batch // n, 2, 77)
    neg = pipe.prepare_inputs(["blurry"] * batch).reshape(n, batch // n, 2, 77)
    rng = jax.random.split(jax.random.PRNGKey(0), n)

    def run() -> None:
        out = pipe(
            ids,
            replicated,
            rng,
            num_inference_steps=steps,
            guidance_scale=5.0,
            height=height,
            width=width,
            neg_prompt_ids=neg,
            jit=True,
        ).images
        np.asarray(out)

    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--folder", type=Path, required=True)
    p.add_argument("--size", required=True, help="HEIGHTxWIDTH")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--dtype", required=True, choices=["bfloat16", "float32"])
    args = p.parse_args()
    h, w = (int(x) for x in args.size.split("x"))
    t0 = time.perf_counter()
    run = build(args.folder, h, w, args.batch, args.steps, args.dtype)
    run()
    print("ready " + json.dumps({"compile_and_first_run_s": time.perf_counter() - t0, "diffusers": "0.39"}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        t = time.perf_counter()
        run()
        print(json.dumps({"batch_s": time.perf_counter() - t}), flush=True)


if __name__ == "__main__":
    main()
