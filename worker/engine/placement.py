"""Putting a model's weights on the devices a group of tensors at a time, so the host never holds them twice.

Placed whole, the weights exist twice while JAX copies them (the host's converted arrays and the devices'
copy; on a CPU both are host memory), and a third time for the UNet while its projections are fused: SDXL in
float32 on a CPU peaked at 28 GB and was killed on a 23 GB host (issue 30). Placed a group at a time (about
model_source.GROUP_BYTES each, an attention's projections never apart), each group is copied to the devices,
put in the program's form there (program_weights.prepare, on that group alone) and let go before the next is
read: the host holds the served weights' devices' copy plus about one group.

prepare runs op by op on each group rather than as one jitted program over the UNet: a program per group
would compile once per group (every group's tree differs), and one over the whole UNet held both forms.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from worker.engine import convert, host_memory, program_weights
from worker.engine.layers import Projections
from worker.engine.model_source import GROUP_BYTES, plan_groups


def groups_of(params: Mapping[str, Any], group_bytes: int = GROUP_BYTES) -> Iterator[tuple[str, convert.FlatTree]]:
    """A model's weights held whole on the host (component -> tree), as the groups Model.stream() yields."""
    for part in sorted(params):
        flat = convert.flatten(params[part])
        dtype = np.dtype(next(iter(flat.values())).dtype) if flat else np.dtype(np.float32)
        for keys in plan_groups(flat, dtype, group_bytes):
            yield part, {k: flat[k] for k in keys}


def place(groups: Iterable[tuple[str, convert.FlatTree]], sharding: Any, projections: Projections) -> dict[str, Any]:
    """Each (component, group) on the devices with `sharding`, the UNet's in the program's form; the groups'
    host arrays are let go as soon as their copy is on the devices (the producer may then release them)."""
    placed: dict[str, convert.FlatTree] = {}
    for part, group in groups:
        on_devices = jax.device_put(group, sharding)
        del group  # the devices' copy is being made: the host's goes with the producer's next step
        if part == "unet" and projections != Projections():
            prepared = program_weights.prepare({"unet": convert.unflatten(on_devices)}, projections)["unet"]
            on_devices = jax.device_put(convert.flatten(prepared), sharding)  # op by op: keep the replication
        # copied before the next group is read, so the producer's host copy (or mapped pages) can go
        jax.block_until_ready(on_devices)
        placed.setdefault(part, {}).update(on_devices)
        del on_devices
        host_memory.trim()  # what a group's host copies freed goes back to the kernel, not kept by the heap
    return {part: convert.unflatten(flat) for part, flat in placed.items()}
