"""LoRA adapters against PyTorch diffusers with PEFT (fixtures/loras.npz, made by make_lora_reference.py on the
same tiny weights and latents, float32): kohya's layout with alphas and diffusers/PEFT's, at scales 1.0 and 0.5,
and both at once; PEFT adapters whose alpha (above and below their rank, with an alpha_pattern) is only in the
header's `lora_adapter_metadata` as diffusers writes it, on the UNet and the text encoders, and diffusers' older key
names. Each case also runs its neighbours (the adapter dropped, the other scale; for the metadata's adapters the
same file without its metadata, i.e. alpha taken as the rank), which must miss. Then: rows with different adapters
in one batch each get their image alone, and nothing compiles when adapters change or are loaded into the bank."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import variants
from worker.engine import compile_log, lora
from worker.engine.engine import Adapters, Engine, EngineInputError, Programs, Row

PARITY_TOL = 1e-4
AS_RANK = "-alpha-as-rank"
METADATA_CASES = ["peft-alpha-up/1.0", "peft-alpha-down/1.0", "peft-te/1.0", "old-keys/1.0"]


@pytest.fixture(scope="module")
def adapter_dir(tiny_dir, lora_reference, tmp_path_factory) -> Path:
    """The fixture's two adapters, and more of the kohya kind for the bank's eviction."""
    folder = tmp_path_factory.mktemp("loras")
    for name, spec in lora_reference["meta"]["adapters"].items():
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        variants.write_lora(tiny_dir, folder / f"{name}.safetensors", **spec)
        if "peft" in spec:  # the same factors with no metadata: read with alpha = rank
            variants.write_lora(tiny_dir, folder / f"{name}{AS_RANK}.safetensors", **(spec | {"peft": None}))
    for i in range(3):
        variants.write_lora(tiny_dir, folder / f"extra{i}.safetensors", "kohya", 2, 100 + i, alpha=1.0)
    variants.write_lora(tiny_dir, folder / "wide.safetensors", "diffusers", 16, 1)  # above the engine's rank
    return folder


@pytest.fixture(scope="module")
def engine(tiny32, adapter_dir) -> Engine:
    """Two slots, so that a third adapter evicts one; rank 8 (the fixture's larger adapter), two per row."""

    def path_of(name: str) -> Path:
        path = adapter_dir / f"{name}.safetensors"
        if not path.exists():
            raise KeyError(name)
        return path

    made = Engine(tiny32, [(64, 64)], batch_rows=3, adapters=Adapters(path_of, rank=8, slots=3, per_row=2))
    # what these tests run: rows with and without guidance and adapters, bytes and float32 out; no init images
    made.compile(Programs.guided | Programs.free | Programs.adapters | Programs.uint8 | Programs.float32)
    return made


def _row(ref, chosen, **change) -> Row:
    meta = ref["meta"]
    row = Row(
        meta["prompt"],
        meta["negative_prompt"],
        guidance_scale=meta["guidance_scale"],
        steps=meta["steps"],
        scheduler="euler",
        loras=tuple((n, float(s)) for n, s in chosen),
    )
    return dataclasses.replace(row, **change)


def _images(engine, ref, rows):
    latents = np.repeat(ref["latents"], len(rows), axis=0)
    return engine.generate(rows, 64, 64, latents=latents, output="float32").images


@pytest.mark.parametrize("case", ["none", "kohya/1.0", "kohya/0.5", "peft/1.0", "peft/0.5", "both", *METADATA_CASES])
def test_parity_with_diffusers_load_lora_weights(engine, lora_reference, case):
    chosen = lora_reference["meta"]["cases"][case]
    want = lora_reference[f"{case}/image"][0]
    rows = [_row(lora_reference, chosen)]
    if chosen:
        # neighbours in the same batch: the adapter dropped, and (each) at another scale
        rows.append(_row(lora_reference, []))
        rows.append(_row(lora_reference, [(n, s * 0.8) for n, s in chosen]))
    if case in METADATA_CASES:  # and the same factors with alpha taken as the rank (the file without metadata)
        rows[1] = _row(lora_reference, [(n + AS_RANK, s) for n, s in chosen])
    got = _images(engine, lora_reference, rows)
    assert np.abs(got[0] - want).max() <= PARITY_TOL
    for neighbour in got[1:]:
        assert np.abs(neighbour - want).max() > 10 * PARITY_TOL


def test_alpha_comes_from_the_metadata_diffusers_writes(engine, lora_reference):
    up, down, te = engine.adapter("peft-alpha-up"), engine.adapter("peft-alpha-down"), engine.adapter("peft-te")
    old = engine.adapter("old-keys")
    assert (up.rank, up.parts) == (4, ["text_encoder", "unet"])
    assert (down.rank, down.parts) == (8, ["text_encoder_2", "unet"])
    assert (te.parts, old.parts, old.layout) == (["text_encoder"], ["text_encoder", "unet"], "diffusers")
    assert len(old.factors) == len(up.factors)  # every layer, in the old names too
    for name, adapter, key, scale in [
        ("peft-alpha-up", up, ("unet", MID_TO_K), 8 / 4),
        ("peft-alpha-down", down, ("unet", MID_TO_K), 16 / 8),  # alpha_pattern {"attn2.to_k": 16}
        ("peft-alpha-down", down, ("unet", (*MID_TO_K[:-1], "to_q")), 4 / 8),
        ("peft-alpha-down", down, ("text_encoder_2", TE_Q), 4 / 8),
        ("peft-te", te, ("text_encoder", TE_Q), 1 / 4),
        ("old-keys", old, ("unet", MID_TO_K), 2 / 4),
        ("old-keys", old, ("text_encoder", TE_Q), 2 / 4),
    ]:
        as_rank = engine.adapter(name + AS_RANK)
        _, got = adapter.factors[key]
        _, plain = as_rank.factors[key]
        np.testing.assert_allclose(got, plain * scale, rtol=1e-6)
        assert scale != 1.0  # alpha taken as the rank would miss


MID_TO_K = ("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "to_k")
TE_Q = ("text_model", "encoder", "layers_0", "self_attn", "q_proj")


def test_the_adapters_touch_what_their_files_say(engine):
    kohya, peft = engine.adapter("kohya"), engine.adapter("peft")
    assert (kohya.layout, kohya.rank, kohya.parts) == ("kohya", 4, ["text_encoder", "text_encoder_2", "unet"])
    assert (peft.layout, peft.rank, peft.parts) == ("diffusers", 8, ["text_encoder_2", "unet"])
    # every adaptable layer of the tiny model is in each file for the parts it touches
    assert len(kohya.factors) == len(engine.bank.targets)
    # alpha 2 over rank 4 is folded into the up factor
    from safetensors.numpy import load_file

    raw = load_file(engine.adapters.path_of("kohya"))
    name = "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k"
    _, up = kohya.factors[("unet", ("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "to_k"))]
    np.testing.assert_array_equal(up, raw[f"{name}.lora_up.weight"] * 0.5)


def test_rows_with_different_adapters_share_a_batch_and_nothing_compiles(engine, lora_reference):
    rows = [
        _row(lora_reference, [("kohya", 1.0)], seed=1),
        _row(lora_reference, [], seed=2),
        _row(lora_reference, [("peft", 0.5), ("kohya", 0.3)], seed=3),
        _row(lora_reference, [("extra0", 1.0)], seed=4),
        _row(lora_reference, [("extra1", 0.8)], seed=5, prompt="a boat"),
        _row(lora_reference, [("extra2", 1.2), ("extra0", -0.5)], seed=6, guidance_scale=1.0),
    ]
    alone = {i: engine.generate([r], 64, 64).images[0] for i, r in enumerate(rows)}
    counter = compile_log.install()
    before, loads = counter.requests, engine.bank.loads
    # three slots: each batch below evicts adapters the one before it loaded
    for batch in ([0, 1, 2], [3, 4, 1], [5, 0, 1], [2, 1, 3]):
        out = engine.generate([rows[i] for i in batch], 64, 64)
        for i, got in zip(batch, out.images, strict=True):
            assert np.abs(got.astype(int) - alone[i].astype(int)).max() <= 1, (batch, i)
        assert [[a.name for a in used] for used in out.adapters] == [[n for n, _ in rows[i].loras] for i in batch]
    assert engine.bank.loads > loads  # adapters were written into slots along the way
    # a batch in which no row names an adapter runs the plain programs: it pays nothing for the bank
    ran = engine.dispatched["lora"]
    plain = engine.generate([rows[1], _row(lora_reference, [], seed=9)], 64, 64).images
    assert engine.dispatched["lora"] == ran
    assert np.abs(plain[0].astype(int) - alone[1].astype(int)).max() <= 1
    assert counter.requests == before


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ((("nope", 1.0),), "no adapter named 'nope'"),
        ((("kohya", float("nan")),), "scale must be a finite number"),
        ((("kohya", 1.0), ("peft", 1.0), ("extra0", 1.0)), "at most 2 per image"),
        ((("wide", 1.0),), "'wide': rank 16 is above this worker's 8"),
    ],
)
def test_bad_adapters_name_the_field_and_the_adapter(engine, lora_reference, loras, message):
    with pytest.raises(EngineInputError, match=message) as err:
        engine.generate([_row(lora_reference, [], loras=loras)], 64, 64)
    assert err.value.field == "loras"


def test_files_that_do_not_fit_are_refused_by_name(engine, tmp_path, tiny_dir):
    from safetensors.numpy import save_file

    conv = tmp_path / "locon.safetensors"
    save_file(
        {
            "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": np.zeros((4, 32, 3, 3), np.float32),
            "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": np.zeros((32, 4, 1, 1), np.float32),
        },
        conv,
    )
    with pytest.raises(lora.AdapterError, match=r"'locon'.*convolution adapters"):
        lora.read(conv, "locon", engine.model)
    other = tmp_path / "other.safetensors"
    save_file(
        {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.zeros(
                (4, 7), np.float32
            ),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.zeros(
                (64, 4), np.float32
            ),
        },
        other,
    )
    with pytest.raises(lora.AdapterError, match="an adapter for another model"):
        lora.read(other, "other", engine.model)


def test_an_engine_without_adapters_refuses_them(engine32):
    with pytest.raises(EngineInputError, match="serves no LoRA adapters"):
        engine32.generate([Row("x", loras=(("kohya", 1.0),))], 64, 64)
