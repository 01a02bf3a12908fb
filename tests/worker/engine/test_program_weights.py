"""The program's weights (program_weights.py): laid out as the program's UNet declares its parameters, from the
checkpoint's layout, which the model keeps."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from worker.engine import convert, fp8, program_weights
from worker.engine.layers import Projections

FORMS = [Projections(fused=True), Projections(fp8=True), Projections(fused=True, fp8=True)]


def _described(tree) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
    return {path: (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in convert.flatten(tree).items()}


@pytest.mark.parametrize("form", FORMS, ids=["fused", "fp8", "fused-fp8"])
def test_the_weights_are_what_the_programs_unet_declares(tiny32, form):
    declared = tiny32.configs.module("unet", np.float32, form=form).shapes()
    laid_out = program_weights.shapes(tiny32.params, form)
    assert _described(laid_out["unet"]) == _described(declared)
    for part in ("vae", "text_encoder", "text_encoder_2"):  # only the UNet changes form
        assert laid_out[part] is not None and _described(laid_out[part]) == _described(tiny32.params[part])


def test_the_checkpoint_layout_is_the_default_form(tiny32):
    assert program_weights.prepare(tiny32.params, Projections()) == dict(tiny32.params)


def test_fused_kernels_are_the_projections_side_by_side(tiny32):
    made = program_weights.prepare(tiny32.params, Projections(fused=True))["unet"]
    block = ("down_blocks_1", "attentions_0", "transformer_blocks_0")
    at = lambda tree, *path: convert.flatten(tree)[(*block, *path)]  # noqa: E731
    fused = np.asarray(at(made, "attn1", "to_qkv", "kernel"))
    parts = [np.asarray(at(tiny32.params["unet"], "attn1", p, "kernel")) for p in ("to_q", "to_k", "to_v")]
    np.testing.assert_array_equal(fused, np.concatenate(parts, axis=-1))
    kv = [np.asarray(at(tiny32.params["unet"], "attn2", p, "kernel")) for p in ("to_k", "to_v")]
    np.testing.assert_array_equal(np.asarray(at(made, "attn2", "to_kv", "kernel")), np.concatenate(kv, axis=-1))


def test_fp8_goes_to_the_transformers_linear_layers_and_1x1_convolutions_only(tiny32):
    made = convert.flatten(program_weights.prepare(tiny32.params, Projections(fused=True, fp8=True)))
    quantized = {path[:-1] for path, leaf in made.items() if leaf.dtype == fp8.E4M3}
    assert quantized and all(path[0] == "unet" for path in quantized)
    names = {path[-1] for path in quantized}
    assert names == {"to_qkv", "to_q", "to_out_0", "proj", "net_2", "proj_in", "proj_out", "conv_shortcut"}
    assert not any(path[-2:] == ("attn2", "to_kv") for path in quantized)  # the text's, once per batch
    for path in quantized:
        assert made[(*path, "kernel_scale")].dtype == np.float32
    # 3x3 convolutions, norms and the embeddings keep the model's dtype
    assert made[("unet", "conv_in", "kernel")].dtype == np.float32


def test_a_quantized_kernel_is_its_weights_to_fp8s_precision(tiny32):
    made = convert.flatten(program_weights.prepare(tiny32.params, Projections(fp8=True)))
    path = ("unet", "mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_2")
    w = np.asarray(convert.flatten(tiny32.params)[(*path, "kernel")])
    back = np.asarray(made[(*path, "kernel")]).astype(np.float32) * np.asarray(made[(*path, "kernel_scale")])
    # e4m3 keeps 3 mantissa bits: within 2^-4 of each value (relative), the subnormals aside
    assert np.abs(back - w).max() <= 2**-4 * np.abs(w).max()
    assert not np.array_equal(back, w)


def test_adapters_of_fused_projections_are_grouped_in_order():
    leaf = lambda name: {"down": name + ".down", "up": name + ".up", "slots": "s", "scales": "c"}  # noqa: E731
    tree = {"attn1": {p: leaf(p) for p in ("to_q", "to_k", "to_v", "to_out_0")}}
    fused = program_weights.fuse_adapters(tree)
    assert fused == {
        "attn1": {
            "to_out_0": leaf("to_out_0"),
            "to_qkv": {
                "down": ("to_q.down", "to_k.down", "to_v.down"),
                "up": ("to_q.up", "to_k.up", "to_v.up"),
                "slots": "s",
                "scales": "c",
            },
        }
    }
    with pytest.raises(ValueError, match="fuse all together or none"):
        program_weights.fuse_adapters({"attn2": {"to_k": leaf("to_k")}})


def test_the_layout_works_on_shapes_too(tiny32):
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tiny32.params)
    form = Projections(fused=True, fp8=True)
    assert _described(program_weights.shapes(shapes, form)) == _described(program_weights.prepare(tiny32.params, form))
