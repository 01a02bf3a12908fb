"""The programs an accelerator runs, lowered here without one (Executables.export, jax.export): the TPU program
the seed targets, with splash attention under shard_map on a 4-chip mesh, and the CUDA program of an FP8 model,
whose FP8 matmuls must be in the form XLA's GPU compiler turns into cuBLASLt FP8 GEMMs (fp8.py) where they are
meant to be and nowhere else. Nothing is compiled: a few seconds of tracing on the tiny model."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, Mesh

from worker.engine import attention, convert, fp8, model, program_weights
from worker.engine.executables import Executables
from worker.engine.model_source import Quantize
from worker.engine.program_kind import Part, ProgramKind, Role

PARTS = (Part.begin, Part.advance, Part.finish)
F8 = "f8E4M3FN"


def _exported(m: model.Model, platform: str, chips: int, kernel: str) -> dict[Part, str]:
    """Each part of the guided program lowered for `platform` over `chips` devices that are not here, as
    StableHLO text."""
    mesh = AbstractMesh((chips,), ("data",))
    exe = Executables({Role.base: m}, mesh, chips, kernel, attention.make(kernel, mesh, interpret=False))
    out = {}
    for part in PARTS:
        exported = exe.export(ProgramKind(part), 64, 64, [platform])
        assert exported.platforms == (platform,) and exported.nr_devices == chips
        out[part] = exported.mlir_module()
    return out


def fp8_dots(text: str) -> tuple[int, list[str]]:
    """(dot_generals whose two operands are e4m3fn tensors converted up: the rewriter's FP8 GEMM pattern, the
    other places an e4m3fn tensor feeds an op that is not such a dot: convolutions, or a dot with one f8 side)."""
    dots, strays = 0, []
    for function in re.split(r"\n\s*func\.func ", text):
        defined = {}  # SSA value -> (op, the rest of its line), within one function
        for line in function.splitlines():
            if m := re.match(r"\s*(%[\w]+)(?::\d+)? = (\S+) (.*)", line):
                defined[m[1]] = (m[2], m[3])
        for op, rest in defined.values():
            if op == "stablehlo.dot_general":
                operands = re.match(r"(%[\w]+)(?:#\d+)?, (%[\w]+)", rest).groups()
                sources = [defined.get(name, ("", "")) for name in operands]
                f8 = [src == "stablehlo.convert" and f"x{F8}>) ->" in line for src, line in sources]
                if all(f8):
                    dots += 1
                elif any(f8):
                    strays.append(rest[:160])
            elif op == "stablehlo.convolution" and F8 in rest:
                strays.append(rest[:160])
    return dots, strays


@pytest.fixture(scope="module")
def tiny_bf16(tiny_dir):
    return model.load_folder(tiny_dir, model.LoadOptions(jnp.bfloat16), name="tiny")


def test_the_tpu_program_lowers_with_splash_under_shard_map_on_four_chips(tiny_bf16):
    """The seed's target (a TPU v5e-4: four chips, one image each), lowered on every run of the suite."""
    text = _exported(tiny_bf16, "tpu", 4, "splash")
    assert "tpu_custom_call" not in text[Part.begin]  # the text encoders attend with their own einsum
    for part in (Part.advance, Part.finish):  # the UNet's attentions, the VAE's
        assert "tpu_custom_call" in text[part] and "sdy.manual_computation" in text[part]


def test_the_cuda_programs_fp8_matmuls_are_the_unets_linear_layers_and_nothing_else(tiny_dir):
    m = model.load_folder(tiny_dir, model.LoadOptions(jnp.bfloat16, quantize=Quantize.fp8), name="tiny")
    weights = convert.flatten(program_weights.prepare(m.params, program_weights.form(m, light_step=True)))
    quantized = sum(leaf.dtype == fp8.E4M3 for leaf in weights.values())
    assert quantized > 0
    text = _exported(m, "cuda", 1, "xla")
    dots = {part: fp8_dots(text[part]) for part in PARTS}
    # advance: one FP8 GEMM per quantized layer (the UNet runs once in the loop's body), no f8 elsewhere
    assert dots[Part.advance] == (quantized, [])
    # begin (the text encoders, the text's keys and values) and finish (the VAE): none at all
    assert F8 not in text[Part.begin] and F8 not in text[Part.finish]


def test_a_bf16_program_has_no_fp8(tiny_bf16):
    text = _exported(tiny_bf16, "cuda", 1, "xla")
    assert all(F8 not in text[part] for part in PARTS)


def test_a_serialized_executables_name_says_its_quantization_and_its_step(tiny_dir, tiny_bf16):
    """Two engines that differ only in FP8 or in the step's form never read each other's executables."""
    fp8_model = model.load_folder(tiny_dir, model.LoadOptions(jnp.bfloat16, quantize=Quantize.fp8), name="tiny")
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))  # a name lists the devices

    def name(m: model.Model, light_step: bool = True) -> str:
        exe = Executables({Role.base: m}, mesh, 1, "xla", attention.make("xla", mesh), light_step=light_step)
        return exe.file_name(ProgramKind(Part.advance), 64, 64)

    assert len({name(tiny_bf16), name(fp8_model), name(tiny_bf16, light_step=False)}) == 3
    assert name(tiny_bf16) == name(tiny_bf16)
