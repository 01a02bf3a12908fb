"""Make the parity fixture for the preview decoder, TAESD (issue 34), from PyTorch diffusers' AutoencoderTiny (test
extras only; the tests read the output, they do not run this):

    .venv/bin/python tests/worker/engine/make_taesd_reference.py tests/worker/engine/fixtures/taesd.npz

Per case, a random TAESD folder from tests/helpers/variants.py's write_taesd (the decoder's weights, seeded),
loaded into diffusers' AutoencoderTiny(**config) with load_state_dict(strict=True) (every name and shape as
diffusers has them, none left over), saved with save_pretrained and read back with from_pretrained, which then
decodes fixed latents, float32 on the CPU:

- "xl": TAESD-XL's config (madebyollin/taesdxl's config.json: 64 wide, (3, 3, 3, 1) blocks, ReLU);
- "small": another config (16 wide, three stages, SiLU, scaling_factor 0.5), so that what a config says is read.

Recorded: `decoded` = AutoencoderTiny.decode(latents) (the module), and `pipeline` = decode(latents /
scaling_factor), what StableDiffusionXLPipeline does with an AutoencoderTiny as its VAE (no latents_mean/std).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderTiny
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository's root: tests.helpers
from tests.helpers import variants

XL = {  # madebyollin/taesdxl's config.json
    "act_fn": "relu",
    "decoder_block_out_channels": [64, 64, 64, 64],
    "encoder_block_out_channels": [64, 64, 64, 64],
    "force_upcast": False,
    "in_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_decoder_blocks": [3, 3, 3, 1],
    "num_encoder_blocks": [1, 3, 3, 3],
    "out_channels": 3,
    "scaling_factor": 1.0,
    "upsampling_scaling_factor": 2,
}
SMALL = XL | {
    "act_fn": "silu",
    "decoder_block_out_channels": [16, 16, 16],
    "encoder_block_out_channels": [16, 16, 16],
    "num_decoder_blocks": [1, 2, 1],
    "num_encoder_blocks": [1, 1, 1],
    "scaling_factor": 0.5,
}
CASES = {"xl": (XL, 31, (2, 4, 8, 12)), "small": (SMALL, 32, (2, 4, 6, 5))}  # name: (config, seed, latents' shape)
LATENT_STD = 1.5  # SDXL's scaled latents are about unit; wider, so that the decoder's soft clamp (3 tanh(x/3)) matters


def reference(folder: Path, config: dict, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    model = AutoencoderTiny(**{k: v for k, v in config.items() if not k.startswith("_")})
    ours = load_file(folder / "diffusion_pytorch_model.safetensors")
    decoder = {k.removeprefix("decoder."): torch.from_numpy(v) for k, v in ours.items()}
    model.decoder.load_state_dict(decoder, strict=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        saved = load_file(Path(tmp) / "diffusion_pytorch_model.safetensors")
        theirs = {k: tuple(v.shape) for k, v in saved.items() if k.startswith("decoder.")}
        assert theirs == {k: tuple(v.shape) for k, v in ours.items()}, "write_taesd's layout is not diffusers'"
        model = AutoencoderTiny.from_pretrained(tmp).eval()
    x = torch.from_numpy(latents)
    with torch.no_grad():
        decoded = model.decode(x).sample.numpy()
        pipeline = model.decode(x / model.config.scaling_factor).sample.numpy()
    return decoded, pipeline


def main(out: Path) -> None:
    torch.manual_seed(0)
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (config, seed, shape) in CASES.items():
            folder = variants.write_taesd(Path(tmp) / name, seed, config)
            latents = (LATENT_STD * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)
            decoded, pipeline = reference(folder, config, latents)
            arrays |= {f"{name}/latents": latents, f"{name}/decoded": decoded, f"{name}/pipeline": pipeline}
            meta["cases"][name] = {"config": config, "seed": seed, "digest": variants.folder_digest(folder)}
    meta["diffusers"] = __import__("diffusers").__version__
    np.savez_compressed(out, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    print(f"wrote {out}: {sorted(arrays)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
