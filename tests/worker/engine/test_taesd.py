"""The preview decoder, TAESD, against PyTorch diffusers' AutoencoderTiny (fixtures/taesd.npz, made by
make_taesd_reference.py from the same random weights, float32): TAESD-XL's config and a smaller one, each beside
its neighbours (the fixed latent-to-RGB map, a block's weights swapped with the next one's, the latents not
divided by the config's scaling factor), which must miss."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from worker.engine import compile_log, convert, previews, taesd
from worker.engine.engine import Engine, Programs, Row
from worker.engine.model_source import ModelError
from worker.engine.taesd import TAESDConfig, TAESDDecoder

PARITY_TOL = 1e-4


def _decode(decoder: taesd.PreviewDecoder, latents: np.ndarray, params=None) -> np.ndarray:
    apply = jax.jit(TAESDDecoder(decoder.config).apply)
    return np.asarray(apply({"params": params or decoder.params}, latents))


def _swapped(params, a: str, b: str):
    """The decoder's parameters with blocks `a` and `b` exchanged (same shapes: a plausible wrong wiring)."""
    out = dict(params)
    out[a], out[b] = params[b], params[a]
    return out


@pytest.mark.parametrize("case", ["xl", "small"])
def test_the_decoder_matches_diffusers_autoencoder_tiny(taesd_reference, case):
    ref = taesd_reference[case]
    decoder = taesd.load(ref["folder"])
    latents, want = ref["latents"], ref["decoded"]
    got = _decode(decoder, latents)
    assert got.shape == want.shape  # (B, 3, 8h, 8w) for TAESD-XL, (B, 3, 4h, 4w) for three stages
    error = np.abs(got - want).max()
    print(f"{case}: max abs error {error:.3g} (tolerance {PARITY_TOL})")
    assert error <= PARITY_TOL
    assert want.std() > 0.3  # a picture with contrast, not a constant a wrong network could also give
    # neighbours: a block wired in the other's place, and the fixed map the previews use without TAESD
    blocks = sorted((k for k in decoder.params if "conv_0" in decoder.params[k]), key=lambda k: int(k.split("_")[1]))
    assert np.abs(_decode(decoder, latents, _swapped(decoder.params, *blocks[:2])) - want).max() > 100 * PARITY_TOL
    mapped = np.stack([previews.latent_rgb(row) for row in latents]).astype(np.float32) / 127.5 - 1
    f = want.shape[-1] // latents.shape[-1]
    mapped = mapped.repeat(f, axis=1).repeat(f, axis=2).transpose(0, 3, 1, 2)
    assert np.abs(mapped - want).max() > 100 * PARITY_TOL


@pytest.mark.parametrize("case", ["xl", "small"])
def test_a_preview_is_what_sdxl_s_pipeline_decodes_with_it(taesd_reference, case):
    """The UNet's latents divided by the config's scaling_factor (1.0 for TAESD-XL; 0.5 in "small", where
    not dividing shows), decoded, in bytes: within one level of diffusers' (these are under 256 px: not shrunk)."""
    ref = taesd_reference[case]
    decoder = taesd.load(ref["folder"])
    got = np.asarray(jax.jit(lambda p, x: taesd.preview(decoder.config, p, x))(decoder.params, ref["latents"]))
    as_bytes = lambda image: np.round(np.clip(image / 2 + 0.5, 0, 1) * 255).transpose(0, 2, 3, 1)  # noqa: E731
    assert got.dtype == np.uint8 and got.shape == as_bytes(ref["pipeline"]).shape
    assert np.abs(got.astype(np.float32) - as_bytes(ref["pipeline"])).max() <= 1
    if decoder.config.scaling_factor != 1.0:
        assert np.abs(got.astype(np.float32) - as_bytes(ref["decoded"])).max() > 8


def test_taesd_xl_s_config_is_the_default_and_its_weights_fill_it(taesd_reference):
    ref = taesd_reference["xl"]
    assert TAESDConfig.from_diffusers(ref["config"]) == TAESDConfig()
    decoder = taesd.load(ref["folder"])
    leaves = convert.flatten(decoder.params)
    # conv_in, 10 blocks of 3 convs, 3 convs after the upsamplers (no bias), conv_out: 1.2M parameters, 64 wide
    assert len([k for k in leaves if k[-1] == "kernel"]) == 1 + 10 * 3 + 3 + 1
    assert decoder.config.scale_factor == 8
    assert all(v.dtype == np.float32 for v in leaves.values())


def test_a_large_image_s_preview_is_shrunk_on_the_device(taesd_reference):
    ref = taesd_reference["small"]  # three stages: 4x
    decoder = taesd.load(ref["folder"])
    latents = np.random.default_rng(0).standard_normal((1, 4, 96, 80)).astype(np.float32)  # a 384x320 image
    got = np.asarray(jax.jit(lambda p, x: taesd.preview(decoder.config, p, x))(decoder.params, latents))
    assert got.shape == (1, 256, 213, 3) and got.dtype == np.uint8
    full = np.clip(_decode(decoder, latents / decoder.config.scaling_factor) / 2 + 0.5, 0, 1) * 255
    assert abs(float(got.mean()) - float(full.mean())) < 2  # the same picture, smaller


def test_what_is_not_a_taesd_folder_is_refused(tmp_path, taesd_reference):
    with pytest.raises(ModelError, match=r"no config\.json"):
        taesd.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ModelError, match="not a TAESD"):
        taesd.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(ModelError, match="no weights"):
        taesd.load(tmp_path)
    small = taesd_reference["small"]
    (tmp_path / "config.json").write_text(json.dumps(taesd_reference["xl"]["config"]))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(
        (small["folder"] / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    with pytest.raises(ModelError, match="does not match"):
        taesd.load(tmp_path)


def test_an_engine_serving_taesd_compiles_its_preview_at_start_and_draws_a_row_with_it(
    tiny32, engine32, taesd_reference
):
    decoder = taesd.load(taesd_reference["xl"]["folder"])
    engine = Engine(tiny32, [(64, 96)], batch_rows=2, progress_every_steps=2, preview_decoder=decoder)
    engine.compile(Programs.guided | Programs.uint8 | Programs.previews)
    assert "2x64x96/preview" in engine.compile_s
    rows = [Row("a lighthouse", seed=7, steps=4), Row("a boat", seed=8, steps=4)]
    counter = compile_log.install()
    before = counter.requests
    pending = engine.dispatch(rows, 64, 96)
    assert list(pending.progress()) == [2, 4]
    drawn = [pending.preview(2, row) for row in range(2)]
    assert counter.requests == before  # the preview program was compiled at start, never per request
    assert pending.preview(3, 0) is None and pending.preview(2, 2) is None  # no chunk ended there; no such row
    # TAESD's picture of each row's own estimate, at the image's size (under 256 px: not shrunk)
    estimate = pending.estimate(2)
    want = np.asarray(jax.jit(lambda p, x: taesd.preview(decoder.config, p, x))(decoder.params, estimate))
    for row, got in enumerate(drawn):
        assert got.shape == (64, 96, 3) and got.dtype == np.uint8
        assert np.abs(got.astype(np.int16) - want[row]).max() <= 1
    assert np.abs(drawn[0].astype(np.int16) - drawn[1]).max() > 8  # each row its own, not the first's
    # an engine without a preview decoder draws the fixed map, at the latents' size
    pending = engine32.dispatch(rows, 64, 96)
    list(pending.progress())
    np.testing.assert_array_equal(pending.preview(2, 1), previews.latent_rgb(pending.estimate(2)[1]))
