"""Weights read, placed and let go a group at a time (worker/engine/placement.py, Model.stream), on the tiny model."""

from __future__ import annotations

import time
import tracemalloc
import weakref

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from worker.engine import convert, model, placement
from worker.engine.engine import Engine
from worker.engine.layers import Projections
from worker.engine.model_source import plan_groups

GROUP_BYTES = 64 * 1024  # the tiny model's 3 MB in float32 as some dozens of groups


def _streamed(tiny_dir, **options) -> model.Model:
    return model.load_folder(
        tiny_dir, model.LoadOptions(np.float32, background=True, group_bytes=GROUP_BYTES, **options)
    )


def _replicated():
    return NamedSharding(Mesh(np.array(jax.local_devices()[:1]), ("data",)), PartitionSpec())


def test_placement_goes_a_group_at_a_time_and_holds_no_host_copy(tiny_dir, tiny32):
    """When the next group is asked for, at most the group just placed is still on the host (JAX lets go of a
    copied array on its transfer thread, a moment after the copy is ready), and at the end none is, but for
    those the devices took as their own storage (a CPU device aliases a 64-byte-aligned array rather than copy
    it: then it is the one copy). The groups come component by component, in name order; what lands on the
    devices is what placing the whole model at once puts there, fused projections included."""
    m = _streamed(tiny_dir)
    earlier: list[tuple[weakref.ref, int, int]] = []  # (array, its group's number, its data address)
    alive_at: list[dict[int, int]] = []  # per group asked for: address -> group number, of earlier arrays alive
    seen: list[str] = []

    def watched():
        for part, group in m.stream():
            alive_at.append({address: n for ref, n, address in earlier if ref() is not None})
            earlier.extend((weakref.ref(array), len(seen), array.ctypes.data) for array in group.values())
            seen.append(part)
            yield part, group
            del group

    placed = placement.place(watched(), _replicated(), Projections(fused=True))
    time.sleep(0.5)  # the transfer thread's last release
    left = {address: n for ref, n, address in earlier if ref() is not None}
    assert seen == sorted(seen) and len(seen) > 4 * len(set(seen))  # by component, each in several groups
    on_devices = {leaf.unsafe_buffer_pointer() for leaf in jax.tree_util.tree_leaves(placed)}
    for asked, alive in enumerate(alive_at):
        copies = {n for address, n in alive.items() if address not in on_devices}
        assert copies <= {asked - 1}, f"group {asked} read while host copies of groups {sorted(copies)} are held"
    assert all(address in on_devices for address in left), "host copies outlive the placement"
    want = Engine(tiny32, [(64, 64)], batch_rows=1).params
    got, wanted = convert.flatten(placed), convert.flatten(want)
    assert got.keys() == wanted.keys() and all(np.array_equal(got[k], wanted[k]) for k in wanted)


def test_reading_holds_about_a_group_not_the_model(tiny_dir):
    """Streamed, the host's peak while reading is a few groups; read whole, it is the whole model (the bound
    below fails for it: the measure can tell the two apart)."""
    whole = model.load_folder(tiny_dir, model.LoadOptions(np.float32, background=True))
    m = _streamed(tiny_dir)  # configs, shapes, tokenizers: not the weights, and not measured
    tracemalloc.start()
    try:
        params = whole.wait()
        whole_peak = tracemalloc.get_traced_memory()[1]  # from nothing traced
        del params
        whole.params = {}
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        for _, group in m.stream():
            del group
        streamed_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    served = m.nbytes
    largest = max(  # a group is at least one layer or attention: some of the tiny model's exceed GROUP_BYTES
        sum(4 * int(np.prod(flat[k].shape)) for k in keys)
        for flat in map(convert.flatten, m.params.values())
        for keys in plan_groups(flat, np.float32, GROUP_BYTES)
    )
    assert whole_peak > served  # the converted model, all at once
    assert streamed_peak < 2 * largest + 256 * 1024 < served / 2, (streamed_peak, largest, served)


def test_a_streamed_model_serves_once(tiny_dir):
    m = _streamed(tiny_dir)
    for _ in m.stream():
        pass
    assert m.weights_dropped and m.hash_from == "computed"
    with pytest.raises(model.ModelError, match="already read"):
        next(m.stream())


def test_a_load_that_would_not_fit_the_host_is_refused_naming_bytes_and_dtype(tiny_dir):
    """Before anything is read: the need (the served weights kept on a CPU host, and the groups in flight)
    against what `available_bytes` says, in the message with the dtype."""
    probe = _streamed(tiny_dir, available_bytes=None)
    need = probe.nbytes + 3 * GROUP_BYTES
    with pytest.raises(model.NotEnoughMemory) as refused:
        _streamed(tiny_dir, available_bytes=lambda: need - 1)
    assert f"needs {need} bytes" in str(refused.value) and "float32" in str(refused.value)
    assert f"{need - 1} bytes" in str(refused.value) and "bfloat16" in str(refused.value)  # the way out
    _streamed(tiny_dir, available_bytes=lambda: need)  # just enough
    # off a CPU the host holds only the groups in flight; read whole (not streamed), twice the weights on a CPU
    _streamed(tiny_dir, available_bytes=lambda: 3 * GROUP_BYTES, resident_on_host=False)
    with pytest.raises(model.NotEnoughMemory, match=f"needs {2 * probe.nbytes} bytes"):
        model.load_folder(tiny_dir, model.LoadOptions(np.float32, available_bytes=lambda: 2 * probe.nbytes - 1))


def test_groups_never_part_the_projections_the_program_fuses():
    from worker.engine import model_source, program_weights

    assert set(model_source.ATTENTIONS) == set(program_weights.FUSED)
