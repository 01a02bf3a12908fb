"""Values every batch passes to the programs that never change, placed on the devices once instead of copied from
the host per batch or per chunk: the placeholder inputs of a batch with no init image or no mask (zero latents,
an all-ones mask) per shape, and the step indices that bound each chunk of steps."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from worker.engine.executables import Executables


class DeviceConstants:
    def __init__(self, executables: Executables, batch_rows: int, rows_sharding: Any, replicated: Any):
        self.executables = executables
        self.batch_rows = batch_rows
        self.rows_sharding = rows_sharding
        self.replicated = replicated
        self._placeholders: dict[tuple[str, int, int], Any] = {}  # (name, height, width) -> on the devices
        self._steps: dict[int, Any] = {}  # step index -> a replicated int32 on the devices

    def placeholder(self, name: str, height: int, width: int) -> Any:
        """Zero image latents ("init") or an all-ones mask ("mask") for a batch of this size, split by rows."""
        key = (name, height, width)
        if key not in self._placeholders:
            dims = self.executables.dims(height, width)
            value = (
                np.zeros(dims.latents, np.float32)
                if name == "init"
                else np.ones((self.batch_rows, 1, dims.latent_height, dims.latent_width), np.float32)
            )
            self._placeholders[key] = jax.device_put(value, self.rows_sharding)
        return self._placeholders[key]

    def step(self, index: int) -> Any:
        """A step index on the devices (replicated): not a host-to-device copy per chunk."""
        if index not in self._steps:
            self._steps[index] = jax.device_put(np.int32(index), self.replicated)
        return self._steps[index]
