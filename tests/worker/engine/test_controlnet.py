"""ControlNets against PyTorch diffusers (fixtures/controlnets.npz, made by make_controlnet_reference.py on the same
tiny weights, float32): one ControlNet's residuals alone, then the ControlNet pipelines (text-to-image with one and
two ControlNets, scales and step windows, image-to-image, inpainting), each case beside its neighbours in the
same batch (another scale, the ControlNet dropped, another control image), which must miss."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from worker.engine import attention, controlnet_source
from worker.engine.controlnet import ControlNet

PARITY_TOL = 1e-4


@pytest.fixture(scope="module")
def loaded(tiny32, tiny_controlnets):
    return {
        name: controlnet_source.load(name, folder, tiny32.unet, np.float32) for name, folder in tiny_controlnets.items()
    }


def test_residuals_match_diffusers_controlnetmodel(loaded, controlnet_reference):
    ref = controlnet_reference
    net = loaded["a"]
    inputs = [ref[f"residuals/in/{k}"] for k in ("sample", "timesteps", "context", "text_embeds", "time_ids", "cond")]
    got = jax.jit(ControlNet(net.config, attention.einsum).apply)({"params": net.params}, *inputs)
    assert len(got.down) == sum(k.startswith("residuals/down_") for k in ref)
    for name, mine in [*((f"down_{i}", d) for i, d in enumerate(got.down)), ("mid", got.mid)]:
        want = ref[f"residuals/{name}"]
        assert np.abs(np.asarray(mine).transpose(0, 3, 1, 2) - want).max() <= PARITY_TOL, name
    # the zero convolutions are not zero: the residuals carry the control image
    assert np.abs(want).max() > 0.1
