"""What decides a row's output bytes besides the row and the weights (model.weights_hash): the programs are
deterministic, but XLA picks fusions and reduction orders by shape (the batch's rows), device and version, so an
engine that differs in any of these may move pixels by a level. Recorded with every image and in a data set's
manifest and card (common/jobs.py RenderConditions)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from worker.engine.model import Model


def of(model: Model, mesh: Mesh, attention: str, batch_rows: int) -> dict[str, str | int]:
    import jaxlib

    device = mesh.devices.flat[0]
    return {
        "dtype": np.dtype(model.dtype).name,
        "vae_dtype": np.dtype(model.dtype_of("vae")).name,
        "quantize": str(model.quantize),
        "attention": attention,
        "batch_rows": batch_rows,
        "devices": int(mesh.devices.size),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }
