"""The lighter step (program.py): the cross-attentions' keys and values leave the loop; checked by XLA's own
count of the lowered programs (nothing is compiled). Its images are the parity tests' (test_engine.py,
test_sampling.py, test_lora.py, test_model.py), which run it."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from worker.engine import attention, convert
from worker.engine.executables import Executables
from worker.engine.program_kind import Part, ProgramKind, Role

ROWS, SIZE = 2, (64, 64)


def _flops(model, light_step: bool, guided: bool) -> dict[Part, float]:
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    exe = Executables({Role.base: model}, mesh, ROWS, "einsum", attention.einsum, light_step=light_step)
    parts = (Part.begin, Part.advance)
    return {part: exe.lower(ProgramKind(part, guided), *SIZE).cost_analysis()["flops"] for part in parts}


def text_projection_flops(model, unet_rows: int) -> int:
    """One UNet call's cross-attention keys and values, from the shapes: 2 * rows * 77 * d_context * inner for
    each of to_k and to_v of every attn2."""
    return sum(
        2 * unet_rows * 77 * leaf.shape[0] * leaf.shape[1]
        for path, leaf in convert.flatten(model.params["unet"]).items()
        if path[-3:] in (("attn2", "to_k", "kernel"), ("attn2", "to_v", "kernel"))
    )


@pytest.mark.parametrize("guided", [True, False], ids=["guided", "free"])
def test_a_step_costs_less_by_the_text_projections_which_begin_takes_once(tiny32, guided):
    before, after = _flops(tiny32, False, guided), _flops(tiny32, True, guided)
    predicted = text_projection_flops(tiny32, ROWS * (2 if guided else 1))
    assert predicted > 0
    # XLA counts a while loop's body once: the advance program's count is one step's
    saved = before[Part.advance] - after[Part.advance]
    assert saved == pytest.approx(predicted, rel=1e-5)
    assert after[Part.begin] - before[Part.begin] == pytest.approx(predicted, rel=1e-5)
