import numpy as np
import pytest

from worker.engine import convert, tiny


@pytest.fixture(scope="module")
def params():
    return tiny.build_params()


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder", "text_encoder_2"])
def test_round_trip_is_exact(params, part):
    flat = convert.flatten(params[part])
    state = convert.flax_to_pt(params[part])
    back = convert.flatten(convert.pt_to_flax(state, flat, part))
    assert back.keys() == flat.keys()
    for k in flat:
        np.testing.assert_array_equal(back[k], flat[k])


def test_pytorch_names(params):
    state = convert.flax_to_pt(params["vae"])
    # PyTorch names for the renamed pieces: list items, conv layout (O, I, kh, kw)
    assert "decoder.mid_block.attentions.0.to_q.weight" in state
    assert "decoder.mid_block.attentions.0.to_out.0.bias" in state
    assert state["encoder.conv_in.weight"].shape == (32, 3, 3, 3)
    te = convert.flax_to_pt(params["text_encoder"])
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in te


def test_mismatched_checkpoint_names_what_is_wrong(params):
    flat = convert.flatten(params["unet"])
    state = convert.flax_to_pt(params["unet"])
    state.pop("conv_in.weight")
    state["not.a.weight"] = np.zeros(3, np.float32)
    state["conv_out.weight"] = state["conv_out.weight"][:, :2]
    wrong = r"conv_out.weight \(4, 2, 3, 3\), the config's \(4, 32, 3, 3\)"
    with pytest.raises(ValueError, match=rf"2 missing .*conv_in.kernel.*1 unexpected .*not.a.weight.*{wrong}"):
        convert.pt_to_flax(state, flat, "unet")


def test_old_diffusers_vae_attention_names_are_read(params):
    """VAE files saved before diffusers 0.14 call the attention's projections query/key/value/proj_attn."""
    state = convert.flax_to_pt(params["vae"])
    old = {}
    for key, value in state.items():
        for new, legacy in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{legacy}.")
        old[key] = value
    assert "decoder.mid_block.attentions.0.query.weight" in old
    flat = convert.flatten(params["vae"])
    back = convert.flatten(convert.pt_to_flax(convert.legacy_vae_names(old), flat, "vae"))
    assert all(np.array_equal(back[k], flat[k]) for k in flat)


@pytest.mark.parametrize(
    "shape,axes",
    [
        ((300, 257), (1, 0)),
        ((1, 1), (1, 0)),
        ((129, 3, 3, 130), (2, 3, 1, 0)),
        ((40, 7, 1, 1), (2, 3, 1, 0)),
        ((5, 6), (0, 1)),
        ((17,), (0,)),
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_tiled_layout_copy_equals_numpy_copy(shape, axes, dtype):
    """The tile-by-tile copy (sizes that are not multiples of the tile, conv taps, views already contiguous)."""
    import ml_dtypes

    dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
    source = np.random.default_rng(0).standard_normal(shape).astype(np.float16)
    view = source.transpose(axes)
    got = convert.contiguous(view, dtype)
    assert got.flags.c_contiguous and got.dtype == dtype and got.shape == view.shape
    np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(view, dtype=dtype).view(np.uint8))
    assert not np.shares_memory(got, source)
